"""The parallel multi-source pull: sources serve shards, a joiner fetches from all at once.

Role: this is the data path of the paper's multi-neighbor replication.  Each
member that holds the state runs a :class:`ShardServer` and publishes a
:class:`~chaos_lightning.replication.snapshot.Snapshot` at a step boundary;
a joiner calls :func:`pull` with the members' addresses, gets the manifest from
one of them, plans who sends which shard with the bandwidth-aware scheduler
(:func:`~chaos_lightning.replication.scheduler.plan`), and fetches from all of
them concurrently.

Protocol (wire frames after the wire layer's HMAC handshake, each frame
tagged with the session's HMAC -- a shard blob gets one tag over the whole
frame, checked before the shard's CRC -- one TCP connection per joiner and
source)::

    joiner -> source   GetManifest()                      -> Manifest | ReplError
    joiner -> source   GetShard(snapshot_id, index)       -> ShardReply + blob | ReplError

Requests are pipelined (:data:`PIPELINE_DEPTH` outstanding per source), so a
source's link never idles for a round trip between shards; replies come in
request order.  A blob is the shard's bytes straight from the tensors' memory
(``send_blob`` of a memoryview; only a shard spanning several small tensors is
joined first).

What the joiner does while it runs
----------------------------------
* **Plan**: shard sizes and each source's rate (the caller's, e.g. the
  monitor's measured bandwidth; equal if unknown) go to the scheduler; each
  source gets a queue of its shards.
* **Work stealing**: a source whose queue is empty takes the *last* queued
  shard of the source predicted to finish last, when it would deliver that
  shard sooner.  Predictions use each source's measured rate (bytes per
  second of busy time, from its delivered shards) as soon as it has one.  So a
  source slower than planned, or rates that were simply unknown, cost at most
  about one shard's time of imbalance.
* **Endgame**: when nothing is queued anywhere, an idle source also requests
  a shard still in flight at a much slower source (at most one duplicate per
  shard; whichever copy arrives first is kept): the pull is not held hostage
  by one slow last shard.
* **Failures**: a connection error, a refusal (``ReplError``), or no byte
  for ``stall_timeout`` seconds while a request is outstanding (a cut link is
  silent: TCP would wait minutes) fails that source; its queued and in-flight
  shards go to an orphan pool the other sources drain first.  A CRC mismatch
  re-fetches the shard (from whichever source is free); a source that sends
  more than ``max_corrupt`` corrupt shards is dropped.  The pull completes as
  long as one source stays alive, and fails with :class:`PullError` (naming
  every source's reason) otherwise, or after ``timeout``.

The server never depends on a joiner: each connection is its own asyncio task,
a joiner that vanishes ends only its own task (its writes fail or time out
after ``send_timeout``), and bad input (wrong secret, malformed or unknown
request, unknown shard, stale snapshot id) gets a ``ReplError`` or the wire
layer's refusal plus one log line, never an exception in the server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from chaos_lightning.replication.scheduler import ShardPlan, Source, plan
from chaos_lightning.replication.snapshot import Assembler, ChecksumMismatch, Manifest, Snapshot, UnknownShard
from chaos_lightning.wire import (
    KIND_MESSAGE,
    SchemaError,
    WireError,
    dial,
    parse_hostport,
    schema,
    start_server,
)
from chaos_lightning.wire.connection import Connection, format_addr, quiet_accept_errors

__all__ = [
    "GetManifest",
    "GetShard",
    "PIPELINE_DEPTH",
    "PullError",
    "PullResult",
    "ReplError",
    "ServerStats",
    "ShardReply",
    "ShardServer",
    "SourceReport",
    "pull",
    "pull_async",
]

_log = logging.getLogger("chaos_lightning.replication")

PIPELINE_DEPTH = 2
"""Requests outstanding per source.  Two keep the link busy across the
request round trip (the next shard is already asked for while one streams);
more would commit shards to a source before its speed is known and leave
less to steal."""

_DUP_MARGIN = 0.5
"""Endgame: duplicate an in-flight shard only if this source would deliver it in
at most half the time the slow source is predicted to need."""


# --------------------------------------------------------------------------- #
# Messages
# --------------------------------------------------------------------------- #


@schema.message("repl.get_manifest")
@dataclass(frozen=True)
class GetManifest:
    """Joiner -> source: send the manifest of the published snapshot."""


@schema.message("repl.get_shard")
@dataclass(frozen=True)
class GetShard:
    """Joiner -> source: send shard ``index`` of snapshot ``snapshot_id``."""

    snapshot_id: str
    index: int


@schema.message("repl.shard_reply")
@dataclass(frozen=True)
class ShardReply:
    """Source -> joiner: shard ``index`` follows as one blob of ``size`` bytes."""

    snapshot_id: str
    index: int
    size: int


@schema.message("repl.error")
@dataclass(frozen=True)
class ReplError:
    """Source -> joiner: the request cannot be served, and why."""

    reason: str


class PullError(RuntimeError):
    """The pull could not complete (no source left, or the timeout passed)."""


class _SourceFailed(Exception):
    """Internal: this source is unusable for the rest of the pull."""


def _hostport(addr: str | tuple[str, int], *, allow_port0: bool = False) -> tuple[str, int]:
    """``(host, port)`` from a tuple, or from ``"host:port"``/``"[v6]:port"`` by the wire layer's parser."""
    if isinstance(addr, tuple):
        return str(addr[0]), int(addr[1])
    return parse_hostport(addr, allow_port0=allow_port0)


