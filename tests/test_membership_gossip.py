"""Dissemination on its own: the fact table and the piggyback queue of one machine."""

from __future__ import annotations

import random

from chaos_lightning.membership.config import Config
from chaos_lightning.membership.gossip import fact_key
from chaos_lightning.membership.machine import Membership, Output, Phase
from chaos_lightning.membership.messages import ALIVE, DEAD, JOIN, LEAVE, SUSPECT, Commit, Fact, Facts, Ping
from chaos_lightning.membership.view import Member, View

CFG = Config.preset("lan")


def member_of(me: str, ids: list[str], *, epoch: int = 2) -> Membership:
    m = Membership(Member(me, me), CFG, rng=random.Random(0))
    m.join([ids[0]], 0.0)
    m.receive(ids[0], ids[0], Commit(View(epoch, tuple(Member(i, i) for i in ids))), 0.0)
    assert m.phase is Phase.MEMBER
    return m


def test_a_new_fact_rides_on_retransmits_n_messages_then_stops():
    m = member_of("b", ["a", "b", "c"])
    fact = Fact(LEAVE, "c", 0)
    assert m.gossip.learn(fact, 1.0, Output())
    assert not m.gossip.learn(fact, 1.0, Output()), "a fact already known is no news"
    carried = [m.gossip.take().count(fact) for _ in range(CFG.retransmits(3) + 2)]
    assert carried == [1] * CFG.retransmits(3) + [0, 0]


def test_at_most_max_piggyback_facts_per_message_round_robin():
    ids = [f"n{i}" for i in range(20)]
    m = member_of("n0", ids)
    for nid in ids[1:12]:
        m.gossip.learn(Fact(LEAVE, nid, 0), 1.0, Output())
    first, second = m.gossip.take(), m.gossip.take()
    assert len(first) == CFG.max_piggyback
    assert set(second) - set(first), "the next message carries the facts the first left out"


def test_a_fact_we_observed_goes_to_the_coordinator_directly():
    m = member_of("b", ["a", "b", "c"])
    out = Output()
    m.gossip.learn(Fact(LEAVE, "c", 0), 1.0, out, from_self=True)
    assert [(dst, type(msg)) for dst, _, msg in out.messages] == [("a", Facts)]


def test_gossip_from_another_epoch_is_ignored_except_join_requests():
    m = member_of("b", ["a", "b", "c"])
    joiner = Member("j", "j")
    stale = (Fact(DEAD, "c", 0), Fact(JOIN, "j", 0, member=joiner))
    m.receive("a", "a", Ping(1, 1, "", stale), 1.0)
    assert m._status["c"].state == ALIVE, "a verdict from an old epoch does not count"
    assert "j" in m.gossip.joins


def test_a_suspicion_of_ourselves_is_refuted_with_a_higher_incarnation():
    m = member_of("b", ["a", "b", "c"])
    assert not m.gossip.learn(Fact(SUSPECT, "b", 0), 1.0, Output())
    assert m._inc == 1
    assert Fact(ALIVE, "b", 1) in m.gossip.take()


def test_a_view_settles_pending_joins_and_a_departed_incarnation_cannot_rejoin_by_stale_gossip():
    m = member_of("b", ["a", "b", "c"])
    j = Member("j", "j")
    m.gossip.learn(Fact(JOIN, "j", 0, member=j), 1.0, Output())
    m.gossip.learn(Fact(LEAVE, "c", 0), 1.0, Output())
    m.receive("a", "a", Commit(View(3, (Member("a", "a"), Member("b", "b"), j)), 0, "a", ("a", "c")), 1.1)
    assert not m.gossip.joins and not m.gossip.leaves
    assert not [k for k in m.gossip.queue if k[0] in (JOIN, LEAVE)], "settled facts are no longer gossiped"
    assert m.gossip.departed == {"c": 0}
    assert not m.gossip.learn(Fact(JOIN, "c", 0, member=Member("c", "c")), 1.2, Output()), "stale"
    assert m.gossip.learn(Fact(JOIN, "c", 0, member=Member("c", "c", inc=1)), 1.2, Output()), "a new incarnation"


def test_one_queue_slot_per_subject():
    assert fact_key(Fact(SUSPECT, "x", 0)) == fact_key(Fact(DEAD, "x", 3)) == fact_key(Fact(ALIVE, "x", 4))
    assert fact_key(Fact("link", "a", 1, "b")) == fact_key(Fact("link", "b", 2, "a", False))
    assert fact_key(Fact(JOIN, "x")) != fact_key(Fact(LEAVE, "x"))
    assert fact_key(Fact("join", "x")) == fact_key(Fact(JOIN, "x")), "a decoded kind is a plain str"
