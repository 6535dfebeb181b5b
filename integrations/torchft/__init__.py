"""TorchFT baseline: one replica group of a real ``torchft`` run, for comparison.

DESIGN.md lists TorchFT (``torchft`` on PyPI: per-step quorum through a
central Lighthouse, healing from one peer) as a baseline.  This package runs
it on *our* scenario workload so the numbers compare like for like:

* :mod:`.worker` -- one replica process (``python -m
  chaos_lightning.integrations.torchft.worker``): ``torchft.Manager`` +
  ``torchft.DistributedDataParallel`` + ``torchft.Optimizer`` over
  ``ProcessGroupGloo``, training ``MLP(hidden).net`` from
  :mod:`chaos_lightning.scenario.workload` on ``Synthetic(4096)``; it writes
  wall-clock timestamps as JSON lines for ``benchmarks/_torchft.py``.
* :mod:`.lighthouse` -- the Lighthouse (torchft's Rust gRPC server) in a
  process of its own, on a given port.

``torchft`` is imported only by those entry points, never by this package, so
importing ``chaos_lightning.integrations.torchft`` costs nothing and works
without torchft installed.  See ``docs/baselines_torchft.md``.
"""

from __future__ import annotations
