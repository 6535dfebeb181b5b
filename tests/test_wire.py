"""Scenarios for the wire layer: framing, schema, handshake, and a live server
that keeps serving good peers while strangers send it garbage."""

from __future__ import annotations

import asyncio
import logging
import os
import random
import struct
import time
from dataclasses import dataclass, field
from typing import Any

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos_lightning.membership.view import Member, View
from chaos_lightning.wire import schema
from chaos_lightning.wire.auth import check_bind_allowed, load_secret
from chaos_lightning.wire.connection import Connection, open_connection, start_server
from chaos_lightning.wire.errors import (
    AuthError,
    BadMagic,
    ConnectionClosed,
    FrameTooLarge,
    HandshakeTimeout,
    InsecureBind,
    SchemaError,
    TruncatedFrame,
    UnknownFrameKind,
    UnsupportedVersion,
    WireError,
)
from chaos_lightning.wire.frames import (
    KIND_BLOB,
    KIND_MESSAGE,
    MAGIC,
    PROTOCOL_VERSION as V,
    FrameDecoder,
    encode_frame,
    frame_header,
    read_frame,
)
from chaos_lightning.wire.schema import decode, encode, message

pytestmark = pytest.mark.timeout(30)

SECRET = b"correct horse battery staple"


# -- test messages -------------------------------------------------------------------------


@message("test.scalars")
@dataclass(frozen=True)
class Scalars:
    i: int
    f: float
    b: bool
    s: str
    raw: bytes
    nothing: None = None
    maybe: int | None = None


@message("test.containers")
@dataclass(frozen=True)
class Containers:
    names: tuple[str, ...] = ()
    pair: tuple[int, str] = (0, "")
    scores: dict[str, float] = field(default_factory=dict)
    views: tuple[View, ...] = ()
    anything: object | None = None
    nested: tuple[tuple[int, ...], ...] = ()


@message("test.envelope")
@dataclass(frozen=True)
class Envelope:
    """An ``Any`` payload: it can carry any message, itself included."""

    seq: int
    body: Any | None = None


@message("test.kwonly")
@dataclass(frozen=True, kw_only=True)
class KwOnly:
    a: int
    b: str = "x"


def a_view(n: int = 3, epoch: int = 7) -> View:
    members = tuple(Member(f"n{i}", f"127.0.0.1:{9000 + i}", (("store", str(29500 + i)),)) for i in range(n))
    return View(epoch, members, (("n0", "n1"),) if n > 1 else ())


# -- schema: round trips --------------------------------------------------------------------


def test_member_and_view_round_trip_and_stay_hashable():
    view = a_view(5)
    assert view.rank("n3") == 3  # fills the cached_property: must not be encoded
    data = encode(view)
    back = decode(data)
    assert back == view and type(back) is View
    assert hash(back) == hash(view)
    assert back.rank("n3") == 3 and back.link_up("n2", "n3") and not back.link_up("n1", "n0")
    assert isinstance(back.members, tuple) and isinstance(back.down_links[0], tuple)
    assert encode(back) == data  # deterministic: equal messages, equal bytes
    assert decode(encode(Member("solo"))) == Member("solo")


def test_ad_hoc_messages_round_trip():
    msgs = [
        Scalars(1, 2.5, True, "é", b"\x00\xff", None, 3),
        Scalars(-(2**63), float("inf"), False, "", b"", maybe=None),
        Containers(("a", "b"), (4, "four"), {"x": 1.0, "y": -2.0}, (a_view(2),), Member("m"), ((1, 2), ())),
        Containers(anything=Envelope(1, Envelope(2, a_view(1)))),
        KwOnly(a=5),
    ]
    for msg in msgs:
        assert decode(encode(msg)) == msg


