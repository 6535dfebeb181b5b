"""Ordinary Trainer features through a join, a leave and a ``kill -9``.

Each feature is a small outside-style project (``_dropin_worker.py``) run
as real processes: three founders; a fourth joins mid-fit; once it trains,
the founder that is rank 0 is SIGTERMed (a graceful leave: rank 0 moves);
once the view without it commits, another is ``kill -9``ed.  The founder that stays and the joiner
must end as replicas of each other (parameters, optimizer, ``global_step``,
every optimizer's step count, the callbacks' state), every sample of every
epoch trained exactly once, the leaver exit 0, and the feature's own
invariant hold: validation at the same global steps on every member
(``valmid``: issue 12 saw a join kill every process when the joiner's batch
index ran behind and it validated at other steps), a manual-optimization
joiner counting the members' steps (``manual``: the joiner's ``global_step``
was 82 against 124), LightningCLI writing one ``config.yaml`` and its
loggers keeping one folder each (``cli``).

One test is a join alone (``valevery``): with validation after every batch,
the newcomer is always admitted at a step where validation is due, and the
members skip that one validation.
"""

from __future__ import annotations

import csv
import re
import signal
from pathlib import Path

import pytest

from _dropin_worker import DECAY, LR
from _procs import Node, churn_cluster, cluster, finish, joiner

WORKER = Path(__file__).with_name("_dropin_worker.py")
SAMPLES, EPOCHS, SLEEP = 480, 4, 0.25  # 20 steps an epoch at world 3


def churn(feature: str, tmp: Path, **kw) -> tuple[list[Node], list[dict]]:
    return churn_cluster(WORKER, [feature, str(SAMPLES), str(EPOCHS), str(SLEEP), str(tmp / "run")], tmp, feature, **kw)


def check_replicas_and_exactly_once(done: list[dict]) -> None:
    keys = ("params", "buffers", "optim", "global_step", "optimizer_steps", "callbacks", "scaler")
    assert len({tuple(repr(r[k]) for k in keys) for r in done}) == 1, done
    for epoch in range(EPOCHS):
        counts = dict(done[0]["epochs"][str(epoch)])  # the founder saw every epoch
        assert sorted(counts) == list(range(SAMPLES)) and set(counts.values()) == {1}, f"epoch {epoch}"


def check_failed_steps_uncounted(node: Node, done: dict, steps_per_batch: int) -> None:
    """A step whose all-reduce failed (the kill -9) is flagged to the user's
    hook and counts nowhere: ``global_step`` is the applied batches' steps."""
    applied = [r["applied"] for r in node.records if r["event"] == "step"]
    assert done["global_step"] == steps_per_batch * sum(applied), (done["global_step"], applied.count(False))


def steps_of(node: Node, event: str) -> list[int]:
    return [r["step"] for r in node.records if r["event"] == event]


@pytest.mark.timeout(360)
def test_validation_mid_epoch_early_stopping_and_top_k_checkpoints_survive_churn(tmp_path):
    nodes, done = churn("valmid", tmp_path)
    first, late = nodes[1], nodes[3]
    check_replicas_and_exactly_once(done)
    check_failed_steps_uncounted(first, done[0], 1)
    joined_at = steps_of(late, "step")[0]
    member_vals = [s for s in steps_of(first, "val") if s >= joined_at]
    assert member_vals, "validation ran after the join"
    assert steps_of(late, "val") == member_vals, "validation at the same global steps"
    assert [r["batch"] for r in late.records if r["event"] == "step"][:3] == [
        r["batch"] for r in first.records if r["event"] == "step" and r["step"] >= joined_at
    ][:3], "the joiner's batch index is the members'"
    ckpt = done[0]["callbacks"]["checkpoint"]
    assert len(ckpt["best_k"]) == 2 and ckpt["best_score"] is not None
    saved = sorted(p.name for p in Path(ckpt["dirpath"]).glob("*.ckpt"))
    assert set(ckpt["best_k"]) <= set(saved), (ckpt, saved)
    # one log history whoever is rank 0: one version folder, and its
    # metrics.csv holds the first rank 0's steps and the last one's
    versions = sorted(p.name for p in (tmp_path / "run" / "csv").iterdir())
    assert versions == ["version_0"], versions
    with open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", newline="") as f:
        logged = sorted({int(row["step"]) for row in csv.DictReader(f)})
    assert logged[0] < joined_at and logged[-1] >= done[0]["global_step"] - 10, logged
    assert all(b - a <= 10 for a, b in zip(logged, logged[1:])), f"a gap in the history: {logged}"


