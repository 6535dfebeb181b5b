"""Who counts in a quorum (issue 14), in the simulator.

Scenarios, each a finding of issue 14 that failed before its fix:

* three joiners admitted in one batch voted at once (a view of 6, quorum 4);
  when they crashed the three healthy members stalled for good (300 s
  simulated).  Joiners are now *learners* until they report their state
  sync done: they do not vote, so the members commit a view without them;
* two members, one ``kill -9``-ed: the survivor was a minority of the old
  view (1 of 2) and could neither train nor admit anyone, forever.  A
  refused connection from the dead member's own address now proves its
  death, and with exactly half of the voters proven dead the other half goes
  on: the survivor commits a view of one and admits a newcomer;
* where only timeouts are seen (a 2|2 split), neither side commits, and
  each says once that it is in a minority (``QuorumLost`` with the counts,
  logged by the agent); ``allow_minority`` lets both go on, which is the
  split brain its documentation warns of.

Then the rules on their own: the view's wire form, the tie rule of
``View.quorum_without``, what voids a proof of death, and a certificate
with proven-dead voters checked by the other voters.
"""

from __future__ import annotations

import random

import msgpack
import pytest

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.machine import Membership, Output, Phase
from chaos_lightning.membership.messages import DEAD, Accept, Ack, Commit, Fact, JoinRequest
from chaos_lightning.membership.sim import Simulator
from chaos_lightning.membership.view import Member, View
from chaos_lightning.wire.schema import decode, encode

PRESETS = ["local", "lan"]


def trained_cluster(n: int, preset: str, seed: int = 1, **sim_opts: object) -> tuple[Simulator, list[str]]:
    """``n`` founders that have trained: each reported its state sync done."""
    sim = Simulator(seed=seed, config=Config.preset(preset))
    for k, v in sim_opts.items():
        setattr(sim, k, v)
    ids = sim.start_cluster(n)
    sim.synced(*ids)
    sim.run_for(1.0)
    return sim, ids


# ------------------------------------------------------------ 1. learners
@pytest.mark.parametrize("preset", PRESETS)
def test_three_joiners_crash_right_after_admission_and_the_three_members_go_on(preset):
    sim, ids = trained_cluster(3, preset)
    joiners = ["j1", "j2", "j3"]
    for j in joiners:
        sim.join(j, [ids[0]])
    assert sim.run_until(lambda: sim.agreed(size=6), timeout=10), sim.summary()
    view = sim.view_of(ids[0])
    assert view.trained and set(view.learners) == set(joiners), view.describe()
    assert view.voters == tuple(ids) and view.quorum == 2, "learners do not count"
    for j in joiners:
        sim.crash(j)
    t0 = sim.now
    # before: no view without them in 300 s simulated (quorum 4 of 6)
    assert sim.run_until(lambda: sim.agreed(size=3, among=ids), timeout=30), sim.summary()
    took = sim.now - t0
    assert took < Config.preset(preset).suspicion_timeout(6) + 4 * Config.preset(preset).probe_interval, took
    assert not sim.split
    assert not sim.events(ev.QuorumLost), "the members never lost their quorum"
    # and they go on: a newcomer is admitted (as a learner) and promoted once synced
    sim.join("k", [ids[1]])
    assert sim.run_until(lambda: sim.agreed(including="k", size=4), timeout=30), sim.summary()
    assert sim.view_of("k").learners == ("k",)
    sim.synced("k")
    assert sim.run_until(lambda: not sim.view_of(ids[0]).learners and sim.agreed(size=4), timeout=10)
    assert sim.view_of(ids[2]).is_voter("k") and sim.view_of(ids[2]).quorum == 3


