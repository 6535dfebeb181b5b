"""Authentication: a mutual HMAC challenge–response on every connection.

Every connection starts with this handshake, before any message is decoded,
so a stranger's bytes reach nothing but a 4 KiB frame reader and three tiny
message types.  Both sides prove they hold the shared cluster secret without
sending it::

    server -> client   Hello(version, nonce_s)                  32 random bytes
    client -> server   ClientProof(version, nonce_c,
                           HMAC(key, "client" | nonce_s | nonce_c))
    server -> client   ServerProof(HMAC(key, "server" | nonce_c | nonce_s))
                       or Refused(reason)

Fresh nonces on both sides defeat replay; the "client"/"server" prefixes stop a
peer from reflecting one side's proof back at it.  The secret is never on the
wire, and the comparison is constant-time (``hmac.compare_digest``).

Every frame after the handshake carries a tag (:class:`Session`): both sides
derive two 32-byte frame keys, one per direction, with HKDF-SHA256 (RFC 5869,
built from ``hmac``/``hashlib``) from the secret, salted with both nonces.
Each frame is authenticated with Poly1305 under a one-time key, the next 32
bytes of a ChaCha20 keystream under the direction's key (the MAC of RFC
8439's AEAD, without its cipher)::

    okm = HKDF(ikm=secret, salt=nonce_s | nonce_c, info="chaos_lightning/wire/v4 frame keys", 64)
    key_c2s, key_s2c = okm[:32], okm[32:]
    otk_n = ChaCha20(key_dir, counter=0, nonce=0) keystream bytes [32n, 32n + 32)
    tag = Poly1305(otk_n, seq (u64 BE) | header (8 bytes) | payload)         16 bytes

``seq`` (= n) counts the frames sent in that direction from 0 and is not
sent: the receiver checks the tag against the number it expects, so a frame
injected, replayed (from this or any other connection: fresh nonces, fresh
keys), reordered, dropped or altered fails its check and ends the connection
(:class:`~chaos_lightning.wire.errors.IntegrityError`).  One key per
direction means a frame cannot be reflected back to its sender.  Why
Poly1305 and not HMAC-SHA-256 (protocol 3): the tag is computed over every
byte on both ends, and a state pull is hundreds of megabytes.  Measured here
(2026-12-08, SHA extensions on): HMAC-SHA-256 1.8 GB/s, Poly1305 10.8 GB/s;
a 200 MB pull from one source took 0.32-0.35 s with HMAC and 0.18-0.23 s
with no body tag at all, the bound this approaches.  A one-time key per
frame is what Poly1305's security needs (a forgery succeeds with probability
at most 8 * ceil(L / 16) / 2**106 for an L-byte frame); the keystream's
32-bit block counter gives a connection 2**33 frames, and :meth:`Session.seal`
refuses the frame after the last.

Encryption (optional, for clusters across a WAN).  A :class:`Secret` with
``encrypt=True`` (``CHAOS_ENCRYPT=1``) also encrypts every frame's payload
after the handshake with ChaCha20 (from ``cryptography``, as the tags' keys:
the standard library has neither), encrypt-then-MAC::

    okm = HKDF(ikm=secret, salt=nonce_s | nonce_c, info="chaos_lightning/wire/v4 frame keys+chacha20", 128)
    mac_c2s, mac_s2c, enc_c2s, enc_s2c = okm[0:32], okm[32:64], okm[64:96], okm[96:128]
    body = ChaCha20(enc_dir, nonce=0) keystream XOR payload   (one stream per direction)
    tag  = Poly1305(otk_n from mac_dir, seq | header | body)

Each direction's cipher is one keystream over the connection's payloads in
order (the key is fresh per connection and direction, so the zero nonce is
never reused).  The receiver checks the tag over the ciphertext before it
uses the plaintext (a streamed blob is deciphered as it arrives, and the
caller may use the buffer only once the tag has passed).  Headers (kind and
length) stay in the clear.  Both ends must agree: each announces its mode in
the handshake (``Hello.encrypt``, ``ClientProof.encrypt``), a mismatch is
refused with a line naming ``CHAOS_ENCRYPT``, and in encrypted mode the mode
is inside both proofs' MACs and the key derivation, so an on-path attacker
who flips the flag gets a refusal, never a plaintext session.  What it does
not cover: gloo's own traffic (the gradient all-reduce), which has no
encryption of its own (``docs/security.md``).

Without a secret, the same handshake runs with a fixed, public key: that
proves nothing, so :func:`check_bind_allowed` only lets a secret-less node
listen on loopback, while keeping one code path for tests and production.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import ipaddress
import secrets
import struct
from dataclasses import dataclass
from typing import Any

from chaos_lightning.wire import schema

from chaos_lightning.wire.errors import (
    AuthError,
    HandshakeTimeout,
    InsecureBind,
    IntegrityError,
    UnsupportedVersion,
    WeakSecret,
    WireError,
)
from chaos_lightning.wire.frames import KIND_MESSAGE, PROTOCOL_VERSION, encode_frame, read_frame

#: The variable that holds the cluster secret, named in error messages only
#: (this layer reads no environment: see :func:`load_secret`).
SECRET_ENV = "CHAOS_SECRET"

#: Handshake frames are under 200 bytes; a stranger gets no bigger buffer than this.
HANDSHAKE_MAX_FRAME = 4096

NONCE_SIZE = 32

#: The shortest cluster secret accepted (:func:`load_secret`,
#: ``chaos_lightning.config``): 16 bytes, 128 bits if random.
MIN_SECRET_BYTES = 16

#: Bytes of the tag after every frame's payload once the handshake is done.
TAG_SIZE = 16

_HKDF_INFO = b"chaos_lightning/wire/v4 frame keys"
_HKDF_INFO_ENCRYPTED = b"chaos_lightning/wire/v4 frame keys+chacha20"

#: Frames one connection may carry each way: the one-time keys' ChaCha20
#: keystream has a 32-bit block counter (64-byte blocks, two keys a block).
MAX_FRAMES = 1 << 33

_ZERO_KEY = bytes(32)

#: The variable that turns frame encryption on, named in error messages only.
ENCRYPT_ENV = "CHAOS_ENCRYPT"

#: The key used when no secret is configured (loopback only): public on purpose.
_NO_SECRET_KEY = b"chaos_lightning/no-secret/v1"


@schema.message("wire.hello")
@dataclass(frozen=True)
class Hello:
    version: int
    nonce: bytes
    #: the server encrypts frames (appended field: a peer without it means False)
    encrypt: bool = False


@schema.message("wire.client_proof")
@dataclass(frozen=True)
class ClientProof:
    version: int
    nonce: bytes
    mac: bytes
    encrypt: bool = False


@schema.message("wire.server_proof")
@dataclass(frozen=True)
class ServerProof:
    mac: bytes


@schema.message("wire.refused")
@dataclass(frozen=True)
class Refused:
    reason: str


class Secret(bytes):
    """The cluster secret's bytes, and whether frames are encrypted with it.

    The mode travels with the secret, so every component handed the secret
    (the agent, the shard server and its pulls, the process-group store, the
    status queries) speaks the same mode without a second parameter to
    thread; a plain ``bytes`` secret means integrity only.  Its ``repr``
    never shows the bytes.  Build one with :func:`load_secret`.
    """

    encrypt: bool

    def __new__(cls, value: bytes, *, encrypt: bool = False) -> Secret:
        self = super().__new__(cls, value)
        self.encrypt = bool(encrypt)
        return self

    def __repr__(self) -> str:
        return f"<Secret of {len(self)} bytes{', encrypting' if self.encrypt else ''}>"

    def __reduce__(self) -> tuple:  # pickling keeps the mode (a bytes subclass would drop it)
        return (_make_secret, (bytes(self), self.encrypt))


def _make_secret(value: bytes, encrypt: bool) -> Secret:
    return Secret(value, encrypt=encrypt)


def encrypts(secret: bytes | str | None) -> bool:
    """Whether connections made with ``secret`` encrypt their frames."""
    return bool(getattr(secret, "encrypt", False))


def _primitives() -> tuple[Any, Any, Any]:
    """``(Cipher, algorithms, poly1305)`` from ``cryptography`` (imported with
    this module: 18 ms warm, 66 ms cold here), with what to install if it is
    missing."""
    try:
        from cryptography.hazmat.primitives import poly1305
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms
    except ImportError as exc:
        raise ImportError(
            "chaos_lightning's wire needs the 'cryptography' package (its frame tags and cipher): "
            "pip install 'cryptography>=41'"
        ) from exc
    return Cipher, algorithms, poly1305


try:
    # with this module, not on the first connection: imported lazily, it
    # landed inside a fresh joiner's first pull, in the handshakes with its
    # sources and theirs (tests/test_replication_testbed.py's shaped pull
    # from four sources took 1.98-2.78 s against 1.71 s with HMAC tags, and
    # 1.79-1.85 s imported here, 2026-12-08)
    _primitives()
except ImportError:
    pass  # said with what to install at the first session


def check_encryption_available() -> None:
    """Raise ``ImportError`` with what to install when the cipher's package is missing."""
    _primitives()