def test_ints_are_accepted_for_floats_but_bools_and_ints_never_confused():
    ok = decode(msgpack.packb(["test.scalars", [1, 2, True, "s", b""]]))
    assert ok.f == 2.0 and type(ok.f) is float
    with pytest.raises(SchemaError, match=r"test\.scalars\.i: expected int, got bool"):
        decode(msgpack.packb(["test.scalars", [True, 2.0, True, "s", b""]]))
    with pytest.raises(SchemaError, match=r"test\.scalars\.b: expected bool, got int"):
        decode(msgpack.packb(["test.scalars", [1, 2.0, 1, "s", b""]]))
    with pytest.raises(SchemaError, match=r"test\.scalars\.f: expected float, got bool"):
        decode(msgpack.packb(["test.scalars", [1, False, True, "s", b""]]))
    with pytest.raises(SchemaError, match="expected int, got bool"):
        encode(Scalars(True, 1.0, True, "s", b""))


def test_schema_refusals_name_the_tag_and_field():
    cases = {
        "unknown message tag 'test.nope'": ["test.nope", []],
        "view.members": ["view", [1, "not a tuple"]],
        r"view.members\[0\].id: expected str, got int": ["view", [1, [["member", [5]]]]],
        r"view.down_links\[0\]: expected an array of 2": ["view", [1, [], [["a"]]]],
        "expected a 'member' message, got 'view'": ["view", [1, [["view", [1, []]]]]],
        "missing field 'members'": ["view", [1]],
        "8 fields, this version knows 7": ["test.scalars", [1, 1.0, True, "", b"", None, None, "extra"]],
        "expected str keys": ["test.containers", [[], [0, ""], {b"k": 1.0}]],
        r"test.containers.anything: unknown message tag 'x'": ["test.containers", [[], [0, ""], {}, [], ["x", []]]],
        "not a message": [1, 2, 3],
    }
    for text, obj in cases.items():
        with pytest.raises(SchemaError, match=text):
            decode(msgpack.packb(obj))


def test_missing_trailing_fields_take_defaults_and_extra_fields_are_refused():
    # An older peer that did not know the last two fields yet.
    assert decode(msgpack.packb(["test.scalars", [1, 1.0, True, "", b""]])) == Scalars(1, 1.0, True, "", b"")
    with pytest.raises(SchemaError, match="missing field 'raw'"):
        decode(msgpack.packb(["test.scalars", [1, 1.0, True, ""]]))
    with pytest.raises(SchemaError, match="this version knows"):
        decode(msgpack.packb(["test.scalars", [1, 1.0, True, "", b"", None, None, None]]))


def test_hostile_msgpack_is_refused_cheaply():
    deep = b"\x91" * 100_000 + b"\xc0"  # 100k nested arrays
    huge_array = b"\xdd\xff\xff\xff\xff"  # announces 4 G elements in 5 bytes
    huge_str = b"\xdb\xff\xff\xff\xff"
    ext = msgpack.packb(msgpack.ExtType(1, b"abc"))
    for data in (b"", b"\xc1", deep, huge_array, huge_str, ext, encode(Member("a")) + b"\x00"):
        with pytest.raises(SchemaError):
            decode(data)
    # A chain of Any fields deeper than MAX_DEPTH, valid msgpack all the way down.
    obj: list = ["test.envelope", [0, None]]
    for i in range(schema.MAX_DEPTH + 5):
        obj = ["test.envelope", [i, obj]]
    with pytest.raises(SchemaError, match="nested deeper"):
        decode(msgpack.packb(obj))


def test_registration_mistakes_fail_loudly():
    with pytest.raises(ValueError, match="already registered"):

        @message("member")
        @dataclass(frozen=True)
        class Impostor:
            id: str

    with pytest.raises(TypeError, match="unsupported annotation"):

        @message("test.bad_annotation")
        @dataclass(frozen=True)
        class BadAnnotation:
            things: list[int]

    with pytest.raises(TypeError, match="default None does not fit"):

        @message("test.bad_default")
        @dataclass(frozen=True)
        class BadDefault:
            body: object = None  # must be `object | None`

    assert "test.bad_annotation" not in schema.registered()
    assert "test.bad_default" not in schema.registered()
    with pytest.raises(SchemaError, match="not a registered message"):
        encode(object())


