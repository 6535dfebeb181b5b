"""The checkpoint-restart baseline (torchrun + etcd-v2 + Lightning DDP) measures a join and a kill.

``benchmarks/_ckpt_restart.measure`` at a tiny size (2 nodes, hidden 64, one
repetition) against a real etcd server it starts itself: one join record and
one kill record, every field present, the timings plausible (positive,
ordered, bounded), every process reaped.  The numbers themselves are the
benchmark's business (docs/baselines_ckpt_restart.md).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import psutil
import pytest

REPO = Path(__file__).resolve().parents[1]

KEYS = {"system", "nodes", "state_mb", "rep", "event", "scale_out_cold_s", "scale_out_warm_s", "first_step_s",
        "idle_sum_s", "idle_max_s", "steps_lost", "notes"}


def _bench():
    spec = importlib.util.spec_from_file_location("_ckpt_restart", REPO / "benchmarks" / "_ckpt_restart.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ours() -> set[int]:
    """Our agents and workers still alive (by command line), for the reaping check."""
    found = set()
    for p in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(p.info["cmdline"] or [])
        if "ckpt_restart.worker" in cmd and "--workdir" in cmd:
            found.add(p.info["pid"])
    return found


@pytest.fixture
def need_etcd_v2():
    """Skip without the etcd binary or python-etcd on a workstation; fail under CI=true."""
    from chaos_lightning.integrations.etcd.server import etcd_binary

    ci = os.environ.get("CI", "").strip().lower() not in ("", "0", "false", "no")
    missing = []
    if etcd_binary() is None:
        missing.append("etcd binary (apt-get install etcd-server)")
    if importlib.util.find_spec("etcd") is None:
        missing.append("python-etcd (pip install python-etcd: torch's etcd-v2 rendezvous client)")
    if missing:
        msg = "missing " + ", ".join(missing)
        if ci:
            pytest.fail(msg + " under CI=true")
        pytest.skip(msg + " (under CI=true this fails)")


@pytest.mark.etcd
@pytest.mark.slow
@pytest.mark.timeout(300)
def test_tiny_join_and_kill_give_complete_plausible_records(tmp_path, need_etcd_v2):
    bench = _bench()
    before = _ours()
    records = bench.measure(nodes=2, hidden=64, reps=1, step_sleep=0.05, workdir=tmp_path / "run", timeout=120)
    assert not (_ours() - before), "every agent and worker is reaped"

    assert [r["event"] for r in records] == ["join", "kill"], records
    for r in records:
        assert set(r) == KEYS, f"{r['event']}: keys {sorted(set(r) ^ KEYS)}"
        assert r["system"] == "ckpt-restart" and r["rep"] == 0
        assert r["state_mb"] == pytest.approx(12 * (32 * 64 + 64 + 64 * 64 + 64 + 64 + 1) / 1e6)
        assert isinstance(r["notes"], str) and r["notes"]
        # a restart costs at least a fresh worker's imports, and stays within the wait bound
        assert 0.5 < r["first_step_s"] < 120, r
        assert 0 < r["idle_max_s"] <= r["idle_sum_s"] < 2 * 120, r
        assert isinstance(r["steps_lost"], int) and 0 <= r["steps_lost"] <= 60, r

    join, kill = records
    assert join["nodes"] == 2 and kill["nodes"] == 3
    assert 0 < join["scale_out_warm_s"] < join["scale_out_cold_s"] < 120
    assert join["first_step_s"] == pytest.approx(join["scale_out_cold_s"], abs=0.5)
    assert kill["scale_out_cold_s"] is None and kill["scale_out_warm_s"] is None
    assert "restarted" in join["notes"] and "SIGKILL" in kill["notes"]
    # the survivors restarted: the idle time is a fresh process's start, not one step
    assert join["idle_max_s"] > 1.0 and kill["idle_max_s"] > 1.0

    table = bench.table(records)
    assert "median join" in table and "median kill" in table
