"""Framing: how messages and blobs are cut out of a byte stream.

Every frame is an 8-byte header followed by its payload::

    +-------+---------+------+----------------+-----------------+
    | "CL"  | version | kind | length (u32 BE)| payload (length)|
    +-------+---------+------+----------------+-----------------+

After the handshake every frame is followed by a 16-byte tag (Poly1305
under a one-time key, over a per-direction sequence number, the header and
the payload, see
:class:`chaos_lightning.wire.auth.Session`); ``length`` counts the payload
only.  Protocol 2 introduced the tag: a protocol-1 peer is refused at the
handshake with a clear version error instead of failing tag checks.
Protocol 3 added the encryption mode to the handshake's messages
(``Hello.encrypt``, ``ClientProof.encrypt``): a protocol-2 peer gets a
version error, not a schema error about a field count.  Protocol 4
replaced the tags' HMAC-SHA-256 by Poly1305 (six times the throughput):
a protocol-3 peer gets a version error, not failing tags.

``kind`` says what the payload is: :data:`KIND_MESSAGE` (one msgpack message,
see :mod:`chaos_lightning.wire.schema`) or :data:`KIND_BLOB` (raw bytes, for
bulk state shards, never interpreted by this layer).

The header is validated byte by byte as it arrives, so a stranger's garbage
is refused after its first byte and an oversized frame after its header,
before a single payload byte is buffered.  A bad frame cannot be skipped
(there is no resynchronisation marker), so every error here ends the
connection.

:class:`FrameDecoder` is sans-IO (bytes in, frames out, in the manner of h11)
for tests and custom transports; :func:`read_frame` is the asyncio reader the
agent's connections use.
"""

from __future__ import annotations

import asyncio
import struct

from chaos_lightning.wire.errors import (
    BadMagic,
    ConnectionClosed,
    FrameTooLarge,
    TruncatedFrame,
    UnknownFrameKind,
    UnsupportedVersion,
    WireError,
)

PROTOCOL_VERSION = 4
MAGIC = b"CL"

#: A msgpack message (:mod:`chaos_lightning.wire.schema`).
KIND_MESSAGE = 0
#: Raw bytes (bulk state shards); the receiver gets them as ``bytes``.
KIND_BLOB = 1
KINDS = frozenset({KIND_MESSAGE, KIND_BLOB})

_HEADER = struct.Struct("!2sBBI")
HEADER_SIZE = _HEADER.size  # 8

#: Default payload limit.  Control messages are a few hundred bytes and a view
#: of 1,000 members is about 50 KB; 16 MiB leaves room for large views and
#: blob shards while bounding what one hostile header can make us buffer.
DEFAULT_MAX_FRAME = 16 * 2**20

_MAX_U32 = 2**32 - 1


def frame_header(length: int, kind: int = KIND_MESSAGE) -> bytes:
    """The header for a payload of ``length`` bytes.

    For big blobs: write this, then the payload's memoryview, so the payload is
    never copied into a joined buffer.
    """
    if kind not in KINDS:
        raise ValueError(f"unknown frame kind {kind!r} (expected one of {sorted(KINDS)})")
    if not 0 <= length <= _MAX_U32:
        raise FrameTooLarge(f"payload of {length} bytes does not fit a frame (at most {_MAX_U32})")
    return _HEADER.pack(MAGIC, PROTOCOL_VERSION, kind, length)


def byte_view(data: bytes | bytearray | memoryview) -> memoryview:
    """A flat byte view of ``data`` (e.g. a tensor's buffer), copying only if non-contiguous."""
    view = memoryview(data)
    if not view.c_contiguous:
        return memoryview(view.tobytes())
    if view.ndim == 1 and view.format == "B":
        return view
    return view.cast("B")


def encode_frame(payload: bytes | memoryview, kind: int = KIND_MESSAGE) -> bytes:
    """Header and payload as one ``bytes`` (one copy; fine for messages)."""
    view = byte_view(payload)
    return b"".join((frame_header(view.nbytes, kind), view))


def _check_prefix(prefix: bytes | bytearray) -> None:
    """Validate however many header bytes have arrived (0 to 8), without the length."""
    n = len(prefix)
    if n >= 1 and prefix[0] != MAGIC[0] or n >= 2 and prefix[1] != MAGIC[1]:
        raise BadMagic(f"bad frame magic {bytes(prefix[:2])!r}, expected {MAGIC!r} (not a chaos_lightning peer?)")
    if n >= 3 and prefix[2] != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"peer speaks protocol {prefix[2]}, this agent speaks {PROTOCOL_VERSION}")
    if n >= 4 and prefix[3] not in KINDS:
        raise UnknownFrameKind(f"unknown frame kind {prefix[3]} (protocol {PROTOCOL_VERSION} knows {sorted(KINDS)})")


