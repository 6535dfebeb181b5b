"""Pending joins expire (issue 16): a standby that died while it waited is never admitted.

Scenarios on virtual nodes running the real state machine (the simulator,
``lan`` preset: a joiner asks every 1 s, its join expires after 10 s unheard):

* two members at their target, two standbys; the first standby is killed
  while it waits.  Ten seconds later no node holds its join; a member then
  killed is replaced by the *live* standby in the one view change that
  removes it, and no view ever lists the dead standby;
* the same with ``join_expiry=0`` (the behaviour before the issue): the
  view that removes the member admits the dead standby, and a second view
  change removes it and admits the live one;
* two live standbys that ask through one member (neither the coordinator nor
  next in line) for 150 s: the coordinator and its successor hold both joins
  all along; the coordinator killed, its successor admits the first standby
  in the view that removes it, and holds the second for 120 s more, which
  the next failure admits in one view change as well;

and the rules on one machine: a join heard again is refreshed, not news;
an expired join leaves nothing behind and is news when asked again; the
setting comes from ``CHAOS_MEMBERSHIP`` like every other.
"""

from __future__ import annotations

import random

import pytest

from chaos_lightning.config import NodeConfig, parse_membership_overrides
from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import PRESETS, Config
from chaos_lightning.membership.machine import Membership, Output, Phase
from chaos_lightning.membership.messages import JOIN, Commit, Fact, Facts, JoinRequest
from chaos_lightning.membership.sim import Simulator
from chaos_lightning.membership.view import Member, View


def policed(target: int, expiry: float | None = None, seed: int = 1) -> Simulator:
    over = {} if expiry is None else {"join_expiry": expiry}
    cfg = Config.preset("lan", target_nodes=target, max_nodes=target, **over)
    sim = Simulator(seed=seed, config=cfg, jitter=0.002)
    sim.refuse_crashed = True  # a kill -9 on a live host: connects are refused
    return sim


def views_since(sim: Simulator, epoch: int) -> list[list[str]]:
    """The member lists of the views committed after ``epoch``, in order."""
    return [list(sim.committed[e].ids) for e in sorted(sim.committed) if e > epoch]


def ever_listed(sim: Simulator, node: str) -> list[int]:
    return [e for e, v in sorted(sim.committed.items()) if node in v]


def kill_a_waiting_standby(expiry: float | None) -> tuple[Simulator, str, str, int]:
    """Members a, b at target 2 (trained), standbys s1 (admitted first: the
    lower id at the same incarnation) and s2; s1 is killed, 12 s pass.
    Returns the simulator, a, b and the epoch before b is killed next."""
    sim = policed(target=2, expiry=expiry)
    a, b = sim.start_cluster(2)
    sim.synced(a, b)  # a trained cluster: joiners enter as learners
    sim.join("s1", [a, b])
    sim.join("s2", [a, b])
    sim.run_for(3.0)
    assert [n for n in sim.live() if sim.nodes[n].phase is Phase.JOINING] == ["s1", "s2"]
    assert list(sim.nodes[a].gossip.joins) == ["s1", "s2"], "both held as standbys by the coordinator"
    sim.crash("s1")
    sim.run_for(12.0)  # more than join_expiry (10 s) after its last request
    return sim, a, b, max(sim.committed)


def test_a_standby_killed_while_held_expires_and_the_next_failure_admits_the_live_one_in_one_view_change():
    sim, a, b, before = kill_a_waiting_standby(expiry=None)
    assert sim.config.join_expiry == 10.0
    for n in (a, b):
        g = sim.nodes[n].gossip
        assert list(g.joins) == ["s2"] and list(g.asked) == ["s2"], f"{n} dropped the dead standby only"
        assert (JOIN, "s1") not in g.queue and "s1" not in sim.nodes[n]._addrs, f"{n} keeps nothing of it"
    assert max(sim.committed) == before == 2, "expiry itself changes no view"
    expired = [(n, e.node) for _, n, e in sim.events(ev.JoinExpired)]
    assert expired == [(a, "s1")], "the coordinator says so, once"

    sim.crash(b)
    assert sim.run_until(lambda: sim.agreed(size=2, without=b, including="s2"), timeout=30), sim.summary()
    sim.run_for(5.0)
    assert views_since(sim, before) == [[a, "s2"]], "one view change: b out, the live standby in"
    assert sim.view_of("s2").is_learner("s2") and sim.nodes["s2"].phase is Phase.MEMBER
    assert ever_listed(sim, "s1") == [], "no view ever listed the dead standby"
    assert not [d for d in sim.decisions if "s1" in d.view], "nor did any proposal"


