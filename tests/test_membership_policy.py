"""The size policy (``target_nodes``/``max_nodes``) in the simulator and as pure rules.

Scenarios on virtual nodes running the real state machine (no sockets,
virtual time), plus generated inputs for the pure rule:

* a cluster at its target holds joiners out as standbys, each reported once
  with its reason; a member killed, the view that removes it admits the
  oldest standby in the same view change;
* seeded random sequences of crashes, leaves and joins: no committed view is
  ever above ``max_nodes``; whenever a view is below target while a live
  standby waits, the next view admits one; every node holds the policy;
* all proposers decide alike: :func:`next_view` gives the same view whatever
  the order in which a proposer heard of the joiners;
* a member above ``max_nodes`` (a view of an older policy) is told to retire,
  the newest first, and only it.
"""

from __future__ import annotations

import random

from hypothesis import given, settings
from hypothesis import strategies as st

from chaos_lightning.membership import events as ev
from chaos_lightning.membership import policy
from chaos_lightning.membership.agreement import next_view
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.machine import Membership, Phase
from chaos_lightning.membership.messages import Commit
from chaos_lightning.membership.sim import Simulator
from chaos_lightning.membership.view import Member, View


def policed(target: int, max_nodes: int, seed: int = 1, preset: str = "lan") -> Simulator:
    sim = Simulator(seed=seed, config=Config.preset(preset, target_nodes=target, max_nodes=max_nodes), jitter=0.002)
    sim.refuse_crashed = True  # a kill -9 on a live host: connects are refused
    return sim


def standbys(sim: Simulator) -> list[str]:
    """Live nodes still asking to join."""
    return [n for n in sim.live() if sim.nodes[n].phase is Phase.JOINING]


def test_two_members_at_target_hold_a_standby_out_and_a_kill_admits_it_in_the_same_view_change():
    sim = policed(target=2, max_nodes=3)
    a, b = sim.start_cluster(2)
    sim.join("s1", [a, b])
    sim.join("s2", [a, b])
    sim.run_for(5.0)
    assert sim.agreed(size=2, without=["s1", "s2"]), sim.summary()
    assert standbys(sim) == ["s1", "s2"]
    held = sim.events(ev.Held)
    assert {e.node for _, _, e in held} == {"s1", "s2"}
    assert all("target_nodes=2" in e.reason for _, _, e in held)
    assert len(held) == len({(n, e.node) for _, n, e in held}), "each standby reported once per coordinator"
    assert sim.view_of(a).target_nodes == 2 and sim.view_of(b).max_nodes == 3, "the founder's policy, carried"

    killed_at = sim.now
    sim.crash(b)
    assert sim.run_until(lambda: sim.agreed(size=2, without=b, including="s1"), timeout=30), sim.summary()
    first = min(e.view.epoch for t, _, e in sim.events(ev.ViewChanged) if t >= killed_at and b not in e.view)
    assert "s1" in sim.committed[first], "the view without the dead member admits the standby"
    assert "s2" not in sim.committed[first], "the oldest (lowest id at equal incarnation) first; one slot only"
    assert standbys(sim) == ["s2"], "the other standby keeps waiting"


def test_a_leave_admits_a_standby_and_a_cluster_below_target_admits_at_once():
    sim = policed(target=3, max_nodes=3)
    ids = sim.start_cluster(2)  # below target: joiners are admitted as before
    sim.join("s1", ids)
    assert sim.run_until(lambda: sim.agreed(size=3, including="s1"), timeout=10), sim.summary()
    sim.join("s2", ids)
    sim.run_for(3.0)
    assert standbys(sim) == ["s2"]
    sim.leave(ids[1])
    assert sim.run_until(lambda: sim.agreed(size=3, without=ids[1], including="s2"), timeout=10), sim.summary()
    assert sim.nodes[ids[1]].phase is Phase.LEFT


