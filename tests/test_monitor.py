"""Scenarios for the cluster monitor: link estimates, topology, snapshots, resources.

Everything runs on a fake clock (``now=`` arguments): no sleeps, no sockets.
"""

from __future__ import annotations

import json
import math
import random
import sys
import threading
import time
import types

import msgpack
import pytest

from chaos_lightning.monitor import (
    MIN_TRANSFER_BYTES,
    LinkStats,
    Monitor,
    Resources,
    Topology,
    estimate_bandwidth,
    sample_resources,
)
from chaos_lightning.monitor import resources as resources_mod

try:
    from chaos_lightning.membership.view import Member, View
except ModuleNotFoundError as exc:  # TEMPORARY: wire.schema not written yet
    if exc.name not in ("chaos_lightning.wire", "chaos_lightning.wire.schema"):
        raise
    _schema = types.ModuleType("chaos_lightning.wire.schema")
    _schema.message = lambda name: (lambda cls: cls)
    sys.modules["chaos_lightning.wire.schema"] = _schema
    from chaos_lightning.membership.view import Member, View

    del sys.modules["chaos_lightning.wire.schema"]

MiB = 1 << 20


def view_of(ids, down=(), epoch=1) -> View:
    return View(epoch, tuple(Member(i) for i in ids), tuple(sorted(tuple(sorted(p)) for p in down)))


# -- links -----------------------------------------------------------------------------


def test_rtt_first_sample_follows_rfc6298_initialisation():
    links = LinkStats()
    links.record_rtt("b", 0.010, now=0.0)
    assert links.rtt("b", now=0.0) == pytest.approx(0.010)
    assert links.rtt_var("b", now=0.0) == pytest.approx(0.005)  # R/2
    assert links.rtt_min("b", now=0.0) == pytest.approx(0.010)


def test_rtt_ewma_converges_and_tracks_jitter():
    """A steady 10 ms link, then the same mean with +-2 ms jitter, then a route
    change to 30 ms: SRTT follows the mean, RTTVAR grows with jitter, min keeps
    the floor."""
    links = LinkStats()
    t = 0.0
    for _ in range(60):
        t += 1.0
        links.record_rtt("b", 0.010, now=t)
    assert links.rtt("b", now=t) == pytest.approx(0.010, rel=1e-3)
    steady_var = links.rtt_var("b", now=t)
    assert steady_var < 1e-4  # jitter-free: the deviation decays towards 0

    rng = random.Random(7)
    for _ in range(200):
        t += 0.1
        links.record_rtt("b", 0.010 + rng.choice((-0.002, 0.002)), now=t)
    assert links.rtt("b", now=t) == pytest.approx(0.010, abs=0.001)
    # Mean deviation of +-2 ms noise around its mean is ~2 ms.
    assert 0.001 < links.rtt_var("b", now=t) < 0.004
    assert links.rtt_min("b", now=t) == pytest.approx(0.008)

    for _ in range(40):  # gain 1/8: 40 samples leave (7/8)^40 < 0.5 % of the old value
        t += 0.1
        links.record_rtt("b", 0.030, now=t)
    assert links.rtt("b", now=t) == pytest.approx(0.030, abs=0.0005)


def test_bogus_rtt_samples_are_ignored():
    links = LinkStats()
    links.record_rtt("b", 0.01, now=0.0)
    for bad in (-1.0, math.nan, math.inf):
        links.record_rtt("b", bad, now=1.0)
    assert links.rtt("b", now=1.0) == pytest.approx(0.01)


def test_tiny_transfers_are_ignored_for_bandwidth():
    links = LinkStats()
    assert not links.record_transfer("b", 1024, 0.0001, "down", now=0.0)
    assert not links.record_transfer("b", MIN_TRANSFER_BYTES - 1, 0.0001, "down", now=0.0)
    assert not links.record_transfer("b", 10 * MiB, 0.0, "down", now=0.0)  # no duration
    assert links.bandwidth("b", "down", now=0.0) is None
    assert links.age("b", now=1.0) == pytest.approx(1.0)  # but the peer was seen

    assert links.record_transfer("b", 100 * MiB, 1.0, "down", now=2.0)
    assert links.bandwidth("b", "down", now=2.0) == pytest.approx(100 * MiB)
    assert links.bandwidth("b", "up", now=2.0) is None  # directions are separate


