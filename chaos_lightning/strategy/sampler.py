"""The elastic sampler: which samples each rank trains at each step, across view changes.

Role in the whole: ``ChaosStrategy`` switches the process group between views
(ordered member lists) at step boundaries, all members at the same step.  This
module is what keeps DESIGN.md's *exactly once* rule through those switches:
within an epoch every sample is trained exactly once, whatever sequence of
joins, leaves and crashes happens, and every member of a view runs the same
number of steps (a rank that stopped early would leave its peers hanging in
the next collective).  It does no communication and no I/O: the strategy
drives it (``reconfigure`` at a view switch, ``commit_step`` / ``abort_step``
after each step) and ships its :meth:`ElasticSampler.state_dict` to joiners.

The scheme (see notes/torch-lightning-facts.md, section 3):

* Every rank computes the same permutation of ``range(N)`` for the epoch,
  ``torch.randperm(N, generator seeded with seed + epoch)`` -- the same
  recipe as ``torch.utils.data.DistributedSampler`` -- so members agree on it
  without a message.
* The epoch is a queue: first the *returned* samples (trained by a rank whose
  gradient never made it into a committed step), then the permutation from a
  global cursor ``start``.  Each global step takes the next *block* of
  ``capacity`` samples off the front of the queue (``world_size * batch_size``
  by default, or a fixed ``global_batch_size``), and rank ``r`` takes the
  ``r``-th contiguous slice of it.  A block is split as evenly as possible
  (sizes differ by at most one, the larger slices first): a short last block
  is never padded with repeated samples and never dropped (unless
  ``drop_last``), so a rank can get fewer samples than its peers -- or none.
* The queue only moves on :meth:`~ElasticSampler.commit_step`, which the
  strategy calls once the step's update is applied everywhere.  A failed step
  (:meth:`~ElasticSampler.abort_step`) consumes nothing: the same samples are
  at the front of the queue again, and the next view -- maybe smaller -- splits
  them its own way.  Because the layout is a pure function of
  ``(epoch, start, returned, rank, world_size, capacity)``, a view switch is
  just :meth:`~ElasticSampler.reconfigure`: the remaining samples are re-split
  over the new world from the current cursor, and ``steps_remaining()`` is the
  same on every member because it depends on shared state only.

What this module never does: decide when a step committed (the strategy
does, from the collective's outcome), or weight gradients (it reports
:meth:`~ElasticSampler.loss_scale` so the strategy can).
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Iterator, Sequence, Sized
from dataclasses import dataclass
from typing import Any

import os

import torch
from torch.utils.data import DataLoader, IterableDataset, Sampler

__all__ = [
    "ElasticBatchSampler",
    "ElasticSampler",
    "Ledger",
    "StaleLayoutError",
    "split_sizes",
]

#: samples a rank with no share (a stop-free joiner's shadow) runs each step on
STAND_IN_SAMPLES = 2

# Bumped when the state_dict layout changes; a joiner refuses a state it
# cannot read rather than guessing (DESIGN.md: nothing lost on bad input).
STATE_VERSION = 1


class StaleLayoutError(RuntimeError):
    """An iterator was advanced after the layout it was planned for changed.

    Iterators plan the remaining steps assuming every step commits.  After a
    :meth:`~ElasticSampler.reconfigure`, an :meth:`~ElasticSampler.abort_step`,
    a commit with lost ranks, a new epoch or a state load, that plan is wrong:
    continuing it would train some samples twice and others never.  The
    strategy must drop the old iterator (and the DataLoader batches prefetched
    from it) and call ``iter()`` again.
    """


def split_sizes(total: int, parts: int) -> list[int]:
    """Sizes of ``parts`` contiguous slices of ``total`` items, as even as possible.

    The first ``total % parts`` slices get one more item.  Used both for a
    block over ranks and for ``global_batch_size`` over ranks, so that the two
    always agree.
    """
    if parts < 1:
        raise ValueError(f"parts must be >= 1, got {parts}")
    base, extra = divmod(total, parts)
    return [base + (1 if r < extra else 0) for r in range(parts)]


def share_sizes(
    total: int, world: int, shadows: tuple[int, ...] = (), weights: Sequence[int] | None = None, *,
    singles: bool = False,
) -> list[int]:
    """Each rank's number of samples of a block of ``total``, in rank order
    (the slices are contiguous in that order).  The ``shadows`` take none (a
    stop-free joiner before it caught up).  Without ``weights`` the block is
    split evenly over the other ranks, the larger slices first; with
    ``weights`` (one non-negative integer per rank: the adaptive shares of
    :mod:`.shares`) rank ``r`` takes ``total * W_r / W``, rounded down at both
    cumulative ends, so the slices tile the block exactly.

    Then, unless ``singles``, no rank is left one sample of a larger block:
    that sample goes to the next rank with a slice (the previous one for the
    last), and the rank runs the step on a stand-in weighted 0.  A
    ``BatchNorm`` in training mode refuses a batch of one, and splits the
    user never chose make them: the epoch's tail after a view change (a
    4-sample tail over 3 ranks is 2, 1, 1), a slow rank's adaptive share.
    The sampler passes ``singles`` only when the user's own full block gives
    each rank one sample or none (``batch_size=1``, or a ``global_batch_size``
    below twice the ranks): then a batch of one is what they asked for.  A
    slice takes at most two samples so moved (one from the slices of one
    before it, one from the last), so it is within three samples of its
    proportional share."""
    contributing = [r for r in range(world) if r not in shadows]
    out = [0] * world
    if weights is None:
        for r, n in zip(contributing, split_sizes(total, len(contributing) or 1)):
            out[r] = n
    else:
        w = [0 if r in shadows else weights[r] for r in range(world)]
        whole, below = sum(w), 0
        for r, x in enumerate(w):
            out[r] = total * (below + x) // whole - total * below // whole
            below += x
    if total >= 2 and not singles:  # one pass: the hot path calls this once per rank's question
        carried, kept = -1, -1  # a slice of one waiting for the next slice; the last slice kept
        for r in range(world):
            if not out[r]:
                continue
            if carried >= 0:
                out[carried], out[r], carried, kept = 0, out[r] + 1, -1, r
            elif out[r] == 1:
                carried = r
            else:
                kept = r
        if carried >= 0:  # the last slice was one: it goes back to the last slice kept
            out[carried], out[kept] = 0, out[kept] + 1
    return out


def singles_allowed(capacity: int, world: int, shadows: tuple[int, ...]) -> bool:
    """Whether a full block of ``capacity`` gives each contributing rank one
    sample or none: then a slice of one is the user's choice (:func:`share_sizes`)."""
    return capacity < 2 * (world - len(shadows))


