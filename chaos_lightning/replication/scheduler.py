"""The shard scheduler: which neighbor sends which shard of the state to a joiner.

A joiner pulls the training state from several neighbors at once, each sending a
different set of shards ("Learning in Chaos", Feng et al. 2025: multi-neighbor
replication with fast shard scheduling).  The split is chosen from the measured
link bandwidths (the monitor's :class:`~chaos_lightning.monitor.links.LinkStats`)
so that all neighbors finish together and no neighbor is overloaded.  This
module is pure computation: it takes sizes and rates and returns a
:class:`ShardPlan`; it never opens a socket, and the pull itself lives elsewhere.

Transfer model (what "finish time" means here)
-----------------------------------------------
* Source ``i`` can give this joiner ``avail_i = bandwidth_i`` bytes/s, the
  rate the joiner measured from it (or an equal share when unmeasured).
  Other traffic at the source shows in that measurement, and the pull
  re-plans on the rates it measures as shards arrive, so the model has no
  separate "busy" or "queued" input (the first version had both, and no
  caller could feed them).
* It sends its shards one after another at a constant rate ``r_i``.  When the
  sources that send at least one shard could together exceed the joiner's
  downlink ``D``, every such source is slowed by the same factor:
  ``r_i = avail_i * min(1, D / sum(avail_j over sending sources))``.  This is
  proportional sharing of the downlink (each flow keeps its relative speed, so
  "finish together" still means the same split).  Real TCP flows sharing a
  bottleneck tend to max-min fairness instead; the two differ only when flows
  have very unequal ceilings, and no work-conserving sharing beats
  ``bytes / D`` anyway.  Sources that send nothing get rate 0 in the plan.
* ``finish_i = start_i + bytes_i / r_i`` with ``start_i = latency_i``, the
  first-byte latency.
* The plan's makespan is ``max finish_i`` over sources that send something.
* The design's **transfer bound** (DESIGN.md, "How performance is measured") is
  ``lower_bound = total / min(D, sum avail_i) + min latency_i``: no schedule in
  this model can beat it, and the pull is judged by ``makespan / lower_bound``.

Algorithm
---------
This is makespan minimisation on uniform ("related") machines, Q||Cmax
(strongly NP-hard), with machine ready times ``start_i``.  :func:`plan` uses

1. **LPT for related machines**: shards in decreasing size, each to the source
   that would *finish it earliest* (``argmin start_i + (load_i + s) / r_i``,
   not the source that is free earliest).  Without ready times this is within
   19/12 ~ 1.58 of optimal (Dobson 1984; Gonzalez, Ibarra & Sahni 1977 first
   proved 2m/(m+1); Kovacs 2010 narrowed the tight factor to about 1.54-1.58).
   More useful here is the additive bound: when the last shard ``s`` is placed,
   some source has not passed the fluid finish time ``T_f`` (else more than the
   total would already be placed), so ``Cmax <= T_f + s / r`` for that source's
   rate: with many shards per source and the smallest placed last, the plan is
   within a fraction of one small shard of the fluid optimum.  That is why
   :func:`cut_shards` makes several shards per source.
2. **Local improvement**: repeatedly take the source that finishes last and
   apply the best single *move* (one of its shards to another source) or
   *swap* (one of its shards for a smaller one of another source) that lowers
   its finish without pushing the other source as high.  Each step strictly
   lowers the sorted vector of finish times, so it never cycles and never
   worsens the makespan; it stops after ``max_improve_steps`` steps or once
   within 0.1% of the fluid bound.
3. **MULTIFIT-style search**, only on small instances (shards x sources <=
   :data:`MULTIFIT_MAX_WORK`, where few shards per source make LPT's imbalance
   visible): binary search on a deadline, best-fit decreasing into the
   per-source capacities it implies, then the same improvement; the better
   plan wins.  On 3,000 random instances of <= 8 shards x <= 4 sources (mixed
   rates, latencies, halved "busy" rates, binding downlinks) the result equals the
   exhaustive optimum in 95% of cases and is never worse than 1.07x of it.

Speed: the greedy step is an argmin over sources of ``start_i + load_i/r_i +
s/r_i``, a lower envelope of lines in ``s`` whose intercepts change as shards
land, so no plain heap is exact when rates differ.  The argmin is instead done
by numpy over all sources per shard (three vector calls of ``m`` elements):
O(n log n + n m) arithmetic but only O(n) interpreter steps.  For 1,000 sources
x 10,000 shards the greedy takes ~17 ms and the whole :func:`plan` ~25 ms (best
of 3; ~45 ms when the downlink binds and two sending sets are planned) on this
project's 2-core CPU machine, and the argmin is exact.  (A heap keyed by finish
time at a reference size, re-keyed lazily, was measured 20x slower in Python.)

:func:`exact_plan` solves small instances (<= 8 shards, <= 4 sources) exactly by
branch and bound, for tests.  Several joiners at one switch each plan alone:
they share a source's uplink through TCP and the pull's re-planning on
measured rates (docs/replication.md measures it), so a joint plan over all
joiners was removed unused (it needed every joiner's link rates, which no
joiner has).
"""