@pytest.mark.timeout(180)
def test_a_join_where_validation_is_due_skips_that_one_validation_on_every_member(tmp_path):
    """Validation after every batch (``val_check_interval=1``): the step
    boundary a newcomer is admitted at is always one where validation is
    due.  The newcomer starts at the next batch, so the members skip that
    one validation (a validation there would be a collective the newcomer
    never enters) and log it; from the join on, every member validates at
    the same global steps, and at every step but the skipped one."""
    argv = ["valevery", str(SAMPLES), str(EPOCHS), str(SLEEP), str(tmp_path / "run")]
    founders = cluster(WORKER, argv, 3, tmp_path, prefix="valevery")
    nodes = list(founders)
    try:
        for node in founders:
            node.event("ready", 90)
        founders[0].wait(lambda r: r["event"] == "step" and r["step"] >= 2, 120)
        nodes.append(joiner(WORKER, argv, founders[1], tmp_path, "valevery-joiner"))
        done = finish(nodes, 150)
    finally:
        for node in nodes:
            node.stop()
    late = nodes[3]
    check_replicas_and_exactly_once(done)
    joined_at = steps_of(late, "step")[0]  # the first batch after the one the members ended at the join
    skipped = {}
    for node in nodes:
        text = node.log.read_text()
        assert "Traceback" not in text, node.log
        skipped[node.log.name] = [int(s) for s in re.findall(
            r"the validation due at step (\d+) is skipped: a newcomer joined there", text)]
    assert list(skipped.values()) == [[joined_at - 1]] * 3 + [[]], (skipped, joined_at)  # every member, once
    for node in founders:
        assert joined_at - 1 in steps_of(node, "step"), node.log
        vals = steps_of(node, "val")
        assert joined_at - 1 not in vals, f"{node.log} validated at the skipped step"
        assert vals == [s for s in steps_of(node, "step") if s != joined_at - 1], f"{node.log}: one validation skipped"
        assert [s for s in vals if s >= joined_at] == steps_of(late, "val"), "validation at the same global steps"
    assert steps_of(late, "val") == steps_of(late, "step"), "the newcomer validates after each of its batches"


@pytest.mark.timeout(360)
def test_manual_optimization_with_two_optimizers_counts_the_members_steps(tmp_path):
    """Two optimizers, two gradient reductions a batch.  The victim dies
    between them (it SIGKILLs itself right after ``opt_d.step()``): the
    survivors' first reduction and ``opt_d`` step succeeded, the second
    reduction fails, and ``opt_d``'s step must be undone, or the batch trained
    again would step the discriminator twice (its step count one ahead)."""
    nodes, done = churn("manual", tmp_path, kill=lambda n: n.proc.send_signal(signal.SIGUSR1))
    check_replicas_and_exactly_once(done)
    check_failed_steps_uncounted(nodes[1], done[0], 2)
    steps = done[0]["optimizer_steps"]
    assert done[0]["global_step"] == sum(steps) and steps[0] == steps[1] > 0, done[0]
    undone = [n.log for n in (nodes[1], nodes[3]) if "undoing its 1 optimizer step(s)" in n.log.read_text()]
    assert undone, "a survivor undid the first optimizer's step"


@pytest.mark.timeout(120)
def test_an_iterable_dataset_is_refused_at_setup_with_one_line(tmp_path):
    (node,) = cluster(WORKER, ["stream", "64", "1", "0", str(tmp_path / "run")], 1, tmp_path, prefix="stream")
    try:
        assert node.exit_code(90) != 0
        text = node.log.read_text()
        assert "chaos: the training data is an IterableDataset; elastic exactly-once needs a map-style Dataset" in text
        assert "has no len()" not in text, "refused before torch trips over the stream"
    finally:
        node.stop()


@pytest.mark.timeout(360)
def test_lightning_cli_writes_one_config_and_the_loggers_keep_one_folder_through_churn(tmp_path):
    """LightningCLI with a TensorBoard and a CSV logger: issue 12 saw every
    process write its own ``config.yaml`` and TensorBoard split over two
    version folders when rank 0 moved.  Here rank 0 moves (the leaver) and
    a node joins: one ``config.yaml`` in the run's folder, one version
    folder per logger, event files from both ranks 0 in the one folder."""
    nodes, done = churn("cli", tmp_path)
    check_replicas_and_exactly_once(done)
    run = tmp_path / "run"
    configs = sorted(str(p.relative_to(run)) for p in run.rglob("config.yaml"))
    assert configs == ["tb/version_0/config.yaml"], configs
    for name in ("tb", "csv"):
        versions = sorted(p.name for p in (run / name).iterdir())
        assert versions == ["version_0"], (name, versions)
    events = list((run / "tb" / "version_0").glob("events.out.tfevents.*"))
    assert len(events) >= 2, f"the first and the new rank 0 write into one folder: {events}"
    with open(run / "csv" / "version_0" / "metrics.csv", newline="") as f:
        logged = sorted({int(row["step"]) for row in csv.DictReader(f)})
    assert logged[-1] >= done[0]["global_step"] - 10, logged


@pytest.mark.timeout(360)
def test_batchnorm_buffers_an_fp16_scaler_and_a_step_schedule_stay_in_lockstep_through_churn(tmp_path):
    """BatchNorm's running statistics move in every rank's forward: they must
    end identical on every replica (rank 0's each step, restored after the
    failed step of the kill).  Under fp16 AMP with a gradient scaler (a
    failed step must not reach it with no gradient: its AssertionError would
    end the job), whose scale must end equal too.  With a per-step schedule
    that ``LearningRateMonitor`` logs: the logged learning rate at every
    step is the schedule's at that many applied steps (a failed step counts
    nowhere), whoever was rank 0 when it was written."""
    nodes, done = churn("norm", tmp_path)
    check_replicas_and_exactly_once(done)
    check_failed_steps_uncounted(nodes[1], done[0], 1)
    assert done[0]["scaler"]["scale"] > 0, done[0]
    versions = sorted(p.name for p in (tmp_path / "run" / "csv").iterdir())
    assert versions == ["version_0"], versions
    with open(tmp_path / "run" / "csv" / "version_0" / "metrics.csv", newline="") as f:
        rates = {int(row["step"]): float(row["lr-Adam"]) for row in csv.DictReader(f) if row.get("lr-Adam")}
    assert len(rates) >= done[0]["global_step"] // 2, sorted(rates)
    for step, lr in rates.items():
        assert lr == pytest.approx(LR * DECAY**step, rel=1e-6), (step, lr)
