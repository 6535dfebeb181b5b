"""A deterministic simulator for the membership state machine.

The same :class:`~chaos_lightning.membership.machine.Membership` objects that
the asyncio agent drives run here over a fake network, in virtual time, all in
one thread: the shape of etcd raft's test harness.  A run is a pure function
of its seed and script, so a failing case replays exactly (``trace`` is a list
of ``(time, node, event)`` that tests compare between runs).

The network delivers each message after ``latency`` plus uniform ``jitter``
seconds, drops it with probability ``loss``, and never delivers across a
partition or a cut link; like a TCP connect, a send that cannot get through
tells the sender (``hint_unreachable``) ``probe_timeout`` later.  With
``refuse_crashed`` a send to a crashed node that the network can reach is
*refused*, as a host answers a connect to a port nobody listens on: the
sender hears ``peer_refused`` one round trip later (proof of death, only
ever for a node that is truly dead; off by default, so the traces of the
scenarios written before it stay as they were).  Crashed nodes
neither send nor receive; :meth:`Simulator.restart` brings one back as a new
process under the same id (an empty machine whose incarnation is a boot
timestamp, as the agent does).  ``filters`` drop chosen messages (a Commit
lost to one peer).  Nodes are ticked exactly at their machine's
``next_deadline()``, so idle nodes cost nothing and 1,000 nodes simulate in
seconds; after every tick the simulator checks that the deadline moved past
``now`` (:class:`Spin` otherwise: a machine that asks to be ticked again at
a time it has already handled livelocks a real agent).

:func:`run_schedule` draws a seeded random fault schedule (crashes, restarts
under the same id, partitions, lost messages, cut links, joins, leaves) and
checks the protocol's invariants; ``python -m chaos_lightning.membership.sim
--schedules 1000`` runs a sweep of them and prints what it found.

Typical use (tests read as scenarios)::

    sim = Simulator(seed=1, config=Config.preset("lan"))
    sim.start_cluster(1000)
    sim.crash("n0042")
    sim.run_until(lambda: sim.agreed(without="n0042"), timeout=60)
"""

from __future__ import annotations

import heapq
import random
import time
from dataclasses import dataclass, field
from typing import Callable, Iterable

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.machine import Membership, Output, Phase
from chaos_lightning.membership.messages import Ack, Ping
from chaos_lightning.membership.view import Member, View, link

_TICK, _DELIVER, _CALL = 0, 1, 2

#: ticks of one node at one virtual instant beyond which the run stops with
#: :class:`Spin` instead of looping forever (a machine whose ``next_deadline``
#: stays in the past would otherwise hang the simulator, and the test with it)
SPIN_LIMIT = 10_000


class Spin(RuntimeError):
    """A node's ``next_deadline()`` did not advance: it asks to be ticked
    again and again at the same virtual time (a livelock in the machine)."""


class SplitBrain(AssertionError):
    """Two different views were committed for one epoch."""


@dataclass
class Decision:
    """A view proposed by a coordinator, with the host CPU time of the call that decided it."""

    time: float
    node: str
    cpu_us: float
    view: View
    reason: str


@dataclass
class Stats:
    sent: int = 0
    dropped: int = 0
    #: messages other than plain Ping/Ack probes (the steady-state background),
    #: i.e. what an event costs: indirect probes, facts, agreement, sync, joins
    protocol: int = 0
    by_type: dict[str, int] = field(default_factory=dict)