def test_founders_of_a_fresh_cluster_vote_and_joiners_of_a_trained_one_learn():
    sim = Simulator(seed=3, config=Config.preset("local"))
    ids = sim.start_cluster(3)
    fresh = sim.view_of(ids[0])
    assert not fresh.trained and not fresh.learners and fresh.quorum == 2
    sim.synced(ids[0])  # training began: nothing changes until a join
    sim.run_for(1.0)
    assert sim.view_of(ids[0]).epoch == fresh.epoch, "a report alone is no view change"
    sim.join("j", [ids[2]])
    assert sim.run_until(lambda: sim.agreed(including="j", size=4), timeout=10)
    assert sim.view_of("j").learners == ("j",) and sim.view_of("j").trained
    assert sim.nodes["j"].learner and not sim.nodes[ids[1]].learner


def test_a_learner_whose_report_is_lost_repeats_it_until_promoted():
    cfg = Config.preset("local")
    m = Membership(Member("j", "j"), cfg, rng=random.Random(0))
    m.join(["a"], 0.0)
    v = View(3, (Member("a", "a"), Member("b", "b"), Member("j", "j")), learners=("j",), trained=True)
    m.receive("a", "a", Commit(v), 0.0)

    def reports(out: Output) -> list[str]:
        return [d for d, _, x in out.messages if type(x).__name__ == "Facts" and x.facts[0].kind == "synced"]

    assert reports(m.mark_synced(0.1)) == ["a"], "straight to the coordinator"
    assert m.next_deadline() <= 0.1 + cfg.join_retry
    t = 0.1 + cfg.join_retry
    assert reports(m.tick(t)) == ["a"], "not promoted yet: again"
    promoted = View(4, v.members, trained=True)
    m.receive("a", "a", Commit(promoted, 0, "a", ("a", "b")), t + 0.1)
    assert not m.learner
    assert not reports(m.tick(t + 2 * cfg.join_retry)), "promoted: no more reports"
    assert m.mark_synced(t + 3).messages == [], "idempotent"


def test_a_learner_does_not_vote_even_when_asked():
    m = Membership(Member("j", "j"), Config.preset("lan"), rng=random.Random(0))
    m.join(["a"], 0.0)
    v = View(3, (Member("a", "a"), Member("b", "b"), Member("j", "j")), learners=("j",), trained=True)
    m.receive("a", "a", Commit(v), 0.0)
    assert m.phase is Phase.MEMBER and m.learner
    out = m.receive("a", "a", Accept(4, 0, "a", View(4, v.members[:2], trained=True)), 1.0)
    assert not out.messages, "no Accepted (nor Nack) from a learner"
    # a Commit whose quorum names the learner is not certified by the voters
    b = Membership(Member("b", "b"), Config.preset("lan"), rng=random.Random(0))
    b.join(["a"], 0.0)
    b.receive("a", "a", Commit(v), 0.0)
    nxt = v.with_changes(remove=["a"])
    b.receive("a", "a", Commit(nxt, 0, "a", ("a", "j")), 1.0)
    assert b.view.epoch == 3


def test_the_view_with_learners_is_backward_readable_and_round_trips():
    v = View(5, (Member("a", "a:1"), Member("b", "b:1"), Member("c", "c:1")), (("a", "b"),), ("c",), True)
    assert decode(encode(v)) == v
    # a view as an earlier release wrote it (no learners, no trained flag)
    old = encode(View(5, v.members, v.down_links))
    tag, fields = msgpack.unpackb(old, raw=False)
    short = msgpack.packb([tag, fields[:3]])
    back = decode(short)
    assert back.learners == () and back.trained is False and back.voters == ("a", "b", "c")
    c = Commit(v, 2, "a", ("a", "b"))
    tag, fields = msgpack.unpackb(encode(c), raw=False)
    assert decode(msgpack.packb([tag, fields[:4]])).dead == ()


