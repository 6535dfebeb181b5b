"""Membership event handling: how fast a change is decided, agreed, and what it costs.

Role in the whole: this is the measurement behind the paper's claim that
scale-in, link-down and link-up are handled "within 1 ms" (Feng et al. 2025)
and behind DESIGN.md's *event handling latency* (part (a): from the event to
the new view committed at every member).  Part (b), the first training step in
the new view, needs the strategy and is measured elsewhere.

    python benchmarks/membership.py [--quick | --smoke] [--json PATH] [--seed N]

It prints a table and, with ``--json``, writes a list of rows (plots are made
from the JSON).  Each row is one (mode, nodes, event) with medians over
``repeats`` runs and their min/max:

``decision_us``
    Host time (``perf_counter`` around the call, in microseconds: the call's
    CPU time when its core is not shared) of the one call into the membership
    machine in which the driving node (the coordinator) proposed the new
    view: the ``Proposed`` event's call.  In the
    simulator from :attr:`Simulator.decisions`, in real mode from the
    coordinator agent's :attr:`Agent.decisions`.  This is what the paper's bar
    is about, and the table shows it next to the bar (``<=1ms``: pass/miss of
    the median) for scale-in (leave, failure) and link events; a join has no
    such bar.  It excludes detection: a failure is decided only once it is
    confirmed.
``decided_ms``
    From the event to that proposal (detection plus fact propagation).
``commit_ms``
    From the event (the join request, the leave request, the crash, the link
    cut or restore) to the moment the last live member of the new view
    installed it.  Simulator: virtual seconds, taken by a listener on
    ``ViewChanged``.  Real mode: wall time, taken by a subscriber on every
    agent.
``messages`` / ``messages_all``
    Messages sent by all nodes from the event until that commit (messages
    emitted by the commit's own last call are not counted).  ``messages``
    counts protocol messages only: everything except plain ``Ping``/``Ack``
    probes, which are the steady-state background that flows whether or not
    anything happens (indirect ``PingReq``, facts, Paxos, commits, syncs, join
    requests).  ``messages_all`` counts everything, probes included.  In real
    mode they are counted at each agent's hand-off from the machine to the
    transport (the agent has no public counter; see ``_count_messages``).
``proposals`` / ``later_proposals``
    Proposals from the event to the commit (1 unless a ballot was retried or
    another change got mixed in), and during the settle after it (0 when the
    event ended in one view change; the table warns otherwise).
``samples``
    The raw per-repetition values, with ``view_size`` (members just before the
    event) and ``by_type`` (the window's messages by message type).

Every event starts from steady state: at least a few seconds after the
previous commit and until no node has facts left to piggyback (read from the
machine's gossip queue), so one event's dissemination is neither charged to
the next event nor mixed into it.  A full garbage collection runs just before
each event: in the simulator the heap holds all n nodes, and a generation-2
pass over 1,000 nodes' objects inside a measured call would be a cost no
single node pays.

Modes:

``sim``
    The deterministic simulator (:mod:`chaos_lightning.membership.sim`), preset
    ``lan``, at 8, 64 and 1,000 nodes; all five events on one cluster per
    repetition, in order join, leave, failure, link-down, link-up.
    The victim, the leaver, the contact and the cut link are drawn from the
    seed among the members other than the coordinator (rank 0), the common
    case.  Link events as the scenario tests drive them: ``cut(a, b)`` and then
    ``hint_unreachable(b)`` at ``a`` (the data plane noticed a failed send);
    link-up after ``restore(a, b)``.  ``nodes`` is the cluster's size when
    formed; ``view_size`` is the size just before the event (N, N+1, N, N-1,
    N-1).
``real``
    Real agents (real TCP on loopback, the HMAC handshake, one asyncio loop
    thread per agent), preset ``local``, at 5 nodes (and 8 in the full run),
    all in this process so that the coordinator's ``decisions`` can be read
    directly; a fresh cluster per repetition.  A crash is modelled by
    ``Agent.stop()``: the loop stops and its sockets are aborted without a
    leave, which is exactly what peers on loopback observe of a ``kill -9``
    (the kernel closes a dead process's sockets).  The process-level kill is
    covered by ``tests/test_rendezvous_contract.py``.  No real link rows: a
    link cut needs network namespaces (a later testbed).

``--quick``: 1 repetition at 1,000 nodes and 3 elsewhere (a few minutes at
most on 2 cores).  ``--smoke``: only 8-node sim and 5-node real, 1 repetition
(for the test).  Default: 5 repetitions everywhere.  Repetition ``r`` uses
seed ``seed + r``; the row lists the seeds.
"""

