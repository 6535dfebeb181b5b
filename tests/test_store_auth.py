"""The process-group store behind the cluster secret (chaos_lightning.rendezvous.store).

* every operation gloo, PrefixStore and init_process_group use works through
  the client, with TCPStore's blocking and timeout semantics;
* three real processes build a gloo group through ``epoch_store`` and
  all-reduce;
* a client with no secret or the wrong one reads and writes nothing;
* garbage bytes, a truncated frame, a foreign message or blob, an oversized
  value and a full store are refused (one log line, the connection closed) while the
  host keeps serving and keeps what it held;
* the host listens on the requested address only.

The host runs in the test process (its log lines reach ``caplog``); the gloo
workers are this file run as a script (``--worker``), started and reaped by
``tests/_procs.Node``.  Every wait is bounded.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import socket
import sys
import threading
import time
from datetime import timedelta
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SECRET = b"test-store-secret-0123456789abcdef"
WRONG = b"not-the-secret-0123456789abcdef"


@pytest.fixture
def host():
    from chaos_lightning.rendezvous.store import StoreHost

    h = StoreHost("127.0.0.1", secret=SECRET, max_value=4096, max_bytes=64 * 1024)
    yield h
    h.close()


@pytest.fixture
def client(host):
    from chaos_lightning.rendezvous.store import WireStore

    c = WireStore("127.0.0.1", host.port, secret=SECRET, timeout=timedelta(seconds=5))
    yield c
    c.close()


def _lines(caplog, text: str) -> list[logging.LogRecord]:
    return [r for r in caplog.records if text in r.getMessage()]


def _wait_for_log(caplog, text: str, timeout: float = 5.0) -> list[logging.LogRecord]:
    deadline = time.monotonic() + timeout
    while not _lines(caplog, text):
        assert time.monotonic() < deadline, f"no log line with {text!r}: {[r.getMessage() for r in caplog.records]}"
        time.sleep(0.02)
    return _lines(caplog, text)


# --------------------------------------------------------------------------- operations
def test_every_store_operation_through_the_client(client):
    import torch.distributed as dist

    client.set("a", b"1")
    client.set("s", "text")  # torch's Python callers pass str
    assert client.get("a") == b"1" and client.get("s") == b"text"
    assert client.add("n", 2) == 2 and client.add("n", 3) == 5 and client.get("n") == b"5"
    # compare_set: TCPStore's rule (missing key matches b"", reply = value now held)
    assert client.compare_set("c", b"", b"v1") == b"v1"
    assert client.compare_set("c", b"wrong", b"v2") == b"v1"
    assert client.compare_set("c", b"v1", b"v2") == b"v2"
    assert client.compare_set("missing", b"x", b"y") == b"x"
    assert client.check(["a", "c"]) and not client.check(["a", "missing"])
    assert client.num_keys() == 4
    assert client.delete_key("a") is True and client.delete_key("a") is False
    assert client.num_keys() == 3
    client.wait(["c", "n"])  # present: returns at once
    with pytest.raises(dist.DistStoreError, match="not an integer"):
        client.add("c", 1)
    assert client.get("c") == b"v2"  # an invalid request changes nothing, the connection stays


def test_through_prefix_store_as_torch_calls_it(client):
    import torch.distributed as dist

    p = dist.PrefixStore("chaos/epoch/7/", client)
    p.set("k", b"v")
    assert client.get("chaos/epoch/7//k") == b"v"  # PrefixStore joins with "/"
    assert p.get("k") == b"v" and p.add("n", 4) == 4
    assert p.compare_set("k", b"v", b"w") == b"w"
    p.append("k", b"+")  # torch's default append: a compare_set loop
    assert p.get("k") == b"w+"
    p.wait(["k"], timedelta(seconds=1))
    assert p.check(["k"])
    # the trampoline calls the C++ names deleteKey / getNumKeys
    assert p.num_keys() == 2 and p.delete_key("n") is True and p.num_keys() == 1
    clone = p.clone()  # torch's clone: another client of the same host
    assert clone.get("k") == b"w+"


def test_get_and_wait_block_until_set_or_time_out(host, client):
    import torch.distributed as dist

    from chaos_lightning.rendezvous.store import WireStore

    other = WireStore("127.0.0.1", host.port, secret=SECRET, timeout=timedelta(seconds=5))
    try:
        threading.Timer(0.2, other.set, ("late", b"here")).start()
        t0 = time.monotonic()
        assert client.get("late") == b"here"
        assert 0.1 < time.monotonic() - t0 < 3
        threading.Timer(0.2, other.set, ("w2", b"")).start()
        other.set("w1", b"")
        client.wait(["w1", "w2"], timedelta(seconds=5))
        t0 = time.monotonic()
        with pytest.raises(dist.DistStoreError, match="wait timeout after 300ms"):
            client.wait(["never"], timedelta(seconds=0.3))
        assert 0.25 < time.monotonic() - t0 < 2.0
        client.set_timeout(timedelta(seconds=0.3))
        with pytest.raises(dist.DistStoreError, match="wait timeout"):
            client.get("never")
        client.set_timeout(timedelta(seconds=5))
        # a timed-out wait leaves the connection usable and nothing behind
        assert client.get("late") == b"here"
    finally:
        other.close()


def test_a_wait_reads_the_ranks_keys_beside_it_in_one_round_trip_and_keeps_them_until_another_call(host, client):
    """gloo's rendezvous waits for and reads every rank's address in turn:
    the first wait brings the ones set already, so the rest cost no round
    trip; a key not named by a number, a key of another folder and a key
    that is not there yet are read from the host, and any other call (a set)
    drops what was kept, so nothing read before it is served after."""
    import threading

    from chaos_lightning.rendezvous import store as st

    folder = "chaos/epoch/1//g/"
    for r in range(4):
        client.set(f"{folder}{r}", f"addr{r}".encode())
    client.set(f"{folder}meet", b"4")
    client.set("chaos/epoch/1//h/1", b"other")
    trips = []
    request = client._request
    client._request = lambda make, wait_s=0.0: (trips.append(1), request(make, wait_s))[1]
    client.wait([f"{folder}0"])
    assert len(trips) == 1
    for r in (0, 1, 2, 3):
        client.wait([f"{folder}{r}"])
        assert client.get(f"{folder}{r}") == f"addr{r}".encode()
    assert len(trips) == 1  # every rank's address came with the first wait
    assert client.get(f"{folder}meet") == b"4" and len(trips) == 2  # not a rank's key: read from the host
    client.wait([f"{folder}1"])
    client.wait(["chaos/epoch/1//h/1"])
    assert len(trips) == 4  # the get above dropped what was kept; another folder is its own read
    client.set(f"{folder}2", b"changed")
    assert client.get(f"{folder}2") == b"changed" and len(trips) == 6  # the set dropped the old value
    # a rank's key set later is waited for on the host, and brings what is there then
    def later() -> None:
        other = st.WireStore("127.0.0.1", host.port, secret=SECRET, timeout=timedelta(seconds=5))
        other.set(f"{folder}4", b"addr4")
        other.close()

    late = threading.Timer(0.2, later)
    late.start()
    client.wait([f"{folder}4"])
    late.join()
    assert client.get(f"{folder}4") == b"addr4" and client.get(f"{folder}3") == b"addr3"
    assert len(trips) == 7
    # outside the epochs' keys nothing comes with a read; the host bounds what does
    client.set("plain/1", b"x")
    client.set("plain/2", b"y")
    client.wait(["plain/1"])
    client.get("plain/2")
    assert len(trips) == 11
    assert len(host._table.siblings(f"{folder}0", 2)) == 2


def test_a_missing_rank_ends_gloo_init_with_torchs_store_timeout_error(host):
    """The error a caller of init_process_group sees is TCPStore's kind, after the PG timeout."""
    import gc

    import torch.distributed as dist

    from chaos_lightning.rendezvous.store import WireStore

    # no reference kept to the client, as epoch_store's callers keep none
    store = dist.PrefixStore("chaos/epoch/3/", WireStore("127.0.0.1", host.port, secret=SECRET))
    gc.collect()
    t0 = time.monotonic()
    try:
        with pytest.raises(dist.DistStoreError, match="wait timeout after 1000ms"):
            dist.init_process_group("gloo", store=store, rank=0, world_size=2, timeout=timedelta(seconds=1))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert time.monotonic() - t0 < 5


