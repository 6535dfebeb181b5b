"""A warm standby in real processes: held out while the cluster is at its
target, admitted when a member is ``kill -9``-ed, and then a replica like
any other.

Two trainers with ``CHAOS_TARGET_NODES=2`` and one ``CHAOS_STANDBY=1``
process (model and loaders built, waiting in ``fit``).  The standby trains
no step while both members live; the founder (rank 0, the coordinator) is
killed; the survivor and the standby finish with identical replicas, every
epoch an exact cover, and the standby's pid unchanged (it never restarted).
Prints kill -> world size restored.
"""

from __future__ import annotations

import signal
import sys
import time
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
from _procs import Node  # noqa: E402

from chaos_lightning.testbed.procs import free_ports  # noqa: E402

WORKER = Path(__file__).with_name("_train_worker.py")
POLICY = {"CHAOS_TARGET_NODES": "2", "CHAOS_MAX_NODES": "2", "CHAOS_JOIN_TIMEOUT": "60",
          "CHAOS_COLLECTIVE_TIMEOUT": "10"}


def standby_run(tmp: Path, *, n: int = 160, epochs: int = 2, sleep: float = 0.05, cold: bool = False,
                hidden: int = 16) -> dict:
    """Run the scenario; returns the records and the timing (seconds from the kill).
    ``cold`` (the benchmark's baseline): no standby; the replacement is a
    plain joiner started after the kill, as a person would (``startup_s``:
    the kill to its model built, its ``ready`` record; None when warm)."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    argv = [str(n), str(epochs), str(sleep)]
    env = {**POLICY, "CHAOS_TEST_HIDDEN": str(hidden)}
    members = [Node(WORKER, argv, {**env, "CHAOS_BIND": a, "CHAOS_PEERS": "" if i == 0 else addrs[0],
                                   "CHAOS_MIN_NODES": "2"}, tmp / f"n{i}.log") for i, a in enumerate(addrs[:2])]
    spare = {**env, "CHAOS_BIND": addrs[2], "CHAOS_PEERS": ",".join(addrs[:2]), "CHAOS_MIN_NODES": "1"}
    nodes = list(members)
    try:
        if not cold:
            nodes.append(Node(WORKER, argv, {**spare, "CHAOS_STANDBY": "1"}, tmp / "standby.log"))
            pid = nodes[-1].event("ready", 90)["pid"]
        victim, survivor = members
        survivor.wait(lambda r: r["event"] == "step" and r["world"] == 2 and r["step"] >= 4, 90)
        # the standby asked to join long ago (it was ready before the members' 4th step) and stays out
        held_at = time.monotonic()
        survivor.wait(lambda r: r["event"] == "step" and r["_t"] > held_at + 1.0, 30)
        trained_before = [r for r in nodes[2].records if r.get("event") == "step"] if not cold else []
        worlds_before = {r["world"] for r in survivor.records if r.get("event") == "step"}
        victim.proc.send_signal(signal.SIGKILL)
        killed = time.monotonic()
        startup_s = None
        if cold:
            nodes.append(Node(WORKER, argv, spare, tmp / "standby.log"))
            ready = nodes[-1].event("ready", 90)
            pid, startup_s = ready["pid"], ready["_t"] - killed  # kill -> the replacement's model built
        standby = nodes[2]
        joined = standby.event("step", 60)  # its first step: the world is 2 again, with the standby in it
        # the same step at the survivor (a record of the old group may arrive after the kill: not this one)
        first = survivor.wait(lambda r: r["event"] == "step" and r["world"] == 2 and r["step"] >= joined["step"], 60)
        done = [survivor.event("done", 120), standby.event("done", 120)]
        codes = [survivor.exit_code(30), standby.exit_code(30), victim.exit_code(10)]
        return {"pid": pid, "trained_before": trained_before, "worlds_before": worlds_before,
                "restore_s": max(first["_t"], joined["_t"]) - killed, "startup_s": startup_s, "done": done,
                "codes": codes, "n": n, "epochs": epochs,
                "logs": {x.log.name: x.log.read_text() for x in nodes}}
    finally:
        for x in nodes:
            x.stop()


@pytest.mark.timeout(150)
def test_a_warm_standby_stays_out_at_target_and_replaces_a_killed_member_without_restarting(tmp_path):
    r = standby_run(tmp_path)
    print(f"kill -9 -> world size 2 restored (the first step with the standby, done at both) {r['restore_s']:.2f} s")
    logs = r["logs"]
    assert not r["trained_before"], "the standby trained while the cluster was at its target"
    assert r["worlds_before"] == {2}
    assert "holding" in logs["n0.log"] and "as a standby" in logs["n0.log"], "the coordinator logs why it holds it"
    assert "warm standby: waiting to be admitted" in logs["standby.log"]
    assert "warm standby admitted" in logs["standby.log"]
    assert r["codes"] == [0, 0, -signal.SIGKILL], logs
    for name in ("n1.log", "standby.log"):
        assert "Traceback" not in logs[name], logs[name]
    survivor, standby = r["done"]
    assert standby["pid"] == r["pid"], "the standby is the process that was warm (never restarted)"
    assert (survivor["params"], survivor["optim"], survivor["global_step"]) == (
        standby["params"], standby["optim"], standby["global_step"]), r["done"]
    for epoch in range(r["epochs"]):  # the survivor saw the whole fit: every epoch an exact cover
        counts = dict(survivor["epochs"][str(epoch)])
        assert sorted(counts) == list(range(r["n"])) and set(counts.values()) == {1}, f"epoch {epoch}"
        # the standby's ledger starts at its admission: what it saw, the survivor saw, each sample once
        mine = dict(standby["epochs"][str(epoch)])
        assert set(mine.values()) <= {1} and set(mine) <= set(counts), f"epoch {epoch}"
    assert sum(len(standby["epochs"][str(e)]) for e in range(r["epochs"])) > 0, "the standby trained"


@pytest.mark.timeout(90)
def test_a_standby_never_takes_the_seat_of_a_founding_node_that_starts_late(tmp_path):
    """The founder and a standby are up; the second founding node starts 2 s
    later (slower imports).  Before the fix the standby, asking first, was
    admitted into the forming cluster, and the late node, held as a surplus
    joiner with a bounded join, exited 1 before its first step.  Now the
    standby asks only once the cluster trains: the late node trains at world
    2, the standby trains nothing and then waits as a standby."""
    addrs = [f"127.0.0.1:{p}" for p in free_ports(3)]
    env = {**POLICY, "CHAOS_JOIN_TIMEOUT": "15"}
    argv = ["400", "1", "0.05"]
    founder = Node(WORKER, argv, {**env, "CHAOS_BIND": addrs[0], "CHAOS_PEERS": "", "CHAOS_MIN_NODES": "2"},
                   tmp_path / "n0.log")
    standby = Node(WORKER, argv, {**env, "CHAOS_BIND": addrs[2], "CHAOS_PEERS": ",".join(addrs[:2]),
                                  "CHAOS_MIN_NODES": "1", "CHAOS_STANDBY": "1"}, tmp_path / "standby.log")
    nodes = [founder, standby]
    try:
        founder.event("ready", 60)
        standby.event("ready", 60)
        time.sleep(2.0)  # both in fit: the founder alone in its view, the standby free to ask
        late = Node(WORKER, argv, {**env, "CHAOS_BIND": addrs[1], "CHAOS_PEERS": addrs[0], "CHAOS_MIN_NODES": "2"},
                    tmp_path / "n1.log")
        nodes.append(late)
        late.wait(lambda r: r["event"] == "step" and r["world"] == 2 and r["step"] >= 3, 60)
        deadline = time.monotonic() + 15
        while "waiting to be admitted" not in standby.log.read_text():
            assert time.monotonic() < deadline and standby.proc.poll() is None, standby.log.read_text()
            time.sleep(0.1)
        assert "waiting for the cluster to train before asking to join" in standby.log.read_text()
        assert not [r for r in standby.records if r.get("event") == "step"], "the standby took a founder's seat"
        assert late.proc.poll() is None and founder.proc.poll() is None
    finally:
        for x in nodes:
            x.stop()


def test_a_standby_waits_for_training_and_knows_when_the_cluster_is_gone():
    """``wait_for_training`` against a stand-in status query: a seed that
    refuses, one still forming (no step), then one that trains; and every
    seed refusing for ``gone_after`` is a clear StandbyOrphaned."""
    import lightning.pytorch  # noqa: F401  (first: importing the strategy package before lightning is circular)

    from chaos_lightning.strategy.standby import StandbyOrphaned, wait_for_training

    answers = iter([None, {"step": 0}, {"step": 5, "ended": False}])

    def ask(seed, *, secret, timeout):
        if seed == "a:1":
            raise ConnectionRefusedError(111, "Connection refused")
        return {"training": next(answers)}

    assert wait_for_training(["a:1", "b:2"], None, poll=0.01, ask=ask) == "b:2"

    def refuse(seed, *, secret, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    t0 = time.monotonic()
    with pytest.raises(StandbyOrphaned, match=r"no seed listens \(a:1 \(connection refused"):
        wait_for_training(["a:1"], None, gone_after=0.2, poll=0.01, ask=refuse)
    assert time.monotonic() - t0 < 5


def test_a_stepped_down_node_sees_the_cluster_train_end_or_vanish():
    """``ClusterWatch`` (a member that stepped down waits with it) against a
    stand-in status query and clock: it waits its time out while any seed
    trains (one timing out, one refusing), stops at once when a seed reports
    the fit ended, and when every seed has refused for ``gone_after``."""
    import lightning.pytorch  # noqa: F401  (first: importing the strategy package before lightning is circular)

    from chaos_lightning.strategy.standby import ClusterWatch

    now = [0.0]
    clock, sleep = (lambda: now[0]), (lambda s: now.__setitem__(0, now[0] + s))
    ended = {"b:2": False}

    def ask(seed, *, secret, timeout):
        if seed == "a:1":
            raise ConnectionRefusedError(111, "Connection refused")
        if seed == "c:3":
            raise TimeoutError("busy")
        return {"training": {"step": 9, "ended": ended[seed]}}

    watch = ClusterWatch(["a:1", "b:2", "c:3"], None, poll=1.0, ask=ask, clock=clock, sleep=sleep)
    assert watch.wait(30.0) is True and now[0] == 30.0  # the whole wait, one look a second
    ended["b:2"] = True
    assert watch.wait(30.0) is False and now[0] == 30.0  # the first look ends it

    def refuse(seed, *, secret, timeout):
        raise ConnectionRefusedError(111, "Connection refused")

    gone = ClusterWatch(["a:1", "b:2"], None, gone_after=10.0, poll=1.0, ask=refuse, clock=clock, sleep=sleep)
    assert gone.wait(60.0) is False and 39.0 < now[0] <= 41.0  # refused from 30 s on: over at 40 s
    assert ClusterWatch([], None, ask=refuse, clock=clock, sleep=sleep).running() is True
