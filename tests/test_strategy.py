"""Trainer(strategy="chaos") with real processes and real gloo.

Scenarios: leaves, ``kill -9``, SIGSTOP hangs, joins (through the parallel
state pull), the issue's churn scenario, checkpoint resume at another world
size, a kill during validation and in an accumulation window's last step, a
joiner killed mid-pull.  Always checked: survivors finish ``fit`` without
restarting, every epoch's ledger of trained samples is an exact cover of the
dataset, and the replicas' parameters, optimizer state and ``global_step`` are
identical.  Workers: ``_train_worker.py``; processes: ``_procs.py``.
"""

from __future__ import annotations

import math
import signal
import time
from pathlib import Path

import pytest

from _procs import Node, cluster, joiner

WORKER = Path(__file__).with_name("_train_worker.py")
N, EPOCHS, SLEEP = 160, 3, 0.08


def start(
    k: int, tmp_path: Path, n: int = N, epochs: int = EPOCHS, sleep: float = SLEEP, env=None, prefix: str = "n"
) -> list[Node]:
    """k training processes started at once; training starts with all k."""
    return cluster(WORKER, [str(n), str(epochs), str(sleep)], k, tmp_path, env=env, prefix=prefix)


def join(via: Node, tmp_path: Path, name: str, n: int, epochs: int, sleep: float, env=None) -> Node:
    """A node started later that joins the running fit through ``via``."""
    return joiner(WORKER, [str(n), str(epochs), str(sleep)], via, tmp_path, name, env)


def assert_identical_and_exactly_once(results: list[dict], epochs: int = EPOCHS, n: int = N) -> None:
    assert len({(r["params"], r["optim"], r["global_step"]) for r in results}) == 1, results
    for r in results:
        for epoch in range(epochs):
            counts = dict(r["epochs"][str(epoch)])
            assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}, f"epoch {epoch}"


@pytest.mark.timeout(240)
def test_four_nodes_one_leaves_one_is_killed_survivors_finish_identical_and_exactly_once(tmp_path):
    """With gradient accumulation (windows of 2 micro-batches, one all-reduce
    each) and clipping: a failure loses the whole window, commits are per window.
    The leaver's SIGTERM lands inside a step (issue 14): it leaves at once, and
    the others finish that step without it."""
    env = {"CHAOS_TEST_ACCUM": "2", "CHAOS_TEST_CLIP": "0.5"}
    nodes = start(4, tmp_path, env=lambda i: {**env, **({"CHAOS_TEST_SIGTERM_AT": "4"} if i == 3 else {})})
    try:
        pids = [n.wait(lambda r: r["event"] == "ready", 60)["pid"] for n in nodes]
        leaver, victim, survivors = nodes[3], nodes[2], nodes[:2]
        done = leaver.wait(lambda r: r["event"] == "done", 90)
        assert done["left"]
        assert leaver.proc.wait(timeout=30) == 0
        assert "leaving inside this step; the others finish it without this node" in leaver.log.read_text()
        victim.wait(lambda r: r["event"] == "step" and r["world"] == 3 and r["step"] >= done["global_step"] + 4, 60)
        victim.proc.kill()
        results = [n.wait(lambda r: r["event"] == "done", 120) for n in survivors]
        for n in survivors:
            assert n.proc.wait(timeout=30) == 0, n.log
        assert [r["pid"] for r in results] == pids[:2], "no survivor restarted"
        assert_identical_and_exactly_once(results)
        worlds = {rec["world"] for rec in survivors[0].records if rec["event"] == "step"}
        assert {4, 3, 2} <= worlds
        for r in results:  # the step the SIGTERM cut was finished by the three others,
            # in the group each built on a helper thread as the view without the leaver committed
            assert any(s.get("finished_step") and s["world"] == 3 and s.get("ahead") for s in r["switches"]), \
                r["switches"]
    finally:
        for n in nodes:
            n.stop()


