"""The membership protocol of one node, as a sans-IO state machine.

What this file owns: every rule that changes one node's view of the cluster —
failure detection (SWIM: direct probe, indirect probe through k helpers,
suspicion, incarnation numbers to refute it), link detection (a direct probe
that fails while an indirect one succeeds is a link-down between two live
nodes, a direct success on such a link a link-up), and view agreement (one
Paxos instance per epoch, whose acceptors are the members of the previous view,
so only a majority of that view can commit the next one).

What it never does: open a socket, start a thread, sleep or read a clock.  The
caller passes ``now`` (seconds, any monotonic origin) and incoming messages in,
and gets back an :class:`Output` with the messages to send and the events to
report.  The same object therefore runs under the asyncio agent
(:mod:`chaos_lightning.agent`) and under the deterministic simulator
(:mod:`chaos_lightning.membership.sim`) with 1,000 virtual nodes.  The only
randomness comes from the ``random.Random`` it is given, and nothing iterates
over a ``set`` of strings (their order changes with ``PYTHONHASHSEED``), so a
seed replays exactly.

How a change flows:

1. Someone learns a *fact* (a join request, a leave, a confirmed failure, a
   link change).  Facts spread by piggybacking on probe traffic and are also
   sent straight to the *coordinator*: the lowest-ranked member this node
   believes alive.
2. The coordinator computes the next view from the current one and all facts
   it knows and proposes it.  The rank-0 member of the current view proposes
   at ballot ``(0, itself)`` and skips Paxos' prepare phase; anyone else (a
   coordinator that took over because rank 0 died or left) runs both phases
   and must re-propose any value a majority may already have accepted.
3. With ``Accepted`` from a majority of the current view the coordinator
   commits: it installs the view and sends ``Commit`` to the old and new
   members.  Nodes that miss a commit catch up when they see a higher epoch
   on any message (``SyncRequest``/``ViewSync``).

A node on the minority side of a partition can never gather a majority, so it
never commits; it reports ``QuorumLost`` as soon as it believes fewer than a
majority of its view alive.  When the partition heals it learns of the newer
epoch from the first probe that crosses, sees it was removed, and joins again
(``Config.auto_rejoin``), so there is again a single view.
"""

from __future__ import annotations

import heapq
import random
from dataclasses import dataclass, field, replace
from enum import Enum

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.messages import (
    ALIVE,
    DEAD,
    JOIN,
    LEAVE,
    LINK,
    SUSPECT,
    Accept,
    Accepted,
    Ack,
    Commit,
    Fact,
    Facts,
    JoinRequest,
    Nack,
    Ping,
    PingReq,
    Prepare,
    Promise,
    SyncRequest,
    ViewSync,
)
from chaos_lightning.membership.view import Member, View, link

Ballot = tuple[int, str]


class Phase(Enum):
    IDLE = "idle"  # constructed, not started
    JOINING = "joining"  # asking contacts to be let in
    MEMBER = "member"
    LEAVING = "leaving"  # asked to leave, still a member until a view drops it
    LEFT = "left"  # a view without us committed after we asked to leave
    REMOVED = "removed"  # dropped against our will, auto_rejoin off


@dataclass
class Output:
    """What one call into the machine asks the caller to do."""

    #: (destination node id, its address or "", message)
    messages: list[tuple[str, str, object]] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    #: (peer, seconds) round trips of direct probes, for the monitor
    rtt: list[tuple[str, float]] = field(default_factory=list)


@dataclass
class _Probe:
    target: str
    seq: int
    started: float
    direct_deadline: float
    end: float  # end of the probe period: verdict time
    direct_ok: bool = False
    indirect_ok: bool = False
    indirect_sent: bool = False


@dataclass
class _Status:
    state: str  # ALIVE | SUSPECT | DEAD
    inc: int


@dataclass
class _Proposal:
    epoch: int
    ballot: Ballot
    value: View | None  # None while preparing
    reason: str
    deadline: float
    promises: dict[str, tuple[Ballot, View | None]] = field(default_factory=dict)
    accepted: dict[str, bool] = field(default_factory=dict)


@dataclass
class _LinkState:
    up: bool
    version: int
    reporter: str

    def key(self) -> tuple[int, str, bool]:
        # a later version wins; on a tie, "down" wins so a flapping link is
        # not declared up by a stale report
        return (self.version, self.reporter, not self.up)


