"""Preparing this machine before anything is timed: memory faulted in once.

Why: this machine is a virtual machine whose guest memory the host backs
lazily.  A page the guest has never touched costs a host fault on first use;
a page it touched before and freed is cheap again.  Measured 2026-12-06:
touching 6 GiB took 11.1 s the first time and 4.1 s the second (a Python loop,
so the fault costs differ by more than that).  In a benchmark this lands on
whatever first needs more memory than the machine ever held: at a join at
203 MB, every process's first step after the state transfer took 0.4-0.6 s
longer (Adam's temporaries in fresh pages, in members and joiner alike),
half of the survivors' idle; after one pass over 6 GiB the same join's first
step was normal (max idle 1.2-1.3 s -> 0.63 s).  Whichever system ran first
paid it.  So ``benchmarks/run.py`` faults memory in once, before the first
system, for all of them alike (docs/benchmarks.md).
"""

from __future__ import annotations

import time

import psutil
import torch

__all__ = ["prefault"]


def prefault(gib: float, *, most_of_available: float = 0.5) -> dict[str, float]:
    """Touch ``gib`` GiB (at most ``most_of_available`` of the memory
    available now) once and free it; how much and how long it took."""
    want = int(min(gib * 2**30, most_of_available * psutil.virtual_memory().available))
    t0 = time.monotonic()
    chunk = 1 << 30
    held = []
    left = want
    while left > 0:  # 1 GiB at a time: every page written, then all freed together
        n = min(chunk, left)
        held.append(torch.ones(n, dtype=torch.uint8))
        left -= n
    del held
    return {"gib": want / 2**30, "seconds": time.monotonic() - t0}
