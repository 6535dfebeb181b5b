"""One training process for test_demos.py: a model from
``lightning.pytorch.demos``, unmodified, with its own data loaders, under
``Trainer(strategy="chaos")`` and otherwise Lightning's defaults (logger,
checkpointing, sanity check and validation loop on; files under ROOT).

Usage: ``_demo_worker.py MODEL EPOCHS ROOT``; MODEL is ``boring``
(``BoringModel``: train and val loaders of 64 random samples, batch 1, SGD
with a StepLR scheduler) or ``demo`` (``DemoModel`` on ``RandomDataset(32,
256)``, batch 8, Adam; no validation).  Observation is by a callback only (the
module stays as shipped).  ``DEMO_GATE=PATH``: warm up, then call ``fit``
only once PATH exists (how a test times a join); ``DEMO_STEP_SLEEP=S``: the
callback sleeps S seconds after each step (``DEMO_VAL_SLEEP``: after each
validation batch; ``DEMO_PAUSE_AFTER_STEP=G``: 4 s after global step G).
It prints JSON lines: ``ready``, ``step`` (global
step, world size), ``val_start``, ``done`` (parameter and optimizer digests, learning rate,
global step, epochs, validation batches run per training epoch,
``on_train_end``).
"""

from __future__ import annotations

import hashlib
import logging
import os
import sys
import time
from typing import Any

import chaos_lightning  # noqa: F401  (registers "chaos")
import lightning.pytorch as pl
import torch
from lightning.pytorch.demos import BoringModel, DemoModel
from lightning.pytorch.demos.boring_classes import RandomDataset
from torch.utils.data import DataLoader
from _say import say  # one whole line per record (tests/_say.py)


def digest(tensors: Any) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


class Observer(pl.Callback):
    """Reports progress; touches nothing."""

    def __init__(self, step_sleep: float, val_sleep: float) -> None:
        self.step_sleep, self.val_sleep = step_sleep, val_sleep
        self.val_batches: dict[str, int] = {}  # "sanity" or the training epoch -> batches this rank validated
        self.train_ended = False

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        lr = trainer.optimizers[0].param_groups[0]["lr"]
        say(event="step", step=trainer.global_step, world=trainer.world_size, epoch=trainer.current_epoch, lr=lr, pid=os.getpid())
        if self.step_sleep:
            time.sleep(self.step_sleep)  # slow steps, so a test can signal a node mid-fit
        if trainer.global_step == int(os.environ.get("DEMO_PAUSE_AFTER_STEP", "-1")):
            time.sleep(4.0)  # a window before the next step, for a join to commit in

    def on_validation_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if not trainer.sanity_checking:
            say(event="val_start", step=trainer.global_step, epoch=trainer.current_epoch, pid=os.getpid())

    def on_validation_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        if self.val_sleep and not trainer.sanity_checking:
            time.sleep(self.val_sleep)  # a long validation window
        key = "sanity" if trainer.sanity_checking else str(trainer.current_epoch)
        self.val_batches[key] = self.val_batches.get(key, 0) + 1

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.train_ended = True


def main() -> None:
    which, epochs, root = sys.argv[1], int(sys.argv[2]), sys.argv[3]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pl.seed_everything(0, workers=False)
    model: pl.LightningModule = BoringModel() if which == "boring" else DemoModel()
    observer = Observer(float(os.environ.get("DEMO_STEP_SLEEP", "0")), float(os.environ.get("DEMO_VAL_SLEEP", "0")))
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=1, max_epochs=epochs, default_root_dir=root,
        enable_progress_bar=False, callbacks=[observer],
    )
    say(event="ready", pid=os.getpid())
    gate, deadline = os.environ.get("DEMO_GATE"), time.monotonic() + 120.0
    while gate and not os.path.exists(gate):  # a joiner: warm, it joins when the test opens the gate
        if time.monotonic() > deadline:
            sys.exit(f"gate {gate} never opened")
        time.sleep(0.05)
    if which == "boring":
        trainer.fit(model)
    else:
        trainer.fit(model, DataLoader(RandomDataset(32, 256), batch_size=8, shuffle=True))
    opt = trainer.optimizers[0]
    opt_tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    say(
        event="done", pid=os.getpid(), global_step=trainer.global_step, epochs_completed=trainer.current_epoch,
        params=digest(model.parameters()), optim=digest(opt_tensors),
        lr=[g["lr"] for g in opt.param_groups], val_batches=observer.val_batches, train_ended=observer.train_ended,
        world=trainer.world_size, interrupted=trainer.interrupted,
    )


if __name__ == "__main__":
    main()
