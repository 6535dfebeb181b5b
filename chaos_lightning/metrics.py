"""This node's Prometheus endpoint: views, steps, stalls, shares, and the monitor's readings.

Role in the whole: the strategy's timeline already goes through one place,
:class:`~chaos_lightning.strategy.trace.Trace`; :class:`MetricsExporter` is a
subscriber of it (a record becomes a counter, gauge or histogram update, a few
microseconds on the emitting thread), and reads the agent's
:class:`~chaos_lightning.monitor.Monitor` only when scraped (a custom
collector), so nothing is sampled for a metric nobody asks for.  Off by
default: ``CHAOS_METRICS=host:port`` (or ``ChaosStrategy(metrics=...)``)
turns it on; the strategy starts it when the node opens and stops it when the
node closes.  The metric names are listed in README.md (Metrics).

Who may scrape (docs/security.md): the design's rule is that nothing answers
on the network without the cluster secret.  With ``CHAOS_SECRET`` set, every
scrape must carry ``Authorization: Bearer <token>``, where the token is
HMAC-SHA256(secret, ``chaos-metrics-v1``) in hex (:func:`scrape_token`;
``python -m chaos_lightning.metrics token`` prints it), so a Prometheus
configuration holds a token that reads metrics and nothing else, never the
secret that admits a node to the cluster.  A missing or wrong token gets 401
and no metric text.  Without a secret the endpoint binds only loopback, the
rule the agent follows (:func:`~chaos_lightning.wire.auth.check_bind_allowed`).
The token travels in clear text (plain HTTP, as Prometheus scrapes by
default): on a network you do not trust, put a TLS proxy in front or scrape
over loopback/SSH.

Bounded service: the standard library's ``http.server`` on daemon threads,
one request per connection, at most :data:`MAX_CONNECTIONS` at once (more get
503 at once, from the accepting thread), a request head of at most
:data:`MAX_HEAD_BYTES` (431 beyond), and :data:`REQUEST_TIMEOUT_S` for the
whole head, however slowly it drips in (408 after that).  Malformed request
lines get 400; a client that vanishes mid-request is dropped; nothing a client
sends reaches the training thread.

``prometheus_client`` (the ``metrics`` extra) is imported only when an
exporter is built: a node without ``CHAOS_METRICS`` never loads it.
"""

from __future__ import annotations

import hashlib
import hmac
import http.client
import logging
import os
import socket
import sys
import threading
import time
from collections.abc import Callable, Iterable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from chaos_lightning.wire.addr import format_hostport, parse_hostport
from chaos_lightning.wire.auth import check_bind_allowed

log = logging.getLogger("chaos_lightning.metrics")

__all__ = ["MAX_CONNECTIONS", "MAX_HEAD_BYTES", "REQUEST_TIMEOUT_S", "MetricsExporter", "scrape_token",
           "start_metrics"]

#: what the scrape token is derived for: another use of the secret derives another key
TOKEN_CONTEXT = b"chaos-metrics-v1"
#: a scrape's request head is a few hundred bytes (Prometheus sends about 250);
#: 8 KiB is the limit common servers (nginx's default large header buffer) use
MAX_HEAD_BYTES = 8192
#: Prometheus' default scrape timeout is 10 s; a request head that has not
#: arrived in 5 s on loopback or a LAN is a stuck or hostile client
REQUEST_TIMEOUT_S = 5.0
#: concurrent connections: a few Prometheus servers and a person with curl;
#: beyond that, 503 without a thread (a flood costs an accept and a send each)
MAX_CONNECTIONS = 8
#: the histograms' bounds: a view switch here takes 10 ms (same trainers) to
#: tens of seconds (a cold join at 200 MB, BENCHMARKS.md); a state pull likewise
_SECONDS_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


def scrape_token(secret: bytes | str) -> str:
    """The bearer token that reads this cluster's metrics: HMAC-SHA256(secret, ``chaos-metrics-v1``), hex."""
    key = secret.encode("utf-8") if isinstance(secret, str) else bytes(secret)
    return hmac.new(key, TOKEN_CONTEXT, hashlib.sha256).hexdigest()


def _prometheus() -> Any:
    try:
        import prometheus_client
    except ImportError as exc:  # pragma: no cover - depends on the install
        raise ImportError(
            "CHAOS_METRICS needs prometheus-client: pip install 'chaos-lightning[metrics]' "
            "(or unset CHAOS_METRICS)"
        ) from exc
    return prometheus_client