def test_with_expiry_off_the_dead_standby_is_admitted_and_a_second_view_change_replaces_it():
    sim, a, b, before = kill_a_waiting_standby(expiry=0)
    assert list(sim.nodes[a].gossip.joins) == ["s1", "s2"], "joins never expire"
    assert sim.nodes[a].next_deadline() < float("inf")

    sim.crash(b)
    assert sim.run_until(lambda: sim.agreed(size=2, without=[b, "s1"], including="s2"), timeout=60), sim.summary()
    sim.run_for(5.0)
    assert views_since(sim, before) == [[a, "s1"], [a, "s2"]], "b out and the dead s1 in; then s1 out, s2 in"
    assert ever_listed(sim, "s1") == [before + 1]


def test_a_live_standby_is_never_expired_by_the_coordinator_or_its_successor_even_when_the_coordinator_dies():
    sim = policed(target=3)
    n0, n1, n2 = sim.start_cluster(3)
    sim.synced(n0, n1, n2)
    # both standbys ask through n2 only: n0 (coordinator) and n1 (next in
    # line) hear them only through n2's forwards
    sim.join("s1", [n2])
    sim.join("s2", [n2])

    def watch(seconds: float, nodes: list[str], standbys: list[str]) -> None:
        """Run, checking every 0.5 s that ``nodes`` hold every standby pending."""
        for _ in range(int(seconds / 0.5)):
            sim.run_for(0.5)
            for n in nodes:
                assert list(sim.nodes[n].gossip.joins) == standbys, (sim.now, n, list(sim.nodes[n].gossip.joins))

    sim.run_for(1.0)
    watch(30.0, [n0, n1], ["s1", "s2"])  # three times join_expiry
    before = max(sim.committed)
    assert before == 2, "held, not admitted, not dropped"

    sim.crash(n0)  # the coordinator
    assert sim.run_until(lambda: sim.agreed(size=3, without=n0, including="s1"), timeout=30), sim.summary()
    assert views_since(sim, before) == [[n1, n2, "s1"]], "n1 took over holding both: one view change"
    after = max(sim.committed)

    watch(120.0, [n1, n2], ["s2"])  # the new coordinator and its successor (the contact itself)
    assert max(sim.committed) == after, "s2 waited all along"
    held = [(n, e.node) for _, n, e in sim.events(ev.Held)]
    assert held.count((n1, "s2")) == 1, "the new coordinator reported s2 held once: it never dropped it"

    sim.crash(n2)  # s2's only contact: s2 cannot ask anyone now, n1 still holds its request
    assert sim.run_until(lambda: sim.agreed(size=3, without=n2, including="s2"), timeout=30), sim.summary()
    assert views_since(sim, after) == [[n1, "s1", "s2"]], "one view change: n2 out, s2 in"


# ---------------------------------------------------------------- one machine
CFG = Config.preset("lan")


def member_of(me: str, ids: list[str], cfg: Config = CFG) -> Membership:
    m = Membership(Member(me, me), cfg, rng=random.Random(0))
    m.join([ids[0]], 0.0)
    m.receive(ids[0], ids[0], Commit(View(2, tuple(Member(i, i) for i in ids))), 0.0)
    assert m.phase is Phase.MEMBER
    return m


def to(out: Output, msg_type: type) -> list[str]:
    return [dst for dst, _, msg in out.messages if isinstance(msg, msg_type)]


