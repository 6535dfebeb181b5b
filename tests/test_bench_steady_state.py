"""The steady-state benchmark runs end to end and writes rows a report can trust.

``benchmarks/steady_state.py --smoke`` (2 training processes, one ddp and one
chaos run of a few batches, then one cluster through a join, a ``kill -9``
and a graceful leave) as a subprocess with a bounded timeout: the JSON has
its parameters, a samples/s row per strategy, the chaos/ddp ratio, an idle
row per event and the joiner's scale-out row, every value finite and sane.
Timings themselves are the benchmark's business: no thresholds here.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "steady_state.py"

#: seconds; the smoke run takes about 40 s on 2 cores (mostly process start-up)
SMOKE_TIMEOUT = 150


def _finite(x: object) -> bool:
    return isinstance(x, (int, float)) and not isinstance(x, bool) and math.isfinite(x)


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_smoke_run_writes_steady_rows_ratio_and_idle_per_event(tmp_path):
    out = tmp_path / "steady.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
        cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "chaos/ddp" in proc.stdout, "the table is printed"

    data = json.loads(out.read_text())
    params, rows = data["params"], data["rows"]
    assert params["mode"] == "smoke" and params["nodes"] == 2
    assert params["model_params"] > 100_000 and params["torch"] and params["lightning"]

    steady = {r["strategy"]: r for r in rows if r["kind"] == "steady"}
    assert set(steady) == {"ddp", "chaos"}
    for r in steady.values():
        assert r["runs"] == params["rounds"] == len(r["samples"])
        for key in ("samples_per_s", "samples_per_s_med", "step_ms", "cpu_ms"):
            assert _finite(r[key]) and r[key] > 0, (r["strategy"], key)
        assert r["samples_per_s_min"] <= r["samples_per_s"] <= r["samples_per_s_max"]

    (ratio,) = [r for r in rows if r["kind"] == "ratio"]
    for key in ("ratio", "ratio_med", "cpu_ratio"):
        assert _finite(ratio[key]) and ratio[key] > 0, key
    assert ratio["target"] == 0.97 and ratio["meets_target"] == (ratio["ratio"] >= 0.97)
    assert len(ratio["round_ratios"]) == params["rounds"]

    idle = {r["event"]: r for r in rows if r["kind"] == "idle"}
    assert set(idle) == {"leave", "crash", "join"}
    k = params["nodes"]
    # the event order: join (k -> k+1), crash (k+1 -> k), leave of the joiner (k -> k-1)
    assert (idle["join"]["old_world"], idle["join"]["new_world"], idle["join"]["survivors"]) == (k, k + 1, k)
    assert (idle["crash"]["old_world"], idle["crash"]["new_world"], idle["crash"]["survivors"]) == (k + 1, k, k)
    assert (idle["leave"]["old_world"], idle["leave"]["new_world"], idle["leave"]["survivors"]) == (k, k - 1, k - 1)
    for name, r in idle.items():
        for key in ("idle_sum_s", "idle_max_s", "stall_s", "to_step_s", "normal_step_s"):
            assert _finite(r[key]), (name, key)
        assert r["stall_s"] > 0 and r["to_step_s"] > 0 and r["normal_step_s"] > 0, name
        (sample,) = r["samples"]
        per = [x["idle_s"] for x in sample["per_survivor"]]
        assert len(per) == r["survivors"] and all(map(_finite, per)), name
        assert math.isclose(r["idle_sum_s"], sum(per)) and math.isclose(r["idle_max_s"], max(per)), name

    (scale_out,) = [r for r in rows if r["kind"] == "scale_out"]
    assert scale_out["world"] == k + 1
    for key in ("delay_s", "warm_s", "join_s", "cold_s"):
        assert _finite(scale_out[key]) and scale_out[key] > 0, key
    # process start -> ready -> (warm) ... -> first batch applied
    assert scale_out["cold_s"] < scale_out["delay_s"] and scale_out["warm_s"] < scale_out["delay_s"]
