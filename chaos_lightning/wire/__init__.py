"""wire: the bottom layer, everything between a socket and a typed message.

- :mod:`.frames` cuts a byte stream into length-prefixed frames (sans-IO
  decoder plus an asyncio reader) and refuses oversized, truncated or foreign
  frames from their header;
- :mod:`.schema` turns registered dataclasses into msgpack and back, checking
  every value against the annotations (never pickle from the network);
- :mod:`.auth` runs the mutual HMAC challenge–response on every connection
  with the shared cluster secret (given as bytes, at least 16 of them: this
  layer reads no environment) and derives the session's frame keys: every
  frame after the handshake carries an HMAC tag with a per-direction
  sequence number (injection, replay and reordering are refused);
- :mod:`.addr` is the one ``HOST:PORT`` parser every layer uses;
- :mod:`.connection` puts the three together: ``open_connection`` (alias
  ``dial``), ``start_server``, ``Connection``, with bounded reads (idle and
  per-frame timeouts) and a cap on connections awaiting authentication.

Everything a peer can get wrong raises a :class:`WireError`; the server turns
it into one log line and one closed connection.  Imports nothing above itself.
"""

from __future__ import annotations

from chaos_lightning.wire.addr import AddressError, format_hostport, normalize_hostport, parse_hostport, parse_hostport_list
from chaos_lightning.wire.auth import (
    MIN_SECRET_BYTES,
    Secret,
    Session,
    check_bind_allowed,
    check_secret,
    client_handshake,
    encrypts,
    load_secret,
    server_handshake,
)
from chaos_lightning.wire.connection import Connection, dial, open_connection, start_server
from chaos_lightning.wire.errors import (
    AuthError,
    BadMagic,
    ConnectionClosed,
    FrameTooLarge,
    HandshakeTimeout,
    InsecureBind,
    IntegrityError,
    ReadTimeout,
    SchemaError,
    TruncatedFrame,
    UnknownFrameKind,
    UnsupportedVersion,
    WeakSecret,
    WireError,
)
from chaos_lightning.wire.frames import (
    DEFAULT_MAX_FRAME,
    KIND_BLOB,
    KIND_MESSAGE,
    MAGIC,
    PROTOCOL_VERSION,
    FrameDecoder,
    encode_frame,
    frame_header,
    read_frame,
)
from chaos_lightning.wire.schema import decode, encode, message

__all__ = [
    "AddressError",
    "AuthError",
    "BadMagic",
    "Connection",
    "ConnectionClosed",
    "DEFAULT_MAX_FRAME",
    "FrameDecoder",
    "FrameTooLarge",
    "HandshakeTimeout",
    "InsecureBind",
    "IntegrityError",
    "MIN_SECRET_BYTES",
    "ReadTimeout",
    "Secret",
    "Session",
    "WeakSecret",
    "KIND_BLOB",
    "KIND_MESSAGE",
    "MAGIC",
    "PROTOCOL_VERSION",
    "SchemaError",
    "TruncatedFrame",
    "UnknownFrameKind",
    "UnsupportedVersion",
    "WireError",
    "check_bind_allowed",
    "check_secret",
    "client_handshake",
    "decode",
    "dial",
    "encode",
    "encode_frame",
    "encrypts",
    "format_hostport",
    "frame_header",
    "load_secret",
    "message",
    "normalize_hostport",
    "open_connection",
    "parse_hostport",
    "parse_hostport_list",
    "read_frame",
    "server_handshake",
    "start_server",
]
