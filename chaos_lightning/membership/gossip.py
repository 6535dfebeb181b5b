"""Dissemination: how one node learns facts and spreads them.

What this file owns:

* :meth:`Dissemination.learn`, the one door through which any fact enters
  the node, whether it was observed here (a probe's verdict, a join request,
  our own leave) or heard from a peer; :meth:`absorb` filters what peers
  piggyback (only gossip from our own epoch counts, join requests aside);
* the fact table of requested changes: pending joins (each dropped when its
  joiner has not been heard asking for ``Config.join_expiry`` seconds: a
  standby that died while it waited is never admitted), pending leaves, the
  members that reported their state sync done (``synced``: a learner among
  them is promoted to voter by the next view; a voter among them makes the
  cluster *trained*, so later joiners enter as learners), and the
  incarnation each departed node had (so stale join gossip cannot re-add a
  node that just left); status and link facts are applied by the detector,
  which owns those tables;
* the retransmit queue (SWIM's infection-style dissemination): each new fact
  rides on the next ``retransmits(n)`` messages, at most ``max_piggyback``
  per message, round robin;
* the refutation of a suspicion of ourselves, which is gossip too.

What it never does: decide a view, probe, or send anything but the direct
``Facts`` message to the coordinator (that a coordinator acts on a fact it
never hears of would cost a gossip round).  It reads the current view, the
node's id, phase and config from the
:class:`~chaos_lightning.membership.machine.Membership` that composes it.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from chaos_lightning.membership.messages import (
    DEAD,
    JOIN,
    LEAVE,
    LINK,
    STATUS_KINDS,
    SYNCED,
    Fact,
    Facts,
)
from chaos_lightning.membership.view import Member, View, link

if TYPE_CHECKING:  # the composing machine; imported for annotations only
    from chaos_lightning.membership.machine import Membership, Output

#: departed ids remembered (see ``Dissemination.departed``)
DEPARTED = 1024

#: facts a coordinator acts on: the node that observed one sends it there directly
_FOR_COORDINATOR = (DEAD, JOIN, LEAVE, LINK, SYNCED)


def fact_key(f: Fact) -> tuple:
    """The slot a fact occupies in the queue: a newer fact on the same subject
    (another status of one node, another version of one link) replaces it."""
    if f.kind in STATUS_KINDS:
        return ("s", f.node)
    if f.kind == LINK:
        return ("k",) + link(f.node, f.other)
    return (f.kind, f.node)


class Dissemination:
    """The facts one node knows and the queue that spreads them."""

    def __init__(self, node: "Membership"):
        self._m = node
        # key -> [fact, transmits left]; handed out round robin: taken from the
        # front, re-inserted at the back (O(1) per fact, even with hundreds queued)
        self.queue: dict[tuple, list] = {}
        self.joins: dict[str, Member] = {}
        self.joins_since = 0.0  # when the oldest pending join arrived
        # pending joiner -> [when it first asked, when it was last heard
        # asking] (a JoinRequest, or its JOIN fact again by gossip or a
        # forward).  Kept in the order of the latter, a hearing moves the
        # joiner to the back: expiry looks at the front only (O(1) per tick,
        # however many standbys wait).  The same keys as ``joins``.
        self.asked: dict[str, list[float]] = {}
        self.leaves: dict[str, bool] = {}
        # member -> the incarnation in which it reported its state sync done
        # (members only: pruned at each view)
        self.synced: dict[str, int] = {}
        self.promotes_since = 0.0  # when the oldest pending promotion arrived
        # node -> incarnation it had when a view removed it: a JOIN fact for an
        # incarnation at or below is stale gossip (the node left or was
        # removed), not a request; without this an old join fact re-adds a
        # node that just left, and the cluster flips between the two views.
        # Survives a rejoin: the stale gossip is still around then.
        self.departed: dict[str, int] = {}

    def reset(self) -> None:
        """Forget the pending changes of a cluster we were removed from."""
        self.queue.clear()
        self.joins.clear()
        self.asked.clear()
        self.leaves.clear()
        self.synced.clear()

    def stop(self) -> None:
        """A view without us: nobody left to gossip to."""
        self.queue.clear()

    # ------------------------------------------------------------ learning
    def learn(self, fact: Fact, now: float, out: "Output", *, from_self: bool = False) -> bool:
        """Apply ``fact``; if it was news, gossip it (and, if we originated a
        fact the coordinator acts on, send it there directly)."""
        m = self._m
        if not self._apply(fact, now, out):
            return False
        m.agreement.dirty = True
        self.enqueue(fact)
        if from_self and fact.kind in _FOR_COORDINATOR and m.coordinator() != m.id:
            m._send_to_coordinator(Facts(m._epoch(), (fact,)), out)
        return True

    def absorb(self, src: str, epoch: int, facts: tuple[Fact, ...], now: float, out: "Output") -> None:
        """Learn gossip, but only from a member of our own epoch: a node on
        the far side of a healed partition still carries its verdicts on us
        ("dead") from a view that no longer exists.  Join requests are the
        exception; they are harmless and a joiner has no epoch."""
        view = self._m.view
        same = view is not None and epoch == view.epoch and src in view
        for f in facts:
            if same or f.kind == JOIN:
                self.learn(f, now, out)

    def _apply(self, f: Fact, now: float, out: "Output") -> bool:
        m = self._m
        view = m.view
        if f.kind in STATUS_KINDS:
            if f.node == m.id:
                m._refute(f)
                return False
            return m.detector.apply_status(f, now, out)
        if f.kind == JOIN:
            x = f.member
            if x is None or x.id != f.node:
                return False
            pending = self.joins.get(x.id)
            if pending is not None and pending.inc >= x.inc:
                if pending.inc == x.inc:  # the joiner still asks: not news, but alive
                    self._heard(x.id, now)
                return False
            if x.inc <= self.departed.get(x.id, -1):
                return False
            if view is not None and x.id in view:
                slot = view.member(x.id)
                if x.inc <= slot.inc:
                    return False  # the member itself, or an earlier life of it
                # A process restarted under a member's id (a higher
                # incarnation) is a new node: the old process and its
                # acceptor state are gone, so its slot is dead, and a view
                # without it commits (by a majority of the old view) before
                # the new one is added (next_view adds only ids not in the view).
                st = m.detector.status.get(x.id)
                m._learn(Fact(DEAD, x.id, max(slot.inc, st.inc if st else 0)), now, out, from_self=True)
            if not self.joins:
                self.joins_since = now
            self.joins[f.node] = x
            self.asked.pop(f.node, None)  # a new incarnation asks anew
            self.asked[f.node] = [now, now]
            if x.addr:
                m._addrs.setdefault(x.id, x.addr)
            return True
        if f.kind == LEAVE:
            if view is None or f.node not in view or f.node in self.leaves:
                return False
            self.leaves[f.node] = True
            return True
        if f.kind == LINK:
            return m.detector.apply_link(f, out)
        if f.kind == SYNCED:
            # only the member's own slot counts: a report from an earlier
            # life (or a later one, not admitted yet) says nothing of it
            if view is None or f.node not in view or view.member(f.node).inc != f.inc:
                return False
            if self.synced.get(f.node) == f.inc:
                return False
            if view.is_learner(f.node) and not self.pending_promotions():
                self.promotes_since = now
            self.synced[f.node] = f.inc
            return True
        return False

    # ------------------------------------------------------------ expiry
    def _heard(self, nid: str, now: float) -> None:
        """The pending joiner ``nid`` was heard asking again: to the back."""
        entry = self.asked.pop(nid)
        entry[1] = now
        self.asked[nid] = entry

    def next_expiry(self) -> float:
        """When the pending join heard from longest ago expires (inf: none,
        or expiry off)."""
        ttl = self._m.config.join_expiry
        if ttl <= 0 or not self.asked:
            return float("inf")
        return next(iter(self.asked.values()))[1] + ttl

    def expire(self, now: float) -> list[Member]:
        """Drop the pending joins not heard asking for ``join_expiry``
        seconds, and everything kept for them alone: their queued gossip
        (else this node would teach the join again to nodes that dropped
        it), their address (unless a member holds that id) and the
        coordinator's note that it reported them held.  A proposal computed
        from now on cannot admit them; one asked again later is news again.
        The dropped joins, in the order they were last heard."""
        ttl = self._m.config.join_expiry
        asked = self.asked
        if ttl <= 0 or not asked:
            return []
        gone = []
        while asked:
            nid, (_, last) = next(iter(asked.items()))
            if now < last + ttl:
                break
            del asked[nid]
            gone.append(self.joins.pop(nid))
        if not gone:
            return []
        m = self._m
        view = m.view
        for x in gone:
            self.queue.pop((JOIN, x.id), None)
            if view is None or x.id not in view:
                m._addrs.pop(x.id, None)
            m.agreement.forget_held(x)
        self._rebase_joins_since()
        m.agreement.dirty = True  # (removing a candidate never calls for a view; cheap to confirm)
        return gone

    def _rebase_joins_since(self) -> None:
        """``joins_since`` after joins left the table: the first request of
        the oldest one still pending (batching measures from it)."""
        if self.asked:
            self.joins_since = min(first for first, _ in self.asked.values())

    def pending_promotions(self) -> bool:
        """Does a learner of the current view wait for its promotion?"""
        view = self._m.view
        return view is not None and any(view.is_learner(n) for n in self.synced)

    # ------------------------------------------------------------ spreading
    def enqueue(self, fact: Fact) -> None:
        view = self._m.view
        n = view.size if view else 1
        self.queue[fact_key(fact)] = [fact, self._m.config.retransmits(n)]

    def take(self, lead: tuple[Fact, ...] = ()) -> tuple[Fact, ...]:
        """Facts to piggyback on one message: ``lead`` first, then up to
        ``max_piggyback`` from the front of the queue, each sent to the back
        until its retransmits are spent."""
        items = self.queue
        if not items:
            return lead
        limit = self._m.config.max_piggyback
        chosen = []
        for k in items:
            chosen.append(k)
            if len(chosen) >= limit:
                break
        facts = []
        for k in chosen:
            entry = items.pop(k)
            facts.append(entry[0])
            entry[1] -= 1
            if entry[1] > 0:
                items[k] = entry  # to the back of the queue
        return lead + tuple(facts)

    # ------------------------------------------------------------ views
    def on_view(self, view: View, old: View | None) -> None:
        """Forget what ``view`` settled, and stop gossiping it."""
        status = self._m.detector.status
        if old is not None:
            for x in old.members:
                if x.id not in view:
                    self.departed[x.id] = max(x.inc, status[x.id].inc if x.id in status else 0)
        for x in view.members:
            self.departed.pop(x.id, None)
        # bounded: stale join gossip lives retransmits(n) messages (seconds);
        # the oldest departures are long past it
        while len(self.departed) > DEPARTED:
            del self.departed[next(iter(self.departed))]

        def admitted(x: Member | None) -> bool:  # a join this view settled
            return x is not None and x.id in view and view.member(x.id).inc >= x.inc

        settled_joins = [n for n, x in self.joins.items() if admitted(x)]
        for nid in settled_joins:
            del self.joins[nid]
            del self.asked[nid]
        if settled_joins:
            self._rebase_joins_since()
        for nid in [n for n in self.leaves if n not in view]:
            del self.leaves[nid]
        for nid in [n for n, inc in self.synced.items() if n not in view or view.member(n).inc != inc]:
            del self.synced[nid]
        def settled(k: tuple, f: Fact) -> bool:
            if k[0] == JOIN:
                return admitted(f.member)
            if k[0] == LEAVE:
                return k[1] not in view
            if k[0] == SYNCED:  # promoted, or the view says trained: nothing left to ask for
                return k[1] not in view or (view.trained and not view.is_learner(k[1]))
            return False

        for key in [k for k, e in self.queue.items() if settled(k, e[0])]:
            del self.queue[key]

