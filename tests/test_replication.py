"""Snapshot, shards and the parallel pull, on loopback (fast; the shaped-link runs are in
``test_replication_testbed.py``).

Covers: layout and checksums, a real model + Adam state pulled bit-identically,
a corrupted shard re-fetched, a source killed (SIGKILL) or closed mid-transfer,
a silent source (a stalled link), a slow source whose shards are stolen, two
joiners at once, a joiner killed mid-transfer, wrong secret and malformed
requests refused while the server keeps serving.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch

from chaos_lightning.replication.__main__ import digest, synthetic_state
from chaos_lightning.replication.snapshot import (
    Assembler,
    BadManifest,
    ChecksumMismatch,
    Manifest,
    Snapshot,
    UnknownShard,
    WrongShardSize,
    default_shard_bytes,
    shard_checksums,
)
from chaos_lightning.replication.transfer import (
    GetShard,
    PullError,
    ReplError,
    ShardReply,
    ShardServer,
    pull,
)
from chaos_lightning.strategy.state import pack_tree, unpack_tree
from chaos_lightning.wire import open_connection, start_server

REPO = Path(__file__).resolve().parents[1]
SECRET = b"replication-test-secret"
KiB = 1024
MiB = 1 << 20


def _bits(t: torch.Tensor) -> bytes:
    return t.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b""


def _same(a: list[torch.Tensor], b: list[torch.Tensor]) -> bool:
    return len(a) == len(b) and all(
        x.dtype == y.dtype and x.shape == y.shape and _bits(x) == _bits(y) for x, y in zip(a, b)
    )


@pytest.fixture
def servers():
    """Factory of started in-process servers (closed at the end of the test)."""
    made: list[ShardServer] = []

    def make(snapshot: Snapshot | None, n: int = 1) -> list[ShardServer]:
        out = []
        for _ in range(n):
            s = ShardServer(send_timeout=5.0)
            s.start(secret=SECRET)
            if snapshot is not None:
                s.publish(snapshot)
            made.append(s)
            out.append(s)
        return out

    yield make
    for s in made:
        s.close()


def _addrs(servers: list[ShardServer]) -> list[tuple[str, int]]:
    return [s.addr for s in servers if s.addr is not None]


# -- snapshot and assembler ---------------------------------------------------------------


def _mixed_tensors() -> list[torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    return [
        torch.randn(300_000, generator=g),  # split across shards
        torch.randn(7, 5, generator=g).t(),  # not contiguous: made contiguous once
        torch.tensor(3, dtype=torch.int64),  # 0-dim
        torch.zeros(0),  # empty
        torch.randn(9, generator=g).to(torch.bfloat16),
        torch.tensor([True, False, True]),
        torch.randn(4, generator=g, dtype=torch.complex64),
        torch.randn(50_000, generator=g, dtype=torch.float64),
    ]


def test_layout_splits_large_tensors_packs_small_ones_and_covers_every_byte():
    ts = _mixed_tensors()
    snap = Snapshot(b"meta", ts, shard_bytes=64 * KiB)
    m = snap.manifest
    m.validate()
    total = sum(t.numel() * t.element_size() for t in ts)
    assert m.total_bytes == total and sum(m.shard_sizes) == total
    assert all(s.size == 64 * KiB for s in m.shards[:-1])
    assert len(m.pieces(0)) == 1  # inside the big tensor
    packed = [k for k in range(len(m.shards)) if len(m.pieces(k)) > 2]
    assert packed, "small tensors share a shard"
    covered = {}
    for k in range(len(m.shards)):
        for i, a, n in m.pieces(k):
            covered[i] = covered.get(i, 0) + n
            assert 0 <= a and a + n <= m.tensors[i].nbytes
    assert covered == {t.index: t.nbytes for t in m.tensors if t.nbytes}
    # Views over the tensors' own memory: no copy for a shard inside one tensor.
    view = snap.shard_views(0)[0]
    assert view.obj is not None and snap.tensors[0].untyped_storage().data_ptr() == snap.tensors[0].data_ptr()
    # The manifest is a wire message; the same state gives the same id anywhere.
    assert Manifest.from_bytes(m.to_bytes()) == m
    assert Snapshot(b"meta", [t.clone() for t in ts], shard_bytes=64 * KiB).snapshot_id == snap.snapshot_id
    assert Snapshot(b"other", ts, shard_bytes=64 * KiB).snapshot_id != snap.snapshot_id


def test_default_shard_size_is_between_1_and_4_mib_aiming_at_64_shards():
    assert default_shard_bytes(10 * MiB) == 1 * MiB
    assert default_shard_bytes(200 * MiB) == -(-200 * MiB // 64)
    assert default_shard_bytes(10 * 1024 * MiB) == 4 * MiB


def test_assembler_accepts_shards_in_any_order_and_refuses_bad_ones():
    ts = _mixed_tensors()
    snap = Snapshot(b"meta", ts, shard_bytes=64 * KiB)
    asm = Assembler(snap.manifest)
    n = len(snap.manifest.shards)
    with pytest.raises(UnknownShard, match=f"no shard {n}"):
        asm.accept(n, b"x")
    with pytest.raises(WrongShardSize, match="got 3 bytes"):
        asm.accept(0, b"abc")
    bad = bytearray(snap.shard_payload(1))
    bad[10] ^= 1
    with pytest.raises(ChecksumMismatch, match="shard 1: CRC-32"):
        asm.accept(1, bad)
    for k in reversed(range(n)):
        assert asm.accept(k, snap.shard_payload(k)) is True
    assert asm.accept(0, snap.shard_payload(0)) is False  # a duplicate is harmless
    meta, got = asm.result()
    assert meta == b"meta" and _same(got, [t.contiguous() for t in ts])


def test_assembler_writes_shards_from_writable_and_read_only_buffers_alike():
    """Shards spanning large and small tensors of three dtypes, from a
    bytearray (the pull's receive buffer) or from bytes: the same tensors."""
    ts = [torch.randn(300_000), torch.arange(7, dtype=torch.int64), torch.randn(50, 3).to(torch.bfloat16)]
    snap = Snapshot(b"m", ts, shard_bytes=512 * KiB)
    asm = Assembler(snap.manifest)
    for k in range(len(snap.manifest.shards)):
        payload = bytes(snap.shard_payload(k))
        assert asm.accept(k, bytearray(payload) if k % 2 == 0 else payload) is True
    _, got = asm.result()
    assert _same(got, [t.contiguous() for t in ts])


def test_holders_checksumming_a_share_each_make_the_same_manifest_as_one_holder_alone():
    """Three holders each checksum every third shard; the sum of their lists
    (one all-reduce in the strategy) builds the manifest a single holder
    computing every checksum builds, snapshot id included."""
    ts = _mixed_tensors()
    whole = Snapshot(b"meta", ts, shard_bytes=64 * KiB)
    shares = [shard_checksums([t.contiguous() for t in ts], part, 3, shard_bytes=64 * KiB) for part in range(3)]
    assert all(len(share) == len(whole.manifest.shards) for share in shares)
    summed = [sum(column) for column in zip(*shares)]
    split = Snapshot(b"meta", ts, shard_bytes=64 * KiB, crcs=summed)
    assert split.manifest == whole.manifest
    with pytest.raises(ValueError, match="checksums for"):
        Snapshot(b"meta", ts, shard_bytes=64 * KiB, crcs=summed[:-1])


def test_a_large_share_of_checksums_computed_on_threads_is_the_same(monkeypatch):
    """From ``PARALLEL_CHECKSUM_BYTES`` on, a holder's share is checksummed on
    several threads (zlib releases the GIL); the list is the one a single
    thread makes, alone and split in shares.  Forced to two threads, so the
    threaded path runs whatever this machine's cores."""
    from chaos_lightning.replication import snapshot

    monkeypatch.setattr(snapshot, "_checksum_threads", lambda: 2)
    g = torch.Generator().manual_seed(3)
    ts = [torch.randn(3_000_000, generator=g), torch.randn(1000, 7, generator=g), torch.arange(5)]  # 12 MB
    monkeypatch.setattr(snapshot, "PARALLEL_CHECKSUM_BYTES", 4 * 2**20)
    whole = Snapshot(b"meta", ts, shard_bytes=256 * KiB)
    alone = shard_checksums(ts, 0, 1, shard_bytes=256 * KiB)
    shares = [shard_checksums(ts, part, 2, shard_bytes=256 * KiB) for part in range(2)]
    assert alone == [s.crc32 for s in whole.manifest.shards] == [sum(c) for c in zip(*shares)]


def test_manifest_validation_refuses_inconsistent_or_oversized_layouts():
    m = Snapshot(b"", _mixed_tensors(), shard_bytes=64 * KiB).manifest
    with pytest.raises(BadManifest, match="exceeds the limit"):
        Assembler(m, max_bytes=1000)
    t0 = m.tensors[0]
    lying = Manifest(m.snapshot_id, m.meta, (type(t0)(0, "float32", (10**12,), t0.nbytes, 0), *m.tensors[1:]),
                     m.shards, m.total_bytes)
    with pytest.raises(BadManifest, match="tensor 0"):
        lying.validate()
    evil = Manifest(m.snapshot_id, m.meta, (type(t0)(0, "object", t0.shape, t0.nbytes, 0), *m.tensors[1:]),
                    m.shards, m.total_bytes)
    with pytest.raises(BadManifest, match="unknown dtype"):
        evil.validate()


# -- pulls -------------------------------------------------------------------------------


def _model_and_adam_state() -> tuple[dict, bytes, list[torch.Tensor]]:
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(512, 1024), torch.nn.ReLU(), torch.nn.Linear(1024, 512))
    opt = torch.optim.Adam(model.parameters(), lr=1e-3)
    for _ in range(2):
        opt.zero_grad()
        model(torch.randn(8, 512)).square().mean().backward()
        opt.step()
    state = {"model": model.state_dict(), "optimizer": opt.state_dict(), "step": 2, "rng": torch.get_rng_state()}
    meta, tensors = pack_tree(state)
    return state, meta, tensors