from __future__ import annotations

import math
from collections.abc import Hashable, Sequence
from dataclasses import dataclass, field
from itertools import combinations

import numpy as np

MiB = 1 << 20

MIN_SHARD_BYTES = 1 * MiB
"""Smallest shard :func:`shard_target` picks.  Every shard costs a request, a
frame header, a checksum and a scheduling decision; at 1 MiB that fixed cost is
well under 1% of the shard's transfer time even on a 1 Gbit/s LAN link."""

SHARDS_PER_SOURCE = 8
"""Shards per source :func:`shard_target` aims for.  The greedy's error is at
most about one shard's time on a source (module docstring), so k shards per
source bound it by ~1/k of the transfer and in practice far less, because the
smallest shards are placed last; 8 keeps the worst case near 10% and the plan
cheap.  Fewer than ~4 per source leaves visible imbalance."""


# --------------------------------------------------------------------------- #
# Inputs and output
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Source:
    """A neighbor that holds the state and can send shards to the joiner."""

    name: Hashable
    bandwidth: float
    """Bytes/s this source can push to this joiner (the path's bandwidth)."""
    latency: float = 0.0
    """Seconds until the first byte of its first shard arrives."""

    def __post_init__(self) -> None:
        if not (self.bandwidth >= 0 and math.isfinite(self.bandwidth)):
            raise ValueError(f"source {self.name!r}: bandwidth must be finite and >= 0")
        if not (self.latency >= 0 and math.isfinite(self.latency)):
            raise ValueError(f"source {self.name!r}: latency must be finite and >= 0")

    @property
    def available(self) -> float:
        """Bytes/s this source can give the joiner."""
        return self.bandwidth

    @property
    def start(self) -> float:
        """When its first shard could start arriving."""
        return self.latency


@dataclass(frozen=True)
class ShardPlan:
    """Which source sends which shard, and when each source is predicted to finish."""

    shard_sizes: tuple[int, ...]
    assignment: tuple[Hashable, ...]
    """``assignment[k]`` is the name of the source that sends shard ``k``."""
    sources: tuple[Hashable, ...]
    """All candidate sources' names, in input order; the tuples below follow it."""
    rates: tuple[float, ...]
    """Modelled sending rate (bytes/s); 0 for sources that send nothing."""
    bytes_per_source: tuple[int, ...]
    finish_per_source: tuple[float, ...]
    """Predicted arrival of each source's last byte (s); 0 if it sends nothing."""
    makespan: float
    """Predicted arrival of the last shard (s)."""
    lower_bound: float
    """The transfer bound: total / min(downlink, sum available) + min latency."""
    _index: dict = field(default=None, repr=False, compare=False)  # type: ignore[assignment]

    def __post_init__(self) -> None:
        object.__setattr__(self, "_index", {n: i for i, n in enumerate(self.sources)})

    @property
    def ratio(self) -> float:
        """makespan / lower_bound (1.0 is perfect; the design judges pulls by it)."""
        return self.makespan / self.lower_bound if self.lower_bound > 0 else 1.0

    def shards_of(self, source: Hashable) -> tuple[int, ...]:
        """Indices of the shards ``source`` sends, largest first."""
        ks = [k for k, s in enumerate(self.assignment) if s == source]
        return tuple(sorted(ks, key=lambda k: -self.shard_sizes[k]))

    def rate_of(self, source: Hashable) -> float:
        return self.rates[self._index[source]]

    def bytes_of(self, source: Hashable) -> int:
        return self.bytes_per_source[self._index[source]]

    def finish_of(self, source: Hashable) -> float:
        return self.finish_per_source[self._index[source]]


# --------------------------------------------------------------------------- #
# The model
# --------------------------------------------------------------------------- #