# --------------------------------------------------------------------------- #
# Source side
# --------------------------------------------------------------------------- #


@dataclass
class ServerStats:
    """What a :class:`ShardServer` has done (read without locking; counters only grow)."""

    connections: int = 0
    manifests: int = 0
    shards: int = 0
    bytes: int = 0
    errors: int = 0
    """Requests answered with a ``ReplError`` or refused as malformed."""


class ShardServer:
    """Serves the published snapshot to authenticated joiners, on its own thread.

    ``start`` runs an asyncio loop in a daemon thread; ``publish`` and
    ``retract`` may be called from any thread at any time (a request is served
    from the snapshot published when it arrives; a joiner asking for a
    retracted snapshot gets a ``ReplError`` and pulls from other sources).

    Fault injectors, for tests (like the agent's block/unblock): see
    :meth:`corrupt_next` and :meth:`slow_down`.
    """

    def __init__(self, *, send_timeout: float = 30.0, handshake_timeout: float = 5.0) -> None:
        self.send_timeout = send_timeout
        self.handshake_timeout = handshake_timeout
        self.stats = ServerStats()
        self._snapshot: Snapshot | None = None
        self._expecting = False  # a snapshot is being prepared: manifest requests wait for it
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.Server | None = None
        self._tasks: set[asyncio.Task] = set()
        self._lock = threading.Lock()
        self._corrupt = 0
        self._rate: float | None = None
        self.addr: tuple[str, int] | None = None

    # -- lifecycle ------------------------------------------------------------
    def start(self, bind: str | tuple[str, int] = ("127.0.0.1", 0), *, secret: bytes | None) -> tuple[str, int]:
        """Listen on ``bind`` (port 0: any free port); return the bound ``(host, port)``.

        Refuses a non-loopback address without a secret (the wire layer's
        ``InsecureBind``).
        """
        if self._loop is not None:
            raise RuntimeError("ShardServer already started")
        host, port = _hostport(bind, allow_port0=True)
        loop = asyncio.new_event_loop()
        quiet_accept_errors(loop, _log)
        thread = threading.Thread(target=loop.run_forever, name=f"shard-server-{host}:{port}", daemon=True)
        thread.start()
        coro = start_server(host, port, self._handle, secret=secret, handshake_timeout=self.handshake_timeout)
        try:
            self._server = asyncio.run_coroutine_threadsafe(coro, loop).result(timeout=10.0)
        except BaseException:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5.0)
            loop.close()
            raise
        self._loop, self._thread = loop, thread
        sockname = self._server.sockets[0].getsockname()
        self.addr = (str(sockname[0]), int(sockname[1]))
        return self.addr

    def publish(self, snapshot: Snapshot) -> None:
        """Serve ``snapshot`` from now on (replacing any earlier one)."""
        self._snapshot = snapshot
        self._expecting = False

    def expect(self) -> None:
        """A snapshot is being prepared (copied on another thread): a joiner
        asking for the manifest meanwhile waits for it (up to the send
        timeout) instead of being refused.  :meth:`publish` or
        :meth:`retract` ends the wait."""
        self._expecting = True

    def retract(self) -> None:
        """Stop serving the current snapshot (its tensors may be modified again)."""
        self._snapshot = None
        self._expecting = False

    @property
    def snapshot(self) -> Snapshot | None:
        return self._snapshot

    def close(self) -> None:
        """Stop listening, end every connection, stop the thread.  Idempotent."""
        loop, thread = self._loop, self._thread
        if loop is None or thread is None:
            return
        self._loop = self._thread = None

        async def shutdown() -> None:
            if self._server is not None:
                self._server.close()
            tasks = list(self._tasks)
            for t in tasks:
                t.cancel()
            if tasks:
                await asyncio.wait(tasks, timeout=3.0)

        try:
            asyncio.run_coroutine_threadsafe(shutdown(), loop).result(timeout=5.0)
        finally:
            loop.call_soon_threadsafe(loop.stop)
            thread.join(timeout=5.0)
            if not thread.is_alive():
                loop.close()

    def __enter__(self) -> ShardServer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- fault injectors (tests) ----------------------------------------------
    def corrupt_next(self, n: int = 1) -> None:
        """Fault injector: flip the first byte of the next ``n`` shards sent (any joiner)."""
        with self._lock:
            self._corrupt += n

    def slow_down(self, bytes_per_s: float | None) -> None:
        """Fault injector: send at most ``bytes_per_s`` on average per connection (None: full speed).

        Each shard is held back for ``size / bytes_per_s`` before it is sent,
        which is what a slower uplink looks like to the joiner's scheduler.
        """
        self._rate = bytes_per_s

    # -- serving --------------------------------------------------------------
    async def _handle(self, conn: Connection) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self.stats.connections += 1
        try:
            while True:
                try:
                    msg = await conn.recv()
                except SchemaError as exc:
                    await self._refuse(conn, f"malformed request: {exc}")
                    raise  # the wire server logs one line and closes
                if isinstance(msg, GetShard):
                    await self._send_shard(conn, msg)
                elif isinstance(msg, GetManifest):
                    snap = self._snapshot
                    waited = 0.0
                    while snap is None and self._expecting and waited < self.send_timeout:
                        await asyncio.sleep(0.005)
                        waited += 0.005
                        snap = self._snapshot
                    if snap is None:
                        await self._refuse(conn, "no snapshot published")
                    else:
                        await self._bounded(conn.send(snap.manifest), "manifest")
                        self.stats.manifests += 1
                else:
                    what = "a blob" if isinstance(msg, bytes) else f"a {schema.tag_of(type(msg))!r} message"
                    await self._refuse(conn, f"unexpected request: {what}")
                    raise SchemaError(f"unexpected request from a joiner: {what}")
        finally:
            self._tasks.discard(task)

    async def _refuse(self, conn: Connection, reason: str) -> None:
        self.stats.errors += 1
        try:
            await self._bounded(conn.send(ReplError(reason[:1000])), "error reply")
        except (OSError, WireError):
            pass  # the peer is gone or broken: nothing more to tell it

    async def _bounded(self, coro: object, what: str) -> None:
        try:
            await asyncio.wait_for(coro, self.send_timeout)  # type: ignore[arg-type]
        except asyncio.TimeoutError:
            raise TimeoutError(f"sending a {what} timed out after {self.send_timeout:g}s (joiner not reading)") from None

    async def _send_shard(self, conn: Connection, req: GetShard) -> None:
        snap = self._snapshot
        if snap is None or req.snapshot_id != snap.snapshot_id:
            serving = snap.snapshot_id if snap is not None else "nothing"
            await self._refuse(conn, f"snapshot {req.snapshot_id} is not published here (serving {serving})")
            return
        try:
            payload = snap.shard_payload(req.index)
        except UnknownShard as exc:
            await self._refuse(conn, str(exc))
            return
        size = memoryview(payload).nbytes
        with self._lock:
            corrupt = self._corrupt > 0 and size > 0
            if corrupt:
                self._corrupt -= 1
        if corrupt:
            damaged = bytearray(payload)
            damaged[0] ^= 0xFF
            payload = damaged
        rate = self._rate
        if rate:
            await asyncio.sleep(size / rate)

        async def send() -> None:
            await conn.send(ShardReply(req.snapshot_id, req.index, size))
            await conn.send_blob(payload)

        await self._bounded(send(), "shard")
        self.stats.shards += 1
        self.stats.bytes += size