@pytest.mark.timeout(240)
def test_three_nodes_one_hangs_survivors_recover_within_detection_not_gloo_timeout(tmp_path):
    """SIGSTOP: the peer is alive but silent, so gloo never errors; the
    survivors' collective is abandoned when the membership layer confirms the
    failure (~0.6 s with the local preset), far below the 30 s collective
    timeout, and they finish the step they were in without it."""
    nodes = start(3, tmp_path)
    hung, survivors = nodes[2], nodes[:2]
    try:
        for n in nodes:
            n.wait(lambda r: r["event"] == "ready", 60)
        hung.wait(lambda r: r["event"] == "step" and r["step"] >= 5, 90)
        hung.proc.send_signal(signal.SIGSTOP)
        results = [n.wait(lambda r: r["event"] == "done", 120) for n in survivors]
        assert_identical_and_exactly_once(results)
        # the longest pause between two steps a survivor reports: detection
        # (probe + suspicion, ~0.6 s on the local preset) plus the switch
        steps = [r["_t"] for r in survivors[0].records if r["event"] == "step"]
        longest = max(b - a for a, b in zip(steps, steps[1:]))
        print(f"longest pause between steps: {longest:.2f}s; switches {results[0]['switches']}")
        assert longest < 5.0, "recovery is bounded by failure detection, not by gloo's 30 s timeout"
        assert [e["world"] for e in results[0]["switches"] if "failed_step" in e] == [2]
        # the survivors were inside the step's all-reduce when the hung node
        # was removed: they finish that step in the group of two (their own
        # gradients of it; the hung node's samples go back to the epoch),
        # rather than train it again from its start
        for r in results:
            assert [e["world"] for e in r["switches"] if e.get("finished_step")] == [2], r["switches"]
    finally:
        hung.proc.send_signal(signal.SIGCONT)
        for n in nodes:
            n.stop()


@pytest.mark.timeout(300)
def test_a_node_joins_a_running_fit_and_ends_identical(tmp_path):
    """Three nodes train; a fourth, started later, warms up, joins through a
    member that is not the founder, receives the live state in memory, and
    trains on: all four end with identical parameters, optimizer state and
    global step, and the members' epochs are still exact covers.  The cluster
    runs with a secret and ``CHAOS_ENCRYPT=1``, as across a WAN: the agents,
    the process-group stores, the status queries and the state pull all speak
    encrypted frames (a component left in plain mode would be refused)."""
    n, epochs, sleep = 240, 6, 0.1
    env = {"CHAOS_SECRET": "test-strategy-secret-0123", "CHAOS_ENCRYPT": "1",
           # a save at every step: the join's boundary has one due, which the
           # members make alone (the joiner starts at the next batch; until
           # 2026-12-07 gloo aborted a member and the joiner there)
           "CHAOS_TEST_CKPT_DIR": str(tmp_path / "ckpt"), "CHAOS_TEST_CKPT_EVERY": "1"}
    members = start(3, tmp_path, n, epochs, sleep, env=env)
    nodes = list(members)
    try:
        for m in members:
            m.wait(lambda r: r["event"] == "step" and r["step"] >= 2, 90)
        joiner = join(members[1], tmp_path, "joiner", n, epochs, sleep, env=env)
        nodes.append(joiner)
        first = joiner.wait(lambda r: r["event"] == "step", 90)
        assert first["world"] == 4 and first["step"] > 2, first
        results = [x.wait(lambda r: r["event"] == "done", 120) for x in nodes]
        for x in nodes:
            assert x.proc.wait(timeout=30) == 0, x.log
        assert_identical_and_exactly_once(results[:3], epochs, n)
        assert len({(r["params"], r["optim"], r["global_step"]) for r in results}) == 1, results
        for x in nodes:
            assert "refused connection" not in x.log.read_text(), x.log  # no component in another mode
    finally:
        for x in nodes:
            x.stop()