def test_a_join_heard_again_is_refreshed_and_one_not_heard_expires_at_the_tick_leaving_nothing_behind():
    m = member_of("c", ["a", "b", "c"])
    j = Member("j", "j:1", inc=5)
    out = m.receive("j", "j:1", JoinRequest(j), 1.0)
    assert to(out, Facts) == ["a"], "news: told to the coordinator (and gossiped)"
    assert m.gossip.asked == {"j": [1.0, 1.0]} and m._addrs["j"] == "j:1"
    # the same request again, directly: forwarded to the coordinator and its successor
    out = m.receive("j", "j:1", JoinRequest(j), 2.0)
    assert to(out, Facts) == ["a", "b"]
    # the same join by gossip refreshes it; an earlier life of it does not
    assert not m.gossip.learn(Fact(JOIN, "j", 0, member=j), 4.0, Output())
    assert not m.gossip.learn(Fact(JOIN, "j", 0, member=Member("j", "j:1", inc=4)), 6.0, Output())
    assert m.gossip.asked == {"j": [1.0, 4.0]}
    assert m.next_deadline() <= 4.0 + CFG.join_expiry

    m.tick(13.9)
    assert "j" in m.gossip.joins, "not yet: heard at 4.0"
    m.tick(14.0)
    assert not m.gossip.joins and not m.gossip.asked
    assert (JOIN, "j") not in m.gossip.queue and "j" not in m._addrs

    # asked again later: news again, learned, gossiped and sent to the coordinator
    out = m.receive("j", "j:1", JoinRequest(j), 20.0)
    assert list(m.gossip.joins) == ["j"] and (JOIN, "j") in m.gossip.queue
    assert to(out, Facts) == ["a"]


def test_the_coordinator_drops_an_expired_join_before_it_proposes_whatever_call_comes_first():
    # the coordinator of a view at its target: j waits as a standby
    m = Membership(Member("a", "a"), CFG, rng=random.Random(0))
    m.join(["b"], 0.0)
    m.receive("b", "b", Commit(View(2, (Member("a", "a"), Member("b", "b")), target_nodes=2, max_nodes=2)), 0.0)
    assert m.coordinator() == "a"
    out = m.receive("j", "j", JoinRequest(Member("j", "j")), 1.0)
    assert [e.node for e in out.events if isinstance(e, ev.Held)] == ["j"]
    # b leaves at 20.0 (a message, not a tick): the view without b has room,
    # and j, silent since 1.0, is no candidate of it
    out = m.receive("b", "b", Facts(2, (Fact("leave", "b", 0),)), 20.0)
    proposed = [e for e in out.events if isinstance(e, ev.Proposed)]
    assert [p.view.ids for p in proposed] == [("a",)] and proposed[0].reason == "leave b"
    assert not m.gossip.joins


def test_join_expiry_is_ten_join_retries_in_every_preset_and_set_like_any_other_setting():
    assert {n: c.join_expiry / c.join_retry for n, c in PRESETS.items()} == {"local": 10, "lan": 10, "edge": 10}
    assert parse_membership_overrides("join_expiry=30") == {"join_expiry": 30.0}
    assert parse_membership_overrides("join_expiry=0") == {"join_expiry": 0.0}  # off
    node = NodeConfig.resolve(env={"CHAOS_PRESET": "lan", "CHAOS_MEMBERSHIP": "join_expiry=2.5"})
    assert node.membership == Config.preset("lan", join_expiry=2.5)


@pytest.mark.parametrize("expiry", [0.0, 10.0])
def test_a_member_that_is_not_the_coordinator_expires_alike_and_never_proposes(expiry):
    m = member_of("c", ["a", "b", "c"], Config.preset("lan", join_expiry=expiry))
    m.gossip.learn(Fact(JOIN, "j", 0, member=Member("j", "j")), 1.0, Output())
    out = m.tick(30.0)
    assert not [e for e in out.events if isinstance(e, ev.Proposed)]
    assert list(m.gossip.joins) == ([] if expiry else ["j"])