MULTIFIT_MAX_WORK = 4096
"""Shards x sources up to which :func:`plan` also runs the MULTIFIT-style search
(pure Python, ~20 best-fit passes).  Small instances are where LPT's few
shards per source leave visible imbalance; large ones are already within a
fraction of a percent of the bound and must stay fast."""


def _check(
    shard_sizes: Sequence[int], sources: Sequence[Source], downlink: float
) -> np.ndarray:
    sizes = np.asarray(shard_sizes, dtype=np.float64).reshape(-1)
    if sizes.size and (sizes.min() < 0 or not np.isfinite(sizes).all()):
        raise ValueError("shard sizes must be finite and >= 0")
    if not downlink > 0:
        raise ValueError("downlink must be > 0")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise ValueError("source names must be distinct")
    if sizes.size and not any(
        s.available > 0 and math.isfinite(s.start) for s in sources
    ):
        raise ValueError("no source has available bandwidth")
    return sizes


def _usable(sources: Sequence[Source]) -> list[int]:
    return [
        i for i, s in enumerate(sources) if s.available > 0 and math.isfinite(s.start)
    ]


def _rates(
    sources: Sequence[Source], sending: Sequence[int], downlink: float
) -> np.ndarray:
    """Rates of the ``sending`` sources: available uplink, scaled to fit the downlink."""
    avail = np.array([sources[i].available for i in sending], dtype=np.float64)
    total = float(avail.sum())
    return avail * min(1.0, downlink / total) if total > 0 else avail


def lower_bound(
    shard_sizes: Sequence[int], sources: Sequence[Source], downlink: float = math.inf
) -> float:
    """The design's transfer bound: total / min(downlink, sum available) + min latency."""
    usable = [s for s in sources if s.available > 0]
    total = float(sum(shard_sizes))
    if total == 0 or not usable:
        return 0.0
    cap = min(downlink, sum(s.available for s in usable))
    return total / cap + min(s.latency for s in usable)


def _build_plan(
    sizes: np.ndarray,
    sources: Sequence[Source],
    sending: Sequence[int],
    assign: np.ndarray,
    downlink: float,
) -> ShardPlan:
    """Evaluate ``assign`` (indices into ``sending``) under the model, as a ShardPlan.

    Rates are recomputed over the sources that actually send, as the model says.
    """
    m = len(sources)
    gidx = (
        np.asarray(sending, dtype=np.int64)[assign]
        if sizes.size
        else np.zeros(0, np.int64)
    )
    used = sorted(set(gidx.tolist()))
    rates = np.zeros(m)
    if used:
        rates[used] = _rates(sources, used, downlink)
    load = np.bincount(gidx, weights=sizes, minlength=m) if sizes.size else np.zeros(m)
    finish = np.zeros(m)
    for i in used:
        finish[i] = sources[i].start + load[i] / rates[i]
    names = [s.name for s in sources]
    return ShardPlan(
        shard_sizes=tuple(int(x) for x in sizes.tolist()),
        assignment=tuple(names[i] for i in gidx.tolist()),
        sources=tuple(names),
        rates=tuple(rates.tolist()),
        bytes_per_source=tuple(round(x) for x in load.tolist()),
        finish_per_source=tuple(finish.tolist()),
        makespan=float(finish.max()) if used else 0.0,
        lower_bound=lower_bound(sizes.tolist(), sources, downlink),
    )


# --------------------------------------------------------------------------- #
# LPT for related machines + local improvement
# --------------------------------------------------------------------------- #


def _lpt(sizes: np.ndarray, start: np.ndarray, inv: np.ndarray) -> np.ndarray:
    """Earliest-finish greedy in decreasing size; returns a source index per shard."""
    order = np.argsort(-sizes, kind="stable")
    finish = start.copy()  # current finish of each source (start if idle)
    buf = np.empty_like(finish)
    assign = np.empty(sizes.size, dtype=np.int64)
    mul, add, argmin = np.multiply, np.add, buf.argmin
    for k, s in zip(order.tolist(), sizes[order].tolist()):
        mul(inv, s, out=buf)
        add(buf, finish, out=buf)
        i = argmin()
        assign[k] = i
        finish[i] = buf[i]
    return assign