from __future__ import annotations

import argparse
import gc
import json
import logging
import random
import statistics
import sys
import threading
import time
import traceback
from collections.abc import Callable
from dataclasses import dataclass, field

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.messages import Ack, Ping
from chaos_lightning.membership.sim import Simulator
from chaos_lightning.membership.view import View

SIM_EVENTS = ("join", "leave", "failure", "link-down", "link-up")
REAL_EVENTS = ("join", "leave", "failure")
#: The paper's bar: scale-in and link events decided within 1 ms.
PAPER_BAR_US = 1000.0
BAR_EVENTS = frozenset({"leave", "failure", "link-down", "link-up"})

SIM_PRESET = "lan"
REAL_PRESET = "local"
#: Every event starts from steady state: at least SIM_SETTLE virtual seconds
#: after the previous commit (or the cluster's formation), and then until no
#: node has facts left to piggyback, so one event's dissemination is neither
#: charged to the next nor mixed into it.  Draining the formation's 1,000
#: join facts takes about 130 virtual seconds at 1,000 nodes (10 s of wall
#: time); SIM_DRAIN_LIMIT only bounds a cluster that never quiets down.
SIM_SETTLE = 3.0
SIM_DRAIN_LIMIT = 300.0
#: virtual seconds an event may take before the run is declared failed
SIM_TIMEOUT = 60.0
#: wall seconds between events in real mode (local preset: 0.2 s periods),
#: and then until no agent has facts left to gossip, as in the simulator
REAL_SETTLE = 1.0
REAL_DRAIN_LIMIT = 10.0
REAL_TIMEOUT = 20.0
#: the cluster secret of the benchmark's agents: real mode runs the HMAC
#: handshake on every connection, as a deployment would
REAL_SECRET = "membership-benchmark"

NOTES = [
    "decision_us: host time of the coordinator's call that proposed the new view (excludes detection).",
    "paper bar: scale-in (leave, failure) and link events decided within 1 ms; pass/miss of the median.",
    "commit_ms: event -> new view installed at every live member; sim in virtual time, real in wall time.",
    "messages: protocol messages only (all but Ping/Ack probes); messages_all: every message sent.",
    "real mode: in-process agents over loopback TCP; a failure is Agent.stop() (sockets abort, no leave),",
    "  which is what peers on loopback see of a kill -9. No real link rows yet: link cuts need the",
    "  network-namespace testbed.",
]


# ---------------------------------------------------------------------- results
@dataclass
class Sample:
    """One measured event."""

    view_size: int
    decision_us: float
    decided_ms: float
    commit_ms: float
    messages: int
    messages_all: int
    #: proposals from the event to the commit (1 unless a proposal was retried
    #: or another change was mixed in)
    proposals: int
    #: proposals during the settle after the commit: 0 when the event ended
    #: in exactly one view change
    later_proposals: int = 0
    #: messages of the window by type (the breakdown of ``messages_all``)
    by_type: dict[str, int] = field(default_factory=dict)


def _protocol(messages: list[tuple[str, str, object]]) -> int:
    return sum(1 for _, _, m in messages if not isinstance(m, (Ping, Ack)))


def _delta(after: dict[str, int], before: dict[str, int]) -> dict[str, int]:
    return {k: v - before.get(k, 0) for k, v in sorted(after.items()) if v - before.get(k, 0)}


def _quiet(machines) -> bool:
    """No node has facts left to piggyback: the cluster is in steady state.

    Read from the machine's gossip queue (private; the machine exposes no
    such query).  Without the attribute, only the fixed settle time counts.
    """
    return not any(getattr(m, "_gossip", None) for m in machines)


