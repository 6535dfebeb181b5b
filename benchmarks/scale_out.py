"""Scale-out transfer: the multi-neighbor pull against one source and against the transfer bound.

Role in the whole: the measurement behind the paper's claim that a joiner
pulling the state from several neighbors at once is much faster than from one
(the EDL/Horovod-like baseline of DESIGN.md), judged by its ratio to the
design's *transfer bound* (state bytes / min(joiner downlink, sum of the
sources' uplinks)).

    python benchmarks/scale_out.py [--quick | --smoke] [--json PATH] [--png PATH]

Each configuration runs on the namespace testbed (needs root, ip, tc): every
source in its own namespace serves the same synthetic state
(``python -m chaos_lightning.replication serve``, same seed), its uplink capped
with tbf; the joiner, in one more namespace with an unshaped downlink, runs
``python -m chaos_lightning.replication pull``.  Rows:

``state_mb``, ``sources``, ``rates_mbit``
    The configuration (``equal``: every source at ``--rate``; ``unequal``:
    rates cycling through 0.5x, 1x, 1.5x, 2x of it).
``multi_s``
    The pull from all sources (rates given to the scheduler, as the monitor
    would), seconds from the pull's start to its last shard (process start
    and the digest check excluded).
``single_s``
    The whole state from the fastest of those sources alone.
``bound_s``
    state bytes / sum of the sources' rates (the downlink is unshaped).
``ratio``, ``speedup``
    ``multi_s / bound_s`` and ``single_s / multi_s``.

Full run: 50 MB, 200 MB and 1 GB; 1, 2, 4 and 8 sources; equal and unequal
rates.  ``--quick``: 50 MB, 1, 2 and 4 sources.  ``--smoke``: 20 MB, 1 and 2
sources, equal rates (for the test suite).  Timings are noisy on shared
machines: compare ratios within one run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chaos_lightning.testbed import Testbed, available  # noqa: E402

PY = sys.executable
PORT = 7100
SECRET = "scale-out-benchmark"
UNEQUAL = (0.5, 1.0, 1.5, 2.0)


def _rates(kind: str, n: int, base: float) -> list[float]:
    return [base] * n if kind == "equal" else [base * UNEQUAL[i % len(UNEQUAL)] for i in range(n)]


class Cluster:
    """Sources on nodes 0..n-1 of a testbed, the joiner on node n."""

    def __init__(self, tb: Testbed, n_sources: int, state_mb: float) -> None:
        self.tb = tb
        self.n = n_sources
        self.env = {**os.environ, "CHAOS_SECRET": SECRET, "PYTHONUNBUFFERED": "1"}
        self.procs = []
        for i in range(n_sources):
            argv = [PY, "-m", "chaos_lightning.replication", "serve", "--bind", self.addr(i),
                    "--state-mb", str(state_mb), "--seed", "0"]
            self.procs.append(tb.popen(i, argv, stdout=subprocess.PIPE, text=True, env=self.env, cwd=REPO))
        self.ready = [json.loads(p.stdout.readline() or "{}") for p in self.procs]
        if any(r.get("event") != "ready" for r in self.ready):
            raise RuntimeError(f"a source did not start: {self.ready}")

    def addr(self, node: int) -> str:
        return f"{self.tb.addr(node)}:{PORT}"

    def stop(self) -> None:
        for p in self.procs:
            p.terminate()
        for p in self.procs:
            p.wait(timeout=10)

    def pull(self, nodes: list[int], rates: list[float]) -> dict:
        argv = [PY, "-m", "chaos_lightning.replication", "pull", "--timeout", "600"]
        for node, rate in zip(nodes, rates):
            argv += ["--source", self.addr(node), "--rate-mbit", str(rate)]
        r = self.tb.run(self.n, argv, timeout=900, env=self.env, cwd=REPO)
        done = [json.loads(line) for line in r.stdout.splitlines() if line.startswith("{")]
        if not done or done[-1].get("event") != "done":
            raise RuntimeError(f"pull failed: {r.stdout[-2000:]} {r.stderr[-2000:]}")
        if done[-1]["digest"] != self.ready[0]["digest"]:
            raise RuntimeError("the joiner's state differs from the sources'")
        return done[-1]


def run(sizes: list[float], counts: list[int], kinds: list[str], base: float) -> list[dict]:
    rows = []
    for state_mb in sizes:
        with Testbed(max(counts) + 1) as tb:
            cluster = Cluster(tb, max(counts), state_mb)
            try:
                for n in counts:
                    for kind in kinds if n > 1 else ["equal"]:
                        rates = _rates(kind, n, base)
                        for node, rate in enumerate(rates):
                            tb.shape(node, rate, "egress")
                        nodes = list(range(n))
                        multi = cluster.pull(nodes, rates)
                        fastest = max(nodes, key=lambda i: rates[i])
                        single = multi if n == 1 else cluster.pull([fastest], [rates[fastest]])
                        bound = multi["total_bytes"] / (sum(rates) * 1e6 / 8)
                        rows.append({
                            "state_mb": state_mb, "sources": n, "kind": kind, "rates_mbit": rates,
                            "multi_s": multi["seconds"], "single_s": single["seconds"], "bound_s": bound,
                            "ratio": multi["seconds"] / bound, "speedup": single["seconds"] / multi["seconds"],
                            "stolen": multi["stolen"], "duplicates": multi["duplicates"],
                        })
                        r = rows[-1]
                        print(f"{state_mb:>7.0f} {n:>3} {kind:>8} {r['multi_s']:>8.2f} {r['single_s']:>8.2f} "
                              f"{r['bound_s']:>8.2f} {r['ratio']:>6.2f} {r['speedup']:>7.2f}", flush=True)
            finally:
                cluster.stop()
    return rows


def plot(rows: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    sizes = sorted({r["state_mb"] for r in rows})
    fig, axes = plt.subplots(1, len(sizes), figsize=(5 * len(sizes), 4), squeeze=False)
    for ax, size in zip(axes[0], sizes):
        for kind, style in (("equal", "-"), ("unequal", "--")):
            rs = sorted((r for r in rows if r["state_mb"] == size and (r["kind"] == kind or r["sources"] == 1)),
                        key=lambda r: r["sources"])
            if len(rs) < 2 and kind == "unequal":
                continue
            x = [r["sources"] for r in rs]
            ax.plot(x, [r["multi_s"] for r in rs], "o" + style, label=f"multi ({kind})")
            ax.plot(x, [r["single_s"] for r in rs], "s" + style, label=f"single ({kind})")
            ax.plot(x, [r["bound_s"] for r in rs], ":", label=f"bound ({kind})")
        ax.set(title=f"{size:g} MB state", xlabel="sources", ylabel="seconds", xscale="log", yscale="log")
        counts = sorted({r["sources"] for r in rows})
        ax.set_xticks(counts, labels=[str(n) for n in counts])
        ax.xaxis.set_minor_locator(matplotlib.ticker.NullLocator())
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    mode = ap.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true")
    mode.add_argument("--smoke", action="store_true")
    ap.add_argument("--json", type=Path)
    ap.add_argument("--png", type=Path, help="default: the JSON path with .png")
    ap.add_argument("--rate", type=float, default=200.0, help="base source rate, Mbit/s")
    args = ap.parse_args()
    ok, why = available()
    if not ok:
        print(f"namespace testbed unavailable: {why}", file=sys.stderr)
        return 2
    if args.smoke:
        name, sizes, counts, kinds = "smoke", [20.0], [1, 2], ["equal"]
    elif args.quick:
        name, sizes, counts, kinds = "quick", [50.0], [1, 2, 4], ["equal", "unequal"]
    else:
        name, sizes, counts, kinds = "full", [50.0, 200.0, 1000.0], [1, 2, 4, 8], ["equal", "unequal"]
    print(f"{'state_mb':>7} {'src':>3} {'rates':>8} {'multi_s':>8} {'single_s':>8} {'bound_s':>8} {'ratio':>6} {'speedup':>7}")
    t0 = time.monotonic()
    rows = run(sizes, counts, kinds, args.rate)
    print(f"({name} run, {time.monotonic() - t0:.0f}s)")
    if args.json:
        args.json.write_text(json.dumps({"params": {"mode": name, "rate_mbit": args.rate}, "rows": rows}, indent=1))
        plot(rows, args.png or args.json.with_suffix(".png"))
    elif args.png:
        plot(rows, args.png)
    return 0


if __name__ == "__main__":
    sys.exit(main())