def parse_header(header: bytes | bytearray, max_size: int = DEFAULT_MAX_FRAME) -> tuple[int, int]:
    """``(kind, length)`` of a complete 8-byte header, or the reason it is refused."""
    _check_prefix(header)
    _, _, kind, length = _HEADER.unpack(header)
    if length > max_size:
        raise FrameTooLarge(f"frame of {length} bytes exceeds the limit of {max_size} bytes")
    return kind, length


class FrameDecoder:
    """Incremental, sans-IO frame decoder: feed bytes, get ``(kind, payload)`` frames.

    Errors are sticky: once the stream is found bad, every later call raises the
    same error (a framed stream cannot be resynchronised).  If complete frames
    preceded the bad bytes in one :meth:`feed`, they are returned first and the
    error is raised by the next call.
    """

    def __init__(self, max_size: int = DEFAULT_MAX_FRAME) -> None:
        self.max_size = max_size
        self._buf = bytearray()
        # (kind, length) of the frame whose payload is awaited, once its header is in.
        self._head: tuple[int, int] | None = None
        self._error: WireError | None = None

    @property
    def buffered(self) -> int:
        """Bytes held for an incomplete frame."""
        return len(self._buf)

    def feed(self, data: bytes | bytearray | memoryview) -> list[tuple[int, bytes]]:
        if self._error is not None:
            raise self._error
        buf = self._buf
        buf += data
        frames: list[tuple[int, bytes]] = []
        try:
            while True:
                if self._head is None:
                    if len(buf) < HEADER_SIZE:
                        _check_prefix(buf)
                        break
                    self._head = parse_header(bytes(buf[:HEADER_SIZE]), self.max_size)
                    del buf[:HEADER_SIZE]
                kind, length = self._head
                if len(buf) < length:
                    break
                with memoryview(buf) as view, view[:length] as body:
                    frames.append((kind, bytes(body)))
                del buf[:length]
                self._head = None
        except WireError as exc:
            self._error = exc
            buf.clear()  # never keep a hostile peer's bytes around
            if not frames:
                raise
        return frames

    def eof(self) -> None:
        """The stream ended: raise if it ended inside a frame (or was already bad)."""
        if self._error is not None:
            raise self._error
        if self._head is not None:
            self._error = TruncatedFrame(
                f"connection closed mid-frame: got {len(self._buf)} of {self._head[1]} payload bytes"
            )
        elif self._buf:
            self._error = TruncatedFrame(
                f"connection closed mid-frame: got {len(self._buf)} of {HEADER_SIZE} header bytes"
            )
        if self._error is not None:
            raise self._error


async def read_header(reader: asyncio.StreamReader) -> bytes:
    """The next frame's raw header: :class:`ConnectionClosed` on a clean EOF
    before its first byte, :class:`TruncatedFrame` (or the prefix's own error,
    for garbage) on EOF inside it.  Does not time out by itself."""
    try:
        return await reader.readexactly(HEADER_SIZE)
    except asyncio.IncompleteReadError as exc:
        if not exc.partial:
            raise ConnectionClosed() from None
        _check_prefix(exc.partial)  # garbage reports as garbage, not as truncation
        raise TruncatedFrame(
            f"connection closed mid-frame: got {len(exc.partial)} of {HEADER_SIZE} header bytes"
        ) from None


async def read_frame(reader: asyncio.StreamReader, max_size: int = DEFAULT_MAX_FRAME) -> tuple[int, bytes]:
    """Read one frame: ``(kind, payload)``.

    Raises :class:`ConnectionClosed` on a clean EOF before any header byte,
    :class:`TruncatedFrame` on EOF inside a frame, and the header errors of
    :func:`parse_header`.  Does not time out by itself: bound it where waiting
    forever would be wrong.
    """
    kind, length = parse_header(await read_header(reader), max_size)
    if not length:
        return kind, b""
    try:
        return kind, await reader.readexactly(length)
    except asyncio.IncompleteReadError as exc:
        raise TruncatedFrame(
            f"connection closed mid-frame: got {len(exc.partial)} of {length} payload bytes"
        ) from None
