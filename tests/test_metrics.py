"""The metrics out: this node's Prometheus endpoint and the Lightning loggers.

Scenarios: a scrape with no token, a wrong one and the right one; a node
without a secret refusing to serve beyond loopback; garbage, oversized and
truncated requests and a flood of connections each answered with a clear
error while the endpoint keeps serving; trace records becoming the
documented metrics; and two real Lightning nodes scraped over HTTP while
they train, whose CSV log holds the cluster's ``chaos/...`` values.
"""

from __future__ import annotations

import csv
import select
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

pytest.importorskip("prometheus_client")
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from chaos_lightning.metrics import (  # noqa: E402
    MAX_CONNECTIONS,
    MAX_HEAD_BYTES,
    MetricsExporter,
    scrape_token,
    start_metrics,
)
from chaos_lightning.monitor import Monitor  # noqa: E402
from chaos_lightning.strategy.trace import Trace  # noqa: E402
from chaos_lightning.testbed.procs import free_ports  # noqa: E402
from chaos_lightning.wire.auth import InsecureBind  # noqa: E402

from _procs import REPO, Node  # noqa: E402

SECRET = b"metrics-test-secret-0123456789"
WORKER = Path(__file__).with_name("_train_worker.py")


def scrape(addr: tuple[str, int], token: str | None = None, path: str = "/metrics") -> tuple[int, str]:
    req = urllib.request.Request(f"http://{addr[0]}:{addr[1]}{path}",
                                 headers={"Authorization": f"Bearer {token}"} if token else {})
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def samples(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample of an exposition, keyed by name and sorted labels."""
    return {(s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text) for s in fam.samples}


def value(text: str, name: str, **labels: str) -> float:
    return samples(text)[(name, tuple(sorted(labels.items())))]


def raw(addr: tuple[str, int], data: bytes, *, close_write: bool = True, timeout: float = 10) -> bytes:
    """Send ``data`` on a fresh connection and read the whole answer."""
    with socket.create_connection(addr, timeout=timeout) as s:
        try:
            s.sendall(data)
            if close_write:
                s.shutdown(socket.SHUT_WR)
        except OSError:
            pass  # the server answered and closed before taking it all (a refusal): read the answer
        out = b""
        while chunk := s.recv(65536):
            out += chunk
        return out


@pytest.fixture
def endpoint():
    """An exporter with a secret, fed by a trace, serving on a free loopback port."""
    trace = Trace(None)
    trace.node = "a"
    monitor = Monitor("a")
    ex = start_metrics("127.0.0.1:0", secret=SECRET, trace=trace, monitor=lambda: monitor)
    try:
        yield ex, trace, monitor
    finally:
        ex.close()


# ---------------------------------------------------------------- who may scrape
def test_a_scrape_needs_the_token_derived_from_the_secret(endpoint):
    ex, _, _ = endpoint
    code, body = scrape(ex.address)
    assert code == 401 and "chaos_world_size" not in body
    code, body = scrape(ex.address, "0" * 64)
    assert code == 401 and "chaos_world_size" not in body
    code, body = scrape(ex.address, SECRET.decode())  # the secret itself is no token
    assert code == 401 and "chaos_world_size" not in body
    code, body = scrape(ex.address, scrape_token(SECRET))
    assert code == 200 and value(body, "chaos_rank") == -1
    assert scrape(ex.address, scrape_token(SECRET), "/other")[0] == 404


def test_the_token_command_prints_the_token_and_refuses_without_a_secret():
    env = {"PATH": "/usr/bin:/bin", "CHAOS_SECRET": SECRET.decode()}
    out = subprocess.run([sys.executable, "-m", "chaos_lightning.metrics", "token"], cwd=REPO, env=env,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and out.stdout.strip() == scrape_token(SECRET), out.stderr
    assert len(out.stdout.strip()) == 64 and SECRET.decode() not in out.stdout
    out = subprocess.run([sys.executable, "-m", "chaos_lightning.metrics", "token"], cwd=REPO,
                         env={"PATH": "/usr/bin:/bin"}, capture_output=True, text=True, timeout=60)
    assert out.returncode == 2 and "CHAOS_SECRET is not set" in out.stderr


def test_without_a_secret_only_loopback_is_served_and_no_token_is_asked():
    ex = MetricsExporter(secret=None)
    for host in ("0.0.0.0:0", "192.0.2.1:0", "[::]:0"):
        with pytest.raises(InsecureBind):
            ex.serve(host)
    assert ex.address is None
    try:
        ex.serve("127.0.0.1:0")
        code, body = scrape(ex.address)
        assert code == 200 and "chaos_steps_committed_total" in body
    finally:
        ex.close()


# ---------------------------------------------------------------- bad input
def test_garbage_oversized_and_truncated_requests_get_a_clear_error_and_the_endpoint_serves_on(endpoint):
    ex, _, _ = endpoint
    addr, token = ex.address, scrape_token(SECRET)
    assert raw(addr, b"\x00\xff garbage \x16\x03\x01\r\n\r\n").startswith(b"HTTP/1.0 400")
    assert raw(addr, b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + bytes(200)).startswith(b"HTTP/1.0 400")  # TLS
    huge_line = b"GET /metrics?" + b"a" * (2 * MAX_HEAD_BYTES) + b" HTTP/1.1\r\n\r\n"
    assert raw(addr, huge_line).startswith(b"HTTP/1.0 431")
    many_headers = b"GET /metrics HTTP/1.1\r\n" + b"".join(b"X-%d: %s\r\n" % (i, b"v" * 100) for i in range(200))
    assert raw(addr, many_headers + b"\r\n").startswith(b"HTTP/1.0 431")
    # truncated: the head stops mid-way and the client closes its side
    assert raw(addr, b"GET /metrics HTTP/1.1\r\nAuthorization: Bea").startswith(b"HTTP/1.0 401")
    assert raw(addr, b"GET /metr").startswith(b"HTTP/1.0 404")  # an HTTP/0.9-style line
    assert raw(addr, b"") == b""
    assert raw(addr, b"POST /metrics HTTP/1.1\r\nContent-Length: 5\r\n\r\nhello").startswith(b"HTTP/1.0 501")
    # the good scrape still works, through the raw socket too
    answer = raw(addr, b"GET /metrics HTTP/1.1\r\nAuthorization: Bearer " + token.encode() + b"\r\n\r\n")
    assert answer.startswith(b"HTTP/1.0 200") and b"chaos_world_size" in answer
    assert scrape(addr, token)[0] == 200


def test_a_client_that_stops_sending_is_dropped_within_the_timeout(endpoint, monkeypatch):
    import chaos_lightning.metrics as metrics

    monkeypatch.setattr(metrics, "REQUEST_TIMEOUT_S", 0.5)
    ex, _, _ = endpoint
    t0 = time.monotonic()
    # a slow drip: a byte at a time, never finishing the head
    with socket.create_connection(ex.address, timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\n")
        for _ in range(100):  # a byte every 50 ms, until the server answers (or 5 s)
            if select.select([s], [], [], 0.05)[0]:
                break
            s.sendall(b"X")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.0 408"), answer[:80]
    assert time.monotonic() - t0 < 5
    assert scrape(ex.address, scrape_token(SECRET))[0] == 200


def test_a_flood_of_connections_gets_503_beyond_the_cap_and_the_endpoint_recovers(endpoint):
    ex, _, _ = endpoint
    idle = [socket.create_connection(ex.address, timeout=10) for _ in range(MAX_CONNECTIONS + 40)]
    try:
        # the connections past the cap are answered 503 at once, without waiting for a request
        busy = 0
        for s in idle[MAX_CONNECTIONS + 5:]:
            s.settimeout(5)
            if s.recv(200).startswith(b"HTTP/1.0 503"):
                busy += 1
        assert busy >= 30, busy
    finally:
        for s in idle:
            s.close()
    # the held slots free up as their clients close: scrapes work again within a bounded wait
    deadline = time.monotonic() + 10
    while True:
        code, _ = scrape(ex.address, scrape_token(SECRET))
        if code == 200 or time.monotonic() > deadline:
            break
        time.sleep(0.2)
    assert code == 200


# ---------------------------------------------------------------- what it exports
def test_trace_records_become_the_documented_metrics(endpoint):
    ex, trace, monitor = endpoint
    assert trace.enabled  # a subscriber without a file: the strategy emits for it
    monitor.record_rtt("b", 0.004)
    monitor.record_transfer("b", 50_000_000, 0.5, "down")
    trace.emit("view_committed", epoch=2, members=["a", "b"], down_links=[])
    trace.emit("view_committed", epoch=3, members=["a", "b", "c"], down_links=[])
    trace.emit("pull", bytes=50_000_000, seconds=0.5, load_s=0.01, sources=[])
    trace.emit("trainers", epoch=3, world=3, trainers=["c", "a", "b"], stall_s=0.7, joined=True, failed_step=False)
    trace.emit("step", step=10, samples=12, world=3)
    time.sleep(0.1)
    trace.emit("step", step=11, samples=12, world=3)
    trace.emit("step_failed", step=12)
    trace.emit("trainers", epoch=3, world=3, trainers=["c", "a", "b"], stall_s=0.2, joined=False, failed_step=True)
    trace.emit("trainers", epoch=4, world=3, trainers=["c", "a", "b"], stall_s=0.0, joined=False,
               failed_step=False, adopted=True)
    text = scrape(ex.address, scrape_token(SECRET))[1]
    assert value(text, "chaos_view_epoch") == 4
    assert value(text, "chaos_view_latest_epoch") == 3
    assert value(text, "chaos_views_committed_total") == 2
    assert value(text, "chaos_world_size") == 3
    assert value(text, "chaos_rank") == 1
    assert value(text, "chaos_steps_committed_total") == 2
    assert value(text, "chaos_steps_failed_total") == 1
    assert value(text, "chaos_global_step") == 11
    assert value(text, "chaos_global_samples_per_step") == 12
    assert value(text, "chaos_samples_per_step") == 4  # the equal split of 12 over 3
    assert 4 / 0.5 < value(text, "chaos_samples_per_second") < 4 / 0.1 + 1e-6
    assert 12 / 0.5 < value(text, "chaos_group_samples_per_second") <= 12 / 0.1 + 1e-6
    # two switches (the adopted epoch is none), each with its stall and cause
    assert value(text, "chaos_switch_stall_seconds_count", cause="join") == 1
    assert value(text, "chaos_switch_stall_seconds_sum", cause="join") == pytest.approx(0.7)
    assert value(text, "chaos_switch_stall_seconds_count", cause="failed_step") == 1
    assert value(text, "chaos_state_pull_bytes_total") == 50_000_000
    assert value(text, "chaos_state_pull_seconds_count") == 1
    assert value(text, "chaos_events_total", event="trainers") == 3
    assert value(text, "chaos_node_info", node="a") == 1
    # the monitor, read at the scrape
    assert value(text, "chaos_link_rtt_seconds", peer="b") == pytest.approx(0.004)
    assert value(text, "chaos_link_bandwidth_bytes_per_second", peer="b", direction="down") > 0
    assert value(text, "chaos_link_transfer_bytes_total", peer="b", direction="down") == 50_000_000
    assert value(text, "chaos_cpu_count") >= 1
    assert value(text, "chaos_memory_total_bytes") > value(text, "chaos_memory_available_bytes") > 0
    assert "process_cpu_seconds_total" in text


def test_a_shares_record_sets_this_ranks_share_and_rate(endpoint):
    ex, trace, _ = endpoint
    trace.emit("trainers", epoch=1, world=2, trainers=["b", "a"], stall_s=0.1, joined=False, failed_step=False)
    trace.emit("shares", samples=[6, 2], rates=[300.0, 100.0], reason="straggler b")
    trace.emit("step", step=1, samples=8, world=2)
    text = scrape(ex.address, scrape_token(SECRET))[1]
    assert value(text, "chaos_samples_per_step") == 2
    assert value(text, "chaos_samples_per_second") == 100.0
    assert value(text, "chaos_member_samples_per_step", rank="0") == 6
    assert value(text, "chaos_member_samples_per_second", rank="1") == 100.0
    assert value(text, "chaos_share_changes_total", reason="straggler b") == 1
    # another world: the old layout no longer applies, the equal split does
    trace.emit("trainers", epoch=2, world=4, trainers=["b", "a", "c", "d"], stall_s=0.1, joined=True,
               failed_step=False)
    trace.emit("step", step=2, samples=8, world=4)
    text = scrape(ex.address, scrape_token(SECRET))[1]
    assert value(text, "chaos_samples_per_step") == 2 and "chaos_member_samples_per_step" not in text


def test_a_failing_subscriber_never_fails_the_emitter_and_no_reader_costs_nothing():
    trace = Trace(None)
    assert not trace.enabled
    seen: list[str] = []

    def broken(rec):
        raise RuntimeError("boom")

    trace.subscribe(broken)
    trace.subscribe(lambda rec: seen.append(rec["ev"]))
    trace.emit("step", step=1)
    trace.emit("step", step=2)
    assert seen == ["step", "step"]
    trace.unsubscribe(broken)
    trace.close()
    assert not trace.enabled
    trace.emit("step", step=3)
    assert seen == ["step", "step"]


# ---------------------------------------------------------------- two real nodes
def test_two_nodes_are_scraped_while_training_and_the_csv_log_holds_the_cluster_values(tmp_path):
    gate = tmp_path / "scraped"
    csv_dir = tmp_path / "csv"
    ports = free_ports(4)  # distinct: two agents and their two endpoints
    binds = [f"127.0.0.1:{p}" for p in ports[:2]]
    metrics_at = [("127.0.0.1", p) for p in ports[2:]]
    nodes = [
        Node(WORKER, ["48", "2", "0.02"], {
            "CHAOS_BIND": binds[i], "CHAOS_PEERS": "" if i == 0 else binds[0], "CHAOS_MIN_NODES": "2",
            "CHAOS_SECRET": SECRET.decode(), "CHAOS_METRICS": f"{metrics_at[i][0]}:{metrics_at[i][1]}",
            "CHAOS_TEST_CSV": str(csv_dir), **({"CHAOS_TEST_HOLD": f"4:{gate}"} if i == 0 else {}),
        }, tmp_path / f"n{i}.log")
        for i in range(2)
    ]
    token = scrape_token(SECRET)
    try:
        nodes[0].event("holding", 60)  # node 0 after its 4th step, node 1 waiting for it in the next
        texts = []
        for addr in metrics_at:
            assert scrape(addr)[0] == 401
            # the monitor's first RTT to the peer comes with a SWIM probe: re-scrape for it (bounded)
            deadline = time.monotonic() + 10
            while True:
                code, text = scrape(addr, token)
                assert code == 200, text
                if any(k[0] == "chaos_link_rtt_seconds" for k in samples(text)) or time.monotonic() > deadline:
                    break
                time.sleep(0.2)
            texts.append(text)
        gate.touch()
        for text in texts:
            assert value(text, "chaos_world_size") == 2
            assert value(text, "chaos_view_epoch") >= 1
            assert value(text, "chaos_steps_committed_total") >= 3
            assert value(text, "chaos_samples_per_step") == 4  # batch_size 4 per rank, equal shares
            assert value(text, "chaos_cpu_count") >= 1
            assert samples(text)[("chaos_switch_stall_seconds_count", (("cause", "join"),))] >= 0
            assert any(k[0] == "chaos_link_rtt_seconds" for k in samples(text)), "the monitor's RTT to the peer"
        assert value(texts[0], "chaos_steps_committed_total") >= 4
        assert sorted(value(t, "chaos_rank") for t in texts) == [0, 1]
        for node in nodes:
            node.event("done", 60)
            assert node.exit_code(30) == 0, node.log
        rows = list(csv.DictReader((csv_dir / "run" / "version_0" / "metrics.csv").open()))
        # each switch, at its step (the strategy), and the steady series at every
        # log_every_n_steps (1 here) applied step, from rank 0 alone (LogClusterMetrics)
        switches = [r for r in rows if r.get("chaos/stall_s")]
        assert [(r["step"], float(r["chaos/world_size"])) for r in switches] == [("0", 2.0)], rows[:3]
        steady = [r for r in rows if r.get("chaos/samples_per_step")]
        assert sorted(int(r["step"]) for r in steady) == list(range(1, 13)), rows  # every applied step, once
        assert {(float(r["chaos/world_size"]), float(r["chaos/samples_per_step"])) for r in steady} == {(2.0, 8.0)}
        assert {r["chaos/view_epoch"] for r in steady} == {switches[0]["chaos/view_epoch"]}
    finally:
        gate.touch()
        for node in nodes:
            node.stop()