# --------------------------------------------------------------------------- #
# Joiner side
# --------------------------------------------------------------------------- #


@dataclass
class SourceReport:
    """One source's part in a pull."""

    addr: str
    planned_bytes: int = 0
    bytes: int = 0
    """Bytes of shards from this source that were accepted (first copy, CRC good)."""
    shards: int = 0
    seconds: float = 0.0
    """Busy time: seconds with at least one request outstanding, up to its last shard."""
    finished_at: float = 0.0
    """Seconds after the pull started when its last accepted shard arrived."""
    corrupt: int = 0
    stolen: int = 0
    """Shards this source took from another source's queue."""
    error: str | None = None
    """Why it was dropped, if it was."""

    @property
    def rate(self) -> float:
        """Measured bytes/s while busy (0 before its first shard)."""
        return self.bytes / self.seconds if self.seconds > 0 else 0.0


@dataclass(repr=False)
class PullResult:
    """A completed pull: the state, and how it got here.

    Its repr is a one-line summary: asyncio formats a finished task's result
    in some paths, and a dataclass repr of 200 MB of tensors took over a second.
    """

    meta: bytes
    tensors: list[torch.Tensor]
    manifest: Manifest
    plan: ShardPlan
    sources: list[SourceReport]
    seconds: float
    """From the call to the last shard accepted."""
    manifest_seconds: float
    """From the call to the manifest (connect, handshake, one round trip)."""
    refetched_corrupt: int = 0
    refetched_lost: int = 0
    """Shards re-queued because their source failed before delivering them."""
    stolen: int = 0
    duplicates: int = 0
    """Endgame requests of a shard already in flight elsewhere."""

    @property
    def total_bytes(self) -> int:
        return self.manifest.total_bytes

    def __repr__(self) -> str:
        return (
            f"<PullResult {self.total_bytes} bytes in {self.seconds:.3f}s from {len(self.sources)} sources, "
            f"corrupt={self.refetched_corrupt} lost={self.refetched_lost} stolen={self.stolen} dup={self.duplicates}>"
        )

    @property
    def bytes_per_source(self) -> dict[str, int]:
        return {s.addr: s.bytes for s in self.sources}

    @property
    def seconds_per_source(self) -> dict[str, float]:
        return {s.addr: s.seconds for s in self.sources}


