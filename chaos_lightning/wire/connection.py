"""Connections: authenticated, integrity-protected, framed, typed message streams over asyncio TCP.

This is the only module of the wire layer that opens sockets.  The agent uses
:func:`open_connection` to dial a peer and :func:`start_server` to accept
peers; either way it gets a :class:`Connection` whose ``send``/``recv`` speak
registered messages (:mod:`~chaos_lightning.wire.schema`) and raw blobs, and
only after the HMAC handshake (:mod:`~chaos_lightning.wire.auth`) succeeded.
:func:`dial` is the one connect-and-handshake path (``open_connection`` is
its alias); the replication pull streams multi-MiB blobs into its own buffer
with :meth:`Connection.recv_blob_into`.

Integrity.  Every frame after the handshake carries a 16-byte tag
(:class:`~chaos_lightning.wire.auth.Session`: HMAC-SHA256 with a per-direction
key from HKDF over the secret and both nonces, and an implicit per-direction
sequence number), so a frame injected into, replayed on or reordered in an
authenticated connection fails its check and ends the connection.  Bulk
blobs get one tag over the whole frame, computed over the payload's memory
without a copy.  Measured cost (``python benchmarks/wire_mac.py``: 256 MiB
over loopback through ``send_blob``/``recv_blob_into``, sender and receiver
in two processes, best of 3, on a shared 2-core VM with SHA-NI, so noisy):
16 MiB blobs 2980 MB/s untagged vs 582 MB/s tagged; 4 MiB blobs 1364 vs
915 MB/s (an earlier, busier run: 681 vs 170 and 795 vs 366 at 1 MiB).  The
tag is computed inline on the event loop at about 1 GB/s per side (16 ms per
16 MiB frame), so one connection tops out near 0.6-0.9 GB/s: a loss only on
loopback or faster-than-10-Gbit/s links, invisible on the edge/WAN links
this system targets.  A blob from 256 KiB on is read from the socket
straight into the caller's buffer (:meth:`Connection._recv_direct`, one
copy instead of four; 2026-12-07, interleaved rounds, ``--blob 4``: tagged
709-766 -> 959-1063 MB/s, untagged 1369-1832 -> 2441-3575 MB/s; a 200 MB
pull from one source 0.42 -> 0.38 s median).  With an encrypting secret (``CHAOS_ENCRYPT=1``,
:class:`~chaos_lightning.wire.auth.Secret`) every payload is also
enciphered with ChaCha20 before it is tagged (one more pass and one copy of
each frame on each side; measured in ``benchmarks/wire_mac.py``).

Bounds.  The server side keeps the design's promise "bad input costs one log
line and one connection, never the node":

* at most ``max_pending`` connections (default 256) await authentication at
  once, and at most ``max_pending_per_host`` (default 64) from one source
  address; the excess is closed the moment it is accepted, so a flood of
  idle sockets cannot push the process to its file limit (the handshake
  itself is bounded by ``handshake_timeout``);
* refusals are logged through a rate limiter: the first of each reason at
  once (``refused connection from HOST:PORT: REASON``), then one line per
  reason per ``log_interval`` (10 s) counting the ones suppressed, never a
  traceback; a :class:`WireError` escaping the handler (``dropped connection
  from HOST:PORT: REASON``) likewise;
* once authenticated, a frame's body (and tag) must follow its header within
  ``frame_timeout + length / MIN_FRAME_RATE`` seconds (10 s + 1 s per 128 KiB:
  138 s for a full 16 MiB frame, ample for a 10 Mbit/s edge link), and a
  server-side connection on which no frame starts for ``idle_timeout``
  seconds (default 120 s, :data:`DEFAULT_IDLE_TIMEOUT`) is closed.  The agent's
  own senders close their idle connections after 30 s, well inside it; a
  handler whose connections are legitimately quiet longer (a store client
  blocked on a key) sets ``conn.idle_timeout = None`` or a larger bound, or
  passes ``idle_timeout=`` to :func:`start_server`.  Client-side connections
  have no idle bound by default (their callers bound their own waits).
"""

from __future__ import annotations

import asyncio
import logging
import socket
import sys
from collections import Counter
from typing import Any, Awaitable, Callable

