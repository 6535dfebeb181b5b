"""A ``bf16-true`` project on 3 nodes at batch 101, then a fourth joining.

Issue 11 found the step's control record riding in the gradients' dtype: in
bfloat16 three ranks' 101 samples summed to 304, and every step logged
``ranks trained 304 samples, the layout says 303``.  The record is int64 now
(``strategy/switch.py``); this runs the project a user would write and checks
what they would see: no such line in any log, exit 0, bfloat16 parameters
throughout, the joiner pulling bfloat16 state, identical replicas, equal
``global_step`` and every sample of every epoch trained exactly once.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from _procs import cluster, finish, joiner

WORKER = Path(__file__).with_name("_bf16_worker.py")
N, EPOCHS, SLEEP = 3 * 101 * 6, 6, 0.5  # 6 full steps an epoch at 3 nodes; room for a join


@pytest.mark.timeout(240)
def test_bf16_true_three_nodes_batch_101_then_a_join_keeps_the_layout_and_the_replicas(tmp_path):
    argv = [str(N), str(EPOCHS), str(SLEEP)]
    nodes = cluster(WORKER, argv, 3, tmp_path, prefix="bf")
    try:
        for node in nodes:
            node.event("ready", 60)
        nodes[0].wait(lambda r: r["event"] == "step" and r["step"] >= 3, 120)
        nodes.append(joiner(WORKER, argv, nodes[0], tmp_path, "bf3"))
        results = finish(nodes, 180)
        assert len({(r["params"], r["optim"], r["global_step"]) for r in results}) == 1, results
        assert {r["dtype"] for r in results} == {"torch.bfloat16"}
        for r in results[:3]:
            for epoch in range(EPOCHS):
                counts = dict(r["epochs"][str(epoch)])
                assert sorted(counts) == list(range(N)) and set(counts.values()) == {1}, f"epoch {epoch}"
        steps = [rec for rec in nodes[0].records if rec["event"] == "step"]
        assert {rec["world"] for rec in steps} == {3, 4}, "the fourth node trained with the founders"
        assert {rec["batch"] for rec in steps if rec["world"] == 3} == {101}
        for node in nodes:
            text = node.log.read_text()
            assert "layout says" not in text, node.log
            assert "Traceback" not in text, node.log
    finally:
        for node in nodes:
            node.stop()