class _Series:
    """The metrics fed from trace records (the names README.md lists)."""

    def __init__(self, registry: Any) -> None:
        pc = _prometheus()
        g, c, h = pc.Gauge, pc.Counter, pc.Histogram
        r = {"registry": registry}
        self.view_epoch = g("chaos_view_epoch", "Epoch of the view this node trains in", **r)
        self.view_latest = g("chaos_view_latest_epoch", "Epoch of the newest committed view this node has learned", **r)
        self.views = c("chaos_views_committed", "Committed views this node has learned", **r)
        self.world = g("chaos_world_size", "Ranks in the group this node trains in", **r)
        self.rank = g("chaos_rank", "This node's rank in its group (-1 before it trains in one)", **r)
        self.rank.set(-1)
        self.global_step = g("chaos_global_step", "The last committed step's global step", **r)
        self.steps = c("chaos_steps_committed", "Steps this node committed (applied updates)", **r)
        self.failed = c("chaos_steps_failed", "Steps that failed here and applied no update", **r)
        self.step_samples = g("chaos_global_samples_per_step", "Samples the whole group trained in the last step", **r)
        self.share = g("chaos_samples_per_step", "This rank's share of the global batch (samples per step)", **r)
        self.rate = g("chaos_samples_per_second", "This rank's measured rate (samples per second)", **r)
        self.group_rate = g("chaos_group_samples_per_second", "The group's measured rate (samples per second)", **r)
        self.shares = c("chaos_share_changes", "Changes of the members' shares of the batch", ["reason"], **r)
        self.stall = h("chaos_switch_stall_seconds", "Time from the step boundary to training in the next group",
                       ["cause"], buckets=_SECONDS_BUCKETS, **r)
        self.pull_bytes = c("chaos_state_pull_bytes", "Bytes of training state this node pulled", **r)
        self.pull_s = h("chaos_state_pull_seconds", "Duration of each state pull", buckets=_SECONDS_BUCKETS, **r)
        self.pulls_failed = c("chaos_state_pulls_failed", "State pulls that failed", **r)
        self.events = c("chaos_events", "Trace records by kind (views, switches, sidelining, leaving, ...)",
                        ["event"], **r)