def test_bandwidth_is_weighted_by_bytes():
    """A 64 KiB probe that looked slow barely moves an estimate built on a
    100 MiB shard."""
    links = LinkStats()
    links.record_transfer("b", 100 * MiB, 1.0, "up", now=0.0)  # 100 MiB/s
    links.record_transfer("b", 64 * 1024, 0.01, "up", now=0.0)  # 6.4 MiB/s
    bw = links.bandwidth("b", "up", now=0.0)
    assert 98 * MiB < bw < 100 * MiB  # the probe weighs 64 KiB against 4 MiB (the cap)


def test_bandwidth_follows_a_link_that_slowed_down():
    links = LinkStats(staleness_s=60.0)
    links.record_transfer("b", 100 * MiB, 1.0, "down", now=0.0)  # 100 MiB/s
    for t in (20.0, 21.0):  # the link was reshaped to 10 MiB/s
        links.record_transfer("b", 10 * MiB, 1.0, "down", now=t)
    # The old sample decayed by 2^(-20/10) = 1/4, and its bytes count only up to
    # the 4 MiB cap, so two fresh samples outweigh it about 8:1.
    assert links.bandwidth("b", "down", now=21.0) < 30 * MiB


def test_stale_estimates_expire():
    links = LinkStats(staleness_s=60.0)
    links.record_rtt("b", 0.005, now=0.0)
    links.record_transfer("b", 10 * MiB, 0.1, "up", now=0.0)
    assert links.rtt("b", now=59.0) is not None
    assert links.bandwidth("b", "up", now=59.0) is not None
    assert links.rtt("b", now=61.0) is None
    assert links.bandwidth("b", "up", now=61.0) is None
    assert links.age("b", now=61.0) == pytest.approx(61.0)

    # A fresh sample after staleness restarts the estimate rather than averaging
    # with a minute-old one.
    links.record_rtt("b", 0.050, now=61.0)
    assert links.rtt("b", now=61.0) == pytest.approx(0.050)
    assert links.rtt_min("b", now=61.0) == pytest.approx(0.050)

    assert links.expire(now=200.0) == ["b"]
    assert links.age("b", now=200.0) is None


def test_forget_drops_a_peer():
    links = LinkStats()
    links.record_rtt("b", 0.005, now=0.0)
    links.forget("b")
    links.forget("never-seen")
    assert links.rtt("b", now=0.0) is None and links.age("b", now=0.0) is None


def test_estimate_bandwidth_of_an_active_probe():
    # 10 MiB in 110 ms with a 10 ms RTT: 100 ms of payload.
    assert estimate_bandwidth(10 * MiB, 0.110, 0.010) == pytest.approx(100 * MiB)
    assert estimate_bandwidth(10 * MiB, 0.1) == pytest.approx(100 * MiB)  # RTT unknown
    # An RTT sample larger than the whole probe (jitter) stays positive and finite.
    bw = estimate_bandwidth(MiB, 0.001, 0.002)
    assert 0 < bw < math.inf
    assert estimate_bandwidth(0, 1.0, 0.0) == 0.0
    assert estimate_bandwidth(MiB, 0.0, 0.0) == 0.0


def test_bad_direction_is_rejected():
    links = LinkStats()
    with pytest.raises(ValueError):
        links.record_transfer("b", MiB, 1.0, "sideways", now=0.0)  # type: ignore[arg-type]


# -- topology -----------------------------------------------------------------------------


