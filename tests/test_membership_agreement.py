"""View agreement on its own: next_view, the acceptor and the proposer of one machine.

The machine plays one node; the tests play the other acceptors by hand.
"""

from __future__ import annotations

import random

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.agreement import NO_BALLOT, next_view
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.detector import LinkState
from chaos_lightning.membership.machine import Membership, Output, Phase
from chaos_lightning.membership.messages import (
    DEAD,
    LEAVE,
    Accept,
    Accepted,
    Commit,
    Fact,
    Nack,
    Prepare,
    Promise,
)
from chaos_lightning.membership.view import Member, View

CFG = Config.preset("lan")
IDS = ["a", "b", "c", "d", "e"]
V2 = View(2, tuple(Member(i, i) for i in IDS))


def member_of(me: str, view: View = V2) -> Membership:
    m = Membership(Member(me, me), CFG, rng=random.Random(0))
    m.join([view.members[0].id], 0.0)
    m.receive(view.members[0].id, "", Commit(view), 0.0)
    assert m.phase is Phase.MEMBER
    return m


def sent(out: Output, kind: type) -> list[tuple[str, object]]:
    return [(dst, msg) for dst, _, msg in out.messages if isinstance(msg, kind)]


def test_next_view_applies_every_pending_change_and_says_why():
    links = {("a", "b"): LinkState(False, 1, "a")}
    nxt, reason = next_view(V2, {"j": Member("j")}, {"c": True}, {"d": None}, links)
    assert nxt.epoch == 3 and nxt.ids == ("a", "b", "e", "j")
    assert nxt.down_links == (("a", "b"),)
    assert reason == "join j; leave c; failure d; link-down a-b"
    assert next_view(V2, {}, {}, {}, {}) is None
    assert next_view(View(1, (Member("a"),)), {}, {"a": True}, {}, {}) is None, "never an empty view"


def test_rank_0_skips_prepare_and_commits_with_a_majority():
    m = member_of("a")
    out = Output()
    m.gossip.learn(Fact(LEAVE, "e", 0), 1.0, out)
    out = m.tick(1.0)
    proposed = [e for e in out.events if isinstance(e, ev.Proposed)]
    assert proposed and proposed[0].view.ids == ("a", "b", "c", "d")
    accepts = sent(out, Accept)
    assert sorted(d for d, _ in accepts) == ["b", "c", "d", "e"] and not sent(out, Prepare)
    acc = accepts[0][1]
    assert (acc.round, acc.node) == (0, "a")
    # our own Accepted counts: two more make 3 of 5
    m.receive("b", "b", Accepted(3, 0, "a"), 1.01)
    out = m.receive("c", "c", Accepted(3, 0, "a"), 1.02)
    assert m.view.epoch == 3 and m.view.ids == ("a", "b", "c", "d")
    assert sorted(d for d, _ in sent(out, Commit)) == ["b", "c", "d", "e"], "old and new members hear the commit"


def test_an_acceptor_promises_higher_ballots_only_and_reports_what_it_accepted():
    m = member_of("c")
    value = V2.with_changes(remove=["e"])
    out = m.receive("a", "a", Accept(3, 0, "a", value), 1.0)
    assert sent(out, Accepted) == [("a", Accepted(3, 0, "a"))]
    out = m.receive("b", "b", Prepare(3, 1, "b"), 1.1)
    (_, promise), = sent(out, Promise)
    assert (promise.accepted_round, promise.accepted_node, promise.accepted) == (0, "a", value)
    out = m.receive("a", "a", Accept(3, 0, "a", value), 1.2)
    assert sent(out, Nack) == [("a", Nack(3, 0, "a", 1, "b"))], "promised (1, b): a lower ballot is refused"
    # a newer view starts a new instance: nothing promised or accepted
    # (a Commit names its ballot and the majority of view 2 that accepted it)
    m.receive("a", "a", Commit(View(3, value.members), 0, "a", ("a", "c", "d")), 1.3)
    assert m.agreement.promised == NO_BALLOT and m.agreement.accepted is None


def test_a_takeover_coordinator_prepares_and_re_proposes_a_value_a_majority_may_hold():
    m = member_of("b")
    m.detector.apply_status(Fact(DEAD, "a", 0), 1.0, Output())  # rank 0 is dead: b coordinates
    assert m.coordinator() == "b"
    out = m.tick(1.0)
    prepares = sent(out, Prepare)
    assert sorted(d for d, _ in prepares) == ["a", "c", "d", "e"]
    p = prepares[0][1]
    assert p.round >= 1 and p.node == "b"
    earlier = V2.with_changes(add=[Member("j")])  # what rank 0 got accepted before dying
    m.receive("c", "c", Promise(3, p.round, "b", 0, "a", earlier), 1.01)
    out = m.receive("d", "d", Promise(3, p.round, "b"), 1.02)
    proposed = [e for e in out.events if isinstance(e, ev.Proposed)]
    assert proposed and proposed[0].view == earlier and proposed[0].reason == "recovering a proposal of a"


def test_a_proposal_without_a_majority_is_abandoned_and_retried_after_a_backoff():
    m = member_of("a")
    m.gossip.learn(Fact(LEAVE, "e", 0), 1.0, Output())
    m.tick(1.0)
    assert m.agreement.proposal is not None
    deadline = m.agreement.proposal.deadline
    assert m.next_deadline() <= deadline
    m.tick(deadline)
    assert m.agreement.proposal is None
    retry = m.agreement.next_proposal_at
    assert deadline + 0.5 * CFG.proposal_timeout <= retry <= deadline + 1.5 * CFG.proposal_timeout
    out = m.tick(retry)
    assert sent(out, Prepare), "ballot (0, a) is spent for this epoch: the retry prepares"
