"""Per-link measurements: round-trip time and bandwidth from this node to each peer.

The monitor's link half.  The agent feeds it what it observes anyway: RTT
samples from SWIM probes (:meth:`LinkStats.record_rtt`) and the size and
duration of state transfers and active bandwidth probes
(:meth:`LinkStats.record_transfer`).  The shard scheduler reads the estimates
(:meth:`LinkStats.rtt`, :meth:`LinkStats.bandwidth`) to split a joiner's state
so that all sources finish together; the topology graph attaches them to edges.

Every number here is *this node's* view of its own links.  Estimates expire
after ``staleness_s`` without a fresh observation: a bandwidth measured a
minute ago, before a link was re-shaped or a peer got busy, would mislead the
scheduler more than "unknown" does (unknown links get an even share).

Thread-safety: one lock guards all state; the agent thread writes, any thread
may read.  All times are seconds on a monotonic clock (``now`` defaults to
``time.monotonic()``), so tests and the simulator can pass their own clock.
"""

from __future__ import annotations

import math
import threading
import time
from dataclasses import dataclass, field
from typing import Literal

Direction = Literal["up", "down"]
"""``"up"``: this node sends to the peer; ``"down"``: this node receives from it."""

DIRECTIONS: tuple[Direction, ...] = ("up", "down")

# RFC 6298 section 2: SRTT gain alpha = 1/8, RTTVAR gain beta = 1/4, the gains
# TCP has used since Jacobson (1988).  They smooth one noisy probe out while
# still following a real RTT change within ~8 samples (one SWIM probe period
# each, so a few seconds).
RTT_ALPHA = 1 / 8
RTT_BETA = 1 / 4

# Transfers smaller than this are ignored for bandwidth.  Measured on loopback
# here (TCP, request + 1-byte ack, median of 20): an empty exchange takes 71 us,
# 16 KiB takes 88 us (80 % of it the fixed round trip, "187 MB/s"), 64 KiB
# 105 us ("624 MB/s"), 1 MiB and more ~1.1-1.3 GB/s.  Below 64 KiB the number
# measures latency, not bandwidth; at 64 KiB it is within 2x, and byte weighting
# (below) gives such a transfer 1/64 the say of a 4 MiB one.
MIN_TRANSFER_BYTES = 64 * 1024

# A transfer's weight in the bandwidth average is its size, up to this cap.
# Weighting by bytes discounts the small transfers whose time is mostly fixed
# latency (see above); by 1 MiB the loopback figure has reached its plateau,
# and a 100 Mbit/s link with 50 ms RTT (a WAN site) has a 625 KB
# bandwidth-delay product, so a few MiB is "large" everywhere we run.  Above
# the cap every transfer counts the same: otherwise one 1 GB shard sent before
# a link was reshaped would outvote a dozen 50 MB ones sent after it.
BW_WEIGHT_CAP_BYTES = 4 * 1024 * 1024

# Bandwidth samples fade with this half-life, as a fraction of the staleness:
# with the default 60 s staleness a transfer from 10 s ago counts half as much
# as one just finished, so a link that slowed down (tc reshaped, a competing
# flow) is believed within one or two new transfers.
BW_HALF_LIFE_FRACTION = 1 / 6


def estimate_bandwidth(nbytes: int, seconds: float, rtt: float | None = None) -> float:
    """Bandwidth in bytes/s of an active probe that moved ``nbytes`` in ``seconds``.

    ``seconds`` is measured by the requester from request to last byte (or by
    the sender from first byte to the ack), so it contains one round trip that
    carried no payload: subtract ``rtt`` when known.  The remainder is clamped
    to a quarter of the measured time, so a jittery RTT larger than the whole
    transfer yields a high but finite estimate instead of a negative or infinite one.
    """
    if nbytes <= 0 or seconds <= 0:
        return 0.0
    payload_time = seconds - (rtt or 0.0)
    payload_time = max(payload_time, seconds / 4)
    return nbytes / payload_time


@dataclass
class _RttEstimate:
    srtt: float
    rttvar: float
    rtt_min: float
    rtt_min_at: float
    at: float
    samples: int = 1


