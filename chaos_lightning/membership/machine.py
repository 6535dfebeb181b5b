"""The membership protocol of one node, as a sans-IO state machine.

What this file owns: the node's life cycle (:class:`Phase`: joining, member,
leaving, left or removed), its incarnation, the view it holds and how a view
is installed, the quorum flag, catching up on missed commits
(``SyncRequest``/``ViewSync``), the address book, and the dispatch of every
message to the part that handles it.  The protocol's three parts live in
their own modules, each owning its state and its reset:

* :mod:`~chaos_lightning.membership.detector` — failure and link detection
  (SWIM: direct probe, indirect probe through k helpers, suspicion,
  incarnation numbers to refute it; a direct probe that fails while an
  indirect one succeeds is a link-down between two live nodes, a direct
  success on such a link a link-up);
* :mod:`~chaos_lightning.membership.gossip` — dissemination: the facts this
  node knows and the piggyback queue that spreads them;
* :mod:`~chaos_lightning.membership.agreement` — view agreement (one Paxos
  instance per epoch, whose acceptors are the members of the previous view,
  so only a majority of that view can commit the next one).

:class:`Membership` composes them and is the only thing the agent and the
simulator call.

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

import random
from dataclasses import dataclass, field, replace
from enum import Enum

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.agreement import Agreement
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.detector import Detector, MemberStatus
from chaos_lightning.membership.gossip import Dissemination
from chaos_lightning.membership.messages import (
    ALIVE,
    JOIN,
    LEAVE,
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
from chaos_lightning.membership.view import Member, View

__all__ = ["Membership", "Output", "Phase"]


class Phase(Enum):
    IDLE = "idle"  # constructed, not started
    JOINING = "joining"  # asking contacts to be let in
    MEMBER = "member"
    LEAVING = "leaving"  # asked to leave, still a member until a view drops it
    LEFT = "left"  # a view without us committed after we asked to leave
    REMOVED = "removed"  # dropped against our will, auto_rejoin off


_ACTIVE = (Phase.MEMBER, Phase.LEAVING)
_INERT = (Phase.IDLE, Phase.LEFT, Phase.REMOVED)


@dataclass
class Output:
    """What one call into the machine asks the caller to do."""

    #: (destination node id, its address or "", message)
    messages: list[tuple[str, str, object]] = field(default_factory=list)
    events: list[object] = field(default_factory=list)
    #: (peer, seconds) round trips of direct probes, for the monitor
    rtt: list[tuple[str, float]] = field(default_factory=list)


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

        self._inc = me.inc  # our incarnation: raised to refute suspicion or to rejoin
        self._addrs: dict[str, str] = {}
        self.detector = Detector(self)
        self.gossip = Dissemination(self)
        self.agreement = Agreement(self)

        self._contacts: list[str] = []
        self._contact_pos = 0
        self._retry_at = 0.0  # join / leave request retry
        self._sync_asked: dict[str, float] = {}
        d, g, a = self.detector, self.gossip, self.agreement
        self._handlers = {
            Ping: d.on_ping,
            Ack: d.on_ack,
            PingReq: d.on_ping_req,
            Prepare: a.on_prepare,
            Promise: a.on_promise,
            Accept: a.on_accept,
            Accepted: a.on_accepted,
            Nack: a.on_nack,
            Commit: self._on_commit,
            ViewSync: self._on_view_sync,
            SyncRequest: self._on_sync_request,
            JoinRequest: self._on_join_request,
            Facts: lambda src, msg, now, out: g.absorb(src, msg.epoch, msg.facts, now, out),
        }

    # -- read by tests, the agent's status and the monitor
    @property
    def rtt(self) -> dict[str, float]:
        """Smoothed round trip of direct probes, per peer (seconds)."""
        return self.detector.rtt

    @property
    def _status(self) -> dict[str, MemberStatus]:
        return self.detector.status

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
        if self.phase in _INERT:
            return float("inf")
        if self.phase is Phase.JOINING:
            return self._retry_at
        t = min(self.detector.next_deadline(), self.agreement.next_deadline())
        if self.phase is Phase.LEAVING:
            t = min(t, self._retry_at)
        return t

    def tick(self, now: float) -> Output:
        out = Output()
        if self.phase is Phase.JOINING:
            self._tick_join(now, out)
            return out
        if self.phase not in _ACTIVE:
            return out
        self.detector.tick(now, out)
        self.agreement.tick(now)
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
        if self.phase in _ACTIVE and self.view is not None and node in self.view:
            self.detector.hint(node, now, out)
        return out

    def receive(self, src: str, src_addr: str, msg: object, now: float) -> Output:
        """Handle one message from ``src`` (its address ``src_addr``)."""
        out = Output()
        if src_addr and src and src != self.id:
            self._addrs[src] = src_addr
        if self.phase in _INERT:
            return out
        handler = self._handlers.get(type(msg))
        if handler is None:
            return out  # the wire schema admits only known types; be safe anyway
        handler(src, msg, now, out)
        if self.phase in _ACTIVE:
            self._maybe_propose(now, out)
        return out

    def coordinator(self) -> str | None:
        """The member this node believes drives view changes now."""
        if self.view is None:
            return None
        dead = self.detector.dead
        for m in self.view.members:
            # a leaving member still coordinates (its own exit, typically):
            # skipping it would make nodes disagree on who coordinates
            if m.id == self.id or not dead(m.id):
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
        if self.view is None or self.phase not in _ACTIVE:
            return
        m = msg.member
        self._addrs[m.id] = m.addr
        if m.id in self.view:
            out.messages.append((m.id, m.addr, ViewSync(self.view)))
            return
        self._learn(Fact(JOIN, m.id, 0, member=m), now, out, from_self=True)

    # ------------------------------------------------------------ facts
    def _learn(self, fact: Fact, now: float, out: Output, *, from_self: bool = False) -> bool:
        return self.gossip.learn(fact, now, out, from_self=from_self)

    def _absorb(self, src: str, epoch: int, facts: tuple[Fact, ...], now: float, out: Output) -> None:
        self.gossip.absorb(src, epoch, facts, now, out)

    def _take_gossip(self, about: str = "") -> tuple[Fact, ...]:
        """Facts to piggyback; a message to a suspected node leads with the
        suspicion, so the accused hears it (and can refute) first."""
        return self.gossip.take(self.detector.buddy(about) if about else ())

    def _refute(self, f: Fact) -> None:
        """Gossip says we are suspected or dead: we are alive, with a newer incarnation."""
        if f.kind != ALIVE and f.inc >= self._inc and self.phase in _ACTIVE:
            self._inc = f.inc + 1
            self.gossip.enqueue(Fact(ALIVE, self.id, self._inc))

    def _maybe_propose(self, now: float, out: Output) -> None:
        if self.phase in _ACTIVE:
            self.agreement.maybe_propose(now, out)

    # ------------------------------------------------------------ catching up
    def _on_commit(self, src: str, msg: Commit, now: float, out: Output) -> None:
        if self.view is None or msg.view.epoch > self.view.epoch:
            self._install(msg.view, now, out)

    def _on_view_sync(self, src: str, msg: ViewSync, now: float, out: Output) -> None:
        self._on_commit(src, Commit(msg.view), now, out)

    def _on_sync_request(self, src: str, msg: SyncRequest, now: float, out: Output) -> None:
        if self.view is not None and self.view.epoch > msg.epoch and self.phase in _ACTIVE:
            self._send(src, ViewSync(self.view), out)

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
        self.agreement.on_view(view)
        for m in view.members:
            if m.addr:
                self._addrs[m.id] = m.addr
        # the order matters: departures are recorded with the incarnation the
        # detector knew, before it forgets the departed
        self.gossip.on_view(view, old)
        self.detector.on_view(view, old, now, out)

        if self.id in view:
            if self.phase is Phase.JOINING:
                self.phase = Phase.MEMBER
                self.detector.start(now)
            out.events.append(ev.ViewChanged(view))
            self._update_quorum(out)
            return
        # a view without us
        if old is not None and self.id not in old and self.phase is Phase.JOINING:
            return  # a joiner learning an older/unrelated view: keep asking
        graceful = self.phase is Phase.LEAVING
        out.events.append(ev.Removed(view, graceful))
        self.gossip.stop()
        self.detector.stop()
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
        """Join again as a new incarnation, knowing nothing of the old cluster."""
        self._inc += 1
        self.me = replace(self.me, inc=self._inc)
        self.view = None
        self.detector.reset()
        self.gossip.reset()
        self.agreement.reset()
        self.quorate = True

    def _update_quorum(self, out: Output) -> None:
        view = self.view
        if view is None or self.id not in view:
            return
        alive = view.size - len(self.detector.dead_nodes)
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
