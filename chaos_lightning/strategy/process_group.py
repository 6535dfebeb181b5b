"""The default process group across membership epochs, and collectives that can be abandoned.

Role in the whole: the strategy layer trains with ``torch.distributed``'s
*default* group (Lightning and DDP always use WORLD), but membership changes
under it.  :class:`ElasticProcessGroup` owns that default group:

* :meth:`ElasticProcessGroup.switch` replaces it in place, in the same
  process, with the group of the next agreed view (survivors never restart);
* :meth:`ElasticProcessGroup.all_reduce` and
  :meth:`ElasticProcessGroup.all_reduce_bucket` run a collective that ends as
  soon as the control plane asks (a ``threading.Event`` or a callable set by
  the membership layer's ``MemberFailed``), without waiting for gloo's
  timeout.  This is the design's "bounded waits" rule for collectives.

Stores: ``switch`` takes the store as given.  It must carry a prefix that is
fresh for the epoch, because ``destroy_process_group`` (and our detach) reset
c10d's group counter, so every epoch's default group is named "0" and gloo's
store keys repeat.  :func:`chaos_lightning.rendezvous.store.epoch_store`
(``chaos/epoch/<e>/`` on the rank-0 member's store) is that store.

Why polling: on gloo nothing ends a pending collective early: ``abort()`` and
``shutdown()`` return but the op stays pending until the PG timeout (measured
on torch 2.13, see :mod:`._gloo_detach`).  So the collective is launched with
``async_op=True`` and this thread waits on the work in 1 ms slices
(``WAIT_SLICE``), checking the abort flag between slices.  On abort (or our
own deadline) the op is left behind: its group is detached
(:func:`._gloo_detach.detach_world`) at the next ``switch`` and the op later
ends, unread, on gloo's timeout or on a connection reset.  Because such a leaked op
may still write into its tensor (a hung peer that wakes up completes it), the
collective always works on a private buffer and copies the result into the
caller's tensors only on success.

Timings measured on torch 2.13.0+cpu, gloo, loopback, 2 cores (2-3
processes), as ``tests/test_process_group.py`` prints them: ``switch`` 1-3 ms
(detach 0.1 ms + init; a joiner's first init up to 20 ms); abort flag -> first
successful all_reduce in the new group 4-8 ms; a SIGKILLed peer is reported
as :class:`CollectiveFailed` 14-16 ms after the kill.

Devices: nothing here is CPU-specific; tensors keep their device and the
buffers are made on it.  Only the gloo backend is accepted for now.  With
NCCL, a stuck collective *can* be ended by torch's own
``torch.distributed.distributed_c10d._abort_process_group()`` (documented
for NCCL only; measured 1.0 s
on an H200 with torch 2.11, after which re-init works), so the NCCL path of
``switch`` should abort instead of detaching, and must be measured on two
GPUs (two ranks on one GPU fail with ``ncclInvalidUsage``) before it is
enabled.

Threading: one thread (the training loop) calls ``switch`` and the
collectives; the abort flag may be set from any thread.
"""

from __future__ import annotations

import sys
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

from chaos_lightning.strategy import _gloo_detach

#: ``abort`` arguments: an Event set by the control plane, or a callable that
#: returns True once the collective must be abandoned.
AbortFlag = threading.Event | Callable[[], bool] | None

#: Default PG timeout (s).  It bounds only what the abort flag cannot: the
#: gloo rendezvous inside ``init_process_group`` (measured: a missing rank
#: raises ``DistStoreError`` at the PG timeout, the store timeout does not
#: apply) and a collective no one aborts.  torch's default is 30 min.
DEFAULT_TIMEOUT_S = 60.0

