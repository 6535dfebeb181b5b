"""The head-to-head harness (``benchmarks/run.py``) and its chaos systems (``benchmarks/_chaos.py``).

The aggregation, the targets and the generated BENCHMARKS.md are checked on
hand-made records (every number determined by the input); the chaos
measurement runs for real at a tiny size (2 processes, one join and one
leave) and must return complete records with held invariants.  The
baselines have their own smoke tests (``test_bench_ckpt_restart.py``,
``test_bench_torchft.py``); timings are the benchmark's business, not the
tests'.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "benchmarks"))

import _chaos  # noqa: E402
import run as bench  # noqa: E402

BIG_MB = round(_chaos.state_mb(bench.BIG))


def rec(system: str, event: str, rep: int, **metrics: float) -> dict:
    return {"system": system, "nodes": 4, "state_mb": BIG_MB, "rep": rep, "event": event, **metrics}


def test_state_size_follows_the_workload_model() -> None:
    from chaos_lightning.scenario.workload import MLP

    model = MLP(hidden=256)
    params = sum(p.numel() for p in model.parameters())
    assert _chaos.state_mb(256) == pytest.approx(12 * params / 1e6)


def test_timeline_rounds_bring_the_cluster_back_before_each_event() -> None:
    text = _chaos.timeline(4, 1024, 2, 0.03, ("join", "leave", "kill", "link"))
    lines = [line.split() for line in text.splitlines()]
    assert lines[2] == ["0", "start", "n0", "n1", "n2", "n3"]
    actions = [(w[1], w[2:]) for w in lines[3:]]
    assert actions[:6] == [("join", ["j0"]), ("leave", ["j0"]), ("join", ["k0"]), ("kill", ["k0"]),
                           ("cut", ["n0", "n3"]), ("restore", ["n0", "n3"])]
    assert actions[-1] == ("end", []) and len(actions) == 13
    assert "cut" not in _chaos.timeline(2, 1024, 1, 0.03, ("link",))  # two nodes: a cut is a partition


def test_aggregates_targets_and_markdown_from_known_records(tmp_path: Path) -> None:
    records = []
    for r, (cold, warm, idle) in enumerate([(4.0, 0.2, 0.3), (5.0, 0.3, 0.5), (6.0, 0.4, 0.4)]):
        records.append(rec("chaos", "join", r, scale_out_cold_s=cold, scale_out_warm_s=warm, idle_sum_s=idle, transfer_s=0.5))
        records.append(rec("chaos-1src", "join", r, scale_out_cold_s=cold + 1, transfer_s=2.0))
        records.append(rec("ckpt-restart", "join", r, scale_out_cold_s=60.0, scale_out_warm_s=40.0, idle_sum_s=90.0))
        records.append(rec("torchft", "join", r, scale_out_cold_s=8.0, scale_out_warm_s=0.6, idle_sum_s=0.9))
        records.append({**rec("chaos", "leave", r, first_step_s=0.05 + r / 100), "nodes": 8})
    agg = bench.aggregate(records)
    join = next(a for a in agg if a["system"] == "chaos" and a["event"] == "join")
    assert join["n"] == 3 and join["scale_out_cold_s"] == {"median": 5.0, "min": 4.0, "max": 6.0, "n": 3}
    extra = [{"system": "testbed", "event": "pull", "state_mb": 200.0, "sources": 4, "kind": "equal",
              "rates_mbit": [200.0] * 4, "multi_s": 2.1, "single_s": 8.4, "bound_s": 2.0, "ratio": 1.05, "speedup": 4.0},
             {"event": "steady", "kind": "ratio", "ratio": 0.98}]
    tg = {t["target"]: t for t in bench.targets(agg, extra)}
    cold = tg[f"scale-out (cold) >= 10x faster than checkpoint-restart, {BIG_MB} MB"]
    assert cold["measured"] == 12.0 and cold["met"] is True
    warm = tg[f"scale-out (warm) >= 10x faster than checkpoint-restart, {BIG_MB} MB"]
    assert warm["measured"] == round(40.0 / 0.3, 2) and warm["met"] is True
    assert tg[f"(information) single-source / multi-source pull, {BIG_MB} MB, unshaped loopback"]["measured"] == 4.0
    assert tg["transfer >= 3x faster than single-source, 4 equal links, 200 MB (testbed)"]["met"] is True
    assert tg[f"survivors' idle time (join) below TorchFT's, {BIG_MB} MB"]["measured"] == round(0.9 / 0.4, 2)
    leave = tg["training resumed within 100 ms of a leave at 8 nodes"]
    assert leave["measured"] == 60 and leave["met"] is True and f"({BIG_MB} MB of state)" in leave["what"]
    assert tg["steady state >= 0.97 of ddp"]["met"] is True
    missing = tg[f"survivors' idle time (kill) below TorchFT's, {BIG_MB} MB"]
    assert missing["met"] is None and "not measured" in missing["what"]
    doc = {"plan": {"name": "quick"}, "machine": {"when": "now", "cpus": 2, "platform": "linux"}, "wall_s": 1.0,
           "records": records + [{"system": "chaos", "nodes": 4, "hidden": 4096, "event": "run", "invariants_ok": True}],
           "extra": extra, "aggregates": agg, "targets": list(tg.values()), "plots": []}
    text = bench.markdown(doc)
    assert "| chaos (peer, multi-source) | 5.00 s [4.00-6.00] | 0.30 s [0.20-0.40] |" in text
    assert "| torchrun + etcd, checkpoint-restart | 60.00 s [60.00-60.00] |" in text
    assert "| 200 | 4 | 200, 200, 200, 200 | 2.10 | 8.40 | 2.00 | 1.05 | 4.00 |" in text
    assert "invariants held" in text
    assert bench.plot(agg, tmp_path) == [str(tmp_path / "systems.png")]


@pytest.mark.slow
@pytest.mark.timeout(180)
def test_chaos_measure_returns_complete_records(tmp_path: Path) -> None:
    # 3.3 MB of state: 3 shards, so the ordinary joiner pulls from both members
    # and the single-source one (same run, CHAOS_MAX_SOURCES=1) from one
    recs = _chaos.measure(nodes=2, hidden=512, reps=1, step_sleep=0.02, workdir=tmp_path, timeout=150,
                          events=("join", "leave"), single_source=True)
    by = {(r["system"], r["event"]): r for r in recs}
    assert by[("chaos", "run")]["invariants_ok"], by[("chaos", "run")]
    join, leave, single = by[("chaos", "join")], by[("chaos", "leave")], by[("chaos-1src", "join")]
    assert 0 < join["scale_out_warm_s"] < join["scale_out_cold_s"], join
    assert join["transfer_s"] > 0 and join["transfer_mb"] > 0 and join["sources"] == 2, join
    assert single["transfer_mb"] == join["transfer_mb"] and single["sources"] == 1, single
    assert 0 < single["scale_out_warm_s"] < single["scale_out_cold_s"], single
    assert leave["first_step_s"] is not None and leave["first_step_s"] > 0, leave
    assert leave["idle_sum_s"] is not None, leave
