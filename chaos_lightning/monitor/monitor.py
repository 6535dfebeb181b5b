"""The cluster monitor of one node: resources, links and topology in one place.

Each agent process owns one :class:`Monitor`.  The agent writes to it as it
works (RTT samples from SWIM probes, every state transfer and bandwidth probe,
each committed view); readers ask it for numbers:

* the shard scheduler, through :meth:`Monitor.topology` and :attr:`Monitor.links`,
  for per-link bandwidth and RTT when splitting a joiner's state;
* local callers and remote ``status`` requests, through :meth:`Monitor.snapshot`,
  which is plain data (dict/list/str/int/float/bool/None) so the agent can
  msgpack it onto the wire or print it as JSON without conversion.

It does no I/O and starts no threads; one lock makes it safe for the agent's
thread to write while others read.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

import psutil

from chaos_lightning.monitor.links import Direction, LinkStats
from chaos_lightning.monitor.resources import Resources, sample_resources
from chaos_lightning.monitor.topology import Topology

if TYPE_CHECKING:
    from chaos_lightning.membership.view import View


@dataclass
class TransferCounters:
    """Cumulative traffic with one peer: every transfer counts, even those too
    small to estimate bandwidth from."""

    sent_bytes: int = 0
    recv_bytes: int = 0
    count: int = 0


class Monitor:
    """One node's view of the cluster's resources and links.

    ``staleness_s`` (default 60 s) is how long a link measurement is believed
    without a new one (see :class:`LinkStats`).  ``resource_interval_s``
    (default 1 s) is the minimum time between two psutil samples: a snapshot is
    cheap to ask for, but one psutil sample costs ~160 us of CPU (measured
    here: 1,000 calls of :func:`sample_resources`, 2-core VM) and several
    /proc reads on the training box, and a status poller must not be able to
    turn that into a busy loop.  CPU percent over less than a second is mostly
    noise anyway.
    """

    def __init__(self, node_id: str, *, staleness_s: float = 60.0, resource_interval_s: float = 1.0) -> None:
        self.node_id = node_id
        self.resource_interval_s = float(resource_interval_s)
        self.links = LinkStats(staleness_s)
        self._lock = threading.Lock()
        self._view: View | None = None
        self._transfers: dict[str, TransferCounters] = {}
        self._resources: Resources | None = None
        self._resources_at = float("-inf")
        # Prime psutil's per-thread CPU baseline: the first non-blocking
        # cpu_percent() call has nothing to compare against and returns 0.0.
        psutil.cpu_percent(interval=None)

    @property
    def staleness_s(self) -> float:
        return self.links.staleness_s

    # -- written by the agent ------------------------------------------------------
    def set_view(self, view: View) -> None:
        """The view just committed; topology and snapshots use it from now on."""
        with self._lock:
            self._view = view

    @property
    def view(self) -> View | None:
        with self._lock:
            return self._view

    def record_rtt(self, peer: str, seconds: float, now: float | None = None) -> None:
        """An RTT sample to ``peer`` (a SWIM probe's ping->ack time)."""
        self.links.record_rtt(peer, seconds, now)

    def record_transfer(
        self,
        peer: str,
        nbytes: int,
        seconds: float,
        direction: Direction,
        now: float | None = None,
    ) -> bool:
        """A transfer with ``peer`` (``"up"``: we sent, ``"down"``: we received).

        Always counted in the traffic counters; returns whether it was large
        enough to update the bandwidth estimate.
        """
        used = self.links.record_transfer(peer, nbytes, seconds, direction, now)
        with self._lock:
            c = self._transfers.setdefault(peer, TransferCounters())
            if direction == "up":
                c.sent_bytes += int(nbytes)
            else:
                c.recv_bytes += int(nbytes)
            c.count += 1
        return used

    def forget(self, peer: str) -> None:
        """Drop the link estimates of ``peer`` (its traffic counters are history and stay)."""
        self.links.forget(peer)

    # -- read by everyone ------------------------------------------------------------
    def resources(self, now: float | None = None) -> Resources:
        """This node's resources, re-sampled at most every ``resource_interval_s``."""
        now = time.monotonic() if now is None else now
        with self._lock:
            if self._resources is None or now - self._resources_at >= self.resource_interval_s:
                self._resources = sample_resources()
                self._resources_at = now
            return self._resources

    def transfers(self) -> dict[str, TransferCounters]:
        """A copy of the per-peer traffic counters."""
        with self._lock:
            return {
                k: TransferCounters(c.sent_bytes, c.recv_bytes, c.count)
                for k, c in sorted(self._transfers.items())
            }

    def topology(self, now: float | None = None) -> Topology:
        """The current view's up-link graph with this node's link measurements.

        Raises ``RuntimeError`` before the first :meth:`set_view`.
        """
        view = self.view
        if view is None:
            raise RuntimeError(f"monitor of {self.node_id} has no view yet")
        return Topology(view, self.links, origin=self.node_id, now=now)

    def snapshot(self, now: float | None = None) -> dict:
        """Everything this monitor knows, as plain data.

        ``time`` is ``now`` on the monitor's monotonic clock (ages are relative
        to it); ``wall_time`` is Unix time, for comparing snapshots of several
        nodes.  Link RTTs are in milliseconds, bandwidths in Mbit/s (the units
        ``tc`` and operators use), ``None`` where unknown or stale.
        """
        now = time.monotonic() if now is None else now
        # Links that nobody observed for a staleness period are dropped here,
        # so a long-lived agent on a churning cluster does not grow without bound.
        self.links.expire(now)
        resources = self.resources(now)
        view = self.view
        links = {}
        for peer, est in self.links.estimates(now).items():
            links[peer] = {
                "rtt_ms": _scale(est.rtt, 1e3),
                "rtt_var_ms": _scale(est.rtt_var, 1e3),
                "rtt_min_ms": _scale(est.rtt_min, 1e3),
                "bw_up_mbit": _scale(est.bw_up, 8e-6),
                "bw_down_mbit": _scale(est.bw_down, 8e-6),
                "age_s": float(est.age),
            }
        return {
            "node": self.node_id,
            "time": float(now),
            "wall_time": time.time(),
            "view": None
            if view is None
            else {
                "epoch": int(view.epoch),
                "members": [m.id for m in view.members],
                "down_links": [[a, b] for a, b in view.down_links],
            },
            "resources": resources.as_dict(),
            "links": links,
            "transfers": {
                peer: {"sent_bytes": c.sent_bytes, "recv_bytes": c.recv_bytes, "count": c.count}
                for peer, c in self.transfers().items()
            },
        }


def _scale(value: float | None, factor: float) -> float | None:
    return None if value is None else float(value) * factor
