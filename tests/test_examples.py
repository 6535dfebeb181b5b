"""The runnable examples in ``examples/`` train with ``strategy="chaos"`` on two nodes.

Each test starts two real processes at once (``CHAOS_MIN_NODES=2``, the
founder is rank 0) with tiny settings given by the examples' own flags, and
reads the JSON summary each prints last: both exit 0, the summaries are
identical (epoch losses and validation metrics reduced over the nodes, world
size, global step, parameter digest; the generated sample for the language
model) and the loss went down.  Only the founder (rank 0 throughout) writes
checkpoints.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest

from _procs import REPO, Node, Record, cluster, finish

EXAMPLES = REPO / "examples"
K = 2


def run_pair(script: str, flags: list[str], tmp: Path, timeout: float, shared_root: bool = False) -> list[Record]:
    """Two nodes of ``examples/<script>`` with ``flags`` (each its own
    ``--root-dir``, or one for both); their ``done`` summaries, once both exited 0."""
    nodes: list[Node] = []
    try:
        # one intra-op thread each: two nodes on two cores would otherwise oversubscribe them
        nodes = cluster(
            EXAMPLES / script, lambda i: [*flags, "--root-dir", str(tmp / ("root" if shared_root else f"root{i}"))], K, tmp,
            env={"OMP_NUM_THREADS": "1"},
        )
        return finish(nodes, timeout)
    finally:
        for n in nodes:
            n.stop()


def comparable(rec: Record) -> dict[str, Any]:
    """The summary without what legitimately differs per node."""
    return {k: v for k, v in rec.items() if k not in ("pid", "_t")}


def assert_trained(done: list[Record], epochs: int, validations: int) -> None:
    """Identical summaries; ``epochs`` training epochs (the last one maybe
    cut short by ``--max-steps``: it still logs its mean loss) and
    ``validations`` validation runs; both losses fell."""
    a = comparable(done[0])
    for other in done[1:]:
        assert comparable(other) == a, done
    assert a["world_size"] == K and not a["interrupted"], a
    assert len(a["train_loss"]) == epochs and len(a["val_loss"]) == len(a["val_acc"]) == validations, a
    assert a["train_loss"][-1] < a["train_loss"][0], a["train_loss"]
    assert a["val_loss"][-1] < a["val_loss"][0], a["val_loss"]


def assert_only_founder_checkpoints(tmp: Path) -> None:
    ckpts = sorted(p.relative_to(tmp).parts[0] for p in tmp.glob("root*/**/last.ckpt"))
    assert ckpts == ["root0"], ckpts


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_image_classifier_on_two_nodes(tmp_path: Path) -> None:
    """The CNN on 2,048 synthetic gratings, 3 epochs of 32 steps (global
    batch 64): identical summaries, falling losses, accuracy well above
    chance (1/8; about 0.9 by then).  Both nodes share one root dir, as two
    nodes on one machine would: there is one log and checkpoint folder,
    ``version_0`` (no node writes one before it knows it is rank 0)."""
    epochs, train = 3, 2048
    done = run_pair(
        "image_classifier.py",
        ["--epochs", str(epochs), "--train-size", str(train), "--val-size", "256", "--batch-size", "32", "--seed", "1"],
        tmp_path, 75, shared_root=True,
    )
    assert_trained(done, epochs, epochs)
    assert done[0]["epochs"] == epochs
    assert done[0]["global_step"] == epochs * train // (K * 32)
    assert done[0]["val_acc"][-1] > 0.5, done[0]["val_acc"]
    root = tmp_path / "root"
    assert {p.parent.parent.name for p in root.glob("**/last.ckpt")} == {"version_0"}
    assert {p.parent.name for p in root.glob("**/metrics.csv")} == {"version_0"}
    assert {p.name for p in root.glob("*/version_*")} == {"version_0"}
    assert list(root.glob("*/version_0/hparams.yaml"))


@pytest.mark.slow
@pytest.mark.timeout(90)
def test_language_model_on_two_nodes(tmp_path: Path) -> None:
    """The character transformer on the first 6,000 characters of Python's
    help text, stopped by ``--max-steps`` inside the third epoch (validation
    runs after the two full ones): identical summaries and greedy samples,
    falling losses."""
    max_steps = 50
    done = run_pair(
        "language_model.py",
        ["--epochs", "5", "--max-steps", str(max_steps), "--max-chars", "6000", "--block", "32", "--dim", "32",
         "--batch-size", "8", "--sample-length", "40", "--seed", "1"],
        tmp_path, 75,
    )
    # 5,400 training characters in windows of 32 every 16: 336 windows, 21 steps per epoch
    assert_trained(done, 3, 2)
    assert done[0]["global_step"] == max_steps
    assert len(done[0]["sample"]) > 40
    assert_only_founder_checkpoints(tmp_path)
