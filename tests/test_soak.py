"""The soak: random valid timelines (``chaos_lightning.scenario.soak``).

The generator is pure, so its rules are checked on thousands of seeds
against a separate replay (:func:`validate`).  Then the short CI soak: one
fixed seed, 12 events (joins, leaves, kill -9, SIGSTOP, a link cut and its
restore, a partition and its heal, restarts under the same id) on 5 training
nodes in network namespaces with real link cuts, through the command users
run; it must end with identical replicas, every sample of every epoch trained
exactly once (the ledgers of every process, killed ones included), every
process exiting 0 unless the timeline killed it, and every event survived.
The long one (200 events, 8 nodes) is a benchmark command: docs/scenarios.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path

import pytest

from chaos_lightning.scenario.soak import KINDS, generate, validate
from chaos_lightning.scenario.timeline import parse

REPO = Path(__file__).resolve().parents[1]

#: the CI schedule: its 12 events cover every kind (checked below, so a change
#: of the generator that loses a kind fails here, not silently)
CI_SEED, CI_EVENTS, CI_NODES = 50, 12, 5


@pytest.mark.parametrize("nodes", [4, 5, 8])
def test_generated_timelines_keep_the_rules(nodes: int) -> None:
    """Every seed gives a timeline that parses, keeps a voting majority and
    at least three members, never exceeds ``nodes`` processes, closes every
    cut and partition, and has exactly the asked number of events."""
    kinds: Counter[str] = Counter()
    for seed in range(600):
        events = 5 + seed % 40
        text = generate(seed, events, nodes)
        assert validate(text, nodes) == [], (seed, text)
        t = parse(text)
        assert len(t.actions) == events + 2, (seed, text)  # start, the events, end
        kinds.update(a.action for a in t.actions[1:-1])
        assert generate(seed, events, nodes) == text  # a seed is the schedule
    assert set(kinds) == set(KINDS), kinds


def test_the_validator_catches_what_the_generator_avoids() -> None:
    bad = {
        "0 start a b c d\n5 kill a\n6 kill b\n9 end\n": "leaves 2 members",
        "0 start a b c d\n5 stop a 9\n6 stop b 9\n20 end\n": "no majority",
        "0 start a b c d e\n5 partition a,b c,d\n9 heal\n12 end\n": "splits every member",
        "0 start a b c d e\n5 cut a b\n6 stop a 1\n7 restore a b\n9 end\n": "touches ['a']",
        "0 start a b c d e\n5 partition a b,c,d,e\n6 join f\n7 heal\n9 end\n": "while partitioned",
        "0 start a b c d\n5 join e\n9 end\n": "makes 5 processes",
    }
    for text, why in bad.items():
        problems = validate(text, 4 if "join e" in text else 5)
        assert any(why in p for p in problems), (text, problems)


def test_the_long_soak_is_a_valid_timeline() -> None:
    """The benchmark's schedule (200 events on 8 nodes) is valid and has
    every kind several times."""
    text = generate(0, 200, 8)
    assert validate(text, 8) == []
    kinds = Counter(a.action for a in parse(text).actions[1:-1])
    assert sum(kinds.values()) == 200 and all(kinds[k] >= 5 for k in KINDS), kinds


def test_ci_schedule_has_every_kind() -> None:
    kinds = Counter(a.action for a in parse(generate(CI_SEED, CI_EVENTS, CI_NODES)).actions[1:-1])
    assert set(kinds) == set(KINDS), kinds


def test_cli_prints_the_timeline_and_refuses_bad_sizes() -> None:
    out = subprocess.run([sys.executable, "-m", "chaos_lightning.scenario.soak", "--seed", "5", "--events", "7",
                          "--nodes", "4", "--print-timeline"], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout == generate(5, 7, 4), out
    out = subprocess.run([sys.executable, "-m", "chaos_lightning.scenario.soak", "--nodes", "3", "--print-timeline"],
                         cwd=REPO, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "at least 4 nodes" in out.stderr and "Traceback" not in out.stderr, out


@pytest.mark.slow
@pytest.mark.timeout(330)
def test_short_soak_on_the_namespace_testbed(tmp_path: Path, need_netns: None) -> None:
    """The CI soak (module docstring): every kind of event on real links,
    checked at the end; every namespace and process gone afterwards."""
    result_path = tmp_path / "soak.json"
    started = time.monotonic()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chaos_lightning.scenario.soak", "--seed", str(CI_SEED), "--events", str(CI_EVENTS),
         "--nodes", str(CI_NODES), "--testbed", "--json", str(result_path), "--run-dir", str(tmp_path / "soak")],
        cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
        env={**os.environ, "PYTHONUNBUFFERED": "1"}, start_new_session=True,
    )
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        if proc.poll() is None:  # the runner reaps its nodes and namespaces on SIGTERM; make sure of it
            os.killpg(proc.pid, 9)
            proc.wait(10)
    listed = subprocess.run(["ip", "netns", "list"], capture_output=True, text=True, timeout=10).stdout
    assert f"chaos{proc.pid}x" not in listed, listed
    run_dir = tmp_path / "soak" / f"seed{CI_SEED}" / "run"
    logs = "\n".join(f"--- {p.name}\n{p.read_text(errors='replace')[-2500:]}" for p in sorted((run_dir / "logs").glob("*.log")))
    assert proc.returncode == 0, out + "\n" + logs
    (result,) = json.loads(result_path.read_text())["results"]
    assert result["violations"] == [], result
    inv = result["invariants"]
    assert inv["identical_replicas"] and inv["no_sample_twice"] and inv["complete_epochs_exact"] and inv["clean_exits"], inv
    assert len(inv["final_step"]) == 1 and inv["epochs"] >= 3 and inv["ledgers"] > CI_NODES, inv
    assert sum(result["run"].values()) == CI_EVENTS and result["survived"] == result["run"], result
    assert set(result["run"]) == set(KINDS), result
    # a restart is a new process under the same node id (the bind address)
    exits = json.loads((run_dir / "exits.json").read_text())
    restarted = [x for x in exits if x["fate"] == "restarted"]
    assert restarted and all(x["returncode"] == -9 for x in restarted), exits
    for x in restarted:
        trace = [json.loads(line) for line in (run_dir / "trace" / f"{x['name']}.jsonl").read_text().splitlines() if line]
        starts = [r for r in trace if r["ev"] == "start"]
        assert len(starts) >= 2 and len({r["node"] for r in starts}) == 1, starts
    assert "violations found: 0" in out, out
    print(f"short soak: {time.monotonic() - started:.0f} s")


# ---------------------------------------------------------------------- the checks and the report, on files
def _node_files(run: Path, name: str, pid: int, epochs: dict[int, str], done: dict | None = None) -> None:
    d = run / "ledger" / f"{name}-{pid}"
    d.mkdir(parents=True, exist_ok=True)
    for e, digits in epochs.items():
        (d / f"{e}.txt").write_text(f"{digits}\n0\n")
    if done is not None:
        (run / "done").mkdir(exist_ok=True)
        (run / "done" / f"{name}.json").write_text(json.dumps({"global_step": 9, "left": False, "epochs": {}, **done}))


def test_check_invariants_reads_every_process_ledger_and_exit(tmp_path: Path) -> None:
    """Epoch 0 is covered only by the union of a killed process's ledger and
    a finished one's; a sample twice in one process is a violation; so is a
    sample nobody trained, and a process that exited 1 without being killed."""
    from chaos_lightning.scenario.runner import check_invariants

    run = tmp_path / "ok"
    _node_files(run, "a", 1, {0: "1100", 1: "1111", 2: "1000"}, {"params": "p", "optim": "o"})
    _node_files(run, "b", 2, {0: "0011"})  # killed mid-epoch 1, its ledger of epoch 0 stays
    _node_files(run, "c", 3, {1: "0111", 2: "1000"}, {"params": "p", "optim": "o"})
    (run / "exits.json").write_text(json.dumps([
        {"name": "a", "pid": 1, "fate": "exited", "returncode": 0, "expected": True},
        {"name": "b", "pid": 2, "fate": "killed", "returncode": -9, "expected": True},
    ]))
    inv = check_invariants(run)
    assert inv["problems"] == [] and inv["epochs"] == 3 and inv["ledgers"] == 3, inv

    bad = tmp_path / "bad"
    _node_files(bad, "a", 1, {0: "1210", 1: "1101", 2: "1"}, {"params": "p", "optim": "o"})
    _node_files(bad, "b", 2, {1: "1101"}, {"params": "q", "optim": "o"})
    (bad / "exits.json").write_text(json.dumps([
        {"name": "b", "pid": 2, "fate": "exited", "returncode": 1, "expected": False},
    ]))
    inv = check_invariants(bad)
    text = "\n".join(inv["problems"])
    assert not inv["identical_replicas"] and "replicas differ" in text, text
    assert "samples trained twice: {'a-1': [0]}" in text, text
    assert "epochs not covered exactly once: [0, 1]" in text, text
    assert "unexpected exit: b (pid 2, exited) exited with code 1" in text and not inv["clean_exits"], text


def test_report_reads_partition_heal_and_restart(tmp_path: Path) -> None:
    """The view that reflects each new action: a partition's (the small side
    removed), a heal's (everyone back, no link down), a restart's (the id a
    member again after a view without its old slot); a restart's scale-out
    runs from the new process's start."""
    from test_scenario_report import ID, T0, Scenario

    from chaos_lightning.scenario import report as rep

    s = Scenario()
    four = ["n0", "n1", "n2", "n3"]
    for n in four:
        s.rec(n, -6.0, "start", proc_start=T0 - 8.0)
    s.action(-6.0, "start", four)
    s.view(2, four, {n: -1.0 for n in four})
    s.trainers(2, four, -0.9, 0.1)
    s.steps(four, 1, 0.0, 10)
    s.action(1.0, "partition", four, groups=[["n3"], ["n0", "n1", "n2"]])
    s.view(3, ["n0", "n1", "n2"], {"n0": 1.6, "n1": 1.62, "n2": 1.65})
    s.trainers(3, ["n0", "n1", "n2"], 1.7, 0.2)
    s.steps(["n0", "n1", "n2"], 11, 1.8, 10)
    s.action(3.0, "heal", four, groups=[["n3"], ["n0", "n1", "n2"]])
    s.view(4, four, {"n0": 3.5, "n1": 3.5, "n2": 3.52, "n3": 3.55})
    s.trainers(4, four, 3.6, 0.1)
    s.steps(four, 21, 3.7, 10)
    s.action(5.0, "restart", ["n1"])
    s.view(5, ["n0", "n2", "n3"], {"n0": 5.3, "n2": 5.31, "n3": 5.32})
    s.trainers(5, ["n0", "n2", "n3"], 5.35, 0.1)
    s.steps(["n0", "n2", "n3"], 31, 5.4, 20)
    s.rec("n1", 6.0, "start", proc_start=T0 + 5.05)
    s.rec("n1", 7.5, "join_request")
    s.view(6, four, {"n0": 8.0, "n1": 8.02, "n2": 8.01, "n3": 8.03})
    s.trainers(6, four, 8.1, 0.1, joined=("n1",))
    s.steps(four, 51, 8.2, 10)
    s.action(10.0, "end", [])
    result = rep.analyze(s.write(tmp_path / "run", torn=False))
    acts = {a["action"]: a for a in result["actions"]}
    assert acts["partition"]["view_everywhere"]["epoch"] == 3 and acts["partition"]["groups"][0] == ["n3"]
    assert acts["partition"]["view_everywhere"]["s"] == pytest.approx(0.65)
    assert acts["heal"]["view_everywhere"]["epoch"] == 4
    assert acts["heal"]["view_everywhere"]["s"] == pytest.approx(0.55)
    r = acts["restart"]
    assert r["view_everywhere"]["epoch"] == 6 and r["view_everywhere"]["s"] == pytest.approx(3.03), r
    so = r["scale_out"]["n1"]  # n1 steps 2 ms after n0
    assert so["cold_s"] == pytest.approx(8.202 - 5.05) and so["warm_s"] == pytest.approx(0.702), so
    assert ID["n1"] in r["members"].values()