class _Src:
    """Joiner-side state of one source during a pull."""

    def __init__(self, index: int, addr: str | tuple[str, int]) -> None:
        self.index = index
        self.host, self.port = _hostport(addr)
        self.report = SourceReport(format_addr((self.host, self.port)))
        self.conn: Connection | None = None
        self.alive = False
        self.queue: deque[int] = deque()
        self.inflight: deque[int] = deque()
        self.requested_at: dict[int, float] = {}
        self.planned_rate = 0.0
        self.last_arrival = 0.0
        self.last_progress = 0.0
        self.current_got = 0  # bytes of the head in-flight shard received so far
        self.task: asyncio.Task | None = None
        self.scratch: bytearray = bytearray()

    def abort(self) -> None:
        if self.conn is not None:
            self.conn.abort()


class _Pull:
    """One pull's scheduling state; every method runs on the pull's event loop."""

    def __init__(
        self,
        sources: Sequence[str | tuple[str, int]],
        secret: bytes | None,
        *,
        rates: Sequence[float | None] | None,
        downlink: float,
        connect_timeout: float,
        stall_timeout: float,
        max_bytes: int | None,
        max_corrupt: int,
        depth: int,
        on_manifest: Callable[[Manifest], None] | None,
        on_progress: Callable[[int, int], None] | None = None,
    ) -> None:
        if not sources:
            raise ValueError("pull needs at least one source")
        if rates is not None and len(rates) != len(sources):
            raise ValueError(f"{len(rates)} rates for {len(sources)} sources")
        self.srcs = [_Src(i, a) for i, a in enumerate(sources)]
        self.secret = secret
        self.rates = list(rates) if rates is not None else [None] * len(sources)
        self.downlink = downlink
        self.connect_timeout = connect_timeout
        self.stall_timeout = stall_timeout
        self.max_bytes = max_bytes
        self.max_corrupt = max_corrupt
        self.depth = max(1, depth)
        self.on_manifest = on_manifest
        self.on_progress = on_progress
        self.received = 0  # bytes of accepted shards
        self.t0 = time.monotonic()
        self.orphans: deque[int] = deque()
        self.duplicated: set[int] = set()
        self.asm: Assembler | None = None
        self.sizes: list[int] = []
        self.changed = asyncio.Event()
        self.result_counts = {"corrupt": 0, "lost": 0, "stolen": 0, "dup": 0}

    # -- connections ------------------------------------------------------------
    async def _connect(self, s: _Src) -> None:
        try:
            s.conn = await dial(s.host, s.port, secret=self.secret, timeout=self.connect_timeout)
        except (WireError, OSError) as exc:  # OSError covers TimeoutError; the message names the address
            s.report.error = str(exc)
            return
        s.alive = True

    def _send(self, s: _Src, msg: object) -> None:
        assert s.conn is not None
        s.conn.write_nowait(msg)  # tagged; pipelined, drained by the caller

    async def _read_message(self, s: _Src) -> object:
        assert s.conn is not None
        kind, payload = await s.conn.recv_frame()
        s.last_progress = time.monotonic()
        if kind != KIND_MESSAGE:
            raise _SourceFailed(f"{s.report.addr} sent a blob where a reply was due")
        msg = schema.decode(payload)
        if isinstance(msg, ReplError):
            raise _SourceFailed(f"{s.report.addr} refused: {msg.reason}")
        return msg

    async def _manifest(self) -> Manifest:
        """The manifest from the first live source that gives a valid one."""
        for s in self.srcs:
            if not s.alive:
                continue
            try:
                self._send(s, GetManifest())
                msg = await asyncio.wait_for(self._read_message(s), self.stall_timeout)
                if not isinstance(msg, Manifest):
                    raise _SourceFailed(f"{s.report.addr} answered the manifest request with {type(msg).__name__}")
                msg.validate(self.max_bytes)
                return msg
            except asyncio.TimeoutError:
                self._fail(s, f"no manifest from {s.report.addr} within {self.stall_timeout:g}s")
            except (_SourceFailed, WireError, OSError, ValueError, asyncio.IncompleteReadError) as exc:
                self._fail(s, str(exc) or type(exc).__name__)
        raise PullError(self._why("no source gave a manifest"))

    def _why(self, headline: str) -> str:
        reasons = "; ".join(f"{s.report.addr}: {s.report.error or 'alive'}" for s in self.srcs)
        return f"{headline} ({reasons})"

    # -- failure ------------------------------------------------------------------
    def _fail(self, s: _Src, reason: str) -> None:
        if not s.alive:
            return
        s.alive = False
        s.report.error = reason
        _log.warning("replication source %s dropped: %s", s.report.addr, reason)
        lost = [k for k in (*s.inflight, *s.queue) if self.asm is None or not self.asm.has(k)]
        self.result_counts["lost"] += len(lost)
        self.orphans.extendleft(reversed(lost))
        s.inflight.clear()
        s.queue.clear()
        s.abort()
        if s.task is not None and s.task is not asyncio.current_task():
            s.task.cancel()
        self._notify()

    def _notify(self) -> None:
        self.changed.set()
        self.changed = asyncio.Event()

    # -- scheduling -------------------------------------------------------------
    def _rate(self, s: _Src) -> float:
        """Predicted bytes/s of ``s``: measured once it has delivered, else planned."""
        if s.report.seconds > 0 and s.report.bytes > 0:
            return s.report.bytes / s.report.seconds
        if self.rates[s.index]:
            return s.planned_rate
        measured = [o.report.rate for o in self.srcs if o.report.rate > 0]
        return sum(measured) / len(measured) if measured else s.planned_rate

    def _pending(self, s: _Src) -> float:
        """Bytes ``s`` still has to deliver for its in-flight requests."""
        return sum(self.sizes[k] for k in s.inflight) - s.current_got

    def _wanted(self, k: int) -> bool:
        assert self.asm is not None
        return not self.asm.has(k)

    def _pick(self, s: _Src) -> int | None:
        """The next shard ``s`` should request, or None (module docstring: own queue,
        orphans, stealing, endgame duplicates)."""
        while s.queue:
            k = s.queue.popleft()
            if self._wanted(k):
                return k
        while self.orphans:
            k = self.orphans.popleft()
            if self._wanted(k) and not any(k in o.inflight for o in self.srcs if o.alive):
                return k
        mine = self._rate(s)
        # Stealing: from the tail of the source predicted to finish last.
        best: tuple[float, _Src] | None = None
        for v in self.srcs:
            if v is s or not v.alive or not v.queue:
                continue
            left = (self._pending(v) + sum(self.sizes[k] for k in v.queue)) / self._rate(v)
            if best is None or left > best[0]:
                best = (left, v)
        if best is not None:
            left, v = best
            k = v.queue[-1]
            if (self._pending(s) + self.sizes[k]) / mine < left:
                v.queue.pop()
                s.report.stolen += 1
                self.result_counts["stolen"] += 1
                return k
            return None
        # Endgame: duplicate a shard still in flight at a much slower source.
        if s.inflight:
            return None
        for v in self.srcs:
            if v is s or not v.alive:
                continue
            ahead = -v.current_got
            for k in v.inflight:
                ahead += self.sizes[k]
                if k in self.duplicated or not self._wanted(k):
                    continue
                if self.sizes[k] / mine < _DUP_MARGIN * ahead / self._rate(v):
                    self.duplicated.add(k)
                    self.result_counts["dup"] += 1
                    return k
        return None

    # -- per-source worker --------------------------------------------------------
    async def _worker(self, s: _Src) -> None:
        assert self.asm is not None and s.conn is not None
        try:
            while not self.asm.done and s.alive:
                issued = False
                while len(s.inflight) < self.depth:
                    k = self._pick(s)
                    if k is None:
                        break
                    now = time.monotonic()
                    if not s.inflight:
                        s.last_progress = now
                    s.inflight.append(k)
                    s.requested_at[k] = now
                    self._send(s, GetShard(self.asm.manifest.snapshot_id, k))
                    issued = True
                if issued:
                    await s.conn.drain()
                if not s.inflight:
                    changed = self.changed
                    try:
                        await asyncio.wait_for(changed.wait(), 0.05)
                    except asyncio.TimeoutError:
                        pass
                    continue
                await self._receive_one(s)
        except asyncio.CancelledError:
            raise
        except asyncio.IncompleteReadError as exc:
            self._fail(s, f"{s.report.addr} closed the connection mid-shard ({len(exc.partial)} bytes short)")
        except (_SourceFailed, WireError, OSError) as exc:
            self._fail(s, str(exc) or type(exc).__name__)

    async def _receive_one(self, s: _Src) -> None:
        assert self.asm is not None and s.conn is not None
        k = s.inflight[0]
        size = self.sizes[k]
        reply = await self._read_message(s)
        if not isinstance(reply, ShardReply):
            raise _SourceFailed(f"{s.report.addr} answered a shard request with {type(reply).__name__}")
        if (reply.index, reply.size, reply.snapshot_id) != (k, size, self.asm.manifest.snapshot_id):
            raise _SourceFailed(
                f"{s.report.addr} sent shard {reply.index} ({reply.size} bytes) where shard {k} ({size} bytes) was due"
            )
        if len(s.scratch) < size:
            s.scratch = bytearray(size)
        buf = memoryview(s.scratch)

        def progress(got: int) -> None:
            s.current_got = got
            s.last_progress = time.monotonic()

        # streams in 1 MiB reads (each marks progress for the stall check);
        # the frame's tag is checked over the whole blob before it is used
        await s.conn.recv_blob_into(buf, size, progress)
        now = s.last_progress = time.monotonic()
        s.inflight.popleft()
        s.current_got = 0
        s.report.seconds += now - max(s.last_arrival, s.requested_at.pop(k))
        s.last_arrival = now
        if self.asm.has(k):
            return  # the other copy of an endgame duplicate won
        try:
            self.asm.accept(k, buf[:size])
        except ChecksumMismatch as exc:
            s.report.corrupt += 1
            self.result_counts["corrupt"] += 1
            _log.warning("replication source %s: %s; re-fetching", s.report.addr, exc)
            self.orphans.appendleft(k)
            self._notify()
            if s.report.corrupt > self.max_corrupt:
                raise _SourceFailed(f"{s.report.addr} sent {s.report.corrupt} corrupt shards") from None
            return
        s.report.bytes += size
        s.report.shards += 1
        self.received += size
        if self.on_progress is not None:
            self.on_progress(self.received, self.asm.manifest.total_bytes)
        s.report.finished_at = now - self.t0
        if self.asm.done:
            self._notify()

    async def _watchdog(self) -> None:
        """Fail sources with a request outstanding and no byte for ``stall_timeout``."""
        period = min(0.1, self.stall_timeout / 4)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            for s in self.srcs:
                if s.alive and s.inflight and now - s.last_progress > self.stall_timeout:
                    self._fail(s, f"{s.report.addr} stalled: no bytes for {now - s.last_progress:.1f}s")

    # -- the whole pull -------------------------------------------------------------
    async def run(self, timeout: float) -> PullResult:
        try:
            return await asyncio.wait_for(self._run(), timeout)
        except asyncio.TimeoutError:
            missing = len(self.asm.missing) if self.asm is not None else "all"
            raise PullError(self._why(f"pull timed out after {timeout:g}s with {missing} shards missing")) from None
        finally:
            for s in self.srcs:
                if s.task is not None:
                    s.task.cancel()
                s.abort()

    async def _run(self) -> PullResult:
        await asyncio.gather(*(self._connect(s) for s in self.srcs))
        manifest = await self._manifest()
        manifest_seconds = time.monotonic() - self.t0
        self.asm = Assembler(manifest, max_bytes=self.max_bytes)
        self.sizes = manifest.shard_sizes
        if self.on_manifest is not None:
            self.on_manifest(manifest)
        live = [s for s in self.srcs if s.alive]
        nominal = [r for r in self.rates if r]
        default = sum(nominal) / len(nominal) if nominal else 1.0
        for s in live:
            s.planned_rate = float(self.rates[s.index] or default)
        the_plan = plan(self.sizes, [Source(s.index, s.planned_rate) for s in live], self.downlink)
        for s in live:
            s.queue.extend(the_plan.shards_of(s.index))
            s.report.planned_bytes = the_plan.bytes_of(s.index)
        for s in live:
            s.task = asyncio.ensure_future(self._worker(s))
        watchdog = asyncio.ensure_future(self._watchdog())
        try:
            while not self.asm.done:
                if not any(s.alive for s in self.srcs):
                    raise PullError(self._why(f"every source failed with {len(self.asm.missing)} shards missing"))
                changed = self.changed
                await changed.wait()
        finally:
            watchdog.cancel()
        seconds = time.monotonic() - self.t0
        meta, tensors = self.asm.result()
        c = self.result_counts
        return PullResult(
            meta=meta,
            tensors=tensors,
            manifest=manifest,
            plan=the_plan,
            sources=[s.report for s in self.srcs],
            seconds=seconds,
            manifest_seconds=manifest_seconds,
            refetched_corrupt=c["corrupt"],
            refetched_lost=c["lost"],
            stolen=c["stolen"],
            duplicates=c["dup"],
        )