# ---------------------------------------------------------------------- simulator
class _SimCommit:
    """A simulator listener: when did every member of a view that satisfies
    ``wanted`` hold it, and how many messages had been sent by then?

    The simulator reports a node's events before it counts the messages of
    the same call, so the counters read here stop just before the last
    installer's own output.
    """

    def __init__(self, sim: Simulator, wanted: Callable[[View], bool]):
        self.sim = sim
        self.wanted = wanted
        self.installed: dict[str, float] = {}
        self.at: float | None = None
        self.sent = self.protocol = 0
        self.by_type: dict[str, int] = {}

    def __call__(self, t: float, node: str, e: object) -> None:
        if self.at is not None or not isinstance(e, ev.ViewChanged) or not self.wanted(e.view):
            return
        self.installed.setdefault(node, t)
        view = e.view
        if len(self.installed) >= view.size and all(n in self.installed for n in view.ids):
            self.at = t
            self.sent, self.protocol = self.sim.stats.sent, self.sim.stats.protocol
            self.by_type = dict(self.sim.stats.by_type)


def _sim_event(sim: Simulator, name: str, act: Callable[[], None], wanted: Callable[[View], bool]) -> Sample:
    some = sim.members()[0]
    before = sim.view_of(some)
    if wanted(before):
        raise RuntimeError(f"{name}: the current view already satisfies the event's outcome")
    watch = _SimCommit(sim, wanted)
    # A full collection now, so that one is not due inside the measured calls:
    # in the simulator the heap holds all n nodes, and a generation-2 pass
    # over 1,000 nodes' objects is a cost no single real node pays.
    gc.collect()
    t0, sent0, proto0 = sim.now, sim.stats.sent, sim.stats.protocol
    types0 = dict(sim.stats.by_type)
    first_decision = len(sim.decisions)
    sim.listeners.append(watch)
    try:
        act()
        # check_every only bounds how far the clock runs past the commit; the
        # commit time itself is the listener's, exact
        ok = sim.run_until(lambda: watch.at is not None, timeout=SIM_TIMEOUT, check_every=0.01)
    finally:
        sim.listeners.remove(watch)
    if not ok or watch.at is None:
        raise RuntimeError(f"sim {name} at {len(sim.nodes)} nodes: no commit in {SIM_TIMEOUT}s ({sim.summary()})")
    window = [d for d in sim.decisions[first_decision:] if d.time <= watch.at]
    decision = next((d for d in window if wanted(d.view)), None)
    if decision is None:
        raise RuntimeError(f"sim {name}: a view was committed but nobody proposed it (decisions: {window})")
    return Sample(
        view_size=before.size,
        decision_us=decision.cpu_us,
        decided_ms=(decision.time - t0) * 1e3,
        commit_ms=(watch.at - t0) * 1e3,
        messages=watch.protocol - proto0,
        messages_all=watch.sent - sent0,
        proposals=len(window),
        by_type=_delta(watch.by_type, types0),
    )


def _sim_settle(sim: Simulator) -> int:
    """Run to steady state (see ``SIM_SETTLE``); returns the proposals made meanwhile."""
    first = len(sim.decisions)
    sim.run_for(SIM_SETTLE)
    if not sim.run_until(lambda: _quiet(sim.nodes.values()), timeout=SIM_DRAIN_LIMIT, check_every=0.5):
        print(f"note: sim {len(sim.nodes)} nodes: gossip still queued after {SIM_DRAIN_LIMIT:.0f}s", file=sys.stderr)
    return len(sim.decisions) - first