def test_a_superseded_group_formation_stops_waiting_for_a_dead_ranks_key(host):
    """gloo's rendezvous waits on the store for every rank's key, up to the
    switch timeout (30 s): when a newer view commits meanwhile (the missing
    rank is dead, the view without it is the one to form), the store's
    ``cancelled`` ends the wait at once with its reason (the soak measured
    30.8 s from a kill to the first step before this)."""
    import threading

    import torch.distributed as dist

    from chaos_lightning.rendezvous.store import WireStore

    newer = threading.Event()
    store = dist.PrefixStore("chaos/epoch/10/", WireStore(
        "127.0.0.1", host.port, secret=SECRET, timeout=timedelta(seconds=30),
        cancelled=lambda: "epoch 11 committed" if newer.is_set() else None,
    ))
    threading.Timer(0.3, newer.set).start()
    t0 = time.monotonic()
    try:
        with pytest.raises(dist.DistStoreError, match=r"cancelled \(epoch 11 committed\)"):
            dist.init_process_group("gloo", store=store, rank=0, world_size=2, timeout=timedelta(seconds=30))
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert time.monotonic() - t0 < 10, "not the 30-s store timeout"


def test_old_epochs_keys_are_pruned_so_a_long_run_never_fills_the_store(host, client):
    """Issue 15: the host kept every epoch's keys; with a 64 MiB cap a long run
    with many view switches would fill it and fail a group's init ("store
    full").  Here the cap is 64 KiB and 400 view switches write three ranks'
    addresses each (about 190 KiB in all): the store holds only the last
    KEEP_EPOCHS epochs, keys outside ``chaos/epoch/`` are untouched, a
    straggler's write into a pruned epoch is taken and pruned again at the next
    epoch, and a gloo group still forms after it all."""
    import torch.distributed as dist

    from chaos_lightning.rendezvous.store import KEEP_EPOCHS

    client.set("user/key", b"kept")
    addr = b"x" * 100  # about what gloo stores per rank
    epochs = 400
    for e in range(1, epochs + 1):
        p = dist.PrefixStore(f"chaos/epoch/{e}/", client)
        for r in range(3):
            p.set(f"rank_{r}", addr)
        p.add("barrier", 3)
        if e == epochs - 10:  # a straggler of an epoch long gone still writes
            dist.PrefixStore("chaos/epoch/3/", client).set("rank_9", addr)
    assert epochs * 4 * (len(addr) + 64) > 3 * host._table.max_bytes  # would not have fitted
    t = host._table
    assert sorted(t._epochs) == list(range(epochs - KEEP_EPOCHS + 1, epochs + 1))
    assert client.num_keys() == 1 + 4 * KEEP_EPOCHS
    assert client.get("user/key") == b"kept"
    assert client.get(f"chaos/epoch/{epochs}//rank_2") == addr
    assert not client.check([f"chaos/epoch/{epochs - KEEP_EPOCHS}//rank_0"])
    assert not client.check(["chaos/epoch/3//rank_9"])
    assert t.nbytes == sum(t._size(k, v) for k, v in t.data.items())  # the accounting holds
    assert t.pruned_keys == 4 * (epochs - KEEP_EPOCHS) + 1
    # a deleted key leaves the epoch index as well
    assert client.delete_key(f"chaos/epoch/{epochs}//barrier")
    assert f"chaos/epoch/{epochs}//barrier" not in t._epochs[epochs]
    # and the next group forms on this store
    store = dist.PrefixStore(f"chaos/epoch/{epochs + 1}/", client)
    try:
        dist.init_process_group("gloo", store=store, rank=0, world_size=1, timeout=timedelta(seconds=10))
        assert dist.get_world_size() == 1
    finally:
        if dist.is_initialized():
            dist.destroy_process_group()
    assert sorted(t._epochs)[0] == epochs + 1 - KEEP_EPOCHS + 1


