"""The cluster's changes in the run's own logs: views, stalls and shares through ``trainer.loggers``.

Role in the whole: the Prometheus endpoint (:mod:`chaos_lightning.metrics`)
is for operators watching nodes; a person reading a run's TensorBoard or
``metrics.csv`` wants the same story beside the loss curve, at the same
steps.  :class:`LogClusterMetrics` (added by the strategy next to its
companion callback) logs, from global rank 0 only, every
``Trainer(log_every_n_steps=...)`` applied steps, with ``trainer.global_step``
as the step:

* ``chaos/world_size``, ``chaos/view_epoch``: the group trained in;
* ``chaos/samples_per_step``: the global batch (the elastic sampler's
  capacity); ``chaos/share_rank{i}`` and ``chaos/rate_rank{i}``: each rank's
  samples per step and measured samples/s, once the members' shares have
  changed (the ``shares`` trace record, adaptive shares).

Each switch itself is logged when it happens, by the strategy
(``ChaosStrategy._switched``: ``chaos/world_size``, ``chaos/view_epoch`` and
``chaos/stall_s``, the switch's stall, at the step it trained from); this
callback adds the steady series between switches, so a plot of the world
size has a point every ``log_every_n_steps`` and not only at the changes.

It reads the shares as a :class:`~.trace.Trace` subscriber and subscribes
only when the trainer has a logger, so ``logger=False`` costs nothing.  A
failed step logs nothing (it is no step: DESIGN's "a failed step leaves no
trace").
"""

from __future__ import annotations

import threading
from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

__all__ = ["LogClusterMetrics"]


class LogClusterMetrics(Callback):
    """Logs the cluster's view, stalls and shares to ``trainer.loggers`` (see the module docstring)."""

    #: not part of the state a joiner receives: each node's own bookkeeping
    chaos_owned = True

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy
        self._lock = threading.Lock()  # records may come from the agent's thread
        self._subscribed = False
        self._shares: dict[str, list[Any]] | None = None
        self._logged_step: int | None = None

    def _record(self, rec: dict[str, Any]) -> None:
        ev = rec.get("ev")
        if ev == "trainers":
            with self._lock:
                if self._shares is not None and len(self._shares["samples"]) != rec.get("world"):
                    self._shares = None  # another world: the next shares record says
        elif ev == "shares":
            with self._lock:
                self._shares = {"samples": list(rec.get("samples") or ()), "rates": list(rec.get("rates") or ())}

    @override
    def setup(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if trainer.strategy is self._strategy and trainer.loggers and not self._subscribed:
            self._strategy.trace.subscribe(self._record)
            self._subscribed = True

    @override
    def teardown(self, trainer: Any, pl_module: Any, stage: str) -> None:
        if self._subscribed:
            self._strategy.trace.unsubscribe(self._record)
            self._subscribed = False

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        s = self._strategy
        if not self._subscribed or trainer.strategy is not s or not s.step_applied:
            return
        step = trainer.global_step
        every = max(1, int(trainer.log_every_n_steps or 1))
        if step == self._logged_step or step % every != 0:
            return  # another micro-batch of the same step, or not a log step
        self._logged_step = step
        if s.global_rank != 0:
            return
        metrics = self.metrics()
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)

    def metrics(self) -> dict[str, float]:
        """What the next log line holds."""
        s = self._strategy
        out: dict[str, float] = {"chaos/world_size": float(s.world_size)}
        view = s.group.view
        if view is not None:
            out["chaos/view_epoch"] = float(view.epoch)
        if s.elastic_sampler is not None:
            out["chaos/samples_per_step"] = float(s.elastic_sampler.capacity)
        with self._lock:
            if self._shares is not None:
                for i, v in enumerate(self._shares["samples"]):
                    out[f"chaos/share_rank{i}"] = float(v)
                for i, v in enumerate(self._shares["rates"]):
                    if v is not None:
                        out[f"chaos/rate_rank{i}"] = float(v)
        return out