def test_round_trip_of_a_model_and_adam_state_from_three_sources_is_bit_identical(servers):
    state, meta, tensors = _model_and_adam_state()
    snap = Snapshot(meta, tensors, shard_bytes=128 * KiB)
    srv = servers(snap, 3)
    r = pull(_addrs(srv), SECRET, timeout=30)
    assert _same(r.tensors, tensors)
    back = unpack_tree(r.meta, r.tensors)
    assert back["step"] == 2
    for k, v in state["model"].items():
        assert torch.equal(back["model"][k], v)
    for p, st in state["optimizer"]["state"].items():
        for name, v in st.items():
            assert torch.equal(back["optimizer"]["state"][p][name], v)
    assert all(s.bytes > 0 for s in r.sources), "every source sent a share"
    assert sum(s.bytes for s in r.sources) == snap.manifest.total_bytes
    assert r.refetched_corrupt == r.refetched_lost == 0


def test_progress_reports_every_accepted_shard_up_to_the_total(servers):
    """``on_progress`` (the joiner's progress bar) sees bytes rise shard by
    shard to the manifest's total, also when a corrupted shard is re-fetched
    (counted once, when it is accepted)."""
    meta, tensors = synthetic_state(4, seed=5)
    snap = Snapshot(meta, tensors, shard_bytes=128 * KiB)
    a, b = servers(snap, 2)
    a.corrupt_next(2)
    seen: list[tuple[int, int]] = []
    r = pull(_addrs([a, b]), SECRET, timeout=30, on_progress=lambda got, total: seen.append((got, total)))
    total = snap.manifest.total_bytes
    assert len(seen) == len(snap.manifest.shards)
    assert all(t == total for _, t in seen)
    assert [g for g, _ in seen] == sorted(g for g, _ in seen) and seen[-1][0] == total
    assert r.refetched_corrupt == 2 and _same(r.tensors, snap.tensors)


