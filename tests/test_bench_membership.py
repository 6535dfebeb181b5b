"""The membership benchmark runs end to end and writes rows a plot can trust.

``benchmarks/membership.py --smoke`` (8 simulated nodes, 5 real agents, one
repetition) as a subprocess with a bounded timeout: every simulated event and
every real one is present, each with the fields the plots read, and the values
are sane (a commit takes time, costs messages, and the decision is a single
sub-second call).  The numbers themselves are the benchmark's business.
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "membership.py"

#: seconds; the smoke run takes about 5 s (mostly the real agents' settling)
SMOKE_TIMEOUT = 60

REQUIRED = (
    "mode", "nodes", "event", "preset", "seed", "repeats",
    "decision_us", "decision_us_min", "decision_us_max",
    "commit_ms", "commit_ms_min", "commit_ms_max",
    "messages", "messages_all", "paper_bar_1ms", "samples",
)


def test_smoke_run_writes_every_event_with_sane_values(tmp_path):
    out = tmp_path / "membership.json"
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--smoke", "--json", str(out), "--seed", "3"],
        cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "decision_us" in proc.stdout, "the table is printed"

    rows = json.loads(out.read_text())
    sim = {r["event"]: r for r in rows if r["mode"] == "sim"}
    real = {r["event"]: r for r in rows if r["mode"] == "real"}
    assert set(sim) == {"join", "leave", "failure", "link-down", "link-up"}
    assert set(real) == {"join", "leave", "failure"}, "no real link rows until the namespace testbed"

    for r in rows:
        what = f"{r['mode']} {r['event']}"
        assert all(k in r for k in REQUIRED), f"{what}: missing {[k for k in REQUIRED if k not in r]}"
        assert r["nodes"] == (8 if r["mode"] == "sim" else 5)
        assert r["preset"] == ("lan" if r["mode"] == "sim" else "local")
        assert r["repeats"] == 1 and len(r["samples"]) == 1 and r["seed"] == 3
        assert r["commit_ms"] > 0, what
        assert r["messages"] >= 1 and r["messages_all"] >= r["messages"], what
        assert 0 < r["decision_us"] < 1e6, what
        assert r["decision_us_min"] <= r["decision_us"] <= r["decision_us_max"]
        # the proposal comes before the last member installs the view
        assert r["decided_ms"] <= r["commit_ms"], what
        bar = None if r["event"] == "join" else ("pass" if r["decision_us"] <= 1000 else "miss")
        assert r["paper_bar_1ms"] == bar, what
        assert r["later_proposals"] == 0, f"{what}: the event did not end in one view change"