class MetricsExporter:
    """One node's metrics: a :class:`~chaos_lightning.strategy.trace.Trace`
    subscriber (:meth:`record`), a collector of the monitor's readings, and
    (after :meth:`serve`) the HTTP endpoint.

    ``monitor``: returns the agent's monitor or None (asked at each scrape:
    the agent starts after the exporter may).  ``secret``: the cluster secret
    (None: no token asked, loopback only)."""

    def __init__(self, *, secret: bytes | None = None, monitor: Callable[[], Any] | None = None) -> None:
        pc = _prometheus()
        self.registry = pc.CollectorRegistry(auto_describe=True)
        pc.ProcessCollector(registry=self.registry)  # this process's CPU seconds, memory, open files
        pc.PlatformCollector(registry=self.registry)
        self._series = _Series(self.registry)
        self._lock = threading.Lock()  # records come from the training and the agent threads
        self._monitor = monitor
        self._node = ""
        self._world = 0
        self._rank: int | None = None
        self._shares: dict[str, Any] | None = None  # the last "shares" record's samples and rates
        self._last_step_t: float | None = None
        self._last_share = 0
        self._latest_epoch = 0
        self.registry.register(_MonitorCollector(self))
        self._secret = None if secret is None else bytes(secret)
        self._expect = None if secret is None else f"Bearer {scrape_token(secret)}".encode()
        self._server: _Server | None = None
        self._thread: threading.Thread | None = None
        self._generate = pc.generate_latest
        self.content_type = pc.CONTENT_TYPE_LATEST

    # ---------------------------------------------------------------- records in
    def record(self, rec: dict[str, Any]) -> None:
        """One trace record (a :class:`~chaos_lightning.strategy.trace.Trace` subscriber)."""
        ev = rec.get("ev")
        s = self._series
        s.events.labels(event=str(ev)).inc()
        with self._lock:
            self._node = rec.get("node") or self._node
            if ev == "step":
                self._on_step(rec)
            elif ev == "step_failed":
                s.failed.inc()
            elif ev == "trainers":
                self._on_trainers(rec)
            elif ev == "view_committed":
                s.views.inc()
                self._latest_epoch = max(self._latest_epoch, int(rec.get("epoch") or 0))
                s.view_latest.set(self._latest_epoch)
            elif ev == "pull":
                s.pull_bytes.inc(rec.get("bytes") or 0)
                if rec.get("seconds") is not None:
                    s.pull_s.observe(rec["seconds"])
            elif ev == "pull_failed":
                s.pulls_failed.inc()
            elif ev == "shares":
                self._shares = {"samples": list(rec.get("samples") or ()), "rates": list(rec.get("rates") or ())}
                s.shares.labels(reason=str(rec.get("reason") or "unknown")).inc()
                self._apply_shares()

    def _on_trainers(self, rec: dict[str, Any]) -> None:
        s = self._series
        s.view_epoch.set(rec.get("epoch") or 0)
        self._world = int(rec.get("world") or 0)
        s.world.set(self._world)
        trainers = list(rec.get("trainers") or ())
        node = rec.get("node")
        self._rank = trainers.index(node) if node in trainers else None
        s.rank.set(-1 if self._rank is None else self._rank)
        if self._shares is not None and len(self._shares["samples"]) != self._world:
            self._shares = None  # another layout: the next "shares" record (or the equal split) says
        self._last_step_t = None  # the switch's stall is no step time
        if not rec.get("adopted"):  # the same group taking a newer view's epoch: no switch
            cause = "join" if rec.get("joined") else "failed_step" if rec.get("failed_step") else "view_change"
            s.stall.labels(cause=cause).observe(float(rec.get("stall_s") or 0.0))
        self._apply_shares()

    def _on_step(self, rec: dict[str, Any]) -> None:
        s = self._series
        s.steps.inc()
        if rec.get("step") is not None:
            s.global_step.set(rec["step"])
        total = int(rec.get("samples") or 0)
        s.step_samples.set(total)
        world = int(rec.get("world") or self._world or 1)
        if self._shares is None and self._rank is not None and self._rank < world:
            # equal shares: the sampler's split of the step's block (larger parts first)
            q, r = divmod(total, world)
            self._last_share = q + (1 if self._rank < r else 0)
            s.share.set(self._last_share)
        t = rec.get("t")
        if t is not None and self._last_step_t is not None and t > self._last_step_t:
            took = t - self._last_step_t
            s.group_rate.set(total / took)
            if self._shares is None or not self._shares["rates"]:
                s.rate.set(self._last_share / took)
        self._last_step_t = t

    def _apply_shares(self) -> None:
        sh, rank = self._shares, self._rank
        if sh is None or rank is None:
            return
        if rank < len(sh["samples"]):
            self._last_share = int(sh["samples"][rank])
            self._series.share.set(self._last_share)
        if rank < len(sh["rates"]) and sh["rates"][rank] is not None:
            self._series.rate.set(float(sh["rates"][rank]))

    def shares(self) -> dict[str, Any] | None:
        with self._lock:
            return None if self._shares is None else {k: list(v) for k, v in self._shares.items()}

    def node(self) -> str:
        return self._node

    def monitor(self) -> Any:
        return self._monitor() if self._monitor is not None else None

    # ---------------------------------------------------------------- text out
    def exposition(self) -> bytes:
        """The metrics in Prometheus' text format (what a scrape returns)."""
        return self._generate(self.registry)

    def authorized(self, header: str | None) -> bool:
        if self._expect is None:
            return True
        return header is not None and hmac.compare_digest(header.strip().encode("utf-8", "replace"), self._expect)

    # ---------------------------------------------------------------- the endpoint
    def serve(self, bind: str) -> tuple[str, int]:
        """Listen at ``bind`` (``host:port``; port 0 picks one) on a daemon thread;
        returns the bound address.  Refuses a non-loopback host without a secret."""
        host, port = parse_hostport(bind, allow_port0=True)
        check_bind_allowed(host, self._secret)
        server = _Server((host, port), _Handler, self)
        self._server = server
        self._thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.5},
                                        name="chaos-metrics", daemon=True)
        self._thread.start()
        bound = server.server_address[:2]
        log.info("chaos: metrics at http://%s/metrics (%s)", format_hostport(bound[0], bound[1]),
                 "bearer token required" if self._expect else "no secret: loopback only, no token")
        return bound[0], bound[1]

    @property
    def address(self) -> tuple[str, int] | None:
        return None if self._server is None else tuple(self._server.server_address[:2])  # type: ignore[return-value]

    def close(self) -> None:
        """Stop serving (bounded: the serve loop polls every 0.5 s)."""
        server, self._server = self._server, None
        if server is not None:
            server.shutdown()
            server.server_close()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None


