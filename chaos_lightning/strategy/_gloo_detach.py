"""Detaching a stuck default process group: the one place that touches c10d internals.

Role in the whole: when a peer hangs (or dies while a survivor waits on
another survivor) a gloo collective on the survivors can only end at the
process-group timeout.  ``ElasticProcessGroup`` (:mod:`.process_group`)
abandons such a collective as soon as the control plane says so, and then has
to install the next view's default group *now*, while the old op is still
pending.  This module makes that possible and is the only module of
chaos_lightning that uses private ``torch.distributed`` API.

What is done, and why (measured on torch 2.13.0+cpu, gloo, loopback, 2 cores,
3 processes with one SIGSTOPped or SIGKILLed; what the code relies on is
pinned by ``tests/test_process_group.py``):

* ``pg.abort()`` and ``pg.shutdown()`` return in 0.01 ms but do **not** end a
  pending gloo op: ``work.is_completed()`` stays False until the PG timeout.
* What blocks is dropping the **last reference** to a gloo group with a
  pending op: its destructor waits for the op (4.85 s of a 5 s timeout).
  ``destroy_process_group()`` itself returned in 0.07 ms while we still held a
  reference to the group, and blocked 4.72 s of 5 s when it dropped the last one.
* So a detach is: keep references to every registered group (and the pending
  works and the buffers they write into) in :data:`GRAVEYARD`, then forget
  them in c10d's world (``_update_default_pg(None)``, clear the ``_world``
  maps, ``_unregister_all_process_groups()``, ``group_count = 0``) exactly as
  ``destroy_process_group`` does, but without calling ``shutdown()`` on the
  backends, whose semantics (waiting for pending work, hooks) are free to
  change between versions.  Measured: detach 0.04-0.05 ms; the next
  ``init_process_group`` 1-3 ms; abort signal -> next successful all_reduce
  3.7-6.4 ms.  The abandoned op later fails with gloo's own timeout error,
  which nobody reads; that is harmless.
* A detached group is dropped (:meth:`Graveyard.reap`) only once all its works
  completed; dropping one then costs 3-19 ms (gloo's destructor; a healthy
  group's too: ``destroy_process_group`` of a healthy 2-3 rank group took
  10-19 ms, all of it the destructor).  That is why ``switch`` detaches even
  healthy groups and :meth:`Graveyard.reap_soon` drops them on a helper
  thread: the destructor does not hold the GIL throughout (measured: the main
  thread never paused more than 1.1 ms while a helper thread dropped a group
  for 10-18 ms), whereas reaping on the switching thread delayed the first
  all_reduce of the new group by 11-19 ms (measured in the SIGKILL test).
* Leaving the process with a detached op still pending blocks interpreter
  exit until that op's PG timeout (4.28 s with a 4 s timeout; exit code 0).
* Unrelated but found on the way: exiting with a *live* default gloo group
  (no ``destroy_process_group``) aborted the process with "terminate called
  without an active exception" (SIGABRT) in 2 of 24 exits; with a destroy
  first, 0 of 24.  ``ElasticProcessGroup.close`` therefore destroys a healthy
  group (and detaches a broken one).

Groups built ahead (:func:`build_gloo`, :func:`installing`): a survivor
builds the gloo backend of the next view's group on a helper thread while it
still trains (``ProcessGroupGloo`` is public and its constructor releases the
GIL), and the switch installs it as the default group.  What torch 2.13
allows: ``init_process_group`` takes no prebuilt backend, and a gloo group
cannot be shrunk in place: ``shrink_group`` (new in 2.13) needs a backend
whose ``supports_shrinking`` is True, and gloo's is False (NCCL only);
``split_group`` is documented for NCCL and custom backends, and gloo's
split (``supports_splitting``) builds a new mesh through the store anyway,
which is the cost building ahead moves off the training thread; a subgroup
of the old WORLD would keep that group, whose ranks may be dead, as its
parent.  So ``init_process_group`` runs as usual, and only the
name through which c10d builds gloo backends (``ProcessGroupGloo`` in
``distributed_c10d``) is swapped, for that call, for one that hands over the
backend built ahead; its keys (``0/`` then ``cpu/`` under the epoch's store)
are those c10d would use, so ranks that build ahead and ranks that build at
the switch meet (pinned by ``tests/test_process_group.py``).

Version guard: the sequence mirrors ``destroy_process_group`` of torch 2.13
(``distributed_c10d.py:2398-2427``) minus the ``shutdown()`` loop
(``:2403-2407``).  On a version not in :data:`TESTED_TORCH` we check that every attribute used still exists and
raise :class:`DetachUnsupported` naming what is missing; if all exist we warn
once and go on, and ``tests/test_process_group.py::test_gloo_detach_pinned``
is what tells whether it still works.
"""

from __future__ import annotations

import threading
import time
import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist

#: (major, minor) versions on which the detach was measured to work.
TESTED_TORCH: tuple[tuple[int, int], ...] = ((2, 13),)

