"""Cost of the wire layer's per-frame tag (Poly1305 since protocol 4), and of frame encryption, on bulk transfers (issue 15).

Moves ``--total`` MiB as ``--blob`` MiB blob frames over one loopback
connection (``send_blob`` -> ``recv_blob_into``, the replication pull's path)
three ways: without a tag (the same ``Connection`` with no session), with the
session's tag (the default), and encrypted and tagged (``CHAOS_ENCRYPT=1``:
ChaCha20 then the tag), sender and receiver in two
processes, alternating, best of ``--repeat``; prints MB/s of each and the
ratios.  Usage::

    python benchmarks/wire_mac.py [--total 256] [--blob 16] [--repeat 3]
"""

from __future__ import annotations

import argparse
import asyncio
import multiprocessing
import time

from chaos_lightning.wire.auth import client_handshake, load_secret, server_handshake
from chaos_lightning.wire.connection import _STREAM_LIMIT, Connection

SECRET = b"wire-mac-benchmark-secret"
MODES = ("untagged", "tagged", "encrypted")


def secret_for(mode: str) -> bytes:
    return load_secret(SECRET, encrypt=mode == "encrypted")


def receiver(port_q, total: int, blob: int, mode: str) -> None:
    """The receiving side, in its own process (as a joiner is)."""

    async def serve() -> None:
        done = asyncio.get_running_loop().create_future()

        async def on_connect(reader, writer) -> None:
            session = await server_handshake(reader, writer, secret_for(mode), 5.0)
            conn = Connection(reader, writer, "client", session=session if mode != "untagged" else None)
            buf = bytearray(blob)
            got = 0
            while got < total:
                got += await conn.recv_blob_into(buf, blob)
            await conn.send_blob(b"k")
            await conn.aclose()
            done.set_result(None)

        server = await asyncio.start_server(on_connect, "127.0.0.1", 0, limit=_STREAM_LIMIT)
        port_q.put(server.sockets[0].getsockname()[1])
        async with server:
            await asyncio.wait_for(done, 120)

    asyncio.run(serve())


async def one_run(total: int, blob: int, mode: str) -> float:
    ctx = multiprocessing.get_context("spawn")
    q = ctx.Queue()
    proc = ctx.Process(target=receiver, args=(q, total, blob, mode), daemon=True)
    proc.start()
    try:
        port = await asyncio.get_running_loop().run_in_executor(None, q.get, True, 30)
        reader, writer = await asyncio.open_connection("127.0.0.1", port, limit=_STREAM_LIMIT)
        session = await client_handshake(reader, writer, secret_for(mode), 5.0)
        conn = Connection(reader, writer, "server", session=session if mode != "untagged" else None)
        payload = memoryview(bytes(blob))
        t0 = time.perf_counter()
        for _ in range(total // blob):
            await conn.send_blob(payload)
        await asyncio.wait_for(conn.recv(), 60)
        took = time.perf_counter() - t0
        await conn.aclose()
    finally:
        proc.join(10)
        if proc.is_alive():
            proc.kill()
    return total / took / 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--total", type=int, default=256, help="MiB per run")
    p.add_argument("--blob", type=int, default=16, help="MiB per blob frame")
    p.add_argument("--repeat", type=int, default=3)
    a = p.parse_args()
    total, blob = a.total * 2**20, a.blob * 2**20
    best = dict.fromkeys(MODES, 0.0)
    for _ in range(a.repeat):
        for mode in MODES:
            best[mode] = max(best[mode], asyncio.run(one_run(total, blob, mode)))
    u, t, e = (best[m] for m in MODES)
    print(f"{a.total} MiB as {a.blob} MiB blobs, best of {a.repeat}: untagged {u:.0f} MB/s, "
          f"tagged {t:.0f} MB/s ({t / u:.2f}x), encrypted {e:.0f} MB/s ({e / u:.2f}x; {e / t:.2f}x of tagged)")

if __name__ == "__main__":
    main()