def _share_bounds(
    total: int, world: int, shadows: tuple[int, ...], rank: int, weights: tuple[int, ...] | None = None,
    singles: bool = False,
) -> tuple[int, int]:
    """``rank``'s slice ``[lo, hi)`` of a block of ``total``: see :func:`share_sizes`."""
    sizes = share_sizes(total, world, shadows, weights, singles=singles)
    lo = sum(sizes[:rank])
    return lo, lo + sizes[rank]


def _share_slices(
    total: int, world: int, shadows: tuple[int, ...], weights: tuple[int, ...] | None, singles: bool,
) -> list[tuple[int, int]]:
    """Every rank's ``[lo, hi)`` of a block of ``total``, in rank order: one
    split for all of them (a per-rank loop over :func:`_share_bounds` would
    split the block once per rank)."""
    out, lo = [], 0
    for n in share_sizes(total, world, shadows, weights, singles=singles):
        out.append((lo, lo + n))
        lo += n
    return out


def check_weights(weights: Iterable[int] | None, world: int, shadows: tuple[int, ...] = ()) -> tuple[int, ...] | None:
    """``weights`` as a tuple, validated for a world of ``world`` ranks (None: equal shares)."""
    if weights is None:
        return None
    out = tuple(int(w) for w in weights)
    if len(out) != world or any(w < 0 for w in out) or not any(w > 0 for r, w in enumerate(out) if r not in shadows):
        raise ValueError(f"share weights {out} must be {world} non-negative integers, some contributing rank's > 0")
    return out


