"""The scale-out benchmark runs end to end on the namespace testbed and writes sane rows.

``benchmarks/scale_out.py --smoke`` (20 MB, 1 and 2 sources at equal rates)
as a subprocess with a bounded timeout: the table, the JSON rows with the
issue's keys, and the PNG.  Timing thresholds live in
``test_replication_testbed.py``; here only sanity (finite, positive, the
multi-source pull not slower than one source).
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from chaos_lightning.testbed import available

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "scale_out.py"
SMOKE_TIMEOUT = 90  # about 15 s on 2 cores


@pytest.mark.timeout(SMOKE_TIMEOUT + 30)
def test_smoke_run_writes_rows_table_and_plot(tmp_path):
    ok, why = available()
    if not ok:
        pytest.skip(f"namespace testbed unavailable: {why}")
    out = tmp_path / "scale_out.json"
    proc = subprocess.run([sys.executable, str(SCRIPT), "--smoke", "--json", str(out)],
                          cwd=REPO, capture_output=True, text=True, timeout=SMOKE_TIMEOUT, check=False)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "multi_s" in proc.stdout and "single_s" in proc.stdout
    rows = json.loads(out.read_text())["rows"]
    assert [r["sources"] for r in rows] == [1, 2]
    for r in rows:
        assert {"state_mb", "sources", "rates_mbit", "multi_s", "single_s", "bound_s"} <= set(r)
        assert all(math.isfinite(r[k]) and r[k] > 0 for k in ("multi_s", "single_s", "bound_s"))
        assert len(r["rates_mbit"]) == r["sources"]
    assert rows[1]["multi_s"] < rows[1]["single_s"]
    assert out.with_suffix(".png").stat().st_size > 1000
