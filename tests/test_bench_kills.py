"""The "30 kills" benchmark (``benchmarks/kills.py``) at its smallest: two kills of a tiny model.

Its timeline and its summary are checked on hand-made input (every number
determined by it); then the benchmark runs for real, in this process, with
2 members, a joiner killed twice (the first kill aimed mid-step, the second
into a validation) and a validation every few steps: its JSON has one
record per kill, each with a phase among the three, the figures of the
issue, and held invariants.  Checkpoints are on (every 3 steps), so a join
may land where a save is due (a crash until 2026-12-07,
``tests/data/join_at_checkpoint.chaos``); the report's ``checkpoint`` phase
is shown on hand-built traces (``test_scenario_report.py``).  Timings are the
benchmark's business, not the tests': nothing here asserts one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import kills  # noqa: E402

#: the smoke run: about 30 s on 2 cores (two joiners' start-up, mostly)
SMOKE_TIMEOUT = 150


def test_timeline_joins_then_kills_each_round_with_validation_and_checkpoints_on() -> None:
    text = kills.timeline(3, 4, 1024, 0.03, 10, 0.1, 6)
    words = [line.split() for line in text.splitlines()]
    assert ["set", "val_every", "10"] in words and ["set", "ckpt_every", "6"] in words and ["set", "val_sleep", "0.1"] in words
    actions = [w[1:] for w in words if w[0] != "set"]
    assert actions[0] == ["start", "n0", "n1", "n2", "n3"] and actions[-1] == ["end"]
    assert actions[1:-1] == [["join", "k0"], ["kill", "k0"], ["join", "k1"], ["kill", "k1"], ["join", "k2"], ["kill", "k2"]]
    times = [float(w[0]) for w in words if w[0] != "set"]
    offsets = [times[i + 1] - times[i] for i in range(1, 7, 2)]  # join -> kill, per round
    assert len(set(offsets)) == 3, "the kill's offset after the join varies"
    assert kills.aims(4, 10, 6) == ["step", "validation", "checkpoint", "step"]
    assert kills.aims(3, 10, 0) == ["step", "validation", "step"]  # no checkpoints, no aim at one


def test_summary_counts_phases_stalls_and_the_target() -> None:
    def rec(phase: str, first: float, idle: float, net: float | None = None) -> dict:
        return {"system": "chaos", "event": "kill", "phase": phase, "aim": phase, "first_step_s": first,
                "first_step_net_s": None, "idle_max_s": idle, "idle_max_net_s": net, "step_s": 0.1,
                "target_met": first <= 0.4}

    records = [rec("step", 0.2, 0.1, 0.1), rec("step", 0.5, 2.5, 2.5), rec("validation", 0.6, 2.2, 0.3),
               {"system": "chaos", "event": "run"}]
    s = kills.summarize(records)["chaos"]
    assert s["kills"] == 3 and set(s["phases"]) == {"step", "validation"}
    assert s["phases"]["step"]["first_step_s"] == {"n": 2, "median": 0.35, "max": 0.5}
    assert (s["stalled_over_2s"], s["stall_judged"], s["stalled_over_2s_net"], s["stall_judged_net"]) == (2, 3, 1, 3)
    assert (s["target_met"], s["target_judged"], s["target_met_mid_step"], s["target_judged_mid_step"]) == (1, 3, 1, 2)
    doc = {"config": {"hidden": 64, "nodes": 2, "val_every": 4, "val_sleep": 0.05, "ckpt_every": 3, "step_sleep": 0.02},
           "command": "python benchmarks/kills.py", "machine": {"when": "now", "cpus": 2, "platform": "linux"},
           "wall_s": 1.0, "records": records, "summary": {"chaos": s}}
    text = kills.markdown(doc)
    assert "kills stalling a survivor over 2 s: **2 of 3** (net of their own validations and saves: 1 of 3)" in text
    assert "| chaos | validation | 1 | 0.60 [0.60] | - | 2.20 [2.20] | 0.30 [0.30] |" in text


@pytest.mark.slow
@pytest.mark.timeout(SMOKE_TIMEOUT)
def test_two_kills_of_a_tiny_model_give_a_record_per_kill_with_its_phase(tmp_path: Path) -> None:
    out = tmp_path / "kills.json"
    argv = ["--kills", "2", "--nodes", "2", "--hidden", "64", "--step-sleep", "0.02", "--val-every", "4",
            "--val-sleep", "0.05", "--ckpt-every", "3", "--json", str(out), "--workdir", str(tmp_path / "runs"), "--quiet"]
    assert kills.main(argv) == 0
    doc = json.loads(out.read_text())
    recs = [r for r in doc["records"] if r["event"] == "kill"]
    assert [r["kill"] for r in recs] == [0, 1] and [r["aim"] for r in recs] == ["step", "validation"]
    for r in recs:
        assert r["system"] == "chaos" and r["phase"] in kills.PHASES, r
        assert set(r["phase_nodes"].values()) <= set(kills.PHASES) and r["victim"] in r["phase_nodes"], r
        for key in ("first_step_s", "idle_max_s", "step_s", "target_s"):
            assert isinstance(r[key], float) and math.isfinite(r[key]) and r[key] >= 0, (key, r)
        assert isinstance(r["target_met"], bool), r
    (run,) = [r for r in doc["records"] if r["event"] == "run"]
    assert run["invariants_ok"], run["problems"]
    summary = doc["summary"]["chaos"]
    assert summary["kills"] == 2 and sum(p["kills"] for p in summary["phases"].values()) == 2
    assert summary["stall_judged"] == 2 and summary["target_judged"] == 2
