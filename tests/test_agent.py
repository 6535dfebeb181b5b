"""Agents on real loopback sockets, several per process (one thread each).

Scenarios: a cluster keeps working while one of its agents is fed garbage,
wrong secrets and foreign protocol versions; status and bandwidth probes;
a cut link is a link-down at both ends and not a failure.  Real-process
scenarios (``kill -9``, joins, leaves) are in test_rendezvous_contract.py.
"""

from __future__ import annotations

import asyncio
import logging
import struct
import threading
import time

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chaos_lightning.agent import Agent, status
from chaos_lightning.membership import events as ev
from chaos_lightning.membership.view import Member
from chaos_lightning.wire import InsecureBind, client_handshake
from chaos_lightning.wire.frames import MAGIC, PROTOCOL_VERSION, encode_frame, frame_header
from chaos_lightning.wire.schema import encode

SECRET = b"test-cluster-secret"
pytestmark = pytest.mark.timeout(60)


def start_cluster(n: int, secret: bytes | None = SECRET) -> list[Agent]:
    first = Agent(secret=secret).start()
    agents = [first] + [Agent(secret=secret).start([first.addr]) for _ in range(n - 1)]
    ids = {a.node_id for a in agents}
    deadline = time.monotonic() + 15
    for a in agents:
        while True:
            v = a.wait_view(0, max(0.1, deadline - time.monotonic()))
            if v is not None and set(v.ids) == ids:
                break
            assert time.monotonic() < deadline, f"{a.node_id} has {v and v.describe()}"
            time.sleep(0.05)
    return agents


@pytest.fixture
def cluster():
    agents = start_cluster(3)
    yield agents
    for a in agents:
        a.stop()


def hostport(addr: str) -> tuple[str, int]:
    host, port = addr.rsplit(":", 1)
    return host, int(port)


def tag_frames(session, data: bytes) -> bytes:
    """``data`` (whole frames) with each frame's tag appended, as a real peer sends them."""
    out, pos = [], 0
    while pos < len(data):
        header = data[pos : pos + 8]
        (length,) = struct.unpack("!I", header[4:])
        payload = data[pos + 8 : pos + 8 + length]
        out += [header, *session.seal(header, payload)]
        pos += 8 + length
    return b"".join(out)


async def send_raw(addr: str, data: bytes, *, handshake: bytes | None | bool = False, tagged: bool = False) -> bytes:
    """Connect, optionally authenticate with ``handshake`` as the secret, send
    ``data`` (``tagged``: whole frames, each given its session tag), and
    return what the agent sent back before closing (bounded)."""
    reader, writer = await asyncio.open_connection(*hostport(addr))
    try:
        if handshake is not False:
            try:
                session = await client_handshake(reader, writer, handshake, 5.0)
            except Exception as exc:  # refused: what the agent said is the point
                return str(exc).encode()
            if tagged:
                data = tag_frames(session, data)
        writer.write(data)
        await writer.drain()
        try:
            return await asyncio.wait_for(reader.read(), 5.0)
        except (ConnectionError, asyncio.TimeoutError):
            return b""
    finally:
        writer.close()


def assert_still_serving(agents: list[Agent]) -> None:
    """A newcomer can still join through the attacked agent."""
    newcomer = Agent(secret=SECRET).start([agents[0].addr])
    try:
        v = newcomer.wait_view(0, 15)
        assert v is not None and len(v.members) == len(agents) + 1
    finally:
        newcomer.leave(10)
        newcomer.stop()