# --------------------------------------------------------------------------- secret
def test_no_or_wrong_secret_reads_and_writes_nothing(host, client, caplog):
    import torch.distributed as dist

    from chaos_lightning.rendezvous.store_messages import NumKeysRequest, SetRequest
    from chaos_lightning.rendezvous.store import WireStore
    from chaos_lightning.wire import AuthError, encode_frame, open_connection
    from chaos_lightning.wire import schema

    caplog.set_level(logging.INFO, logger="chaos_lightning.rendezvous.store")
    client.set("chaos/epoch/2/rank_0", b"good")
    for secret in (WRONG, None):
        with pytest.raises(dist.DistNetworkError, match="wrong cluster secret"):
            WireStore("127.0.0.1", host.port, secret=secret, timeout=timedelta(seconds=5))

    async def intruders() -> list[bytes]:
        with pytest.raises(AuthError):
            await open_connection("127.0.0.1", host.port, secret=WRONG, timeout=5)
        # skip the handshake: send store requests straight away
        reader, writer = await asyncio.open_connection("127.0.0.1", host.port)
        for msg in (SetRequest(1, "chaos/epoch/2/rank_0", b"evil"), NumKeysRequest(2)):
            writer.write(encode_frame(schema.encode(msg)))
        await writer.drain()
        got = await asyncio.wait_for(reader.read(), 5)  # until the host closes
        writer.close()
        return [got]

    got = asyncio.run(intruders())
    assert b"good" not in got[0]
    _wait_for_log(caplog, "refused connection")
    assert client.get("chaos/epoch/2/rank_0") == b"good" and client.num_keys() == 1