# The per-group maps of ``c10d._world`` that ``destroy_process_group(WORLD)``
# clears (torch 2.13, distributed_c10d.py:2410-2416).
_WORLD_MAPS = (
    "pg_map",
    "pg_names",
    "pg_group_ranks",
    "pg_backend_config",
    "pg_to_tag",
    "tags_to_pg",
    "pg_coalesce_state",
)
_C10D_FUNCS = ("_update_default_pg", "_unregister_all_process_groups")


class DetachUnsupported(RuntimeError):
    """This torch lacks the internals the detach relies on; upgrade the detach."""


def torch_version() -> tuple[int, int]:
    """``(major, minor)`` of the installed torch (``"2.13.0+cpu"`` -> ``(2, 13)``)."""
    major, minor = torch.__version__.split("+")[0].split(".")[:2]
    return int(major), int("".join(ch for ch in minor if ch.isdigit()) or 0)


def missing_internals() -> list[str]:
    """The private names the detach uses that this torch does not have."""
    import torch.distributed.distributed_c10d as c10d

    missing = [f"distributed_c10d.{name}" for name in ("_world", *_C10D_FUNCS) if not hasattr(c10d, name)]
    world = getattr(c10d, "_world", None)
    if world is not None:
        missing += [f"_world.{name}" for name in (*_WORLD_MAPS, "group_count", "comms") if not hasattr(world, name)]
    return missing


_checked = False
_check_lock = threading.Lock()


def check_supported() -> None:
    """Raise :class:`DetachUnsupported` if the detach cannot work on this torch.

    Cheap after the first call.  Warns once on an untested but plausible version.
    """
    global _checked
    if _checked:
        return
    with _check_lock:
        if _checked:
            return
        if not dist.is_available():
            raise DetachUnsupported("torch.distributed is not available in this torch build")
        missing = missing_internals()
        if missing:
            raise DetachUnsupported(
                f"torch {torch.__version__}: cannot detach a stuck process group, "
                f"missing {', '.join(missing)} (the detach was written for torch "
                f"{', '.join(f'{a}.{b}' for a, b in TESTED_TORCH)}; port "
                "chaos_lightning/strategy/_gloo_detach.py)"
            )
        if torch_version() not in TESTED_TORCH:
            warnings.warn(
                f"chaos_lightning: the gloo detach is untested on torch {torch.__version__} "
                "(its private attributes exist; run tests/test_process_group.py)",
                RuntimeWarning,
                stacklevel=3,
            )
        _checked = True


@dataclass
class DetachedGroups:
    """What one detach left behind: kept alive until its works completed."""

    groups: list[Any]
    works: list[Any] = field(default_factory=list)
    # The tensors the pending works still write into (gloo keeps them too; we
    # hold them so the memory is ours to reason about, never the caller's).
    buffers: list[torch.Tensor] = field(default_factory=list)
    detached_at: float = field(default_factory=time.monotonic)

    def done(self) -> bool:
        return all(w.is_completed() for w in self.works)