def test_garbage_wrong_secret_and_foreign_versions_are_refused_and_the_agent_keeps_serving(cluster, caplog):
    target = cluster[0].addr
    caplog.set_level(logging.INFO)
    oversized = frame_header(1 << 30)  # claims a 1 GiB frame
    truncated = frame_header(100) + b"only a few bytes"
    v2 = struct.pack("!2sBBI", MAGIC, PROTOCOL_VERSION + 1, 0, 3) + b"abc"
    not_msgpack = encode_frame(b"\xc1\xc1\xc1")
    wrong_type = encode_frame(encode(Member("intruder")))  # a valid message, but not one for this port

    async def attack() -> None:
        await send_raw(target, b"\x00random bytes\xff" * 20)  # before the handshake
        assert b"wrong cluster secret" in await send_raw(target, encode_frame(b"hello"), handshake=b"wrong secret")
        await send_raw(target, v2)  # a client speaking the next protocol
        await send_raw(target, oversized, handshake=SECRET)
        await send_raw(target, truncated, handshake=SECRET)
        await send_raw(target, not_msgpack, handshake=SECRET, tagged=True)
        await send_raw(target, wrong_type, handshake=SECRET, tagged=True)
        await send_raw(target, wrong_type + b"\0" * 16, handshake=SECRET)  # a forged tag

    asyncio.run(attack())
    text = caplog.text
    assert "wrong cluster secret" in text
    assert f"protocol {PROTOCOL_VERSION + 1}" in text
    assert "failed its integrity check" in text
    assert "exceeds" in text or "too large" in text.lower()
    assert "truncated" in text.lower() or "closed" in text.lower()
    assert "unexpected message Member" in text
    assert "Traceback" not in text
    assert_still_serving(cluster)
    # the newcomer's leave returns once it is removed; the others learn of it a
    # moment later, so wait (bounded) for them to settle back on three
    deadline = time.monotonic() + 10
    while not all(a.view().size == 3 for a in cluster) and time.monotonic() < deadline:
        time.sleep(0.05)
    assert all(a.view().size == 3 for a in cluster), "the attack changed no view"


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(payload=st.binary(max_size=512), kind=st.integers(0, 3), authenticated=st.booleans())
def test_hypothesis_frames_never_break_a_live_agent(shared_cluster, payload, kind, authenticated):
    frame = struct.pack("!2sBBI", MAGIC, PROTOCOL_VERSION, kind, len(payload)) + payload
    asyncio.run(send_raw(shared_cluster[0].addr, frame, handshake=SECRET if authenticated else False,
                         tagged=authenticated))
    assert shared_cluster[0].view().size == 3


@pytest.fixture(scope="module")
def shared_cluster():
    agents = start_cluster(3)
    yield agents
    assert_still_serving(agents)
    for a in agents:
        a.stop()


def test_status_shows_view_links_and_resources(cluster):
    time.sleep(1.0)  # a few probe periods: RTT samples to the peers
    snap = status(cluster[0].addr, secret=SECRET)
    assert snap["membership"]["phase"] == "member"
    assert snap["view"]["epoch"] == cluster[0].view().epoch
    assert set(snap["view"]["members"]) == {a.node_id for a in cluster}
    assert any(link["rtt_ms"] is not None for link in snap["links"].values()), snap["links"]
    assert snap["resources"]["cpu_count"] >= 1
    msgpack.packb(snap)  # plain data all the way down


def test_status_with_a_wrong_secret_is_a_clear_error(cluster):
    with pytest.raises(Exception, match="secret"):
        status(cluster[0].addr, secret=b"not-the-cluster-secret", timeout=3)


def test_active_bandwidth_probe_measures_and_feeds_the_monitor(cluster):
    a, b = cluster[0], cluster[1]
    bw = a.probe_bandwidth(b.addr, nbytes=4 << 20)
    assert bw > 1e6, "loopback moves well over 1 MB/s"
    snap = a.snapshot()
    assert snap["links"][b.node_id]["bw_up_mbit"] > 8


def test_a_cut_link_is_link_down_at_both_ends_then_link_up_and_never_a_failure(cluster):
    a, b, c = cluster
    seen: list[tuple[str, object]] = []
    for agent in cluster:
        agent.subscribe(lambda e, who=agent.node_id: seen.append((who, e)))
    epoch = a.view().epoch
    a.block(b.addr)
    b.block(a.addr)
    deadline = time.monotonic() + 15
    while not all(x.view().down_links for x in cluster):
        assert time.monotonic() < deadline, "link-down committed"
        time.sleep(0.05)
    downs = {who for who, e in seen if isinstance(e, ev.LinkDown)}
    assert {a.node_id, b.node_id} <= downs
    a.unblock(b.addr)
    b.unblock(a.addr)
    deadline = time.monotonic() + 15
    while a.view().down_links or c.view().down_links or b.view().down_links:
        assert time.monotonic() < deadline, "link-up committed"
        time.sleep(0.05)
    ups = {who for who, e in seen if isinstance(e, ev.LinkUp)}
    assert {a.node_id, b.node_id} <= ups
    assert not [e for _, e in seen if isinstance(e, ev.MemberFailed)]
    assert all(x.view().size == 3 and x.view().epoch > epoch for x in cluster)


