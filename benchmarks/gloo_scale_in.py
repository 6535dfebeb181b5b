"""What this torch offers gloo for scale-in without a full rebuild (issue 14).

Role in the whole: every view change initialises a new gloo group of the
members that stay (``strategy/process_group.py``).  torch 2.x grew two ways
to derive a smaller group from a live one, ``shrink_group`` and
``split_group``; this script asks the installed torch whether either works
on gloo, and times what the strategy does instead.

    python benchmarks/gloo_scale_in.py [--ranks 3] [--json PATH]

``--ranks`` processes on loopback form a gloo group and all-reduce; the
last one then leaves (after a barrier: a graceful leave), and the others
try, in turn, ``shrink_group([last])``, ``split_group`` of the others, and a
fresh ``init_process_group`` of the others on a new store prefix (what the
strategy does), each followed by one all-reduce.  Printed (and written as
JSON): per way, whether it worked or its error, and the slowest survivor's
time to build the group and to run the first all-reduce.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def worker(rank: int, ranks: int, port: int) -> None:
    import torch
    import torch.distributed as dist

    store = dist.TCPStore("127.0.0.1", port, ranks, rank == 0, timeout=timedelta(seconds=30))
    dist.init_process_group("gloo", store=dist.PrefixStore("whole", store), rank=rank, world_size=ranks,
                            timeout=timedelta(seconds=30))
    dist.all_reduce(torch.ones(4))
    leaver, stay = ranks - 1, list(range(ranks - 1))
    dist.barrier()  # a graceful leave: every rank at the boundary
    if rank == leaver:
        time.sleep(2.0)  # keeps the store's host alive only if it is rank 0 (it is not)
        return
    out = {}
    ways = {
        "shrink_group": lambda: dist.shrink_group([leaver]),
        "split_group": lambda: dist.split_group(split_ranks=[stay]),
        "init_process_group": lambda: (dist.destroy_process_group(), dist.init_process_group(
            "gloo", store=dist.PrefixStore("stay", store), rank=rank, world_size=len(stay),
            timeout=timedelta(seconds=30)))[-1],
    }
    for name, build in ways.items():
        t0 = time.perf_counter()
        try:
            group = build()
            t1 = time.perf_counter()
            t = torch.ones(4)
            dist.all_reduce(t, group=group if name != "init_process_group" else None)
            out[name] = {"ok": t.tolist() == [float(len(stay))] * 4, "build_ms": 1e3 * (t1 - t0),
                         "first_all_reduce_ms": 1e3 * (time.perf_counter() - t1)}
        except Exception as exc:  # noqa: BLE001 - what the torch says is the finding
            out[name] = {"ok": False, "error": f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}"}
    print(json.dumps({"rank": rank, **out}), flush=True)
    dist.destroy_process_group()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--json", type=Path)
    ap.add_argument("--worker", nargs=3, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    import torch

    sys.path.insert(0, str(REPO))
    from chaos_lightning.testbed.procs import free_port

    port = free_port()
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(r), str(args.ranks), str(port)],
                              stdout=subprocess.PIPE, text=True) for r in range(args.ranks)]
    lines = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        lines += [json.loads(x) for x in out.splitlines() if x.startswith("{")]
    ways: dict[str, dict] = {}
    for rec in lines:
        for name, res in rec.items():
            if name == "rank":
                continue
            w = ways.setdefault(name, {"ok": True, "build_ms": 0.0, "first_all_reduce_ms": 0.0})
            w["ok"] = w["ok"] and res["ok"]
            if "error" in res:
                w["error"] = res["error"]
            for k in ("build_ms", "first_all_reduce_ms"):
                if k in res:
                    w[k] = max(w[k], res[k])
    result = {"torch": torch.__version__, "ranks": args.ranks, "survivors": args.ranks - 1, "ways": ways}
    for name, w in ways.items():
        print(f"{name:20s} " + (f"works: build {w['build_ms']:.1f} ms, first all-reduce {w['first_all_reduce_ms']:.1f} ms"
                                if w["ok"] else f"fails: {w.get('error', 'wrong result')}"))
    if args.json:
        args.json.write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