def _improve(
    sizes: np.ndarray,
    assign: np.ndarray,
    start: np.ndarray,
    inv: np.ndarray,
    max_steps: int,
    good_enough: float = 0.0,
    swap_partners: int = 16,
) -> np.ndarray:
    """Move/swap shards off the last-finishing source while that lowers it.

    Stops early once the makespan is at most ``good_enough`` (a lower bound
    times 1.001: a further 0.1% is not worth the planning time).
    """
    assign = assign.copy()
    m = start.size
    load = np.bincount(assign, weights=sizes, minlength=m)
    count = np.bincount(assign, minlength=m)
    for _ in range(max_steps):
        busy = count > 0
        finish = np.where(busy, start + load * inv, -np.inf)
        c = int(np.argmax(finish))
        fc = float(finish[c])
        if fc <= good_enough:
            break
        tol = 1e-12 * max(1.0, abs(fc))
        mine = np.flatnonzero(assign == c)
        xs = sizes[mine]
        # What each source's finish would be with an extra shard (idle ones from start).
        base = np.where(busy, finish, start)
        best_val, best = fc - tol, None
        # Moves: shard x of c to source k.  c's new finish is fc - x/r_c (or gone).
        if m > 1:
            cand = base[None, :] + xs[:, None] * inv[None, :]
            cand[:, c] = np.inf
            ks = np.argmin(cand, axis=1)
            newk = cand[np.arange(xs.size), ks]
            newc = np.where(count[c] > 1, fc - xs * inv[c], -np.inf)
            val = np.maximum(newk, newc)
            j = int(np.argmin(val))
            if val[j] < best_val:
                best_val, best = float(val[j]), ("move", int(mine[j]), int(ks[j]))
        # Swaps: shard x of c for a smaller shard y of another source k, among
        # the sources finishing earliest (the only useful partners when m is large).
        if m > swap_partners:
            part = np.argpartition(np.where(busy, finish, np.inf), swap_partners)[
                :swap_partners
            ]
            part = part[(part != c) & busy[part]]
            others = np.flatnonzero(np.isin(assign, part))
        else:
            others = np.flatnonzero(assign != c)
        if others.size:
            ys = sizes[others]
            ok_src = assign[others]
            d = xs[:, None] - ys[None, :]
            newk = finish[ok_src][None, :] + d * inv[ok_src][None, :]
            newc = fc - d * inv[c]
            val = np.where(d > 0, np.maximum(newk, newc), np.inf)
            flat = int(np.argmin(val))
            a, b = divmod(flat, ys.size)
            if val[a, b] < best_val:
                best_val, best = (
                    float(val[a, b]),
                    ("swap", int(mine[a]), int(others[b])),
                )
        if best is None:
            break
        if best[0] == "move":
            _, kx, k = best
            load[c] -= sizes[kx]
            count[c] -= 1
            load[k] += sizes[kx]
            count[k] += 1
            assign[kx] = k
        else:
            _, kx, ky = best
            k = int(assign[ky])
            d = sizes[kx] - sizes[ky]
            load[c] -= d
            load[k] += d
            assign[kx], assign[ky] = k, c
    return assign


def _fit(
    order: list[int],
    sizes: list[float],
    start: list[float],
    inv: list[float],
    deadline: float,
) -> list[int] | None:
    """Best-fit decreasing into per-source capacities ``(deadline - start_i) * r_i``.

    Each shard (largest first) goes to the source it fits with the least time to
    spare afterwards; ``None`` if some shard fits nowhere.
    """
    m = len(start)
    finish = list(start)
    assign = [0] * len(sizes)
    for k in order:
        x = sizes[k]
        best_i, best_f = -1, -math.inf
        for i in range(m):
            f = finish[i] + x * inv[i]
            if best_f < f <= deadline:
                best_i, best_f = i, f
        if best_i < 0:
            return None
        assign[k] = best_i
        finish[best_i] = best_f
    return assign


def _multifit(
    sizes: np.ndarray,
    start: np.ndarray,
    inv: np.ndarray,
    lo: float,
    hi: float,
    rounds: int = 20,
) -> np.ndarray | None:
    """MULTIFIT-style search: the smallest deadline in [lo, hi] that best-fit meets."""
    order = np.argsort(-sizes, kind="stable").tolist()
    xs, st, iv = sizes.tolist(), start.tolist(), inv.tolist()
    found = None
    for _ in range(rounds):
        if hi - lo <= 1e-9 * hi:
            break
        mid = 0.5 * (lo + hi)
        a = _fit(order, xs, st, iv, mid)
        if a is None:
            lo = mid
        else:
            hi, found = mid, a
    return None if found is None else np.asarray(found, dtype=np.int64)