class _MonitorCollector:
    """The monitor's readings at scrape time (a prometheus_client custom collector)."""

    def __init__(self, exporter: MetricsExporter) -> None:
        self._exporter = exporter

    def describe(self) -> list[Any]:
        return []  # nothing to check at registration: the families depend on the monitor

    def collect(self) -> Iterable[Any]:
        from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

        ex = self._exporter
        info = GaugeMetricFamily("chaos_node_info", "This node's member id (value 1)", labels=["node"])
        info.add_metric([ex.node()], 1)
        yield info
        shares = ex.shares()
        if shares is not None:
            samples = GaugeMetricFamily("chaos_member_samples_per_step", "Each rank's share of the global batch "
                                        "(the last shares record)", labels=["rank"])
            for i, v in enumerate(shares["samples"]):
                samples.add_metric([str(i)], float(v))
            rates = GaugeMetricFamily("chaos_member_samples_per_second", "Each rank's measured rate "
                                      "(the last shares record)", labels=["rank"])
            for i, v in enumerate(shares["rates"]):
                if v is not None:
                    rates.add_metric([str(i)], float(v))
            yield samples
            yield rates
        monitor = ex.monitor()
        if monitor is None:
            return
        res = monitor.resources()
        for name, doc, value in (
            ("chaos_cpu_count", "Logical CPUs", res.cpu_count),
            ("chaos_cpu_percent", "System-wide CPU busy percent since the monitor's previous sample", res.cpu_percent),
            ("chaos_load_average_1m", "One-minute load average", res.load_avg_1m),
            ("chaos_memory_total_bytes", "Physical memory", res.mem_total_bytes),
            ("chaos_memory_available_bytes", "Memory available without swapping", res.mem_available_bytes),
        ):
            yield GaugeMetricFamily(name, doc, value=float(value))
        yield CounterMetricFamily("chaos_network_sent_bytes", "Bytes this machine sent (all interfaces)",
                                  value=float(res.net_bytes_sent))
        yield CounterMetricFamily("chaos_network_received_bytes", "Bytes this machine received (all interfaces)",
                                  value=float(res.net_bytes_recv))
        if res.gpus:
            used = GaugeMetricFamily("chaos_gpu_memory_used_bytes", "GPU memory in use", labels=["gpu", "name"])
            total = GaugeMetricFamily("chaos_gpu_memory_total_bytes", "GPU memory", labels=["gpu", "name"])
            for gpu in res.gpus:
                used.add_metric([str(gpu.index), gpu.name], float(gpu.mem_used))
                total.add_metric([str(gpu.index), gpu.name], float(gpu.mem_total))
            yield used
            yield total
        rtt = GaugeMetricFamily("chaos_link_rtt_seconds", "Smoothed RTT to a peer (SWIM probes)", labels=["peer"])
        rtt_min = GaugeMetricFamily("chaos_link_rtt_min_seconds", "Minimum recent RTT to a peer", labels=["peer"])
        bw = GaugeMetricFamily("chaos_link_bandwidth_bytes_per_second", "Estimated bandwidth to (up) or from "
                               "(down) a peer", labels=["peer", "direction"])
        age = GaugeMetricFamily("chaos_link_age_seconds", "Seconds since the last measurement of a link",
                                labels=["peer"])
        for peer, est in sorted(monitor.links.estimates().items()):
            if est.rtt is not None:
                rtt.add_metric([peer], est.rtt)
            if est.rtt_min is not None:
                rtt_min.add_metric([peer], est.rtt_min)
            for direction, value in (("up", est.bw_up), ("down", est.bw_down)):
                if value is not None:
                    bw.add_metric([peer, direction], value)
            age.add_metric([peer], est.age)
        yield from (rtt, rtt_min, bw, age)
        moved = CounterMetricFamily("chaos_link_transfer_bytes", "Bytes of state and probes moved with a peer",
                                    labels=["peer", "direction"])
        for peer, counters in monitor.transfers().items():
            moved.add_metric([peer, "up"], float(counters.sent_bytes))
            moved.add_metric([peer, "down"], float(counters.recv_bytes))
        yield moved