def test_nearest_ranks_fast_then_slow_then_unknown():
    """Three peers, one measured fast, one slow, one never: the joiner pulls
    from the fast one first."""
    links = LinkStats()
    links.record_transfer("slow", 10 * MiB, 1.0, "down", now=0.0)
    links.record_transfer("fast", 100 * MiB, 1.0, "down", now=0.0)
    links.record_rtt("slow", 0.050, now=0.0)
    links.record_rtt("fast", 0.001, now=0.0)
    topo = Topology(view_of(["me", "unknown", "slow", "fast"]), links, origin="me", now=0.0)
    assert topo.nearest("me", 3) == ["fast", "slow", "unknown"]
    assert topo.nearest("me", 3, by="rtt") == ["fast", "slow", "unknown"]
    assert topo.nearest("me", 1) == ["fast"]
    # Nothing measured in the "up" direction: all unknown, ranked by id.
    assert topo.nearest("me", direction="up") == ["fast", "slow", "unknown"]
    # Seen from a peer, its link to "me" is the only one measured; this node
    # measured "me" -> peer as down, so the peer's "up" is known.
    assert topo.nearest("fast", direction="up") == ["me", "slow", "unknown"]


def test_nearest_ties_break_by_id_and_skips_down_links():
    links = LinkStats()
    for p in ("c", "b", "d"):
        links.record_transfer(p, 10 * MiB, 1.0, "down", now=0.0)
    topo = Topology(view_of(["a", "d", "c", "b"], down=[("a", "d")]), links, origin="a", now=0.0)
    assert topo.nearest("a") == ["b", "c"]


def test_topology_with_a_down_link():
    """a-b is down: not reachable directly, the path goes around through c."""
    topo = Topology(view_of(["a", "b", "c", "d"], down=[("a", "b")]))
    assert not topo.reachable("a", "b") and not topo.reachable("b", "a")
    assert topo.reachable("a", "c")
    assert topo.neighbors("a") == ["c", "d"]
    assert topo.path("a", "b") == ["a", "c", "b"]
    assert topo.path("a", "c") == ["a", "c"]
    assert topo.components() == [["a", "b", "c", "d"]]
    assert {(a, b) for a, b, _ in topo.edges()} == {
        ("a", "c"), ("a", "d"), ("b", "c"), ("b", "d"), ("c", "d")
    }


def test_topology_partitioned_into_components():
    """{a,b,c} cut off from {d,e} by every cross link going down."""
    left, right = ["a", "b", "c"], ["d", "e"]
    down = [(x, y) for x in left for y in right]
    topo = Topology(view_of(left + right, down=down))
    assert topo.components() == [left, right]
    assert topo.path("a", "e") is None
    assert topo.path("d", "e") == ["d", "e"]
    assert topo.neighbors("d") == ["e"]


def test_topology_line_graph_path_is_shortest():
    """Only the chain a-b-c-d-e is up: the only path is the whole chain."""
    ids = ["a", "b", "c", "d", "e"]
    chain = {tuple(sorted(p)) for p in zip(ids, ids[1:])}
    down = [(x, y) for i, x in enumerate(ids) for y in ids[i + 1 :] if (x, y) not in chain]
    topo = Topology(view_of(ids, down=down))
    assert topo.path("a", "e") == ids
    assert topo.path("e", "a") == ids[::-1]
    assert topo.components() == [ids]


def test_edge_attributes_come_from_the_origins_measurements():
    links = LinkStats()
    links.record_rtt("b", 0.002, now=0.0)
    links.record_transfer("b", 10 * MiB, 0.1, "up", now=0.0)
    topo = Topology(view_of(["a", "b", "c"]), links, origin="a", now=0.0)
    assert topo.edge("a", "b") == {
        "rtt": pytest.approx(0.002),
        "rtt_var": pytest.approx(0.001),
        "bandwidth": pytest.approx(100 * MiB),
    }
    assert topo.edge("b", "a") == {
        "rtt": pytest.approx(0.002),
        "rtt_var": pytest.approx(0.001),
        "bandwidth_reverse": pytest.approx(100 * MiB),
    }
    assert topo.edge("b", "c") == {}  # not this node's link to measure
    assert Topology(view_of(["a", "b"], down=[("a", "b")])).edge("a", "b") is None