def test_a_corrupted_shard_is_refetched(servers):
    meta, tensors = synthetic_state(8, seed=3)
    snap = Snapshot(meta, tensors, shard_bytes=256 * KiB)
    a, b = servers(snap, 2)
    a.corrupt_next(3)
    r = pull(_addrs([a, b]), SECRET, timeout=30)
    assert r.refetched_corrupt == 3
    assert r.sources[0].corrupt == 3 and r.sources[0].error is None
    assert _same(r.tensors, snap.tensors)


def test_a_source_sending_only_garbage_is_dropped_and_the_rest_complete(servers):
    meta, tensors = synthetic_state(4, seed=4)
    snap = Snapshot(meta, tensors, shard_bytes=128 * KiB)
    a, b = servers(snap, 2)
    a.corrupt_next(10**6)
    r = pull(_addrs([a, b]), SECRET, timeout=30, max_corrupt=2)
    assert "corrupt shards" in (r.sources[0].error or "")
    assert _same(r.tensors, snap.tensors)


def _serve_subprocess(state_mb: float, seed: int, throttle_mbit: float | None = None) -> tuple[subprocess.Popen, dict]:
    argv = [sys.executable, "-m", "chaos_lightning.replication", "serve", "--state-mb", str(state_mb), "--seed", str(seed)]
    if throttle_mbit:
        argv += ["--throttle-mbit", str(throttle_mbit)]
    p = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, text=True,
                         env={**os.environ, "CHAOS_SECRET": SECRET.decode()})
    assert p.stdout is not None
    line = p.stdout.readline()
    if not line:
        p.kill()
        p.wait()
        raise AssertionError("server subprocess did not start")
    return p, json.loads(line)


