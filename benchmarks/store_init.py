"""Process-group init time: the authenticated wire store against torch's ``TCPStore``.

Role in the whole: the price of the design's rule "nothing answers without the
secret" for the process-group store (:mod:`chaos_lightning.rendezvous.store`)
at every membership switch, where ``init_process_group`` is on the survivors'
idle time.

    python benchmarks/store_init.py [--ranks 3] [--inits 20]

This process hosts both stores (a :class:`StoreHost` with a secret and a
``TCPStore`` server), starts ``--ranks`` worker processes on loopback, and
each worker builds ``--inits`` gloo groups through each store, rotating
the kinds (a fresh prefix per init, as per epoch: ``chaos/epoch/<i>/`` on the
wire store, as the strategy's), with one ``all_reduce`` after each and the
group destroyed before the next.  Three kinds: ``wire`` (the store as the
strategy uses it), ``wire-1key`` (the same with each wait reading its one key
only, ``MAX_SIBLINGS = 0``: how it read before 2026-12-07) and ``tcp``.  A
worker times ``init_process_group`` only.  Printed per kind: the median over
inits of the slowest and of the fastest rank (the fastest rank is the last to
arrive, so its time is the store's and gloo's own cost, without waiting for
the others).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import timedelta
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
SECRET = b"store-init-benchmark-secret-0123"


def worker(rank: int, ranks: int, inits: int, wire_port: int, tcp_port: int) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist

    from chaos_lightning.rendezvous import store as wire_store
    from chaos_lightning.rendezvous.store import WireStore

    wire = WireStore("127.0.0.1", wire_port, secret=SECRET, timeout=timedelta(seconds=30))
    tcp = dist.TCPStore("127.0.0.1", tcp_port, None, False, timedelta(seconds=30), wait_for_workers=False)
    siblings = wire_store.MAX_SIBLINGS
    kinds = [("wire", wire), ("wire-1key", wire), ("tcp", tcp)]
    times: dict[str, list[float]] = {kind: [] for kind, _ in kinds}
    for i in range(inits):
        for kind, base in kinds[i % 3:] + kinds[:i % 3]:
            wire_store.MAX_SIBLINGS = 0 if kind == "wire-1key" else siblings
            epoch = 3 * i + [k for k, _ in kinds].index(kind) + 1  # a fresh epoch per init, as per view
            store = dist.PrefixStore(f"chaos/epoch/{epoch}/bench/" if base is wire else f"bench/{i}/", base)
            t0 = time.perf_counter()
            dist.init_process_group("gloo", store=store, rank=rank, world_size=ranks, timeout=timedelta(seconds=30))
            times[kind].append(time.perf_counter() - t0)
            t = torch.ones(1)
            dist.all_reduce(t)
            assert t.item() == ranks
            dist.destroy_process_group()
    print(json.dumps(times), flush=True)
    wire.close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--ranks", type=int, default=3)
    ap.add_argument("--inits", type=int, default=20)
    ap.add_argument("--worker", nargs=5, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(*args.worker)
        return
    sys.path.insert(0, str(REPO))
    import torch.distributed as dist

    from chaos_lightning.rendezvous.store import StoreHost

    host = StoreHost("127.0.0.1", secret=SECRET)
    tcp = dist.TCPStore("127.0.0.1", 0, None, True, timedelta(seconds=30), wait_for_workers=False)
    procs = [
        subprocess.Popen(
            [sys.executable, __file__, "--worker", str(r), str(args.ranks), str(args.inits), str(host.port),
             str(tcp.port)],
            stdout=subprocess.PIPE, text=True, env={**os.environ, "PYTHONUNBUFFERED": "1"},
        )
        for r in range(args.ranks)
    ]
    try:
        results = [json.loads(p.communicate(timeout=600)[0].strip().splitlines()[-1]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait(timeout=10)
        host.close()
    for kind in ("wire", "wire-1key", "tcp"):
        per_init = list(zip(*(r[kind] for r in results)))
        slowest = statistics.median(max(x) for x in per_init) * 1e3
        fastest = statistics.median(min(x) for x in per_init) * 1e3
        print(f"{kind:5s} {args.ranks}-rank gloo init, median of {args.inits}: slowest rank {slowest:.1f} ms, "
              f"fastest rank {fastest:.1f} ms")


if __name__ == "__main__":
    main()