def plan(
    shard_sizes: Sequence[int],
    sources: Sequence[Source],
    downlink: float = math.inf,
    *,
    improve: bool = True,
    max_improve_steps: int = 64,
) -> ShardPlan:
    """Split ``shard_sizes`` among ``sources`` to minimise when the last shard arrives.

    LPT for related machines, then local improvement (module docstring).

    When the downlink binds, rates depend on *which* sources send (they share
    the downlink), and using fewer, faster sources can be better: the shards are
    indivisible, and a source that alone fills the downlink loses nothing by
    working alone.  So several sending sets are planned and the best plan kept:
    every subset when there are at most 6 usable sources; otherwise the fewest
    fastest sources that fill the downlink, and all of them.  Each is re-planned with only the sources that actually got
    shards while that set shrinks (their rates rise).  Without a binding
    downlink this is one LPT run plus improvement.
    """
    sizes = _check(shard_sizes, sources, downlink)
    usable = _usable(sources)
    if sizes.size == 0:
        return _build_plan(sizes, sources, usable, np.zeros(0, np.int64), downlink)
    avail = np.array([s.available for s in sources])
    start_all = np.array([s.start for s in sources])
    if float(avail[usable].sum()) <= downlink:
        candidates = [usable]
    elif len(usable) <= 6:
        candidates = [
            list(c) for r in range(1, len(usable) + 1) for c in combinations(usable, r)
        ]
    else:
        fastest = sorted(usable, key=lambda i: (-avail[i], start_all[i]))
        k = int(np.searchsorted(np.cumsum(avail[fastest]), downlink)) + 1
        candidates = [sorted(fastest[:k]), usable] if k < len(fastest) else [usable]
    best: ShardPlan | None = None
    for sending in candidates:
        for _ in range(4):
            total = float(avail[sending].sum())
            rates = avail[sending] * min(1.0, downlink / total)
            start = start_all[sending]
            inv = 1.0 / rates
            fluid = float(sizes.sum()) / float(rates.sum()) + float(start.min())
            assign = _lpt(sizes, start, inv)
            if improve:
                assign = _improve(
                    sizes, assign, start, inv, max_improve_steps, 1.001 * fluid
                )
            p = _build_plan(sizes, sources, sending, assign, downlink)
            if improve and sizes.size * len(sending) <= MULTIFIT_MAX_WORK:
                alt = _multifit(sizes, start, inv, fluid, p.makespan)
                if alt is not None:
                    alt = _improve(
                        sizes, alt, start, inv, max_improve_steps, 1.001 * fluid
                    )
                    q = _build_plan(sizes, sources, sending, alt, downlink)
                    if q.makespan < p.makespan:
                        p, assign = q, alt
            if best is None or p.makespan < best.makespan:
                best = p
            used = sorted(set(np.asarray(sending)[assign].tolist()))
            if len(used) == len(sending) or total <= downlink:
                break
            sending = used
    assert best is not None
    return best


# --------------------------------------------------------------------------- #
# Exact, for small instances (tests)
# --------------------------------------------------------------------------- #


def _branch_and_bound(
    xs: list[float], start: list[float], inv: list[float], bound: float
) -> list[int] | None:
    """Assignment of ``xs`` (largest first) with makespan below ``bound``, the best such; or None."""
    m = len(start)
    load = [0.0] * m
    cnt = [0] * m
    cur = [0] * len(xs)
    best: list = [bound * (1 + 1e-12), None]

    def dfs(k: int, span: float) -> None:
        if k == len(xs):
            if span < best[0]:
                best[0], best[1] = span, cur.copy()
            return
        seen_idle: set[tuple[float, float]] = set()
        for i in range(m):
            if cnt[i] == 0:  # identical idle sources are interchangeable
                key = (start[i], inv[i])
                if key in seen_idle:
                    continue
                seen_idle.add(key)
            ns = max(span, start[i] + (load[i] + xs[k]) * inv[i])
            if ns >= best[0]:
                continue
            load[i] += xs[k]
            cnt[i] += 1
            cur[k] = i
            dfs(k + 1, ns)
            load[i] -= xs[k]
            cnt[i] -= 1

    dfs(0, 0.0)
    return best[1]