@dataclass(frozen=True)
class _Layout:
    """A frozen picture of the queue and the world: all the layout arithmetic.

    The sampler makes one from its live state for every question; an iterator
    keeps the one it started from, because plain commits move the live cursor
    while the iterator is already (prefetching) steps ahead of it.
    """

    order: torch.Tensor | range
    start: int
    returned: tuple[int, ...]
    rank: int
    world_size: int
    capacity: int
    drop_last: bool
    shadows: tuple[int, ...] = ()
    weights: tuple[int, ...] | None = None

    @property
    def samples_remaining(self) -> int:
        return len(self.returned) + len(self.order) - self.start

    @property
    def singles(self) -> bool:
        return singles_allowed(self.capacity, self.world_size, self.shadows)

    @property
    def steps_remaining(self) -> int:
        remaining = self.samples_remaining
        return remaining // self.capacity if self.drop_last else -(-remaining // self.capacity)

    def block(self, step: int) -> list[int]:
        if not 0 <= step < self.steps_remaining:
            return []
        lo = step * self.capacity
        hi = min(lo + self.capacity, self.samples_remaining)
        # Items lo:hi of the queue: the returned samples, then the permutation.
        nret = len(self.returned)
        out = list(self.returned[lo:hi]) if lo < nret else []
        plo, phi = self.start + max(lo - nret, 0), self.start + max(hi - nret, 0)
        if phi > plo:
            part = self.order[plo:phi]
            out += part.tolist() if isinstance(part, torch.Tensor) else list(part)
        return out

    def batch(self, step: int, rank: int) -> list[int]:
        blk = self.block(step)
        lo, hi = _share_bounds(len(blk), self.world_size, self.shadows, rank, self.weights, self.singles)
        return blk[lo:hi]

    def stand_in(self, step: int) -> list[int]:
        """What a rank with no share runs the step on: the first
        :data:`STAND_IN_SAMPLES` samples of the first contributing rank's
        batch (real data for the user's step), weighted 0.  Two, not one: a
        ``BatchNorm`` in training mode refuses a batch of one; not the whole
        batch: a shadow's compute is thrown away, and it competes with the
        members' (and with its own pull) for the machine."""
        first = next((r for r in range(self.world_size) if r not in self.shadows), 0)
        return (self.batch(step, first) or self.block(step))[:STAND_IN_SAMPLES]


