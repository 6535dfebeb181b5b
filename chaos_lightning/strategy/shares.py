"""Adaptive shares: each member's part of the global batch follows its measured speed.

Role in the whole: a synchronous step ends when its slowest member reaches
the gradient all-reduce.  With equal shares, one member at half speed halves
everyone's throughput.  With ``CHAOS_SHARES=adaptive`` the strategy measures
each rank's *busy time* per step (from the end of its previous all-reduce to
the start of this one: data loading, forward, backward, the optimizer step
and the hooks, never the wait inside the all-reduce) and carries it in the
step's control record (:class:`~.switch.Control`), so every rank learns
every rank's time at the same step with no extra round trip.  This module
turns that shared history into integer *weights*, one per rank, which the
sampler (:func:`~.sampler._share_bounds`) splits each block by.  The global
batch is unchanged (``global_batch_size`` still fixes it) and the gradient
average stays sample-weighted (the strategy weights each rank's gradient by
its samples over the block's), so exactly-once and bit-identical replicas
hold whatever the weights are.

Lockstep: every rank calls :meth:`ShareBalancer.observe` with the same
values (the summed record and the shared layout) and so gets the same answer
at the same step; the arithmetic is IEEE ``+ - * /`` and comparisons only.
The history is dropped at every view change (and when shadows are
promoted), so a joiner, which never saw the old history, starts from the
same empty state as everyone else; decisions are at least :attr:`spacing`
steps apart.

The rule, per rank ``r`` with ``n_r`` samples and busy time ``t_r``:

* its rate is the median of its last :attr:`window` values of ``n_r / t_r``
  (a median: a validation, a checkpoint save or the first step after a
  relayout makes one step slow without saying anything about speed), kept
  across share decisions and dropped at a view change;
* with every contributing rank measured :attr:`min_steps` times, the
  proposed weights are the rates (scaled to integers), each at least
  1/:attr:`max_skew` of the largest and at most :attr:`max_over` times the
  equal share (a fast rank's batch, and its memory, stay bounded);
* they are taken when the step time they predict, ``max(n'_r / rate_r)``
  over the whole-sample split ``n'`` they give the same block, is shorter
  than the current ``max(n_r / rate_r)`` by more than :attr:`tolerance`
  plus what the ranks' own noise explains (:meth:`_noise`: two standard
  errors of a median, from each rank's median absolute deviation)
  (whole samples: with 8 samples over a fast and a slow rank, 6 and 2 may
  already be the best split, and the fractional optimum would propose it
  again at every step, measured).

Why this converges even where a step has a fixed cost ``a_r`` besides the
per-sample one (``t_r = a_r + n_r / s_r``): weights proportional to
``n_r / t_r`` shrink the share of every rank whose step is longer than the
others' and grow the rest, so the fixed point is equal busy times, which is
what a synchronous step wants (not equal per-sample rates).  The tolerance
stops the iteration once the predicted gain is small, so balanced members
are not relaid out on noise (each relayout restarts the data loader's
iterator).

Stepping down (:attr:`ShareBalancer.straggler`, ``CHAOS_STRAGGLER``).  A
smaller share cannot always make a member keep pace: its weight has a floor
(:attr:`max_skew`), and part of a step costs the same at any share (the
optimizer step over the whole model, the hooks, a fixed wait in the user's
code).  At each observation where the split is as good as shares make it,
the balancer compares the slowest member's measured busy time (the step
with it) against the step the others alone would take over their best
split (predicted from their rates): nobody else's absence could shorten
the step.  When the group without that member would
be faster by more than ``straggler`` (a fraction) for :attr:`patience`
observations in a row, :attr:`step_down` names it; the strategy makes it
leave at the next boundary and stand by (``strategy/elastic.py``).  The
others' rates are those measured at their current, smaller shares, whose
fixed costs a larger share spreads thinner: "faster without it" is, if
anything, underestimated.  A member at half speed is never named (the group
with it is a third faster than without).

What it never does: measure time, touch tensors or the sampler.  Tested in
one process with generated speed models (``tests/test_shares.py``).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

from chaos_lightning.strategy.sampler import share_sizes, singles_allowed


__all__ = ["ShareBalancer", "WEIGHT_SCALE", "link_admission"]

#: the largest weight: rates are scaled so that the fastest rank gets this
WEIGHT_SCALE = 1 << 16


@dataclass
class ShareBalancer:
    """Decides the members' weights from their measured busy times (see the module docstring)."""

    #: steps every contributing rank is measured before the first decision
    min_steps: int = 3
    #: steps per rank the median is taken over
    window: int = 9
    #: steps after a decision before the next one (most of the window then
    #: measures the new split)
    spacing: int = 6
    #: the predicted step time must drop by more than this fraction
    tolerance: float = 0.08
    #: the slowest rank's weight is at least the fastest's over this
    max_skew: int = 16
    #: a rank's share is at most this many times the equal share
    max_over: float = 2.0
    #: name a member to step down when the others alone would be faster by
    #: more than this fraction (0: never; see the module docstring)
    straggler: float = 0.0
    #: observations in a row that must say so
    patience: int = 12
    #: set by :meth:`observe` when a member should step down: (its rank, the
    #: busy time of a step with it and without it, seconds); read and clear
    step_down: tuple[int, float, float] | None = field(default=None, init=False)
    _slow: tuple[int, int] = field(default=(-1, 0), init=False, repr=False)  # (rank, observations in a row)
    _busy: list[deque[float]] = field(default_factory=list, init=False, repr=False)  # seconds, since the split
    _rates: list[deque[float]] = field(default_factory=list, init=False, repr=False)
    #: the last decision's rates (samples/s per rank) and the busy time of a
    #: step it predicted before and after, seconds, for reports
    rates: tuple[float, ...] = field(default=(), init=False)
    predicted: tuple[float, float] = field(default=(0.0, 0.0), init=False)
    _since: int = field(default=0, init=False, repr=False)  # observations since the last decision

    def reset(self) -> None:
        """The ranks or their number changed (a view change, shadows
        promoted): the history belongs to other ranks.  Not after new
        weights: a rank's rate (samples/s) hardly depends on its share, and
        a history kept across decisions is what keeps them off the noise
        (measured: with the history dropped at each decision, the three
        equal nodes of benchmarks/heterogeneity.py were relaid out every
        four steps on their +-8 % noise)."""
        self._rates = []
        self._busy = []
        self._since = 0
        self._slow = (-1, 0)
        self.step_down = None

    def observe(self, samples: Sequence[int], busy_us: Sequence[int],
                members: Sequence[int] | None = None) -> tuple[int, ...] | None:
        """One successful step: each rank's samples and busy time (µs; 0:
        not measured).  ``members``: the ranks that take a share (not the
        shadows; default: every rank).  Returns new weights when a rebalance
        is due, else None.

        A rank adds a rate only when it trained samples and was measured.  A
        member with no rate at all (its share rounded to nothing in a tiny
        block) is given the median of the others' rates, so it is measured
        again after the next relayout rather than starved for good.
        """
        world = len(samples)
        if len(busy_us) != world:
            raise ValueError(f"{world} sample counts but {len(busy_us)} busy times")
        members = list(range(world)) if members is None else sorted(members)
        if len(self._rates) != world:
            self._rates = [deque(maxlen=self.window) for _ in range(world)]
        if len(self._busy) != world:
            self._busy = [deque(maxlen=self.window) for _ in range(world)]
        for r in members:
            if samples[r] > 0 and busy_us[r] > 0:
                self._rates[r].append(samples[r] * 1e6 / busy_us[r])
            if busy_us[r] > 0:  # with no samples too: what a step costs it whatever its share
                self._busy[r].append(busy_us[r] / 1e6)
        self._since += 1
        active = [r for r in members if samples[r] > 0]
        if not active or any(len(self._rates[r]) < self.min_steps for r in active):
            return None
        known = {r: _median(self._rates[r]) for r in members if self._rates[r]}
        fallback = _median(list(known.values()))
        rates = tuple(known.get(r, fallback) if r in members else 0.0 for r in range(world))
        weights = self.weights_for(rates, members)
        # the step time predicted from the rates, under the current split and
        # under the split the new weights give the same samples (whole
        # samples: a proportional share that rounds to the current split is
        # no gain, and relaying out for it would restart the data loader for nothing)
        total = sum(samples)
        shadows = tuple(r for r in range(world) if r not in members)
        split = _split(total, world, shadows, weights)
        now = max(samples[r] / rates[r] for r in members)
        then = max(split[r] / rates[r] for r in members)
        gain = split != list(samples) and then * (1.0 + self.tolerance + self._noise(active)) < now
        if not gain or (self.rates and self._since < self.spacing):
            if self.straggler > 0 and not gain:  # the split is as good as shares make it
                self._watch(total, rates, members)
            return None
        self._busy = [deque(maxlen=self.window) for _ in range(world)]  # they timed the old split
        self._slow = (-1, 0)
        self.rates = rates
        self.predicted = (now, then)
        self._since = 0
        return weights

    def _watch(self, total: int, rates: Sequence[float], members: Sequence[int]) -> None:
        """Count the observations in a row in which the group without its
        slowest member (predicted from the others' rates) is faster than
        the group with it (that member's
        measured busy time, a median: fixed costs included, which a rate
        model misses for a share rounded to no samples) by more than
        :attr:`straggler`; at :attr:`patience`, set :attr:`step_down` and
        start counting again."""
        if len(members) < 2 or total <= 0 or any(len(self._busy[r]) < self.min_steps for r in members):
            self._slow = (-1, 0)
            return
        busy = {r: _median(self._busy[r]) for r in members}
        best = max(members, key=lambda r: (busy[r], -r))  # the slowest: nobody else's absence shortens the step
        with_all = busy[best]
        world = len(rates)
        rest = [r for r in members if r != best]
        shadows = tuple(r for r in range(world) if r not in rest)
        split = _split(total, world, shadows, self.weights_for(rates, rest))
        without = max(split[r] / rates[r] for r in rest)
        if with_all <= (1.0 + self.straggler) * without:
            self._slow = (-1, 0)
            return
        rank, count = self._slow
        count = count + 1 if rank == best else 1
        self._slow = (best, count)
        if count >= self.patience:
            self.step_down = (best, with_all, without)
            self._slow = (-1, 0)

    def _noise(self, ranks: Sequence[int]) -> float:
        """How far apart two ranks' median rates may be by chance alone: about
        two standard errors of the median (1.25 sigma / sqrt(n)), sigma from
        each rank's median absolute deviation, the noisiest rank's.  Measured
        on benchmarks/heterogeneity.py (a CFS quota per node): +-8 % per step,
        so medians of 9 differed by up to 7 % and a fixed 8 % bar was crossed
        every few decisions on noise alone."""
        worst = 0.0
        for r in ranks:
            values = self._rates[r]
            mid = _median(values)
            if len(values) < 3 or mid <= 0:
                continue
            mad = _median([abs(v - mid) for v in values])
            worst = max(worst, 2 * 1.25 * 1.4826 * mad / mid / len(values) ** 0.5)
        return worst

    def weights_for(self, rates: Sequence[float], members: Sequence[int]) -> tuple[int, ...]:
        """Integer weights proportional to ``rates`` over the ``members`` (the
        other ranks 0), bounded by :attr:`max_skew` and :attr:`max_over`."""
        top = max(rates[r] for r in members)
        floor = WEIGHT_SCALE // self.max_skew
        raw = {r: max(floor, int(WEIGHT_SCALE * rates[r] / top)) for r in members}
        # at most max_over times the equal share (a fast rank's batch, and
        # its memory, stay bounded): the largest weights are lowered to the
        # level c where c = max_over / k of the capped total; what they give
        # up goes to the others through the proportional split
        limit = self.max_over / len(raw)
        if limit < 1:
            ordered = sorted(raw.values(), reverse=True)
            for capped in range(1, len(ordered)):
                if capped * limit >= 1:
                    break
                level = limit * sum(ordered[capped:]) / (1 - capped * limit)
                if ordered[capped] <= level < ordered[capped - 1]:
                    raw = {r: min(w, int(level)) for r, w in raw.items()}
                    break
        return tuple(raw.get(r, 0) for r in range(len(rates)))