# Waiting: ``work.wait(timeout)`` in slices of WAIT_SLICE, checking the abort
# flag between slices.  On gloo a slice that expires raises "Operation timed
# out!" and leaves the op running (measured: result still correct).  The
# slice must be >= 1 ms: gloo converts it to whole milliseconds and 0 ms means
# "no timeout", so timedelta(microseconds=500) blocks until the op ends.
# Measured, 2 ranks on loopback, median per all_reduce (blocking = plain
# dist.all_reduce): 4 KB 0.36 vs 0.32 ms, 1 MB 0.73-0.80 vs 0.75 ms.  The
# alternative of polling is_completed() with 0.5 ms sleeps (after 0.2 ms of
# sched-yield spinning) cost 0.83-0.86 ms and 1.5-2.0 ms: the sleep granularity
# lands on every op.  A slice bounds the abort reaction to ~1 ms, small
# against what raises the flag (a peer reset is seen in 11-33 ms, MemberFailed
# later still).  NCCL's Work.wait(timeout) means something else (it syncs the
# stream, and a timeout there aborts the communicator): revisit for NCCL.
WAIT_SLICE = timedelta(milliseconds=1)


class CollectiveError(RuntimeError):
    """A collective did not complete; the group it ran on is now unusable.

    Call :meth:`ElasticProcessGroup.switch` with the next view before the
    next collective.
    """


class CollectiveAborted(CollectiveError):
    """The control plane asked to abandon the collective (a member failed)."""


class CollectiveTimeout(CollectiveError):
    """The collective did not complete within its ``timeout``."""


class CollectiveFailed(CollectiveError):
    """The backend reported an error (e.g. gloo: "Connection reset by peer")."""


@dataclass(frozen=True)
class SwitchTiming:
    """Where the time of one :meth:`ElasticProcessGroup.switch` went (seconds)."""

    teardown_s: float  # detaching the previous group
    init_s: float  # init_process_group (gloo's full-mesh rendezvous)
    abandoned: bool  # the previous group was broken (an op abandoned or failed on it)

    @property
    def total_s(self) -> float:
        return self.teardown_s + self.init_s


def _abort_fn(abort: AbortFlag) -> Callable[[], bool]:
    if abort is None:
        return lambda: False
    if isinstance(abort, threading.Event):
        return abort.is_set
    if callable(abort):
        return abort
    raise TypeError(f"abort must be a threading.Event, a callable or None, not {type(abort).__name__}")


def _seconds(timeout: float | timedelta) -> float:
    return timeout.total_seconds() if isinstance(timeout, timedelta) else float(timeout)


class Presence:
    """When the training thread was last inside the strategy's own code (a
    collective, a group switch, a wait for a view), and whether it is in it
    now.  Written by the training thread only; read by the group's watchdog
    (:meth:`chaos_lightning.strategy.group.ElasticGroup.watch`), which tells a
    training thread blocked in user code (a deadlock, a stuck I/O call) from
    one waiting on its peers: only the first is *away*."""

    def __init__(self) -> None:
        self._depth = 0
        self._since = time.monotonic()

    @contextmanager
    def inside(self) -> Iterator[None]:
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            self._since = time.monotonic()

    def away_for(self, now: float | None = None) -> float:
        """Seconds since the training thread last left the strategy's code (0 while in it)."""
        if self._depth:
            return 0.0
        return max(0.0, (time.monotonic() if now is None else now) - self._since)