def sim_repetition(n: int, seed: int) -> dict[str, Sample]:
    """All five events on one ``n``-node simulated cluster."""
    sim = Simulator(seed=seed, config=Config.preset(SIM_PRESET))
    ids = sim.start_cluster(n)
    _sim_settle(sim)
    coordinator = sim.view_of(ids[0]).members[0].id
    rng = random.Random(f"membership-bench/{seed}/{n}")
    leaver, victim, a, b = rng.sample([i for i in ids if i != coordinator], 4)
    contact = rng.choice([i for i in ids if i not in (coordinator, leaver, victim)])
    newcomer = "newcomer"

    def link_down() -> None:
        sim.cut(a, b)
        # the data plane at a notices first (a failed send), as in the scenario tests
        sim.call(a, lambda m: m.hint_unreachable(b, sim.now))

    script: list[tuple[str, Callable[[], None], Callable[[View], bool]]] = [
        ("join", lambda: sim.join(newcomer, [contact]), lambda v: newcomer in v),
        ("leave", lambda: sim.leave(leaver), lambda v: leaver not in v),
        ("failure", lambda: sim.crash(victim), lambda v: victim not in v),
        ("link-down", link_down, lambda v: a in v and b in v and not v.link_up(a, b)),
        ("link-up", lambda: sim.restore(a, b), lambda v: v.link_up(a, b)),
    ]
    out: dict[str, Sample] = {}
    for name, act, wanted in script:
        out[name] = _sim_event(sim, name, act, wanted)
        out[name].later_proposals = _sim_settle(sim)
    return out