@pytest.mark.timeout(420)
def test_churn_scenario_start_three_join_leave_kill_join(tmp_path):
    """The issue's churn scenario, in an order a majority can always commit:
    three nodes start; a fourth joins mid-epoch; one leaves gracefully; one is
    ``kill -9``-ed mid-step; a fifth joins.  Survivors never restart, every
    epoch is an exact cover for the original survivors, and all final replicas
    are identical."""
    n, epochs, sleep = 240, 14, 0.1
    start3 = start(3, tmp_path, n, epochs, sleep)
    nodes = list(start3)
    try:
        pids = [x.wait(lambda r: r["event"] == "ready", 60)["pid"] for x in start3]
        start3[0].wait(lambda r: r["event"] == "step" and r["step"] >= 2, 90)
        j1 = join(start3[2], tmp_path, "j1", n, epochs, sleep)
        nodes.append(j1)
        first = j1.wait(lambda r: r["event"] == "step", 90)
        leaver, victim = start3[2], j1
        leaver.wait(lambda r: r["event"] == "step" and r["step"] >= first["step"] + 3, 60)
        leaver.proc.send_signal(signal.SIGTERM)
        left = leaver.wait(lambda r: r["event"] == "done", 60)
        assert left["left"] and leaver.proc.wait(timeout=30) == 0
        victim.wait(lambda r: r["event"] == "step" and r["world"] == 3 and r["step"] >= left["global_step"] + 3, 60)
        victim.proc.kill()
        j2 = join(start3[1], tmp_path, "j2", n, epochs, sleep)
        nodes.append(j2)
        survivors = start3[:2] + [j2]
        results = [x.wait(lambda r: r["event"] == "done", 180) for x in survivors]
        for x in survivors:
            assert x.proc.wait(timeout=30) == 0, x.log
        assert [r["pid"] for r in results[:2]] == pids[:2], "no survivor restarted"
        assert_identical_and_exactly_once(results[:2], epochs, n)
        assert len({(r["params"], r["optim"], r["global_step"]) for r in results}) == 1, results
        worlds = [rec["world"] for rec in start3[0].records if rec["event"] == "step"]
        assert {3, 4, 2} <= set(worlds), sorted(set(worlds))
        assert any(r["event"] == "step" and r["world"] == 3 for r in j2.records), "the second joiner trained with the others"
    finally:
        for x in nodes:
            x.stop()