def test_unknown_node_raises():
    topo = Topology(view_of(["a", "b"]))
    with pytest.raises(KeyError):
        topo.neighbors("zz")
    assert not topo.reachable("a", "zz")


def test_thousand_member_view_is_fast():
    """1,000 members (~500k up links) with 50 down links: the scheduler's
    questions each answer in well under 50 ms."""
    ids = [f"n{i:04d}" for i in range(1000)]
    rng = random.Random(1)
    down = {tuple(sorted(rng.sample(ids, 2))) for _ in range(50)}
    down |= {tuple(sorted(("n0000", x))) for x in ids[1:11]}
    links = LinkStats()
    for i, p in enumerate(ids[20:220]):
        links.record_transfer(p, 10 * MiB, 0.01 * (1 + i % 7), "down", now=0.0)
        links.record_rtt(p, 0.001 * (1 + i % 5), now=0.0)
    view = view_of(ids, down=down)

    t0 = time.perf_counter()
    topo = Topology(view, links, origin="n0000", now=0.0)
    built = time.perf_counter() - t0
    t0 = time.perf_counter()
    nb = topo.neighbors("n0000")
    near = topo.nearest("n0000", 8)
    near_rtt = topo.nearest("n0000", 8, by="rtt")
    path = topo.path("n0000", "n0005")
    comps = topo.components()
    queried = time.perf_counter() - t0

    assert len(nb) == 999 - len([d for d in down if "n0000" in d])
    assert len(near) == 8 and near[0] in ids[20:220]
    assert len(near_rtt) == 8
    assert path is not None and len(path) == 3  # n0000-n0005 is down: one hop around
    assert len(comps) == 1
    assert built < 0.05, built
    assert queried < 0.05, queried


# -- monitor -------------------------------------------------------------------------------


def test_snapshot_is_plain_msgpackable_data():
    mon = Monitor("a", resource_interval_s=1.0)
    mon.set_view(view_of(["a", "b", "c"], down=[("b", "c")], epoch=3))
    mon.record_rtt("b", 0.002, now=10.0)
    mon.record_transfer("b", 10 * MiB, 0.08, "up", now=10.0)
    mon.record_transfer("b", 1000, 0.001, "down", now=10.0)  # counted, not estimated
    mon.record_transfer("c", 5 * MiB, 0.5, "down", now=10.0)

    snap = mon.snapshot(now=11.0)
    assert msgpack.unpackb(msgpack.packb(snap)) == snap
    json.dumps(snap)  # and JSON, for the CLI

    assert snap["node"] == "a" and snap["time"] == 11.0
    assert snap["view"] == {"epoch": 3, "members": ["a", "b", "c"], "down_links": [["b", "c"]]}
    b = snap["links"]["b"]
    assert b["rtt_ms"] == pytest.approx(2.0)
    assert b["rtt_var_ms"] == pytest.approx(1.0)
    assert b["bw_up_mbit"] == pytest.approx(10 * MiB / 0.08 * 8 / 1e6)
    assert b["bw_down_mbit"] is None
    assert b["age_s"] == pytest.approx(1.0)
    assert snap["links"]["c"]["rtt_ms"] is None
    assert snap["transfers"] == {
        "b": {"sent_bytes": 10 * MiB, "recv_bytes": 1000, "count": 2},
        "c": {"sent_bytes": 0, "recv_bytes": 5 * MiB, "count": 1},
    }
    assert snap["resources"]["cpu_count"] >= 1


def test_snapshot_before_any_view():
    snap = Monitor("solo").snapshot(now=0.0)
    assert snap["view"] is None and snap["links"] == {} and snap["transfers"] == {}
    msgpack.packb(snap)
    with pytest.raises(RuntimeError):
        Monitor("solo").topology()


