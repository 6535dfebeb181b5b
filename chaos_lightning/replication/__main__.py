"""``python -m chaos_lightning.replication``: serve or pull a synthetic state (iperf for state replication).

A measuring tool for real links (the namespace testbed, or real machines),
used by ``tests/test_replication_testbed.py`` and ``benchmarks/scale_out.py``:

    python -m chaos_lightning.replication serve --bind 0.0.0.0:7100 --state-mb 200 --seed 0
    python -m chaos_lightning.replication pull --source 10.0.0.1:7100 --source 10.0.0.2:7100

Every member built with the same ``--state-mb`` and ``--seed`` holds the same
bytes (the stand-in for replicas that are bit-identical after a step), so a
joiner can pull from several and compare its SHA-256 ``digest`` with theirs.
Both commands print JSON lines on stdout (``ready``/``manifest``/``done``/
``error``); the secret comes from ``$CHAOS_SECRET`` (loopback only without).
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import signal
import sys
import threading
from collections.abc import Sequence

import msgpack
import torch

from chaos_lightning.replication.snapshot import Manifest, Snapshot
from chaos_lightning.replication.transfer import PullError, ShardServer, pull
from chaos_lightning.config import secret_from_env
from chaos_lightning.wire.addr import format_hostport

MB = 1_000_000


def synthetic_state(state_mb: float, seed: int) -> tuple[bytes, list[torch.Tensor]]:
    """A deterministic ``(meta, tensors)`` of about ``state_mb`` MB, shaped like a model plus Adam.

    Four large float32 tensors hold ~97% of the bytes (weights and their two
    moments, split across shards); 200 small ones of mixed dtypes (biases,
    norms, step counters) get packed together into shared shards.
    """
    g = torch.Generator().manual_seed(seed)
    total = int(state_mb * MB)
    small = [
        torch.randn(int(torch.randint(64, 1024, (1,), generator=g)), generator=g)
        if i % 4
        else torch.randint(0, 1 << 30, (int(torch.randint(1, 64, (1,), generator=g)),), generator=g)
        for i in range(200)
    ]
    left = max(0, total - sum(t.numel() * t.element_size() for t in small))
    big = [torch.randn(left // 16, generator=g) for _ in range(4)]
    meta = msgpack.packb({"seed": seed, "total_bytes": total, "step": 1234})
    return meta, big + small


def digest(meta: bytes, tensors: Sequence[torch.Tensor]) -> str:
    """SHA-256 over the metadata and every tensor's bytes, in order."""
    h = hashlib.sha256(meta)
    for t in tensors:
        if t.numel():
            h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy())
    return h.hexdigest()


def _emit(**record: object) -> None:
    print(json.dumps(record), flush=True)


def _serve(args: argparse.Namespace) -> int:
    meta, tensors = synthetic_state(args.state_mb, args.seed)
    snap = Snapshot(meta, tensors)
    server = ShardServer()
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    host, port = server.start(args.bind, secret=secret_from_env())
    if args.throttle_mbit:
        server.slow_down(args.throttle_mbit * MB / 8)
    if args.corrupt:
        server.corrupt_next(args.corrupt)
    server.publish(snap)
    _emit(
        event="ready",
        addr=format_hostport(host, port),
        snapshot_id=snap.snapshot_id,
        digest=digest(meta, tensors),
        total_bytes=snap.manifest.total_bytes,
        shards=len(snap.manifest.shards),
    )
    try:
        stop.wait()
    finally:
        server.close()
    return 0


def _pull(args: argparse.Namespace) -> int:
    rates = [r * MB / 8 for r in args.rate_mbit] if args.rate_mbit else None
    # the imports' objects out of the full collections: one landed inside a
    # timed pull (75 ms of a 1.8 s shaped pull, 2026-12-08), as the strategy
    # keeps them off a joiner's (strategy/process.py, freeze_heap)
    gc.freeze()

    def on_manifest(m: Manifest) -> None:
        _emit(event="manifest", snapshot_id=m.snapshot_id, total_bytes=m.total_bytes, shards=len(m.shards))

    try:
        r = pull(
            args.source,
            secret_from_env(),
            rates=rates,
            timeout=args.timeout,
            stall_timeout=args.stall_timeout,
            on_manifest=on_manifest,
        )
    except PullError as exc:
        _emit(event="error", reason=str(exc))
        return 1
    _emit(
        event="done",
        seconds=r.seconds,
        manifest_seconds=r.manifest_seconds,
        total_bytes=r.total_bytes,
        snapshot_id=r.manifest.snapshot_id,
        digest=digest(r.meta, r.tensors),
        refetched_corrupt=r.refetched_corrupt,
        refetched_lost=r.refetched_lost,
        stolen=r.stolen,
        duplicates=r.duplicates,
        plan_makespan=r.plan.makespan,
        sources=[
            {
                "addr": s.addr,
                "planned_bytes": s.planned_bytes,
                "bytes": s.bytes,
                "seconds": s.seconds,
                "finished_at": s.finished_at,
                "stolen": s.stolen,
                "error": s.error,
            }
            for s in r.sources
        ],
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m chaos_lightning.replication", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    s = sub.add_parser("serve", help="serve a synthetic state until SIGTERM")
    s.add_argument("--bind", default="127.0.0.1:0")
    s.add_argument("--state-mb", type=float, default=50.0)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--throttle-mbit", type=float, help="fault injector: send at most this rate per joiner")
    s.add_argument("--corrupt", type=int, default=0, help="fault injector: corrupt the next N shards sent")
    p = sub.add_parser("pull", help="pull the state from the given sources, print the result")
    p.add_argument("--source", action="append", required=True, help="host:port (repeat for several)")
    p.add_argument("--rate-mbit", type=float, action="append", help="each source's rate, in --source order")
    p.add_argument("--timeout", type=float, default=300.0)
    p.add_argument("--stall-timeout", type=float, default=10.0)
    args = ap.parse_args(argv)
    return _serve(args) if args.cmd == "serve" else _pull(args)


if __name__ == "__main__":
    sys.exit(main())