class ElasticSampler(Sampler[int]):
    """Exactly-once sampling over an elastic world; one object per rank.

    ``data_source`` is a sized dataset or the number of samples ``N``.
    Exactly one of ``batch_size`` (per rank; the global batch grows and shrinks
    with the world, as in plain DDP) and ``global_batch_size`` (kept constant;
    each rank gets an even share, so the optimizer sees the same batch however
    many nodes train -- the choice when learning-rate schedules must not
    depend on the cluster's size) must be given.

    In ``global_batch_size`` mode with ``world_size > global_batch_size`` the
    extra ranks get an empty batch at *every* step: they still run the step
    (lockstep) but contribute zero gradient.  Training stays correct, only
    those ranks' compute is wasted; the strategy should warn.

    ``drop_last`` drops the final short block of the epoch (under the layout
    in force when it is reached), so those samples are not trained in this
    epoch; every other sample still is, exactly once.

    The strategy's protocol per step: run the step on :meth:`batch_for` (or
    the batch the :class:`ElasticBatchSampler` iterator yields), then on every
    member either :meth:`commit_step` (the update was applied everywhere) or
    :meth:`abort_step` (it was not), then at a view switch
    :meth:`reconfigure`.  All members must make the same calls in the same
    order; that is what keeps their states identical.
    """

    def __init__(
        self,
        data_source: Sized | int,
        batch_size: int | None = None,
        *,
        global_batch_size: int | None = None,
        rank: int = 0,
        world_size: int = 1,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        epoch: int = 0,
    ) -> None:
        num_samples = data_source if isinstance(data_source, int) else len(data_source)
        if num_samples < 0:
            raise ValueError(f"num_samples must be >= 0, got {num_samples}")
        if (batch_size is None) == (global_batch_size is None):
            raise ValueError("give exactly one of batch_size (per rank) and global_batch_size")
        if batch_size is not None and batch_size < 1:
            raise ValueError(f"batch_size must be >= 1, got {batch_size}")
        if global_batch_size is not None and global_batch_size < 1:
            raise ValueError(f"global_batch_size must be >= 1, got {global_batch_size}")
        self.num_samples = num_samples
        self.batch_size = batch_size
        self.global_batch_size = global_batch_size
        self.shuffle = shuffle
        self.seed = seed
        self.drop_last = drop_last
        self.epoch = epoch
        # Position in the permutation of the first sample no committed step
        # has consumed.
        self.start = 0
        # Samples (dataset indices) handed back by committed steps whose
        # gradient from some rank was lost; served before the cursor.
        self.returned: list[int] = []
        # Steps committed in this epoch: for progress and for Lightning's
        # batch_idx, not needed by the layout itself.
        self.steps_committed = 0
        self.rank = 0
        self.world_size = 1
        # Ranks that train no share (stop-free joiners still catching up):
        # they run every step on a stand-in batch with weight 0.  Set with the
        # world at reconfigure; like rank and world, not part of the shared state.
        self.shadows: tuple[int, ...] = ()
        # The members' adaptive shares (one integer weight per rank, set at a
        # reconfigure; None: equal).  Like shadows, not part of the shared
        # state: every member sets the same at the same step boundary.
        self.weights: tuple[int, ...] | None = None
        # Changes whenever a plan made by an iterator becomes wrong (see
        # StaleLayoutError).  Local only: not part of the shared state.
        self.generation = 0
        self._order_epoch: int | None = None
        self._order: torch.Tensor | range = range(0)
        self.reconfigure(rank, world_size)

    # -- layout ------------------------------------------------------------------
    @property
    def capacity(self) -> int:
        """Samples one global step takes off the queue under the current world."""
        if self.global_batch_size is not None:
            return self.global_batch_size
        assert self.batch_size is not None
        return (self.world_size - len(self.shadows)) * self.batch_size

    @property
    def singles(self) -> bool:
        """Whether a rank may get a slice of one sample (:func:`share_sizes`)."""
        return singles_allowed(self.capacity, self.world_size, self.shadows)

    def per_rank_batch_size(self, rank: int | None = None) -> int:
        """The samples ``rank`` (default: this rank) gets in a full step (a
        shadow: the stand-in batch it runs, the first contributor's).  A
        short block's slice may hold up to two more: :func:`share_sizes`."""
        rank = self.rank if rank is None else rank
        if rank in self.shadows:
            rank = next((r for r in range(self.world_size) if r not in self.shadows), 0)
        lo, hi = _share_bounds(self.capacity, self.world_size, self.shadows, rank, self.weights, self.singles)
        return hi - lo

    def _layout(self) -> _Layout:
        return _Layout(
            order=self._epoch_order(),
            start=self.start,
            returned=tuple(self.returned),
            rank=self.rank,
            world_size=self.world_size,
            capacity=self.capacity,
            drop_last=self.drop_last,
            shadows=self.shadows,
            weights=self.weights,
        )

    def samples_remaining(self) -> int:
        """Samples of this epoch not yet consumed by a committed step."""
        return len(self.returned) + self.num_samples - self.start

    def steps_remaining(self) -> int:
        """Global steps left in this epoch under the current layout.

        A function of shared state and ``world_size`` only, hence identical on
        every member of a view: the lockstep guarantee the strategy relies on.
        """
        return self._layout().steps_remaining

    def block(self, step: int = 0) -> list[int]:
        """The global block of ``step`` steps from now (0: the step about to run).

        Assumes the steps in between all commit with no lost rank, which is
        what an iterator over the rest of the layout assumes too.
        """
        return self._layout().block(step)

    def step_slices(self, step: int = 0) -> list[list[int]]:
        """Every rank's batch at ``step`` steps from now, in rank order.

        Empty lists mark ranks that must still run the step, with weight 0.
        Outside the epoch's remaining steps every slice is empty.
        """
        blk = self.block(step)
        return [blk[lo:hi] for lo, hi in _share_slices(len(blk), self.world_size, self.shadows, self.weights,
                                                       self.singles)]

    def batch_for(self, step: int = 0, rank: int | None = None) -> list[int]:
        """This rank's (or ``rank``'s) batch at ``step`` steps from now; maybe empty."""
        return self._layout().batch(step, self.rank if rank is None else rank)

    def loss_scale(self, step: int = 0, rank: int | None = None) -> float:
        """Factor for this rank's *mean* loss so that DDP's gradient average is the block mean.

        DDP averages gradients over ``world_size`` ranks as if every batch had
        the same size; with a short or uneven block that over-weights the
        small batches.  Scaling rank ``r``'s mean loss by
        ``world_size * n_r / len(block)`` makes the average exactly the mean
        over the block's samples; a rank with an empty batch gets 0.
        """
        blk = len(self.block(step))
        if blk == 0:
            return 0.0
        rank = self.rank if rank is None else rank
        lo, hi = _share_bounds(blk, self.world_size, self.shadows, rank, self.weights, self.singles)
        return self.world_size * (hi - lo) / blk

    # -- the strategy's calls ----------------------------------------------------
    def set_epoch(self, epoch: int) -> None:
        """Start ``epoch``: new permutation, cursor back to 0, nothing returned.

        Setting the epoch the sampler is already in is a no-op.  Lightning's
        fit loop calls ``set_epoch(current_epoch)`` at every epoch start,
        including right after a joiner loaded a member's mid-epoch state;
        resetting then would retrain what the cluster already trained.
        """
        if epoch == self.epoch:
            return
        self.epoch = epoch
        self.start = 0
        self.returned = []
        self.steps_committed = 0
        self.generation += 1

    def reconfigure(self, rank: int, world_size: int, shadows: Iterable[int] = (),
                    weights: Iterable[int] | None = None) -> None:
        """Switch to a new view at a step boundary: re-split what remains over it.

        Every member (joiners included, after :meth:`load_state_dict`) calls
        it with its own rank and the same ``world_size``, ``shadows`` (the
        ranks that take no share yet: stop-free joiners catching up) and
        ``weights`` (each rank's share of a block, :mod:`.shares`; None:
        equal).  The global batch stays what it was: only its split changes.
        """
        if world_size < 1:
            raise ValueError(f"world_size must be >= 1, got {world_size}")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} outside world of size {world_size}")
        shadows = tuple(sorted(set(shadows)))
        if any(not 0 <= r < world_size for r in shadows) or len(shadows) >= world_size:
            raise ValueError(f"shadow ranks {shadows} must be some, not all, of a world of size {world_size}")
        self.weights = check_weights(weights, world_size, shadows)
        self.rank = rank
        self.world_size = world_size
        self.shadows = shadows
        self.generation += 1

    def commit_step(self, lost_ranks: Iterable[int] = ()) -> list[int]:
        """The current step's update is applied on every member: consume its block.

        ``lost_ranks`` are ranks (of the layout the step ran under) whose
        gradient is *not* in the applied update -- a node that vanished after
        the others had agreed to go on without it.  Their slices are put back
        at the front of the queue, so they are trained once, later.  Returns
        the samples the committed update actually trained (for a
        :class:`Ledger`).
        """
        return self.commit_steps(1, lost_ranks)

    def commit_steps(self, steps: int, lost_ranks: Iterable[int] = ()) -> list[int]:
        """:meth:`commit_step` for a window of ``steps`` micro-batches (gradient
        accumulation) whose one update left out ``lost_ranks``: every block of
        the window is consumed under the current layout, and the lost ranks'
        slices of all of them go back to the front of the queue afterwards,
        in order (put back block by block, the next block would start with
        them).  Returns the samples the update trained."""
        lost = set(lost_ranks)
        for r in lost:
            if not 0 <= r < self.world_size:
                raise ValueError(f"lost rank {r} outside world of size {self.world_size}")
        handed_back: list[int] = []
        trained: list[int] = []
        for _ in range(steps):
            blk = self.block(0)
            if not blk:
                raise RuntimeError("commit_step with no step left in this epoch")
            # Consume the block: first from the returned samples, then the cursor.
            from_returned = min(len(self.returned), len(blk))
            self.returned = self.returned[from_returned:]
            self.start += len(blk) - from_returned
            self.steps_committed += 1
            if not lost:
                trained.extend(blk)
                continue
            slices = _share_slices(len(blk), self.world_size, self.shadows, self.weights, self.singles)
            for r, (lo, hi) in enumerate(slices):
                (handed_back if r in lost else trained).extend(blk[lo:hi])
        if handed_back:
            self.returned = handed_back + self.returned
            # Iterators assumed the whole block was consumed.
            self.generation += 1
        return trained

    def abort_step(self) -> None:
        """The current step failed (a peer died mid-step): consume nothing.

        Its samples stay at the front of the queue and are served again by the
        next step -- under whatever layout the following :meth:`reconfigure`
        sets up.
        """
        self.generation += 1

    # -- iteration -----------------------------------------------------------------
    def __iter__(self) -> Iterator[int]:
        """This rank's indices for the remaining steps of the layout, flattened."""
        for batch in self._iter_batches(pad_empty=False):
            yield from batch

    def __len__(self) -> int:
        """Number of indices :meth:`__iter__` yields on this rank."""
        cap, remaining = self.capacity, self.samples_remaining()
        full, tail = divmod(remaining, cap)
        lo, hi = _share_bounds(cap, self.world_size, self.shadows, self.rank, self.weights, self.singles)
        n = full * (hi - lo)
        if tail and not self.drop_last:
            lo, hi = _share_bounds(tail, self.world_size, self.shadows, self.rank, self.weights, self.singles)
            n += hi - lo
        return n

    def _iter_batches(self, pad_empty: bool) -> Iterator[list[int]]:
        # A generator: the plan is taken at the first next(), not at iter(),
        # like DistributedSampler -- with num_workers=0 the DataLoader only
        # pulls indices once training starts, after set_epoch.
        generation = self.generation
        # The layout as it stands now; plain commits move the live cursor
        # while this iterator is already prefetching steps ahead of them.
        plan = self._layout()
        for step in range(plan.steps_remaining):
            if self.generation != generation:
                raise StaleLayoutError(
                    f"sampler layout changed (generation {generation} -> {self.generation}) "
                    "while an iterator planned for the old one was still in use; call iter() again"
                )
            batch = plan.batch(step, plan.rank)
            if pad_empty and not batch:
                batch = plan.stand_in(step)
            yield batch

    # -- the permutation -----------------------------------------------------------
    def _epoch_order(self) -> torch.Tensor | range:
        if self._order_epoch != self.epoch:
            if self.shuffle:
                # Same recipe as DistributedSampler, so a user switching from
                # strategy="ddp" sees the same order when nothing changes.
                g = torch.Generator()
                g.manual_seed(self.seed + self.epoch)
                self._order = torch.randperm(self.num_samples, generator=g)
            else:
                self._order = range(self.num_samples)
            self._order_epoch = self.epoch
        return self._order

    # -- state -------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        """The shared state, as plain ints, bools and lists (msgpack-friendly).

        Enough for a joiner to continue bit-identically: it loads a member's
        state, then calls :meth:`reconfigure` with its own rank and the new
        world.  Rank and world size are left out on purpose: they belong to
        the view, not to the data, and a joiner's differ from the sender's.
        """
        return {
            "version": STATE_VERSION,
            "num_samples": self.num_samples,
            "batch_size": self.batch_size,
            "global_batch_size": self.global_batch_size,
            "shuffle": self.shuffle,
            "seed": self.seed,
            "drop_last": self.drop_last,
            "epoch": self.epoch,
            "start": self.start,
            "returned": list(self.returned),
            "steps_committed": self.steps_committed,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Adopt a member's state; keeps this object's rank and world until :meth:`reconfigure`."""
        if state.get("version") != STATE_VERSION:
            raise ValueError(f"unsupported sampler state version {state.get('version')!r}")
        if state["num_samples"] != self.num_samples:
            # A different dataset length means a different permutation: the
            # joiner would train the wrong samples, silently.
            raise ValueError(
                f"sampler state is for {state['num_samples']} samples, this dataset has {self.num_samples}"
            )
        returned = [int(i) for i in state["returned"]]
        start = int(state["start"])
        if not 0 <= start <= self.num_samples or any(not 0 <= i < self.num_samples for i in returned):
            raise ValueError("sampler state has a cursor or returned index outside the dataset")
        self.batch_size = state["batch_size"]
        self.global_batch_size = state["global_batch_size"]
        self.shuffle = bool(state["shuffle"])
        self.seed = int(state["seed"])
        self.drop_last = bool(state["drop_last"])
        self.epoch = int(state["epoch"])
        self.start = start
        self.returned = returned
        self.steps_committed = int(state["steps_committed"])
        self._order_epoch = None  # shuffle or seed may differ from ours
        self.generation += 1

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(N={self.num_samples}, epoch={self.epoch}, start={self.start}, "
            f"returned={len(self.returned)}, rank={self.rank}/{self.world_size}, capacity={self.capacity})"
        )