class ElasticProcessGroup:
    """Owns ``torch.distributed``'s default group across membership epochs.

    ``switch`` installs the group of a view; the collectives can be abandoned
    by an abort flag.  After a :class:`CollectiveError` the group is *broken*:
    every collective raises :class:`CollectiveFailed` at once until ``switch``
    (which detaches the broken group: a pending op is left to time out).
    """

    def __init__(self, backend: str = "gloo") -> None:
        if backend != "gloo":
            # See the module docstring: NCCL would use the public abort
            # (_abort_process_group) instead of the detach; not measured yet.
            raise NotImplementedError(f"ElasticProcessGroup supports gloo only for now, not {backend!r}")
        self.backend = backend
        self._group: Any = None
        self._timeout_s = DEFAULT_TIMEOUT_S
        self._broken: str | None = None  # why the group is unusable
        self._pending: list[Any] = []  # works left behind by an abandoned collective
        self._pending_buffers: list[torch.Tensor] = []
        self.last_switch: SwitchTiming | None = None
        #: the training thread inside this group's calls (see :class:`Presence`)
        self.presence = Presence()
        #: ``sys.excepthook`` before our first group: every
        #: ``init_process_group`` wraps the hook it finds with a ``[rankN]:``
        #: prefix, so each switch starts again from this one (else a node whose
        #: rank changed many times printed ``[rank2]: [rank2]: [rank4]: ...``)
        self._excepthook: Any = None

    # -- state --------------------------------------------------------------
    @property
    def group(self) -> Any:
        """The current default group (None before the first switch or after close)."""
        return self._group

    @property
    def rank(self) -> int:
        return self._group.rank() if self._group is not None else -1

    @property
    def world_size(self) -> int:
        return self._group.size() if self._group is not None else 0

    @property
    def broken(self) -> str | None:
        """Why the current group is unusable, or None if it is healthy."""
        return self._broken

    @property
    def timeout_s(self) -> float:
        """The PG timeout of the current group (default for collectives)."""
        return self._timeout_s

    # -- switching ----------------------------------------------------------
    def switch(
        self, rank: int, world_size: int, store: dist.Store, timeout: float | timedelta = DEFAULT_TIMEOUT_S,
        prebuilt: Any = None,
    ) -> SwitchTiming:
        """Replace the default group with a new one of ``world_size`` ranks.

        ``store`` must be fresh for this epoch (use ``epoch_store(view, secret=...)``:
        every epoch's group is named "0", so its store keys repeat).  The
        previous group is detached (:func:`._gloo_detach.detach_world`), healthy
        or not, and dropped later on a helper thread: destroying a healthy group
        here cost 10-19 ms (its destructor) against 0.1 ms for the detach, and
        a broken one may have an op pending, whose destructor would block until
        the PG timeout.  ``timeout`` becomes the PG timeout: it
        bounds the rendezvous of all ``world_size`` ranks here and every
        collective of the group.  On error (a member missing: ``DistStoreError``
        after ``timeout``) no group is installed; call again with the next view.

        ``prebuilt``: the group's gloo backend, built ahead on ``store`` by
        :meth:`build_ahead` (its mesh connected while this thread trained);
        the switch then only registers it (no rendezvous here).
        """
        with self.presence.inside():
            return self._switch(rank, world_size, store, _seconds(timeout), prebuilt)

    @staticmethod
    def build_ahead(rank: int, world_size: int, store: dist.Store, timeout: float | timedelta = DEFAULT_TIMEOUT_S) -> Any:
        """The gloo backend of a group that :meth:`switch` will install later
        (``prebuilt``), built now on the calling thread, any thread: gloo's
        full-mesh rendezvous on ``store`` (the same keys ``switch`` would use,
        so ranks that build ahead and ranks that do not meet), with the GIL
        released.  Raises as ``init_process_group`` would (a rank missing:
        ``DistStoreError`` after ``timeout``)."""
        return _gloo_detach.build_gloo(store, rank, world_size, _seconds(timeout))

    @staticmethod
    def discard(prebuilt: Any) -> None:
        """Drop a backend built ahead that no switch took, off the calling
        thread (a healthy gloo group's destructor takes 3-19 ms)."""
        _gloo_detach.GRAVEYARD.add(_gloo_detach.DetachedGroups(groups=[prebuilt]))
        _gloo_detach.GRAVEYARD.reap_soon()

    def _switch(self, rank: int, world_size: int, store: dist.Store, timeout_s: float, prebuilt: Any = None) -> SwitchTiming:
        t0 = time.perf_counter()
        abandoned = self._broken is not None
        self._teardown(detach=True)
        t1 = time.perf_counter()
        if self._excepthook is None:
            self._excepthook = sys.excepthook
        sys.excepthook = self._excepthook  # torch wraps it once, with this group's rank
        try:
            with _gloo_detach.installing(prebuilt, rank, world_size) if prebuilt is not None else nullcontext():
                dist.init_process_group(
                    self.backend,
                    store=store,
                    rank=rank,
                    world_size=world_size,
                    timeout=timedelta(seconds=timeout_s),
                )
        except BaseException:
            # A failed init has already taken the next group name from c10d's
            # counter ("1" after "0"), and the group name prefixes every gloo
            # store key: clear what it registered and the counter, or this
            # rank's next group waits on ``.../1/...`` keys while the others
            # write ``.../0/...`` (measured by the soak: a node rejoining
            # after a partition and the members never met, 30 s per try).
            _gloo_detach.detach_world()
            raise
        self._group = dist.group.WORLD
        self._timeout_s = timeout_s
        self._broken = None
        t2 = time.perf_counter()
        # Groups detached now or earlier whose ops have ended are dropped off
        # this thread (3-19 ms each, measured), not before the first step.
        _gloo_detach.GRAVEYARD.reap_soon()
        self.last_switch = SwitchTiming(t1 - t0, t2 - t1, abandoned)
        return self.last_switch

    def _teardown(self, detach: bool) -> None:
        """Remove the current default group: detach it, or destroy it if healthy and ``not detach``."""
        if self._group is None and not dist.is_initialized():
            return
        try:
            if detach or self._broken is not None or any(not w.is_completed() for w in self._pending):
                _gloo_detach.detach_world(works=self._pending, buffers=self._pending_buffers)
            else:
                dist.destroy_process_group()
        finally:
            self._group = None
            self._pending = []
            self._pending_buffers = []

    def close(self, timeout: float = 5.0) -> int:
        """Remove the group and wait up to ``timeout`` s for leaked ops to end.

        Returns how many detached ops are still pending.  If not 0, process
        exit will block until their PG timeout (measured: exit waited the full
        4 s timeout), so a caller in a hurry may ``os._exit``.  Always
        destroys a healthy group: exiting with a live gloo group aborted the
        process (SIGABRT) in 2 of 24 measured exits.
        """
        # Not on a latency path: a healthy group gets the public, complete
        # teardown; a broken one is detached (its op may be pending).
        self._teardown(detach=False)
        self._broken = None
        return _gloo_detach.GRAVEYARD.wait(timeout)

    # -- collectives --------------------------------------------------------
    def all_reduce(
        self,
        tensor: torch.Tensor,
        abort: AbortFlag = None,
        timeout: float | timedelta | None = None,
        op: Any = dist.ReduceOp.SUM,
        in_place: bool = False,
    ) -> torch.Tensor:
        """All-reduce ``tensor`` in place (and return it), abandonable.

        Raises :class:`CollectiveAborted` as soon as ``abort`` is set (within
        ~1 ms), :class:`CollectiveTimeout` after ``timeout`` s (default: the
        PG timeout), :class:`CollectiveFailed` on a backend error.  On any of
        them ``tensor`` is unchanged -- unless ``in_place``: then the op works
        on ``tensor`` itself (no copy), and after an error the caller must
        never read it again, since an abandoned op may still write into it.
        gloo has no ``ReduceOp.AVG``: sum and divide.
        """
        buf = tensor if in_place else tensor.detach().clone()
        self._run([buf], abort, timeout, op, what=f"all_reduce({tuple(tensor.shape)})")
        if not in_place:
            with torch.no_grad():
                tensor.copy_(buf)
        return tensor

    def all_reduce_in_place(
        self,
        buffers: Sequence[torch.Tensor],
        abort: AbortFlag = None,
        timeout: float | timedelta | None = None,
        op: Any = dist.ReduceOp.SUM,
    ) -> None:
        """All-reduce several buffers in place, launched together (every op in
        flight before the first wait, so they cost one round trip, not one
        each): the step's gradients in their own dtype beside the integer
        control record.  Errors as :meth:`all_reduce` with ``in_place``: after
        one, the caller must never read any of the buffers again."""
        self._run(list(buffers), abort, timeout, op, what=f"all_reduce_in_place({len(buffers)} buffers)")

    def all_reduce_bucket(
        self,
        tensors: Sequence[torch.Tensor],
        abort: AbortFlag = None,
        timeout: float | timedelta | None = None,
        op: Any = dist.ReduceOp.SUM,
    ) -> list[torch.Tensor]:
        """All-reduce many tensors with one collective per (device, dtype).

        The tensors are flattened into one contiguous buffer per (device,
        dtype) (one gloo op instead of one per tensor: gradient sync), all
        buffers are reduced concurrently, and the results are copied back in
        place only if every one succeeded.  Errors as :meth:`all_reduce`.
        """
        tensors = list(tensors)
        if not tensors:
            return tensors
        buckets: dict[tuple[torch.device, torch.dtype], list[torch.Tensor]] = {}
        for t in tensors:
            buckets.setdefault((t.device, t.dtype), []).append(t)
        # torch.cat copies: the flat buffers are ours, so a leaked op cannot
        # write into the caller's tensors later.
        flats = [torch.cat([t.detach().reshape(-1) for t in ts]) for ts in buckets.values()]
        self._run(flats, abort, timeout, op, what=f"all_reduce_bucket({len(tensors)} tensors)")
        with torch.no_grad():
            for ts, flat in zip(buckets.values(), flats):
                offset = 0
                for t in ts:
                    n = t.numel()
                    t.copy_(flat[offset : offset + n].view_as(t))
                    offset += n
        return tensors

    def _run(self, buffers: list[torch.Tensor], abort: AbortFlag, timeout: float | timedelta | None, op: Any, what: str) -> None:
        with self.presence.inside():
            self._launch_and_wait(buffers, abort, timeout, op, what)

    def _launch_and_wait(self, buffers: list[torch.Tensor], abort: AbortFlag, timeout: float | timedelta | None,
                         op: Any, what: str) -> None:
        if self._group is None:
            raise CollectiveFailed(f"{what}: no process group; call switch() first")
        if self._broken is not None:
            raise CollectiveFailed(f"{what}: the group is unusable ({self._broken}); switch() to the next view first")
        aborted = _abort_fn(abort)
        timeout_s = self._timeout_s if timeout is None else _seconds(timeout)
        if aborted():
            # Not launched here, but peers may have launched theirs: the group
            # is out of step, so it is broken all the same.
            self._broken = "aborted before launch"
            raise CollectiveAborted(f"{what}: abort requested before launch")
        works: list[Any] = []
        try:
            for buf in buffers:
                works.append(dist.all_reduce(buf, op=op, group=self._group, async_op=True))
        except RuntimeError as e:
            self._leave_behind(works, buffers, f"launch failed: {e}")
            raise CollectiveFailed(f"{what}: launch failed: {e}") from e
        start = time.perf_counter()
        deadline = start + timeout_s
        for w in works:
            while True:
                try:
                    w.wait(WAIT_SLICE)
                    break
                except RuntimeError:
                    if w.is_completed():
                        # Either the op failed, or it completed just as the
                        # slice expired: a wait without timeout returns at
                        # once and tells which.
                        try:
                            w.wait()
                            break
                        except RuntimeError as err:
                            self._leave_behind(works, buffers, f"backend error: {err}")
                            raise CollectiveFailed(f"{what}: {err}") from err
                    # Otherwise the slice expired and the op is still running.
                # Completion is checked first: an op that finished is never
                # reported aborted.
                if aborted():
                    self._leave_behind(works, buffers, "aborted")
                    raise CollectiveAborted(f"{what}: aborted after {1e3 * (time.perf_counter() - start):.1f} ms")
                if time.perf_counter() >= deadline:
                    self._leave_behind(works, buffers, f"timed out after {timeout_s:g} s")
                    raise CollectiveTimeout(f"{what}: not completed within {timeout_s:g} s")

    def _leave_behind(self, works: list[Any], buffers: list[torch.Tensor], why: str) -> None:
        """Mark the group broken; keep its in-flight works for the detach."""
        self._broken = why
        self._pending.extend(w for w in works if not w.is_completed())
        self._pending_buffers.extend(buffers)