def load_secret(value: str | bytes | None = None, *, encrypt: bool | None = None) -> bytes | None:
    """The cluster secret as bytes: ``value`` UTF-8 encoded if text, ``None`` if unset.

    ``encrypt=True`` returns a :class:`Secret` that encrypts frames
    (``ValueError`` without a secret: a public key hides nothing;
    ``ImportError`` without ``cryptography``); ``None`` keeps the mode of a
    :class:`Secret` passed in (plain for anything else).

    It never reads the environment: ``CHAOS_SECRET`` is read once, by
    :class:`chaos_lightning.config.NodeConfig` or a CLI, and passed down.  An
    empty value counts as unset here, so that an empty string cannot silently
    mean "the empty secret" (``NodeConfig`` refuses it with an error).
    A secret shorter than :data:`MIN_SECRET_BYTES` is refused
    (:class:`~chaos_lightning.wire.errors.WeakSecret`, a ``ValueError``).
    """
    if encrypt is None:
        encrypt = encrypts(value)
    if not value:
        if encrypt:
            raise ValueError(f"frame encryption ({ENCRYPT_ENV}=1) needs the cluster secret ({SECRET_ENV})")
        return None
    secret = value.encode("utf-8") if isinstance(value, str) else bytes(value)
    check_secret(secret)
    if encrypt:
        check_encryption_available()
        return Secret(secret, encrypt=True)
    return secret