class ElasticBatchSampler(Sampler[list[int]]):
    """The batch form of :class:`ElasticSampler`: one list of indices per global step.

    This is the form the strategy puts in the DataLoader (``batch_sampler=``).
    A plain ``BatchSampler(ElasticSampler(...), batch_size)`` regroups the
    flat stream by a fixed size, so as soon as a short or uneven block gives
    this rank fewer than ``batch_size`` samples it would merge two steps'
    samples into one batch and lose step alignment with the other ranks.

    Every step yields a batch, even an empty one: all ranks of a view must run
    the same number of steps, because each step ends in a collective (the
    gradient all-reduce) that hangs until every rank joins it.  A rank with
    nothing to train still runs the step and contributes a zero-weight
    gradient (:meth:`ElasticSampler.loss_scale` returns 0).  The default
    ``collate_fn`` cannot collate ``[]``; either give the DataLoader one that
    can, or pass ``pad_empty=True``: an empty batch is then replaced by a
    stand-in, the first :data:`STAND_IN_SAMPLES` samples of the step's block
    (ones that another rank trains), which the strategy must weight 0 --
    still exactly once, since a zero-weight sample adds nothing to the
    update.

    Lightning calls ``set_epoch`` on ``batch_sampler.sampler``, which is the
    :class:`ElasticSampler`.
    """

    def __init__(self, sampler: ElasticSampler, *, pad_empty: bool = False) -> None:
        self.sampler = sampler
        self.pad_empty = pad_empty

    @property
    def batch_size(self) -> int:
        """The samples this rank gets in a full step under the current layout."""
        return self.sampler.per_rank_batch_size()

    @property
    def drop_last(self) -> bool:
        return self.sampler.drop_last

    def __iter__(self) -> Iterator[list[int]]:
        return self.sampler._iter_batches(pad_empty=self.pad_empty)

    def __len__(self) -> int:
        """Steps remaining under the current layout: the same on every rank."""
        return self.sampler.steps_remaining()

    def set_epoch(self, epoch: int) -> None:
        self.sampler.set_epoch(epoch)