# -- schema: hypothesis ---------------------------------------------------------------------

msgpack_values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20)
    | st.binary(max_size=20)
    | st.sampled_from(sorted(schema.registered())),
    lambda children: st.lists(children, max_size=5) | st.dictionaries(st.text(max_size=5), children, max_size=5),
    max_leaves=30,
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(tag=st.sampled_from(sorted(schema.registered())), fields=st.lists(msgpack_values, max_size=7))
def test_any_structure_under_a_valid_tag_is_a_valid_message_or_a_schema_error(tag, fields):
    try:
        msg = decode(msgpack.packb([tag, fields], use_bin_type=True))
    except SchemaError:
        return
    assert schema.tag_of(type(msg)) == tag
    assert decode(encode(msg)) == msg


@settings(max_examples=300, deadline=None)
@given(st.binary(max_size=200))
def test_arbitrary_bytes_to_schema_decode_only_raise_schema_error(data):
    try:
        decode(data)
    except SchemaError:
        pass


# -- frames ---------------------------------------------------------------------------------


def test_frame_decoder_reassembles_frames_fed_byte_by_byte():
    payloads = [(KIND_MESSAGE, encode(a_view())), (KIND_BLOB, b""), (KIND_BLOB, os.urandom(1000))]
    stream = b"".join(encode_frame(p, k) for k, p in payloads)
    dec = FrameDecoder()
    got = []
    for i in range(len(stream)):
        got += dec.feed(stream[i : i + 1])
    dec.eof()
    assert got == payloads
    assert decode(got[0][1]) == a_view()


def test_frame_decoder_refusals():
    header = struct.Struct("!2sBBI")
    cases = [
        (b"GET / HTTP/1.1\r\n", BadMagic, "not a chaos_lightning peer"),
        (b"X", BadMagic, "bad frame magic"),  # refused from its first byte
        (header.pack(MAGIC, V + 1, 0, 5), UnsupportedVersion, f"peer speaks protocol {V + 1}, this agent speaks {V}"),
        (header.pack(MAGIC, 1, 0, 5), UnsupportedVersion, f"peer speaks protocol 1, this agent speaks {V}"),
        (header.pack(MAGIC, V, 9, 5), UnknownFrameKind, "unknown frame kind 9"),
        (header.pack(MAGIC, V, 0, 2**32 - 1), FrameTooLarge, "exceeds the limit"),
    ]
    for data, error, text in cases:
        dec = FrameDecoder(max_size=1024)
        with pytest.raises(error, match=text):
            dec.feed(data)
        assert dec.buffered == 0
        with pytest.raises(error):  # sticky
            dec.feed(encode_frame(b"ok"))


def test_frame_decoder_detects_truncation_at_eof_and_returns_good_frames_first():
    dec = FrameDecoder()
    assert dec.feed(encode_frame(b"abc") + encode_frame(b"defgh")[:-2]) == [(KIND_MESSAGE, b"abc")]
    with pytest.raises(TruncatedFrame, match="got 3 of 5 payload bytes"):
        dec.eof()
    dec = FrameDecoder()
    dec.feed(b"CL" + bytes([V]))
    with pytest.raises(TruncatedFrame, match="header"):
        dec.eof()
    dec = FrameDecoder()
    assert dec.feed(encode_frame(b"abc") + b"BAD") == [(KIND_MESSAGE, b"abc")]
    with pytest.raises(BadMagic):
        dec.feed(b"")


def test_oversized_header_is_refused_before_the_payload_is_buffered():
    dec = FrameDecoder(max_size=100)
    with pytest.raises(FrameTooLarge, match="101 bytes exceeds the limit of 100"):
        dec.feed(frame_header(101))
    assert dec.buffered == 0


