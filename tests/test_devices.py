"""``devices=N``: one ``python train.py`` per node starts the node's other processes.

Each process is a member of its own (its ``LOCAL_RANK``, its port), so one
process of a node can die and the rest of the cluster, that node's first
process included, trains on.  Real processes on loopback: a single-device
node founds the cluster, a ``devices=2`` node (Trainer and Fabric) joins
with both its processes; once the three train together, the second
process of the two-device node is ``kill -9``ed.
"""

from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from _procs import Node, finish
from chaos_lightning.testbed.procs import free_port

HERE = Path(__file__).parent
TRAINER, FABRIC = HERE / "_train_worker.py", HERE / "_fabric_worker.py"
ARGV = {TRAINER: ["192", "3", "0.15"], FABRIC: ["192", "3", "0.15", "1"]}


def two_nodes(script: Path, tmp: Path) -> tuple[Node, Node]:
    founder = f"127.0.0.1:{free_port()}"
    common = {"CHAOS_MIN_NODES": "3"}
    one = Node(script, ARGV[script], {**common, "CHAOS_BIND": founder}, tmp / "one.log")
    # port 0: the launcher picks a free one for the first process, the second binds its own
    two = Node(script, ARGV[script], {**common, "CHAOS_BIND": "127.0.0.1:0", "CHAOS_PEERS": founder,
                                      "CHAOS_TEST_DEVICES": "2"}, tmp / "two.log", own_group=True)
    return one, two


def both_train(two: Node) -> tuple[int, int]:
    """The pids of the two-device node's processes, once both train in a world of three."""
    first, second = (r["pid"] for r in (two.event("ready", 90), two.wait(
        lambda r: r["event"] == "ready" and r["pid"] != two.proc.pid, 90)))
    assert first == two.proc.pid, "the node's first process reports first"
    for pid in (first, second):
        two.wait(lambda r, pid=pid: r.get("pid", pid) == pid and r["event"] == "step" and r["world"] == 3, 120)
    return first, second


def check_replicas(done: list[dict], samples: int = 192, epochs: int = 3) -> None:
    keys = ("params", "optim", "global_step")
    assert len({tuple(r[k] for k in keys) for r in done}) == 1, done
    for epoch in range(epochs):
        counts = dict(done[0]["epochs"][str(epoch)])
        assert sorted(counts) == list(range(samples)) and set(counts.values()) == {1}, f"epoch {epoch}"


@pytest.mark.timeout(300)
@pytest.mark.parametrize("script", [TRAINER, FABRIC], ids=["trainer", "fabric"])
def test_a_two_device_node_starts_its_second_process_and_survives_losing_it(tmp_path, script):
    one, two = two_nodes(script, tmp_path)
    try:
        first, second = both_train(two)
        one.wait(lambda r: r["event"] == "step" and r["world"] == 3, 60)
        os.kill(second, signal.SIGKILL)
        done = finish([one], 180) + [two.wait(lambda r: r["event"] == "done" and r["pid"] == first, 60)]
        assert two.exit_code(60) == 0, two.log
    finally:
        one.stop()
        two.stop()
    check_replicas(done)
    text = two.log.read_text()
    assert "devices=2: started local ranks 1-1" in text, two.log
    assert not [r for r in two.records if r["event"] == "done" and r["pid"] == second]


@pytest.mark.timeout(300)
def test_a_whole_two_device_node_leaves_on_one_sigterm_to_its_process_group(tmp_path):
    """``kill -TERM -PGID`` (a node shut down) makes both of its processes
    leave at a step boundary and exit 0; the single-device node trains the
    rest alone, every sample once.  (``kill -KILL -PGID`` here would take two
    of the three members at once: the survivor is a minority of its view and
    waits, the quorum rule issue 14 is about.)"""
    one, two = two_nodes(TRAINER, tmp_path)
    try:
        first, second = both_train(two)
        one.wait(lambda r: r["event"] == "step" and r["world"] == 3, 60)
        os.killpg(two.proc.pid, signal.SIGTERM)
        one.wait(lambda r: r["event"] == "step" and r["world"] == 1, 90)
        (alone,) = finish([one], 180)
        left = [two.wait(lambda r, pid=pid: r["event"] == "done" and r["pid"] == pid, 60) for pid in (first, second)]
        assert all(r["left"] for r in left), left
        assert two.exit_code(60) == 0, two.log
        assert left[0]["global_step"] == left[1]["global_step"] <= alone["global_step"]
    finally:
        one.stop()
        two.stop()
    check_replicas([alone])
    assert "Traceback" not in one.log.read_text(), one.log


@pytest.mark.timeout(300)
def test_a_two_device_node_joins_a_running_fit_with_both_processes(tmp_path):
    """The single-device node trains alone first (``min_nodes=1``); a
    ``devices=2`` node started mid-fit joins with both processes, which take
    the live state: all three end identical, every sample trained once."""
    founder = f"127.0.0.1:{free_port()}"
    one = Node(TRAINER, ARGV[TRAINER], {"CHAOS_MIN_NODES": "1", "CHAOS_BIND": founder}, tmp_path / "one.log")
    two = None
    try:
        one.wait(lambda r: r["event"] == "step" and r["step"] >= 5, 120)
        two = Node(TRAINER, ARGV[TRAINER], {"CHAOS_MIN_NODES": "1", "CHAOS_BIND": "127.0.0.1:0",
                                            "CHAOS_PEERS": founder, "CHAOS_TEST_DEVICES": "2"},
                   tmp_path / "two.log", own_group=True)
        first, second = both_train(two)
        joined = [r for r in two.records if r["event"] == "step"][0]["step"]
        assert joined > 5, "the two-device node joined mid-fit"
        (alone,) = finish([one], 180)
        done = [two.wait(lambda r, pid=pid: r["event"] == "done" and r["pid"] == pid, 60) for pid in (first, second)]
        assert two.exit_code(60) == 0, two.log
    finally:
        one.stop()
        if two is not None:
            two.stop()
    check_replicas([alone, *done])


@pytest.mark.timeout(120)
def test_devices_that_disagree_with_the_outside_launcher_are_refused_with_one_line(tmp_path):
    """torchrun (or SLURM) started 2 processes on this node, the Trainer asks
    for 1 device: Lightning would fail on an index; here one line says what to set."""
    node = Node(TRAINER, ARGV[TRAINER], {"CHAOS_BIND": f"127.0.0.1:{free_port()}", "LOCAL_RANK": "1",
                                         "LOCAL_WORLD_SIZE": "2"}, tmp_path / "mismatch.log")
    try:
        assert node.exit_code(90) != 0
        text = node.log.read_text()
        assert "chaos: devices=1, but this node's launcher started 2 process(es) (LOCAL_WORLD_SIZE=2)" in text, node.log
    finally:
        node.stop()