def test_an_abrupt_stop_is_detected_as_a_failure_fast(cluster):
    a, b, c = cluster
    epoch = a.view().epoch
    t0 = time.monotonic()
    c.stop()
    v = a.wait_view(epoch, 10)
    assert v is not None and c.node_id not in v
    assert time.monotonic() - t0 < 5, "local preset: about half a second, bounded generously"


def test_suspect_of_live_peers_changes_nothing_and_of_a_stopped_one_commits_at_once(cluster):
    """Agent.suspect (issue 14): the strategy names every peer of a failed
    collective.  Live peers answer their probes (no view change); a stopped
    one's address refuses, which confirms its death at once."""
    a, b, c = cluster
    epoch = a.view().epoch
    for _ in range(50):  # a flood: rate-limited, never a probe storm
        a.suspect([b.node_id, c.node_id, a.node_id, "nobody"])
    time.sleep(1.0)
    assert a.view().epoch == epoch and b.view().epoch == epoch, a.view().describe()
    t0 = time.monotonic()
    c.stop()
    a.suspect([b.node_id, c.node_id])
    v = a.wait_view(epoch, 10)
    took = time.monotonic() - t0
    assert v is not None and c.node_id not in v
    print(f"stop -> view without it {1e3 * took:.0f} ms")
    assert b.wait_view(epoch, 10) is not None
    c.suspect([a.node_id])  # a stopped agent: a no-op, no error


def test_listening_beyond_loopback_needs_a_secret(monkeypatch):
    monkeypatch.delenv("CHAOS_SECRET", raising=False)
    with pytest.raises(InsecureBind, match="CHAOS_SECRET"):
        Agent(bind="0.0.0.0:0").start()


def test_a_join_whose_every_seed_refuses_says_so_in_one_line_at_once(caplog):
    """Two seeds where nothing listens: within a second one warning names
    both and why, once, while the join goes on trying (a seed may be
    starting); the rendezvous' timeout error carries the same reasons."""
    from chaos_lightning.testbed.procs import free_ports

    seeds = [f"127.0.0.1:{p}" for p in free_ports(2)]
    caplog.set_level(logging.WARNING, logger="chaos_lightning.agent")
    agent = Agent(secret=SECRET).start(seeds)
    try:
        deadline = time.monotonic() + 5
        while not any("no seed answers" in r.getMessage() for r in caplog.records):
            assert time.monotonic() < deadline, [r.getMessage() for r in caplog.records]
            time.sleep(0.05)
        took = 5 - (deadline - time.monotonic())
        assert took < 2.0, f"reported after {took:.1f}s"
        time.sleep(1.5)  # the join keeps dialling: still one line
        lines = [r.getMessage() for r in caplog.records if "no seed answers" in r.getMessage()]
        assert len(lines) == 1, lines
        assert all(f"{s} (connection refused" in lines[0] for s in seeds), lines[0]
        assert agent.wait_view(0, 0.1) is None
        assert agent.seed_errors().count("connection refused") == 2
    finally:
        agent.stop()


def test_a_seed_with_another_secret_is_named_as_refusing_the_handshake(cluster, caplog):
    caplog.set_level(logging.WARNING, logger="chaos_lightning.agent")
    agent = Agent(secret=b"another-cluster-secret").start([cluster[0].addr])
    try:
        deadline = time.monotonic() + 5
        while not agent.seed_errors():
            assert time.monotonic() < deadline, "no dial error recorded"
            time.sleep(0.05)
        assert cluster[0].addr in agent.seed_errors(), agent.seed_errors()
        assert "wrong cluster secret" in agent.seed_errors(), agent.seed_errors()
        assert all(agent.node_id not in a.view().ids for a in cluster)
    finally:
        agent.stop()