@settings(max_examples=300, deadline=None)
@given(st.lists(st.binary(max_size=64) | st.builds(encode_frame, st.binary(max_size=40)), max_size=8))
def test_arbitrary_bytes_and_frames_only_raise_wire_errors(chunks):
    dec = FrameDecoder(max_size=4096)
    try:
        for chunk in chunks:
            for kind, payload in dec.feed(chunk):
                assert kind in (KIND_MESSAGE, KIND_BLOB)
                try:
                    decode(payload)
                except SchemaError:
                    pass
        dec.eof()
    except WireError:
        pass


def reader_with(data: bytes) -> asyncio.StreamReader:
    reader = asyncio.StreamReader()
    reader.feed_data(data)
    reader.feed_eof()
    return reader


def test_read_frame_errors():
    async def scenario() -> None:
        assert await read_frame(reader_with(encode_frame(b"hi", KIND_BLOB))) == (KIND_BLOB, b"hi")
        with pytest.raises(ConnectionClosed):
            await read_frame(reader_with(b""))
        with pytest.raises(TruncatedFrame, match="header"):
            await read_frame(reader_with(b"CL" + bytes([V, 0])))
        with pytest.raises(TruncatedFrame, match="got 2 of 10 payload bytes"):
            await read_frame(reader_with(frame_header(10) + b"ab"))
        with pytest.raises(BadMagic):
            await read_frame(reader_with(b"zz"))
        with pytest.raises(UnsupportedVersion, match=f"protocol {V + 1}"):
            await read_frame(reader_with(b"CL" + bytes([V + 1]) + b"\x00\x00\x00\x00\x00"))
        with pytest.raises(FrameTooLarge):
            await read_frame(reader_with(frame_header(5000)), max_size=4096)

    asyncio.run(asyncio.wait_for(scenario(), 10))


# -- auth configuration ---------------------------------------------------------------------


def test_check_bind_allowed_refuses_non_loopback_without_a_secret():
    for host in ("10.0.0.5", "0.0.0.0", "", "::", "example.com"):
        with pytest.raises(ValueError, match="without a cluster secret: set CHAOS_SECRET or pass secret="):
            check_bind_allowed(host, None)
        with pytest.raises(InsecureBind):
            check_bind_allowed(host, None)
        check_bind_allowed(host, SECRET)
    for host in ("127.0.0.1", "127.1.2.3", "::1", "[::1]", "localhost", "::ffff:127.0.0.1"):
        check_bind_allowed(host, None)


def test_load_secret_normalizes_and_never_reads_the_environment(monkeypatch):
    monkeypatch.setenv("CHAOS_SECRET", "from-env")
    assert load_secret("given-secret-0123") == b"given-secret-0123"
    assert load_secret(b"raw-secret-456789") == b"raw-secret-456789"
    # the environment is chaos_lightning.config's to read, not the wire layer's
    assert load_secret() is None
    assert load_secret("") is None and load_secret(b"") is None


# -- live server ----------------------------------------------------------------------------

LOG = "test.wire.server"


async def echo(conn: Connection) -> None:
    # No WireError handling on purpose: start_server must contain it.
    while True:
        msg = await conn.recv()
        if isinstance(msg, bytes):
            await conn.send_blob(msg)
        else:
            await conn.send(msg)


async def wait_for_log(caplog, text: str, timeout: float = 5.0) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for record in caplog.records:
            if text in record.getMessage():
                return record.getMessage()
        await asyncio.sleep(0.01)
    raise AssertionError(f"no log line containing {text!r}; got {[r.getMessage() for r in caplog.records]}")


async def raw_client(port: int, *, read_hello: bool = True) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    if read_hello:
        kind, payload = await read_frame(reader)
        assert type(decode(payload)).__name__ == "Hello"
    return reader, writer


