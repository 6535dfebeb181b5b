"""View agreement: one Paxos instance per epoch, acceptor and proposer of one node.

What this file owns: the decision of the next view.  The acceptors of epoch
``e + 1`` are the members of view ``e``, so only a majority of that view can
commit the next one (no split brain).

* :func:`next_view`, pure: the view that the pending facts call for (joins
  appended, leaves and confirmed failures removed, link changes applied) and
  the reason, in words, that the ``Proposed`` event carries;
* the acceptor: the highest ballot promised and the value accepted for the
  next epoch (``Prepare`` -> ``Promise``/``Nack``, ``Accept`` ->
  ``Accepted``/``Nack``);
* the proposer: when to propose (only as coordinator, joins batched for
  ``join_batch``), the ballot (``(0, us)`` skips the prepare phase, and only
  the rank-0 member may use it, once per epoch), the value (Paxos: a value a
  majority may have accepted is re-proposed), the majority count, the
  ``proposal_timeout`` and the randomized backoff after a failed attempt, and
  the ``Commit`` to old and new members.

What it never does: observe failures or links, spread facts, or install a
view itself (a committed value goes to :meth:`Membership._install`).  It
reads the current view, the node's id, config, rng, quorum flag and pending
facts from the :class:`~chaos_lightning.membership.machine.Membership` that
composes it, and sends through it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Mapping

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.messages import Accept, Accepted, Commit, Nack, Prepare, Promise, ViewSync
from chaos_lightning.membership.view import Member, View

if TYPE_CHECKING:  # the composing machine; imported for annotations only
    from chaos_lightning.membership.detector import LinkState
    from chaos_lightning.membership.machine import Membership, Output

Ballot = tuple[int, str]

#: below every real ballot: nothing promised yet
NO_BALLOT: Ballot = (-1, "")


def next_view(
    view: View,
    joins: Mapping[str, Member],
    leaves: Mapping[str, object],
    dead: Mapping[str, object],
    links: Mapping[tuple[str, str], "LinkState"],
) -> tuple[View, str] | None:
    """The view after ``view`` that the pending facts call for, with its
    reason; None when they call for no change (or for an empty view)."""
    # from the (few) pending changes, not a scan of all n members: this runs
    # in the call that decides, whose time the paper bounds at 1 ms
    remove = [n for n in {**leaves, **dead} if n in view]
    add = [m for nid, m in joins.items() if nid not in view]
    current_down = set(view.down_links)
    down, up = [], []
    for pair, st in links.items():
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
    gone = [r for r in remove if r in leaves]
    if gone:
        reasons.append("leave " + ",".join(gone))
    failed = [r for r in remove if r not in leaves]
    if failed:
        reasons.append("failure " + ",".join(failed))
    if down:
        reasons.append("link-down " + ",".join(f"{a}-{b}" for a, b in down))
    if up:
        reasons.append("link-up " + ",".join(f"{a}-{b}" for a, b in up))
    nxt = view.with_changes(add=add, remove=remove, down=down, up=up)
    if not nxt.members:
        return None
    return nxt, "; ".join(reasons)


@dataclass
class Proposal:
    epoch: int
    ballot: Ballot
    value: View | None  # None while preparing
    reason: str
    deadline: float
    promises: dict[str, tuple[Ballot, View | None]] = field(default_factory=dict)
    accepted: dict[str, bool] = field(default_factory=dict)


class Agreement:
    """The acceptor and the proposer of one node for the next epoch."""

    def __init__(self, node: "Membership"):
        self._m = node
        #: facts changed since the proposer last looked
        self.dirty = False
        # acceptor state for epoch view.epoch + 1
        self.promised: Ballot = NO_BALLOT
        self.accepted: tuple[Ballot, View] | None = None
        # proposer state
        self.proposal: Proposal | None = None
        self.next_proposal_at = 0.0
        # kept across epochs (and rejoins): rounds only grow, so a ballot of
        # ours is never reused, and ballot (0, us) is spent once per epoch
        self.max_round = 0
        self.round0_used = 0  # the epoch for which we spent ballot (0, us)
        self._handlers = {Promise: self.on_promise, Accepted: self.on_accepted, Nack: self.on_nack}

    def on_view(self, view: View) -> None:
        """A view was installed: a new Paxos instance (for ``view.epoch + 1``)."""
        self.dirty = True
        self.promised = NO_BALLOT
        self.accepted = None
        if self.proposal is not None and self.proposal.epoch <= view.epoch:
            self.proposal = None
        self.next_proposal_at = 0.0

    def reset(self) -> None:
        """Before joining another cluster: nothing of this instance counts."""
        self.dirty = True
        self.promised = NO_BALLOT
        self.accepted = None
        self.proposal = None
        self.next_proposal_at = 0.0

    def next_deadline(self) -> float:
        if self.proposal is not None:
            return self.proposal.deadline
        return self.next_proposal_at if self.next_proposal_at > 0 else float("inf")

    def desired(self) -> tuple[View, str] | None:
        m = self._m
        assert m.view is not None
        return next_view(m.view, m.gossip.joins, m.gossip.leaves, m.detector.dead_nodes, m.detector.links)

    # ------------------------------------------------------------ proposer
    def maybe_propose(self, now: float, out: "Output") -> None:
        """Propose the next view if we coordinate and the facts call for one
        (the caller checked that we are a member)."""
        m = self._m
        if self.proposal is not None or m.view is None:
            return
        if not self.dirty or now < self.next_proposal_at or m.coordinator() != m.id:
            return
        desired = self.desired()
        if desired is None:
            self.dirty = False
            self.next_proposal_at = 0.0
            return
        value, reason = desired
        batch_end = m.gossip.joins_since + m.config.join_batch
        if reason.startswith("join") and ";" not in reason and now < batch_end:
            self.next_proposal_at = batch_end
            return
        view = m.view
        epoch = view.epoch + 1
        cfg = m.config
        first = view.members[0].id == m.id and self.promised <= (0, m.id) and self.accepted is None
        if first and self.round0_used != epoch:
            self.round0_used = epoch
            prop = Proposal(epoch, (0, m.id), value, reason, now + cfg.proposal_timeout)
            self.proposal = prop
            out.events.append(ev.Proposed(value, reason))
            self._broadcast_accept(prop, now, out)
        else:
            self.max_round += 1
            ballot = (self.max_round, m.id)
            prop = Proposal(epoch, ballot, None, reason, now + cfg.proposal_timeout)
            self.proposal = prop
            msg = Prepare(epoch, ballot[0], ballot[1])
            for x in view.members:
                if x.id == m.id:
                    self.on_prepare(m.id, msg, now, out)
                else:
                    m._send(x.id, msg, out)

    def _broadcast_accept(self, prop: Proposal, now: float, out: "Output") -> None:
        m = self._m
        assert m.view is not None and prop.value is not None
        msg = Accept(prop.epoch, prop.ballot[0], prop.ballot[1], prop.value)
        send = out.messages.append
        me = m.id
        for x in m.view.members:
            if x.id == me:
                self.on_accept(me, msg, now, out)
            else:
                send((x.id, x.addr, msg))  # the hot loop of a decision: no lookups

    def tick(self, now: float) -> None:
        prop = self.proposal
        if prop is not None and now >= prop.deadline:
            self._abandon(now)

    def _abandon(self, now: float) -> None:
        """Give the proposal up; retry after a randomized backoff so two
        would-be coordinators do not keep pre-empting each other."""
        m = self._m
        self.proposal = None
        self.dirty = True
        backoff = m.config.proposal_timeout * (0.5 + m.rng.random())
        if not m.quorate:
            backoff *= 4  # hopeless until the partition heals: keep traffic low
        self.next_proposal_at = now + backoff

    def _own(self, msg: Promise | Accepted | Nack) -> Proposal | None:
        prop = self.proposal
        if prop is None or (msg.epoch, (msg.round, msg.node)) != (prop.epoch, prop.ballot):
            return None
        return prop

    def on_promise(self, src: str, msg: Promise, now: float, out: "Output") -> None:
        m = self._m
        prop = self._own(msg)
        if prop is None or prop.value is not None or m.view is None or src not in m.view:
            return
        prop.promises[src] = ((msg.accepted_round, msg.accepted_node), msg.accepted)
        if len(prop.promises) < m.view.quorum:
            return
        # Paxos: adopt the value accepted at the highest ballot, if any
        best = max(prop.promises.values(), key=lambda bv: bv[0])
        if best[1] is not None and best[0][0] >= 0:
            prop.value, prop.reason = best[1], "recovering a proposal of " + best[0][1]
        else:
            desired = self.desired()
            if desired is None:
                self.proposal = None
                return
            prop.value, prop.reason = desired
        prop.deadline = now + m.config.proposal_timeout
        out.events.append(ev.Proposed(prop.value, prop.reason))
        self._broadcast_accept(prop, now, out)

    def on_accepted(self, src: str, msg: Accepted, now: float, out: "Output") -> None:
        m = self._m
        prop = self._own(msg)
        if prop is None or prop.value is None or m.view is None or src not in m.view:
            return
        prop.accepted[src] = True
        if len(prop.accepted) < m.view.quorum:
            return
        value = prop.value
        old = m.view
        self.proposal = None
        commit = Commit(value)
        sent: dict[str, bool] = {m.id: True}
        for x in old.members + value.members:
            if x.id not in sent:
                sent[x.id] = True
                m._send(x.id, commit, out, addr=x.addr)
        m._install(value, now, out)

    def on_nack(self, src: str, msg: Nack, now: float, out: "Output") -> None:
        self.max_round = max(self.max_round, msg.promised_round)
        if self._own(msg) is not None:
            self._abandon(now)

    # ------------------------------------------------------------ acceptor
    def on_prepare(self, src: str, msg: Prepare, now: float, out: "Output") -> None:
        if not self._epoch_ok(src, msg.epoch, now, out):
            return
        ballot = (msg.round, msg.node)
        self.max_round = max(self.max_round, msg.round)
        if ballot >= self.promised:
            self.promised = ballot
            acc = self.accepted
            reply: object = Promise(
                msg.epoch, msg.round, msg.node, acc[0][0] if acc else -1, acc[0][1] if acc else "", acc[1] if acc else None
            )
        else:
            reply = Nack(msg.epoch, msg.round, msg.node, self.promised[0], self.promised[1])
        self._reply(src, reply, now, out)

    def on_accept(self, src: str, msg: Accept, now: float, out: "Output") -> None:
        if not self._epoch_ok(src, msg.epoch, now, out):
            return
        ballot = (msg.round, msg.node)
        self.max_round = max(self.max_round, msg.round)
        if ballot >= self.promised and msg.value.epoch == msg.epoch:
            self.promised = ballot
            self.accepted = (ballot, msg.value)
            reply: object = Accepted(msg.epoch, msg.round, msg.node)
        else:
            reply = Nack(msg.epoch, msg.round, msg.node, self.promised[0], self.promised[1])
        self._reply(src, reply, now, out)

    def _reply(self, dest: str, msg: object, now: float, out: "Output") -> None:
        m = self._m
        if dest == m.id:  # we are proposer and acceptor: no message to ourselves
            self._handlers[type(msg)](m.id, msg, now, out)
        else:
            m._send(dest, msg, out)

    def _epoch_ok(self, src: str, epoch: int, now: float, out: "Output") -> bool:
        m = self._m
        view = m.view
        if view is None:
            return False
        if epoch <= view.epoch:  # the proposer is behind: help it catch up
            if src != m.id:
                m._send(src, ViewSync(view), out)
            return False
        if epoch > view.epoch + 1:  # we are behind
            m._ask_sync(src, now, out)
            return False
        return True