def test_the_stop_ends_a_task_that_swallowed_its_first_cancellation(caplog):
    """On Python 3.10/3.11 ``asyncio.wait_for`` can lose a cancellation that
    arrives as its inner await completes; the task then goes on into its next
    await.  Seen: a sender back in its 30-s idle wait after the stop, destroyed
    pending once the loop closed, and a traceback at exit.  The stop cancels
    again until every task has ended."""
    agent = Agent(secret=SECRET).start()
    tasks: list[asyncio.Task] = []

    async def stubborn() -> None:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass  # swallowed, as wait_for's race does
        await asyncio.sleep(30)

    started = threading.Event()
    agent._loop.call_soon_threadsafe(lambda: (tasks.append(agent._loop.create_task(stubborn())), started.set()))
    assert started.wait(5)
    t0 = time.monotonic()
    with caplog.at_level(logging.WARNING, logger="chaos_lightning.agent"):
        agent.stop()
    assert time.monotonic() - t0 < 2.0
    assert tasks[0].done() and tasks[0].cancelled()
    assert "abandoned" not in caplog.text


def test_forged_senders_do_not_grow_the_peer_map_and_their_entries_expire(cluster, monkeypatch):
    """Issue 15: every forged ``Envelope`` sender address whose Ping got an Ack
    left one outgoing entry in the agent's ``_peers`` for good (20,000 forged
    Pings: +20 MB, kept).  Now entries of addresses that are not members,
    joiners, seeds or cut links are an LRU (``max_stranger_peers``) and expire
    once idle; the members' entries stay and the cluster still admits a
    newcomer through the attacked agent."""
    from chaos_lightning.agent import agent as agent_mod
    from chaos_lightning.agent.messages import Envelope
    from chaos_lightning.membership.messages import Ping
    from chaos_lightning.wire import open_connection

    target = cluster[0]
    members = {m.addr for m in target.view().members if m.addr != target.addr}
    target.max_stranger_peers = 32
    target.stranger_ttl = 0.5
    monkeypatch.setattr(agent_mod, "PEER_SWEEP_INTERVAL", 0.2)  # read when the next sweep is armed
    n = 3000
    sizes = []

    async def flood() -> None:
        host, port = hostport(target.addr)
        conn = await open_connection(host, port, secret=SECRET, timeout=5.0)
        try:
            for i in range(n):
                # distinct loopback addresses: each dial is refused at once
                fake = f"127.{1 + i // 60000}.{(i // 250) % 240}.{i % 250 + 1}:9"
                await conn.send(Envelope(f"forged-{i}", fake, Ping(i, target.view().epoch)))
                if i % 500 == 499:
                    await asyncio.sleep(0.05)
                    sizes.append(len(target._peers))
        finally:
            await conn.aclose()

    asyncio.run(asyncio.wait_for(flood(), 40))
    time.sleep(0.3)
    sizes.append(len(target._peers))
    # bounded all along: the cap plus the members (and a few just evicted in flight)
    assert max(sizes) <= 32 + len(members) + 2, sizes
    assert members <= set(target._peers), "the members' entries must stay"
    # once idle, the strangers' entries expire (memory goes back down)
    deadline = time.monotonic() + 10
    while set(target._peers) - members and time.monotonic() < deadline:
        time.sleep(0.1)
    assert set(target._peers) <= members | set(target._seeds), sorted(target._peers)[:5]
    assert len(target.machine._strangers) <= 256
    assert_still_serving(cluster)


# ------------------------------------------------------------------ issue 14
def test_two_agents_one_stopped_the_survivor_goes_on_alone_and_admits_a_newcomer():
    """``Agent.stop()`` closes the listening socket, as a ``kill -9`` does:
    the survivor's next connect is refused, which proves the death, and with
    exactly half of the voters proven dead the survivor commits a view of one
    (before: 1 of 2 is no majority, it waited for good)."""
    a, b = start_cluster(2)
    c = None
    try:
        epoch = a.view().epoch
        t0 = time.monotonic()
        b.stop()
        v = a.wait_view(epoch, 10)
        took = time.monotonic() - t0
        assert v is not None and v.ids == (a.node_id,), v and v.describe()
        assert took < 5, f"{took:.2f}s: local preset, about a probe period plus the suspicion"
        c = Agent(secret=SECRET).start([a.addr])
        v = c.wait_view(0, 10)
        assert v is not None and set(v.ids) == {a.node_id, c.node_id}
        assert a.snapshot()["membership"]["quorate"]
    finally:
        for x in (a, b, c):
            if x is not None:
                x.stop()


