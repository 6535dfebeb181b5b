"""Testbed: real links for tests and benchmarks, in network namespaces.

Not a layer of the runtime: replication tests and benchmarks use it to run
nodes as processes behind one switch, with per-node bandwidth caps (tbf) and
cuts (a node's port down, or silent loss between one pair).  Most tests need
none of this and stay on loopback (DESIGN.md, "Testbed").

:mod:`.cpu` slows a node down: a cgroup with a CPU quota (a fraction of one
CPU) for its processes, so nodes of different speed share one machine
(:meth:`Testbed.limit_cpu`, or :class:`.cpu.CpuLimit` for local processes).

Its other modules are the harnesses of the tests, the demo and the
benchmarks, kept out of the layer folders: :mod:`.procs` (free ports, a
bounded reap) and :mod:`.local` (rendezvous nodes as local processes).
"""

from __future__ import annotations

from chaos_lightning.testbed.netns import (
    DEFAULT_PREFIX_PATTERN,
    Testbed,
    TestbedError,
    available,
    cleanup_stale,
)

__all__ = [
    "DEFAULT_PREFIX_PATTERN",
    "Testbed",
    "TestbedError",
    "available",
    "cleanup_stale",
]
