"""Cluster monitor: node resources, per-link RTT and bandwidth, the link topology.

Layer 3 of chaos_lightning (see DESIGN.md).  It sits above ``membership``
(it reads committed :class:`~chaos_lightning.membership.view.View` objects)
and below ``replication``, whose shard scheduler reads link bandwidth and RTT
from it.  Pure Python: the agent feeds it observations and serves its
:meth:`Monitor.snapshot`; it does no I/O of its own.
"""

from __future__ import annotations

from chaos_lightning.monitor.links import (
    MIN_TRANSFER_BYTES,
    Direction,
    LinkEstimate,
    LinkStats,
    estimate_bandwidth,
)
from chaos_lightning.monitor.monitor import Monitor, TransferCounters
from chaos_lightning.monitor.resources import GpuResources, Resources, sample_resources
from chaos_lightning.monitor.topology import Topology

__all__ = [
    "MIN_TRANSFER_BYTES",
    "Direction",
    "GpuResources",
    "LinkEstimate",
    "LinkStats",
    "Monitor",
    "Resources",
    "Topology",
    "TransferCounters",
    "estimate_bandwidth",
    "sample_resources",
]