class Simulator:
    def __init__(
        self,
        seed: int = 0,
        config: Config | None = None,
        *,
        latency: float = 0.0005,
        jitter: float = 0.0005,
        loss: float = 0.0,
    ):
        self.seed = seed
        self.config = config or Config.preset("lan")
        self.rng = random.Random(seed)
        self.latency = latency
        self.jitter = jitter
        self.loss = loss
        self.now = 0.0
        self.nodes: dict[str, Membership] = {}
        self.crashed: dict[str, bool] = {}
        self.trace: list[tuple[float, str, object]] = []
        self._by_kind: dict[type, list[tuple[float, str, object]]] = {}
        self.decisions: list[Decision] = []
        self.stats = Stats()
        self._heap: list[tuple[float, int, int, object]] = []
        self._seq = 0
        self._tick_at: dict[str, float] = {}
        self._group: dict[str, int] = {}  # partition group per node; absent = group 0
        self._cut: dict[tuple[str, str], bool] = {}
        self._hinted: dict[tuple[str, str], float] = {}
        self.listeners: list[Callable[[float, str, object], None]] = []
        #: ``f(src, dst, msg) -> True`` drops that message (targeted loss)
        self.filters: list[Callable[[str, str, object], bool]] = []
        #: raise :class:`Spin` when a tick leaves ``next_deadline() <= now``
        self.check_deadlines = True
        #: epoch -> the first committed view seen for it, by any node at any
        #: time; a different one is a :class:`SplitBrain` (checked per event)
        self.committed: dict[int, View] = {}
        self.split: list[tuple[float, str, View, View]] = []
        self.ticks = 0
        #: a send to a crashed, reachable node is refused (``peer_refused``)
        self.refuse_crashed = False

    # ---------------------------------------------------------------- setup
    def add_node(self, node_id: str) -> Membership:
        rng = random.Random(f"{self.seed}/{node_id}")
        m = Membership(Member(node_id, node_id), self.config, rng=rng)
        self.nodes[node_id] = m
        return m

    def start_cluster(self, n: int, *, prefix: str = "n", settle: float | None = None) -> list[str]:
        """Found a cluster of ``n`` nodes: one bootstraps, the rest join through
        it in one batch (they all ask within one join_retry), then run until
        every node holds the same view with all ``n`` members."""
        ids = [f"{prefix}{i:04d}" for i in range(n)]
        for nid in ids:
            self.add_node(nid)
        self.call(ids[0], lambda m: m.bootstrap(self.now))
        for nid in ids[1:]:
            self.join(nid, [ids[0]])
        ok = self.run_until(lambda: self.agreed(size=n), timeout=settle or 120.0)
        if not ok:
            raise RuntimeError(f"cluster of {n} did not form: {self.summary()}")
        return ids

    # ---------------------------------------------------------------- actions
    def join(self, node_id: str, contacts: Iterable[str]) -> None:
        if node_id not in self.nodes:
            self.add_node(node_id)
        self.call(node_id, lambda m: m.join(list(contacts), self.now))

    def leave(self, node_id: str) -> None:
        self.call(node_id, lambda m: m.leave(self.now))

    def synced(self, *node_ids: str) -> None:
        """These nodes completed their state sync (``Agent.mark_synced``)."""
        for nid in node_ids:
            self.call(nid, lambda m: m.mark_synced(self.now))

    def crash(self, node_id: str) -> None:
        """Stop a node dead: it sends and receives nothing from now on."""
        self.crashed[node_id] = True

    def restart(self, node_id: str, contacts: Iterable[str]) -> Membership:
        """Start a new process under a crashed node's id: an empty machine
        (no view, no acceptor state) whose incarnation is a boot timestamp in
        virtual milliseconds, as the agent seeds it, joining through
        ``contacts``.  Messages still in flight to the old process reach the
        new one, as they would reach a process bound to the same address."""
        old = self.nodes[node_id]
        inc = max(int(self.now * 1000), old.me.inc + 1)
        rng = random.Random(f"{self.seed}/{node_id}/{inc}")
        m = Membership(Member(node_id, node_id, inc=inc), self.config, rng=rng)
        self.nodes[node_id] = m
        self.crashed.pop(node_id, None)
        self._tick_at.pop(node_id, None)
        self._record(node_id, ("restart", inc))
        self.call(node_id, lambda m: m.join(list(contacts), self.now))
        return m

    def partition(self, *groups: Iterable[str]) -> None:
        """Split the network: nodes in different groups cannot talk.  Nodes not
        named stay in group 0 with the first group."""
        self._group = {}
        for gi, g in enumerate(groups):
            for nid in g:
                self._group[nid] = gi
        self._record("*", ("partition", [len(list(g)) if not isinstance(g, list) else len(g) for g in groups]))

    def heal(self) -> None:
        self._group = {}
        self._record("*", ("heal",))

    def cut(self, a: str, b: str) -> None:
        self._cut[link(a, b)] = True

    def restore(self, a: str, b: str) -> None:
        self._cut.pop(link(a, b), None)

    # ---------------------------------------------------------------- running
    def call(self, node_id: str, fn: Callable[[Membership], Output]) -> None:
        m = self.nodes[node_id]
        t0 = time.perf_counter()
        out = fn(m)
        cpu = (time.perf_counter() - t0) * 1e6
        self._dispatch(node_id, m, out, cpu)

    def run_for(self, seconds: float) -> None:
        end = self.now + seconds
        self._run(end, None)

    def run_until(self, pred: Callable[[], bool], timeout: float, check_every: float = 0.05) -> bool:
        """Run until ``pred()`` holds (checked every ``check_every`` virtual
        seconds) or ``timeout`` virtual seconds pass.  Returns whether it held."""
        end = self.now + timeout
        while True:
            if pred():
                return True
            if self.now >= end:
                return False
            self._run(min(end, self.now + check_every), None)

    def _run(self, until: float, _unused: object) -> None:
        heap = self._heap
        spin_at, spins = -1.0, 0
        while heap and heap[0][0] <= until:
            t, _, kind, payload = heapq.heappop(heap)
            self.now = t
            if kind == _TICK:
                nid = payload  # type: ignore[assignment]
                if self._tick_at.get(nid) != t or self.crashed.get(nid):
                    continue
                del self._tick_at[nid]
                if t == spin_at:
                    spins += 1
                    if spins > SPIN_LIMIT:
                        raise Spin(f"{nid} ticked {spins} times at t={t:.6f}: next_deadline() does not advance")
                else:
                    spin_at, spins = t, 0
                m = self.nodes[nid]
                t0 = time.perf_counter()
                out = m.tick(t)
                self.ticks += 1
                if self.check_deadlines and m.next_deadline() <= t:
                    raise Spin(f"{nid} at t={t:.6f}: next_deadline() {m.next_deadline():.6f} is not after the tick")
                self._dispatch(nid, m, out, (time.perf_counter() - t0) * 1e6)
            elif kind == _CALL:
                nid, dst, refused = payload  # type: ignore[misc]
                if not self.crashed.get(nid):
                    if refused:
                        self.call(nid, lambda m: m.peer_refused(dst, dst, self.now))
                    else:
                        self.call(nid, lambda m: m.hint_unreachable(dst, self.now))
            else:
                src, dst, msg = payload  # type: ignore[misc]
                if self.crashed.get(dst) or not self._connected(src, dst):
                    self.stats.dropped += 1
                    continue
                m = self.nodes[dst]
                t0 = time.perf_counter()
                out = m.receive(src, src, msg, t)
                self._dispatch(dst, m, out, (time.perf_counter() - t0) * 1e6)
        self.now = max(self.now, until)

    def _connected(self, a: str, b: str) -> bool:
        if self._group.get(a, 0) != self._group.get(b, 0):
            return False
        return link(a, b) not in self._cut

    def _dispatch(self, nid: str, m: Membership, out: Output, cpu_us: float) -> None:
        for e in out.events:
            if isinstance(e, ev.Proposed):
                self.decisions.append(Decision(self.now, nid, cpu_us, e.view, e.reason))
            self._record(nid, e)
        if not self.crashed.get(nid):
            stats = self.stats
            for dst, addr, msg in out.messages:
                dst = dst or addr
                stats.sent += 1
                name = type(msg).__name__
                stats.by_type[name] = stats.by_type.get(name, 0) + 1
                if not isinstance(msg, (Ping, Ack)):
                    stats.protocol += 1
                if dst not in self.nodes or (self.loss and self.rng.random() < self.loss):
                    stats.dropped += 1
                    continue
                if self.filters and any(f(nid, dst, msg) for f in self.filters):
                    stats.dropped += 1
                    continue
                if self.crashed.get(dst) or not self._connected(nid, dst):
                    # what TCP does: the sender's connect fails (refused or
                    # timed out) and the agent hints the machine
                    stats.dropped += 1
                    refused = self.refuse_crashed and self.crashed.get(dst) and self._connected(nid, dst)
                    self._hint(nid, dst, bool(refused))
                    continue
                delay = self.latency + (self.rng.random() * self.jitter if self.jitter else 0.0)
                self._push(self.now + delay, _DELIVER, (nid, dst, msg))
        deadline = m.next_deadline()
        if deadline != float("inf"):
            deadline = max(deadline, self.now)
            cur = self._tick_at.get(nid)
            if cur is None or deadline < cur:
                self._tick_at[nid] = deadline
                self._push(deadline, _TICK, nid)

    def _hint(self, nid: str, dst: str, refused: bool = False) -> None:
        key = (nid, dst)
        if self._hinted.get(key, -1.0) > self.now:
            return
        self._hinted[key] = self.now + self.config.probe_interval
        if refused:  # the host's reset comes back after one round trip
            self._push(self.now + 2 * self.latency, _CALL, (nid, dst, True))
        else:  # a connect times out
            self._push(self.now + self.config.probe_timeout, _CALL, (nid, dst, False))

    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _record(self, nid: str, e: object) -> None:
        if isinstance(e, (ev.ViewChanged, ev.Removed)):
            first = self.committed.setdefault(e.view.epoch, e.view)
            if first != e.view:
                self.split.append((self.now, nid, first, e.view))
        self.trace.append((self.now, nid, e))
        self._by_kind.setdefault(type(e), []).append((self.now, nid, e))
        for fn in self.listeners:
            fn(self.now, nid, e)

    # ---------------------------------------------------------------- queries
    def live(self) -> list[str]:
        return [n for n in self.nodes if not self.crashed.get(n)]

    def members(self) -> list[str]:
        """Live nodes that are members (or leaving members) of some view."""
        return [n for n in self.live() if self.nodes[n].phase in (Phase.MEMBER, Phase.LEAVING)]

    def agreed(
        self,
        *,
        size: int | None = None,
        without: str | Iterable[str] = (),
        including: str | Iterable[str] = (),
        among: Iterable[str] | None = None,
    ) -> bool:
        """Do all live members (or the nodes ``among``) hold one and the same
        view, with the given size / excluded / included nodes?"""
        nodes = list(among) if among is not None else self.members()
        if not nodes:
            return False
        views = [self.nodes[n].view for n in nodes]
        first = views[0]
        if first is None or any(v is None or v.epoch != first.epoch for v in views):
            return False
        if any(n not in first for n in nodes):
            return False
        if size is not None and first.size != size:
            return False
        excl = [without] if isinstance(without, str) else list(without)
        incl = [including] if isinstance(including, str) else list(including)
        return all(x not in first for x in excl) and all(x in first for x in incl)

    def view_of(self, node: str) -> View | None:
        return self.nodes[node].view

    def events(self, kind: type, node: str | None = None) -> list[tuple[float, str, object]]:
        found = self._by_kind.get(kind, [])
        return found if node is None else [x for x in found if x[1] == node]

    def summary(self) -> str:
        epochs: dict[int, int] = {}
        for n in self.live():
            v = self.nodes[n].view
            e = v.epoch if v else -1
            epochs[e] = epochs.get(e, 0) + 1
        return f"t={self.now:.2f}s live={len(self.live())} epochs={dict(sorted(epochs.items()))}"