def test_a_source_killed_mid_transfer_has_its_shards_fetched_elsewhere(servers):
    meta, tensors = synthetic_state(16, seed=5)
    snap = Snapshot(meta, tensors)
    (local,) = servers(snap)
    local.slow_down(16e6)  # ~1 s for the whole state: the kill lands mid-transfer
    proc, ready = _serve_subprocess(16, 5, throttle_mbit=128)
    try:
        assert ready["snapshot_id"] == snap.snapshot_id  # same state, same id, no coordination
        killer = threading.Timer(0.3, lambda: os.kill(proc.pid, signal.SIGKILL))
        r = pull([ready["addr"], local.addr], SECRET, timeout=30, on_manifest=lambda m: killer.start())
    finally:
        proc.kill()
        proc.wait()
    assert r.sources[0].error is not None and r.refetched_lost > 0, r.sources
    assert _same(r.tensors, snap.tensors)


def test_a_source_closed_mid_transfer_and_a_retracted_snapshot_do_not_stop_the_pull(servers):
    meta, tensors = synthetic_state(8, seed=6)
    snap = Snapshot(meta, tensors, shard_bytes=256 * KiB)
    a, b, c = servers(snap, 3)
    for s in (a, b, c):
        s.slow_down(12e6)

    def trouble(_m: Manifest) -> None:
        threading.Timer(0.2, a.close).start()
        threading.Timer(0.2, b.retract).start()

    r = pull(_addrs([a, b, c]), SECRET, timeout=30, on_manifest=trouble)
    assert r.sources[0].error and r.sources[1].error and "not published" in r.sources[1].error
    assert r.sources[2].error is None
    assert _same(r.tensors, snap.tensors)


def test_a_silent_source_is_dropped_after_the_stall_timeout(servers):
    """A source that authenticates, then never answers: what a cut link looks like."""
    meta, tensors = synthetic_state(4, seed=7)
    snap = Snapshot(meta, tensors, shard_bytes=256 * KiB)
    (good,) = servers(snap)
    stop = threading.Event()
    bound: list[tuple[str, int]] = []

    def silent_source() -> None:
        async def handler(conn) -> None:
            first = await conn.recv()  # answer the manifest request, then go silent
            assert first is not None
            await conn.send(snap.manifest)
            while not stop.is_set():
                await asyncio.sleep(0.05)

        async def main() -> None:
            srv = await start_server("127.0.0.1", 0, handler, secret=SECRET)
            bound.append(srv.sockets[0].getsockname()[:2])
            while not stop.is_set():
                await asyncio.sleep(0.05)
            srv.close()

        asyncio.run(main())

    t = threading.Thread(target=silent_source, daemon=True)
    t.start()
    try:
        deadline = time.monotonic() + 5
        while not bound and time.monotonic() < deadline:
            time.sleep(0.01)
        t0 = time.monotonic()
        r = pull([bound[0], good.addr], SECRET, timeout=30, stall_timeout=1.0)
        took = time.monotonic() - t0
    finally:
        stop.set()
        t.join(5)
    assert "stalled" in (r.sources[0].error or "")
    assert took < 5
    assert _same(r.tensors, snap.tensors)


def test_shards_of_a_slow_source_are_stolen_by_faster_ones(servers):
    meta, tensors = synthetic_state(16, seed=8)
    snap = Snapshot(meta, tensors, shard_bytes=512 * KiB)
    slow, f1, f2 = servers(snap, 3)
    slow.slow_down(4e6)  # 4 MB/s; the others are unthrottled, and the joiner was not told
    r = pull(_addrs([slow, f1, f2]), SECRET, timeout=30)
    print(f"\nslow source: planned {r.sources[0].planned_bytes} B, sent {r.sources[0].bytes} B; "
          f"stolen {r.stolen}, duplicates {r.duplicates}, {r.seconds:.2f}s")
    assert r.stolen > 0
    assert r.sources[0].bytes < r.sources[0].planned_bytes / 2
    # Without stealing the slow source alone would need planned_bytes / 4 MB/s.
    assert r.seconds < 0.5 * r.sources[0].planned_bytes / 4e6
    assert _same(r.tensors, snap.tensors)