from chaos_lightning.wire import schema
from chaos_lightning.wire.auth import TAG_SIZE, Session, check_bind_allowed, client_handshake, server_handshake
from chaos_lightning.wire.errors import ConnectionClosed, FrameTooLarge, ReadTimeout, TruncatedFrame, WireError
from chaos_lightning.wire.frames import (
    DEFAULT_MAX_FRAME,
    KIND_BLOB,
    KIND_MESSAGE,
    read_header,
    byte_view,
    frame_header,
    parse_header,
)

_log = logging.getLogger("chaos_lightning.wire")

#: StreamReader buffer limit.  asyncio's 64 KiB default pauses the socket every
#: 128 KiB while a multi-MiB blob is read; 1 MiB keeps bulk reads streaming.
_STREAM_LIMIT = 2**20

#: How long closing waits for buffered bytes (a refusal's reason) to flush
#: before the socket is aborted: a peer that stopped reading must not pin us.
_CLOSE_TIMEOUT = 1.0

#: Server side: a connection on which no frame starts for this long is closed.
DEFAULT_IDLE_TIMEOUT = 120.0
#: A frame's body must arrive within this many seconds of its header, plus
#: ``length / MIN_FRAME_RATE``.
DEFAULT_FRAME_TIMEOUT = 10.0
#: The slowest link a frame body is waited for: 128 KiB/s (about 1 Mbit/s).
MIN_FRAME_RATE = 128 * 1024
#: Connections awaiting authentication: in all, and from one source address.
DEFAULT_MAX_PENDING = 256
DEFAULT_MAX_PENDING_PER_HOST = 64
#: One refusal line per reason per this many seconds.
DEFAULT_LOG_INTERVAL = 10.0

#: Largest read while a blob streams into the caller's buffer.
_READ_CHUNK = 1 << 20
#: Blobs from this size on are read from the socket straight into the
#: caller's buffer (:meth:`Connection._recv_direct`); smaller ones through
#: the stream, where the saved copies cost less than the extra system calls.
_DIRECT_MIN = 256 * 1024

Handler = Callable[["Connection"], Awaitable[None]]


def format_addr(sockaddr: object) -> str:
    """``host:port`` (``[v6]:port``) of a socket address tuple."""
    if isinstance(sockaddr, tuple) and len(sockaddr) >= 2:
        host, port = sockaddr[0], sockaddr[1]
        return f"[{host}]:{port}" if ":" in str(host) else f"{host}:{port}"
    return str(sockaddr)


def _set_nodelay(writer: asyncio.StreamWriter) -> None:
    # Control messages are tiny and latency-bound: Nagle plus delayed ACKs would
    # add up to 40 ms per exchange on loopback.  (asyncio sets this too on
    # recent Pythons; being explicit keeps it true on every transport.)
    sock = writer.get_extra_info("socket")
    if sock is not None and sock.family in (socket.AF_INET, socket.AF_INET6):
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass


class RateLimitedLog:
    """One line per reason per ``interval`` seconds, then a count of the suppressed ones.

    The first event of a reason is logged at once; later ones within the
    window are counted, and when the window ends a single line says how many
    there were (and a new window starts; a window with none ends quietly).
    Runs on the event loop (the window ends by ``call_later``).
    """

    def __init__(self, log: logging.Logger, interval: float = DEFAULT_LOG_INTERVAL) -> None:
        self.log = log
        self.interval = interval
        self._windows: dict[str, list] = {}  # reason -> [suppressed, level, last message]
        #: every event seen, logged or not, per reason (for tests and status)
        self.counts: Counter[str] = Counter()

    def __call__(self, reason: str, level: int, msg: str, *args: object) -> None:
        self.counts[reason] += 1
        window = self._windows.get(reason)
        if window is not None:
            window[0] += 1
            window[2] = msg % args if args else msg
            return
        self.log.log(level, msg, *args)
        self._windows[reason] = [0, level, ""]
        self._schedule(reason)

    def _schedule(self, reason: str) -> None:
        try:
            asyncio.get_running_loop().call_later(self.interval, self._flush, reason)
        except RuntimeError:  # no loop: no window
            self._windows.pop(reason, None)

    def _flush(self, reason: str) -> None:
        window = self._windows.get(reason)
        if window is None:
            return
        n, level, last = window
        if not n:
            del self._windows[reason]
            return
        self.log.log(level, "... and %d more like this in the last %gs (%s; last: %s)", n, self.interval, reason, last)
        window[0] = 0
        self._schedule(reason)


