"""``Fabric(strategy="chaos")``: a Fabric training loop through a join, a leave and a ``kill -9``.

The project (``_fabric_worker.py``) is an ordinary Fabric loop: a scheduler
given to ``fabric.setup``, gradient clipping, gradient accumulation, a
validation loader, a metric reduced with ``fabric.all_reduce`` and the
ranks gathered with ``fabric.all_gather``.  Run as
real processes through the same churn as the Trainer matrix
(``_procs.churn_cluster``): the founder that stays and the joiner end as
replicas of each other (parameters, optimizer, scheduler, global step),
every sample of every epoch is trained exactly once, a failed step counts
nowhere, both validate the same epochs with the same reduced loss, and
every gather holds one row per member in rank order.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest

from _procs import churn_cluster, cluster

WORKER = Path(__file__).with_name("_fabric_worker.py")
SAMPLES, EPOCHS, SLEEP = 480, 4, 0.25  # 20 steps an epoch at world 3 (batch 8)


def check(done: list[dict]) -> None:
    keys = ("params", "optim", "scheduler", "global_step")
    assert len({tuple(repr(r[k]) for k in keys) for r in done}) == 1, done
    for epoch in range(EPOCHS):
        counts = dict(done[0]["epochs"][str(epoch)])  # the founder saw every epoch
        assert sorted(counts) == list(range(SAMPLES)) and set(counts.values()) == {1}, f"epoch {epoch}"


@pytest.mark.timeout(360)
@pytest.mark.parametrize("accumulate", [1, 2], ids=["step-per-batch", "accumulate-2"])
def test_a_fabric_loop_survives_join_leave_and_kill(tmp_path, accumulate):
    # with accumulation, adaptive shares too (CHAOS_SHARES=adaptive): node 1,
    # the founder that stays, is slower per sample; its share drops, and the
    # windows still cover every sample once
    env = None
    if accumulate == 2:
        env = lambda i: {"CHAOS_SHARES": "adaptive", "CHAOS_TEST_SAMPLE_SLEEP": "0.012" if i == 1 else "0"}  # noqa: E731
    nodes, done = churn_cluster(WORKER, [str(SAMPLES), str(EPOCHS), str(SLEEP), str(accumulate), str(tmp_path / "run")],
                                tmp_path, f"fabric{accumulate}", env=env)
    check(done)
    if env is not None:
        assert "shares follow the measured speeds" in nodes[1].log.read_text(), nodes[1].log
    # the CSV log is one history whoever is rank 0 (the leaver was): one
    # version folder, the first rank 0's steps and the last one's, no gap
    # beyond the flush interval (a rank 0 killed loses what it buffered)
    versions = sorted(p.name for p in (tmp_path / "run" / "csv").iterdir())
    assert versions == ["version_0"], versions
    with open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", newline="") as f:
        logged = sorted({int(row["step"]) for row in csv.DictReader(f)})
    assert logged[0] <= 5 and logged[-1] == done[0]["global_step"], logged
    assert all(b - a <= 10 for a, b in zip(logged, logged[1:])), f"a gap in the history: {logged}"
    first, late = nodes[1], nodes[3]
    applied = [r["applied"] for r in first.records if r["event"] == "step"]
    # the kill -9 failed a step: the survivors finished it in the next group
    # (killed inside it), or it applied nothing (killed between steps: the
    # next step failed before it was reduced, ... or finished too)
    switches = next(r for r in first.records if r["event"] == "done")["switches"]
    assert False in applied or any(e.get("finished_step") for e in switches), switches
    assert done[0]["global_step"] == sum(applied), "a failed step counts nowhere"
    assert done[0]["scheduler"] == done[0]["global_step"], "the scheduler stepped once per applied step"
    vals = {r["epoch"]: r["loss"] for r in first.records if r["event"] == "val"}
    late_vals = {r["epoch"]: r["loss"] for r in late.records if r["event"] == "val"}
    assert late_vals and set(late_vals) <= set(vals), (vals, late_vals)
    assert all(late_vals[e] == vals[e] for e in late_vals), "the same reduced validation loss"
    for node in (first, late):  # one row per member in rank order, or (a member died meanwhile) its own, logged
        fell_back = "chaos: all_gather failed" in node.log.read_text()
        for r in (r for r in node.records if r["event"] == "val"):
            assert r["ranks"] == [float(i) for i in range(r["world"])] or (fell_back and r["ranks"] == [r["rank"]]), r
    assert late.records[0]["event"] == "ready" and "joined in the cluster's epoch" not in late.log.read_text()


@pytest.mark.timeout(180)
def test_a_fabric_straggler_steps_down_stands_by_and_comes_back_identical(tmp_path):
    """Two Fabric processes, adaptive shares; node 1 spends 0.2 s more per
    step until it has stepped down once.  Its share falls to nothing, then
    it steps down at a step boundary (``optimizer.step``), stands by for
    ``CHAOS_STRAGGLER_RETRY`` at the next batch while the founder trains
    alone, comes back as a newcomer, and the two end as replicas of each
    other, every sample of every epoch once."""
    epochs = 3
    env = lambda i: {"CHAOS_SHARES": "adaptive", "CHAOS_STRAGGLER_RETRY": "1", "CHAOS_RECORD_SAMPLES": "1",  # noqa: E731
                     **({"CHAOS_TEST_SLOW_UNTIL_BACK": "0.2", "CHAOS_MIN_NODES": "1"} if i == 1 else {})}
    nodes = cluster(WORKER, [str(SAMPLES), str(epochs), "0.02", "1"], 2, tmp_path, prefix="down", env=env)
    try:
        done = [x.event("done", 150) for x in nodes]
        for x in nodes:
            assert x.exit_code(30) == 0, x.log
            assert "Traceback" not in x.log.read_text(), x.log
        slow = nodes[1].log.read_text()
        assert "steps down to a standby" in slow and "back in the cluster" in slow, nodes[1].log
        worlds = [r["world"] for r in nodes[0].records if r["event"] == "step"]
        assert 1 in worlds and worlds[-1] == 2, worlds
        keys = ("params", "optim", "scheduler", "global_step")
        assert len({tuple(repr(r[k]) for k in keys) for r in done}) == 1, done
        for epoch in range(epochs):
            counts = dict(done[0]["epochs"][str(epoch)])
            assert sorted(counts) == list(range(SAMPLES)) and set(counts.values()) == {1}, f"epoch {epoch}"
    finally:
        for x in nodes:
            x.stop()


@pytest.mark.timeout(120)
def test_two_optimizers_are_refused_with_one_line(tmp_path):
    script = tmp_path / "two.py"
    script.write_text(
        "import chaos_lightning, torch\n"
        "from lightning.fabric import Fabric\n"
        "fabric = Fabric(strategy='chaos', accelerator='cpu', devices=1)\n"
        "fabric.launch()\n"
        "a, b = torch.nn.Linear(2, 2), torch.nn.Linear(2, 2)\n"
        "fabric.setup(a, torch.optim.SGD(a.parameters(), 0.1))\n"
        "fabric.setup(b, torch.optim.SGD(b.parameters(), 0.1))\n"
    )
    (node,) = cluster(script, [], 1, tmp_path, prefix="two")
    try:
        assert node.exit_code(90) != 0
        assert "chaos (Fabric): one optimizer per training step" in node.log.read_text()
    finally:
        node.stop()


@pytest.mark.timeout(120)
def test_an_epoch_that_ends_inside_an_accumulation_window_is_refused_with_one_line(tmp_path):
    """Three batches an epoch, a step every second one: the third is drawn
    and never stepped.  Its samples would be neither trained nor handed to
    the next epoch, so the loop stops there with the rule to follow; the
    same loop stepping also at ``i + 1 == len(train)`` trains every epoch."""
    script = tmp_path / "window.py"
    script.write_text(
        "import json, sys, chaos_lightning, torch\n"
        "from lightning.fabric import Fabric\n"
        "from torch.utils.data import DataLoader, TensorDataset\n"
        "fabric = Fabric(strategy='chaos', accelerator='cpu', devices=1)\n"
        "fabric.launch()\n"
        "model = torch.nn.Linear(2, 1)\n"
        "model, opt = fabric.setup(model, torch.optim.SGD(model.parameters(), 0.1))\n"
        "train = fabric.setup_dataloaders(DataLoader(TensorDataset(torch.randn(24, 2), torch.randn(24, 1)), batch_size=8))\n"
        "close_last = sys.argv[1] == 'close'\n"
        "for epoch in fabric.strategy.epochs(2):\n"
        "    for i, (x, y) in enumerate(train):\n"
        "        fabric.backward(torch.nn.functional.mse_loss(model(x), y))\n"
        "        if (i + 1) % 2 == 0 or (close_last and i + 1 == len(train)):\n"
        "            opt.step(); opt.zero_grad()\n"
        "print(json.dumps({'event': 'done', 'steps': fabric.strategy.global_step}), flush=True)\n"
    )
    (bad,) = cluster(script, ["open"], 1, tmp_path, prefix="open")
    (good,) = cluster(script, ["close"], 1, tmp_path, prefix="close")
    try:
        assert bad.exit_code(90) != 0
        text = bad.log.read_text()
        assert "chaos (Fabric): the epoch ended with 1 batch(es) drawn since the last optimizer.step()" in text, bad.log
        assert good.event("done", 90)["steps"] == 4, good.log  # two windows an epoch, two epochs
        assert good.exit_code(30) == 0, good.log
    finally:
        bad.stop()
        good.stop()