def test_learners_whose_every_voter_is_proven_dead_commit_nothing_and_are_told():
    """The trained member dies before serving its state to two joiners (the
    case of test_join_wait): the joiners are learners, hold no state, and
    cannot know whether the dead chose a view without them, so they commit
    nothing; ``QuorumLost.all_voters_dead`` tells the strategy to stop with
    its clear error."""
    sim, (m,) = trained_cluster(1, "local", refuse_crashed=True)
    sim.join("j1", [m])
    sim.join("j2", [m])
    assert sim.run_until(lambda: sim.agreed(size=3), timeout=10)
    epoch = sim.view_of(m).epoch
    sim.crash(m)
    sim.run_for(10.0)
    assert {sim.view_of(j).epoch for j in ("j1", "j2")} == {epoch}
    for j in ("j1", "j2"):
        (lost,) = [e for _, _, e in sim.events(ev.QuorumLost, j)]
        assert lost.all_voters_dead and (lost.reachable, lost.voters) == (0, 1)


def test_when_the_last_voters_leave_the_learners_vote():
    v = View(4, (Member("a"), Member("j")), learners=("j",), trained=True)
    nxt = v.with_changes(remove=["a"])
    assert nxt.ids == ("j",) and nxt.voters == ("j",), "a view always has a voter"


# ------------------------------------------------------------ 2. proof of death
@pytest.mark.parametrize("preset", PRESETS)
def test_two_members_one_killed_the_survivor_goes_on_alone_and_admits_a_newcomer(preset):
    sim, (a, b) = trained_cluster(2, preset, refuse_crashed=True)
    sim.crash(b)
    t0 = sim.now
    # before: no view in 300 s simulated (1 of 2 is no majority)
    assert sim.run_until(lambda: sim.agreed(size=1, among=[a]), timeout=30), sim.summary()
    cfg = Config.preset(preset)
    assert sim.now - t0 < 2 * cfg.probe_interval + cfg.suspicion_timeout(2) + 0.5, sim.now - t0
    assert sim.view_of(a).ids == (a,)
    assert not sim.split
    sim.join("c", [a])
    assert sim.run_until(lambda: sim.agreed(size=2, including="c"), timeout=10), sim.summary()
    assert sim.view_of("c").learners == ("c",)
    sim.synced("c")
    assert sim.run_until(lambda: not sim.view_of(a).learners and sim.agreed(size=2), timeout=10)


def test_half_of_four_killed_at_once_the_other_half_goes_on():
    sim, ids = trained_cluster(4, "local", seed=4, refuse_crashed=True)
    sim.crash(ids[0])  # the coordinator among them
    sim.crash(ids[3])
    assert sim.run_until(lambda: sim.agreed(size=2, among=ids[1:3]), timeout=30), sim.summary()
    assert not sim.split


def test_a_majority_killed_at_once_is_waited_for_even_when_proven_dead():
    """Three voters, two killed together: they may have chosen a view
    without the survivor before they died (its Commit lost), which nobody
    alive can know, so the survivor waits (and says so)."""
    sim, ids = trained_cluster(3, "local", refuse_crashed=True)
    sim.crash(ids[0])
    sim.crash(ids[2])
    sim.run_for(30.0)
    assert sim.view_of(ids[1]).size == 3, "no commit without a majority"
    lost = sim.events(ev.QuorumLost, ids[1])
    assert len(lost) == 1 and (lost[0][2].reachable, lost[0][2].voters, lost[0][2].proven_dead) == (1, 3, 2)


def test_a_timeout_is_no_proof_the_survivor_of_two_waits():
    sim, (a, b) = trained_cluster(2, "local")  # the network drops, nobody refuses
    sim.partition([a], [b])
    sim.run_for(30.0)
    assert sim.view_of(a).size == 2 and sim.view_of(b).size == 2
    assert len(sim.events(ev.QuorumLost, a)) == 1 and len(sim.events(ev.QuorumLost, b)) == 1
    sim.heal()
    assert sim.run_until(lambda: sim.agreed(size=2), timeout=30)


