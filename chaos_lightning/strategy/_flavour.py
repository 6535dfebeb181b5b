"""The strategy for the standalone ``pytorch_lightning`` package.

Lightning ships the same code twice: ``lightning.pytorch`` (in the
``lightning`` package) and ``pytorch_lightning`` (its own package, with
``lightning_fabric``), generated from one source by renaming the imports.
A strategy subclasses one of them and a Trainer accepts only its own
package's classes, so ``Trainer(strategy="chaos")`` from ``pytorch_lightning``
needs a ``ChaosStrategy`` built on ``pytorch_lightning``'s ``DDPStrategy``.
We do what Lightning's build does, at import time: load our modules' source
with those two package names renamed, as separate modules
(``chaos_lightning.strategy._pl_strategy``, ``..._pl_callbacks``).  One
source, no copy to keep in step; ``tests/test_strategy_local.py`` fits a
``pytorch_lightning`` model with it.
"""

from __future__ import annotations

import importlib.util
import sys
from types import ModuleType

#: Our modules that import Lightning, and so exist once per package.  The
#: others (the pure decisions, the process group, the internals room, which
#: duck-types the trainer) are shared by both.
_FLAVOURED = ("strategy", "environment", "boundary", "callbacks")

_RENAMES = (
    ("lightning.pytorch", "pytorch_lightning"),
    ("lightning.fabric", "lightning_fabric"),
    *((f"chaos_lightning.strategy.{name} ", f"chaos_lightning.strategy._pl_{name} ") for name in _FLAVOURED),
)


def pytorch_lightning_module(name: str) -> ModuleType:
    """``chaos_lightning.strategy.<name>`` rebuilt on ``pytorch_lightning``
    (cached in ``sys.modules`` as ``chaos_lightning.strategy._pl_<name>``)."""
    target = f"chaos_lightning.strategy._pl_{name}"
    if target in sys.modules:
        return sys.modules[target]
    spec = importlib.util.find_spec(f"chaos_lightning.strategy.{name}")
    assert spec is not None and spec.origin is not None
    with open(spec.origin, encoding="utf-8") as f:
        source = f.read()
    for other in _FLAVOURED:  # build the flavoured modules this one imports first
        if other != name and f"chaos_lightning.strategy.{other} import" in source:
            pytorch_lightning_module(other)
    for old, new in _RENAMES:
        source = source.replace(old, new)
    module = ModuleType(target)
    module.__file__ = spec.origin
    module.__package__ = "chaos_lightning.strategy"
    sys.modules[target] = module
    try:
        exec(compile(source, spec.origin, "exec"), module.__dict__)
    except BaseException:
        del sys.modules[target]
        raise
    return module