class _HeadTooLarge(Exception):
    pass


class _HeadTimeout(Exception):
    pass


class _HeadReader:
    """The connection's input with the request head's limits: at most
    ``MAX_HEAD_BYTES`` and ``REQUEST_TIMEOUT_S`` for all of it, however slowly
    it comes.  It reads the socket itself: a buffered reader's ``readline``
    applies the socket timeout to each ``recv``, so a client dripping a byte
    every second would hold it for as long as the byte budget lasts."""

    def __init__(self, sock: socket.socket) -> None:
        self._sock = sock
        self._buf = b""
        self._left = MAX_HEAD_BYTES
        self._deadline = time.monotonic() + REQUEST_TIMEOUT_S

    def readline(self, limit: int = -1) -> bytes:
        if self._left <= 0:
            raise _HeadTooLarge
        want = self._left if limit is None or limit < 0 else min(limit, self._left)
        while True:
            end = self._buf.find(b"\n", 0, want)
            if end >= 0 or len(self._buf) >= want:
                cut = end + 1 if end >= 0 else want
                line, self._buf = self._buf[:cut], self._buf[cut:]
                break
            remaining = self._deadline - time.monotonic()
            if remaining <= 0:
                raise _HeadTimeout
            self._sock.settimeout(remaining)
            try:
                chunk = self._sock.recv(4096)
            except TimeoutError:
                raise _HeadTimeout from None
            if not chunk:  # the client closed: what came is all there is
                line, self._buf = self._buf, b""
                break
            self._buf += chunk
        self._left -= len(line)
        if self._left <= 0 and not line.endswith(b"\n"):
            raise _HeadTooLarge
        return line

    def read(self, n: int = -1) -> bytes:  # a GET has no body: nothing reads it
        return b""

    def close(self) -> None:
        pass  # the socket is the server's to close


