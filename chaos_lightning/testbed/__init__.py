"""Testbed: real links for tests and benchmarks, in network namespaces.

Not a layer of the runtime: replication tests and benchmarks use it to run
nodes as processes behind one switch, with per-node bandwidth caps (tbf) and
cuts (a node's port down, or silent loss between one pair).  Most tests need
none of this and stay on loopback (DESIGN.md, "Testbed").
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