class Graveyard:
    """Detached groups kept alive so their destructors never block a caller.

    Process-wide (one instance, :data:`GRAVEYARD`), like c10d's world itself.
    Thread-safe.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._entries: list[DetachedGroups] = []
        self._reaper: threading.Thread | None = None

    def add(self, entry: DetachedGroups) -> None:
        with self._lock:
            self._entries.append(entry)

    def pending(self) -> int:
        """How many detached entries still have an op in flight."""
        with self._lock:
            return sum(not e.done() for e in self._entries)

    def __len__(self) -> int:
        with self._lock:
            return len(self._entries)

    def reap(self) -> int:
        """Drop the entries whose works all completed; returns how many.

        Costs 3-19 ms per dropped group (gloo's destructor), on the calling
        thread; :meth:`reap_soon` pays it on a helper thread.  Works and buffers are
        released before the groups they belong to.
        """
        with self._lock:
            done = [e for e in self._entries if e.done()]
            self._entries = [e for e in self._entries if not e.done()]
        for entry in done:
            entry.works.clear()
            entry.buffers.clear()
            entry.groups.clear()
        return len(done)

    def reap_soon(self) -> None:
        """Reap on a helper thread (if one is not already running).

        The thread is not a daemon: interpreter exit waits for the drop in
        progress (tens of ms; only completed groups are dropped) instead of
        finalizing under it.
        """
        with self._lock:
            if self._reaper is not None and self._reaper.is_alive():
                return
            self._reaper = threading.Thread(target=self.reap, name="chaos-pg-reaper", daemon=False)
            self._reaper.start()

    def wait(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for pending works, reap; returns the number still pending."""
        deadline = time.monotonic() + timeout
        while self.pending() and time.monotonic() < deadline:
            time.sleep(0.01)
        reaper = self._reaper
        if reaper is not None:
            reaper.join(max(0.0, deadline - time.monotonic()) + 1.0)
        self.reap()
        return self.pending()


#: The process-wide graveyard (c10d's world is process-wide too).
GRAVEYARD = Graveyard()


def detach_world(
    works: list[Any] | tuple[Any, ...] = (), buffers: list[torch.Tensor] | tuple[torch.Tensor, ...] = ()
) -> DetachedGroups:
    """Forget every process group (default and sub-groups) without destroying any.

    Afterwards ``dist.is_initialized()`` is False and ``init_process_group``
    may be called again (its group is again named "0", so its store must carry
    a fresh prefix).  The old groups, ``works`` still pending on them and the
    ``buffers`` those works write into go to :data:`GRAVEYARD`.  Never blocks.
    """
    import torch.distributed.distributed_c10d as c10d

    check_supported()
    world = c10d._world
    if world.comms:
        # torchcomms communicators are finalized by destroy_process_group; we
        # have no measurement of leaving one unfinalized.
        raise DetachUnsupported("cannot detach torchcomms communicators (use_torchcomms); not measured")
    groups = list(world.pg_map)
    default = world.default_pg
    if default is not None and default not in groups:
        groups.append(default)
    entry = DetachedGroups(groups=groups, works=list(works), buffers=list(buffers))
    # First keep the references, then clear c10d's maps: those maps hold what
    # may be the last references, and dropping that would block (see above).
    GRAVEYARD.add(entry)
    c10d._update_default_pg(None)
    for name in _WORLD_MAPS:
        getattr(world, name).clear()
    c10d._unregister_all_process_groups()
    world.group_count = 0
    return entry


# ---------------------------------------------------------------- groups built ahead
#: the default group's name after a detach (c10d names groups by its counter,
#: which the detach resets): gloo's keys of the next default group live under
#: the prefixes ``0/`` then ``cpu/`` (torch 2.13, ``_new_process_group_helper``: the group
#: name, then the device), and a backend built ahead must use the same keys,
#: so that a rank that builds ahead and one that calls ``init_process_group``
#: meet (``tests/test_process_group.py`` pins it)
_NEXT_DEFAULT_GROUP = "0"
_GLOO_DEVICE = "cpu"


def build_gloo(store: dist.Store, rank: int, world_size: int, timeout_s: float) -> Any:
    """A gloo backend of ``world_size`` ranks on ``store``, built now (its full
    mesh connected) on the calling thread, to be installed later as the
    default group's by :func:`installing`.

    Public API (``ProcessGroupGloo`` is documented and its constructor
    releases the GIL: measured, a training thread beside a 145 ms build never
    paused over 3.2 ms); only the key prefix mirrors c10d's internals."""
    from torch._C._distributed_c10d import ProcessGroupGloo

    # nested as c10d nests them (a PrefixStore joins its prefix with "/")
    keys = dist.PrefixStore(f"{_GLOO_DEVICE}/", dist.PrefixStore(f"{_NEXT_DEFAULT_GROUP}/", store))
    return ProcessGroupGloo(keys, rank, world_size, timedelta(seconds=timeout_s))


@contextmanager
def installing(backend: Any, rank: int, world_size: int) -> Iterator[None]:
    """While in the block, ``init_process_group`` (gloo, ``rank`` of
    ``world_size``) takes ``backend`` (from :func:`build_gloo`) as its gloo
    backend instead of building one: the rest of c10d's registration (the
    ``ProcessGroup`` wrapper, the world maps, the group name) is torch's own.

    How: c10d builds gloo backends through its module-level name
    ``ProcessGroupGloo`` (torch 2.13, ``_new_process_group_helper``); the
    block swaps that name for a constructor that hands over ``backend`` once,
    and only for the same rank and size.  Call only after a detach (the new
    group must be named ``"0"``, as :func:`build_gloo`'s keys assume) and
    from the one thread that switches groups."""
    import torch.distributed.distributed_c10d as c10d

    check_supported()
    if c10d._world.group_count != 0 or dist.is_initialized():
        raise DetachUnsupported("a group built ahead is installed only right after a detach")
    original = c10d.ProcessGroupGloo
    handed: list[Any] = [backend]

    class _Takes(type):
        # c10d also asks isinstance(backend, ProcessGroupGloo) of what it built
        def __instancecheck__(cls, obj: Any) -> bool:
            return isinstance(obj, original)

        def __call__(cls, store: Any, group_rank: int, group_size: int, *args: Any, **kwargs: Any) -> Any:
            if not handed or (group_rank, group_size) != (rank, world_size):
                return original(store, group_rank, group_size, *args, **kwargs)
            return handed.pop()

        def __getattr__(cls, name: str) -> Any:
            return getattr(original, name)

    class ProcessGroupGloo(metaclass=_Takes):
        pass

    c10d.ProcessGroupGloo = ProcessGroupGloo
    try:
        yield
    finally:
        c10d.ProcessGroupGloo = original
    if handed:
        raise DetachUnsupported("init_process_group did not take the gloo backend built ahead "
                                "(c10d no longer builds gloo through ProcessGroupGloo; port _gloo_detach.installing)")
