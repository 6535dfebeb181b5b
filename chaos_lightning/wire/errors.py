"""Errors of the wire layer: everything that can be wrong with bytes from a peer.

Every failure caused by a peer's input (bad framing, bad schema, bad secret,
an early close) is a :class:`WireError`, so the agent can catch one class per
connection, log ``str(exc)`` as one line and drop that connection while the
node keeps running.  Each class carries a default message, so even a bare
``raise ConnectionClosed()`` logs something a reader understands.
"""

from __future__ import annotations


class WireError(Exception):
    """Base class: a peer sent something this node refuses (or vanished mid-frame)."""

    default_message = "wire protocol error"

    def __init__(self, message: str | None = None) -> None:
        super().__init__(message or self.default_message)


class FrameTooLarge(WireError):
    """A frame header announced more payload than this side accepts."""

    default_message = "frame exceeds the size limit"


class TruncatedFrame(WireError):
    """The connection ended in the middle of a frame."""

    default_message = "connection closed mid-frame"


class BadMagic(WireError):
    """The bytes do not start with the frame magic: not a chaos_lightning peer."""

    default_message = "bad frame magic (not a chaos_lightning peer?)"


class UnsupportedVersion(WireError):
    """The peer speaks another protocol version."""

    default_message = "peer speaks an unsupported protocol version"


class UnknownFrameKind(WireError):
    """A frame header carries a kind this version does not define."""

    default_message = "unknown frame kind"


class SchemaError(WireError):
    """A message does not match the registered schema (or is not msgpack at all)."""

    default_message = "message does not match the schema"


class AuthError(WireError):
    """The handshake failed: wrong cluster secret, refused, or malformed."""

    default_message = "authentication failed"


class HandshakeTimeout(AuthError, TimeoutError):
    """The handshake did not finish in time.

    Both an :class:`AuthError` (it is a failed handshake) and a
    :class:`TimeoutError` (callers that retry on timeouts catch that).
    """

    default_message = "handshake timed out"


class InsecureBind(AuthError, ValueError):
    """Refusal to listen beyond loopback without a cluster secret.

    A ``ValueError`` too: it is a configuration mistake, raised before any
    socket exists.
    """

    default_message = "refusing to listen on a non-loopback address without a cluster secret"


class ConnectionClosed(WireError):
    """The peer closed the connection cleanly, at a frame boundary."""

    default_message = "peer closed the connection"


class IntegrityError(AuthError):
    """A frame after the handshake failed its tag check: injected, replayed,
    reordered, truncated or corrupted on the way.  The connection is closed."""

    default_message = "frame failed its integrity check"


class ReadTimeout(WireError, TimeoutError):
    """An authenticated peer was silent too long: idle beyond the connection's
    idle bound, or a frame's body did not follow its header in time."""

    default_message = "peer too slow"


class WeakSecret(AuthError, ValueError):
    """A cluster secret shorter than :data:`chaos_lightning.wire.auth.MIN_SECRET_BYTES`.

    A ``ValueError`` too: a configuration mistake, raised before any socket exists.
    """

    default_message = "the cluster secret is too short"
