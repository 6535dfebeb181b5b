"""Callbacks that go with ``strategy="chaos"``.

:class:`ScaleLRWithWorld` rescales the learning rate when the global batch
changes with the world (the default mode: a fixed per-node batch, so the
global batch is ``world_size * batch_size``).  With ``global_batch_size`` set
on the strategy the global batch is constant and the callback does nothing.
"""

from __future__ import annotations

import math
from typing import Any

from lightning.pytorch.callbacks import Callback

from chaos_lightning.strategy.strategy import ChaosStrategy

__all__ = ["ScaleLRWithWorld"]


class ScaleLRWithWorld(Callback):
    """Keep the learning rate proportional to the global batch (``rule="linear"``,
    Goyal et al. 2017) or to its square root (``rule="sqrt"``, for adaptive
    optimizers such as Adam).

    At the first training batch after a view change, every optimizer param
    group's ``lr`` (and ``initial_lr``, and each scheduler's ``base_lrs``, so
    schedulers that recompute from them keep the scale) is multiplied by
    ``(new / old) ** p`` with ``p`` 1 or 0.5, where ``new`` and ``old`` are
    the global batch sizes.  The learning rate you configure is the one for
    the global batch of the first view the run trains in.

    All replicas apply the same factor at the same step: the global batch is
    the sampler's shared capacity, and the last one seen is part of this
    callback's state, which a joining node receives with the rest.
    """

    def __init__(self, rule: str = "linear") -> None:
        if rule not in ("linear", "sqrt"):
            raise ValueError(f"rule must be 'linear' or 'sqrt', got {rule!r}")
        self.rule = rule
        self.last_global_batch: int | None = None

    def state_dict(self) -> dict[str, Any]:
        return {"rule": self.rule, "last_global_batch": self.last_global_batch}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self.last_global_batch = state_dict.get("last_global_batch")

    def on_train_batch_start(self, trainer: Any, pl_module: Any, batch: Any, batch_idx: int) -> None:
        strategy = trainer.strategy
        if not isinstance(strategy, ChaosStrategy) or strategy.elastic_sampler is None:
            return
        now = strategy.elastic_sampler.capacity
        before, self.last_global_batch = self.last_global_batch, now
        if before is None or before == now:
            return
        factor = now / before if self.rule == "linear" else math.sqrt(now / before)
        for opt in trainer.optimizers:
            for group in opt.param_groups:
                group["lr"] *= factor
                if "initial_lr" in group:
                    group["initial_lr"] *= factor
        for cfg in trainer.lr_scheduler_configs:
            if hasattr(cfg.scheduler, "base_lrs"):
                cfg.scheduler.base_lrs = [lr * factor for lr in cfg.scheduler.base_lrs]
        pl_module.log("chaos/lr_scale", factor, on_step=True, on_epoch=False)