def check_secret(secret: bytes | None, name: str = SECRET_ENV) -> None:
    """Raise :class:`WeakSecret` if ``secret`` is set and shorter than :data:`MIN_SECRET_BYTES`.

    The message names the length, never the secret.
    """
    if secret is not None and len(secret) < MIN_SECRET_BYTES:
        raise WeakSecret(
            f"the cluster secret ({name}) is {len(secret)} bytes; at least {MIN_SECRET_BYTES} are required "
            f"(e.g. python -c 'import secrets; print(secrets.token_hex(16))')"
        )


def is_loopback(host: str) -> bool:
    """True for ``localhost``, 127.0.0.0/8 and ::1 (bracketed or IPv4-mapped too)."""
    host = host.strip().strip("[]")
    if host.lower() == "localhost":
        return True
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return False  # any other name may resolve to anything
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        addr = addr.ipv4_mapped
    return addr.is_loopback


def check_bind_allowed(host: str, secret: bytes | None) -> None:
    """Refuse (``InsecureBind``, a ``ValueError``) to listen beyond loopback without a secret.

    "" and "0.0.0.0" mean every interface, so they count as non-loopback.
    """
    if secret is None and not is_loopback(host):
        shown = host or "all interfaces"
        raise InsecureBind(
            f"refusing to listen on {shown} without a cluster secret: set {SECRET_ENV} or pass secret="
        )