# ---------------------------------------------------------------------- real agents
class _MessageCounter:
    """Messages the membership machines handed to their agents' transports."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.sent = 0
        self.protocol = 0
        self.by_type: dict[str, int] = {}

    def add(self, messages: list[tuple[str, str, object]]) -> None:
        if not messages:
            return
        proto = _protocol(messages)
        with self._lock:
            self.sent += len(messages)
            self.protocol += proto
            for _, _, m in messages:
                name = type(m).__name__
                self.by_type[name] = self.by_type.get(name, 0) + 1

    def read(self) -> tuple[int, int, dict[str, int]]:
        with self._lock:
            return self.sent, self.protocol, dict(self.by_type)


def _count_messages(agent, counter: _MessageCounter) -> None:
    """Count what ``agent``'s machine asks it to send.

    The agent has no public message counter, so this wraps its ``_apply``
    (every machine output passes through it) on this instance only.  The
    count is taken after the output is applied: the subscribers, which may
    stop the clock on a commit, run inside it, so the committing call's own
    messages fall after the commit, as in the simulator.
    """
    apply = agent._apply

    def counted(out) -> None:
        apply(out)
        counter.add(out.messages)

    agent._apply = counted


class _RealCommit:
    """Subscribers on every agent: when did all members of a view satisfying
    ``wanted`` install it (``perf_counter`` seconds)?"""

    def __init__(self, wanted: Callable[[View], bool], counter: _MessageCounter):
        self.wanted = wanted
        self.counter = counter
        self._lock = threading.Lock()
        self.installed: dict[str, float] = {}
        self.done = threading.Event()
        self.at: float | None = None
        self.sent = self.protocol = 0
        self.by_type: dict[str, int] = {}
        self._unsubscribe: list[Callable[[], None]] = []

    def watch(self, agent) -> None:
        node = agent.node_id

        def on_event(e: object) -> None:
            if not isinstance(e, ev.ViewChanged) or not self.wanted(e.view):
                return
            t = time.perf_counter()
            with self._lock:
                if self.at is not None:
                    return
                self.installed.setdefault(node, t)
                view = e.view
                if all(n in self.installed for n in view.ids):
                    self.at = t
                    self.sent, self.protocol, self.by_type = self.counter.read()
                    self.done.set()

        self._unsubscribe.append(agent.subscribe(on_event))

    def close(self) -> None:
        for unsubscribe in self._unsubscribe:
            unsubscribe()


class _RealCluster:
    """``n`` in-process agents on loopback, always stopped on exit."""

    def __init__(self, n: int):
        self.n = n
        self.agents: list = []
        self.counter = _MessageCounter()

    def new_agent(self):
        from chaos_lightning.agent import Agent

        agent = Agent(bind="127.0.0.1:0", secret=REAL_SECRET, membership=Config.preset(REAL_PRESET))
        _count_messages(agent, self.counter)
        self.agents.append(agent)
        return agent

    def live(self) -> list:
        return [a for a in self.agents if not a._stopped]

    def __enter__(self) -> _RealCluster:
        try:
            founder = self.new_agent().start([])
            if founder.wait_view(timeout=REAL_TIMEOUT) is None:
                raise RuntimeError("real: the founder did not commit its first view")
            for _ in range(self.n - 1):
                self.new_agent().start([founder.addr])
            _wait(lambda: all((v := a.view()) is not None and v.size == self.n for a in self.agents),
                  REAL_TIMEOUT, f"real: {self.n} agents did not form one view")
        except BaseException:
            self.__exit__()  # __exit__ is not called when __enter__ raises
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        for agent in self.agents:
            agent.stop()


def _wait(pred: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not pred():
        if time.monotonic() > deadline:
            raise RuntimeError(what)
        time.sleep(0.005)


def _real_event(cluster: _RealCluster, name: str, act: Callable[[], None], wanted: Callable[[View], bool],
                subject: str, extra=None) -> Sample:
    live = cluster.live()
    before = live[0].view()
    watch = _RealCommit(wanted, cluster.counter)
    for agent in live + ([extra] if extra is not None else []):
        watch.watch(agent)
    first = {id(a): len(a.decisions) for a in cluster.agents}
    gc.collect()  # as in the simulator: no collection left due from setting up
    sent0, proto0, types0 = cluster.counter.read()
    wall0 = time.time()
    t0 = time.perf_counter()
    try:
        act()
        if not watch.done.wait(REAL_TIMEOUT):
            raise RuntimeError(f"real {name} at {before.size} nodes: no commit everywhere in {REAL_TIMEOUT}s")
    finally:
        watch.close()
    word = name  # the machine's reasons read "join <ids>", "leave <ids>", "failure <ids>"
    decisions = [
        (t, cpu, reason)
        for a in cluster.agents
        for t, cpu, reason in list(a.decisions)[first.get(id(a), 0):]
        if any(part.startswith(word + " ") and subject in part for part in reason.split("; "))
    ]
    if not decisions:
        raise RuntimeError(f"real {name}: committed, but no agent recorded the decision")
    t_dec, cpu_us, _ = min(decisions)
    return Sample(
        view_size=before.size,
        decision_us=cpu_us,
        decided_ms=(t_dec - wall0) * 1e3,
        commit_ms=(watch.at - t0) * 1e3,
        messages=watch.protocol - proto0,
        messages_all=watch.sent - sent0,
        proposals=len(decisions),
        by_type=_delta(watch.by_type, types0),
    )


def _real_settle(cluster: _RealCluster) -> int:
    """Wait for steady state (see ``REAL_SETTLE``); returns the proposals made meanwhile."""
    first = sum(len(a.decisions) for a in cluster.agents)
    time.sleep(REAL_SETTLE)
    deadline = time.monotonic() + REAL_DRAIN_LIMIT
    while not _quiet(a.machine for a in cluster.live()):
        if time.monotonic() > deadline:
            print(f"note: real: gossip still queued after {REAL_DRAIN_LIMIT:.0f}s", file=sys.stderr)
            break
        time.sleep(0.05)
    return sum(len(a.decisions) for a in cluster.agents) - first


def real_repetition(n: int, seed: int) -> dict[str, Sample]:
    """Join, leave and failure on a fresh cluster of ``n`` real agents."""
    rng = random.Random(f"membership-bench/real/{seed}/{n}")
    out: dict[str, Sample] = {}
    with _RealCluster(n) as cluster:
        _real_settle(cluster)
        view = cluster.agents[0].view()
        by_id = {a.node_id: a for a in cluster.agents}
        others = [m for m in view.ids[1:]]  # rank 0 coordinates
        leaver_id, victim_id = rng.sample(others, 2)
        contact = by_id[rng.choice([m for m in others if m not in (leaver_id, victim_id)])]

        newcomer = cluster.new_agent().start(None)  # bound, not yet asking
        out["join"] = _real_event(
            cluster, "join", lambda: newcomer.join([contact.addr]),
            lambda v: newcomer.node_id in v, newcomer.node_id, extra=newcomer,
        )
        out["join"].later_proposals = _real_settle(cluster)

        leaver = by_id[leaver_id]

        def leave() -> None:
            if not leaver.leave(timeout=REAL_TIMEOUT):
                raise RuntimeError("real leave: the leaver saw no view without itself")

        out["leave"] = _real_event(cluster, "leave", leave, lambda v: leaver_id not in v, leaver_id)
        leaver.stop()  # it has left; a stopped agent's queue no longer counts
        out["leave"].later_proposals = _real_settle(cluster)

        victim = by_id[victim_id]
        out["failure"] = _real_event(cluster, "failure", victim.stop, lambda v: victim_id not in v, victim_id)
        out["failure"].later_proposals = _real_settle(cluster)
    return out


# ---------------------------------------------------------------------- rows
def _stats(values: list[float]) -> tuple[float, float, float]:
    return statistics.median(values), min(values), max(values)


def make_row(mode: str, nodes: int, event: str, preset: str, seed: int, samples: list[Sample]) -> dict:
    row: dict = {"mode": mode, "nodes": nodes, "event": event, "preset": preset, "seed": seed,
                 "seeds": [seed + r for r in range(len(samples))], "repeats": len(samples),
                 "time_base": "virtual" if mode == "sim" else "wall",
                 "view_size": statistics.median(s.view_size for s in samples)}
    for key in ("decision_us", "decided_ms", "commit_ms", "messages", "messages_all", "proposals",
                "later_proposals"):
        med, lo, hi = _stats([getattr(s, key) for s in samples])
        row[key], row[key + "_min"], row[key + "_max"] = med, lo, hi
    row["paper_bar_1ms"] = (
        ("pass" if row["decision_us"] <= PAPER_BAR_US else "miss") if event in BAR_EVENTS else None
    )
    row["samples"] = [s.__dict__ for s in samples]
    return row


def run(sim_sizes: list[tuple[int, int]], real_sizes: list[tuple[int, int]], seed: int,
        progress: Callable[[str], None]) -> list[dict]:
    rows: list[dict] = []
    for n, repeats in sim_sizes:
        per_event: dict[str, list[Sample]] = {e: [] for e in SIM_EVENTS}
        for r in range(repeats):
            t = time.perf_counter()
            for event, sample in sim_repetition(n, seed + r).items():
                per_event[event].append(sample)
            progress(f"sim {n} nodes, repetition {r + 1}/{repeats}: {time.perf_counter() - t:.2f}s")
        rows += [make_row("sim", n, e, SIM_PRESET, seed, per_event[e]) for e in SIM_EVENTS]
    for n, repeats in real_sizes:
        per_event = {e: [] for e in REAL_EVENTS}
        for r in range(repeats):
            t = time.perf_counter()
            for event, sample in real_repetition(n, seed + r).items():
                per_event[event].append(sample)
            progress(f"real {n} nodes, repetition {r + 1}/{repeats}: {time.perf_counter() - t:.2f}s")
        rows += [make_row("real", n, e, REAL_PRESET, seed, per_event[e]) for e in REAL_EVENTS]
    return rows


# ---------------------------------------------------------------------- printing
def _span(row: dict, key: str, fmt: str) -> str:
    med, lo, hi = row[key], row[key + "_min"], row[key + "_max"]
    if row["repeats"] == 1:
        return format(med, fmt)
    return f"{format(med, fmt)} [{format(lo, fmt)}-{format(hi, fmt)}]"


COLUMNS = ("mode", "nodes", "event", "preset", "reps", "decision_us [min-max]", "<=1ms",
           "decided_ms", "commit_ms [min-max]", "messages", "messages_all")


def table_rows(rows: list[dict]) -> list[tuple[str, ...]]:
    return [
        (
            r["mode"], str(r["nodes"]), r["event"], r["preset"], str(r["repeats"]),
            _span(r, "decision_us", ".0f"), r["paper_bar_1ms"] or "-",
            format(r["decided_ms"], ".1f"), _span(r, "commit_ms", ".1f"),
            _span(r, "messages", ".0f"), format(r["messages_all"], ".0f"),
        )
        for r in rows
    ]


def warnings(rows: list[dict]) -> list[str]:
    """Rows whose event did not end in exactly one view change."""
    out = []
    for r in rows:
        what = f"{r['mode']} {r['nodes']} {r['event']}"
        if r["proposals_max"] > 1:
            out.append(f"warning: {what}: up to {r['proposals_max']:.0f} proposals before the commit"
                       " (retries or mixed changes)")
        if r["later_proposals_max"] > 0:
            out.append(f"warning: {what}: up to {r['later_proposals_max']:.0f} further view changes after the commit")
    return out


def print_table(rows: list[dict]) -> None:
    body = table_rows(rows)
    try:
        from rich.console import Console
        from rich.table import Table
        from rich.text import Text
    except ImportError:
        widths = [max(len(c), *(len(b[i]) for b in body)) for i, c in enumerate(COLUMNS)]
        print("  ".join(c.ljust(w) for c, w in zip(COLUMNS, widths)))
        print("  ".join("-" * w for w in widths))
        for b in body:
            print("  ".join(x.ljust(w) for x, w in zip(b, widths)))
        print()
        for line in NOTES + warnings(rows):
            print(line)
        return
    table = Table(title="membership: event handling (medians over repeats)")
    # Text, not str: rich would read "[20-30]" as a markup tag and drop it
    for c in COLUMNS:
        table.add_column(Text(c), justify="left" if c in ("mode", "event", "preset") else "right")
    for b in body:
        table.add_row(*(Text(x) for x in b))
    console = Console(width=max(160, Console().width))
    console.print(table)
    for line in NOTES + warnings(rows):
        console.print(line, highlight=False, markup=False)


def _leftover_agents(wait: float = 15.0) -> list[str]:
    """Agent threads still alive after up to ``wait`` s: a stopped agent's thread
    may still be closing its connections (``Agent.stop`` joins it for 5 s; a
    loaded CI machine once needed longer), a leaked one never ends."""
    deadline = time.monotonic() + wait
    for t in threading.enumerate():
        if t.name == "chaos-agent":
            t.join(max(0.0, deadline - time.monotonic()))
    alive = [t for t in threading.enumerate() if t.name == "chaos-agent" and t.is_alive()]
    frames = sys._current_frames()
    for t in alive:  # where it is stuck, for whoever reads the failure
        stack = "".join(traceback.format_stack(frames[t.ident])) if t.ident in frames else "(no frame)\n"
        print(f"agent thread {t.ident} still running after {wait:.0f} s, at:\n{stack}", file=sys.stderr)
    return [t.name for t in alive]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    g = p.add_mutually_exclusive_group()
    g.add_argument("--quick", action="store_true", help="1 repetition at 1,000 nodes, 3 elsewhere")
    g.add_argument("--smoke", action="store_true", help="only 8-node sim and 5-node real, 1 repetition (tests)")
    p.add_argument("--json", metavar="PATH", help="write the rows here as a JSON list")
    p.add_argument("--seed", type=int, default=0, help="base seed; repetition r uses seed + r (default 0)")
    p.add_argument("-v", "--verbose", action="store_true", help="show the agents' log lines (warnings and up)")
    args = p.parse_args(argv)

    # a graceful leave logs a WARNING at the leaver ("removed ... (left)"):
    # expected here, noise in a table
    logging.getLogger("chaos_lightning").setLevel(logging.WARNING if args.verbose else logging.ERROR)

    if args.smoke:
        sim_sizes, real_sizes = [(8, 1)], [(5, 1)]
    elif args.quick:
        sim_sizes, real_sizes = [(8, 3), (64, 3), (1000, 1)], [(5, 3)]
    else:
        sim_sizes, real_sizes = [(8, 5), (64, 5), (1000, 5)], [(5, 5), (8, 5)]

    started = time.perf_counter()
    rows = run(sim_sizes, real_sizes, args.seed, lambda line: print(line, file=sys.stderr, flush=True))
    print_table(rows)
    print(f"total {time.perf_counter() - started:.0f}s wall")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(rows, f, indent=1)
        print(f"wrote {args.json}")
    left = _leftover_agents()
    if left:
        print(f"error: {len(left)} agent thread(s) still running", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