def test_a_learner_is_promoted_once_it_says_it_synced():
    a, b = start_cluster(2)
    c = None
    try:
        a.mark_synced()
        b.mark_synced()
        c = Agent(secret=SECRET).start([a.addr])
        v = c.wait_view(0, 10)
        assert v is not None and v.learners == (c.node_id,) and c.learner
        assert c.snapshot()["membership"]["learner"] is True
        c.mark_synced()
        v = c.wait_view(v.epoch, 10)
        assert v is not None and not v.learners and not c.learner
    finally:
        for x in (a, b, c):
            if x is not None:
                x.stop()


def test_a_cut_pair_waits_and_each_says_once_that_it_is_a_minority(caplog):
    caplog.set_level(logging.INFO, logger="chaos_lightning.agent")
    a, b = start_cluster(2)
    try:
        epoch = a.view().epoch
        a.block(b.addr)
        b.block(a.addr)
        time.sleep(3.0)  # local preset: the failure is confirmed in about 0.6 s
        assert a.view().epoch == epoch and b.view().epoch == epoch, "a timeout is no proof: nobody commits"
        lines = [r.getMessage() for r in caplog.records if "minority" in r.getMessage()]
        assert lines.count("chaos: this node is in a minority (1 of 2 reachable); waiting for the majority to return") == 2, lines
        a.unblock(b.addr)
        b.unblock(a.addr)
        deadline = time.monotonic() + 15
        while not (a.snapshot()["membership"]["quorate"] and b.snapshot()["membership"]["quorate"]):
            assert time.monotonic() < deadline, "the pair is whole again"
            time.sleep(0.1)
    finally:
        a.stop()
        b.stop()


def test_two_processes_one_killed_the_survivor_commits_a_view_of_one_then_admits_a_third(tmp_path):
    """The outside project's case of issue 14 with real processes: a founder
    and one member, the member ``kill -9``-ed.  Before: the founder stayed in
    the view of two for good (1 of 2 is no majority) and a third process
    never got in.  Now its connects to the dead member's port are refused,
    which proves the death: a view of one within a few seconds, then the
    third is admitted."""
    from pathlib import Path

    from chaos_lightning.testbed.local import Node
    from chaos_lightning.testbed.procs import free_ports

    repo = Path(__file__).resolve().parents[1]
    ports = free_ports(3)

    def node(i: int, peers: str | None) -> Node:
        args = ["--backend", "peer", "--bind", f"127.0.0.1:{ports[i]}", "--no-store", "--preset", "local"]
        return Node(args + (["--peers", peers] if peers else []), tmp_path / f"node{i}.err", cwd=repo)

    founder = node(0, None)
    nodes = [founder]
    try:
        founder.ready(30)
        member = node(1, founder.addr)
        nodes.append(member)
        member.ready(30)
        pair = founder.wait_view(lambda m: len(m) == 2, 30, "view of two")
        member.wait_view(lambda m: len(m) == 2, 30, "view of two")
        t0 = time.monotonic()
        member.kill9()
        alone = founder.wait_view(lambda m: m == [founder.node_id], 10, "view of one", after=pair["epoch"])
        took = time.monotonic() - t0
        print(f"kill -9 -> view of one at the survivor: {took:.2f}s")
        assert took < 5, took
        third = node(2, founder.addr)
        nodes.append(third)
        third.ready(30)
        ids = {founder.node_id, third.node_id}
        founder.wait_view(lambda m: set(m) == ids, 30, "view with the third", after=alone["epoch"])
        third.wait_view(lambda m: set(m) == ids, 30, "view with the third")
        assert not any(r.get("event") == "quorum_lost" for r in founder.records), "a proven death is no minority"
    finally:
        for n in nodes:
            n.stop()
