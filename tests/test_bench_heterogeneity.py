"""The heterogeneity benchmark (``benchmarks/heterogeneity.py``) at its smallest.

Two members, one at 0.5 CPU and one at 0.25 (cgroup CPU limits), adaptive
shares, two epochs of five steps, run for real in this process: every epoch
of every member's ledger is an exact cover, the replicas end bit-identical
at the same global step, and the row has its throughput and shares.  Speed
is the benchmark's business: nothing here asserts one.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import heterogeneity  # noqa: E402

#: the smoke run: about 12 s on 2 cores (two workers' start-up, mostly)
SMOKE_TIMEOUT = 90


def test_shares_records_are_read_from_a_members_trace(tmp_path: Path) -> None:
    trace = tmp_path / "n0.jsonl"
    trace.write_text("\n".join([
        json.dumps({"t": 100.0, "ev": "step", "node": "a", "pid": 1, "gs": 1}),
        json.dumps({"t": 101.5, "ev": "shares", "node": "a", "pid": 1, "samples": [300, 212], "rates": [9e3, 6e3]}),
        '{"t": 102.0, "ev": "sha',  # a torn last line is skipped
    ]))
    assert heterogeneity._shares_trace(trace, 100.0) == [{"t": 1.5, "samples": [300, 212], "rates": [9e3, 6e3]}]
    assert heterogeneity._shares_trace(tmp_path / "absent.jsonl", 0.0) == []


@pytest.mark.usefixtures("need_cgroup")
@pytest.mark.timeout(SMOKE_TIMEOUT)
def test_two_members_at_different_cpu_limits_train_exactly_once_into_identical_replicas(tmp_path: Path) -> None:
    out = tmp_path / "hetero.json"
    assert heterogeneity.main(["--smoke", "--json", str(out)]) == 0
    data = json.loads(out.read_text())
    params, rows = data["params"], data["rows"]
    assert params["mode"] == "smoke" and params["cpus"] == [0.5, 0.25]
    (run,) = [r for r in rows if r["kind"] == "run"]
    assert run["shares"] == "adaptive" and run["nodes"] == 2
    assert run["exact_cover"] and run["identical"], run["epochs"]
    assert run["global_step"] == [params["steps"]]
    for member, epochs in run["epochs"].items():
        assert sorted(epochs) == [str(e) for e in range(params["epochs"])], member
        assert all(counts == {"missing": 0, "duplicated": 0, "strangers": 0} for counts in epochs.values()), member
    assert math.isfinite(run["samples_per_s"]) and run["samples_per_s"] > 0
    assert run["ideal_samples_per_s"] is None  # no calibration at this size
    assert len(run["node_samples"]) == 2 and all(n > 0 for n in run["node_samples"])