# --------------------------------------------------------------------------- bad input
def test_bad_input_is_refused_and_the_host_keeps_serving(host, client, caplog):
    import torch.distributed as dist

    from chaos_lightning.rendezvous.store_messages import REFUSED, SetRequest, StoreError
    from chaos_lightning.wire import WireError, frame_header, open_connection
    from chaos_lightning.wire.auth import Hello

    caplog.set_level(logging.INFO, logger="chaos_lightning.rendezvous.store")
    client.set("keep", b"me")

    async def closed_by_host(conn) -> bool:
        try:
            await asyncio.wait_for(conn.recv(), 5)
        except (WireError, OSError):
            return True
        finally:
            await conn.aclose()
        return False

    async def attacks() -> dict[str, object]:
        out: dict[str, object] = {}
        # garbage before any handshake
        reader, writer = await asyncio.open_connection("127.0.0.1", host.port)
        writer.write(os.urandom(64) + b"\x00" * 64)
        await writer.drain()
        await asyncio.wait_for(reader.read(), 5)  # until the host closes
        writer.close()
        # a truncated frame: a header announcing 100 bytes, 10 sent, then EOF
        reader, writer = await asyncio.open_connection("127.0.0.1", host.port)
        writer.write(frame_header(100) + b"x" * 10)
        writer.write_eof()
        await asyncio.wait_for(reader.read(), 5)
        writer.close()
        # authenticated, an oversized value sent raw (no client-side check involved)
        conn = await open_connection("127.0.0.1", host.port, secret=SECRET, timeout=5)
        await conn.send(SetRequest(1, "big", b"x" * 5000))
        out["oversized"] = await asyncio.wait_for(conn.recv(), 5)
        out["oversized closed"] = await closed_by_host(conn)
        # authenticated, then a registered message that is not a store request
        conn = await open_connection("127.0.0.1", host.port, secret=SECRET, timeout=5)
        await conn.send(Hello(1, b"x" * 32))
        out["foreign closed"] = await closed_by_host(conn)
        # authenticated, then a blob (bytes the store never interprets)
        conn = await open_connection("127.0.0.1", host.port, secret=SECRET, timeout=5)
        await conn.send_blob(os.urandom(256))
        out["blob closed"] = await closed_by_host(conn)
        return out

    out = asyncio.run(attacks())
    reply = out["oversized"]
    assert isinstance(reply, StoreError) and reply.kind == REFUSED and "exceeds" in reply.reason
    assert out["oversized closed"] and out["foreign closed"] and out["blob closed"]
    refused = [r.getMessage() for r in _wait_for_log(caplog, "refused connection")]
    assert any("magic" in m for m in refused), refused  # the garbage
    _wait_for_log(caplog, "mid-frame")  # the truncated frame
    dropped = [r.getMessage() for r in _wait_for_log(caplog, "dropped connection")]
    assert any("exceeds the store's limit of 4096 bytes" in m for m in dropped), dropped
    assert not [r for r in caplog.records if r.exc_info], "a refusal logged a traceback"

    # the same through the client: a clear error, then the client reconnects
    with pytest.raises(dist.DistStoreError, match="exceeds the store's limit of 4096 bytes"):
        client.set("big", b"x" * 5000)
    # the total is bounded too: fill the store, the overflowing set is refused
    i = 0
    with pytest.raises(dist.DistStoreError, match="store full"):
        for i in range(100):
            client.set(f"fill/{i}", b"y" * 4000)
    assert i > 5 and client.check([f"fill/{i - 1}"]) and not client.check([f"fill/{i}"])
    for k in range(i):
        assert client.delete_key(f"fill/{k}")
    # nothing lost, nothing half-written, still serving
    assert client.get("keep") == b"me" and not client.check(["big"]) and client.num_keys() == 1
    client.set("after", b"ok")
    assert client.get("after") == b"ok"