def exact_plan(
    shard_sizes: Sequence[int], sources: Sequence[Source], downlink: float = math.inf
) -> ShardPlan:
    """The optimal plan under the same model, by branch and bound (<= 8 shards, <= 4 sources).

    Because rates depend on which sources send (the downlink share), every set of
    sending sources is tried when the downlink can bind; otherwise one search
    over all sources suffices.
    """
    sizes = _check(shard_sizes, sources, downlink)
    if sizes.size > 8 or len(sources) > 4:
        raise ValueError("exact_plan is for <= 8 shards and <= 4 sources")
    usable = _usable(sources)
    if sizes.size == 0:
        return _build_plan(sizes, sources, usable, np.zeros(0, np.int64), downlink)
    if sum(sources[i].available for i in usable) <= downlink:
        subsets = [tuple(usable)]
    else:
        subsets = [
            c for r in range(1, len(usable) + 1) for c in combinations(usable, r)
        ]
    order = np.argsort(-sizes, kind="stable").tolist()
    xs = sizes[order].tolist()
    best_val, best_plan = math.inf, None
    for sub in subsets:
        rates = _rates(sources, sub, downlink).tolist()
        found = _branch_and_bound(
            xs, [sources[i].start for i in sub], [1.0 / r for r in rates], best_val
        )
        if found is not None:
            assign = np.empty(len(xs), dtype=np.int64)
            for pos, k in enumerate(order):
                assign[k] = found[pos]
            p = _build_plan(sizes, sources, list(sub), assign, downlink)
            if p.makespan < best_val:
                best_val, best_plan = p.makespan, p
    assert best_plan is not None
    return best_plan


# --------------------------------------------------------------------------- #
# Shard sizing
# --------------------------------------------------------------------------- #


@dataclass(frozen=True)
class Shard:
    """A unit of transfer: byte ranges ``(tensor_index, offset, length)`` of the state's tensors."""

    pieces: tuple[tuple[int, int, int], ...]

    @property
    def nbytes(self) -> int:
        return sum(p[2] for p in self.pieces)


def shard_target(
    total_bytes: int,
    n_sources: int,
    *,
    shards_per_source: int = SHARDS_PER_SOURCE,
    min_bytes: int = MIN_SHARD_BYTES,
) -> int:
    """Target shard size: ``shards_per_source`` shards per source, never below ``min_bytes``.

    Several shards per source bound the imbalance the greedy can leave (about
    one shard's time); the floor keeps per-shard overhead (request, header,
    checksum) negligible.  See :data:`SHARDS_PER_SOURCE`, :data:`MIN_SHARD_BYTES`.
    """
    if n_sources < 1:
        raise ValueError("n_sources must be >= 1")
    return max(
        int(min_bytes), -(-int(total_bytes) // (n_sources * shards_per_source)), 1
    )


def cut_shards(
    tensor_sizes: Sequence[int], target: int | None = None, *, n_sources: int = 1
) -> list[Shard]:
    """Cut the state's tensors into shards of about ``target`` bytes.

    Tensors larger than ``target`` are split into ``ceil(size / target)`` pieces
    of near-equal size (equal pieces balance better than target-sized ones plus a
    small remainder); smaller tensors are packed first-fit-decreasing into shards
    of at most ``target`` bytes.  ``target`` defaults to :func:`shard_target` for
    ``n_sources``.  Every byte of every tensor is in exactly one shard.
    """
    sizes = [int(s) for s in tensor_sizes]
    if any(s < 0 for s in sizes):
        raise ValueError("tensor sizes must be >= 0")
    if target is None:
        target = shard_target(sum(sizes), n_sources)
    if target < 1:
        raise ValueError("target must be >= 1")
    shards: list[Shard] = []
    small: list[int] = []
    for t, size in enumerate(sizes):
        if size > target:
            k = -(-size // target)
            q, r = divmod(size, k)
            off = 0
            for p in range(k):
                n = q + (1 if p < r else 0)
                shards.append(Shard(((t, off, n),)))
                off += n
        else:
            small.append(t)
    small.sort(key=lambda t: -sizes[t])
    bins: list[list[tuple[int, int, int]]] = []
    room: list[int] = []
    for t in small:
        s = sizes[t]
        for b, free in enumerate(room):
            if s <= free:
                bins[b].append((t, 0, s))
                room[b] -= s
                break
        else:
            bins.append([(t, 0, s)])
            room.append(target - s)
    shards.extend(Shard(tuple(b)) for b in bins)
    return shards