def _key(secret: bytes | str | None) -> bytes:
    if isinstance(secret, str):  # tolerate a secret passed as text
        secret = secret.encode("utf-8")
    return bytes(secret) if secret else _NO_SECRET_KEY


def _mac(key: bytes, role: bytes, first: bytes, second: bytes, encrypt: bool = False) -> bytes:
    # the encrypted mode is bound into the proof (plain proofs are as in protocol 2)
    return hmac.new(key, role + first + second + (b"+chacha20" if encrypt else b""), hashlib.sha256).digest()


def hkdf_sha256(ikm: bytes, salt: bytes, info: bytes, length: int) -> bytes:
    """HKDF (RFC 5869) with SHA-256: extract, then expand to ``length`` bytes."""
    if length > 255 * 32:
        raise ValueError("HKDF-SHA256 output is at most 8160 bytes")
    prk = hmac.new(salt, ikm, hashlib.sha256).digest()
    out, block, counter = b"", b"", 1
    while len(out) < length:
        block = hmac.new(prk, block + info + bytes([counter]), hashlib.sha256).digest()
        out += block
        counter += 1
    return out[:length]


_SEQ = struct.Struct("!Q")


class Session:
    """The frame keys and sequence numbers of one authenticated connection.

    :meth:`seal` enciphers the next outgoing frame's payload (when the
    session encrypts) and returns it with its tag (and counts the frame);
    :meth:`opener` starts the check of the next incoming frame from its
    header (feed the payload *as received* to the returned MAC, in pieces if
    it streams), :meth:`verify` finishes it, and :meth:`decipher` turns the
    received payload into plaintext, in order, piece by piece (the identity
    when the session does not encrypt).  Not thread-safe; one event loop per
    connection.
    """

    def __init__(self, send_key: bytes, recv_key: bytes,
                 send_cipher_key: bytes | None = None, recv_cipher_key: bytes | None = None) -> None:
        cipher, algorithms, self._poly1305 = _primitives()
        zero = bytes(16)  # 32-bit block counter and 96-bit nonce: the keys are per connection and direction
        # the one-time Poly1305 keys: frame n's is the keystream's n-th 32 bytes
        self._send_otk = cipher(algorithms.ChaCha20(send_key, zero), mode=None).encryptor()
        self._recv_otk = cipher(algorithms.ChaCha20(recv_key, zero), mode=None).encryptor()
        self._opened: tuple[int, bytes] | None = None  # (seq, key) drawn for the frame being received
        self.send_seq = 0
        self.recv_seq = 0
        self._encryptor = self._decryptor = None
        if send_cipher_key is not None and recv_cipher_key is not None:
            self._encryptor = cipher(algorithms.ChaCha20(send_cipher_key, zero), mode=None).encryptor()
            self._decryptor = cipher(algorithms.ChaCha20(recv_cipher_key, zero), mode=None).decryptor()

    @property
    def encrypts(self) -> bool:
        return self._encryptor is not None

    @classmethod
    def derive(cls, key: bytes, nonce_s: bytes, nonce_c: bytes, *, client: bool, encrypt: bool = False) -> Session:
        if not encrypt:
            okm = hkdf_sha256(key, nonce_s + nonce_c, _HKDF_INFO, 64)
            c2s, s2c = okm[:32], okm[32:]
            return cls(c2s, s2c) if client else cls(s2c, c2s)
        okm = hkdf_sha256(key, nonce_s + nonce_c, _HKDF_INFO_ENCRYPTED, 128)
        c2s, s2c, e_c2s, e_s2c = okm[:32], okm[32:64], okm[64:96], okm[96:]
        return cls(c2s, s2c, e_c2s, e_s2c) if client else cls(s2c, c2s, e_s2c, e_c2s)

    def seal(self, header: bytes, payload: bytes | memoryview) -> tuple[bytes | memoryview, bytes]:
        """``(body, tag)`` of the next outgoing frame: ``body`` is ``payload``
        itself (not copied) or, when encrypting, its ciphertext."""
        if self.send_seq >= MAX_FRAMES:
            raise WireError(f"this connection has sent {MAX_FRAMES} frames, its tags' keystream is spent: reconnect")
        body = self._encryptor.update(payload) if self._encryptor is not None else payload
        h = self._poly1305.Poly1305(self._send_otk.update(_ZERO_KEY))
        h.update(_SEQ.pack(self.send_seq))
        h.update(header)
        h.update(body)
        self.send_seq += 1
        return body, h.finalize()

    def opener(self, header: bytes) -> Any:
        """The MAC of the next incoming frame, fed its sequence number and
        ``header``.  Opening the same frame again (nothing verified between)
        reuses its one-time key: keys are drawn once per frame, in order."""
        if self._opened is None or self._opened[0] != self.recv_seq:
            if self.recv_seq >= MAX_FRAMES:
                raise IntegrityError(f"frame {self.recv_seq} is past the {MAX_FRAMES} a connection may carry")
            self._opened = (self.recv_seq, self._recv_otk.update(_ZERO_KEY))
        h = self._poly1305.Poly1305(self._opened[1])
        h.update(_SEQ.pack(self.recv_seq))
        h.update(header)
        return h

    def verify(self, h: Any, tag: bytes) -> None:
        try:
            h.verify(bytes(tag))  # constant-time
        except Exception:  # cryptography's InvalidSignature (or a tag of the wrong length)
            raise IntegrityError(
                f"frame {self.recv_seq} failed its integrity check (injected, replayed, reordered or corrupted)"
            ) from None
        self.recv_seq += 1

    def decipher(self, body: bytes) -> bytes:
        """The plaintext of the next received payload bytes (``body`` itself when not encrypting)."""
        return self._decryptor.update(body) if self._decryptor is not None else body


