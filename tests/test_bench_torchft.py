"""The TorchFT baseline runs end to end and gives complete, plausible records.

``benchmarks/_torchft.py``'s ``measure()`` at a tiny size (2 replicas,
hidden 64, one repetition): a real Lighthouse, real replica processes, a
real join and a real ``kill -9``.  Only sanity here (every field the event
defines is there and positive, the warm part of the scale-out is shorter than
the cold one, the state size is the model's); the numbers themselves are
reported in docs/baselines_torchft.md, never asserted.

Without torchft the test is skipped on a workstation and fails under CI=true
(CI installs it: ``pip install torchft==0.2.0``), as conftest does for etcd.
"""

from __future__ import annotations

import importlib.util
import math
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
#: the whole smoke run: ~30 s on an idle 2-core machine, ~45 s under load
MEASURE_TIMEOUT = 180
HIDDEN = 64


def _ci() -> bool:
    return os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")


@pytest.fixture
def need_torchft():
    if importlib.util.find_spec("torchft") is None:
        if _ci():
            pytest.fail("torchft is not importable but CI is set: pip install torchft==0.2.0")
        pytest.skip("torchft is not importable: pip install torchft==0.2.0 (under CI=true this fails)")


def _load_benchmark():
    spec = importlib.util.spec_from_file_location("_torchft_bench", REPO / "benchmarks" / "_torchft.py")
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod
    spec.loader.exec_module(mod)
    return mod


def _positive(x: object) -> bool:
    return isinstance(x, float) and math.isfinite(x) and x > 0


@pytest.mark.slow
@pytest.mark.timeout(MEASURE_TIMEOUT + 60)
def test_two_replicas_a_joiner_and_a_kill_give_complete_records(tmp_path, need_torchft):
    bench = _load_benchmark()
    records = bench.measure(nodes=2, hidden=HIDDEN, reps=1, step_sleep=0.05, workdir=tmp_path,
                            timeout=MEASURE_TIMEOUT)

    keys = {"system", "nodes", "state_mb", "rep", "event", "scale_out_cold_s", "scale_out_warm_s", "first_step_s",
            "idle_sum_s", "idle_max_s", "transfer_s", "samples_per_s", "notes"}
    assert [r["event"] for r in records] == ["steady", "join", "kill"], records
    for r in records:
        assert set(r) == keys, r
        assert r["system"] == "torchft" and r["rep"] == 0 and isinstance(r["notes"], str)
        # parameters + Adam's two moments: 12 bytes per parameter of MLP(dim=32, hidden=64)
        params = 32 * HIDDEN + HIDDEN + HIDDEN * HIDDEN + HIDDEN + HIDDEN + 1
        assert abs(r["state_mb"] * 1e6 - 12 * params) < 1000, r

    steady, join, kill = records
    assert steady["nodes"] == 2 and _positive(steady["samples_per_s"]), steady
    # 2 replicas x 16 samples per step of >= step_sleep: at most 2 * 16 / 0.05 samples/s
    assert steady["samples_per_s"] < 2 * 16 / 0.05, steady

    assert join["nodes"] == 2, join
    for k in ("scale_out_cold_s", "scale_out_warm_s", "first_step_s", "transfer_s"):
        assert _positive(join[k]), (k, join)
    assert join["scale_out_warm_s"] < join["scale_out_cold_s"], join
    assert join["transfer_s"] < join["scale_out_warm_s"], join
    assert join["idle_sum_s"] >= join["idle_max_s"] >= 0, join

    assert kill["nodes"] == 3, kill
    # the survivors wait for the victim's heartbeat to expire (1 s) before a quorum without it
    assert _positive(kill["first_step_s"]) and kill["first_step_s"] > 0.5, kill
    assert kill["idle_sum_s"] >= kill["idle_max_s"] > 0, kill
    # what an event does not define stays None
    assert all(kill[k] is None for k in ("scale_out_cold_s", "scale_out_warm_s", "transfer_s", "samples_per_s"))
    assert join["samples_per_s"] is None
    assert all(steady[k] is None for k in ("scale_out_cold_s", "scale_out_warm_s", "first_step_s", "idle_sum_s",
                                           "idle_max_s", "transfer_s"))

    # every process was reaped: no replica or lighthouse outlives measure()
    import psutil

    leftovers = [p for p in psutil.Process().children(recursive=True) if p.is_running()
                 and p.status() != psutil.STATUS_ZOMBIE]
    assert not leftovers, leftovers