class Ledger:
    """Which samples committed steps trained, per epoch: the exactly-once check.

    Tests (and the churn test) record what each :meth:`ElasticSampler.commit_step`
    returns, then ask whether an epoch was an exact cover of ``range(N)``.
    Memory is O(samples trained); not meant for production runs.
    """

    def __init__(self, num_samples: int) -> None:
        self.num_samples = num_samples
        self._counts: dict[int, Counter[int]] = {}

    def record(self, epoch: int, indices: Iterable[int]) -> None:
        self._counts.setdefault(epoch, Counter()).update(indices)

    def counts(self, epoch: int) -> Counter[int]:
        return self._counts.get(epoch, Counter())

    def epochs(self) -> list[int]:
        """The epochs with a recorded step, in order."""
        return sorted(self._counts)

    def forget(self, since_epoch: int) -> None:
        """Drop the records of ``since_epoch`` and later: a replica that fell
        behind (declared failed, sidelined) and took the members' state can
        no longer tell which of its own commits the others kept."""
        for e in [e for e in self._counts if e >= since_epoch]:
            del self._counts[e]

    def missing(self, epoch: int) -> list[int]:
        c = self.counts(epoch)
        return [i for i in range(self.num_samples) if c[i] == 0]

    def duplicates(self, epoch: int) -> dict[int, int]:
        return {i: n for i, n in self.counts(epoch).items() if n > 1}

    def strangers(self, epoch: int) -> list[int]:
        """Recorded indices outside ``range(N)``."""
        return sorted(i for i in self.counts(epoch) if not 0 <= i < self.num_samples)

    def is_exact_cover(self, epoch: int) -> bool:
        return not (self.missing(epoch) or self.duplicates(epoch) or self.strangers(epoch))

    def assert_exact_cover(self, epoch: int) -> None:
        missing, dups, strangers = self.missing(epoch), self.duplicates(epoch), self.strangers(epoch)
        if missing or dups or strangers:
            raise AssertionError(
                f"epoch {epoch} is not an exact cover of range({self.num_samples}): "
                f"missing {missing[:10]} ({len(missing)}), trained more than once "
                f"{dict(list(dups.items())[:10])} ({len(dups)}), outside {strangers[:10]}"
            )