def member_of(me: str, ids: list[str], *, epoch: int = 2) -> Membership:
    m = Membership(Member(me, me + ":1"), Config.preset("lan"), rng=random.Random(0))
    m.join([ids[0]], 0.0)
    m.receive(ids[0], ids[0], Commit(View(epoch, tuple(Member(i, i + ":1") for i in ids))), 0.0)
    assert m.phase is Phase.MEMBER
    return m


def test_a_refusal_proves_only_the_slot_at_that_address_and_a_sign_of_life_voids_it():
    m = member_of("a", ["a", "b", "c"])
    m.peer_refused("b", "elsewhere:9", 1.0)
    assert not m._proofs, "not b's own address: no proof"
    assert not m.detector.dead("b")
    m.peer_refused("", "b:1", 1.0)  # the transport did not know who listens there
    assert m._proofs == {"b": 0}
    # the proof confirms the failure at once, no suspicion period (issue 14)
    assert m.detector.dead("b")
    m.receive("b", "b:1", Ack(1, 2, "b"), 1.1)
    assert not m._proofs, "b answered: the refusal was not its death"

    m = member_of("a", ["a", "b"])
    out = m.peer_refused("b", "b:1", 1.2)
    # the old slot, proven dead, is half of the voters, and a goes on alone,
    # in the same call: no suspicion, no probe period
    assert m.view.epoch == 3 and m.view.ids == ("a",), m.view.describe()
    assert any(isinstance(e, ev.ViewChanged) for e in out.events)
    # a new process under the id asking in is no sign of the old one's life
    m.receive("b", "b:1", JoinRequest(Member("b", "b:1", inc=9)), 1.3)
    assert m.view.ids[0] == "a" and m.view.epoch >= 3


def test_a_newer_process_on_a_members_own_address_proves_the_old_one_gone():
    m = member_of("a", ["a", "b"])
    m.receive("b", "b:7", JoinRequest(Member("b", "b:7", inc=5)), 1.0)
    assert not m._proofs, "another address: the old process may still run"
    m.receive("b", "b:1", JoinRequest(Member("b", "b:1", inc=5)), 1.0)
    assert m._proofs == {"b": 0}


def test_a_commit_with_proven_dead_voters_is_certified_only_in_a_tie():
    m = member_of("b", ["a", "b", "c", "d"])
    view = m.view
    nxt = view.with_changes(remove=["c", "d"])
    m.receive("a", "a:1", Accept(3, 0, "a", nxt), 1.0)
    # one proven dead of four: three answers are still needed
    m.receive("a", "a:1", Commit(nxt, 0, "a", ("a", "b"), ("c",)), 1.1)
    assert m.view.epoch == 2
    # a dead voter counted in the quorum: refused
    m.receive("a", "a:1", Commit(nxt, 0, "a", ("a", "b", "c"), ("c", "d")), 1.2)
    assert m.view.epoch == 2
    m.receive("a", "a:1", Commit(nxt, 0, "a", ("a", "b"), ("c", "d")), 1.3)
    assert m.view == nxt


@pytest.mark.parametrize("voters,dead,need", [(1, 0, 1), (2, 0, 2), (2, 1, 1), (3, 1, 2), (3, 2, 2), (4, 2, 2),
                                              (4, 3, 3), (5, 2, 3), (6, 3, 3), (6, 4, 4)])
def test_quorum_without_lowers_the_majority_only_in_a_tie(voters, dead, need):
    v = View(2, tuple(Member(f"n{i}") for i in range(voters)))
    assert v.quorum_without(dead) == need


