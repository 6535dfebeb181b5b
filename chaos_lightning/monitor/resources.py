"""Node resources: what this machine has and how busy it is, as plain facts.

The cluster monitor (:mod:`chaos_lightning.monitor.monitor`) publishes these in
its snapshot, so that operators (``status`` requests) and, later, the shard
scheduler can see that a node is CPU-saturated or short of memory before
asking it to serve shards to a joiner.  This module only *reads* the machine:
it never starts threads, never blocks, and never initialises a GPU.
"""

from __future__ import annotations

import os
import sys
from dataclasses import asdict, dataclass

import psutil


@dataclass(frozen=True)
class GpuResources:
    """One CUDA device as this process sees it.

    ``mem_used`` is what *this process's* caching allocator holds
    (``torch.cuda.memory_reserved``): asking the driver for device-wide usage
    (``mem_get_info``) would create a CUDA context on every device it is asked
    about, costing hundreds of MiB of GPU memory on devices training never uses.
    """

    index: int
    name: str
    mem_total: int
    mem_used: int


@dataclass(frozen=True)
class Resources:
    """A sample of this node's resources.  Byte counts are bytes, load is the
    1-minute load average, ``cpu_percent`` is system-wide busy time in percent
    since the previous sample taken on the same thread."""

    cpu_count: int
    cpu_percent: float
    load_avg_1m: float
    mem_total_bytes: int
    mem_available_bytes: int
    net_bytes_sent: int
    net_bytes_recv: int
    gpus: tuple[GpuResources, ...] = ()

    def as_dict(self) -> dict:
        """Plain data (dicts, lists, numbers, strings) for msgpack and JSON."""
        d = asdict(self)
        d["gpus"] = [dict(g) for g in d["gpus"]]
        return d


def sample_resources() -> Resources:
    """Read the machine's resources now, without blocking.

    ``cpu_percent`` uses ``interval=None``: the busy share since the previous
    call instead of sleeping for an interval, because this runs on the agent's
    event loop, where a blocking ``interval=1`` would stall failure detection
    for a second.  psutil keeps the previous reading per thread (psutil >= 6),
    so other callers on other threads (Lightning's ``DeviceStatsMonitor``) do
    not shorten our interval.  The first call on a thread has no previous
    reading and reports 0.0 (psutil's documented behaviour); the monitor
    primes it when it is created.
    """
    vm = psutil.virtual_memory()
    try:
        load1 = psutil.getloadavg()[0]
    except (AttributeError, OSError):  # platforms without a load average
        load1 = 0.0
    # ``net_io_counters`` returns None where /proc/net/dev is unreadable
    # (some containers); report zeros rather than fail the whole sample.
    net = psutil.net_io_counters()
    return Resources(
        cpu_count=psutil.cpu_count(logical=True) or os.cpu_count() or 1,
        cpu_percent=float(psutil.cpu_percent(interval=None)),
        load_avg_1m=float(load1),
        mem_total_bytes=int(vm.total),
        mem_available_bytes=int(vm.available),
        net_bytes_sent=int(net.bytes_sent) if net is not None else 0,
        net_bytes_recv=int(net.bytes_recv) if net is not None else 0,
        gpus=_sample_gpus(),
    )


def _sample_gpus() -> tuple[GpuResources, ...]:
    """CUDA devices, only if the process already uses torch *and* CUDA.

    Importing torch costs seconds (DESIGN.md: imports take 3.4-3.8 s of a cold
    start), and initialising CUDA from the monitor would break processes that
    fork workers later ("Cannot re-initialize CUDA in forked subprocess"), so
    both must already have happened for other reasons.
    """
    torch = sys.modules.get("torch")
    cuda = getattr(torch, "cuda", None)
    if cuda is None:
        return ()
    try:
        if not (cuda.is_available() and cuda.is_initialized()):
            return ()
        gpus = []
        for i in range(cuda.device_count()):
            props = cuda.get_device_properties(i)
            gpus.append(
                GpuResources(
                    index=i,
                    name=str(props.name),
                    mem_total=int(props.total_memory),
                    mem_used=int(cuda.memory_reserved(i)),
                )
            )
        return tuple(gpus)
    except Exception:  # a driver hiccup must not take the monitor down
        return ()