def test_two_joiners_pull_from_the_same_servers_at_once(servers):
    meta, tensors = synthetic_state(8, seed=9)
    snap = Snapshot(meta, tensors, shard_bytes=256 * KiB)
    srv = servers(snap, 2)
    results: list = [None, None]

    def joiner(i: int) -> None:
        results[i] = pull(_addrs(srv), SECRET, timeout=30)

    threads = [threading.Thread(target=joiner, args=(i,)) for i in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert all(r is not None and _same(r.tensors, snap.tensors) for r in results)
    assert sum(s.stats.shards for s in srv) >= 2 * len(snap.manifest.shards)


def test_a_joiner_killed_mid_transfer_leaves_the_server_serving(servers):
    meta, tensors = synthetic_state(8, seed=0)
    snap = Snapshot(meta, tensors)
    (srv,) = servers(snap)
    srv.slow_down(8e6)
    host, port = srv.addr
    joiner = subprocess.Popen(
        [sys.executable, "-m", "chaos_lightning.replication", "pull", "--source", f"{host}:{port}"],
        cwd=REPO, stdout=subprocess.PIPE, text=True, env={**os.environ, "CHAOS_SECRET": SECRET.decode()},
    )
    try:
        assert joiner.stdout is not None
        assert json.loads(joiner.stdout.readline())["event"] == "manifest"
        time.sleep(0.3)
        joiner.kill()
    finally:
        joiner.kill()
        joiner.wait()
    srv.slow_down(None)
    r = pull([srv.addr], SECRET, timeout=30)
    assert _same(r.tensors, snap.tensors)
    assert digest(r.meta, r.tensors) == digest(meta, tensors)


def test_wrong_secret_is_refused_and_the_server_keeps_serving(servers):
    snap = Snapshot(*synthetic_state(2, seed=10))
    (srv,) = servers(snap)
    with pytest.raises(PullError, match="wrong cluster secret"):
        pull([srv.addr], b"not the secret", timeout=10)
    assert _same(pull([srv.addr], SECRET, timeout=10).tensors, snap.tensors)


def test_no_reachable_source_fails_fast_with_every_reason():
    with pytest.raises(PullError, match="cannot connect"):
        pull([("127.0.0.1", 1)], SECRET, timeout=10, connect_timeout=1)


def test_malformed_and_unknown_requests_get_clear_errors_and_never_crash_the_server(servers):
    snap = Snapshot(*synthetic_state(2, seed=11))
    (srv,) = servers(snap)
    host, port = srv.addr

    async def probe() -> list[object]:
        got = []
        conn = await open_connection(host, port, secret=SECRET, timeout=5)
        await conn.send(GetShard(snap.snapshot_id, 10**6))
        got.append(await conn.recv())
        await conn.send(GetShard("someone-elses-snapshot", 0))
        got.append(await conn.recv())
        await conn.send(GetShard(snap.snapshot_id, 0))
        got.append(await conn.recv())
        got.append(len(await conn.recv()))
        await conn.send_blob(b"junk")  # not a request: refused, connection closed
        got.append(await conn.recv())
        await conn.aclose()
        # A stranger's raw bytes: refused at the handshake.
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(b"GET / HTTP/1.0\r\n\r\n" * 10)
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        return got

    unknown, stale, reply, blob_len, junk = asyncio.run(probe())
    assert isinstance(unknown, ReplError) and "no shard 1000000" in unknown.reason
    assert isinstance(stale, ReplError) and "not published" in stale.reason
    assert isinstance(reply, ShardReply) and blob_len == reply.size == snap.manifest.shards[0].size
    assert isinstance(junk, ReplError) and "unexpected request: a blob" in junk.reason
    assert srv.stats.errors == 3
    assert _same(pull([srv.addr], SECRET, timeout=10).tensors, snap.tensors)


def test_populating_a_pulls_pages_changes_no_byte_while_another_thread_writes():
    """The assembler maps its tensors' pages on a thread while shards are
    written into them (``snapshot.populate``, MADV_POPULATE_WRITE): it must
    change no byte, before or during those writes.  On Linux from 5.14 it
    runs (True); elsewhere it says so (False) and the faults stay where they
    were."""
    from chaos_lightning.replication.snapshot import populate

    g = torch.Generator().manual_seed(5)
    before = torch.randint(0, 255, (24 << 20,), dtype=torch.uint8, generator=g)
    fresh = torch.empty_like(before)
    writer = threading.Thread(target=lambda: fresh.copy_(before))
    writer.start()
    done = populate([fresh, torch.empty(0), torch.empty(3, dtype=torch.float64)])
    writer.join(30)
    assert torch.equal(fresh, before)
    kept = before.clone()
    assert populate([before]) is done and torch.equal(before, kept)
    if sys.platform.startswith("linux") and tuple(int(x) for x in os.uname().release.split(".")[:2]) >= (5, 14):
        assert done
