"""Lightning's own demo modules train unmodified with ``strategy="chaos"``.

``lightning.pytorch.demos.BoringModel`` (its own train and validation loaders:
64 random samples each, batch 1, no shuffle; SGD(lr=0.1) with
``StepLR(step_size=1)``, so gamma 0.1 per epoch) and ``DemoModel`` (Adam, on
``RandomDataset(32, 256)`` with batch 8, shuffled) run as shipped, with
Lightning's default ``Trainer`` otherwise: its default logger (TensorBoard with
tensorboardX installed, else CSV), ``ModelCheckpoint``,
sanity check and a validation loop every epoch.  Only a callback observes
(``tests/_demo_worker.py``).  Real processes, real gloo.
"""

from __future__ import annotations

import math
import signal
from pathlib import Path

import pytest

from _procs import Node, Record, cluster, finish, run_to_end
from _procs import joiner as start_joiner

WORKER = Path(__file__).with_name("_demo_worker.py")
K = 3


def start(k: int, tmp: Path, model: str, epochs: int, env: dict[str, str] | None = None) -> list[Node]:
    """``k`` nodes started at once; training starts with all ``k`` (the
    founder is rank 0 of the first view)."""
    return cluster(WORKER, lambda i: [model, str(epochs), str(tmp / f"root{i}")], k, tmp, env=env)


def assert_replicas_identical(done: list[Record]) -> None:
    assert len({(r["params"], r["optim"], r["global_step"], tuple(r["lr"])) for r in done}) == 1, done


@pytest.mark.timeout(90)
def test_boring_model_fits_on_three_nodes_with_validation_and_checkpointing(tmp_path: Path) -> None:
    """Three nodes fit ``BoringModel`` for 3 epochs: fit completes on each
    (``on_train_end``, not interrupted), replicas end identical (parameters,
    global step, learning rate), each epoch has ceil(64 / 3) = 22 steps (the
    last one trains a single sample, the other two ranks weigh in with zero),
    the scheduler decayed the learning rate 0.1 -> 1e-4, every rank ran the
    sanity check (2 batches) and validated its third of the validation set
    (22 batches) every epoch, and only rank 0 wrote the checkpoint and the
    CSV log."""
    epochs = 3
    nodes = start(K, tmp_path, "boring", epochs)
    done = run_to_end(nodes, 75)
    assert_replicas_identical(done)
    steps = math.ceil(64 / K)
    for r in done:
        assert r["train_ended"] and not r["interrupted"] and r["epochs_completed"] == epochs, r
        assert r["global_step"] == epochs * steps and r["world"] == K
        assert r["lr"][0] == pytest.approx(0.1 * 0.1**epochs)
        assert r["val_batches"] == {"sanity": 2, **{str(e): steps for e in range(epochs)}}, r["val_batches"]
    ckpts = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.glob("root*/**/*.ckpt"))
    assert ckpts == [f"root0/lightning_logs/version_0/checkpoints/epoch={epochs - 1}-step={epochs * steps}.ckpt"], ckpts
    # Lightning's default logger: TensorBoard where tensorboard(X) is
    # installed (the dev extra has tensorboardX), CSV otherwise
    logs = [*tmp_path.glob("root*/lightning_logs/*/metrics.csv"), *tmp_path.glob("root*/lightning_logs/*/events.out.*")]
    assert [p.parents[2].name for p in logs] == ["root0"], logs


@pytest.mark.timeout(90)
def test_demo_model_fits_on_three_nodes(tmp_path: Path) -> None:
    """Three nodes fit ``DemoModel`` (no validation step) on a shuffled
    ``RandomDataset(32, 256)``, batch 8 per rank, for 2 epochs: 256 samples in
    blocks of 24 make 11 steps per epoch (the last block of 16 split 6/5/5);
    fit completes on each and parameters and Adam state end identical."""
    epochs = 2
    nodes = start(K, tmp_path, "demo", epochs)
    done = run_to_end(nodes, 75)
    assert_replicas_identical(done)
    for r in done:
        assert r["train_ended"] and not r["interrupted"] and r["epochs_completed"] == epochs, r
        assert r["global_step"] == epochs * math.ceil(256 / (8 * K)) and r["val_batches"] == {}, r


