"""chaos_lightning: elastic, self-healing data-parallel training for PyTorch Lightning.

Layers (imports point downward only): ``wire`` (framing, schema, auth),
``membership`` (peer negotiation, sans-IO), ``monitor``, ``agent``,
``rendezvous``, ``replication``, ``strategy``.  See ``docs/``.

``import chaos_lightning`` registers ``"chaos"`` in Lightning's strategy
registry, so ``Trainer(strategy="chaos")`` works.  Lightning has no entry
point for strategies, and importing it costs seconds, so registration is
lazy: done now if ``lightning.pytorch`` is already imported, otherwise right
after it is (a one-shot import hook).  The control-plane tools
(``python -m chaos_lightning.rendezvous``, the demo) never import Lightning.
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys

__version__ = "0.1.0"

_TARGET = "lightning.pytorch"


def _register() -> None:
    from lightning.pytorch.strategies import StrategyRegistry

    from chaos_lightning.strategy.strategy import ChaosStrategy

    ChaosStrategy.register_strategies(StrategyRegistry)


class _RegisterAfterLightning(importlib.abc.MetaPathFinder):
    """Runs :func:`_register` once ``lightning.pytorch`` has finished importing."""

    def find_spec(self, name, path, target=None):  # type: ignore[no-untyped-def]
        if name != _TARGET:
            return None
        sys.meta_path.remove(self)  # one shot; also keeps find_spec below from recursing
        spec = importlib.util.find_spec(name)
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_then_register(module):  # type: ignore[no-untyped-def]
            exec_module(module)
            _register()

        spec.loader.exec_module = exec_then_register  # type: ignore[method-assign]
        return spec


if _TARGET in sys.modules:
    _register()
elif not any(isinstance(f, _RegisterAfterLightning) for f in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterLightning())