def test_snapshot_drops_links_gone_stale():
    mon = Monitor("a", staleness_s=60.0)
    mon.record_rtt("b", 0.002, now=0.0)
    assert "b" in mon.snapshot(now=30.0)["links"]
    assert "b" not in mon.snapshot(now=100.0)["links"]


def test_resources_are_resampled_at_most_every_interval(monkeypatch):
    calls = []
    real = resources_mod.sample_resources

    def counting():
        calls.append(1)
        return real()

    monkeypatch.setattr("chaos_lightning.monitor.monitor.sample_resources", counting)
    mon = Monitor("a", resource_interval_s=1.0)
    for t in (0.0, 0.1, 0.5, 0.99):
        mon.snapshot(now=t)
    assert len(calls) == 1
    mon.snapshot(now=1.0)
    mon.snapshot(now=1.5)
    assert len(calls) == 2


def test_monitor_topology_uses_view_and_links():
    mon = Monitor("a")
    mon.set_view(view_of(["a", "b", "c", "d"], down=[("a", "d")]))
    mon.record_transfer("c", 50 * MiB, 1.0, "down", now=0.0)
    mon.record_transfer("b", 5 * MiB, 1.0, "down", now=0.0)
    topo = mon.topology(now=1.0)
    assert topo.nearest("a") == ["c", "b"]
    assert not topo.reachable("a", "d")


def test_monitor_is_safe_with_a_writer_and_readers():
    """The agent thread writes while status requests read: no exceptions, and
    every transfer counted."""
    mon = Monitor("a", resource_interval_s=0.0)
    mon.set_view(view_of(["a"] + [f"p{i}" for i in range(10)]))
    errors: list[BaseException] = []
    n = 2000

    def writer():
        try:
            for i in range(n):
                peer = f"p{i % 10}"
                mon.record_rtt(peer, 0.001 + (i % 3) * 1e-4)
                mon.record_transfer(peer, MiB, 0.01, "up" if i % 2 else "down")
        except BaseException as e:  # pragma: no cover - reported below
            errors.append(e)

    def reader():
        try:
            for _ in range(100):
                msgpack.packb(mon.snapshot())
                mon.topology().nearest("a", 3)
        except BaseException as e:  # pragma: no cover
            errors.append(e)

    threads = [threading.Thread(target=writer)] + [threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert sum(c.count for c in mon.transfers().values()) == n


# -- resources -----------------------------------------------------------------------------


def test_resources_are_plausible():
    r = sample_resources()
    assert isinstance(r, Resources)
    assert r.cpu_count >= 1
    assert 0.0 <= r.cpu_percent <= 100.0
    assert r.mem_total_bytes > r.mem_available_bytes > 0
    assert r.net_bytes_sent >= 0 and r.net_bytes_recv >= 0
    msgpack.packb(r.as_dict())


def test_gpus_reported_only_when_torch_already_uses_cuda(monkeypatch):
    """The monitor never imports torch nor initialises CUDA itself."""
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert resources_mod._sample_gpus() == ()
    assert "torch" not in sys.modules

    props = types.SimpleNamespace(name="Fake H100", total_memory=80 * (1 << 30))
    initialized = {"value": False}
    cuda = types.SimpleNamespace(
        is_available=lambda: True,
        is_initialized=lambda: initialized["value"],
        device_count=lambda: 2,
        get_device_properties=lambda i: props,
        memory_reserved=lambda i: 1 << 30 if i == 0 else 0,
    )
    monkeypatch.setitem(sys.modules, "torch", types.SimpleNamespace(cuda=cuda))
    assert resources_mod._sample_gpus() == ()  # CUDA not initialised: hands off
    initialized["value"] = True
    gpus = resources_mod._sample_gpus()
    assert [(g.index, g.name, g.mem_total, g.mem_used) for g in gpus] == [
        (0, "Fake H100", 80 << 30, 1 << 30),
        (1, "Fake H100", 80 << 30, 0),
    ]
    r = sample_resources()
    assert msgpack.unpackb(msgpack.packb(r.as_dict()))["gpus"][0]["name"] == "Fake H100"