def elastic_dataloader(
    dataloader: DataLoader, *, rank: int, world_size: int, global_batch_size: int | None
) -> DataLoader:
    """The user's training loader, drawing from an :class:`ElasticSampler`
    (the same dataset, collate function, workers and pinning).

    The per-rank batch is the loader's ``batch_size``, or, with
    ``global_batch_size``, that many samples a step split over the current
    world.  Shuffling follows the loader's sampler; the seed is the one
    ``seed_everything`` set, as Lightning's own samplers read it.

    An ``IterableDataset`` is refused: exactly-once needs to know every
    sample of the epoch by index, to hand a departed rank's unfinished share
    to the others; a stream has no index to resume from (docs/compatibility.md).
    """
    if isinstance(dataloader.dataset, IterableDataset):
        raise ValueError(
            "chaos: the training data is an IterableDataset; elastic exactly-once needs a map-style Dataset "
            "(__len__ and __getitem__): wrap the stream's items in one, or shard it into indexed files"
        )
    if dataloader.batch_size is None:
        raise ValueError("chaos: the training DataLoader needs a batch_size (the per-rank batch)")
    sequential = isinstance(dataloader.sampler, torch.utils.data.SequentialSampler)
    shuffle = bool(getattr(dataloader.sampler, "shuffle", not sequential))
    seed = int(os.environ.get("PL_GLOBAL_SEED", 0))
    sizes = {"global_batch_size": global_batch_size} if global_batch_size else {"batch_size": dataloader.batch_size}
    sampler = ElasticSampler(dataloader.dataset, rank=rank, world_size=world_size, shuffle=shuffle, seed=seed, **sizes)
    return DataLoader(
        dataloader.dataset, batch_sampler=ElasticBatchSampler(sampler, pad_empty=True),
        num_workers=dataloader.num_workers, collate_fn=dataloader.collate_fn, pin_memory=dataloader.pin_memory,
    )