@dataclass
class _BandwidthEstimate:
    # Byte-weighted (capped at BW_WEIGHT_CAP_BYTES), exponentially time-decayed
    # mean of per-transfer rates: rate = weighted_rate / weight.  Weighting by
    # bytes lets a 4 MiB shard outvote a 64 KiB probe 64:1, the probe's time
    # being mostly fixed overhead.
    weighted_rate: float
    weight: float
    at: float
    samples: int = 1


@dataclass
class _PeerLink:
    rtt: _RttEstimate | None = None
    bw: dict[str, _BandwidthEstimate] = field(default_factory=dict)
    last_seen: float = -math.inf


@dataclass(frozen=True)
class LinkEstimate:
    """What is currently believed about one link (``None`` = unknown or stale).

    ``rtt``, ``rtt_var`` and ``rtt_min`` are seconds; ``bw_up``/``bw_down`` are
    bytes/s; ``age`` is seconds since the last observation of any kind.
    """

    peer: str
    rtt: float | None
    rtt_var: float | None
    rtt_min: float | None
    bw_up: float | None
    bw_down: float | None
    age: float


class LinkStats:
    """RTT and bandwidth estimates for every link from this node.

    ``staleness_s`` is how long an estimate stays believable without a new
    observation; after it, queries answer ``None`` and :meth:`expire` drops the
    peer.  60 s is 60 SWIM probe periods on the ``lan`` preset, so RTT only
    goes stale for a peer nobody probes any more (left, or unreachable).
    """

    def __init__(self, staleness_s: float = 60.0) -> None:
        if staleness_s <= 0:
            raise ValueError(f"staleness_s must be positive, got {staleness_s}")
        self.staleness_s = float(staleness_s)
        self._half_life = self.staleness_s * BW_HALF_LIFE_FRACTION
        self._peers: dict[str, _PeerLink] = {}
        self._lock = threading.Lock()

    # -- observations --------------------------------------------------------
    def record_rtt(self, peer: str, seconds: float, now: float | None = None) -> None:
        """One round-trip sample to ``peer`` (a SWIM ping/ack), RFC 6298 style."""
        if not (seconds >= 0 and math.isfinite(seconds)):
            return  # a clock step or a bogus sample; never poison the average
        now = time.monotonic() if now is None else now
        with self._lock:
            p = self._peers.setdefault(peer, _PeerLink())
            p.last_seen = max(p.last_seen, now)
            est = p.rtt
            if est is None or now - est.at > self.staleness_s:
                # RFC 6298 (2.2): first measurement R: SRTT = R, RTTVAR = R/2.
                # A stale estimate is restarted the same way: the path may have changed.
                p.rtt = _RttEstimate(seconds, seconds / 2, seconds, now, now)
                return
            # RFC 6298 (2.3): RTTVAR first, using the SRTT before this sample.
            est.rttvar = (1 - RTT_BETA) * est.rttvar + RTT_BETA * abs(est.srtt - seconds)
            est.srtt = (1 - RTT_ALPHA) * est.srtt + RTT_ALPHA * seconds
            # The minimum is the propagation delay without queueing; keep it a
            # windowed minimum (as BBR does) so a route change that raises the
            # floor is seen after one staleness period.
            if seconds <= est.rtt_min or now - est.rtt_min_at > self.staleness_s:
                est.rtt_min, est.rtt_min_at = seconds, now
            est.at = now
            est.samples += 1

    def record_transfer(
        self,
        peer: str,
        nbytes: int,
        seconds: float,
        direction: Direction,
        now: float | None = None,
    ) -> bool:
        """A transfer of ``nbytes`` with ``peer`` that took ``seconds``.

        Returns whether it was used for the bandwidth estimate (transfers under
        :data:`MIN_TRANSFER_BYTES` or with no measurable duration are not).
        """
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        now = time.monotonic() if now is None else now
        usable = nbytes >= MIN_TRANSFER_BYTES and seconds > 0 and math.isfinite(seconds)
        with self._lock:
            p = self._peers.setdefault(peer, _PeerLink())
            p.last_seen = max(p.last_seen, now)
            if not usable:
                return False
            rate = nbytes / seconds
            weight = float(min(nbytes, BW_WEIGHT_CAP_BYTES))
            est = p.bw.get(direction)
            if est is None or now - est.at > self.staleness_s:
                p.bw[direction] = _BandwidthEstimate(rate * weight, weight, now)
                return True
            decay = 0.5 ** (max(0.0, now - est.at) / self._half_life)
            est.weighted_rate = est.weighted_rate * decay + rate * weight
            est.weight = est.weight * decay + weight
            est.at = max(est.at, now)
            est.samples += 1
            return True

    def forget(self, peer: str) -> None:
        """Drop everything known about ``peer`` (it left, or its address changed)."""
        with self._lock:
            self._peers.pop(peer, None)

    def expire(self, now: float | None = None) -> list[str]:
        """Drop peers with no observation for ``staleness_s``; return their ids.

        Keeps memory bounded under churn: a cluster of spot machines sees many
        ids that never come back.
        """
        now = time.monotonic() if now is None else now
        with self._lock:
            gone = [k for k, p in self._peers.items() if now - p.last_seen > self.staleness_s]
            for k in gone:
                del self._peers[k]
            return gone

    # -- estimates -------------------------------------------------------------
    def rtt(self, peer: str, now: float | None = None) -> float | None:
        """Smoothed RTT to ``peer`` in seconds, or ``None`` if unknown or stale."""
        est = self.estimate(peer, now)
        return None if est is None else est.rtt

    def rtt_var(self, peer: str, now: float | None = None) -> float | None:
        """RTT variation (RFC 6298 RTTVAR, a mean deviation) in seconds."""
        est = self.estimate(peer, now)
        return None if est is None else est.rtt_var

    def rtt_min(self, peer: str, now: float | None = None) -> float | None:
        """Smallest RTT seen to ``peer`` within the staleness window, in seconds."""
        est = self.estimate(peer, now)
        return None if est is None else est.rtt_min

    def bandwidth(self, peer: str, direction: Direction, now: float | None = None) -> float | None:
        """Estimated bytes/s to (``"up"``) or from (``"down"``) ``peer``, or ``None``."""
        if direction not in DIRECTIONS:
            raise ValueError(f"direction must be 'up' or 'down', got {direction!r}")
        est = self.estimate(peer, now)
        if est is None:
            return None
        return est.bw_up if direction == "up" else est.bw_down

    def age(self, peer: str, now: float | None = None) -> float | None:
        """Seconds since the last observation of ``peer`` of any kind, ``None`` if never."""
        now = time.monotonic() if now is None else now
        with self._lock:
            p = self._peers.get(peer)
            return None if p is None else max(0.0, now - p.last_seen)

    def estimate(self, peer: str, now: float | None = None) -> LinkEstimate | None:
        """Everything believed about the link to ``peer``, read under one lock."""
        now = time.monotonic() if now is None else now
        with self._lock:
            p = self._peers.get(peer)
            return None if p is None else self._estimate(peer, p, now)

    def estimates(self, now: float | None = None) -> dict[str, LinkEstimate]:
        """:meth:`estimate` for every peer observed and not yet expired, sorted by id."""
        now = time.monotonic() if now is None else now
        with self._lock:
            return {k: self._estimate(k, self._peers[k], now) for k in sorted(self._peers)}

    def peers(self) -> list[str]:
        """Ids of all peers with any recorded observation, sorted."""
        with self._lock:
            return sorted(self._peers)

    def __contains__(self, peer: object) -> bool:
        with self._lock:
            return peer in self._peers

    def _estimate(self, peer: str, p: _PeerLink, now: float) -> LinkEstimate:
        fresh = lambda at: now - at <= self.staleness_s  # noqa: E731
        r = p.rtt if p.rtt is not None and fresh(p.rtt.at) else None
        bw: dict[str, float | None] = {}
        for d in DIRECTIONS:
            b = p.bw.get(d)
            bw[d] = b.weighted_rate / b.weight if b is not None and fresh(b.at) else None
        return LinkEstimate(
            peer=peer,
            rtt=None if r is None else r.srtt,
            rtt_var=None if r is None else r.rttvar,
            rtt_min=None if r is None else r.rtt_min,
            bw_up=bw["up"],
            bw_down=bw["down"],
            age=max(0.0, now - p.last_seen),
        )
