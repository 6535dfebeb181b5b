"""Play a timeline against real training processes and keep what happened.

One process per node runs :mod:`chaos_lightning.scenario.workload`
(``Trainer(strategy="chaos")``) with the peer rendezvous, on loopback or, with
``testbed=True``, each in its own network namespace behind a shaped bridge
(:class:`chaos_lightning.testbed.Testbed`).  The runner starts the initial
nodes at once, takes the cluster's first committed step as time zero, and
carries out each action at its time:

=========  ===================================  ==================================
action     loopback                             namespace testbed
=========  ===================================  ==================================
join       start a node, joining through the first live member (same)
leave      SIGTERM (leave at the next step boundary)                    (same)
kill       SIGKILL                                                      (same)
stop       SIGSTOP, SIGCONT after the given seconds                     (same)
cut        both agents drop each other's traffic   the pair's neighbour entries
           (an authenticated fault request:        point to a MAC nobody has:
           loopback has no cable to pull)           real silent loss, data too
restore    the agents stop dropping                the neighbour entries return
partition  ``cut`` of every pair across the two groups                  (same)
heal       ``restore`` of those pairs (a pair also cut by ``cut`` stays down)
restart    SIGKILL, reap, then a new process with the same name, bind address
           (so node id), trace file and namespace, joining through a live
           member it can reach (not across a cut)                       (same)
throttle   (refused: nothing to shape)             tbf on the node's link, both ways
end        every node stops at one common global step ahead of all of them
=========  ===================================  ==================================

Loopback needs the agents' fault injection (``LinkFault``), which an agent
serves only when enabled explicitly: the runner passes
``--allow-fault-injection`` to the workload on loopback only (the testbed cuts
real links).  A restarted node on loopback gets its cut links again once its
new agent listens (the runner retries for up to 60 s; until then it can reach
its cut peers); on the testbed the neighbour entries live in the namespace
and hold from the first packet.

``settle=True`` (the soak, :mod:`chaos_lightning.scenario.soak`): before each
action the runner waits until the cluster has absorbed the previous one:
every live node that should train (not stopped, not on the smaller side of
a partition, not at either end of a cut link) has completed two steps after
the previous action, the last one within the last 5 s.  A cluster that does not settle within
``SETTLE_TIMEOUT`` is a hang (:class:`ScenarioError`, naming the nodes); so
is a node exiting on its own (the schedule's majority arithmetic assumed it).

Every process's exit status is kept in ``exits.json``: a node killed by the
timeline (``kill``, the old process of a ``restart``) may die of SIGKILL,
every other one must exit 0 (:func:`check_invariants` reports it otherwise).

The run directory holds ``trace/<name>.jsonl`` (each node's strategy trace),
``actions.jsonl`` (what the runner did, when), ``logs/<name>.log`` (each
node's output), ``done/<name>.json`` (each finished node's digests and sample
ledger), ``ckpt/`` (the latest checkpoint, with ``set ckpt_every``),
``links.json`` (testbed link rates) and, after the report,
``report.json`` and ``timeline.png``.

Every wait is bounded, and every process (and namespace) is gone when
:meth:`Runner.run` returns or raises, Ctrl-C included.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chaos_lightning.scenario.timeline import WORKLOAD_SETTINGS, Action, Timeline, rate_bps
from chaos_lightning.testbed.procs import free_port

#: the peer rendezvous port on the testbed (every node has its own address)
TESTBED_PORT = 29500
#: seconds for the initial nodes to import, form the cluster and commit a step
START_TIMEOUT = 180.0
#: seconds for every node to reach the common last step and exit after ``end``
END_TIMEOUT = 90.0
#: seconds an action on a joined node waits for it to train (its start-up on a loaded machine)
JOIN_TIMEOUT = 120.0
#: seconds a joined node trains before an action on it
SETTLE_S = 2.0
#: how far ahead of the fastest node the common last step is, in seconds of steps
END_MARGIN_S = 2.0
#: settle mode: seconds the cluster has to absorb an action before the next is a hang
SETTLE_TIMEOUT = 150.0
#: settle mode: a node that has not completed a step for this long is not training now
SETTLE_RECENT_S = 5.0
#: seconds a restarted node on loopback has for its agent to listen (its cut links are re-applied then)
REFAULT_TIMEOUT = 60.0


class ScenarioError(RuntimeError):
    """The scenario could not be carried out (a node failed to start, a wait ran out)."""


@dataclass
class NodeProc:
    name: str
    index: int  # testbed node number; order of first start
    addr: str  # agent address (CHAOS_BIND)
    proc: subprocess.Popen
    log: IO[bytes]
    trace: Path
    started: float  # wall time of the Popen
    member_id: str | None = None
    fate: str = "running"  # running, left, killed, stopped, exited, restarted (an old process of a restart)
    incarnation: int = 0  # 0 for the first process of the name, +1 per restart
    records: list[dict[str, Any]] = field(default_factory=list)
    _offset: int = 0

    def poll_trace(self) -> list[dict[str, Any]]:
        """Records appended since the last call (a torn last line waits for its end)."""
        try:
            with open(self.trace, "rb") as f:
                f.seek(self._offset)
                data = f.read()
        except FileNotFoundError:
            return []
        end = data.rfind(b"\n") + 1
        self._offset += end
        new = []
        for line in data[:end].splitlines():
            try:
                rec = json.loads(line)
            except ValueError:
                continue
            if isinstance(rec, dict):
                new.append(rec)
                if rec.get("ev") == "start" and self.member_id is None:
                    self.member_id = str(rec.get("node"))
        self.records.extend(new)
        return new

    @property
    def alive(self) -> bool:
        return self.proc.poll() is None


class Runner:
    """Carries out ``timeline`` in ``run_dir`` (created; must be empty or absent)."""

    def __init__(
        self, timeline: Timeline, run_dir: Path, *, testbed: bool = False, out: IO[str] | None = None,
        env: dict[str, str] | None = None, node_env: dict[str, dict[str, str]] | None = None,
        settle: bool = False,
    ) -> None:
        self.timeline = timeline
        self.run_dir = Path(run_dir)
        self.use_testbed = testbed
        self.extra_env = dict(env or {})  # for every node (benchmarks: CHAOS_BACKEND, CHAOS_MAX_SOURCES, ...)
        self.node_env = {name: dict(e) for name, e in (node_env or {}).items()}  # for one node, by name, on top
        self.out = out or sys.stdout
        self.nodes: dict[str, NodeProc] = {}
        self.secret = secrets.token_hex(16)
        # the runner's own control calls (link faults) speak the nodes' mode:
        # CHAOS_ENCRYPT from this environment or the nodes' extra one
        from chaos_lightning.config import secret_from_env

        self.control_secret = secret_from_env({"CHAOS_SECRET": self.secret,
                                               "CHAOS_ENCRYPT": {**os.environ, **self.extra_env}.get("CHAOS_ENCRYPT", "")})
        self.t0: float | None = None  # wall time of the first committed step
        self._started_mono = time.monotonic()
        self._testbed: Any = None
        self._conts: list[tuple[float, str]] = []  # (wall time, name) of pending SIGCONTs
        self._actions: IO[str] | None = None
        self._max_step = 0
        self._step_times: list[float] = []  # wall times of recent new global steps
        self._last_status = 0.0
        self._ending = False  # after 'end', nodes exiting is the plan
        self._shift = 0.0  # seconds the timeline was pushed back, waiting for joiners to train
        self.settle = settle
        self._ports: set[int] = set()  # every loopback port handed to a node of this run
        self.old_procs: list[NodeProc] = []  # the processes a restart replaced
        self._cut: dict[frozenset[str], set[str]] = {}  # pair -> why it is down ("cut", "partition")
        self._partition: Action | None = None
        self._last_action_t: float | None = None  # wall time the last action was carried out
        self._ready_after: dict[str, float] = {}  # name -> wall time it must train after (join, restart, cont, restore)
        self.carried: list[str] = []  # the actions carried out, in order ("kind" each)
        if timeline.uses_links() and not testbed:
            throttles = [a for a in timeline.actions if a.action == "throttle"]
            if throttles or "link" in timeline.settings:
                raise ScenarioError("'throttle' and 'set link' shape real links: run with the namespace testbed (--testbed)")

    # ------------------------------------------------------------------ output
    def say(self, text: str) -> None:
        since = time.time() - self.t0 if self.t0 is not None else -(time.monotonic() - self._started_mono)
        self.out.write(f"[{since:7.2f}s] {text}\n")
        self.out.flush()

    def _record(self, action: str, t: float | None = None, **fields: Any) -> None:
        assert self._actions is not None
        members = fields.pop("members", None) or {n.name: n.member_id for n in self.nodes.values()}
        rec = {"t": time.time() if t is None else t, "action": action, "members": members, **fields}
        self._actions.write(json.dumps(rec) + "\n")
        self._actions.flush()

    # ------------------------------------------------------------------ processes
    def _workload_argv(self, name: str) -> list[str]:
        argv = [sys.executable, "-m", "chaos_lightning.scenario.workload", "--run-dir", str(self.run_dir), "--name", name]
        for key in WORKLOAD_SETTINGS:
            if key in self.timeline.settings:
                argv += [f"--{key.replace('_', '-')}", str(self.timeline.settings[key])]
        if self._testbed is None:
            # on loopback a link cut is a LinkFault request to the agent, which
            # serves it only when told to (namespaces cut real veth links)
            argv.append("--allow-fault-injection")
        return argv

    def _start(self, name: str, peers: list[str], min_nodes: int, replaces: NodeProc | None = None) -> NodeProc:
        """Start ``name``'s process; ``replaces``: the old process of a restart
        (same index, address and trace file; reaped already)."""
        if replaces is not None:
            index, addr = replaces.index, replaces.addr
        else:
            index = len(self.nodes)
            if self._testbed is not None:
                addr = f"{self._testbed.addr(index)}:{TESTBED_PORT}"
            else:
                port = free_port(avoid=self._ports)  # a node started a moment ago may not have bound its own yet
                self._ports.add(port)
                addr = f"127.0.0.1:{port}"
        trace = self.run_dir / "trace" / f"{name}.jsonl"
        env = {
            **os.environ, "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1", "CHAOS_BIND": addr, "CHAOS_PEERS": ",".join(peers),
            "CHAOS_MIN_NODES": str(min_nodes), "CHAOS_SECRET": self.secret, "CHAOS_TRACE": str(trace),
            "CHAOS_RECORD_SAMPLES": "1",  # the report's exactly-once check reads the ledger
            "CHAOS_PRESET": str(self.timeline.settings.get("preset", "local")),
            **self.extra_env, **self.node_env.get(name, {}),
        }
        log = open(self.run_dir / "logs" / f"{name}.log", "ab" if replaces else "wb")  # noqa: SIM115  (closed in close())
        if replaces is not None:
            log.write(f"\n===== restart {replaces.incarnation + 1} of {name} =====\n".encode())
            log.flush()
        argv = self._workload_argv(name)
        kwargs: dict[str, Any] = {"env": env, "stdout": log, "stderr": subprocess.STDOUT, "stdin": subprocess.DEVNULL}
        started = time.time()
        if self._testbed is not None:
            proc = self._testbed.popen(index, argv, **kwargs)
        else:
            proc = subprocess.Popen(argv, start_new_session=True, **kwargs)
        node = NodeProc(name, index, addr, proc, log, trace, started)
        if replaces is not None:
            node.incarnation = replaces.incarnation + 1
            node._offset = replaces._offset  # the trace file goes on: read only the new process's records
            node.records = []
        self.nodes[name] = node
        return node

    def _all_procs(self) -> list[NodeProc]:
        return self.old_procs + list(self.nodes.values())

    def _live(self) -> list[NodeProc]:
        return [n for n in self.nodes.values() if n.alive and n.fate in ("running", "stopped")]

    def _signal(self, node: NodeProc, sig: int) -> None:
        try:
            os.kill(node.proc.pid, sig)
        except ProcessLookupError:
            pass

    # ------------------------------------------------------------------ watching
    def _poll(self) -> None:
        """Read new trace records; note global progress and unexpected exits."""
        now = time.time()
        for node in self.nodes.values():
            for rec in node.poll_trace():
                if rec.get("ev") == "step":
                    step = int(rec.get("step", 0))
                    if step > self._max_step:
                        self._max_step = step
                        self._step_times.append(float(rec["t"]))
                        del self._step_times[:-50]
                    if self.t0 is None:
                        self.t0 = float(rec["t"])
                        self._last_status = now
            if node.fate in ("running", "stopped") and not node.alive:
                rc = node.proc.returncode
                node.fate = "exited"
                if self._ending:
                    continue  # after 'end', exiting is the plan
                self._record("exited", nodes=[node.name], returncode=rc)
                if self.t0 is not None:
                    self.say(f"{node.name} exited on its own with code {rc} (see {self.run_dir / 'logs' / (node.name + '.log')})")
        for when, name in list(self._conts):
            if now >= when:
                self._conts.remove((when, name))
                node = self.nodes[name]
                if node.fate == "stopped":
                    self._signal(node, signal.SIGCONT)
                    node.fate = "running"
                    self._ready_after[name] = now
                    self._record("cont", nodes=[name])
                    self.say(f"SIGCONT {name}")
        if self.t0 is not None and now - self._last_status >= 5.0:
            self._last_status = now
            world = self._world()
            self.say(f"step {self._max_step}, world {world}, {self._rate():.0f} steps/s")

    def _world(self) -> int | None:
        latest = None
        for node in self.nodes.values():
            for rec in reversed(node.records):
                if rec.get("ev") == "step":
                    if latest is None or rec["t"] > latest["t"]:
                        latest = rec
                    break
        return None if latest is None else int(latest.get("world", 0))

    def _rate(self) -> float:
        """Recent committed steps per second (0 before two steps)."""
        ts = self._step_times[-20:]
        return (len(ts) - 1) / (ts[-1] - ts[0]) if len(ts) > 1 and ts[-1] > ts[0] else 0.0

    def _sleep_until(self, wall: float) -> None:
        while True:
            self._poll()
            left = wall - time.time()
            if left <= 0:
                return
            if not self._live():
                raise ScenarioError("every node has exited; see the logs in " + str(self.run_dir / "logs"))
            time.sleep(min(left, 0.05))

    # ------------------------------------------------------------------ actions
    def _await_training(self, a: Action) -> None:
        """An action on a node that joined waits until it trains (its first
        committed step), however long its start-up took on this machine; the
        rest of the timeline moves back by the wait (bounded)."""
        waiting = [self.nodes[n] for n in a.nodes if n in self._ready_after]
        if a.action in ("join", "throttle", "heal") or not waiting:
            return
        t0 = time.time()
        deadline = time.monotonic() + JOIN_TIMEOUT

        def trained(n: NodeProc) -> bool:
            return any(r.get("ev") == "step" and r["t"] > self._ready_after[n.name] for r in n.records)

        while not all(trained(n) or not n.alive or n.fate != "running" for n in waiting):
            if time.monotonic() > deadline:
                raise ScenarioError(f"{', '.join(n.name for n in waiting)} not training {JOIN_TIMEOUT:.0f} s after "
                                    f"'{a}' was due (see {self.run_dir / 'logs'})")
            self._poll()
            time.sleep(0.05)
        # and has trained a little: the event after a join is measured against
        # normal steps, not the join's own disruption
        firsts = [next((r["t"] for r in n.records if r.get("ev") == "step" and r["t"] > self._ready_after[n.name]), 0.0)
                  for n in waiting]
        while time.time() < max(firsts) + SETTLE_S:
            self._poll()
            time.sleep(0.05)
        for n in waiting:
            self._ready_after.pop(n.name, None)
        waited = time.time() - t0
        if waited > 0.2:
            self._shift += waited
            self.say(f"waited {waited:.1f} s for {', '.join(n.name for n in waiting)} to train before '{a}'")

    def _impaired(self) -> set[str]:
        """Live nodes not expected to train now: stopped, at an end of a cut
        link (one end is sidelined, which one is the members' choice), or on
        the smaller side of the partition in effect (it waits: no majority)."""
        out = {n.name for n in self.nodes.values() if n.fate == "stopped"}
        for pair, why in self._cut.items():
            if "cut" in why:  # a partition's pairs: its smaller side, below
                out |= pair
        if self._partition is not None:
            a, b = self._partition.groups
            out |= set(min(a, b, key=len)) if len(a) != len(b) else set(a) | set(b)
        return out

    def _await_settled(self, a: Action) -> None:
        """Settle mode: every live node that should train has completed two
        steps since the last action (and since it came back: a cont, a
        restore, a heal), the latest within :data:`SETTLE_RECENT_S` (it
        trains now), and that step's world counts at least every such node;
        bounded by :data:`SETTLE_TIMEOUT`."""
        if self._last_action_t is None:
            return
        t0 = time.time()
        deadline = time.monotonic() + SETTLE_TIMEOUT
        while True:
            self._poll()
            crashed = [n for n in self.nodes.values() if n.fate == "exited"]
            if crashed:  # the schedule's majority arithmetic no longer holds: stop here, say why
                raise ScenarioError("; ".join(f"{n.name} exited on its own with code {n.proc.returncode}"
                                              for n in crashed) + f" before '{a}' (line {a.line}): see "
                                    f"{self.run_dir / 'logs'}")
            impaired = self._impaired()
            expected = [n for n in self.nodes.values() if n.alive and n.fate == "running" and n.name not in impaired]
            since = {n.name: max(self._last_action_t, self._ready_after.get(n.name, 0.0)) for n in expected}
            lagging = []
            for n in expected:
                steps = [r for r in n.records if r.get("ev") == "step" and r["t"] > since[n.name]]
                if (len(steps) < 2 or int(steps[-1].get("world", 0)) < len(expected)
                        or steps[-1]["t"] < time.time() - SETTLE_RECENT_S):
                    lagging.append(n.name)
            if not expected:
                raise ScenarioError(f"no node is left training before '{a}' (line {a.line}); "
                                    f"see the logs in {self.run_dir / 'logs'}")
            if not lagging:
                break
            if time.monotonic() > deadline:
                raise ScenarioError(f"the cluster did not settle within {SETTLE_TIMEOUT:.0f} s before '{a}' "
                                    f"(line {a.line}): {', '.join(sorted(lagging))} not training with "
                                    f"{len(expected)} trainers (see {self.run_dir / 'logs'})")
            if not self._live():
                raise ScenarioError("every node has exited; see the logs in " + str(self.run_dir / "logs"))
            time.sleep(0.05)
        waited = time.time() - t0
        if waited > 0.2:
            self._shift += waited

    def _via(self, exclude: str | None = None) -> list[str]:
        """A live, running member to join through, that ``exclude`` (a
        restarting node) can reach and that is not on the smaller side of a
        partition; the first one in start order."""
        minority: set[str] = set()
        if self._partition is not None:
            a, b = self._partition.groups
            minority = set(min(a, b, key=len))
        impaired = self._impaired()
        candidates = [n for n in self.nodes.values() if n.alive and n.fate == "running" and n.name != exclude
                      and (exclude is None or frozenset((n.name, exclude)) not in self._cut)]
        for pool in ([n for n in candidates if n.name not in impaired], [n for n in candidates if n.name not in minority],
                     candidates):
            if pool:
                return [pool[0].addr]
        raise ScenarioError("no live member to join through")

    def _set_pair(self, x: str, y: str, down: bool, why: str) -> None:
        """Cut or restore the link x-y for ``why``; the link is down while any reason holds."""
        pair = frozenset((x, y))
        reasons = self._cut.setdefault(pair, set())
        was_down = bool(reasons)
        (reasons.add if down else reasons.discard)(why)
        if not reasons:
            del self._cut[pair]
        if bool(reasons) != was_down:
            self._apply_pair(self.nodes[x], self.nodes[y], bool(reasons))

    def _apply_pair(self, x: NodeProc, y: NodeProc, down: bool) -> None:
        if self._testbed is not None:
            (self._testbed.cut_pair if down else self._testbed.restore_pair)(x.index, y.index)
            return
        from chaos_lightning.agent import link_fault

        for p, q in ((x, y), (y, x)):
            if p.alive:
                try:
                    link_fault(p.addr, q.addr, down, secret=self.control_secret, timeout=5.0)
                except (OSError, TimeoutError) as exc:
                    self.say(f"warning: {p.name} did not take the link fault ({exc})")

    def _refault(self, node: NodeProc) -> None:
        """Loopback: a restarted node's agent knows nothing of its cut links;
        tell it once it listens (bounded), and tell its peers again."""
        from chaos_lightning.agent import link_fault

        peers = [self.nodes[next(iter(p - {node.name}))] for p in self._cut if node.name in p]
        if self._testbed is not None or not peers:
            return
        deadline = time.monotonic() + REFAULT_TIMEOUT
        while True:
            try:
                for q in peers:
                    link_fault(node.addr, q.addr, True, secret=self.control_secret, timeout=2.0)
                break
            except (OSError, TimeoutError):
                if time.monotonic() > deadline or not node.alive:
                    self.say(f"warning: the restarted {node.name} did not take its link faults")
                    return
                self._poll()
                time.sleep(0.1)
        self.say(f"re-applied {node.name}'s cut links to {', '.join(q.name for q in peers)}")

    def _restart(self, name: str) -> NodeProc:
        old = self.nodes[name]
        self._signal(old, signal.SIGCONT)
        self._signal(old, signal.SIGKILL)
        try:
            old.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            raise ScenarioError(f"{name} (pid {old.proc.pid}) did not die of SIGKILL within 10 s") from None
        self._conts = [(w, n) for w, n in self._conts if n != name]
        old.poll_trace()
        try:  # a record torn by the kill must not swallow the new process's first one
            with open(old.trace, "rb+") as f:
                f.seek(0, os.SEEK_END)
                if f.tell():
                    f.seek(-1, os.SEEK_END)
                    if f.read(1) != b"\n":
                        f.write(b"\n")
                old._offset = f.tell()
        except FileNotFoundError:
            pass
        old.fate = "restarted"
        old.log.close()
        self.old_procs.append(old)
        peers = self._via(exclude=name)
        node = self._start(name, peers, 1, replaces=old)
        self.say(f"restart {name}: kill -9 pid {old.proc.pid}, new pid {node.proc.pid} at {node.addr} (through {peers[0]})")
        return node

    def before(self, a: Action) -> float:
        """Called right before each action is carried out (after its time
        and the runner's own waits).  A subclass may hold the action back
        (``benchmarks/kills.py`` aims a kill at a phase of its victim); it
        returns the seconds it waited, which move the rest of the timeline
        back.  Nothing by default."""
        return 0.0

    def _carry_out(self, a: Action) -> None:
        names = a.nodes
        now = time.time()
        if a.action == "join":
            peers = self._via()
            node = self._start(a.args[0], peers, 1)
            self._ready_after[node.name] = now
            self.say(f"join {node.name} (through {peers[0]})")
        elif a.action == "restart":
            node = self._restart(a.args[0])
            self._ready_after[node.name] = now
            # recorded now, with the old process's member id, before the new one's records
        elif a.action == "partition":
            self._partition = a
            for x, y in a.cross_pairs():
                self._set_pair(x, y, True, "partition")
            sides = " | ".join(",".join(g) for g in a.groups)
            self.say(f"partition {sides}: {len(a.cross_pairs())} links cut")
        elif a.action == "heal":
            assert self._partition is not None
            part, self._partition = self._partition, None
            for x, y in part.cross_pairs():
                self._set_pair(x, y, False, "partition")
            for name in part.nodes:
                self._ready_after[name] = now
            names = part.nodes
            self.say(f"heal {' | '.join(','.join(g) for g in part.groups)}")
        elif a.action == "leave":
            self._signal(self.nodes[a.args[0]], signal.SIGTERM)
            self.nodes[a.args[0]].fate = "left"
            self.say(f"leave {a.args[0]} (SIGTERM: at the next step boundary)")
        elif a.action == "kill":
            self._signal(self.nodes[a.args[0]], signal.SIGKILL)
            self.nodes[a.args[0]].fate = "killed"
            self.say(f"kill -9 {a.args[0]}")
        elif a.action == "stop":
            node = self.nodes[a.args[0]]
            self._signal(node, signal.SIGSTOP)
            node.fate = "stopped"
            self._conts.append((time.time() + float(a.args[1]), node.name))
            self.say(f"SIGSTOP {node.name} for {a.args[1]} s")
        elif a.action in ("cut", "restore"):
            x, y = (self.nodes[n] for n in a.args)
            down = a.action == "cut"
            self._set_pair(x.name, y.name, down, "cut")
            if not down:
                self._ready_after[x.name] = self._ready_after[y.name] = now
            self.say(f"{'cut' if down else 'restore'} the link {x.name}-{y.name}")
        elif a.action == "throttle":
            node = self.nodes[a.args[0]]
            self._testbed.shape(node.index, rate_bps(a.args[1]) / 1e6)
            self.say(f"throttle {node.name} to {a.args[1]}")
        fields: dict[str, Any] = {"nodes": list(names), "at": a.at, "line": a.line}
        if a.action == "stop":
            fields["seconds"] = float(a.args[1])
        if a.action == "throttle":
            fields["rate_bps"] = rate_bps(a.args[1])
        if a.action == "partition":
            fields["groups"] = [list(g) for g in a.groups]
        if a.action == "heal":
            fields["groups"] = [list(g) for g in part.groups]
        if a.action == "restart":
            old = self.old_procs[-1]
            fields.update(t=now, old_pid=old.proc.pid, pid=self.nodes[a.args[0]].proc.pid)
            fields["members"] = {**{n.name: n.member_id for n in self.nodes.values()}, a.args[0]: old.member_id}
        self._record(a.action, **fields)
        self._last_action_t = time.time()
        self.carried.append(a.action)
        if a.action == "restart":
            self._refault(self.nodes[a.args[0]])

    def _write_links(self) -> None:
        """Every node's link rate at the start, bits/s both ways (``set link``),
        for the transfer bound; throttles later are actions (``actions.jsonl``)."""
        default = self.timeline.settings.get("link")
        if default is None or self._testbed is None:
            return
        rate = rate_bps(str(default))
        rates = {name: {"down_bps": rate, "up_bps": rate} for name in self.timeline.names}
        (self.run_dir / "links.json").write_text(json.dumps({"nodes": rates}, indent=1))

    def _end(self) -> None:
        """Every live node stops at one global step ahead of all of them, then exits."""
        self._poll()
        margin = max(5, int(self._rate() * END_MARGIN_S) + 5)
        stop_at = self._max_step + margin
        self._ending = True
        (self.run_dir / "stop").write_text(f"{stop_at}\n")
        self._record("end", nodes=[], at=self.timeline.duration, line=self.timeline.actions[-1].line, stop_step=stop_at)
        self.say(f"end: every node stops at global step {stop_at}")
        for when, name in list(self._conts):  # nobody stays stopped past the end
            self._conts.remove((when, name))
            if self.nodes[name].fate == "stopped":
                self._signal(self.nodes[name], signal.SIGCONT)
                self.nodes[name].fate = "running"
        deadline = time.monotonic() + END_TIMEOUT
        while any(n.alive for n in self.nodes.values()) and time.monotonic() < deadline:
            self._poll()
            time.sleep(0.1)
        stuck = [n.name for n in self.nodes.values() if n.alive]
        if stuck:
            raise ScenarioError(f"{', '.join(stuck)} still running {END_TIMEOUT:.0f} s after the end")

    # ------------------------------------------------------------------ the run
    def run(self) -> Path:
        """Carry out the timeline; returns the run directory (raises :class:`ScenarioError`)."""
        if self.run_dir.exists() and any(self.run_dir.iterdir()):
            raise ScenarioError(f"run directory {self.run_dir} is not empty")
        for sub in ("trace", "logs"):
            (self.run_dir / sub).mkdir(parents=True, exist_ok=True)
        self._actions = open(self.run_dir / "actions.jsonl", "w")  # noqa: SIM115  (closed in close())
        try:
            if self.use_testbed:
                from chaos_lightning.testbed import Testbed, available

                ok, why = available()
                if not ok:
                    raise ScenarioError(f"the namespace testbed is not available here: {why}")
                self._testbed = Testbed(len(self.timeline.names)).start()
                if "link" in self.timeline.settings:
                    for i in range(len(self.timeline.names)):
                        self._testbed.shape(i, rate_bps(str(self.timeline.settings["link"])) / 1e6)
            initial = self.timeline.initial
            where = "network namespaces" if self._testbed is not None else "loopback"
            backend = self.extra_env.get("CHAOS_BACKEND", "peer")
            how = "peer rendezvous, no etcd" if backend == "peer" else f"{backend} rendezvous"
            self.say(f"starting {', '.join(initial)} on {where} ({how})")
            first = self._start(initial[0], [], len(initial))
            for name in initial[1:]:
                self._start(name, [first.addr], len(initial))
            self._record("start", nodes=list(initial), at=0.0, line=self.timeline.actions[0].line)
            self._write_links()
            deadline = time.monotonic() + START_TIMEOUT
            while self.t0 is None:
                self._poll()
                if any(n.fate == "exited" for n in self.nodes.values()):
                    bad = next(n for n in self.nodes.values() if n.fate == "exited")
                    raise ScenarioError(f"{bad.name} exited before training started: see {self.run_dir / 'logs' / bad.name}.log")
                if time.monotonic() > deadline:
                    raise ScenarioError(f"training did not start within {START_TIMEOUT:.0f} s")
                time.sleep(0.05)
            self._record("training_started", t=self.t0)
            self.say(f"training started with {len(initial)} nodes")
            for a in self.timeline.actions[1:-1]:
                self._sleep_until(self.t0 + self._shift + a.at)
                if self.settle:
                    self._await_settled(a)
                self._await_training(a)
                self._shift += self.before(a)
                self._carry_out(a)
            self._sleep_until(self.t0 + self._shift + self.timeline.duration)
            if self.settle:
                self._await_settled(self.timeline.actions[-1])
            self._end()
            return self.run_dir
        finally:
            self.close()

    def close(self) -> None:
        killed_at_close = []
        for node in self._all_procs():
            if node.alive:
                killed_at_close.append(node.name)
                self._signal(node, signal.SIGCONT)
                self._signal(node, signal.SIGKILL)
            try:
                node.proc.wait(timeout=10)
            except subprocess.TimeoutExpired:
                pass
            node.log.close()
        self._write_exits(killed_at_close)
        if self._testbed is not None:
            self._testbed.close()
            self._testbed = None
        if self._actions is not None:
            self._actions.close()
            self._actions = None


    def _write_exits(self, killed_at_close: list[str]) -> None:
        """``exits.json``: every process's exit status and whether the
        timeline explains a non-zero one (kill -9 by ``kill``/``restart``)."""
        out = []
        for node in self._all_procs():
            rc = node.proc.returncode
            killed = node.fate in ("killed", "restarted") and rc in (-signal.SIGKILL, 128 + signal.SIGKILL)
            out.append({"name": node.name, "incarnation": node.incarnation, "pid": node.proc.pid, "fate": node.fate,
                        "returncode": rc, "expected": rc == 0 or killed,
                        "killed_by_runner": node.name in killed_at_close and node.fate not in ("killed", "restarted")})
        try:
            (self.run_dir / "exits.json").write_text(json.dumps(out, indent=1))
        except OSError:
            pass


# ---------------------------------------------------------------------- checks
def _ledgers(run_dir: Path) -> dict[str, dict[int, tuple[str, int]]]:
    """``RUN/ledger/<name>-<pid>/<epoch>.txt`` of every process: process -> epoch -> (digits, strangers)."""
    out: dict[str, dict[int, tuple[str, int]]] = {}
    root = run_dir / "ledger"
    for proc_dir in sorted(root.glob("*")) if root.is_dir() else []:
        epochs: dict[int, tuple[str, int]] = {}
        for f in proc_dir.glob("*.txt"):
            try:
                digits, strangers = f.read_text().split("\n")[:2]
                epochs[int(f.stem)] = (digits, int(strangers or 0))
            except (ValueError, OSError):
                continue
        out[proc_dir.name] = epochs
    return out


def check_invariants(run_dir: Path) -> dict[str, Any]:
    """What the nodes say: bit-identical replicas, exactly-once epochs, clean exits.

    Nodes training in one group record the same committed steps, so: no
    process may have trained a sample twice in an epoch; every epoch before
    the last must be covered: with the ledgers every process left on disk
    (``RUN/ledger``, killed ones included), every sample of the epoch was
    trained by some process's committed step (without them, the older
    check: an exact cover at some finished node that trained through it);
    every node that finished (did not leave) ends with the same parameter
    and optimizer digests; and every process exited 0 unless the timeline
    killed it (``exits.json``).

    What this cannot see: one sample trained in two disjoint groups with no
    process in both (a split brain) shows as covered, not twice; the digests
    and the membership's one-view-per-epoch tests are the guard there.
    """
    done = {}
    for path in sorted((run_dir / "done").glob("*.json")):
        try:
            done[path.stem] = json.loads(path.read_text())
        except ValueError:
            continue
    finished = {n: d for n, d in done.items() if not d.get("left")}
    digests = {(d["params"], d["optim"]) for d in finished.values()}
    ledgers = _ledgers(run_dir)
    epochs = sorted({int(e) for d in done.values() for e in d.get("epochs", {})} | {e for L in ledgers.values() for e in L})
    duplicated = {n: e for n, d in done.items() for e, c in d.get("epochs", {}).items() if c["duplicated"] or c["strangers"]}
    for proc, L in ledgers.items():
        bad = sorted(e for e, (digits, strangers) in L.items() if strangers or any(c > "1" for c in digits))
        if bad:
            duplicated[proc] = bad
    uncovered = []
    for e in epochs[:-1]:
        if ledgers:
            rows = [L[e][0] for L in ledgers.values() if e in L]
            n = max((len(r) for r in rows), default=0)
            if not rows or any(all(r[i] == "0" for r in rows if i < len(r)) for i in range(n)):
                uncovered.append(e)
        elif not any(d["epochs"].get(str(e), {}).get("missing", 1) == 0 for d in finished.values()):
            uncovered.append(e)
    exits = []
    try:
        exits = json.loads((run_dir / "exits.json").read_text())
    except (OSError, ValueError):
        pass
    bad_exits = [f"{x['name']} (pid {x['pid']}, {x['fate']}) exited with code {x['returncode']}"
                 for x in exits if not x.get("expected") and not x.get("killed_by_runner")]
    return {
        "finished": sorted(finished),
        "left": sorted(set(done) - set(finished)),
        "identical_replicas": len(digests) == 1,
        "final_step": sorted({d["global_step"] for d in finished.values()}),
        "epochs": len(epochs),
        "ledgers": len(ledgers),
        "no_sample_twice": not duplicated,
        "complete_epochs_exact": not uncovered,
        "clean_exits": not bad_exits,
        "problems": (
            ([f"replicas differ: {sorted(digests)}"] if len(digests) > 1 else [])
            + ([f"samples trained twice: {duplicated}"] if duplicated else [])
            + ([f"epochs not covered exactly once: {uncovered}"] if uncovered else [])
            + ([] if finished else ["no node finished"])
            + [f"unexpected exit: {b}" for b in bad_exits]
        ),
    }