# ------------------------------------------------------------------ schedules
@dataclass
class ScheduleResult:
    """What one random fault schedule did and which invariant, if any, broke."""

    seed: int
    preset: str
    nodes: int
    actions: list[str]
    #: (time, node, first view, conflicting view) for every epoch committed twice
    split: list[tuple[float, str, View, View]]
    #: the :class:`Spin` message, if a tick left its deadline in the past
    spin: str | None
    #: the live nodes hold one view after healing (None: the schedule killed a
    #: majority of some view, so no protocol could be asked to settle it)
    settled: bool | None
    summary: str
    ticks: int
    #: sha256 of the trace: equal for two runs of one seed (determinism)
    digest: str = ""

    @property
    def ok(self) -> bool:
        return not self.split and self.spin is None and self.settled is not False


def _majority_intact(sim: Simulator) -> bool:
    """Do the live processes still hold a majority of the newest view's slots?
    (A slot whose process crashed, or restarted as a new incarnation, is lost.)"""
    views = [sim.nodes[n].view for n in sim.live() if sim.nodes[n].view is not None]
    if not views:
        return False
    view = max(views, key=lambda v: v.epoch)
    lost = [x for x in view.members if view.is_voter(x.id) and (sim.crashed.get(x.id) or sim.nodes[x.id].me.inc != x.inc)]
    voters = len(view.voters)
    if sim.refuse_crashed and voters - len(lost) >= view.quorum_without(len(lost)):
        return True  # a tie of proven deaths: the other half goes on
    return voters - len(lost) >= view.quorum


