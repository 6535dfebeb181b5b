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

Rules that keep it safe across faults (issue 15; each has a scenario in
``tests/test_membership_safety.py``):

* **A slot is (id, incarnation).**  A process votes only in the slot that
  the view lists under its own incarnation.  A process restarted under the
  same id (ids default to the bind address) starts with no acceptor state
  and a new incarnation (the agent's boot timestamp), so it is a *new node*:
  it is never synced into its old slot, never votes for it, and never takes
  the round-0 fast path for an epoch it has no acceptor state for.  Its join
  request makes every member treat the old slot as dead; a view without the
  old slot commits (by a majority of the view that held it) before the new
  incarnation is added.  Without this the restarted rank 0 re-used ballot
  ``(0, itself)`` with amnesia and epoch 3 was committed twice.
* **One value per ballot.**  An acceptor that accepted ``(b, v)`` refuses
  ``(b, v')`` with ``v' != v`` (only another life of b's proposer can send it).
* **Commits are checked, not trusted** (:meth:`Agreement.certifies`): a
  member of view ``e`` installs only a view of epoch ``e + 1`` whose
  certificate (ballot, majority of ``e``) agrees with what it accepted
  itself; a node further behind walks the chain of certified commits one
  epoch at a time (``ViewSync.commits``), or, when nobody keeps that chain
  any more, gives its slot up and joins as a new incarnation.
* **A handled deadline is never returned again**: after :meth:`tick` at
  ``now``, :meth:`next_deadline` is later than ``now`` (the simulator checks
  it after every tick).

Who votes (issue 14; scenarios in ``tests/test_membership_quorum.py``):

* **Only voters count.**  A view lists its *learners*: members admitted
  after the cluster trained whose state sync is not done.  The acceptors of
  epoch ``e + 1`` are the voters of view ``e``; Prepare and Accept go to
  them only, a learner answers neither, and a Commit's quorum must be
  voters.  A learner's report (``SYNCED``, :meth:`Membership.mark_synced`)
  promotes it by the next view change (batched like joins).  Founders of a
  fresh cluster (no member has reported a sync yet: ``View.trained`` false)
  join as voters.

* **Proof of death.**  A connection to a member's own address refused
  (``peer_refused``: the host answered with a reset, nothing listens on the
  port) proves that the process of that slot is gone; so does a newer
  incarnation listening on that very address (one listener per address).
  The proof concerns the slot (id, incarnation) that was there, never a
  later incarnation under the id, and any sign of life of the slot voids it
  (a message from it other than a join or sync request, an ack relayed by a
  helper, a refutation).  What it buys is exactly this
  (:meth:`View.quorum_without`): when *exactly half* of an even number of
  voters is proven dead, the proposal needs all of the other half (in both
  phases) instead of a majority; otherwise the majority rule stands.  Why
  no more: a dead voter may have accepted a value before it died, so every
  quorum must still meet every majority of the voters.  All the voters not
  proven dead meet every majority exactly when the dead are at most half;
  two such "all the others" quorums, fixed at each proposal's start, can
  only miss each other if each side's proof named the other side, and a
  slot once dead never acts again, so whichever proposal came later would
  have been made by a dead slot.  Three voters with two killed at once
  therefore still wait: the two may have chosen a view without the survivor
  before dying (its Commit lost), which nobody alive can know.  The
  certificate lists the dead it relied on (``Commit.dead``) and the other
  voters check the rule.  Soundness rests on a refusal meaning "no process
  listens": a firewall that *rejects* makes a partition look like death
  (``Config.proof_of_death`` turns the rule off there).

* **A minority waits, unless told not to.**  Where only timeouts are seen
  the rule is the majority, and a node that believes fewer voters alive
  than it needs reports ``QuorumLost`` once (the agent logs "this node is
  in a minority (k of n reachable); waiting for the majority to return").
  ``Config.allow_minority`` lets it go on with a majority of the voters it
  believes alive: availability over safety, since under a real partition
  both sides do so (split brain; documented with the option).

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
from chaos_lightning.membership import policy
from chaos_lightning.membership.messages import Accept, Accepted, Commit, Nack, Prepare, Promise
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
    synced: Mapping[str, int] | None = None,
) -> tuple[View, str] | None:
    """The view after ``view`` that the pending facts call for, with its
    reason; None when they call for no change (or for an empty view).

    ``synced`` (member -> incarnation) are the members that reported their
    state sync done: a learner among them is promoted to voter; any of them
    makes the next view *trained* (joiners enter as learners from then on).
    That alone calls for no view change: it rides on the next one."""
    # from the (few) pending changes, not a scan of all n members: this runs
    # in the call that decides, whose time the paper bounds at 1 ms
    remove = [n for n in {**leaves, **dead} if n in view]
    add = [m for nid, m in joins.items() if nid not in view]
    if add:  # the size policy: the rest stay pending joins (standbys)
        add, _held = policy.admit(view, view.size - len(remove), add)
    synced = synced or {}
    gone = set(remove)
    promote = [
        n for n in view.learners if n not in gone and n in synced and synced[n] == view.member(n).inc
    ]
    trained = view.trained or any(n in view and n not in gone for n in synced)
    current_down = set(view.down_links)
    down, up = [], []
    for pair, st in links.items():
        if pair[0] not in view or pair[1] not in view:
            continue
        if not st.up and pair not in current_down:
            down.append(pair)
        elif st.up and pair in current_down:
            up.append(pair)
    if not (remove or add or down or up or promote):
        return None
    reasons = []
    if add:
        reasons.append("join " + ",".join(m.id for m in add))
    if promote:
        reasons.append("promote " + ",".join(promote))
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
    nxt = view.with_changes(add=add, remove=remove, down=down, up=up, promote=promote, trained=trained)
    if not nxt.members:
        return None
    return nxt, "; ".join(reasons)


def held_joins(view: View, joins: Mapping[str, Member], leaves: Mapping[str, object],
               dead: Mapping[str, object]) -> list[Member]:
    """The pending joiners that :func:`next_view` leaves out under the size
    policy (the standbys), for the coordinator's log."""
    if policy.capacity(view) is None:
        return []
    staying = view.size - sum(1 for n in {**leaves, **dead} if n in view)
    return policy.admit(view, staying, [m for nid, m in joins.items() if nid not in view])[1]


@dataclass
class Proposal:
    epoch: int
    ballot: Ballot
    value: View | None  # None while preparing
    reason: str
    deadline: float
    #: voters held dead for this proposal's quorum (fixed at its start:
    #: promises and accepts are counted against one rule) and the count needed
    dead: tuple[str, ...] = ()
    need: int = 0
    promises: dict[str, tuple[Ballot, View | None]] = field(default_factory=dict)
    accepted: dict[str, bool] = field(default_factory=dict)

    def counts(self, view: View, src: str) -> bool:
        """Does an answer from ``src`` count towards this proposal's quorum?"""
        return view.is_voter(src) and src not in self.dead


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
        #: (node, incarnation) of the standbys this node reported holding (bounded below)
        self._held_reported: dict[tuple[str, int], bool] = {}

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
        g = m.gossip
        return next_view(m.view, g.joins, g.leaves, m.detector.dead_nodes, m.detector.links, g.synced)

    def _report_held(self, out: "Output") -> None:
        """A ``Held`` event for each standby this coordinator has not reported yet."""
        m = self._m
        view = m.view
        assert view is not None
        g = m.gossip
        for x in held_joins(view, g.joins, g.leaves, m.detector.dead_nodes):
            key = (x.id, x.inc)
            if key in self._held_reported:
                continue
            self._held_reported[key] = True
            while len(self._held_reported) > 1024:  # standbys that went away long ago
                del self._held_reported[next(iter(self._held_reported))]
            out.events.append(ev.Held(x.id, f"the view has {view.size} members, at its {policy.describe(view)}; "
                                            f"{x.id} waits as a standby"))

    def forget_held(self, x: Member) -> None:
        """A pending join expired: if it asks again, it is held (and reported) anew."""
        self._held_reported.pop((x.id, x.inc), None)

    def quorum_rule(self, *, minority: bool | None = None) -> tuple[tuple[str, ...], int]:
        """(voters held dead, answers needed) for a proposal made now.

        A majority of the voters while enough of them are believed alive.
        Otherwise, when exactly half of an even number of voters is *proven*
        dead, all the others (:meth:`View.quorum_without`).  Otherwise, with
        ``allow_minority`` (``minority``; default: the config), a majority
        of the voters not believed dead: availability over safety, a
        partition then splits the cluster.  Otherwise a majority, which the
        proposal will not get: the node waits for the majority to return."""
        m = self._m
        view = m.view
        assert view is not None
        # from the (few) dead, not a scan of the n voters: this runs in the deciding call
        alive = view.voter_count - m.detector.dead_voters(view)
        if alive >= view.quorum:
            return (), view.quorum
        proven = m.proven_dead()
        need = view.quorum_without(len(proven))
        if need < view.quorum:
            # every voter not proven dead must answer, even one this node
            # believes dead (a verdict of gossip is no proof: it may answer)
            return proven, need
        if m.config.allow_minority if minority is None else minority:
            voters = view.voters
            believed = m.detector.dead_nodes
            gone = tuple(v for v in voters if v in believed or v in proven)  # rare: a scan is fine
            return gone, (len(voters) - len(gone)) // 2 + 1
        return (), view.quorum

    # ------------------------------------------------------------ proposer
    def maybe_propose(self, now: float, out: "Output") -> None:
        """Propose the next view if we coordinate and the facts call for one
        (the caller checked that we are a member)."""
        m = self._m
        if self.proposal is not None or m.view is None:
            return
        if not self.dirty or now < self.next_proposal_at or m.coordinator() != m.id:
            return
        # whatever call brought us here (a tick, a message): a joiner not
        # heard asking for join_expiry is no candidate of this proposal
        m.expire_joins(now, out)
        if m.gossip.joins and policy.capacity(m.view) is not None:
            self._report_held(out)
        desired = self.desired()
        if desired is None:
            self.dirty = False
            self.next_proposal_at = 0.0
            return
        value, reason = desired
        # joins (and promotions) are batched: nodes started together, or
        # joiners whose pulls end together, enter in one view change
        parts = [r.split(" ", 1)[0] for r in reason.split("; ")]
        if all(p in ("join", "promote") for p in parts):
            g = m.gossip
            since = [g.joins_since] if "join" in parts else []
            since += [g.promotes_since] if "promote" in parts else []
            batch_end = min(since) + m.config.join_batch
            if now < batch_end:
                self.next_proposal_at = batch_end
                return
        view = m.view
        epoch = view.epoch + 1
        cfg = m.config
        dead, need = self.quorum_rule()
        first = view.members[0].id == m.id and self.promised <= (0, m.id) and self.accepted is None
        if first and self.round0_used != epoch:
            self.round0_used = epoch
            prop = Proposal(epoch, (0, m.id), value, reason, now + cfg.proposal_timeout, dead, need)
            self.proposal = prop
            out.events.append(ev.Proposed(value, reason))
            self._broadcast_accept(prop, now, out)
        else:
            self.max_round += 1
            ballot = (self.max_round, m.id)
            prop = Proposal(epoch, ballot, None, reason, now + cfg.proposal_timeout, dead, need)
            self.proposal = prop
            msg = Prepare(epoch, ballot[0], ballot[1])
            for x in view.members:
                if not view.is_voter(x.id) or x.id in dead:
                    continue  # only the acceptors: the voters (a learner does not vote)
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
        view = m.view
        skip = bool(view.learners or prop.dead)
        for x in view.members:
            if skip and not prop.counts(view, x.id):
                continue  # not an acceptor of this instance
            if x.id == me:
                self.on_accept(me, msg, now, out)
            else:
                send((x.id, x.addr, msg))  # the hot loop of a decision: no lookups

    def tick(self, now: float) -> None:
        prop = self.proposal
        if prop is not None and now >= prop.deadline:
            self._abandon(now)
        elif self.next_proposal_at and now >= self.next_proposal_at:
            # The retry (or join batch) time has come, and this tick is its
            # handling: maybe_propose runs right after it and either proposes
            # or sets a new, future time.  Either way a handled deadline is
            # never returned again: a node that is no longer coordinator kept
            # it and the driver spun on it (issue 15: 40,948 ticks/s).
            self.next_proposal_at = 0.0

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
        if prop is None or prop.value is not None or m.view is None or not prop.counts(m.view, src):
            return
        prop.promises[src] = ((msg.accepted_round, msg.accepted_node), msg.accepted)
        if len(prop.promises) < prop.need:
            return
        # Paxos: adopt the value accepted at the highest ballot, if any
        best = max(prop.promises.values(), key=lambda bv: bv[0])
        if best[1] is not None and best[0][0] >= 0:
            prop.value, prop.reason = best[1], "recovering a proposal of " + best[0][1]
        else:
            m.expire_joins(now, out)  # a value computed now: no expired joiner in it
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
        if prop is None or prop.value is None or m.view is None or not prop.counts(m.view, src):
            return
        prop.accepted[src] = True
        if len(prop.accepted) < prop.need:
            return
        value = prop.value
        old = m.view
        self.proposal = None
        commit = Commit(value, prop.ballot[0], prop.ballot[1], tuple(prop.accepted), prop.dead)
        sent: dict[str, bool] = {m.id: True}
        for x in old.members + value.members:
            if x.id not in sent:
                sent[x.id] = True
                m._send(x.id, commit, out, addr=x.addr)
        m._install(value, now, out, commit)

    def on_nack(self, src: str, msg: Nack, now: float, out: "Output") -> None:
        self.max_round = max(self.max_round, msg.promised_round)
        if self._own(msg) is not None:
            self._abandon(now)

    # ------------------------------------------------------------ acceptor
    def on_prepare(self, src: str, msg: Prepare, now: float, out: "Output") -> None:
        if not self._epoch_ok(src, msg.epoch, now, out) or not self._voter():
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
        if not self._epoch_ok(src, msg.epoch, now, out) or not self._voter():
            return
        ballot = (msg.round, msg.node)
        self.max_round = max(self.max_round, msg.round)
        acc = self.accepted
        # one value per ballot: a second value at the ballot we accepted can
        # only come from another life of its proposer (ballot (0, x) reused
        # by a restarted x), and accepting it would un-choose the first
        same_ballot_other_value = acc is not None and acc[0] == ballot and acc[1] != msg.value
        if ballot >= self.promised and msg.value.epoch == msg.epoch and not same_ballot_other_value:
            self.promised = ballot
            self.accepted = (ballot, msg.value)
            reply: object = Accepted(msg.epoch, msg.round, msg.node)
        else:
            reply = Nack(msg.epoch, msg.round, msg.node, self.promised[0], self.promised[1])
        self._reply(src, reply, now, out)

    # ------------------------------------------------------------ learner
    def certifies(self, c: Commit) -> bool:
        """May this member of view ``e`` install ``c`` (a view of epoch
        ``e + 1``)?  What is checked, and why it is enough:

        1. the epoch is exactly ``e + 1``: a view is only ever learned from
           its predecessor (a node further behind catches up one certified
           epoch at a time through ``ViewSync``; a forged epoch 10^9 never
           connects to our view and is dropped);
        2. the ballot's proposer is a member of view ``e`` (round 0 only for
           its rank 0) and ``quorum`` is a majority of view ``e``, without
           repeats: only a majority of ``e`` can choose ``e + 1``;
        3. it agrees with our own acceptor state: if we are named in the
           quorum we accepted at that ballot or above; and if we accepted at
           that ballot or above, it was this value (Paxos: once a value is
           chosen at ballot b, every value accepted at b or higher is that
           value).  A Commit contradicting what this node itself accepted is
           never installed.

        What it cannot check is a lie about other acceptors: the peers are
        authenticated (HMAC on the cluster secret) and assumed to follow the
        protocol (crash faults, stale, replayed or corrupt messages, not a
        malicious insider holding the secret).  Under that model every
        Commit that passes was produced by a proposer that saw ``quorum``
        accept it, so installing it is what Paxos' learner would do."""
        m = self._m
        view = m.view
        v = c.view
        if view is None or v.epoch != view.epoch + 1:
            return False
        ballot = (c.round, c.node)
        if c.round < 0 or c.node not in view or (c.round == 0 and view.members[0].id != c.node):
            return False
        q, dead = c.quorum, c.dead
        if len(set(dead)) != len(dead) or any(not view.is_voter(x) for x in dead) or m.id in dead:
            return False  # (we are alive: a proof of our death was wrong)
        if m.config.allow_minority:
            need = (view.voter_count - len(dead)) // 2 + 1
        else:
            need = view.quorum_without(len(dead))
        if len(q) < need or len(set(q)) != len(q) or any(not view.is_voter(x) or x in dead for x in q):
            return False
        acc = self.accepted
        if acc is not None and acc[0] >= ballot and acc[1] != v:
            return False
        if m.id in q and (acc is None or acc[0] < ballot):
            return False
        return True

    def _voter(self) -> bool:
        """Is this node an acceptor of the next epoch (a voter of its view)?"""
        m = self._m
        return m.view is not None and m.view.is_voter(m.id)

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
                m._sync_reply(src, epoch - 1, out)
            return False
        if epoch > view.epoch + 1:  # we are behind
            m._ask_sync(src, now, out)
            return False
        return True
