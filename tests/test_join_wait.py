"""Waiting to join, as a user sees it: through a seed nobody answers at.

Issue 12 measured 120 s of silence and a SIGTERM ignored during that wait
(sent at 20 s, exit at 124 s).  Here: SIGTERM ends the wait within a second
(exit 143, one line saying so), ``CHAOS_JOIN_TIMEOUT`` bounds it, and a
seed that refuses the connection is named in one line at once.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from _procs import Node
from chaos_lightning.testbed.procs import free_ports

WORKER = Path(__file__).with_name("_dropin_worker.py")


def lonely(tmp: Path, name: str, join_timeout: float) -> Node:
    """A node whose only seed is a port nobody listens on."""
    bind, dead = free_ports(2)
    env = {"CHAOS_BIND": f"127.0.0.1:{bind}", "CHAOS_PEERS": f"127.0.0.1:{dead}",
           "CHAOS_JOIN_TIMEOUT": str(join_timeout)}
    return Node(WORKER, ["manual", "64", "1", "0", str(tmp / "run")], env, tmp / f"{name}.log")


def wait_for_line(node: Node, text: str, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while text not in node.log.read_text():
        assert node.proc.poll() is None, f"exited {node.proc.returncode} before {text!r}: {node.log}"
        assert time.monotonic() < deadline, f"no {text!r} within {timeout}s: {node.log}"
        time.sleep(0.1)


@pytest.mark.timeout(120)
def test_sigterm_while_waiting_to_join_ends_the_process_within_a_second(tmp_path):
    node = lonely(tmp_path, "waiting", join_timeout=90)
    try:
        node.event("ready", 60)
        wait_for_line(node, "waiting to join", 60)
        time.sleep(1.0)
        sent = time.monotonic()
        node.proc.send_signal(signal.SIGTERM)
        code = node.exit_code(10)
        took = time.monotonic() - sent
        assert code == 128 + signal.SIGTERM, node.log
        assert took < 3.0, f"exit {took:.1f}s after SIGTERM"
        text = node.log.read_text()
        assert "chaos: SIGTERM while waiting to join" in text, node.log
        assert "Traceback" not in text, node.log
    finally:
        node.stop()


@pytest.mark.timeout(120)
def test_the_join_timeout_is_honoured_with_one_line(tmp_path):
    node = lonely(tmp_path, "timeout", join_timeout=4)
    try:
        node.event("ready", 60)
        start = time.monotonic()
        code = node.exit_code(60)
        assert code != 0
        assert time.monotonic() - start < 30, "bounded by CHAOS_JOIN_TIMEOUT=4, not the default 120 s"
        text = node.log.read_text()
        assert "within 4s" in text, node.log
        # the dead seed is named at once, and again in the timeout's error, with why
        assert text.count("no seed answers") == 1 and "connection refused" in text, node.log
    finally:
        node.stop()


@pytest.mark.timeout(180)
def test_a_node_admitted_after_the_last_step_takes_the_final_state_and_ends_at_once(tmp_path):
    """Two members train one epoch and then validate slowly; a third node is
    started once they validate, so the cluster admits it after the last
    training step.  Without the end-of-fit handover it would wait for a group
    that never forms, then find nobody and train from scratch alone.  With
    it, the members form one last group, the newcomer takes the final state
    marked as ended, trains nothing, and ends as their replica."""
    from _procs import cluster, joiner

    train = Path(__file__).with_name("_train_worker.py")
    argv = ["64", "1", "0.02"]  # 64 samples, one epoch: 8 steps at world 2
    env = {"CHAOS_TEST_VAL": "40", "CHAOS_TEST_VAL_SLEEP": "4"}  # 4 validation batches a member: 16 s
    members = cluster(train, argv, 2, tmp_path, env=env, prefix="member")
    nodes = list(members)
    try:
        members[0].wait(lambda r: r["event"] == "val_start" and r["epoch"] == 0, 120)
        late = joiner(train, argv, members[1], tmp_path, "late", env)
        nodes.append(late)
        done = [n.event("done", 120) for n in nodes]
        for n in nodes:
            assert n.exit_code(30) == 0, n.log
    finally:
        for n in nodes:
            n.stop()
    assert len({(r["params"], r["optim"], r["global_step"]) for r in done}) == 1, done
    assert done[0]["global_step"] == 8
    assert not [r for r in late.records if r["event"] == "step"], "the newcomer trained nothing"
    assert "chaos: joined as the fit ended (global step 8)" in late.log.read_text(), late.log
    assert any("they took the final state" in m.log.read_text() for m in members), members[0].log


@pytest.mark.timeout(240)
def test_joiners_that_lose_every_member_holding_the_state_stop_with_a_clear_error(tmp_path):
    """One member trains (a long step, a checkpoint every step); two nodes
    join; once the cluster has admitted both, and before the member's step
    ends and it serves them the state, the member is ``kill -9``ed.  The two
    joiners are a majority of the view and form a group, but neither holds
    trained state: issue 14 saw them take that for the very start (random
    weights, step 0, a new sample ledger).  They must stop instead, saying
    what the cluster had trained and where its last checkpoint is."""
    from _procs import cluster, joiner

    train = Path(__file__).with_name("_train_worker.py")
    ckpt = tmp_path / "ckpt"
    env = {"CHAOS_TEST_CKPT_DIR": str(ckpt), "CHAOS_TEST_CKPT_EVERY": "1"}
    argv = ["64", "1", "6"]  # 16 steps at world 1, 6 s each: the joiners are admitted mid-step
    (member,) = cluster(train, argv, 1, tmp_path, env=env, prefix="member")
    nodes = [member]
    try:
        member.wait(lambda r: r["event"] == "step" and r["step"] >= 1, 120)
        late = [joiner(train, argv, member, tmp_path, f"late{i}", env) for i in range(2)]
        nodes += late
        addrs = [n.env["CHAOS_BIND"] for n in nodes]
        deadline = time.monotonic() + 90
        # both admitted, and both joiners know it: every log names a view
        # with all three (killed when only the member's did, the joiners never
        # heard of their admission and waited their whole join timeout for a
        # view with them, past this test's wait: CI, 2026-12-07)
        def admitted(n) -> bool:
            return any(all(a in line for a in addrs) for line in n.log.read_text().splitlines() if "view epoch" in line)

        while not all(admitted(n) for n in nodes):
            assert time.monotonic() < deadline, member.log
            assert member.proc.poll() is None, member.log
            time.sleep(0.05)
        member.proc.kill()
        codes = [n.exit_code(120) for n in late]
    finally:
        for n in nodes:
            n.stop()
    for n, code in zip(late, codes):
        text = n.log.read_text()
        assert code != 0, n.log
        assert "chaos: no member holding the training state is left (the cluster had trained to global step" in text, n.log
        assert f"resume the run from its last checkpoint ({ckpt}" in text, n.log
        assert not [r for r in n.records if r["event"] == "step"], "trained nothing from random weights"


def test_the_way_back_names_a_checkpoint_any_member_reported(monkeypatch):
    """What a joiner learns at its admission: the furthest step any member
    reports, and the newest checkpoint any of them names, even when the
    furthest report names none (a member between its commit and its save, a
    learner that took the state).  A CI run once ended the error of the test
    above without the path."""
    from types import SimpleNamespace

    import chaos_lightning.agent as agent_pkg
    from chaos_lightning.strategy.elastic import ElasticMember

    reports = {"a:1": {"step": 7, "checkpoint": None}, "b:1": {"step": 6, "checkpoint": "/ckpt/step=6.ckpt"},
               "c:1": {"step": 5, "checkpoint": "/ckpt/step=5.ckpt"}}
    monkeypatch.setattr(agent_pkg, "status", lambda addr, **kw: {"training": reports[addr]})
    me = SimpleNamespace(group=SimpleNamespace(rdv=SimpleNamespace(agent=object())), node_id="me",
                         config=SimpleNamespace(secret=None))
    view = SimpleNamespace(ids=["me", "a", "b", "c"], member=lambda n: SimpleNamespace(addr=f"{n}:1"))
    seen = ElasticMember._ask_what_was_trained(me, view)
    assert (seen["step"], seen["checkpoint"], seen["node"]) == (7, "/ckpt/step=6.ckpt", "a")