def run_schedule(
    seed: int, preset: str | None = None, *, steps: int = 8, settle: float = 60.0, refusals: bool = True,
    learners: bool = True,
) -> ScheduleResult:
    """One seeded random fault schedule, checked against the invariants.

    A cluster of 3 to 9 nodes (``lan`` or ``local`` timing unless ``preset``
    says, 0 or 2% loss) goes through ``steps`` faults at random times:
    crashes (of any member, the coordinator included), restarts of crashed
    nodes under the same id (0.05 to 3 s later, inside the window where the
    old incarnation is still a member), a majority/minority partition that
    stays up for later steps, Commits lost to one node, bursts of 30% loss,
    cut and restored links, joins and graceful leaves.  Faults that would
    leave fewer than a majority of the newest view's slots alive are skipped.
    Then the network heals and the run settles.  Checked all along: never
    two committed views with one epoch (any node, any time, restarted
    processes included) and ``next_deadline() > now`` after every tick; at
    the end, one view held by every live node (but an *orphan*: a node cut
    off while the others moved on, all of whose view's other members then
    died; it knows no live address, so nothing can reach it).

    Issue 14 adds, drawn from a second generator (so the faults of a seed
    stay those it drew before): ``refusals``, a send to a crashed node that
    the network reaches is refused (proof of death, for truly dead nodes
    only: a partitioned node is never refused), so a crash that leaves
    exactly half of the voters is no longer skipped; ``learners``, half the
    clusters report their founders synced (a trained cluster: joiners enter
    as learners) and, at each step, a learner may report its sync done.
    ``refusals=False, learners=False`` replays a seed as before issue 14.
    """
    from chaos_lightning.membership.messages import Commit

    rng = random.Random(seed)
    n = rng.randint(3, 9)
    preset = preset or rng.choice(["lan", "local"])
    sim = Simulator(seed=seed, config=Config.preset(preset), loss=rng.choice([0.0, 0.02]), jitter=0.002)
    sim.refuse_crashed = refusals
    extra = random.Random(f"{seed}/issue14")  # draws of the issue-14 inputs, apart from the faults'
    actions: list[str] = []
    spin: str | None = None
    settled: bool | None = None
    try:
        founders = sim.start_cluster(n)
        if learners and extra.random() < 0.5:
            sim.synced(*founders)
            actions.append(f"{sim.now:.3f} synced founders")
        crashed: list[str] = []
        cut: list[tuple[str, str]] = []
        joined = 0
        partitioned = False
        for _ in range(steps):
            sim.run_for(rng.uniform(0.0, 2.5))
            live = [x for x in sim.members() if not sim.crashed.get(x)]
            if learners and extra.random() < 0.4:
                pending = [x for x in live if sim.nodes[x].learner]
                if pending:
                    who = extra.choice(pending)
                    sim.synced(who)
                    actions.append(f"{sim.now:.3f} synced {who}")
            action = rng.choice(
                ["crash", "crash-coordinator", "restart", "restart", "partition", "lose-commits", "lossy", "cut", "restore", "join", "leave"]
            )
            if action in ("crash", "crash-coordinator") and len(live) > 1:
                if action == "crash":
                    victim = rng.choice(live)
                else:
                    v = sim.nodes[live[0]].view
                    victim = v.members[0].id if v is not None else live[0]
                if sim.crashed.get(victim) or victim not in sim.nodes:
                    continue
                sim.crash(victim)
                if _majority_intact(sim):
                    crashed.append(victim)
                    actions.append(f"{sim.now:.3f} {action} {victim}")
                else:
                    sim.crashed.pop(victim)  # would cost the majority: skip
            elif action == "restart" and crashed:
                victim = crashed.pop(rng.randrange(len(crashed)))
                sim.run_for(rng.uniform(0.05, 3.0))
                # the configured peers of a real launch: several, any may be gone
                contacts = [x for x in sim.members() if x != victim] or [victim]
                sim.restart(victim, rng.sample(contacts, min(3, len(contacts))))
                actions.append(f"{sim.now:.3f} restart {victim}")
            elif action == "partition" and len(live) >= 3:
                if partitioned:
                    sim.heal()
                    actions.append(f"{sim.now:.3f} heal")
                else:
                    minority = rng.sample(live, (len(live) - 1) // 2)
                    sim.partition([x for x in sim.nodes if x not in minority], minority)
                    actions.append(f"{sim.now:.3f} partition {','.join(sorted(minority))}")
                partitioned = not partitioned
            elif action == "lose-commits" and live:
                victim, until = rng.choice(live), sim.now + rng.uniform(0.5, 3.0)
                sim.filters.append(lambda s, d, m, v=victim, u=until: d == v and isinstance(m, Commit) and sim.now < u)
                actions.append(f"{sim.now:.3f} lose-commits {victim}")
            elif action == "lossy":
                until = sim.now + rng.uniform(0.5, 3.0)
                sim.filters.append(lambda s, d, m, u=until: sim.now < u and sim.rng.random() < 0.3)
                actions.append(f"{sim.now:.3f} lossy")
            elif action == "cut" and len(live) >= 2:
                a, b = rng.sample(live, 2)
                cut.append((a, b))
                sim.cut(a, b)
                actions.append(f"{sim.now:.3f} cut {a}-{b}")
            elif action == "restore" and cut:
                a, b = cut.pop(rng.randrange(len(cut)))
                sim.restore(a, b)
                actions.append(f"{sim.now:.3f} restore {a}-{b}")
            elif action == "join" and live:
                joined += 1
                sim.join(f"j{joined}", rng.sample(live, min(3, len(live))))
                actions.append(f"{sim.now:.3f} join j{joined}")
            elif action == "leave" and len(live) > 3:  # keep some of the founders to contact
                leaver = rng.choice(live)
                v = sim.nodes[leaver].view
                lost = [x for x in v.members if v.is_voter(x.id) and (sim.crashed.get(x.id) or sim.nodes[x.id].me.inc != x.inc)]
                voters = len(v.voters) - (1 if v.is_voter(leaver) else 0)
                if voters - len(lost) >= voters // 2 + 1:
                    sim.leave(leaver)
                    actions.append(f"{sim.now:.3f} leave {leaver}")
        sim.heal()
        for a, b in cut:
            sim.restore(a, b)
        sim.filters.clear()
        if _majority_intact(sim):

            def orphan(x: str) -> bool:
                # its view lists no other live process (the others all died
                # while it was cut off, after a view without it): no address
                # it knows can tell it anything, as no protocol could.  Or a
                # joiner without a view whose every seed is dead or gone (a
                # restart given three peers that then crashed or left: in a
                # real launch their addresses refuse, and the joiner says so)
                m = sim.nodes[x]
                v = m.view
                if v is None and m.phase is Phase.JOINING:
                    return all(sim.crashed.get(c) or sim.nodes[c].phase in (Phase.LEFT, Phase.REMOVED)
                               for c in m._contacts if c in sim.nodes)
                return v is not None and all(
                    sim.crashed.get(y.id) or sim.nodes[y.id].me.inc != y.inc for y in v.members if y.id != x
                ) and v.size > 1

            def one_view() -> bool:
                want = [x for x in sim.live() if sim.nodes[x].phase not in (Phase.LEFT, Phase.REMOVED) and not orphan(x)]
                return sim.agreed(among=want, without=[x for x in sim.nodes if sim.crashed.get(x)])

            settled = sim.run_until(one_view, timeout=settle)
            if not settled and not _majority_intact(sim):
                # lost it while settling (say a cut link plus a crash in three
                # nodes: the cut-off one cannot be told from a dead one and is
                # removed, leaving two slots, one dead): no quorum exists
                settled = None
        else:
            sim.run_for(5.0)
    except Spin as exc:
        spin = str(exc)
    import hashlib

    h = hashlib.sha256()
    for t, nid, e in sim.trace:
        h.update(f"{t:.9f} {nid} {e!r}\n".encode())
    return ScheduleResult(seed, preset, n, actions, list(sim.split), spin, settled, sim.summary(), sim.ticks, h.hexdigest())


def sweep(seeds: Iterable[int], preset: str | None = None, *, steps: int = 8) -> dict[str, object]:
    """Run many schedules; return the counts and the failing seeds."""
    runs = split = spin = unsettled = skipped = 0
    bad: list[dict[str, object]] = []
    t0 = time.perf_counter()
    for seed in seeds:
        r = run_schedule(seed, preset, steps=steps)
        runs += 1
        split += bool(r.split)
        spin += r.spin is not None
        unsettled += r.settled is False
        skipped += r.settled is None
        if not r.ok:
            bad.append({"seed": seed, "preset": r.preset, "split": [(t, n, a.describe(), b.describe()) for t, n, a, b in r.split[:2]],
                        "spin": r.spin, "settled": r.settled, "summary": r.summary, "actions": r.actions})
    return {"preset": preset or "random", "schedules": runs, "split_brain": split, "spin": spin, "unsettled": unsettled,
            "majority_lost": skipped, "seconds": round(time.perf_counter() - t0, 1), "failures": bad}


def main(argv: list[str] | None = None) -> int:
    """``python -m chaos_lightning.membership.sim --schedules 1000 --preset local``"""
    import argparse
    import json

    ap = argparse.ArgumentParser(description="random fault schedules against the membership invariants")
    ap.add_argument("--schedules", type=int, default=200)
    ap.add_argument("--first-seed", type=int, default=0)
    ap.add_argument("--preset", choices=["local", "lan", "edge"], default=None, help="default: drawn per schedule")
    ap.add_argument("--steps", type=int, default=8)
    ap.add_argument("--json", default="", help="write the result here")
    args = ap.parse_args(argv)
    res = sweep(range(args.first_seed, args.first_seed + args.schedules), args.preset, steps=args.steps)
    print("| preset | schedules | split brain | spin | not settled | majority lost (skipped) | seconds |")
    print("| --- | ---: | ---: | ---: | ---: | ---: | ---: |")
    print(f"| {res['preset']} | {res['schedules']} | {res['split_brain']} | {res['spin']} | {res['unsettled']} "
          f"| {res['majority_lost']} | {res['seconds']} |")
    for f in res["failures"][:10]:  # type: ignore[index]
        print(f"seed {f['seed']} ({f['preset']}): split={f['split']} spin={f['spin']} settled={f['settled']} {f['summary']}")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(res, fh, indent=1)
    return 0 if not res["failures"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