@pytest.mark.timeout(300)
def test_checkpoint_resume_at_another_world_size_validation_and_lr_scaling_follow_the_view(tmp_path):
    """Three nodes train with validation (``sync_dist``), a StepLR scheduler,
    ``ScaleLRWithWorld`` and a ModelCheckpoint every 10 steps.  Two fresh
    processes resume from the mid-epoch checkpoint at step 10 (world 2), and a
    third joins them later.  Epoch 0 is an exact cover across the two runs;
    every validation, at every world size and after the join, evaluates the
    whole validation set once per member share (``val_count`` = 60); the
    joiner ends identical to the others, learning rate included."""
    val, n, epochs = 60, 160, 5
    env = {"CHAOS_TEST_VAL": str(val), "CHAOS_TEST_SCHED": "1"}
    first = start(3, tmp_path, n=n, epochs=1, sleep=0.02, prefix="a",
                  env=dict(env, CHAOS_TEST_CKPT_DIR=str(tmp_path / "ckpt"), CHAOS_TEST_CKPT_EVERY="10"))
    try:
        before = first[0].wait(lambda r: r["event"] == "ledger_at", 120)
        for node in first:
            node.wait(lambda r: r["event"] == "done", 120)
    finally:
        for node in first:
            node.stop()
    ckpt = tmp_path / "ckpt" / "step=10.ckpt"
    assert ckpt.exists(), sorted(p.name for p in (tmp_path / "ckpt").iterdir())

    env = dict(env, CHAOS_TEST_RESUME=str(ckpt))
    second = start(2, tmp_path, n=n, epochs=epochs, sleep=0.1, env=env, prefix="b")
    nodes = list(second)
    try:
        second[0].wait(lambda r: r["event"] == "step" and r["step"] >= 40, 120)
        fresh = {k: v for k, v in env.items() if k != "CHAOS_TEST_RESUME"}
        nodes.append(join(second[1], tmp_path, "joiner", n, epochs, 0.1, env=fresh))
        results = [node.wait(lambda r: r["event"] == "done", 180) for node in nodes]
    finally:
        for node in nodes:
            node.stop()
    assert len({(r["params"], r["optim"], r["global_step"], r["lr"]) for r in results}) == 1, results
    survivor = results[0]
    epoch0 = {i: c for i, c in before["counts"]}
    for i, c in survivor["epochs"]["0"]:
        epoch0[i] = epoch0.get(i, 0) + c
    assert sorted(epoch0) == list(range(n)) and set(epoch0.values()) == {1}, "epoch 0 across the resume"
    for epoch in range(1, epochs):
        counts = dict(survivor["epochs"][str(epoch)])
        assert sorted(counts) == list(range(n)) and set(counts.values()) == {1}, f"epoch {epoch}"
    vals = [r for node in nodes for r in node.records if r["event"] == "val"]
    assert {r["world"] for r in vals} == {2, 3}, "validated before and after the join"
    assert {r["count"] for r in vals} == {float(val)}, vals
    assert results[2]["switches"][0].get("joined")
    # StepLR alone gives 1e-2 * 0.9 ** (step // 7); ScaleLRWithWorld("sqrt")
    # multiplies by sqrt(global batch / 12), the global batch the checkpoint's run
    # trained with (its state travels in the checkpoint and to the joiner)
    # (a step record's world is the one after that step's boundary: the step
    # itself trained in the world of the record before it)
    steps = [r for r in nodes[0].records if r["event"] == "step"]
    for prev, rec in zip(steps, steps[1:]):
        expected = 1e-2 * 0.9 ** (rec["step"] // 7) * math.sqrt(4 * prev["world"] / 12)
        assert rec["lr"] == pytest.approx(expected, rel=1e-6), rec


@pytest.mark.timeout(240)
def test_a_node_killed_during_validation_does_not_stop_the_survivors(tmp_path):
    """Lightning's own collectives (metric reduction, barriers) and a
    torchmetrics metric's state sync run outside the training step; a member
    killed while the others validate makes them use their local metric
    values, and the next training step switches views."""
    val, epochs = 60, 4
    env = {"CHAOS_TEST_VAL": str(val), "CHAOS_TEST_VAL_SLEEP": "0.3"}
    nodes = start(3, tmp_path, epochs=epochs, sleep=0.02, env=env)
    victim, survivors = nodes[2], nodes[:2]
    try:
        victim.wait(lambda r: r["event"] == "val_start" and r["epoch"] == 1, 120)
        time.sleep(0.4)  # inside its second validation step
        victim.proc.kill()
        results = [n.wait(lambda r: r["event"] == "done", 120) for n in survivors]
        for n in survivors:
            assert n.proc.wait(timeout=30) == 0, n.log
    finally:
        for n in nodes:
            n.stop()
    assert_identical_and_exactly_once(results, epochs=epochs)
    later = [r for r in survivors[0].records if r["event"] == "val" and r["epoch"] >= 2]
    assert later and all(r["world"] == 2 and r["count"] == float(val) and r["ranks"] == [0.0, 1.0] for r in later), later
    # a torchmetrics metric (it syncs its own states at compute) sums over the members too
    assert all(r["metric"] == float(val) for r in later), later


@pytest.mark.timeout(240)
def test_a_failure_in_the_last_accumulation_window_of_an_epoch_keeps_exactly_once(tmp_path):
    """Three nodes, windows of two micro-batches; a node is killed while the
    last window of epoch 1 runs (160 samples, blocks of 12: micro-batches
    0..13).  The window's update is lost, its samples go back, and the epoch
    goes on at world 2 instead of ending where the old plan ended."""
    nodes = start(3, tmp_path, sleep=0.15, env={"CHAOS_TEST_ACCUM": "2"})
    victim, survivors = nodes[2], nodes[:2]
    try:
        victim.wait(lambda r: r["event"] == "step" and r["epoch"] == 1 and r["batch"] == 12, 120)
        victim.proc.kill()
        results = [n.wait(lambda r: r["event"] == "done", 120) for n in survivors]
    finally:
        for n in nodes:
            n.stop()
    assert_identical_and_exactly_once(results)
    assert any(s.get("failed_step") for s in results[0]["switches"])
    epoch1 = [r for r in survivors[0].records if r["event"] == "step" and r["epoch"] == 1]
    assert epoch1[-1]["world"] == 2 and epoch1[-1]["batch"] > 13, "epoch 1 went on at world 2"


def wait_serving(member_log: Path, timeout: float = 60.0) -> None:
    """Until the member logs that it serves the joiner the state (then it waits for the pull)."""
    deadline = time.monotonic() + timeout
    while "serving the state" not in member_log.read_text(errors="replace"):
        assert time.monotonic() < deadline, "the members never served the joiner"
        time.sleep(0.02)


@pytest.mark.timeout(240)
def test_a_joiner_killed_while_pulling_the_state_leaves_the_members_unaffected(tmp_path):
    """Members serve a ~5 MB state at 2 MB/s each, so the joiner's parallel
    pull takes about a second; the joiner is killed in the middle of it.  The
    members, paused at the step boundary for the pull, see their group fail,
    move to the view without the joiner and finish identical, exactly once."""
    env = {"CHAOS_TEST_HIDDEN": "40000", "CHAOS_TEST_SERVE_BPS": str(2_000_000)}
    members = start(2, tmp_path, sleep=0.05, env=env)
    nodes = list(members)
    try:
        members[0].wait(lambda r: r["event"] == "step" and r["step"] >= 3, 120)
        joiner = join(members[0], tmp_path, "joiner", N, EPOCHS, 0.05, env=env)
        nodes.append(joiner)
        wait_serving(tmp_path / "n0.log")
        joiner.proc.kill()
        results = [n.wait(lambda r: r["event"] == "done", 120) for n in members]
    finally:
        for n in nodes:
            n.stop()
    assert_identical_and_exactly_once(results)
    log = (tmp_path / "n0.log").read_text()
    assert "state sync in epoch" in log and "failed" in log, "the members saw the pull fail"


@pytest.mark.timeout(240)
def test_a_source_killed_while_a_joiner_pulls_the_state_leaves_every_replica_identical(tmp_path):
    """Issue 13's failure list, today's synchronous pull: three members serve
    a ~5 MB state at 2 MB/s each and one of them is ``kill -9``ed in the
    middle of a joiner's pull.  The other two keep serving that snapshot
    across the failure (their tensors do not change until they train again),
    so the joiner's pull completes from them, and the view without the dead
    member needs no second transfer.  Before, the member's death made every
    holder retract, the pull failed whole ("every source failed with 3
    shards missing") and the joiner pulled everything again.  Every replica
    ends identical, every epoch an exact cover, nobody restarted."""
    env = {"CHAOS_TEST_HIDDEN": "40000", "CHAOS_TEST_SERVE_BPS": str(2_000_000)}
    members = start(3, tmp_path, sleep=0.05, env=env)
    nodes = list(members)
    try:
        pids = [m.event("ready", 90)["pid"] for m in members]
        members[0].wait(lambda r: r["event"] == "step" and r["step"] >= 3, 120)
        late = join(members[0], tmp_path, "joiner", N, EPOCHS, 0.05, env=env)
        nodes.append(late)
        wait_serving(tmp_path / "n2.log")
        time.sleep(0.3)  # the pull under way
        members[2].proc.kill()
        results = [n.wait(lambda r: r["event"] == "done", 150) for n in (members[0], members[1], late)]
        for n in (members[0], members[1], late):
            assert n.proc.wait(timeout=30) == 0, n.log
    finally:
        for n in nodes:
            n.stop()
    assert [r["pid"] for r in results[:2]] == pids[:2], "no survivor restarted"
    assert_identical_and_exactly_once(results[:2])
    assert len({(r["params"], r["optim"], r["global_step"]) for r in results}) == 1, "the joiner is their replica"
    log = (tmp_path / "joiner.log").read_text()
    assert "could not pull the state" not in log and log.count("chaos: pulled ") == 1, "one pull, completed"