# ------------------------------------------------------------ 3. minority
@pytest.mark.parametrize("preset", PRESETS)
def test_a_2_2_split_with_only_timeouts_commits_nothing_and_each_side_says_it_is_a_minority(preset):
    sim, ids = trained_cluster(4, preset, refuse_crashed=True)
    epoch = sim.view_of(ids[0]).epoch
    sim.partition(ids[:2], ids[2:])
    t0 = sim.now
    sim.run_for(60.0)
    assert {sim.view_of(n).epoch for n in ids} == {epoch}, "neither side commits"
    assert not [1 for t, n, e in sim.events(ev.ViewChanged) if t > t0]
    for n in ids:
        lost = sim.events(ev.QuorumLost, n)
        assert len(lost) == 1, f"{n}: said once, not {len(lost)} times"
        e = lost[0][2]
        assert (e.reachable, e.voters, e.proven_dead, e.allow_minority) == (2, 4, 0, False)
    sim.heal()
    healed = lambda: sim.agreed(size=4) and all(sim.nodes[n].quorate for n in ids)  # noqa: E731
    assert sim.run_until(healed, timeout=60), sim.summary()


def test_allow_minority_lets_both_sides_of_a_split_go_on_the_documented_risk():
    cfg = Config.preset("local", allow_minority=True)
    sim = Simulator(seed=2, config=cfg)
    ids = sim.start_cluster(4)
    sim.synced(*ids)
    sim.run_for(1.0)
    sim.partition(ids[:2], ids[2:])
    assert sim.run_until(lambda: sim.agreed(among=ids[:2], size=2) and sim.agreed(among=ids[2:], size=2), timeout=30)
    assert sim.split, "both sides committed the same epoch: the split brain allow_minority accepts"
    assert all(e.allow_minority for _, _, e in sim.events(ev.QuorumLost))


def test_the_quorum_flag_and_event_count_voters_only():
    m = member_of("c", ["a", "b", "c"])
    v = View(3, m.view.members + (Member("j", "j:1"), Member("k", "k:1")), learners=("j", "k"), trained=True)
    m.receive("a", "a:1", Commit(v, 0, "a", ("a", "b")), 1.0)
    assert m.view == v and m.quorate
    out = Output()
    m.detector.apply_status(Fact(DEAD, "j", 0), 2.0, out)
    m.detector.apply_status(Fact(DEAD, "k", 0), 2.0, out)
    assert m.quorate, "two dead learners of five members cost no quorum"
    m.detector.apply_status(Fact(DEAD, "a", 0), 2.0, out)
    m.detector.apply_status(Fact(DEAD, "b", 0), 2.0, out)
    lost = [e for e in out.events if isinstance(e, ev.QuorumLost)]
    assert not m.quorate and lost == [ev.QuorumLost(3, 1, 3, 0, False)]


def test_a_proof_of_death_after_the_loss_is_reported_again():
    """CI, 2026-12-05: a learner's only voter was declared dead by suspicion
    (``QuorumLost`` with nothing proven), and its address refused a moment
    later; the loss had been reported, so the proof never was, and the
    learner waited its whole join timeout for a view that cannot come.  A
    proof that comes after the loss is reported in a second event."""
    v = View(3, (Member("a", "a:1"), Member("j", "j:1")), learners=("j",), trained=True)
    j = Membership(Member("j", "j:1"), Config.preset("lan"), rng=random.Random(0))
    j.join(["a"], 0.0)
    j.receive("a", "a:1", Commit(v, 0, "a", ("a",)), 1.0)
    assert j.view == v and j.quorate
    out = Output()
    j.detector.apply_status(Fact(DEAD, "a", 0), 2.0, out)
    j._update_quorum(out)
    lost = [e for e in out.events if isinstance(e, ev.QuorumLost)]
    assert lost == [ev.QuorumLost(3, 0, 1, 0, False)] and not lost[0].all_voters_dead
    out = j.peer_refused("a", "a:1", 3.0)
    (proof,) = [e for e in out.events if isinstance(e, ev.QuorumLost)]
    assert proof.all_voters_dead and (proof.reachable, proof.voters, proof.proven_dead) == (0, 1, 1)
    out = j.peer_refused("a", "a:1", 4.0)
    assert not [e for e in out.events if isinstance(e, ev.QuorumLost)], "the same proof is reported once"
