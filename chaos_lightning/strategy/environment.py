"""Where a chaos node runs: its cluster environment and its gloo interface.

Role in the whole: the small pieces of process setup the strategy needs.
:class:`ChaosEnvironment` tells Lightning the rank and world size of the
committed view (they change at every switch; the processes are the user's,
so there is no launcher); :func:`pin_gloo_interface` makes gloo talk on the
interface of the address the node binds; :func:`take_sigterm` turns SIGTERM
into a graceful leave; :func:`freeze_heap` keeps the interpreter's full
garbage collections off the step.  The last four live in :mod:`.process`
(no Lightning import) and are re-exported here.
"""

from __future__ import annotations

import os

from lightning.fabric.plugins.environments.cluster_environment import ClusterEnvironment
from typing_extensions import override


class ChaosEnvironment(ClusterEnvironment):
    """Rank and world size follow the committed view; processes are the user's."""

    def __init__(self) -> None:
        self._rank = 0
        self._world = 1

    @property
    @override
    def creates_processes_externally(self) -> bool:
        return True

    @property
    @override
    def main_address(self) -> str:
        return "127.0.0.1"  # unused: process groups come from the rendezvous store

    @property
    @override
    def main_port(self) -> int:
        return 0

    @staticmethod
    @override
    def detect() -> bool:
        return False

    @override
    def world_size(self) -> int:
        return self._world

    @override
    def set_world_size(self, size: int) -> None:
        self._world = size

    @override
    def global_rank(self) -> int:
        return self._rank

    @override
    def set_global_rank(self, rank: int) -> None:
        self._rank = rank

    @override
    def local_rank(self) -> int:
        return int(os.environ.get("LOCAL_RANK", 0))  # device index on this host

    @override
    def node_rank(self) -> int:
        return self._rank


from chaos_lightning.strategy.process import (  # noqa: E402  (re-exported: they need no Lightning)
    freeze_heap,
    pin_gloo_interface,
    sigterm_ends_wait,
    take_sigterm,
)

__all__ = ["ChaosEnvironment", "freeze_heap", "pin_gloo_interface", "sigterm_ends_wait", "take_sigterm"]
