"""Frame encryption (``CHAOS_ENCRYPT=1``, issue 15): a live server and client
through a recording TCP relay, so the test sees the bytes on the wire as an
on-path attacker does.  Encrypted, no payload byte pattern crosses in the
clear, messages and multi-MiB streamed blobs arrive intact, a flipped
ciphertext byte ends the connection, and a flipped mode flag (a downgrade)
is a refusal, never a plaintext session.  A node whose mode differs from the
cluster's is refused with a line naming ``CHAOS_ENCRYPT``, on both sides."""

from __future__ import annotations

import asyncio
import logging
import os
from collections.abc import Callable

import pytest

from chaos_lightning.wire.auth import Hello, Secret, Session, encrypts, load_secret
from chaos_lightning.wire.connection import dial, start_server
from chaos_lightning.wire.errors import AuthError, ConnectionClosed, IntegrityError, WireError
from chaos_lightning.wire.frames import HEADER_SIZE, frame_header
from test_wire import echo  # every message and blob back

pytestmark = pytest.mark.timeout(60)

RAW = b"encrypted-wire-test-secret"
PLAIN, ENCRYPTING = load_secret(RAW), load_secret(RAW, encrypt=True)
#: a payload pattern an observer would recognise
PATTERN = b"MODEL-WEIGHTS-" * 64
BLOB = os.urandom(3 << 20)[: (3 << 20) - 7] + PATTERN  # over 1 MiB: streamed in chunks