# --------------------------------------------------------------------------- binding
def test_the_host_binds_the_requested_address_only():
    import psutil

    from chaos_lightning.rendezvous.store import StoreHost
    from chaos_lightning.wire import InsecureBind

    h = StoreHost("127.0.0.2", secret=None)
    try:
        assert h.sockname[:2] == ("127.0.0.2", h.port)
        listening = [
            c.laddr for c in psutil.Process().net_connections(kind="inet")
            if c.status == psutil.CONN_LISTEN and c.laddr.port == h.port
        ]
        assert [a.ip for a in listening] == ["127.0.0.2"]
        for other in ("127.0.0.1", "::1"):
            family = socket.AF_INET6 if ":" in other else socket.AF_INET
            with socket.socket(family, socket.SOCK_STREAM) as s:
                s.settimeout(2)
                assert s.connect_ex((other, h.port)) != 0, f"{other}:{h.port} answered"
    finally:
        h.close()
    with pytest.raises(InsecureBind):
        StoreHost("0.0.0.0", secret=None)
    with pytest.raises(InsecureBind):
        StoreHost("", secret=None)


# --------------------------------------------------------------------------- callers
def test_the_rendezvous_hosts_and_dials_its_store_with_the_cluster_secret():
    import torch.distributed as dist

    from chaos_lightning.rendezvous import create
    from chaos_lightning.rendezvous.store import STORE_META_KEY, WireStore
    from chaos_lightning.wire.addr import parse_hostport

    rdv = create("peer", bind="127.0.0.1:0", secret=SECRET)
    try:
        view = rdv.join(20)
        store = rdv.store(view, timeout=5)  # what the strategy calls at each switch
        store.set("k", b"v")
        assert store.get("k") == b"v"
        host, port = parse_hostport(view.members[0].get(STORE_META_KEY))
        with pytest.raises(dist.DistNetworkError, match="wrong cluster secret"):
            WireStore(host, port, secret=None, timeout=timedelta(seconds=5))
        peek = WireStore(host, port, secret=SECRET, timeout=timedelta(seconds=5))
        try:
            assert peek.get(f"chaos/epoch/{view.epoch}//k") == b"v"
        finally:
            peek.close()
    finally:
        rdv.close()


# --------------------------------------------------------------------------- gloo
@pytest.mark.timeout(120)
def test_three_processes_build_a_gloo_group_through_the_store(tmp_path, host, client):
    from _procs import Node

    from chaos_lightning.membership.view import Member, View

    # the view is made by the test: member 0 (rank 0) publishes this host
    members = [Member(f"n{i}", meta=(("store", host.endpoint),)) for i in range(3)]
    view = View(5, tuple(members))
    spec = json.dumps({"epoch": view.epoch, "members": [[m.id, host.endpoint] for m in members]})
    nodes = [
        Node(Path(__file__), ["--worker", f"n{i}", spec], {"TEST_STORE_SECRET": SECRET.decode()}, tmp_path / f"n{i}.log")
        for i in range(3)
    ]
    try:
        sums = [n.event("sum", 90) for n in nodes]
        assert [s["value"] for s in sums] == [6.0, 6.0, 6.0]
        assert sorted(s["rank"] for s in sums) == [0, 1, 2]
        for n in nodes:
            assert n.exit_code(30) == 0, n.log.read_text()[-2000:]
    finally:
        for n in nodes:
            n.stop()
    # gloo's keys (one per rank at least) went to this host
    assert client.num_keys() >= 3


def _worker_main(node_id: str, spec: str) -> None:
    sys.path.insert(0, str(REPO))
    import torch
    import torch.distributed as dist

    from chaos_lightning.membership.view import Member, View
    from chaos_lightning.rendezvous.store import epoch_store

    s = json.loads(spec)
    view = View(s["epoch"], tuple(Member(i, meta=(("store", ep),)) for i, ep in s["members"]))
    rank = view.ids.index(node_id)
    store = epoch_store(view, timedelta(seconds=30), secret=os.environ["TEST_STORE_SECRET"].encode())
    t0 = time.perf_counter()
    dist.init_process_group("gloo", store=store, rank=rank, world_size=view.size, timeout=timedelta(seconds=30))
    init_ms = 1e3 * (time.perf_counter() - t0)
    t = torch.tensor([float(rank + 1)])
    dist.all_reduce(t)
    print(json.dumps({"event": "sum", "rank": rank, "value": float(t.item()), "init_ms": init_ms}), flush=True)
    dist.destroy_process_group()


if __name__ == "__main__" and len(sys.argv) == 4 and sys.argv[1] == "--worker":
    _worker_main(sys.argv[2], sys.argv[3])