async def good_round_trip(port: int) -> None:
    conn = await open_connection("127.0.0.1", port, secret=SECRET, timeout=5)
    async with conn:
        view = a_view(50)
        await conn.send(view)
        assert await asyncio.wait_for(conn.recv(), 5) == view
        blob = memoryview(os.urandom(3 * 2**20))
        await conn.send_blob(blob)
        assert await asyncio.wait_for(conn.recv(), 5) == blob.tobytes()


def test_live_server_refuses_bad_peers_and_keeps_serving_good_ones(caplog):
    caplog.set_level(logging.INFO, logger=LOG)
    log = logging.getLogger(LOG)

    async def scenario() -> None:
        server = await start_server("127.0.0.1", 0, echo, secret=SECRET, handshake_timeout=2.0, log=log)
        port = server.sockets[0].getsockname()[1]
        async with server:
            await good_round_trip(port)

            # Wrong secret: both sides say so.
            with pytest.raises(AuthError, match="wrong cluster secret"):
                await open_connection("127.0.0.1", port, secret=b"guess", timeout=5)
            line = await wait_for_log(caplog, "wrong cluster secret")
            assert line.startswith("refused connection from 127.0.0.1:")

            # No secret at all against a server that has one.
            with pytest.raises(AuthError, match="wrong cluster secret"):
                await open_connection("127.0.0.1", port, secret=None, timeout=5)

            # Random bytes.
            _, writer = await raw_client(port)
            writer.write(b"\x00" + random.Random(1).randbytes(63))
            await wait_for_log(caplog, "bad frame magic")
            writer.close()

            # An oversized frame header during the handshake (limit 4 KiB there).
            _, writer = await raw_client(port)
            writer.write(frame_header(2**31))
            await wait_for_log(caplog, f"frame of {2**31} bytes exceeds the limit of 4096 bytes")
            writer.close()

            # A truncated frame, then close.
            _, writer = await raw_client(port)
            writer.write(frame_header(100) + b"x" * 10)
            await writer.drain()
            writer.close()
            await wait_for_log(caplog, "connection closed mid-frame: got 10 of 100 payload bytes")

            # A peer speaking protocol 1 (no frame tags) is told which version we speak.
            reader, writer = await raw_client(port)
            writer.write(b"CL\x01\x00" + struct.pack("!I", 3) + b"abc")
            await writer.drain()
            line = await wait_for_log(caplog, f"peer speaks protocol 1, this agent speaks {V}")
            assert line.startswith("refused connection from")
            kind, payload = await asyncio.wait_for(read_frame(reader), 5)
            assert f"speaks protocol {V}" in decode(payload).reason
            writer.close()

            # After the handshake: an oversized header is dropped by the wrapper, no traceback.
            conn = await open_connection("127.0.0.1", port, secret=SECRET, timeout=5)
            conn._writer.write(frame_header(2**30))
            line = await wait_for_log(caplog, "dropped connection from")
            assert "exceeds the limit" in line
            with pytest.raises((ConnectionClosed, ConnectionError)):
                await asyncio.wait_for(conn.recv(), 5)
            await conn.aclose()

            # ...and a schema violation after the handshake likewise.
            conn = await open_connection("127.0.0.1", port, secret=SECRET, timeout=5)
            await conn.send_frame(msgpack.packb(["member", [1]]))  # tagged, so it reaches the decoder
            line = await wait_for_log(caplog, "member.id: expected str, got int")
            assert line.startswith("dropped connection from")
            await conn.aclose()

            # A silent stranger is cut off at the handshake timeout.
            _, writer = await raw_client(port)
            await wait_for_log(caplog, "handshake timed out after 2s", timeout=6)
            writer.close()

            # The server is still up and serves a good peer.
            await good_round_trip(port)

        assert not [r for r in caplog.records if r.exc_info], "bad input must not log tracebacks"
        assert all(r.levelno <= logging.WARNING for r in caplog.records)

    asyncio.run(asyncio.wait_for(scenario(), 25))


