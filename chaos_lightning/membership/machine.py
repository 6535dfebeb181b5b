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
majority of its view's voters alive.  When the partition heals it learns of
the newer epoch from the first probe that crosses, sees it was removed, and
joins again (``Config.auto_rejoin``), so there is again a single view.

Three inputs from the layers around it (issue 14; the rules are in
``agreement.py``, "Who votes"):

* :meth:`Membership.mark_synced` — this process completed a state sync.
  Joiners of a trained cluster are *learners* (they do not vote) until
  then; a learner's report promotes it by the next view change.
* :meth:`Membership.peer_refused` — a connection to a member's own address
  was refused: proof that the process of that slot is gone (evidence for
  that incarnation only, voided by any sign of its life).  With exactly half
  of the voters proven dead, the other half commits alone: two members, one
  killed, the survivor goes on and admits newcomers.  Timeouts prove
  nothing: a minority waits (``Config.allow_minority`` to go on anyway).
  The proof also confirms the failure at once (no suspicion period), and
  the coordinator proposes the view without it in the same call.
* :meth:`Membership.suspect` — a collective with that node failed in the
  data plane: probe it now (direct, then indirect), rate-limited.  A live
  node answers and nothing changes; a dead one's address refuses, which is
  the proof above.
"""

from __future__ import annotations

import random
from dataclasses import dataclass, field, replace
from enum import Enum

from chaos_lightning.membership import events as ev
from chaos_lightning.membership import policy
from chaos_lightning.membership.agreement import Agreement
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.detector import Detector, MemberStatus
from chaos_lightning.membership.gossip import Dissemination
from chaos_lightning.membership.messages import (
    ALIVE,
    DEAD,
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
    SYNCED,
    StaleIncarnation,
    SyncRequest,
    ViewSync,
)
from chaos_lightning.membership.view import Member, View

__all__ = ["Membership", "Output", "Phase"]

#: certified commits a node keeps to walk a peer that is behind through the
#: epochs it missed (one ``Commit`` per epoch; a peer further behind than
#: this gives its slot up and rejoins as a new incarnation)
HISTORY = 32
#: commits per ``ViewSync``: at 1,000 members a view is ~40 kB on the wire
SYNC_CHAIN = 8
#: a joiner's contact addresses at most: the configured seeds plus members
#: that probed it (each a live member of the cluster it is joining)
MAX_CONTACTS = 32
#: addresses kept for senders that are neither members nor join candidates
#: (enough to answer them; an LRU, so forged ids cannot grow it)
STRANGERS = 256
#: pending "sync asked" marks (each expires after one probe period)
SYNC_MARKS = 256


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
        self._lost_proven: int | None = None  # proven-dead voters last reported lost (None: quorate)

        self._inc = me.inc  # our incarnation: raised to refute suspicion or to rejoin
        self._addrs: dict[str, str] = {}
        self.detector = Detector(self)
        self.gossip = Dissemination(self)
        self.agreement = Agreement(self)

        self._contacts: list[str] = []
        self._contact_pos = 0
        self._retry_at = 0.0  # join / leave request retry
        # node -> when we may ask it for a sync again; insertion order is
        # expiry order, so expired and excess marks are dropped from the front
        self._sync_asked: dict[str, float] = {}
        # addresses of senders outside the view and the pending joins, LRU
        self._strangers: dict[str, str] = {}
        # epoch -> the certified Commit that chose it, the last HISTORY epochs
        self._history: dict[int, Commit] = {}
        # the certified commit that removed us, while we join again
        self._removed_by: Commit | None = None
        # member -> the incarnation of its slot that is proven dead (its own
        # address refused a connection, or a newer incarnation now listens
        # there); voided by any sign of life of that slot.  Members only.
        self._proofs: dict[str, int] = {}
        # this incarnation completed its state sync (Agent.mark_synced)
        self._synced = False
        self._synced_retry_at = float("inf")  # a learner re-sends SYNCED until promoted
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
            StaleIncarnation: self._on_stale_incarnation,
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
        cfg = self.config  # the size policy is the founder's, carried by every later view
        self._install(View(1, (self.me,), target_nodes=cfg.target_nodes, max_nodes=cfg.max_nodes), now, out)
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

    def rejoin(self, now: float) -> Output:
        """Ask to be let in again, as a new incarnation, after leaving or being
        removed (``LEFT``/``REMOVED``): through the members of the view that
        let us go.  For a node that stepped aside while its training thread
        was stuck and whose trainer is back (the strategy's fence): it is a
        newcomer now, and must sync (and say so) like one."""
        out = Output()
        if self.phase in (Phase.LEFT, Phase.REMOVED) and self.view is not None:
            self._rejoin(self.view, now, out)
        return out

    def mark_synced(self, now: float) -> Output:
        """This process completed a state sync: it holds the trained state.

        A learner is then promoted to voter by the next view change (it
        reports it to the coordinator, again every ``join_retry`` until a view
        promotes it); a voter's report makes the cluster *trained*, so
        joiners enter as learners from then on.  Idempotent; called before
        admission, it takes effect with the view that admits us.  A rejoin
        (a new incarnation) forgets it: that process must sync again."""
        out = Output()
        self._synced = True
        self._report_synced(now, out)
        return out

    def _report_synced(self, now: float, out: Output) -> None:
        view = self.view
        if not self._synced or self.phase not in _ACTIVE or view is None or not self._holds_slot(view):
            return
        self._learn(Fact(SYNCED, self.id, self.me.inc), now, out, from_self=True)
        if view.is_learner(self.id):
            self._synced_retry_at = now + self.config.join_retry
        else:
            self._synced_retry_at = float("inf")

    @property
    def learner(self) -> bool:
        """Is this node a learner of its view (admitted, not voting yet)?"""
        return self.view is not None and self.view.is_learner(self.id)

    def next_deadline(self) -> float:
        """When :meth:`tick` next has work to do (the caller may tick earlier)."""
        if self.phase in _INERT:
            return float("inf")
        if self.phase is Phase.JOINING:
            return self._retry_at  # (pending joins it heard of expire at its retries)
        t = min(self.detector.next_deadline(), self.agreement.next_deadline(), self._synced_retry_at,
                self.gossip.next_expiry())
        if self.phase is Phase.LEAVING:
            t = min(t, self._retry_at)
        return t

    def tick(self, now: float) -> Output:
        out = Output()
        if self.phase is Phase.JOINING:
            self.gossip.expire(now)
            self._tick_join(now, out)
            return out
        if self.phase not in _ACTIVE:
            return out
        self.detector.tick(now, out)
        self.agreement.tick(now)
        # before the proposer looks: a proposal computed from here on never
        # admits a joiner that stopped asking (a standby that died waiting)
        self.expire_joins(now, out)
        if self.phase is Phase.LEAVING and now >= self._retry_at:
            self._retry_at = now + self.config.join_retry
            self._send_to_coordinator(Facts(self._epoch(), (Fact(LEAVE, self.id, self._inc),)), out)
        if now >= self._synced_retry_at:
            if self.learner:  # not promoted yet: the coordinator may have missed it
                self._synced_retry_at = now + self.config.join_retry
                self._send_to_coordinator(Facts(self._epoch(), (Fact(SYNCED, self.id, self.me.inc),)), out)
            else:
                self._synced_retry_at = float("inf")
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

    def peer_refused(self, node: str, addr: str, now: float) -> Output:
        """A connection to ``addr``, the address a member listens on, was
        refused (TCP RST, ``ConnectionRefusedError``): its host answered and
        nothing listens there, so the process of that member's slot is gone.

        Evidence for that slot (that incarnation) only, kept until a sign of
        life of the slot voids it (any message from it but a join or sync
        request, an indirect ack, a refutation).  It lowers the quorum only
        in a tie (see ``agreement.py``, "Proof of death"), and it confirms
        the member's failure at once (issue 14: no suspicion period; the
        fact goes to the coordinator, which proposes the view without it in
        its next call).  With ``proof_of_death`` off it only makes the
        machine probe the node at once.  ``node`` may be "" (the transport
        did not know who listens there): the view's addresses say."""
        out = Output()
        view = self.view
        if self.phase not in _ACTIVE or view is None or not addr:
            return out
        if not self.config.proof_of_death:
            if node in view:
                self.detector.hint(node, now, out)
            return out
        if node not in view or view.addr(node) != addr:
            node = next((x.id for x in view.members if x.addr == addr), "")
        if not node or node == self.id:
            return out
        inc = view.member(node).inc
        if self._proofs.get(node) != inc:
            self._proofs[node] = inc
            self._update_quorum(out)
        # Proof of death confirms the failure at once (issue 14): no
        # suspicion period, since the process that could refute it is gone
        # (a new process on that address is a new incarnation, and a live
        # slot that was wrongly refused refutes "dead" like any suspicion).
        # Told to the coordinator directly, which proposes the view without
        # it in its next call: one round, not probe period plus suspicion.
        d = self.detector
        st = d.status.get(node)
        if st is not None and not d.dead(node):
            self._learn(Fact(DEAD, node, max(st.inc, inc)), now, out, from_self=True)
            d._my_suspicions.pop(node, None)
        else:
            d.hint(node, now, out)
        self._maybe_propose(now, out)
        return out

    def suspect(self, node: str, now: float) -> Output:
        """The data plane saw a collective with ``node`` fail (a gloo
        "Connection closed by peer", a reset, a timeout): probe it *now*,
        directly and then through ``indirect_probes`` helpers, instead of at
        its turn in the round robin (issue 14).

        Evidence, not a verdict: a live node answers and nothing changes
        (one probe spent); a dead one's address refuses the connect, which
        the transport reports as :meth:`peer_refused` and which confirms the
        failure at once (the coordinator then proposes the view without it
        immediately, failures are never batched); silence takes the normal
        way (suspicion, then its timeout), since a timeout proves nothing.
        Rate-limited in the detector (one suspicion probe per node per
        probe period, a few per period in all): a flood of suspicions does
        not turn into a probe storm.  Unknown nodes, ourselves and nodes
        already confirmed dead are ignored."""
        out = Output()
        if self.phase in _ACTIVE and self.view is not None and node in self.view:
            self.detector.suspect(node, now, out)
        return out

    def proven_dead(self) -> tuple[str, ...]:
        """The voters of the current view whose slot is proven dead and that
        the detector does not believe alive, in rank order."""
        view, proofs = self.view, self._proofs
        if view is None or not proofs:
            return ()
        alive = self.detector.alive
        found = [v for v, inc in proofs.items() if view.is_voter(v) and view.member(v).inc == inc and not alive(v)]
        return tuple(sorted(found, key=view.rank))  # from the (few) proofs: this runs in the deciding call

    def alive_sign(self, node: str, out: Output) -> None:
        """The slot of ``node`` answered (through a helper, or a refutation):
        a refusal seen earlier proves nothing."""
        if self._proofs.pop(node, None) is not None:
            self._update_quorum(out)

    def receive(self, src: str, src_addr: str, msg: object, now: float) -> Output:
        """Handle one message from ``src`` (its address ``src_addr``)."""
        out = Output()
        if src_addr and src and src != self.id:
            self._note_addr(src, src_addr)
        if self.phase in _INERT:
            return out
        if src in self._proofs and type(msg) not in (JoinRequest, SyncRequest, StaleIncarnation):
            # a message from the slot's process (a new process under the id
            # only asks to join or to sync): the refusal was not its death
            self._proofs.pop(src, None)
            self._update_quorum(out)
        if self.phase is Phase.JOINING and type(msg) is JoinRequest and src and src != self.id:
            # asked to let someone in while joining ourselves: it took us
            # for a member, so a view may list us whose Commit we missed
            self._ask_sync(src, now, out)
            return out
        if self.phase is Phase.JOINING and type(msg) in (Ping, PingReq, Ack):
            # a joiner holds no slot: an ack from it would vouch for the slot
            # of a previous process under the same id, which is gone.  A probe
            # does say a view may list us (our Commit was lost): ask for it.
            # And the prober is a live member of the cluster we are joining:
            # ask it to let us in too.  A new process under a member's id is
            # probed by members still holding the old slot, and its request
            # is their proof that the slot is gone; without it, a coordinator
            # whose only other proofs came from refusals could not reach the
            # tie quorum (the simulator's seed 602, ``lan``: the new
            # process's configured peers were others, one of them crashed)
            if src and src != self.id:
                self._ask_sync(src, now, out)
                addr = src_addr or self._addr_of(src)
                if addr and addr not in self._contacts and len(self._contacts) < MAX_CONTACTS:
                    self._contacts.append(addr)
                    out.messages.append((src, addr, JoinRequest(self.me)))
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

    def _coordinators(self) -> list[str]:
        """The coordinator and its successor, the member that coordinates
        if it dies (the next one this node believes alive), in rank order."""
        if self.view is None:
            return []
        dead = self.detector.dead
        found = []
        for m in self.view.members:
            if m.id == self.id or not dead(m.id):
                found.append(m.id)
                if len(found) == 2:
                    break
        return found

    # ------------------------------------------------------------ joining
    def expire_joins(self, now: float, out: Output) -> None:
        """Drop the pending joins not heard for ``join_expiry``; the
        coordinator reports each (:class:`~.events.JoinExpired`), as it
        reports the standbys it holds."""
        gone = self.gossip.expire(now)
        if gone and self.coordinator() == self.id:
            for x in gone:
                out.events.append(ev.JoinExpired(x.id, self.config.join_expiry))

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
        self._note_addr(m.id, m.addr)
        if m.id in self.view:
            slot = self.view.member(m.id).inc
            if m.inc == slot:  # in already (its Commit was lost): tell it
                self._sync_reply(m.id, 0, out, addr=m.addr)
                return
            if m.inc < slot:
                return  # a request from an earlier life, delivered late
            if (m.addr and m.addr == self.view.addr(m.id) and self.config.proof_of_death
                    and self._proofs.get(m.id) != slot):
                # a newer process listens on the slot's own address: the
                # slot's process no longer holds it, so it is gone (one
                # listener per address: the agent binds without SO_REUSEPORT)
                self._proofs[m.id] = slot
                self._update_quorum(out)
            # a higher incarnation: a new process under a member's id.  It is
            # a new node, never synced into the old slot (whose acceptor state
            # died with the old process); gossip removes the old slot first.
        fact = Fact(JOIN, m.id, 0, member=m)
        if m.inc <= self.gossip.departed.get(m.id, -1):
            # admitted and removed without ever hearing of it: tell it to
            # come back as a new incarnation (stale join gossip stays refused)
            self._send(m.id, StaleIncarnation(self.gossip.departed[m.id]), out, addr=m.addr)
            return
        if not self._learn(fact, now, out, from_self=True):
            # known already, yet the joiner is still asking: the coordinator
            # may never have heard (a lost Facts, a coordinator that changed);
            # each retry of the joiner is forwarded once.  Its successor hears
            # it too: a pending join expires where it is not heard for
            # ``join_expiry``, and the member that takes over from a dead
            # coordinator must still hold the live standbys, so that the view
            # without the coordinator admits one (one view change, not two)
            msg = Facts(self._epoch(), (fact,))
            for dest in self._coordinators():
                if dest != self.id:
                    self._send(dest, msg, out)

    def _on_stale_incarnation(self, src: str, msg: StaleIncarnation, now: float, out: Output) -> None:
        if self.phase is Phase.JOINING and self.view is None and self.me.inc <= msg.inc:
            self._inc = max(self._inc, msg.inc) + 1
            self.me = replace(self.me, inc=self._inc)
            self._retry_at = now
            self._tick_join(now, out)

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
        """Install a chosen view, if this node can tell it is one.

        A joiner (no view) installs a view that lists it under its own
        incarnation: it holds no acceptor state to check against, and that
        view is its admission.  A member of view ``e`` installs only a
        Commit of epoch ``e + 1`` that :meth:`Agreement.certifies`; anything
        further ahead, or refused, makes it ask ``src`` for the certified
        chain instead (``SyncRequest`` -> ``ViewSync``)."""
        view = self.view
        if view is None or self.phase is Phase.JOINING:
            if self._holds_slot(msg.view):
                self._install(msg.view, now, out, msg if msg.round >= 0 else None)
            return
        if msg.view.epoch <= view.epoch:
            return
        if self.agreement.certifies(msg):
            self._install(msg.view, now, out, msg)
        else:
            self._ask_sync(src, now, out)

    def _on_view_sync(self, src: str, msg: ViewSync, now: float, out: Output) -> None:
        view = self.view
        if view is None or self.phase is Phase.JOINING:
            cert = next((c for c in msg.commits if c.view == msg.view), None)
            self._on_commit(src, cert or Commit(msg.view), now, out)
            return
        if msg.view.epoch <= view.epoch:
            return
        moved = connected = False
        for c in sorted(msg.commits, key=lambda c: c.view.epoch):
            if self.view is None or self.phase not in _ACTIVE:
                return  # a commit removed us: we are joining again
            if c.view.epoch <= self.view.epoch:
                continue
            if c.view.epoch != self.view.epoch + 1:
                break
            connected = True
            if not self.agreement.certifies(c):
                break
            self._install(c.view, now, out, c)
            moved = True
        if self.view is None or self.phase not in _ACTIVE or self.view.epoch >= msg.view.epoch:
            return
        if moved:
            self._ask_sync(src, now, out, force=True)  # the next stretch of the chain
        elif not connected:
            # The sender no longer keeps the commits after our epoch: nobody
            # can prove to us how the cluster moved on.  Rather than install
            # an unverifiable view, give our slot up and join again as a new
            # incarnation (the old slot is removed by a majority first).
            self._give_up_slot(now, out)

    def _on_sync_request(self, src: str, msg: SyncRequest, now: float, out: Output) -> None:
        if self.view is not None and self.view.epoch > msg.epoch and self.phase in _ACTIVE:
            self._sync_reply(src, msg.epoch, out)
            return
        c = self._removed_by
        if self.phase is Phase.JOINING and c is not None and src in c.view and msg.epoch < c.view.epoch:
            self._send(src, ViewSync(c.view, (c,)), out)

    def _sync_reply(self, dest: str, their_epoch: int, out: Output, addr: str = "") -> None:
        """Our view, with the certified commits from ``their_epoch + 1`` on."""
        chain = []
        e = their_epoch + 1
        while e in self._history and len(chain) < SYNC_CHAIN:
            chain.append(self._history[e])
            e += 1
        assert self.view is not None
        self._send(dest, ViewSync(self.view, tuple(chain)), out, addr=addr)

    def _give_up_slot(self, now: float, out: Output) -> None:
        assert self.view is not None
        view = self.view
        out.events.append(ev.Removed(view, False))
        self.gossip.stop()
        self.detector.stop()
        self._rejoin(view, now, out)

    def _holds_slot(self, view: View) -> bool:
        """Does ``view`` list this process (its id *and* its incarnation)?  A
        slot under an older incarnation belongs to a previous process under
        our id, whose acceptor state is lost: never ours to vote with."""
        return self.id in view and view.member(self.id).inc == self.me.inc

    def _check_epoch(self, src: str, epoch: int, now: float, out: Output) -> None:
        if self.view is not None and epoch > self.view.epoch:
            self._ask_sync(src, now, out)

    def _ask_sync(self, src: str, now: float, out: Output, *, force: bool = False) -> None:
        asked = self._sync_asked
        if not force and now < asked.get(src, 0.0):
            return
        asked.pop(src, None)
        asked[src] = now + self.config.probe_interval
        while asked and (len(asked) > SYNC_MARKS or next(iter(asked.values())) <= now):
            del asked[next(iter(asked))]
        self._send(src, SyncRequest(self.view.epoch if self.view else 0), out)

    # ------------------------------------------------------------ addresses
    def _note_addr(self, node: str, addr: str) -> None:
        """Remember where ``node`` is.  Members and join candidates go to the
        address book, which each view prunes; anyone else (a node at another
        epoch, a stranger) to a small LRU, so 20,000 forged sender ids cost
        at most ``STRANGERS`` entries (issue 15: +20 MB, kept, before)."""
        if not addr:
            return
        if (self.view is not None and node in self.view) or node in self.gossip.joins:
            self._addrs[node] = addr
            return
        strangers = self._strangers
        strangers.pop(node, None)
        strangers[node] = addr
        if len(strangers) > STRANGERS:
            del strangers[next(iter(strangers))]

    # ------------------------------------------------------------ install
    def _install(self, view: View, now: float, out: Output, cert: Commit | None = None) -> None:
        if self.phase is Phase.JOINING and not self._holds_slot(view):
            return  # e.g. a commit meant for the cluster that removed us: keep asking
        old = self.view
        self.view = view
        self._removed_by = None
        self.agreement.on_view(view)
        if cert is not None:
            self._history[view.epoch] = cert
            while len(self._history) > HISTORY:
                del self._history[next(iter(self._history))]
        # the address book: members and pending joins only
        book = {m.id: m.addr for m in view.members if m.addr}
        for nid in self.gossip.joins:
            a = self._addrs.get(nid)
            if a and nid not in book:
                book[nid] = a
        self._addrs = book
        for nid in [n for n, inc in self._proofs.items() if n not in view or view.member(n).inc != inc]:
            del self._proofs[nid]
        # the order matters: departures are recorded with the incarnation the
        # detector knew, before it forgets the departed
        self.gossip.on_view(view, old)
        self.detector.on_view(view, old, now, out)

        if self._holds_slot(view):
            if self.phase is Phase.JOINING:
                self.phase = Phase.MEMBER
                self.detector.start(now)
            out.events.append(ev.ViewChanged(view))
            if self.id in policy.surplus(view) and self.phase is Phase.MEMBER:
                out.events.append(ev.Retire(view, f"above max_nodes={view.max_nodes} ({view.size} members): "
                                                  "the newest members retire first"))
            self._update_quorum(out)
            if self._synced:  # news only if not reported yet; a promotion ends the retries
                self._report_synced(now, out)
            return
        # a view without us
        if old is not None and not self._holds_slot(old) and self.phase is Phase.JOINING:
            return  # a joiner learning an older/unrelated view: keep asking
        graceful = self.phase is Phase.LEAVING
        out.events.append(ev.Removed(view, graceful))
        self.gossip.stop()
        self.detector.stop()
        if graceful or not self.config.auto_rejoin:
            self.phase = Phase.LEFT if graceful else Phase.REMOVED
            return
        self._rejoin(view, now, out)

    def _rejoin(self, view: View, now: float, out: Output) -> None:
        removed_by = self._history.get(view.epoch)
        self._reset_for_rejoin()
        # kept while we join: the members of the view that removed us may be
        # joining themselves, never told they were in it (its Commit lost to
        # them, the proposer gone): we ask them to let us in, and hand them
        # that certified commit when they ask us for a sync
        self._removed_by = removed_by
        contacts = [m.addr or m.id for m in view.members if m.id != self.id]
        if not contacts:
            self.phase = Phase.REMOVED
            return
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
        self._history.clear()
        self._proofs.clear()
        self._synced = False  # a new incarnation: it must sync (and say so) again
        self._synced_retry_at = float("inf")
        self.quorate = True
        self._lost_proven = None

    def _update_quorum(self, out: Output) -> None:
        """Report a change of the quorum flag: can the voters this node
        believes alive commit the next view (under the strict rule: a
        majority, or all the others when half the voters are proven dead)?"""
        view = self.view
        if view is None or self.id not in view:
            return
        voters = view.voter_count
        alive = voters - self.detector.dead_voters(view)
        _, need = self.agreement.quorum_rule(minority=False)
        quorate = alive >= need
        if quorate != self.quorate:
            self.quorate = quorate
            if quorate:
                self._lost_proven = None
                out.events.append(ev.QuorumRegained(view.epoch))
                return
        if quorate:
            return
        # Lost: reported at the transition, and again when more of the lost
        # voters are proven dead (a suspicion timeout may declare a voter
        # dead before its address refuses us: the proof that no voter is
        # left, which the layer above stops on, can come after the loss).
        proven = len(self.proven_dead())
        first = self._lost_proven is None
        if first or proven > self._lost_proven:
            out.events.append(ev.QuorumLost(view.epoch, alive, voters, proven, self.config.allow_minority))
        self._lost_proven = proven

    # ------------------------------------------------------------ sending
    def _epoch(self) -> int:
        return self.view.epoch if self.view else 0

    def _addr_of(self, node: str) -> str:
        return self._addrs.get(node) or self._strangers.get(node, "")

    def _send(self, node: str, msg: object, out: Output, addr: str = "") -> None:
        out.messages.append((node, addr or self._addr_of(node), msg))

    def _send_to_coordinator(self, msg: object, out: Output) -> None:
        coord = self.coordinator()
        if coord is not None and coord != self.id:
            self._send(coord, msg, out)