def run_sequence(seed: int) -> Simulator:
    """A seeded sequence of crashes, leaves and joins under a random policy;
    checks the invariants after every step and returns the simulator."""
    rng = random.Random(seed)
    target = rng.randint(2, 5)
    max_nodes = target + rng.randint(0, 2)
    sim = policed(target, max_nodes, seed=seed, preset=rng.choice(["lan", "local"]))
    sim.start_cluster(rng.randint(1, target))
    cap = min(target, max_nodes)
    fresh = 0
    for step in range(10):
        members = sim.members()
        action = rng.choice(["join", "join", "crash", "leave"])
        if action == "join" or len(members) <= 2:
            fresh += 1
            sim.join(f"j{fresh:02d}", rng.sample(members, min(2, len(members))))
        elif action == "crash":
            sim.crash(rng.choice(members))
        else:
            sim.leave(rng.choice(members))
        sim.run_for(rng.uniform(0.2, 2.0))
        # settle, then the rule: below capacity only while nobody waits
        sim.run_until(lambda: sim.agreed() and len(sim.members()) == sim.view_of(sim.members()[0]).size, timeout=30)
        sim.run_for(3.0)
        view = sim.view_of(sim.members()[0])
        assert view.size <= max_nodes
        waiting = [s for s in standbys(sim) if s not in view]
        assert view.size == cap or not waiting, f"seed {seed} step {step}: {view.describe()} with standbys {waiting}"
    assert not sim.split, sim.split
    for epoch, view in sim.committed.items():
        assert view.size <= max_nodes, f"seed {seed}: epoch {epoch} above max_nodes: {view.describe()}"
        assert (view.target_nodes, view.max_nodes) == (target, max_nodes)
    for _, _, e in sim.events(ev.Proposed):
        assert e.view.size <= cap or not e.reason.startswith("join"), e
    return sim


def test_generated_sequences_never_exceed_max_and_never_leave_a_standby_waiting_below_target():
    for seed in range(12):
        run_sequence(seed)


members = st.lists(st.integers(0, 30), unique=True, min_size=1, max_size=8)


@settings(max_examples=200, deadline=None)
@given(members, st.lists(st.tuples(st.integers(31, 60), st.integers(0, 3)), unique_by=lambda x: x[0], max_size=6),
       st.integers(0, 8), st.integers(0, 10), st.randoms(use_true_random=False), st.data())
def test_every_proposer_decides_alike_whatever_order_it_heard_of_the_joiners(
        ids, joiners, target, extra, rnd, data):
    max_nodes = target + extra if target else extra
    view = View(9, tuple(Member(f"n{i:02d}", inc=1) for i in ids), target_nodes=target, max_nodes=max_nodes)
    joins = [Member(f"n{i:02d}", inc=inc) for i, inc in joiners]
    dead = {x: True for x in data.draw(st.lists(st.sampled_from(view.ids), unique=True, max_size=len(ids) - 1))}
    decisions = set()
    for _ in range(4):
        rnd.shuffle(joins)
        decided = next_view(view, {m.id: m for m in joins}, {}, dict(dead), {})
        # without a bound every joiner enters, in the order heard (as before
        # the policy): the same members; under a bound, the very same view
        decisions.add(decided if decided is None or policy.capacity(view) is not None
                      else frozenset(decided[0].ids))
    assert len(decisions) == 1, decisions
    if decided is None:
        return
    nxt, _ = decided
    cap = policy.capacity(view)
    added = [m for m in nxt.members if m.id not in view]
    if cap is not None:
        assert len(nxt.members) <= max(cap, view.size - len(dead))
        assert len(added) == max(0, min(len(joins), cap - (view.size - len(dead))))
    else:
        assert len(added) == len(joins)
    if cap is not None:  # the longest-waiting (lowest incarnation, then id) first
        order = sorted(joins, key=lambda m: (m.inc, m.id))
        assert [m.id for m in added] == [m.id for m in order[:len(added)]]
    assert (nxt.target_nodes, nxt.max_nodes) == (target, max_nodes)


def test_members_above_max_retire_newest_first_and_only_they_are_told():
    members = tuple(Member(f"m{i}", f"m{i}", inc=1) for i in range(4))
    view = View(5, members, target_nodes=2, max_nodes=2)
    assert policy.surplus(view) == ("m3", "m2")
    assert policy.surplus(View(5, members)) == () and policy.surplus(View(5, members, max_nodes=4)) == ()
    told = {}
    for x in members:
        m = Membership(x, Config.preset("lan"), rng=random.Random(0))
        m.join(["m0"], 0.0)
        # a bare Commit that lists the joiner is its admission (no certificate to check)
        out = m.receive("m0", "m0", Commit(view), 0.1)
        assert m.phase is Phase.MEMBER
        told[x.id] = [e for e in out.events if isinstance(e, ev.Retire)]
    assert not told["m0"] and not told["m1"]
    assert len(told["m2"]) == 1 and len(told["m3"]) == 1
    assert "max_nodes=2" in told["m3"][0].reason