def test_client_side_failures_name_the_address():
    async def scenario() -> None:
        # Nobody listening.
        probe = await asyncio.start_server(lambda r, w: None, "127.0.0.1", 0)
        port = probe.sockets[0].getsockname()[1]
        probe.close()
        await probe.wait_closed()
        with pytest.raises(ConnectionRefusedError, match=f"127.0.0.1:{port}"):
            await open_connection("127.0.0.1", port, secret=None, timeout=2)

        # A server that accepts and says nothing: bounded by the timeout.
        async def silent(reader, writer):
            await reader.read()  # until the client gives up
            writer.close()

        mute = await asyncio.start_server(silent, "127.0.0.1", 0)
        port = mute.sockets[0].getsockname()[1]
        async with mute:
            t0 = time.monotonic()
            with pytest.raises(TimeoutError, match=f"127.0.0.1:{port}.*timed out after 0.3s") as info:
                await open_connection("127.0.0.1", port, secret=None, timeout=0.3)
            assert isinstance(info.value, HandshakeTimeout) and time.monotonic() - t0 < 2

        # A server speaking a newer protocol.
        async def future(reader, writer):
            writer.write(b"CL" + bytes([V + 1, 0]) + struct.pack("!I", 0))
            await writer.drain()
            await reader.read()
            writer.close()

        newer = await asyncio.start_server(future, "127.0.0.1", 0)
        port = newer.sockets[0].getsockname()[1]
        async with newer:
            with pytest.raises(UnsupportedVersion, match=f"peer speaks protocol {V + 1}, this agent speaks {V}"):
                await open_connection("127.0.0.1", port, secret=None, timeout=2)

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_loopback_without_secret_and_too_large_sends_are_refused_locally(caplog):
    async def scenario() -> None:
        server = await start_server("127.0.0.1", 0, echo, secret=None, max_frame=1024, log=logging.getLogger(LOG))
        port = server.sockets[0].getsockname()[1]
        async with server:
            conn = await open_connection("127.0.0.1", port, secret=None, timeout=5, max_frame=1024)
            async with conn:
                assert conn.peer == f"127.0.0.1:{port}"
                await conn.send(Member("a"))
                assert await asyncio.wait_for(conn.recv(), 5) == Member("a")
                with pytest.raises(FrameTooLarge, match="exceeds the frame limit of 1024"):
                    await conn.send_blob(b"x" * 2000)
                with pytest.raises(FrameTooLarge):
                    await conn.send(a_view(100))
                await conn.send(Member("still fine"))
                assert await asyncio.wait_for(conn.recv(), 5) == Member("still fine")
        with pytest.raises(ValueError, match="refusing to listen on 0.0.0.0"):
            await start_server("0.0.0.0", 0, echo, secret=None, log=logging.getLogger(LOG))

    asyncio.run(asyncio.wait_for(scenario(), 20))


def test_shutting_down_with_live_connections_logs_no_errors(caplog):
    caplog.set_level(logging.DEBUG)

    async def scenario() -> None:
        server = await start_server("127.0.0.1", 0, echo, secret=SECRET, log=logging.getLogger(LOG))
        port = server.sockets[0].getsockname()[1]
        conn = await open_connection("127.0.0.1", port, secret=SECRET, timeout=5)
        await conn.send(Member("a"))
        assert await asyncio.wait_for(conn.recv(), 5) == Member("a")
        server.close()
        # Cancel the live handler as asyncio.run's shutdown would, connection still open.
        handlers = [t for t in asyncio.all_tasks() if "on_connect" in t.get_coro().__qualname__]
        assert handlers
        for task in handlers:
            task.cancel()
        await asyncio.wait(handlers, timeout=5)
        with pytest.raises((ConnectionClosed, ConnectionError)):
            await asyncio.wait_for(conn.recv(), 5)
        await conn.aclose()

    asyncio.run(asyncio.wait_for(scenario(), 10))
    assert not [r for r in caplog.records if r.levelno >= logging.ERROR], [r.getMessage() for r in caplog.records]