class _Handler(BaseHTTPRequestHandler):
    """GET/HEAD /metrics behind the bearer token; one request per connection."""

    server: _Server
    server_version = "chaos-metrics"
    sys_version = ""
    protocol_version = "HTTP/1.0"  # the connection closes after the response
    default_request_version = "HTTP/1.0"  # errors carry a status line, even to garbage (not HTTP/0.9's bare body)
    timeout = REQUEST_TIMEOUT_S  # each socket operation, the response's writes too

    def setup(self) -> None:
        super().setup()
        # what send_error reads, before a request line was parsed
        self.requestline, self.request_version, self.command = "", self.default_request_version, None
        self.rfile.close()  # the buffered reader is never used: it could read past the limits
        self.rfile = _HeadReader(self.connection)  # type: ignore[assignment]

    def handle(self) -> None:
        try:
            self.handle_one_request()
        except _HeadTooLarge:
            self._refuse(431, f"request head larger than {MAX_HEAD_BYTES} bytes")
        except _HeadTimeout:
            self._refuse(408, f"request head not received within {REQUEST_TIMEOUT_S:.0f}s")
        except (ConnectionError, OSError):
            pass  # the client went away: nothing to answer
        except http.client.HTTPException as exc:
            self._refuse(400, f"malformed request ({type(exc).__name__})")

    def _refuse(self, code: int, why: str) -> None:
        self.close_connection = True
        log.info("chaos: metrics: %s from %s: %d", why, self.client_address[0], code)
        try:
            self.send_error(code, why)
            self.wfile.flush()
            self._linger()
        except OSError:
            pass

    def _linger(self) -> None:
        """Read and drop what the client still sends, briefly, before closing:
        closing with unread input makes the kernel send a reset, which can
        destroy the error answer before the client reads it (Apache's
        "lingering close").  At most 64 KiB and 0.5 s."""
        sock, left, deadline = self.connection, 65536, time.monotonic() + 0.5
        sock.shutdown(socket.SHUT_WR)
        while left > 0 and (remaining := deadline - time.monotonic()) > 0:
            sock.settimeout(remaining)
            try:
                chunk = sock.recv(min(left, 16384))
            except (TimeoutError, OSError):
                return
            if not chunk:
                return
            left -= len(chunk)

    def do_GET(self) -> None:
        self._answer(body=True)

    def do_HEAD(self) -> None:
        self._answer(body=False)

    def _answer(self, *, body: bool) -> None:
        exporter = self.server.exporter
        if self.path.split("?", 1)[0] not in ("/metrics", "/metrics/"):
            self.send_error(404, "the metrics are at /metrics")
            return
        if not exporter.authorized(self.headers.get("Authorization")):
            log.info("chaos: metrics: scrape from %s refused: missing or wrong bearer token", self.client_address[0])
            self.send_response(401)
            self.send_header("WWW-Authenticate", 'Bearer realm="chaos_lightning metrics"')
            msg = b"401: a bearer token is required (python -m chaos_lightning.metrics token)\n"
            self.send_header("Content-Type", "text/plain; charset=utf-8")
            self.send_header("Content-Length", str(len(msg)))
            self.end_headers()
            if body:
                self.wfile.write(msg)
            return
        try:
            text = exporter.exposition()
        except Exception:  # noqa: BLE001 - a collector's bug: a 500 for this scrape, the endpoint stays
            log.exception("chaos: metrics: collecting failed")
            self.send_error(500, "collecting the metrics failed (see the node's log)")
            return
        self.send_response(200)
        self.send_header("Content-Type", exporter.content_type)
        self.send_header("Content-Length", str(len(text)))
        self.end_headers()
        if body:
            self.wfile.write(text)

    def log_message(self, format: str, *args: Any) -> None:  # noqa: A002 - the base class's name
        log.debug("chaos: metrics: %s " + format, self.client_address[0], *args)


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    block_on_close = False
    request_queue_size = 64  # the listen backlog: a burst waits here, not in a thread each

    def __init__(self, addr: tuple[str, int], handler: type, exporter: MetricsExporter) -> None:
        self.exporter = exporter
        self._slots = threading.BoundedSemaphore(MAX_CONNECTIONS)
        if ":" in addr[0]:
            self.address_family = socket.AF_INET6
        super().__init__(addr, handler)

    def process_request(self, request: Any, client_address: Any) -> None:
        if not self._slots.acquire(blocking=False):
            # busy: say so at once, from this (accepting) thread, without reading
            try:
                request.settimeout(0.5)
                request.sendall(b"HTTP/1.0 503 Service Unavailable\r\nContent-Type: text/plain\r\n"
                                b"Content-Length: 32\r\nRetry-After: 1\r\n\r\ntoo many connections, try later\n")
            except OSError:
                pass
            self.shutdown_request(request)
            return
        try:
            super().process_request(request, client_address)
        except BaseException:
            self._slots.release()
            raise

    def process_request_thread(self, request: Any, client_address: Any) -> None:
        try:
            super().process_request_thread(request, client_address)
        finally:
            self._slots.release()

    def handle_error(self, request: Any, client_address: Any) -> None:
        log.warning("chaos: metrics: request from %s failed", client_address[0], exc_info=True)


def start_metrics(bind: str, *, secret: bytes | None, trace: Any, monitor: Callable[[], Any],
                  port_offset: int = 0) -> MetricsExporter:
    """An exporter fed by ``trace`` and serving at ``bind``: what the strategy calls at open.

    ``port_offset``: the process's local rank when a node runs several
    (``devices=N``): local rank ``k`` serves at ``port + k``, as its agent
    binds (:mod:`chaos_lightning.strategy.devices`); port 0 stays 0."""
    host, port = parse_hostport(bind, allow_port0=True)
    if port and port_offset:
        bind = format_hostport(host, port + int(port_offset))
    exporter = MetricsExporter(secret=secret, monitor=monitor)
    exporter.serve(bind)
    trace.subscribe(exporter.record)
    return exporter


def _main(argv: list[str]) -> int:
    usage = ("usage: python -m chaos_lightning.metrics token\n"
             "  prints the bearer token that scrapes this cluster's metrics endpoints\n"
             "  (from the cluster secret in CHAOS_SECRET; put it in Prometheus' authorization.credentials)")
    if argv != ["token"]:
        print(usage, file=sys.stderr)
        return 2
    from chaos_lightning.config import SECRET_ENV, ConfigError, secret_from_env

    try:
        secret = secret_from_env(os.environ)
    except ConfigError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    if secret is None:
        print(f"error: {SECRET_ENV} is not set: without a secret the endpoint binds loopback only and asks no token",
              file=sys.stderr)
        return 2
    print(scrape_token(secret))
    return 0


if __name__ == "__main__":
    sys.exit(_main(sys.argv[1:]))