class Connection:
    """One authenticated connection to a peer.

    ``send``/``send_blob`` write one frame each (safe to call from several
    tasks: each frame, tag included, is written without an intervening await,
    so frames never interleave and sequence numbers match the wire order);
    ``recv`` should have a single reader task.  Every frame is tagged and
    checked when the connection has a ``session`` (every connection made by
    :func:`dial`/:func:`open_connection`/:func:`start_server` has one; a
    ``Connection`` built by hand without one speaks untagged frames, for
    in-process tests only).

    Reads are bounded: a frame's body must follow its header within
    ``frame_timeout + length / MIN_FRAME_RATE`` seconds, and ``recv`` waits at
    most ``idle_timeout`` seconds for a frame to start (``None``: no bound;
    the attribute may be changed at any time) -- both raise
    :class:`~chaos_lightning.wire.errors.ReadTimeout`.  Sends are not bounded
    here: wrap them in ``asyncio.wait_for`` where a peer that stopped reading
    must not stall the caller.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        max_frame: int = DEFAULT_MAX_FRAME,
        session: Session | None = None,
        *,
        idle_timeout: float | None = None,
        frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self._session = session
        self.max_frame = max_frame
        self.idle_timeout = idle_timeout
        self.frame_timeout = frame_timeout

    @property
    def peer(self) -> str:
        """``host:port`` of the remote end."""
        return self._peer

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()

    @property
    def authenticated(self) -> bool:
        """True when frames are tagged and checked (a :class:`Session` is attached)."""
        return self._session is not None

    # -- sending -----------------------------------------------------------------
    def _check_writable(self, length: int, what: str) -> None:
        # Refuse locally rather than have the peer drop the connection.
        if length > self.max_frame:
            raise FrameTooLarge(f"{what} of {length} bytes exceeds the frame limit of {self.max_frame} bytes")
        if self._writer.is_closing():
            raise ConnectionClosed(f"connection to {self._peer} is closed")

    def _write_frame(self, kind: int, view: memoryview) -> None:
        """Header, payload (not copied) and tag; no await, so frames never interleave."""
        header = frame_header(view.nbytes, kind)
        body, tag = self._session.seal(header, view) if self._session is not None else (view, b"")
        self._writer.write(header)
        self._writer.write(body)
        if tag:
            self._writer.write(tag)

    def write_nowait(self, msg: object) -> None:
        """Queue one message without waiting for the transport (pipelining); ``await drain()`` after."""
        payload = schema.encode(msg)
        self._check_writable(len(payload), "message")
        self._write_frame(KIND_MESSAGE, memoryview(payload))

    async def drain(self) -> None:
        await self._writer.drain()

    async def send(self, msg: object) -> None:
        """Send one registered message (``SchemaError`` if it breaks its schema)."""
        self.write_nowait(msg)
        await self._writer.drain()

    async def send_blob(self, data: bytes | bytearray | memoryview) -> None:
        """Send raw bytes (e.g. a state shard's buffer) without copying them here.

        The transport may still hold a reference to (part of) ``data`` after this
        returns (up to its low-water mark): pass a buffer nobody mutates, such as
        a snapshot taken at a step boundary.
        """
        view = byte_view(data)
        self._check_writable(view.nbytes, "blob")
        self._write_frame(KIND_BLOB, view)
        await self._writer.drain()

    async def send_frame(self, payload: bytes | memoryview, kind: int = KIND_MESSAGE) -> None:
        """Send ``payload`` as one frame of ``kind``, tagged but not encoded (tests, custom payloads)."""
        view = byte_view(payload)
        self._check_writable(view.nbytes, "frame")
        self._write_frame(kind, view)
        await self._writer.drain()

    # -- receiving ---------------------------------------------------------------
    async def _read_head(self) -> tuple[bytes, int, int]:
        """The next frame's header, its kind and length (waiting at most ``idle_timeout``)."""
        try:
            async with _deadline(self.idle_timeout):  # None: no bound
                header = await read_header(self._reader)
        except TimeoutError:
            raise ReadTimeout(f"no frame from {self._peer} for {self.idle_timeout:g}s (idle bound); closing") from None
        kind, length = parse_header(header, self.max_frame)
        return header, kind, length

    def _body_bound(self, length: int) -> float | None:
        if self.frame_timeout is None:
            return None
        return self.frame_timeout + length / MIN_FRAME_RATE

    def _too_slow(self, length: int, bound: float) -> ReadTimeout:
        return ReadTimeout(f"{self._peer} announced a frame of {length} bytes and did not send it within {bound:.0f}s")

    async def recv_frame(self) -> tuple[int, bytes]:
        """The next frame, checked: ``(kind, payload)``."""
        header, kind, length = await self._read_head()
        bound = self._body_bound(length)
        payload = b""
        try:
            async with _deadline(bound):
                payload = await self._reader.readexactly(length) if length else b""
                tag = await self._reader.readexactly(TAG_SIZE) if self._session is not None else b""
        except TimeoutError:
            raise self._too_slow(length, bound or 0.0) from None
        except asyncio.IncompleteReadError as exc:
            if len(payload) == length and length:
                raise TruncatedFrame(
                    f"connection closed mid-frame: got {len(exc.partial)} of {TAG_SIZE} tag bytes (an untagged frame?)"
                ) from None
            raise TruncatedFrame(
                f"connection closed mid-frame: got {len(exc.partial)} of {length} payload bytes"
            ) from None
        if self._session is not None:
            h = self._session.opener(header)
            h.update(payload)
            self._session.verify(h, tag)
            payload = self._session.decipher(payload)
        return kind, payload

    async def recv(self) -> object | bytes:
        """The next message (decoded) or blob (``bytes``).

        Raises :class:`ConnectionClosed` when the peer closed cleanly,
        :class:`~chaos_lightning.wire.errors.IntegrityError` for a frame that
        fails its tag, :class:`~chaos_lightning.wire.errors.ReadTimeout` past
        the read bounds, another :class:`WireError` on bad input (then close
        the connection), ``OSError`` on a reset.
        """
        kind, payload = await self.recv_frame()
        if kind == KIND_MESSAGE:
            return schema.decode(payload)
        return payload

    async def recv_blob_into(
        self,
        buf: bytearray | memoryview,
        size: int | None = None,
        on_progress: Callable[[int], None] | None = None,
    ) -> int:
        """Read the next frame, which must be a blob (of ``size`` bytes if given), into ``buf``.

        Streams in chunks of at most 1 MiB, calling ``on_progress(bytes_so_far)``
        after each, and checks the tag over the whole frame at the end (``buf``
        holds unchecked bytes until this returns: use them only then).  Returns
        the blob's length.
        """
        header, kind, length = await self._read_head()
        if kind != KIND_BLOB:
            raise WireError(f"{self._peer} sent a frame of kind {kind} where a blob was due")
        if size is not None and length != size:
            raise WireError(f"{self._peer} sent a blob of {length} bytes where {size} were due")
        view = memoryview(buf).cast("B") if not isinstance(buf, memoryview) else buf
        if length > view.nbytes:
            raise FrameTooLarge(f"blob of {length} bytes does not fit the {view.nbytes}-byte buffer")
        h = self._session.opener(header) if self._session is not None else None
        bound = self._body_bound(length)
        got = 0
        try:
            async with _deadline(bound):
                if length >= _DIRECT_MIN and (self._session is None or not self._session.encrypts):
                    got = await self._recv_direct(view, length, h, on_progress)
                while got < length:
                    chunk = await self._reader.read(min(length - got, _READ_CHUNK))
                    if not chunk:
                        raise TruncatedFrame(f"{self._peer} closed the connection mid-blob: got {got} of {length} bytes")
                    n = len(chunk)
                    if h is not None:
                        h.update(chunk)  # the tag covers the bytes as sent (ciphertext when encrypting)
                        chunk = self._session.decipher(chunk)  # type: ignore[union-attr]
                    view[got : got + n] = chunk
                    got += n
                    if on_progress is not None:
                        on_progress(got)
                tag = await self._reader.readexactly(TAG_SIZE) if h is not None else b""
        except TimeoutError:
            raise self._too_slow(length, bound or 0.0) from None
        except asyncio.IncompleteReadError:
            raise TruncatedFrame(f"{self._peer} closed the connection before the blob's tag") from None
        if h is not None:
            assert self._session is not None
            self._session.verify(h, tag)
        return length

    async def _recv_direct(
        self, view: memoryview, length: int, h: Any, on_progress: Callable[[int], None] | None
    ) -> int:
        """Read a blob's body from the socket straight into ``view``; the bytes read.

        The stream path copies every byte four times before it reaches the
        caller (the socket's ``bytes``, the reader's buffer, the ``bytes``
        that ``read`` returns, ``view``); this one copies it once, from the
        kernel into ``view``.  How: the bytes the reader already holds are
        taken first (no await between that and the pause, so none arrive in
        between), the transport stops reading, and the rest of the body comes
        from a duplicate of the socket's descriptor by ``loop.sock_recv_into``,
        never past the body (the tag and any later frame stay in the kernel
        for the stream).  Reading resumes however this ends.  Returns 0, and
        the stream path does it all, where the reader's buffer or the socket
        is not there to use (another event loop or transport; the reader's
        ``_buffer``, an asyncio internal unchanged since Python 3.4, is read
        only for its length, and ``tests/test_wire_bounds.py`` checks that
        this path runs on the supported Pythons).
        """
        buffered = getattr(self._reader, "_buffer", None)
        transport = self._writer.transport
        ts = transport.get_extra_info("socket")
        if not isinstance(buffered, (bytearray, bytes)) or ts is None or not hasattr(transport, "pause_reading"):
            return 0
        got = 0
        if buffered:
            chunk = await self._reader.read(min(length, len(buffered)))  # held already: returns at once
            got = len(chunk)
            view[:got] = chunk
            if h is not None:
                h.update(chunk)
        if got >= length or self._reader.at_eof():
            return got
        loop = asyncio.get_running_loop()
        transport.pause_reading()
        try:
            with socket.fromfd(ts.fileno(), ts.family, ts.type, ts.proto) as sock:
                sock.setblocking(False)
                while got < length:
                    n = await loop.sock_recv_into(sock, view[got:length])
                    if not n:
                        raise TruncatedFrame(f"{self._peer} closed the connection mid-blob: got {got} of {length} bytes")
                    if h is not None:
                        h.update(view[got : got + n])
                    got += n
                    if on_progress is not None:
                        on_progress(got)
        finally:
            if not transport.is_closing():
                transport.resume_reading()
        return got

    # -- closing -----------------------------------------------------------------
    def close(self) -> None:
        self._writer.close()

    def abort(self) -> None:
        """Close at once, dropping anything unsent."""
        self._writer.transport.abort()

    async def wait_closed(self) -> None:
        """Wait (at most about a second) for the close to finish; never raises OSError."""
        try:
            await asyncio.wait_for(self._writer.wait_closed(), _CLOSE_TIMEOUT)
        except (OSError, asyncio.TimeoutError):
            self._writer.transport.abort()

    async def aclose(self) -> None:
        self.close()
        await self.wait_closed()

    async def __aenter__(self) -> Connection:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()

    def __repr__(self) -> str:
        return f"<Connection {self._peer}{' closed' if self.closed else ''}>"


def _with_addr(exc: OSError, prefix: str) -> OSError:
    """The same kind of OSError, its message prefixed with the address."""
    try:
        if exc.errno is not None and exc.strerror:
            return type(exc)(exc.errno, f"{prefix}: {exc.strerror}")
        return type(exc)(f"{prefix}: {exc}")
    except Exception:  # an OSError subclass with an unusual constructor
        return OSError(exc.errno, f"{prefix}: {exc}")


class _Deadline:
    """``asyncio.timeout`` for Python 3.10, which lacks it (the project
    supports 3.10): cancel the current task at the deadline and turn that
    cancellation, and only that one, into ``TimeoutError``.  ``None``: no
    deadline."""

    def __init__(self, delay: float | None) -> None:
        self._delay = delay
        self._handle: asyncio.TimerHandle | None = None
        self._fired = False

    async def __aenter__(self) -> _Deadline:
        if self._delay is not None:
            task = asyncio.current_task()
            self._handle = asyncio.get_running_loop().call_later(max(0.0, self._delay), self._fire, task)
        return self

    def _fire(self, task: asyncio.Task | None) -> None:
        self._fired = True
        if task is not None:
            task.cancel()

    async def __aexit__(self, exc_type: Any, exc: Any, tb: Any) -> bool:
        if self._handle is not None:
            self._handle.cancel()
        if self._fired and exc_type is asyncio.CancelledError:
            raise TimeoutError from None
        return False


_deadline = asyncio.timeout if sys.version_info >= (3, 11) else _Deadline


async def dial(
    host: str,
    port: int,
    *,
    secret: bytes | None,
    timeout: float,
    max_frame: int = DEFAULT_MAX_FRAME,
    idle_timeout: float | None = None,
    frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
) -> Connection:
    """Dial ``host:port`` and authenticate; an integrity-protected :class:`Connection`.

    The one client side of the handshake (:func:`open_connection` is the same
    call).  Connect and handshake are each bounded by ``timeout``.  On failure
    the socket is closed and the error re-raised with the address in its
    message: ``TimeoutError``, ``OSError`` (e.g. ``ConnectionRefusedError``)
    or a :class:`WireError` (e.g. ``AuthError`` for a wrong secret), each of
    the same type as the underlying error.

    (Before frames were tagged this returned the raw ``(reader, writer)``
    streams; raw streams cannot speak the tagged protocol, so it returns the
    connection, whose :meth:`Connection.recv_blob_into` streams big blobs.)
    """
    addr = format_addr((host, port))
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(host, port, limit=_STREAM_LIMIT), timeout)
    except asyncio.TimeoutError:
        raise TimeoutError(f"connecting to {addr} timed out after {timeout:g}s") from None
    except OSError as exc:
        raise _with_addr(exc, f"cannot connect to {addr}") from exc
    _set_nodelay(writer)
    try:
        session = await client_handshake(reader, writer, secret, timeout)
    except BaseException as exc:
        writer.transport.abort()  # nothing worth flushing; also on cancellation
        if isinstance(exc, WireError):  # before OSError: HandshakeTimeout is both
            raise type(exc)(f"handshake with {addr} failed: {exc}") from exc
        if isinstance(exc, OSError):
            raise _with_addr(exc, f"handshake with {addr} failed") from exc
        raise
    peer = format_addr(writer.get_extra_info("peername")) or addr
    return Connection(
        reader, writer, peer, max_frame, session, idle_timeout=idle_timeout, frame_timeout=frame_timeout
    )