async def _send(writer: asyncio.StreamWriter, msg: object) -> None:
    writer.write(encode_frame(schema.encode(msg), KIND_MESSAGE))
    await writer.drain()


async def _recv(reader: asyncio.StreamReader, expected: type, *also: type) -> object:
    kind, payload = await read_frame(reader, HANDSHAKE_MAX_FRAME)
    if kind != KIND_MESSAGE:
        raise AuthError("peer sent a blob during the handshake")
    msg = schema.decode(payload)
    if not isinstance(msg, (expected, *also)):
        raise AuthError(f"expected {schema.tag_of(expected)!r} during the handshake, got {schema.tag_of(type(msg))!r}")
    return msg


def _check_nonce(nonce: bytes) -> None:
    if len(nonce) != NONCE_SIZE:
        raise AuthError(f"handshake nonce of {len(nonce)} bytes, expected {NONCE_SIZE}")


async def _bounded(coro: object, timeout: float, side: str) -> Session:
    try:
        return await asyncio.wait_for(coro, timeout)  # type: ignore[arg-type]
    except asyncio.TimeoutError:  # the builtin TimeoutError from 3.11 on
        raise HandshakeTimeout(f"{side} handshake timed out after {timeout:g}s") from None


async def server_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes | None, timeout: float
) -> Session:
    """Authenticate the connecting peer and prove our own secret, within ``timeout`` seconds.

    Returns the connection's :class:`Session` (frame keys).  Raises :class:`AuthError` (wrong secret, malformed, timed out) or another
    :class:`WireError`; on a refusal the peer is told why, when it can be.
    """
    return await _bounded(_server(reader, writer, _key(secret), encrypts(secret)), timeout, "server")


