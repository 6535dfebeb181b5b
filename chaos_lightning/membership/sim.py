"""A deterministic simulator for the membership state machine.

The same :class:`~chaos_lightning.membership.machine.Membership` objects that
the asyncio agent drives run here over a fake network, in virtual time, all in
one thread: the shape of etcd raft's test harness.  A run is a pure function
of its seed and script, so a failing case replays exactly (``trace`` is a list
of ``(time, node, event)`` that tests compare between runs).

The network delivers each message after ``latency`` plus uniform ``jitter``
seconds, drops it with probability ``loss``, and never delivers across a
partition or a cut link; like a TCP connect, a send that cannot get through
tells the sender (``hint_unreachable``) ``probe_timeout`` later.  Crashed nodes
neither send nor receive.  Nodes are
ticked exactly at their machine's ``next_deadline()``, so idle nodes cost
nothing and 1,000 nodes simulate in seconds.

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

    def crash(self, node_id: str) -> None:
        """Stop a node dead: it sends and receives nothing from now on."""
        self.crashed[node_id] = True

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
                self._dispatch(nid, m, out, (time.perf_counter() - t0) * 1e6)
            elif kind == _CALL:
                nid, dst = payload  # type: ignore[misc]
                if not self.crashed.get(nid):
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
                if self.crashed.get(dst) or not self._connected(nid, dst):
                    # what TCP does: the sender's connect fails (refused or
                    # timed out) and the agent hints the machine
                    stats.dropped += 1
                    self._hint(nid, dst)
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

    def _hint(self, nid: str, dst: str) -> None:
        key = (nid, dst)
        if self._hinted.get(key, -1.0) > self.now:
            return
        self._hinted[key] = self.now + self.config.probe_interval
        self._push(self.now + self.config.probe_timeout, _CALL, (nid, dst))

    def _push(self, t: float, kind: int, payload: object) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (t, self._seq, kind, payload))

    def _record(self, nid: str, e: object) -> None:
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