@pytest.mark.timeout(120)
def test_boring_model_through_a_leave_and_a_join(tmp_path: Path) -> None:
    """``BoringModel`` with churn: three nodes start, node 2 gets SIGTERM in
    epoch 1 and leaves; at the first step of the next epoch (world 2) a fourth
    process (warm since the start) joins through node 1.  The three that finish end identical,
    learning rate included: the joiner's ``StepLR`` must continue the
    members' schedule (0.1 * 0.1**epochs at the end), not restart at 0.1.
    Validation follows the world: an epoch that ends at world w validates
    ceil(64 / w) batches per rank (the validation loader is rebuilt for the
    new world after each switch)."""
    epochs = 8
    slow = {"DEMO_STEP_SLEEP": "0.05"}
    nodes = start(K, tmp_path, "boring", epochs, slow)
    gate = tmp_path / "join-now"
    joiner = start_joiner(
        WORKER, ["boring", str(epochs), str(tmp_path / "root-joiner")], nodes[1], tmp_path, "joiner",
        {"DEMO_GATE": str(gate), **slow},
    )
    leaver, finishers = nodes[2], [nodes[0], nodes[1], joiner]
    try:
        leaver.wait(lambda r: r["event"] == "step" and r["step"] >= 30, 60)
        leaver.proc.send_signal(signal.SIGTERM)
        left = leaver.event("done", 30)
        assert leaver.exit_code(30) == 0, leaver.log
        # open the gate at the start of an epoch run at world 2 (32 steps of
        # >= 50 ms): the join (~1 s) lands mid-epoch, never at an epoch's last
        # step (see the last-step test below)
        start_epoch = left["epochs_completed"] + 1
        nodes[0].wait(lambda r: r["event"] == "step" and r["world"] == 2 and r["epoch"] == start_epoch, 30)
        joiner.event("ready", 60)
        gate.touch()
        first = joiner.event("step", 30)
        done = finish(finishers, 60)
    finally:
        for n in [*nodes, joiner]:
            n.stop()
    assert_replicas_identical(done)
    assert first["world"] == 3 and first["step"] > left["global_step"]
    for r in done:
        assert r["train_ended"] and not r["interrupted"] and r["epochs_completed"] == epochs, r
        assert r["lr"][0] == pytest.approx(0.1 * 0.1**epochs), r["lr"]
    # the world each epoch of node 0 ended with, and the validation batches it ran then
    last_world: dict[int, int] = {}
    for rec in nodes[0].records:
        if rec["event"] == "step":
            last_world[rec["epoch"]] = rec["world"]
    print(f"left at step {left['global_step']}, joined at step {first['step']}; epoch -> world {last_world}; "
          f"val batches: node0 {done[0]['val_batches']}, joiner {done[2]['val_batches']}")
    worlds = [rec["world"] for rec in nodes[0].records if rec["event"] == "step"]
    assert [w for i, w in enumerate(worlds) if i == 0 or w != worlds[i - 1]] == [3, 2, 3]
    for e, w in last_world.items():
        assert done[0]["val_batches"][str(e)] == math.ceil(64 / w), (e, w, done[0]["val_batches"])
    assert done[2]["val_batches"][str(epochs - 1)] == math.ceil(64 / 3), done[2]["val_batches"]


@pytest.mark.timeout(90)
def test_a_node_joining_while_the_members_validate_trains_with_them(tmp_path: Path) -> None:
    """A join that lands at the end of an epoch, while the members run the
    validation loop (each validation batch made slow by the callback, so the
    window is ~2 s): the joiner must train the next epochs with them and end
    identical."""
    epochs = 3
    nodes = start(K, tmp_path, "boring", epochs, {"DEMO_VAL_SLEEP": "0.1"})
    gate = tmp_path / "join-now"
    joiner = start_joiner(
        WORKER, ["boring", str(epochs), str(tmp_path / "root-joiner")], nodes[1], tmp_path, "joiner",
        {"DEMO_GATE": str(gate), "DEMO_VAL_SLEEP": "0.1"},
    )
    try:
        joiner.event("ready", 60)
        nodes[0].event("val_start", 60)
        gate.touch()
        done = finish([*nodes, joiner], 60)
    finally:
        for n in [*nodes, joiner]:
            n.stop()
    print({"joiner": done[-1], "member": done[0]})
    assert any(r["event"] == "step" for r in joiner.records), "the joiner trained"
    assert_replicas_identical(done)


@pytest.mark.timeout(90)
def test_a_node_joining_at_the_last_step_of_an_epoch_trains_with_them(tmp_path: Path) -> None:
    """The members pause 4 s after global step 21, before the last of epoch
    0's 22 steps; the joiner joins in that pause, so the members switch views
    at the boundary of the epoch's last step and the joiner receives a
    sampler with no step left in the epoch.  It must go on to the next epoch
    with them (and not end ``fit``): the members defer that switch to the
    next epoch's first step."""
    epochs = 3
    nodes = start(K, tmp_path, "boring", epochs, {"DEMO_PAUSE_AFTER_STEP": "21"})
    gate = tmp_path / "join-now"
    joiner = start_joiner(
        WORKER, ["boring", str(epochs), str(tmp_path / "root-joiner")], nodes[1], tmp_path, "joiner",
        {"DEMO_GATE": str(gate)},
    )
    try:
        joiner.event("ready", 60)
        nodes[0].wait(lambda r: r["event"] == "step" and r["step"] == 21, 60)
        gate.touch()
        done = finish([*nodes, joiner], 60)
    finally:
        for n in [*nodes, joiner]:
            n.stop()
    print({"joiner": done[-1], "member": done[0]})
    assert any(r["event"] == "step" for r in joiner.records), "the joiner trained"
    assert_replicas_identical(done)
