"""The strategy's companion callback: where a step ends for the elastic group.

Role in the whole: Lightning gives a strategy no hook between "the optimizer
stepped" and "the next batch is fetched"; a callback's ``on_train_batch_end``
is that place.  :class:`ChaosCallback` calls the strategy's step boundary
there (commit the step's samples, decide whether to switch views), keeps the
sampler's cursor in checkpoints, and shows the world size on the progress
bar.  The strategy inserts it first among the trainer's callbacks, so a step
is committed before any other callback's ``on_train_batch_end`` runs
(``ModelCheckpoint`` must save the committed cursor).
"""

from __future__ import annotations

from typing import Any

from lightning.pytorch.callbacks import Callback
from typing_extensions import override

from chaos_lightning.strategy import _lightning_internals as internals

__all__ = ["ChaosCallback"]


class ChaosCallback(Callback):
    """Calls ``strategy.on_step_boundary`` after every training batch and
    keeps the sampler's cursor in checkpoints."""

    #: not part of the state a joiner receives: the sampler travels on its own
    chaos_owned = True

    def __init__(self, strategy: Any) -> None:
        self._strategy = strategy
        self._shown_world: float | None = None

    def _ours(self, trainer: Any) -> bool:
        return trainer.strategy is self._strategy

    @override
    def on_train_start(self, trainer: Any, pl_module: Any) -> None:
        self._shown_world = None  # Lightning cleared its metrics for this run
        if self._ours(trainer):
            self._strategy.start_training(trainer)

    @override
    def state_dict(self) -> dict[str, Any]:
        """The sampler's cursor, so ``ckpt_path`` resumes mid-epoch with exactly-once intact."""
        sampler = self._strategy.elastic_sampler
        return {"sampler": sampler.state_dict()} if sampler is not None else {}

    @override
    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        # Lightning restores callbacks before the dataloaders exist: the
        # strategy applies this once it has its sampler (at train start).
        if "sampler" in state_dict:
            self._strategy.restored_sampler_state = state_dict["sampler"]

    @override
    def on_train_epoch_start(self, trainer: Any, pl_module: Any) -> None:
        sampler = self._strategy.elastic_sampler
        if self._ours(trainer) and sampler is not None:
            internals.set_epoch_length(trainer, sampler.steps_remaining(), new_epoch=True)

    @override
    def on_train_batch_start(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if self._ours(trainer):
            self._strategy.on_batch_start()

    @override
    def on_train_batch_end(self, trainer: Any, pl_module: Any, *args: Any) -> None:
        if not self._ours(trainer):
            return
        self._strategy.on_step_boundary(trainer)
        # the world size on the progress bar, logged when it changes
        # (Lightning keeps the last value shown; logging costs every step)
        world = float(self._strategy.world_size)
        if world != self._shown_world:
            pl_module.log("world", world, prog_bar=True, on_step=True, on_epoch=False)
            self._shown_world = world