#: the agent's name for :func:`dial` (same arguments, bounds and errors): one
#: client side of the handshake, under both names callers know
open_connection = dial


class _Admission:
    """Counts connections awaiting authentication, in all and per source host."""

    def __init__(self, max_pending: int, max_per_host: int) -> None:
        self.max_pending = max_pending
        self.max_per_host = max_per_host
        self.pending = 0
        self.by_host: Counter[str] = Counter()

    def admit(self, host: str) -> str | None:
        """None if admitted (call :meth:`release` later), else why not."""
        if self.pending >= self.max_pending:
            return f"{self.pending} connections await authentication (limit {self.max_pending})"
        if self.by_host[host] >= self.max_per_host:
            return f"{self.by_host[host]} connections from {host} await authentication (limit {self.max_per_host} per source)"
        self.pending += 1
        self.by_host[host] += 1
        return None

    def release(self, host: str) -> None:
        self.pending -= 1
        self.by_host[host] -= 1
        if self.by_host[host] <= 0:
            del self.by_host[host]


async def start_server(
    host: str,
    port: int,
    handler: Handler,
    *,
    secret: bytes | None,
    max_frame: int = DEFAULT_MAX_FRAME,
    handshake_timeout: float = 5.0,
    log: logging.Logger = _log,
    idle_timeout: float | None = DEFAULT_IDLE_TIMEOUT,
    frame_timeout: float | None = DEFAULT_FRAME_TIMEOUT,
    max_pending: int = DEFAULT_MAX_PENDING,
    max_pending_per_host: int = DEFAULT_MAX_PENDING_PER_HOST,
    log_interval: float = DEFAULT_LOG_INTERVAL,
) -> asyncio.Server:
    """Listen on ``host:port``; run ``await handler(conn)`` for each authenticated peer.

    Refuses to listen beyond loopback without a secret (``InsecureBind``).
    ``handshake_timeout`` (default 5 s: a loopback handshake takes about a
    millisecond, a WAN one a few RTTs) bounds how long a silent stranger holds
    a socket; ``max_pending``/``max_pending_per_host`` cap how many do at once
    (the excess is closed at once); ``idle_timeout``/``frame_timeout`` bound
    the reads of authenticated connections (module docstring).  The handler
    owns the connection until it returns; it is closed afterwards.  A
    :class:`ConnectionClosed` escaping the handler is a normal end (logged at
    DEBUG); other :class:`WireError` and ``OSError`` are one WARNING line (an
    idle timeout one INFO line), rate-limited per reason; any other
    exception is a bug in the handler and is logged with its traceback.
    Nothing reaches the event loop's exception handler.  The returned
    server's ``refusals`` (a :class:`RateLimitedLog`) counts every refusal by
    reason and ``admission.pending`` the connections awaiting authentication.
    """
    check_bind_allowed(host, secret)
    refusals = RateLimitedLog(log, log_interval)
    admission = _Admission(max_pending, max_pending_per_host)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, peer: str, source: str) -> None:
        _set_nodelay(writer)
        try:
            try:
                session = await server_handshake(reader, writer, secret, handshake_timeout)
            except ConnectionClosed:
                # Port scanners and health checks connect and hang up: not worth a warning.
                refusals("closed before the handshake", logging.INFO, "connection from %s closed before the handshake", peer)
                writer.transport.abort()
                return
            except (WireError, OSError) as exc:
                refusals(f"refused: {type(exc).__name__}", logging.WARNING, "refused connection from %s: %s", peer, exc)
                await _close(writer)
                return
            finally:
                admission.release(source)
            conn = Connection(
                reader, writer, peer, max_frame, session, idle_timeout=idle_timeout, frame_timeout=frame_timeout
            )
            try:
                await handler(conn)
            except ConnectionClosed:
                log.debug("connection from %s closed by the peer", peer)
            except ReadTimeout as exc:
                level = logging.INFO if "idle" in str(exc) else logging.WARNING
                refusals(f"dropped: {'idle' if level == logging.INFO else 'slow frame'}", level,
                         "dropped connection from %s: %s", peer, exc)
            except (WireError, OSError) as exc:
                refusals(f"dropped: {type(exc).__name__}", logging.WARNING, "dropped connection from %s: %s", peer, exc)
            except Exception:
                log.exception("connection handler failed on the connection from %s", peer)
            await conn.aclose()
        except BaseException:
            writer.transport.abort()
            raise

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        sockaddr = writer.get_extra_info("peername")
        peer = format_addr(sockaddr)
        source = str(sockaddr[0]) if isinstance(sockaddr, tuple) and sockaddr else peer
        why = admission.admit(source)
        if why is not None:
            writer.transport.abort()  # at once: no handshake, no buffer, no timer
            refusals("over the pending limit", logging.WARNING, "refused connection from %s: %s; closed at once", peer, why)
            return
        try:
            await serve(reader, writer, peer, source)
        except asyncio.CancelledError:
            # The loop is shutting down.  Nothing awaits this task, and Python
            # 3.11's stream callback logs a cancelled one as an ERROR with a
            # traceback; ending normally (socket aborted) loses nothing.
            writer.transport.abort()

    server = await asyncio.start_server(on_connect, host, port, limit=_STREAM_LIMIT)
    server.refusals = refusals  # type: ignore[attr-defined]
    server.admission = admission  # type: ignore[attr-defined]
    return server


