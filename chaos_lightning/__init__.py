"""chaos_lightning: elastic, self-healing data-parallel training for PyTorch Lightning.

Layers (imports point downward only): ``wire`` (framing, schema, auth),
``membership`` (peer negotiation, sans-IO), ``monitor``, ``agent``,
``rendezvous``, ``replication``, ``strategy``.  See ``docs/``.

``import chaos_lightning`` registers ``"chaos"`` in Lightning's strategy
registries (``lightning.pytorch``'s, the standalone ``pytorch_lightning``'s,
and Fabric's), so ``Trainer(strategy="chaos")`` works with either and
``Fabric(strategy="chaos")`` too.  Lightning has no entry
point for strategies, and importing it costs seconds, so registration is
lazy: done now for a package already imported, otherwise right after it is
(an import hook that removes itself once both are done).  The control-plane tools
(``python -m chaos_lightning.rendezvous``, the demo) never import Lightning.
"""

from __future__ import annotations

import importlib
import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"


# The strategy module registers itself in its package's registry as its last
# statement, so importing it is registering; a module still mid-import (it
# imports Lightning, which can bring us here) finishes the job itself.


def _register_lightning() -> None:
    importlib.import_module("chaos_lightning.strategy.strategy")


def _register_fabric() -> None:
    importlib.import_module("chaos_lightning.strategy.fabric")


def _register_pytorch_lightning() -> None:
    from chaos_lightning.strategy._flavour import pytorch_lightning_module

    pytorch_lightning_module("strategy")


#: Packages whose strategy registry gets "chaos", and how.
_TARGETS = {
    "lightning.fabric": _register_fabric,
    "lightning.pytorch": _register_lightning,
    "pytorch_lightning": _register_pytorch_lightning,
}


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Registers "chaos" in each of :data:`_TARGETS` once it has finished importing."""

    def __init__(self, pending: set[str]) -> None:
        self.pending = pending

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name not in self.pending:
            return None
        self.pending.discard(name)
        if not self.pending:
            sys.meta_path.remove(self)
        # find the real spec without us in the way
        self.pending, saved = set(), self.pending
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.pending = saved
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module
        register = _TARGETS[name]

        def exec_then_register(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


def __getattr__(name: str):  # type: ignore[no-untyped-def]
    # ``chaos_lightning.ChaosStrategy`` and the callbacks, without importing
    # Lightning for the control-plane tools
    if name == "ChaosStrategy":
        from chaos_lightning.strategy.strategy import ChaosStrategy

        return ChaosStrategy
    if name == "ChaosFabricStrategy":
        from chaos_lightning.strategy.fabric import ChaosFabricStrategy

        return ChaosFabricStrategy
    if name == "ScaleLRWithWorld":
        from chaos_lightning.strategy.callbacks import ScaleLRWithWorld

        return ScaleLRWithWorld
    raise AttributeError(f"module 'chaos_lightning' has no attribute {name!r}")


_pending = set()
for _name, _register in _TARGETS.items():
    if _name in sys.modules:
        _register()
    else:
        _pending.add(_name)
if _pending and not any(isinstance(f, _RegisterAfterLightning) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterLightning(_pending))