class Relay:
    """A TCP relay between a client and a server that records every byte in
    each direction and may rewrite the chunks (``tamper(direction, index, data)``)."""

    def __init__(self, target_port: int, tamper: Callable[[str, int, bytes], bytes] | None = None) -> None:
        self.target_port = target_port
        self.tamper = tamper
        self.seen = {"c2s": bytearray(), "s2c": bytearray()}
        self.server: asyncio.Server | None = None

    async def start(self) -> int:
        self.server = await asyncio.start_server(self._on_connect, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _on_connect(self, c_reader: asyncio.StreamReader, c_writer: asyncio.StreamWriter) -> None:
        s_reader, s_writer = await asyncio.open_connection("127.0.0.1", self.target_port)
        await asyncio.gather(self._pipe("c2s", c_reader, s_writer), self._pipe("s2c", s_reader, c_writer),
                             return_exceptions=True)

    async def _pipe(self, direction: str, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        index = 0
        try:
            while data := await reader.read(1 << 16):
                if self.tamper is not None:
                    data = self.tamper(direction, index, data)
                self.seen[direction] += data
                writer.write(data)
                await writer.drain()
                index += 1
        finally:
            writer.close()

    def close(self) -> None:
        assert self.server is not None
        self.server.close()


async def round_trip(secret: bytes, tamper=None) -> tuple[Relay, bytes, object]:
    server = await start_server("127.0.0.1", 0, echo, secret=secret)
    relay = Relay(server.sockets[0].getsockname()[1], tamper)
    port = await relay.start()
    try:
        conn = await dial("127.0.0.1", port, secret=secret, timeout=5)
        await conn.send_blob(BLOB)
        buf = bytearray(len(BLOB))
        await asyncio.wait_for(conn.recv_blob_into(buf, len(BLOB)), 20)
        await conn.send(Hello(2, PATTERN[:32]))  # any registered message carrying the pattern's bytes
        reply = await asyncio.wait_for(conn.recv(), 5)
        await conn.aclose()
        return relay, bytes(buf), reply
    finally:
        relay.close()
        server.close()


def test_an_encrypting_secret_hides_every_payload_and_delivers_it_intact():
    relay, blob, reply = asyncio.run(round_trip(ENCRYPTING))
    assert blob == BLOB and reply == Hello(2, PATTERN[:32])
    for direction, data in relay.seen.items():
        assert len(data) > len(BLOB), direction  # the blob crossed both ways
        assert PATTERN[:28] not in data, f"plaintext seen on the wire ({direction})"
    # the control: integrity alone sends the payload in the clear
    relay, blob, _ = asyncio.run(round_trip(PLAIN))
    assert blob == BLOB and PATTERN[:28] in relay.seen["c2s"] and PATTERN[:28] in relay.seen["s2c"]


def test_a_flipped_ciphertext_byte_ends_the_connection_before_its_plaintext_is_used(caplog):
    state = {"flipped": False}
    caplog.set_level(logging.INFO, logger="chaos_lightning.wire")

    def flip(direction: str, index: int, data: bytes) -> bytes:
        # the first chunk past the handshake's few hundred bytes that carries blob bytes
        if direction == "c2s" and not state["flipped"] and len(data) > 4096:
            state["flipped"] = True
            i = len(data) // 2
            return data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1 :]
        return data

    # the server drops the connection at the blob's tag; the client sees it closed mid-frame
    with pytest.raises((ConnectionClosed, WireError, ConnectionResetError)):
        asyncio.run(round_trip(ENCRYPTING, flip))
    assert state["flipped"]
    dropped = [r.getMessage() for r in caplog.records if "dropped connection" in r.getMessage()]
    assert any(IntegrityError.__name__ in m or "failed its integrity check" in m for m in dropped), dropped


def test_flipping_the_mode_flag_on_the_path_is_a_refusal_never_a_plaintext_session(caplog):
    """A downgrade: the relay rewrites the server's Hello to say "no encryption".
    The encrypting client refuses (its own mode is set, not negotiated), and
    no frame after the handshake is ever sent."""

    def downgrade(direction: str, index: int, data: bytes) -> bytes:
        if direction == "s2c" and index == 0:
            assert data[-1:] == b"\xc3", "Hello ends with its encrypt flag, msgpack True"
            return data[:-1] + b"\xc2"
        return data

    caplog.set_level(logging.INFO, logger="chaos_lightning.wire")
    with pytest.raises(AuthError, match="the server does not|CHAOS_ENCRYPT"):
        asyncio.run(round_trip(ENCRYPTING, downgrade))


@pytest.mark.parametrize("client, server", [(PLAIN, ENCRYPTING), (ENCRYPTING, PLAIN)])
def test_a_node_whose_mode_differs_is_refused_with_a_line_naming_the_setting(client, server, caplog):
    async def main() -> None:
        srv = await start_server("127.0.0.1", 0, echo, secret=server)
        port = srv.sockets[0].getsockname()[1]
        try:
            with pytest.raises(AuthError, match="CHAOS_ENCRYPT alike on every node"):
                await dial("127.0.0.1", port, secret=client, timeout=5)
            # the server keeps serving nodes of its own mode
            conn = await dial("127.0.0.1", port, secret=server, timeout=5)
            await conn.send_blob(b"still here")
            assert await asyncio.wait_for(conn.recv(), 5) == b"still here"
            await conn.aclose()
            await asyncio.sleep(0.05)
        finally:
            srv.close()

    caplog.set_level(logging.INFO, logger="chaos_lightning.wire")
    asyncio.run(main())
    refusals = [r.getMessage() for r in caplog.records if "refused connection" in r.getMessage()]
    assert any("CHAOS_ENCRYPT" in m for m in refusals), refusals


def test_the_cipher_is_one_stream_per_direction_and_keyed_per_connection():
    ns, nc = b"s" * 32, b"c" * 32
    client = Session.derive(RAW, ns, nc, client=True, encrypt=True)
    server = Session.derive(RAW, ns, nc, client=False, encrypt=True)
    header = frame_header(len(PATTERN))
    first, tag1 = client.seal(header, PATTERN)
    second, tag2 = client.seal(header, PATTERN)
    assert first != PATTERN and second != first, "the keystream moves on: equal payloads, unequal ciphertexts"
    for body, tag in ((first, tag1), (second, tag2)):
        h = server.opener(header)
        h.update(body)
        server.verify(h, tag)
        assert server.decipher(body) == PATTERN
    # the other direction has its own key, and so does another connection
    back, _ = server.seal(header, PATTERN)
    other, _ = Session.derive(RAW, ns, b"d" * 32, client=True, encrypt=True).seal(header, PATTERN)
    assert len({bytes(first), bytes(back), bytes(other)}) == 3
    # the plain session's keys are not the encrypted one's: the mode is in the derivation
    plain_tag = Session.derive(RAW, ns, nc, client=True).seal(header, first)[1]
    assert plain_tag != tag1


def test_the_mode_travels_with_the_secret():
    assert isinstance(ENCRYPTING, Secret) and encrypts(ENCRYPTING) and ENCRYPTING == RAW
    assert not encrypts(PLAIN) and not encrypts(None)
    assert RAW.decode() not in repr(ENCRYPTING)
    assert encrypts(load_secret(ENCRYPTING)) and not encrypts(load_secret(ENCRYPTING, encrypt=False))
    with pytest.raises(ValueError, match="needs the cluster secret"):
        load_secret(None, encrypt=True)
    assert HEADER_SIZE == 8