def _mode_mismatch(ours: bool, theirs: bool, peer: str) -> AuthError:
    if ours:
        return AuthError(f"this node encrypts its frames ({ENCRYPT_ENV}=1) and the {peer} does not: "
                         f"set {ENCRYPT_ENV} alike on every node")
    return AuthError(f"the {peer} encrypts its frames ({ENCRYPT_ENV}=1) and this node does not: "
                     f"set {ENCRYPT_ENV} alike on every node")


async def _server(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes, encrypt: bool) -> Session:
    nonce_s = secrets.token_bytes(NONCE_SIZE)
    await _send(writer, Hello(PROTOCOL_VERSION, nonce_s, encrypt))
    try:
        proof = await _recv(reader, ClientProof)
        assert isinstance(proof, ClientProof)
        if proof.version != PROTOCOL_VERSION:
            raise UnsupportedVersion(f"peer speaks protocol {proof.version}, this agent speaks {PROTOCOL_VERSION}")
        _check_nonce(proof.nonce)
        if proof.encrypt != encrypt:
            raise _mode_mismatch(encrypt, proof.encrypt, "client")
        if not hmac.compare_digest(proof.mac, _mac(key, b"client", nonce_s, proof.nonce, encrypt)):
            raise AuthError("wrong cluster secret")
    except WireError as exc:
        await _refuse(writer, exc)
        raise
    await _send(writer, ServerProof(_mac(key, b"server", proof.nonce, nonce_s, encrypt)))
    return Session.derive(key, nonce_s, proof.nonce, client=False, encrypt=encrypt)


async def _refuse(writer: asyncio.StreamWriter, exc: WireError) -> None:
    """Tell the peer why, best effort: it may be gone, or not speak our protocol at all."""
    if isinstance(exc, UnsupportedVersion):
        reason = f"this agent speaks protocol {PROTOCOL_VERSION}"
    else:
        reason = str(exc)
    try:
        await asyncio.wait_for(_send(writer, Refused(reason[:500])), 1.0)
    except (OSError, asyncio.TimeoutError, WireError):
        pass


async def client_handshake(
    reader: asyncio.StreamReader, writer: asyncio.StreamWriter, secret: bytes | None, timeout: float
) -> Session:
    """Prove our secret to the server and check its proof, within ``timeout`` seconds; the :class:`Session`."""
    return await _bounded(_client(reader, writer, _key(secret), encrypts(secret)), timeout, "client")


async def _client(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, key: bytes, encrypt: bool) -> Session:
    hello = await _recv(reader, Hello, Refused)
    if isinstance(hello, Refused):
        raise AuthError(f"server refused the connection: {hello.reason}")
    assert isinstance(hello, Hello)
    if hello.version != PROTOCOL_VERSION:
        raise UnsupportedVersion(f"peer speaks protocol {hello.version}, this agent speaks {PROTOCOL_VERSION}")
    _check_nonce(hello.nonce)
    nonce_c = secrets.token_bytes(NONCE_SIZE)
    await _send(writer, ClientProof(PROTOCOL_VERSION, nonce_c, _mac(key, b"client", hello.nonce, nonce_c, encrypt), encrypt))
    if hello.encrypt != encrypt:
        # the proof went out so that the server logs the mismatch too (a proof reveals nothing)
        raise _mode_mismatch(encrypt, hello.encrypt, "server")
    answer = await _recv(reader, ServerProof, Refused)
    if isinstance(answer, Refused):
        raise AuthError(f"server refused the connection: {answer.reason}")
    assert isinstance(answer, ServerProof)
    if not hmac.compare_digest(answer.mac, _mac(key, b"server", nonce_c, hello.nonce, encrypt)):
        # The server accepted our proof without knowing the key: an impostor.
        raise AuthError("wrong cluster secret: the server could not prove it holds the cluster secret")
    return Session.derive(key, hello.nonce, nonce_c, client=True, encrypt=encrypt)