async def _close(writer: asyncio.StreamWriter) -> None:
    """Close, letting a refusal's reason flush for at most a second."""
    writer.close()
    try:
        await asyncio.wait_for(writer.wait_closed(), _CLOSE_TIMEOUT)
    except (OSError, asyncio.TimeoutError):
        writer.transport.abort()


def quiet_accept_errors(loop: asyncio.AbstractEventLoop, log: logging.Logger = _log,
                        interval: float = DEFAULT_LOG_INTERVAL) -> None:
    """Make ``loop`` report a failed ``accept()`` (EMFILE, ENFILE, ENOBUFS) as one
    rate-limited line without a traceback, instead of asyncio's ERROR with one
    per retry; every other loop error goes to the default handler.  For loops a
    component owns (the agent's, the shard server's)."""
    state = {"last": -float("inf"), "suppressed": 0}

    def handler(lp: asyncio.AbstractEventLoop, context: dict) -> None:
        exc = context.get("exception")
        if isinstance(exc, OSError) and "accept" in str(context.get("message", "")):
            now = lp.time()
            if now - state["last"] >= interval:
                log.warning("cannot accept connections: %s (%d more like this suppressed); retrying",
                            exc, state["suppressed"])
                state["last"], state["suppressed"] = now, 0
            else:
                state["suppressed"] += 1
            return
        lp.default_exception_handler(context)

    loop.set_exception_handler(handler)
