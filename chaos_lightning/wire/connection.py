"""Connections: authenticated, framed, typed message streams over asyncio TCP.

This is the only module of the wire layer that opens sockets.  The agent uses
:func:`open_connection` to dial a peer and :func:`start_server` to accept
peers; either way it gets a :class:`Connection` whose ``send``/``recv`` speak
registered messages (:mod:`~chaos_lightning.wire.schema`) and raw blobs, and
only after the HMAC handshake (:mod:`~chaos_lightning.wire.auth`) succeeded.
:func:`dial` is the same client side without the wrapper: every client in
the package dials through it (the replication pull reads its streams
directly), so there is one connect-and-handshake path.

The server side keeps the design's promise "bad input costs one log line and
one connection, never the node": a failed handshake is logged as ``refused
connection from HOST:PORT: REASON``, a :class:`WireError` escaping the
handler as ``dropped connection from HOST:PORT: REASON``, both without a
traceback, and the server keeps accepting.
"""

from __future__ import annotations

import asyncio
import logging
import socket
from typing import Awaitable, Callable

from chaos_lightning.wire import schema
from chaos_lightning.wire.auth import check_bind_allowed, client_handshake, server_handshake
from chaos_lightning.wire.errors import ConnectionClosed, FrameTooLarge, WireError
from chaos_lightning.wire.frames import (
    DEFAULT_MAX_FRAME,
    KIND_BLOB,
    KIND_MESSAGE,
    byte_view,
    frame_header,
    read_frame,
)

_log = logging.getLogger("chaos_lightning.wire")

#: StreamReader buffer limit.  asyncio's 64 KiB default pauses the socket every
#: 128 KiB while a multi-MiB blob is read; 1 MiB keeps bulk reads streaming.
_STREAM_LIMIT = 2**20

#: How long closing waits for buffered bytes (a refusal's reason) to flush
#: before the socket is aborted: a peer that stopped reading must not pin us.
_CLOSE_TIMEOUT = 1.0

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


class Connection:
    """One authenticated connection to a peer.

    ``send``/``send_blob`` write one frame each (safe to call from several tasks:
    each frame is written without an intervening await, so frames never
    interleave); ``recv`` should have a single reader task.  None of these time
    out by themselves: wrap them in ``asyncio.wait_for`` where a silent peer
    must not stall the caller.
    """

    def __init__(
        self,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        peer: str,
        max_frame: int = DEFAULT_MAX_FRAME,
    ) -> None:
        self._reader = reader
        self._writer = writer
        self._peer = peer
        self.max_frame = max_frame

    @property
    def peer(self) -> str:
        """``host:port`` of the remote end."""
        return self._peer

    @property
    def closed(self) -> bool:
        return self._writer.is_closing()

    def _check_writable(self, length: int, what: str) -> None:
        # Refuse locally rather than have the peer drop the connection.
        if length > self.max_frame:
            raise FrameTooLarge(f"{what} of {length} bytes exceeds the frame limit of {self.max_frame} bytes")
        if self._writer.is_closing():
            raise ConnectionClosed(f"connection to {self._peer} is closed")

    async def send(self, msg: object) -> None:
        """Send one registered message (``SchemaError`` if it breaks its schema)."""
        payload = schema.encode(msg)
        self._check_writable(len(payload), "message")
        # Two writes, no concatenation: a large view is not copied again.
        self._writer.write(frame_header(len(payload), KIND_MESSAGE))
        self._writer.write(payload)
        await self._writer.drain()

    async def send_blob(self, data: bytes | bytearray | memoryview) -> None:
        """Send raw bytes (e.g. a state shard's buffer) without copying them here.

        The transport may still hold a reference to (part of) ``data`` after this
        returns (up to its low-water mark): pass a buffer nobody mutates, such as
        a snapshot taken at a step boundary.
        """
        view = byte_view(data)
        self._check_writable(view.nbytes, "blob")
        self._writer.write(frame_header(view.nbytes, KIND_BLOB))
        self._writer.write(view)
        await self._writer.drain()

    async def recv(self) -> object | bytes:
        """The next message (decoded) or blob (``bytes``).

        Raises :class:`ConnectionClosed` when the peer closed cleanly, another
        :class:`WireError` on bad input (then close the connection), ``OSError``
        on a reset.
        """
        kind, payload = await read_frame(self._reader, self.max_frame)
        if kind == KIND_MESSAGE:
            return schema.decode(payload)
        return payload

    def close(self) -> None:
        self._writer.close()

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


