"""How fast a ``kill -9`` becomes a view without the dead node (issue 14).

    python benchmarks/kill_detection.py [--kills 20] [--nodes 2] [--preset local] [--json PATH]

Role in the whole: the membership layer alone, no training.  ``--nodes``
rendezvous processes (``python -m chaos_lightning.rendezvous``, the peer
backend, no process-group store) form a cluster on loopback; the newest one
is ``kill -9``-ed a second after the view with it committed, and the time
from the kill to the first survivor's report of the view without it is
taken (the report is a JSON line on the survivor's stdout, read by
:class:`chaos_lightning.testbed.local.Node`: a millisecond or so of it is
the pipe).  Each kill is a fresh cluster, so every kill lands at another
moment of the probe period.

With two nodes this is the case of ``tests/test_agent.py::
test_two_processes_one_killed_*``: the survivor is a minority of the old view
and goes on only on proof of death (its connect to the dead node's port is
refused).  What makes it fast is the kernel closing the dead process's
sockets: the survivor's agent sees its inbound connection closed and probes
at once (``Detector.hint``), and its dial is refused.

Prints one line per kill and a summary; ``--json`` writes the kills, the
median and the maximum.  Every process is reaped; every wait is bounded.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

from chaos_lightning.testbed.local import Node  # noqa: E402
from chaos_lightning.testbed.procs import free_ports  # noqa: E402


def one_kill(nodes: int, preset: str, logs: Path) -> float:
    """Seconds from the ``kill -9`` of the newest node to the founder's view without it."""
    ports = free_ports(nodes)
    procs: list[Node] = []
    try:
        for i, port in enumerate(ports):
            args = ["--backend", "peer", "--bind", f"127.0.0.1:{port}", "--no-store", "--preset", preset]
            if i:
                args += ["--peers", procs[0].addr]
            procs.append(Node(args, logs / f"node{i}.err", cwd=REPO))
            procs[-1].ready(30)
        founder, victim = procs[0], procs[-1]
        full = founder.wait_view(lambda m: len(m) == nodes, 60, f"a view of {nodes}")
        victim.wait_view(lambda m: len(m) == nodes, 60, f"a view of {nodes}")
        time.sleep(1.0)
        t0 = time.monotonic()
        victim.kill9()
        founder.wait_view(lambda m: victim.node_id not in m, 10, "the view without the killed node",
                          after=full["epoch"])
        return time.monotonic() - t0
    finally:
        for p in procs:
            p.stop()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python benchmarks/kill_detection.py", description=__doc__.split("\n\n")[0])
    ap.add_argument("--kills", type=int, default=20)
    ap.add_argument("--nodes", type=int, default=2)
    ap.add_argument("--preset", default="local")
    ap.add_argument("--json", type=Path, default=None)
    args = ap.parse_args(argv)
    took = []
    with tempfile.TemporaryDirectory(prefix="chaos-kill-detection-") as tmp:
        for k in range(args.kills):
            logs = Path(tmp) / f"k{k}"
            logs.mkdir()
            took.append(one_kill(args.nodes, args.preset, logs))
            print(f"kill {k}: view without it after {took[-1] * 1e3:.0f} ms", flush=True)
    ms = sorted(round(t * 1e3, 1) for t in took)
    summary = {"nodes": args.nodes, "preset": args.preset, "kills": len(ms), "median_ms": statistics.median(ms),
               "max_ms": ms[-1], "kill_to_view_ms": ms}
    print(f"{args.nodes} nodes, {args.preset}: kill -9 -> view without it, median {summary['median_ms']:.0f} ms, "
          f"max {summary['max_ms']:.0f} ms over {len(ms)} kills")
    if args.json is not None:
        args.json.write_text(json.dumps(summary, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