async def pull_async(
    sources: Sequence[str | tuple[str, int]],
    secret: bytes | None,
    *,
    rates: Sequence[float | None] | None = None,
    downlink: float = math.inf,
    timeout: float = 600.0,
    connect_timeout: float = 5.0,
    stall_timeout: float = 10.0,
    max_bytes: int | None = None,
    max_corrupt: int = 3,
    depth: int = PIPELINE_DEPTH,
    on_manifest: Callable[[Manifest], None] | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> PullResult:
    """Fetch the published snapshot from ``sources`` in parallel (module docstring).

    ``rates``: each source's bytes/s to this joiner (None or a None entry:
    unknown, planned as equal and corrected by stealing once measured).
    ``downlink``: this joiner's bytes/s, for the plan.  ``timeout`` bounds the
    whole pull, ``connect_timeout`` each connect and handshake,
    ``stall_timeout`` the silence of a source with a request outstanding.
    ``max_bytes`` refuses a manifest announcing more state than that, before
    a byte is allocated or a shard requested (each source's manifest is
    checked; with none acceptable the pull fails with :class:`PullError`);
    ``None`` trusts the manifest (tests, the CLI).  The strategy passes
    :func:`chaos_lightning.strategy.state_sync.pull_bound` of its model.
    ``on_manifest`` is called once the manifest is in (e.g. to log progress),
    ``on_progress(received_bytes, total_bytes)`` after every accepted shard.
    Raises :class:`PullError` when no source can complete it.
    """
    p = _Pull(
        sources,
        secret,
        rates=rates,
        downlink=downlink,
        connect_timeout=connect_timeout,
        stall_timeout=stall_timeout,
        max_bytes=max_bytes,
        max_corrupt=max_corrupt,
        depth=depth,
        on_manifest=on_manifest,
        on_progress=on_progress,
    )
    return await p.run(timeout)


def pull(sources: Sequence[str | tuple[str, int]], secret: bytes | None, **kwargs: object) -> PullResult:
    """:func:`pull_async` on a fresh event loop (from synchronous code: the strategy)."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(pull_async(sources, secret, **kwargs))  # type: ignore[arg-type]
    raise RuntimeError("pull() called from a running event loop: await pull_async() instead")