def link_admission(step_s: float, busy_s: float, world: int, grad_bytes: int, bandwidth: float,
                   slack: float) -> tuple[bool, float]:
    """Would a candidate whose link carries ``bandwidth`` bytes/s slow a
    group of ``world`` members by more than ``slack``?  Returns (admit, the
    step time predicted with it, seconds).

    The members' step (``step_s``, wall) is their busy time (``busy_s``,
    the slowest member's) plus the rest: the all-reduce and its waits.  With
    the candidate, the busy part is shared by one more (adaptive shares make
    the slower ones' parts smaller; a candidate of the members' average
    speed is assumed, and one slower steps down later), and the all-reduce
    takes at least what the candidate's link needs for its part of a ring
    all-reduce: ``2 (n-1)/n`` times the gradient bytes, ``n = world + 1``."""
    rest = max(0.0, step_s - busy_s)
    n = world + 1
    link = 2 * (n - 1) / n * grad_bytes / bandwidth if bandwidth > 0 else float("inf")
    predicted = busy_s * world / n + max(rest, link)
    return predicted <= (1.0 + slack) * step_s, predicted


def _split(total: int, world: int, shadows: tuple[int, ...], weights: Sequence[int]) -> list[int]:
    """Each rank's samples of a full block of ``total`` under ``weights``:
    the sampler's own split (:func:`~.sampler.share_sizes`), a slice of one
    allowed where the sampler allows it for such a block."""
    return share_sizes(total, world, shadows, weights, singles=singles_allowed(total, world, shadows))


def _median(values: Sequence[float]) -> float:
    ordered = sorted(values)
    mid = len(ordered) // 2
    return ordered[mid] if len(ordered) % 2 else (ordered[mid - 1] + ordered[mid]) / 2
