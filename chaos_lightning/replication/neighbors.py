"""Which members a joiner pulls the state from, and at what expected rates.

Role: the strategy knows which members hold the state (they are replicas, so
any of them can serve every shard); this module picks up to ``cap`` of them
by what the joiner's monitor knows about its links to them:

0. members whose direct link to the joiner the agreed view marks down (the
   monitor's :class:`~chaos_lightning.monitor.Topology`) come last, after every
   reachable one: a pull from them would only time out;
1. the measured downlink bandwidth from that member (bytes/s), highest first
   (the monitor learns it passively from transfers, or from an active probe);
2. else the round-trip time, lowest first ("nearby": SWIM probes measure it
   from the moment the joiner is in the cluster, so it is almost always known);
3. else the view's order.

The cap exists because every extra source is one more connection and one more
partial shard in flight: at 8 sources the scheduler already splits a state
into 64 shards (``snapshot.default_shard_bytes``), and on the testbed 4 equal
sources reached 1.05x the transfer bound, so beyond ~8 the gain is within the
noise while each source pays its share of the pause.  Rates go to the planner
as given (``None`` = unknown: the pull starts with equal shares and steals
work from slow sources as it measures them).
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence
from dataclasses import dataclass

from chaos_lightning.monitor.links import LinkEstimate

#: Default cap on the number of sources of one pull (``CHAOS_MAX_SOURCES``).
DEFAULT_MAX_SOURCES = 8


@dataclass(frozen=True)
class Holder:
    """A member that can serve the state: its node id and shard-server address."""

    node: str
    addr: str


def choose_sources(
    candidates: Sequence[Holder],
    estimates: dict[str, LinkEstimate],
    cap: int = DEFAULT_MAX_SOURCES,
    cut: Collection[str] = (),
) -> tuple[list[Holder], list[float | None]]:
    """Up to ``cap`` candidates, best link first, with their expected rates
    (bytes/s or None); the ``cut`` ones (link to the joiner down) last."""
    if cap < 1:
        raise ValueError(f"cap must be >= 1, got {cap}")

    def key(item: tuple[int, Holder]) -> tuple[bool, float, float, int]:
        order, src = item
        est = estimates.get(src.node)
        bw = est.bw_down if est is not None and est.bw_down else None
        rtt = est.rtt if est is not None and est.rtt is not None else None
        return (src.node in cut, -(bw or 0.0), rtt if rtt is not None else math.inf, order)

    chosen = [src for _, src in sorted(enumerate(candidates), key=key)[:cap]]
    rates: list[float | None] = []
    for src in chosen:
        est = estimates.get(src.node)
        rates.append(est.bw_down if est is not None and est.bw_down else None)
    return chosen, rates