class Membership:
    """One node's membership state machine (see the module docstring)."""

    def __init__(self, me: Member, config: Config | None = None, *, rng: random.Random | None = None):
        """``me.inc`` is the starting incarnation: the agent passes a boot
        timestamp so a restarted process outranks gossip about its predecessor."""
        self.me = me
        self.id = me.id
        self.config = config or Config()
        self.rng = rng or random.Random()
        self.phase = Phase.IDLE
        self.view: View | None = None
        self.quorate = True
        self.rtt: dict[str, float] = {}

        self._inc = me.inc  # our incarnation: raised to refute suspicion or to rejoin
        self._status: dict[str, _Status] = {}
        self._addrs: dict[str, str] = {}
        self._seq = 0
        self._probes: dict[int, _Probe] = {}
        self._relays: dict[int, tuple[str, int, str]] = {}  # our seq -> (origin, origin seq, target)
        self._relay_deadline: dict[int, float] = {}
        self._next_probe_at = 0.0
        self._probe_order: list[str] = []
        self._probe_pos = 0
        self._link_fails: dict[str, int] = {}  # peer -> consecutive direct-fail/indirect-ok periods
        # key -> [fact, transmits left]; handed out round robin: taken from the
        # front, re-inserted at the back (O(1) per fact, even with hundreds queued)
        self._gossip: dict[tuple, list] = {}
        self._suspects: dict[str, float] = {}  # node -> suspicion deadline
        # (deadline, node), lazily pruned: entries whose deadline no longer
        # matches _suspects are stale.  A partition makes hundreds of suspects,
        # and scanning them on every tick dominated the 1,000-node simulation.
        self._suspect_heap: list[tuple[float, str]] = []
        self._my_suspicions: dict[str, bool] = {}  # suspicions our own probes raised
        self._hint_probe_end = 0.0  # at most one probe from transport hints at a time
        self._dead_nodes: dict[str, None] = {}  # confirmed failed, not yet removed
        self._dirty = False  # facts changed since the coordinator last looked
        self._joins_since = 0.0  # when the oldest pending join arrived

        self._joins: dict[str, Member] = {}
        # node -> incarnation it had when a view removed it: a JOIN fact for an
        # incarnation at or below is stale gossip (the node left or was
        # removed), not a request; without this an old join fact re-adds a
        # node that just left, and the cluster flips between the two views
        self._departed: dict[str, int] = {}
        self._leaves: dict[str, bool] = {}
        self._links: dict[tuple[str, str], _LinkState] = {}
        self._reported_down: dict[tuple[str, str], bool] = {}  # links touching us reported down
        self._failed_reported: dict[str, bool] = {}

        # acceptor state for epoch view.epoch + 1
        self._promised: Ballot = (-1, "")
        self._accepted: tuple[Ballot, View] | None = None
        # proposer state
        self._proposal: _Proposal | None = None
        self._max_round = 0
        self._next_proposal_at = 0.0
        self._round0_used = 0  # the epoch for which we spent ballot (0, us)

        self._contacts: list[str] = []
        self._contact_pos = 0
        self._retry_at = 0.0  # join / leave request retry
        self._sync_asked: dict[str, float] = {}

    # ------------------------------------------------------------------ API
    def bootstrap(self, now: float) -> Output:
        """Found a new cluster: commit epoch 1 with this node alone."""
        out = Output()
        self.phase = Phase.JOINING
        self._install(View(1, (self.me,)), now, out)
        return out

    def join(self, contacts: list[str], now: float) -> Output:
        """Ask to be let in through any of ``contacts`` (addresses)."""
        if not contacts:
            raise ValueError("join needs at least one contact address")
        out = Output()
        self.phase = Phase.JOINING
        self._contacts = list(contacts)
        self._contact_pos = 0
        self._retry_at = now
        self._tick_join(now, out)
        return out

    def leave(self, now: float) -> Output:
        """Leave gracefully at the next view; we keep acking until it commits."""
        out = Output()
        if self.phase is not Phase.MEMBER:
            return out
        self.phase = Phase.LEAVING
        self._learn(Fact(LEAVE, self.id, self._inc), now, out, from_self=True)
        self._retry_at = now + self.config.join_retry
        self._maybe_propose(now, out)
        return out

    def next_deadline(self) -> float:
        """When :meth:`tick` next has work to do (the caller may tick earlier)."""
        if self.phase in (Phase.IDLE, Phase.LEFT, Phase.REMOVED):
            return float("inf")
        if self.phase is Phase.JOINING:
            return self._retry_at
        times = [self._next_probe_at]
        for p in self._probes.values():
            times.append(p.end if (p.direct_ok or p.indirect_sent) else p.direct_deadline)
        if self._relay_deadline:
            times.append(min(self._relay_deadline.values()))
        heap = self._suspect_heap
        while heap and self._suspects.get(heap[0][1]) != heap[0][0]:
            heapq.heappop(heap)
        if heap:
            times.append(heap[0][0])
        if self._proposal is not None:
            times.append(self._proposal.deadline)
        elif self._next_proposal_at > 0:
            times.append(self._next_proposal_at)
        if self.phase is Phase.LEAVING:
            times.append(self._retry_at)
        return min(times)

    def tick(self, now: float) -> Output:
        out = Output()
        if self.phase is Phase.JOINING:
            self._tick_join(now, out)
            return out
        if self.phase not in (Phase.MEMBER, Phase.LEAVING):
            return out
        self._tick_probes(now, out)
        self._tick_suspicion(now, out)
        self._tick_proposal(now, out)
        if self.phase is Phase.LEAVING and now >= self._retry_at:
            self._retry_at = now + self.config.join_retry
            self._send_to_coordinator(Facts(self._epoch(), (Fact(LEAVE, self.id, self._inc),)), out)
        self._maybe_propose(now, out)
        return out

    def hint_unreachable(self, node: str, now: float) -> Output:
        """The transport lost its connection to ``node``: probe it now rather
        than waiting for its turn in the round robin (a crash on the same host
        resets the TCP connection at once; this halves detection time)."""
        out = Output()
        if self.phase not in (Phase.MEMBER, Phase.LEAVING) or self.view is None or node not in self.view:
            return out
        st = self._status.get(node)
        # Only news is worth a probe: a node already suspected is being dealt
        # with, and a cap on hint probes keeps a partition (every send fails)
        # from multiplying probes by the number of unreachable nodes.
        if node == self.id or st is None or st.state != ALIVE or now < self._hint_probe_end:
            return out
        if not any(p.target == node for p in self._probes.values()):
            self._hint_probe_end = now + self.config.probe_interval
            self._start_probe(node, now, out)
        return out

    def receive(self, src: str, src_addr: str, msg: object, now: float) -> Output:
        """Handle one message from ``src`` (its address ``src_addr``)."""
        out = Output()
        if src_addr and src and src != self.id:
            self._addrs[src] = src_addr
        if self.phase in (Phase.IDLE, Phase.LEFT, Phase.REMOVED):
            return out
        handler = _HANDLERS.get(type(msg))
        if handler is None:
            return out  # the wire schema admits only known types; be safe anyway
        handler(self, src, msg, now, out)
        if self.phase in (Phase.MEMBER, Phase.LEAVING):
            self._maybe_propose(now, out)
        return out

    def coordinator(self) -> str | None:
        """The member this node believes drives view changes now."""
        if self.view is None:
            return None
        for m in self.view.members:
            # a leaving member still coordinates (its own exit, typically):
            # skipping it would make nodes disagree on who coordinates
            if m.id == self.id or not self._dead(m.id):
                return m.id
        return None

    # ------------------------------------------------------------ joining
    def _tick_join(self, now: float, out: Output) -> None:
        if now < self._retry_at or not self._contacts:
            return
        addr = self._contacts[self._contact_pos % len(self._contacts)]
        self._contact_pos += 1
        self._retry_at = now + self.config.join_retry
        out.messages.append(("", addr, JoinRequest(self.me)))

    def _on_join_request(self, src: str, msg: JoinRequest, now: float, out: Output) -> None:
        if self.view is None or self.phase not in (Phase.MEMBER, Phase.LEAVING):
            return
        m = msg.member
        self._addrs[m.id] = m.addr
        if m.id in self.view:
            out.messages.append((m.id, m.addr, ViewSync(self.view)))
            return
        self._learn(Fact(JOIN, m.id, 0, member=m), now, out, from_self=True)

    # ------------------------------------------------------------ probing
    def _tick_probes(self, now: float, out: Output) -> None:
        cfg = self.config
        for seq in list(self._probes):
            p = self._probes[seq]
            if not p.direct_ok and not p.indirect_sent and now >= p.direct_deadline:
                self._send_indirect(p, out)
            if now >= p.end:
                del self._probes[seq]
                self._verdict(p, now, out)
        for seq in [s for s, d in self._relay_deadline.items() if now >= d]:
            del self._relay_deadline[seq]
            self._relays.pop(seq, None)
        if now >= self._next_probe_at:
            self._next_probe_at = now + cfg.probe_interval
            target = self._next_probe_target()
            if target is not None:
                self._start_probe(target, now, out)
            # links we suspect or know to be down get a full probe every period,
            # or a link-up would wait for the round robin (n periods)
            # suspects too: a direct ping carries the suspicion to the accused
            # (Lifeguard's "buddy system"), which refutes it at once if alive
            # (a bounded few per period: in a partition there are hundreds)
            # only suspicions we raised: if every node that heard one probed the
            # suspect each period, one crash at 1,000 nodes would cost ~46,000
            # pings (measured by benchmarks/membership.py)
            suspects = [n for n in self._my_suspicions if n in self._suspects]
            if len(suspects) > 2:
                suspects = self.rng.sample(suspects, 2)
            for peer in self._link_watch() + suspects:
                if not any(p.target == peer for p in self._probes.values()):
                    self._start_probe(peer, now, out)

    def _link_watch(self) -> list[str]:
        """Peers whose direct link to us is suspected or known down."""
        peers = dict.fromkeys(self._link_fails)
        for (a, b), st in self._links.items():
            if not st.up and self.id in (a, b):
                peers[b if a == self.id else a] = None
        view = self.view
        return [p for p in peers if view is not None and p in view and not self._dead(p)]

    def _next_probe_target(self) -> str | None:
        if not self._probe_order:
            return None
        for _ in range(len(self._probe_order)):
            if self._probe_pos >= len(self._probe_order):
                self.rng.shuffle(self._probe_order)
                self._probe_pos = 0
            target = self._probe_order[self._probe_pos]
            self._probe_pos += 1
            if not any(p.target == target for p in self._probes.values()):
                return target
        return None

    def _start_probe(self, target: str, now: float, out: Output) -> None:
        cfg = self.config
        self._seq += 1
        p = _Probe(target, self._seq, now, now + cfg.probe_timeout, now + cfg.probe_interval)
        self._probes[p.seq] = p
        self._send(target, Ping(p.seq, self._epoch(), "", self._take_gossip(about=target)), out)

    def _send_indirect(self, p: _Probe, out: Output) -> None:
        p.indirect_sent = True
        st = self._status.get(p.target)
        if st is not None and st.state == DEAD:
            return  # already confirmed dead: the direct probe is only for a heal
        # a second direct ping alongside the indirect ones (memberlist does the
        # same over TCP): one lost datagram must not look like a broken link
        self._send(p.target, Ping(p.seq, self._epoch(), "", self._take_gossip(about=p.target)), out)
        helpers = self._pick_helpers(p.target)
        addr = self._addr_of(p.target)
        for h in helpers:
            self._send(h, PingReq(p.seq, self._epoch(), p.target, addr, self._take_gossip()), out)

    def _pick_helpers(self, target: str) -> list[str]:
        if self.view is None:
            return []
        members = self.view.members
        down = self._down_now()
        k = self.config.indirect_probes

        def usable(h: str) -> bool:
            st = self._status.get(h)
            return h != self.id and h != target and (st is None or st.state == ALIVE) and link(self.id, h) not in down

        if len(members) <= 4 * k:
            pool = [m.id for m in members if usable(m.id)]
            return pool if len(pool) <= k else self.rng.sample(pool, k)
        # large views: draw at random instead of filtering all n members
        picked: list[str] = []
        for _ in range(8 * k):
            h = members[self.rng.randrange(len(members))].id
            if h not in picked and usable(h):
                picked.append(h)
                if len(picked) == k:
                    break
        return picked

    def _verdict(self, p: _Probe, now: float, out: Output) -> None:
        pair = link(self.id, p.target)
        if p.direct_ok:
            self._link_fails.pop(p.target, None)
            cur = self._links.get(pair)
            if cur is not None and not cur.up:
                self._report_link(p.target, up=True, now=now, out=out)
            return
        if p.indirect_ok:
            n = self._link_fails.get(p.target, 0) + 1
            self._link_fails[p.target] = n
            cur = self._links.get(pair)
            if n >= self.config.link_confirm and (cur is None or cur.up):
                self._report_link(p.target, up=False, now=now, out=out)
            return
        if p.target in self._link_fails and not (self._links.get(pair) and not self._links[pair].up):
            # neither path answered: not a link problem (any more)
            self._link_fails.pop(p.target, None)
        st = self._status.get(p.target)
        if st is not None and st.state == ALIVE:
            if self._learn(Fact(SUSPECT, p.target, st.inc), now, out, from_self=True):
                self._my_suspicions[p.target] = True

    def _on_ping(self, src: str, msg: Ping, now: float, out: Output) -> None:
        self._absorb(src, msg.epoch, msg.gossip, now, out)
        self._check_epoch(src, msg.epoch, now, out)
        # an indirect ping (msg.origin set) is answered to the helper, who
        # relays the ack to the origin
        self._send(src, Ack(msg.seq, self._epoch(), self.id, self._take_gossip()), out)

    def _on_ack(self, src: str, msg: Ack, now: float, out: Output) -> None:
        self._absorb(src, msg.epoch, msg.gossip, now, out)
        self._check_epoch(src, msg.epoch, now, out)
        relay = self._relays.pop(msg.seq, None)
        if relay is not None:
            self._relay_deadline.pop(msg.seq, None)
            origin, origin_seq, target = relay
            if target == msg.target:
                self._send(origin, Ack(origin_seq, self._epoch(), target, self._take_gossip()), out)
            return
        p = self._probes.get(msg.seq)
        if p is None or p.target != msg.target:
            return
        if src == p.target:
            if not p.direct_ok:
                p.direct_ok = True
                rtt = now - p.started
                prev = self.rtt.get(src)
                self.rtt[src] = rtt if prev is None else 0.875 * prev + 0.125 * rtt
                out.rtt.append((src, rtt))
        else:
            p.indirect_ok = True
        self._alive_evidence(p.target, now, out)

    def _on_ping_req(self, src: str, msg: PingReq, now: float, out: Output) -> None:
        self._absorb(src, msg.epoch, msg.gossip, now, out)
        self._check_epoch(src, msg.epoch, now, out)
        if msg.target_addr:
            self._addrs.setdefault(msg.target, msg.target_addr)
        self._seq += 1
        self._relays[self._seq] = (src, msg.seq, msg.target)
        self._relay_deadline[self._seq] = now + self.config.probe_interval
        self._send(msg.target, Ping(self._seq, self._epoch(), src, self._take_gossip(about=msg.target)), out)

    def _alive_evidence(self, node: str, now: float, out: Output) -> None:
        """An ack proves ``node`` alive now; a suspicion of it is moot."""
        st = self._status.get(node)
        if st is not None and st.state == SUSPECT:
            self._set_state(node, st, ALIVE, st.inc)

    # ------------------------------------------------------------ suspicion
    def _tick_suspicion(self, now: float, out: Output) -> None:
        heap, due = self._suspect_heap, []
        while heap and heap[0][0] <= now:
            deadline, node = heapq.heappop(heap)
            if self._suspects.get(node) == deadline:
                due.append(node)
        for node in due:
            # every node that heard the suspicion confirms it on its own timer;
            # only the one whose probe failed tells the coordinator directly
            # (the rest is gossip), or a partition would send it O(n^2) messages
            mine = self._my_suspicions.pop(node, False)
            self._learn(Fact(DEAD, node, self._status[node].inc), now, out, from_self=mine)

    # ------------------------------------------------------------ facts
    def _learn(self, fact: Fact, now: float, out: Output, *, from_self: bool = False) -> bool:
        """Apply ``fact``; if it was news, gossip it (and, if we originated a
        fact the coordinator acts on, send it there directly)."""
        if not self._apply(fact, now, out):
            return False
        self._dirty = True
        n = self.view.size if self.view else 1
        self._gossip[_fact_key(fact)] = [fact, self.config.retransmits(n)]
        if from_self and fact.kind in (DEAD, JOIN, LEAVE, LINK) and self.coordinator() != self.id:
            self._send_to_coordinator(Facts(self._epoch(), (fact,)), out)
        return True

    def _absorb(self, src: str, epoch: int, facts: tuple[Fact, ...], now: float, out: Output) -> None:
        """Learn gossip, but only from a member of our own epoch: a node on
        the far side of a healed partition still carries its verdicts on us
        ("dead") from a view that no longer exists.  Join requests are the
        exception; they are harmless and a joiner has no epoch."""
        same = self.view is not None and epoch == self.view.epoch and src in self.view
        for f in facts:
            if same or f.kind == JOIN:
                self._learn(f, now, out)

    def _apply(self, f: Fact, now: float, out: Output) -> bool:
        view = self.view
        if f.kind in (ALIVE, SUSPECT, DEAD):
            if f.node == self.id:
                if f.kind != ALIVE and f.inc >= self._inc and self.phase in (Phase.MEMBER, Phase.LEAVING):
                    # refute: we are alive, with a newer incarnation
                    self._inc = f.inc + 1
                    alive = Fact(ALIVE, self.id, self._inc)
                    n = view.size if view else 1
                    self._gossip[_fact_key(alive)] = [alive, self.config.retransmits(n)]
                return False
            if view is None or f.node not in view:
                return False
            st = self._status.setdefault(f.node, _Status(ALIVE, 0))
            if f.kind == ALIVE:  # a refutation: only a newer incarnation counts
                if f.inc <= st.inc:
                    return False
                self._set_state(f.node, st, ALIVE, f.inc)
                self._failed_reported.pop(f.node, None)
                self._update_quorum(out)
                return True
            if f.kind == SUSPECT:
                if st.state == DEAD or f.inc < st.inc or (st.state == SUSPECT and f.inc == st.inc):
                    return False
                self._set_state(f.node, st, SUSPECT, f.inc)
                deadline = now + self.config.suspicion_timeout(view.size)
                self._suspects[f.node] = deadline
                heapq.heappush(self._suspect_heap, (deadline, f.node))
                out.events.append(ev.MemberSuspected(f.node))
                return True
            # DEAD
            if st.state == DEAD or f.inc < st.inc:
                return False
            self._set_state(f.node, st, DEAD, f.inc)
            if not self._failed_reported.get(f.node):
                self._failed_reported[f.node] = True
                out.events.append(ev.MemberFailed(f.node))
            self._update_quorum(out)
            return True
        if f.kind == JOIN:
            m = f.member
            if m is None or m.id != f.node or f.node in self._joins or (view is not None and f.node in view):
                return False
            if m.inc <= self._departed.get(m.id, -1):
                return False
            if not self._joins:
                self._joins_since = now
            self._joins[f.node] = m
            if m.addr:
                self._addrs.setdefault(m.id, m.addr)
            return True
        if f.kind == LEAVE:
            if view is None or f.node not in view or f.node in self._leaves:
                return False
            self._leaves[f.node] = True
            return True
        if f.kind == LINK:
            if view is None or f.node not in view or f.other not in view or f.node == f.other:
                return False
            pair = link(f.node, f.other)
            new = _LinkState(f.up, f.inc, f.node)
            cur = self._links.get(pair)
            if cur is not None and cur.key() >= new.key():
                return False
            self._links[pair] = new
            if self.id in pair:
                self._emit_link(pair, f.up, out)
            return True
        return False

    def _set_state(self, node: str, st: _Status, state: str, inc: int) -> None:
        if st.state == DEAD and state != DEAD:
            self._dead_nodes.pop(node, None)
        elif st.state != DEAD and state == DEAD:
            self._dead_nodes[node] = None
        if state != SUSPECT:
            self._suspects.pop(node, None)
            if state == ALIVE:
                self._my_suspicions.pop(node, None)
        st.state, st.inc = state, inc

    def _report_link(self, peer: str, *, up: bool, now: float, out: Output) -> None:
        pair = link(self.id, peer)
        cur = self._links.get(pair)
        version = (cur.version + 1) if cur is not None else 1
        if up:
            self._link_fails.pop(peer, None)
        self._learn(Fact(LINK, self.id, version, peer, up), now, out, from_self=True)

    def _emit_link(self, pair: tuple[str, str], up: bool, out: Output) -> None:
        """Report a change of a link touching us, once per transition."""
        was_down = self._reported_down.get(pair, False)
        if not up and not was_down:
            self._reported_down[pair] = True
            out.events.append(ev.LinkDown(*pair))
        elif up and was_down:
            del self._reported_down[pair]
            out.events.append(ev.LinkUp(*pair))

    def _down_now(self) -> frozenset[tuple[str, str]] | tuple[()]:
        if not self._links:
            return ()
        return frozenset(p for p, s in self._links.items() if not s.up)

    def _take_gossip(self, about: str = "") -> tuple[Fact, ...]:
        """Facts to piggyback; a message to a suspected node leads with the
        suspicion, so the accused hears it (and can refute) first."""
        buddy: tuple[Fact, ...] = ()
        if about:
            st = self._status.get(about)
            if st is not None and st.state == SUSPECT:
                buddy = (Fact(SUSPECT, about, st.inc),)
        if not self._gossip:
            return buddy
        items = self._gossip
        chosen = []
        for k in items:
            chosen.append(k)
            if len(chosen) >= self.config.max_piggyback:
                break
        facts = []
        for k in chosen:
            entry = items.pop(k)
            facts.append(entry[0])
            entry[1] -= 1
            if entry[1] > 0:
                items[k] = entry  # to the back of the queue
        return buddy + tuple(facts)

    # ------------------------------------------------------------ agreement
    def _desired(self) -> tuple[View, str] | None:
        view = self.view
        assert view is not None
        # from the (few) pending changes, not a scan of all n members: this
        # runs in the call that decides, whose time the paper bounds at 1 ms
        remove = [n for n in {**self._leaves, **self._dead_nodes} if n in view]
        add = [m for nid, m in self._joins.items() if nid not in view]
        current_down = set(view.down_links)
        down, up = [], []
        for pair, st in self._links.items():
            if pair[0] not in view or pair[1] not in view:
                continue
            if not st.up and pair not in current_down:
                down.append(pair)
            elif st.up and pair in current_down:
                up.append(pair)
        if not (remove or add or down or up):
            return None
        reasons = []
        if add:
            reasons.append("join " + ",".join(m.id for m in add))
        gone = [r for r in remove if r in self._leaves]
        if gone:
            reasons.append("leave " + ",".join(gone))
        dead = [r for r in remove if r not in self._leaves]
        if dead:
            reasons.append("failure " + ",".join(dead))
        if down:
            reasons.append("link-down " + ",".join(f"{a}-{b}" for a, b in down))
        if up:
            reasons.append("link-up " + ",".join(f"{a}-{b}" for a, b in up))
        nxt = view.with_changes(add=add, remove=remove, down=down, up=up)
        if not nxt.members:
            return None
        return nxt, "; ".join(reasons)

    def _dead(self, node: str) -> bool:
        st = self._status.get(node)
        return st is not None and st.state == DEAD

    def _maybe_propose(self, now: float, out: Output) -> None:
        if self.phase not in (Phase.MEMBER, Phase.LEAVING) or self._proposal is not None or self.view is None:
            return
        if not self._dirty or now < self._next_proposal_at or self.coordinator() != self.id:
            return
        desired = self._desired()
        if desired is None:
            self._dirty = False
            self._next_proposal_at = 0.0
            return
        value, reason = desired
        if reason.startswith("join") and ";" not in reason and now < self._joins_since + self.config.join_batch:
            self._next_proposal_at = self._joins_since + self.config.join_batch
            return
        view = self.view
        epoch = view.epoch + 1
        cfg = self.config
        first = view.members[0].id == self.id and self._promised <= (0, self.id) and self._accepted is None
        if first and self._round0_used != epoch:
            self._round0_used = epoch
            ballot: Ballot = (0, self.id)
            prop = _Proposal(epoch, ballot, value, reason, now + cfg.proposal_timeout)
            self._proposal = prop
            out.events.append(ev.Proposed(value, reason))
            self._broadcast_accept(prop, now, out)
        else:
            self._max_round += 1
            ballot = (self._max_round, self.id)
            prop = _Proposal(epoch, ballot, None, reason, now + cfg.proposal_timeout)
            self._proposal = prop
            msg = Prepare(epoch, ballot[0], ballot[1])
            for m in view.members:
                if m.id == self.id:
                    self._on_prepare(self.id, msg, now, out)
                else:
                    self._send(m.id, msg, out)

    def _broadcast_accept(self, prop: _Proposal, now: float, out: Output) -> None:
        assert self.view is not None and prop.value is not None
        msg = Accept(prop.epoch, prop.ballot[0], prop.ballot[1], prop.value)
        send = out.messages.append
        me = self.id
        for m in self.view.members:
            if m.id == me:
                self._on_accept(me, msg, now, out)
            else:
                send((m.id, m.addr, msg))  # the hot loop of a decision: no lookups

    def _tick_proposal(self, now: float, out: Output) -> None:
        prop = self._proposal
        if prop is None or now < prop.deadline:
            return
        self._abandon(now)

    def _abandon(self, now: float) -> None:
        """Give the proposal up; retry after a randomized backoff so two
        would-be coordinators do not keep pre-empting each other."""
        self._proposal = None
        self._dirty = True
        backoff = self.config.proposal_timeout * (0.5 + self.rng.random())
        if not self.quorate:
            backoff *= 4  # hopeless until the partition heals: keep traffic low
        self._next_proposal_at = now + backoff

    def _on_prepare(self, src: str, msg: Prepare, now: float, out: Output) -> None:
        if not self._acceptor_epoch_ok(src, msg.epoch, now, out):
            return
        ballot = (msg.round, msg.node)
        self._max_round = max(self._max_round, msg.round)
        if ballot >= self._promised:
            self._promised = ballot
            acc = self._accepted
            reply = Promise(
                msg.epoch, msg.round, msg.node, acc[0][0] if acc else -1, acc[0][1] if acc else "", acc[1] if acc else None
            )
        else:
            reply = Nack(msg.epoch, msg.round, msg.node, self._promised[0], self._promised[1])
        self._reply(src, reply, now, out)

    def _on_accept(self, src: str, msg: Accept, now: float, out: Output) -> None:
        if not self._acceptor_epoch_ok(src, msg.epoch, now, out):
            return
        ballot = (msg.round, msg.node)
        self._max_round = max(self._max_round, msg.round)
        if ballot >= self._promised and msg.value.epoch == msg.epoch:
            self._promised = ballot
            self._accepted = (ballot, msg.value)
            reply: object = Accepted(msg.epoch, msg.round, msg.node)
        else:
            reply = Nack(msg.epoch, msg.round, msg.node, self._promised[0], self._promised[1])
        self._reply(src, reply, now, out)

    def _reply(self, dest: str, msg: object, now: float, out: Output) -> None:
        if dest == self.id:
            _HANDLERS[type(msg)](self, self.id, msg, now, out)
        else:
            self._send(dest, msg, out)

    def _acceptor_epoch_ok(self, src: str, epoch: int, now: float, out: Output) -> bool:
        view = self.view
        if view is None:
            return False
        if epoch <= view.epoch:  # the proposer is behind: help it catch up
            if src != self.id:
                self._send(src, ViewSync(view), out)
            return False
        if epoch > view.epoch + 1:  # we are behind
            self._ask_sync(src, now, out)
            return False
        return True

    def _own_proposal(self, msg: object) -> _Proposal | None:
        prop = self._proposal
        if prop is None:
            return None
        if (msg.epoch, (msg.round, msg.node)) != (prop.epoch, prop.ballot):  # type: ignore[attr-defined]
            return None
        return prop

    def _on_promise(self, src: str, msg: Promise, now: float, out: Output) -> None:
        prop = self._own_proposal(msg)
        if prop is None or prop.value is not None or self.view is None or src not in self.view:
            return
        prop.promises[src] = ((msg.accepted_round, msg.accepted_node), msg.accepted)
        if len(prop.promises) < self.view.quorum:
            return
        # Paxos: adopt the value accepted at the highest ballot, if any
        best = max(prop.promises.values(), key=lambda bv: bv[0])
        if best[1] is not None and best[0][0] >= 0:
            prop.value, prop.reason = best[1], "recovering a proposal of " + best[0][1]
        else:
            desired = self._desired()
            if desired is None:
                self._proposal = None
                return
            prop.value, prop.reason = desired
        prop.deadline = now + self.config.proposal_timeout
        out.events.append(ev.Proposed(prop.value, prop.reason))
        self._broadcast_accept(prop, now, out)

    def _on_accepted(self, src: str, msg: Accepted, now: float, out: Output) -> None:
        prop = self._own_proposal(msg)
        if prop is None or prop.value is None or self.view is None or src not in self.view:
            return
        prop.accepted[src] = True
        if len(prop.accepted) < self.view.quorum:
            return
        value = prop.value
        old = self.view
        self._proposal = None
        commit = Commit(value)
        sent: dict[str, bool] = {self.id: True}
        for m in old.members + value.members:
            if m.id not in sent:
                sent[m.id] = True
                self._send(m.id, commit, out, addr=m.addr)
        self._install(value, now, out)

    def _on_nack(self, src: str, msg: Nack, now: float, out: Output) -> None:
        self._max_round = max(self._max_round, msg.promised_round)
        if self._own_proposal(msg) is not None:
            self._abandon(now)

    def _on_commit(self, src: str, msg: Commit, now: float, out: Output) -> None:
        if self.view is None or msg.view.epoch > self.view.epoch:
            self._install(msg.view, now, out)

    def _on_view_sync(self, src: str, msg: ViewSync, now: float, out: Output) -> None:
        self._on_commit(src, Commit(msg.view), now, out)

    def _on_sync_request(self, src: str, msg: SyncRequest, now: float, out: Output) -> None:
        if self.view is not None and self.view.epoch > msg.epoch and self.phase in (Phase.MEMBER, Phase.LEAVING):
            self._send(src, ViewSync(self.view), out)

    def _on_facts(self, src: str, msg: Facts, now: float, out: Output) -> None:
        self._absorb(src, msg.epoch, msg.facts, now, out)

    def _check_epoch(self, src: str, epoch: int, now: float, out: Output) -> None:
        if self.view is not None and epoch > self.view.epoch:
            self._ask_sync(src, now, out)

    def _ask_sync(self, src: str, now: float, out: Output) -> None:
        if now < self._sync_asked.get(src, 0.0):
            return
        self._sync_asked[src] = now + self.config.probe_interval
        self._send(src, SyncRequest(self.view.epoch if self.view else 0), out)

    # ------------------------------------------------------------ install
    def _install(self, view: View, now: float, out: Output) -> None:
        if self.phase is Phase.JOINING and self.id not in view:
            return  # e.g. a commit meant for the cluster that removed us: keep asking
        old = self.view
        self.view = view
        self._dirty = True
        self._promised = (-1, "")
        self._accepted = None
        if self._proposal is not None and self._proposal.epoch <= view.epoch:
            self._proposal = None
        self._next_proposal_at = 0.0
        for m in view.members:
            if m.addr:
                self._addrs[m.id] = m.addr
        # forget what the view settled, and stop gossiping it
        if old is not None:
            for m in old.members:
                if m.id not in view:
                    self._departed[m.id] = max(m.inc, self._status[m.id].inc if m.id in self._status else 0)
        for m in view.members:
            self._departed.pop(m.id, None)
        for nid in [n for n in self._joins if n in view]:
            del self._joins[nid]
        for nid in [n for n in self._leaves if n not in view]:
            del self._leaves[nid]
        for key in [k for k in self._gossip if (k[0] == JOIN and k[1] in view) or (k[0] == LEAVE and k[1] not in view)]:
            del self._gossip[key]
        for nid in [n for n in self._status if n not in view]:
            del self._status[nid]
            self._failed_reported.pop(nid, None)
            self._link_fails.pop(nid, None)
        for pair in [p for p in self._links if p[0] not in view or p[1] not in view]:
            del self._links[pair]
        # Links: local knowledge wins where we have some (a newer report may
        # still be on its way to the coordinator; the endpoints re-probe down
        # links every period, so a wrong belief corrects itself); the view
        # fills in what we never heard of.
        down = set(view.down_links)
        old_down = set(old.down_links) if old is not None else set()
        for pair in down ^ old_down:  # links this commit changed
            cur = self._links.get(pair)
            up = pair not in down
            if cur is None or cur.up != up:
                self._links[pair] = _LinkState(up, cur.version + 1 if cur else 0, "view")
        for m in view.members:
            st = self._status.get(m.id)
            if m.id != self.id and (st is None or st.inc < m.inc):
                if st is not None and st.state == DEAD:
                    self._failed_reported.pop(m.id, None)
                self._status[m.id] = _Status(ALIVE, m.inc)
        self._dead_nodes = {n: None for n, st in self._status.items() if st.state == DEAD}
        self._suspects = {n: d for n, d in self._suspects.items() if n in view}
        # link events at this end for links the view changed
        for pair in view.down_links:
            if self.id in pair:
                self._emit_link(pair, False, out)
        for pair in [p for p in self._reported_down if p not in down]:
            st = self._links.get(pair)
            if st is None or st.up:
                self._emit_link(pair, True, out)
        # keep the round robin: drop departed members, insert new ones at
        # random places (memberlist's way; a full reshuffle per view is O(n)
        # random draws and dominated the 1,000-node simulation)
        order = [n for n in self._probe_order if n in view]
        known = set(order)
        for m in view.members:
            if m.id != self.id and m.id not in known:
                order.insert(self.rng.randrange(len(order) + 1), m.id)
        self._probe_order = order
        self._probe_pos = min(self._probe_pos, len(order))
        self._probes = {s: p for s, p in self._probes.items() if p.target in view}

        if self.id in view:
            if self.phase is Phase.JOINING:
                self.phase = Phase.MEMBER
                self._next_probe_at = now + self.rng.random() * self.config.probe_interval
            out.events.append(ev.ViewChanged(view))
            self._update_quorum(out)
            return
        # a view without us
        if old is not None and self.id not in old and self.phase is Phase.JOINING:
            return  # a joiner learning an older/unrelated view: keep asking
        graceful = self.phase is Phase.LEAVING
        out.events.append(ev.Removed(view, graceful))
        self._gossip.clear()
        self._probes.clear()
        if graceful or not self.config.auto_rejoin:
            self.phase = Phase.LEFT if graceful else Phase.REMOVED
            return
        self._reset_for_rejoin()
        contacts = [m.addr or m.id for m in view.members]
        self.phase = Phase.JOINING
        self._contacts = contacts
        self._contact_pos = self.rng.randrange(len(contacts)) if contacts else 0
        self._retry_at = now
        self._tick_join(now, out)

    def _reset_for_rejoin(self) -> None:
        self._inc += 1
        self.me = replace(self.me, inc=self._inc)
        self.view = None
        self._status.clear()
        self._suspects.clear()
        self._suspect_heap.clear()
        self._dead_nodes.clear()
        self._joins.clear()
        self._leaves.clear()
        self._links.clear()
        self._link_fails.clear()
        self._relays.clear()
        self._relay_deadline.clear()
        self._reported_down.clear()
        self._failed_reported.clear()
        self.quorate = True

    def _update_quorum(self, out: Output) -> None:
        view = self.view
        if view is None or self.id not in view:
            return
        alive = view.size - len(self._dead_nodes)
        quorate = alive >= view.quorum
        if quorate != self.quorate:
            self.quorate = quorate
            out.events.append(ev.QuorumRegained(view.epoch) if quorate else ev.QuorumLost(view.epoch))

    # ------------------------------------------------------------ sending
    def _epoch(self) -> int:
        return self.view.epoch if self.view else 0

    def _addr_of(self, node: str) -> str:
        return self._addrs.get(node, "")

    def _send(self, node: str, msg: object, out: Output, addr: str = "") -> None:
        out.messages.append((node, addr or self._addr_of(node), msg))

    def _send_to_coordinator(self, msg: object, out: Output) -> None:
        coord = self.coordinator()
        if coord is not None and coord != self.id:
            self._send(coord, msg, out)


def _fact_key(f: Fact) -> tuple:
    if f.kind in (ALIVE, SUSPECT, DEAD):
        return ("s", f.node)
    if f.kind == LINK:
        return ("k",) + link(f.node, f.other)
    return (f.kind, f.node)


_HANDLERS = {
    Ping: Membership._on_ping,
    Ack: Membership._on_ack,
    PingReq: Membership._on_ping_req,
    Prepare: Membership._on_prepare,
    Promise: Membership._on_promise,
    Accept: Membership._on_accept,
    Accepted: Membership._on_accepted,
    Nack: Membership._on_nack,
    Commit: Membership._on_commit,
    ViewSync: Membership._on_view_sync,
    SyncRequest: Membership._on_sync_request,
    JoinRequest: Membership._on_join_request,
    Facts: Membership._on_facts,
}
