"""Randomized fault schedules in the simulator, checked against the protocol's invariants.

Each seed draws a cluster (3 to 11 nodes, ``lan`` or ``local`` timing, with
or without message loss) and a schedule of six faults at random times:
crashes (never of a majority), graceful leaves, new joiners, cut and restored
links, a majority/minority partition and its heal.  Then the network heals
and the run settles.  Invariants:

* agreement is safe: every node that installs epoch ``e`` installs the same
  view (never two committed views with one epoch);
* after healing, the live members hold one view, containing each of them;
* every crashed node is removed.

``SEEDS`` schedules run here (a few seconds); for a soak, run more from the
repository root: ``python -c "from tests.test_membership_random import run;
[run(s) for s in range(1000)]"``.  A machine that spins (its next deadline
stuck in the past) stops the run with ``sim.Spin`` rather than hanging it.
"""

from __future__ import annotations

import random

import pytest

from chaos_lightning.membership import events as ev
from chaos_lightning.membership.config import Config
from chaos_lightning.membership.sim import Simulator

SEEDS = 40


def run(seed: int) -> Simulator:
    rng = random.Random(seed)
    n = rng.randint(3, 11)
    preset = rng.choice(["lan", "local"])
    sim = Simulator(seed=seed, config=Config.preset(preset), loss=rng.choice([0.0, 0.02]), jitter=0.002)
    sim.start_cluster(n)
    crashed: list[str] = []
    joined = 0
    cut: list[tuple[str, str]] = []
    for _ in range(6):
        sim.run_for(rng.uniform(0.0, 4.0))
        live = [x for x in sim.members() if x not in crashed]
        action = rng.choice(["crash", "leave", "join", "cut", "restore", "partition"])
        if action == "crash" and len(crashed) + 1 < (len(live) + len(crashed)) / 2 and len(live) > 2:
            victim = rng.choice(live)
            crashed.append(victim)
            sim.crash(victim)
        elif action == "leave" and len(live) > 2:
            sim.leave(rng.choice(live))
        elif action == "join" and live:
            joined += 1
            sim.join(f"j{joined}", [rng.choice(live)])
        elif action == "cut" and len(live) >= 2:
            a, b = rng.sample(live, 2)
            cut.append((a, b))
            sim.cut(a, b)
        elif action == "restore" and cut:
            sim.restore(*cut.pop(rng.randrange(len(cut))))
        elif action == "partition" and len(live) >= 3:
            minority = rng.sample(live, (len(live) - 1) // 2)
            sim.partition([x for x in live if x not in minority], minority)
            sim.run_for(rng.uniform(1.0, 6.0))
            sim.heal()
    sim.heal()
    for a, b in cut:
        sim.restore(a, b)
    settled = sim.run_until(lambda: sim.agreed(without=crashed), timeout=90)
    assert settled, f"seed {seed}: no single view after healing: {sim.summary()}"
    return sim


def committed_per_epoch(sim: Simulator) -> dict[int, set]:
    seen: dict[int, set] = {}
    for _, _, e in sim.events(ev.ViewChanged):
        seen.setdefault(e.view.epoch, set()).add(e.view)
    for _, _, e in sim.events(ev.Removed):
        seen.setdefault(e.view.epoch, set()).add(e.view)
    return seen


@pytest.mark.parametrize("seed", range(SEEDS))
def test_random_faults_never_commit_two_views_for_one_epoch_and_end_in_one_view(seed):
    sim = run(seed)
    split = {epoch: views for epoch, views in committed_per_epoch(sim).items() if len(views) > 1}
    assert not split, f"seed {seed}: two views committed for one epoch: {split}"
    view = sim.view_of(sim.members()[0])
    assert all(m in view for m in sim.members())
    assert not [x for x in view.ids if sim.crashed.get(x)], "every crashed node is removed"


def test_a_schedule_replays_exactly_from_its_seed():
    first, again = run(3), run(3)
    assert [(t, n, repr(e)) for t, n, e in first.trace] == [(t, n, repr(e)) for t, n, e in again.trace]