async def dial(
    host: str, port: int, *, secret: bytes | None, timeout: float
) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    """Dial ``host:port`` and authenticate; the raw streams, ready for frames.

    The one client side of the handshake: :func:`open_connection` wraps its
    streams in a :class:`Connection`; the replication pull reads them directly
    (it pipelines requests and streams multi-MiB blobs in chunks, marking
    progress for its stall check).  Connect and handshake are each bounded by
    ``timeout``.  On failure the socket is closed and the error re-raised with
    the address in its message: ``TimeoutError``, ``OSError`` (e.g.
    ``ConnectionRefusedError``) or a :class:`WireError` (e.g. ``AuthError``
    for a wrong secret), each of the same type as the underlying error.
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
        await client_handshake(reader, writer, secret, timeout)
    except BaseException as exc:
        writer.transport.abort()  # nothing worth flushing; also on cancellation
        if isinstance(exc, WireError):  # before OSError: HandshakeTimeout is both
            raise type(exc)(f"handshake with {addr} failed: {exc}") from exc
        if isinstance(exc, OSError):
            raise _with_addr(exc, f"handshake with {addr} failed") from exc
        raise
    return reader, writer


async def open_connection(
    host: str,
    port: int,
    *,
    secret: bytes | None,
    timeout: float,
    max_frame: int = DEFAULT_MAX_FRAME,
) -> Connection:
    """Dial ``host:port`` and authenticate (:func:`dial`, same bounds and errors); a :class:`Connection`."""
    reader, writer = await dial(host, port, secret=secret, timeout=timeout)
    peer = format_addr(writer.get_extra_info("peername")) or format_addr((host, port))
    return Connection(reader, writer, peer, max_frame)


async def start_server(
    host: str,
    port: int,
    handler: Handler,
    *,
    secret: bytes | None,
    max_frame: int = DEFAULT_MAX_FRAME,
    handshake_timeout: float = 5.0,
    log: logging.Logger = _log,
) -> asyncio.Server:
    """Listen on ``host:port``; run ``await handler(conn)`` for each authenticated peer.

    Refuses to listen beyond loopback without a secret (``InsecureBind``).
    ``handshake_timeout`` (default 5 s: a loopback handshake takes about a
    millisecond, a WAN one a few RTTs) bounds how long a silent stranger holds
    a socket.  The handler owns the connection until it returns; it is closed
    afterwards.  A :class:`ConnectionClosed` escaping the handler is a normal
    end (logged at DEBUG); other :class:`WireError` and ``OSError`` are one
    WARNING line; any other exception is a bug in the handler and is logged
    with its traceback.  Nothing reaches the event loop's exception handler.
    """
    check_bind_allowed(host, secret)

    async def serve(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        _set_nodelay(writer)
        peer = format_addr(writer.get_extra_info("peername"))
        conn = Connection(reader, writer, peer, max_frame)
        try:
            try:
                await server_handshake(reader, writer, secret, handshake_timeout)
            except ConnectionClosed:
                # Port scanners and health checks connect and hang up: not worth a warning.
                log.info("connection from %s closed before the handshake", peer)
                return
            except (WireError, OSError) as exc:
                log.warning("refused connection from %s: %s", peer, exc)
                return
            try:
                await handler(conn)
            except ConnectionClosed:
                log.debug("connection from %s closed by the peer", peer)
            except (WireError, OSError) as exc:
                log.warning("dropped connection from %s: %s", peer, exc)
            except Exception:
                log.exception("connection handler failed on the connection from %s", peer)
        finally:
            await conn.aclose()

    async def on_connect(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            await serve(reader, writer)
        except asyncio.CancelledError:
            # The loop is shutting down.  Nothing awaits this task, and Python
            # 3.11's stream callback logs a cancelled one as an ERROR with a
            # traceback; ending normally (socket aborted) loses nothing.
            writer.transport.abort()

    return await asyncio.start_server(on_connect, host, port, limit=_STREAM_LIMIT)
