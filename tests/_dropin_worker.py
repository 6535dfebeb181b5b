"""Small outside-style Lightning projects for test_dropin.py, one per feature.

Written the way a user writes them, not like our examples: each is an
ordinary project plus ``import chaos_lightning`` and ``strategy="chaos"``.
Prints JSON lines: ``ready``, each ``step`` (global step, batch index, world),
each ``val`` (the global step it ran at), and ``done`` with what the test
compares across replicas: parameter and optimizer hashes, ``global_step``,
every optimizer's step count, the callbacks' state, the sample ledger.

argv: feature, samples, epochs, seconds each step sleeps, the shared root dir.

Features:

* ``valmid``: under ``precision="bf16-mixed"``, a ``LightningDataModule``, validation twice an epoch
  (``val_check_interval=0.5``), ``EarlyStopping`` and a monitored top-2
  ``ModelCheckpoint`` on ``val_loss``, a ``CSVLogger`` under the shared root.
* ``valevery``: the ``valmid`` model with validation after every training
  batch (``val_check_interval=1``) on a one-batch validation set, no logger,
  no checkpoints: every step boundary a newcomer joins at is one where
  validation is due.
* ``manual``: manual optimization, two optimizers stepped in turn (a GAN's
  shape: generator and discriminator), ``max_steps`` counting both (no
  scaler: one that skips an overflowing step would make the optimizers'
  own step counts differ from Lightning's, churn or not).  On
  SIGUSR1 the process SIGKILLs itself right after its next ``opt_d.step()``:
  between the batch's two gradient reductions.
* ``stream``: an ``IterableDataset``, which the strategy refuses at setup.
* ``cli``: the ``valmid`` model and data through ``LightningCLI`` (its
  ``config.yaml``), with a ``TensorBoardLogger`` and a ``CSVLogger``.
* ``norm``: a network with ``BatchNorm1d`` (buffers every training forward
  moves) under fp16 AMP with a ``GradScaler``, a per-step ``LambdaLR`` schedule
  and a ``LearningRateMonitor`` logging it to a ``CSVLogger``.
"""

from __future__ import annotations

import logging
import os
import signal
import sys
import threading
import time
from pathlib import Path

import chaos_lightning  # noqa: F401  (registers strategy="chaos")
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import EarlyStopping, ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, TensorDataset

from _train_worker import digest
from _say import say  # one whole line per record (tests/_say.py)


DIE_AFTER_D = threading.Event()  # manual: set by SIGUSR1
LR, DECAY = 1e-2, 0.99  # the norm feature's schedule: LR * DECAY ** applied_steps


def tensors(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


class Numbers(pl.LightningDataModule):
    def __init__(self, n: int, val: int = 48) -> None:
        super().__init__()
        self.n, self.n_val = n, val

    def setup(self, stage: str) -> None:
        self.train, self.val = tensors(self.n, 0), tensors(self.n_val, 1)

    def train_dataloader(self):
        return DataLoader(self.train, batch_size=8, shuffle=True)

    def val_dataloader(self):
        return DataLoader(self.val, batch_size=8)


class Reporting(pl.LightningModule):
    """What every project here reports (the user's own hooks)."""

    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.sleep = sleep

    def on_train_batch_end(self, outputs, batch, batch_idx):
        say(event="step", step=self.trainer.global_step, batch=batch_idx, world=self.trainer.world_size,
            epoch=self.current_epoch, applied=self.trainer.strategy.step_applied)

    def on_validation_end(self):
        if not self.trainer.sanity_checking:
            say(event="val", step=self.trainer.global_step, world=self.trainer.world_size)


class Regressor(Reporting):
    def __init__(self, sleep: float) -> None:
        super().__init__(sleep)
        self.net = torch.nn.Sequential(torch.nn.Linear(6, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        time.sleep(self.sleep)
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss)
        return loss

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True)

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


class Normalized(Reporting):
    """BatchNorm's running statistics are buffers each rank's forward moves."""

    def __init__(self, sleep: float) -> None:
        super().__init__(sleep)
        self.net = torch.nn.Sequential(
            torch.nn.Linear(6, 16), torch.nn.BatchNorm1d(16), torch.nn.Tanh(), torch.nn.Linear(16, 1))

    def training_step(self, batch, batch_idx):
        time.sleep(self.sleep)
        x, y = batch
        loss = torch.nn.functional.mse_loss(self.net(x).float(), y)
        self.log("train_loss", loss)
        return loss

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=LR)
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda step: DECAY**step)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class TwoPlayers(Reporting):
    """Manual optimization with two optimizers, the shape of a GAN step."""

    def __init__(self, sleep: float) -> None:
        super().__init__(sleep)
        self.automatic_optimization = False
        self.gen = torch.nn.Linear(6, 6)
        self.disc = torch.nn.Sequential(torch.nn.Linear(6, 8), torch.nn.Tanh(), torch.nn.Linear(8, 1))

    def training_step(self, batch, batch_idx):
        time.sleep(self.sleep)
        x, _ = batch
        opt_g, opt_d = self.optimizers()
        fake = self.gen(torch.randn_like(x))
        d_loss = self.disc(fake.detach()).mean() - self.disc(x).mean()
        opt_d.zero_grad()
        self.manual_backward(d_loss)
        opt_d.step()
        if DIE_AFTER_D.is_set():
            os.kill(os.getpid(), signal.SIGKILL)
        g_loss = -self.disc(fake).mean()
        opt_g.zero_grad()
        self.manual_backward(g_loss)
        opt_g.step()
        self.log("d_loss", d_loss)

    def configure_optimizers(self):
        return torch.optim.Adam(self.gen.parameters(), lr=1e-3), torch.optim.Adam(self.disc.parameters(), lr=1e-3)


def fp16() -> list:
    """fp16 AMP with a gradient scaler, on the CPU: Lightning maps
    ``precision="16-mixed"`` to bf16 there (no scaler), so the plugin is
    given as a GPU user gets it from ``"16-mixed"``."""
    from lightning.pytorch.plugins import MixedPrecision

    return [MixedPrecision("16-mixed", "cpu", scaler=torch.amp.GradScaler("cpu"))]


def callback_state(trainer: pl.Trainer) -> dict:
    out = {}
    for cb in trainer.callbacks:
        if isinstance(cb, EarlyStopping):
            out["early_stopping"] = {"wait": cb.wait_count, "best": float(cb.best_score)}
        elif isinstance(cb, ModelCheckpoint):
            out["checkpoint"] = {
                "best_k": sorted(Path(p).name for p in cb.best_k_models),
                "best_score": None if cb.best_model_score is None else float(cb.best_model_score),
                "dirpath": cb.dirpath,
            }
    return out


def main() -> None:
    feature, n, epochs, sleep, root = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4]), sys.argv[5]
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    pl.seed_everything(0, workers=False)
    common = dict(strategy="chaos", accelerator="cpu", devices=1, max_epochs=epochs, default_root_dir=root,
                  enable_progress_bar=False, enable_model_summary=False)
    if feature == "valmid":
        model, data = Regressor(sleep), Numbers(n)
        trainer = pl.Trainer(
            **common, precision="bf16-mixed", val_check_interval=0.5, num_sanity_val_steps=0, logger=CSVLogger(root, name="csv"),
            log_every_n_steps=5,
            callbacks=[EarlyStopping("val_loss", patience=1000), ModelCheckpoint(monitor="val_loss", save_top_k=2)],
        )
        say(event="ready", pid=os.getpid())
        trainer.fit(model, datamodule=data)
    elif feature == "valevery":
        model, data = Regressor(sleep), Numbers(n, val=8)
        trainer = pl.Trainer(**common, val_check_interval=1, num_sanity_val_steps=0, logger=False,
                             enable_checkpointing=False)
        say(event="ready", pid=os.getpid())
        trainer.fit(model, datamodule=data)
    elif feature == "norm":
        from lightning.pytorch.callbacks import LearningRateMonitor

        model = Normalized(sleep)
        trainer = pl.Trainer(
            **common, plugins=fp16(), logger=CSVLogger(root, name="csv"), log_every_n_steps=1,
            enable_checkpointing=False, callbacks=[LearningRateMonitor(logging_interval="step")],
        )
        say(event="ready", pid=os.getpid())
        trainer.fit(model, DataLoader(tensors(n, 0), batch_size=8, shuffle=True))
    elif feature == "manual":
        signal.signal(signal.SIGUSR1, lambda *_: DIE_AFTER_D.set())
        model = TwoPlayers(sleep)
        trainer = pl.Trainer(**common, logger=False, enable_checkpointing=False)
        say(event="ready", pid=os.getpid())
        trainer.fit(model, DataLoader(tensors(n, 0), batch_size=8, shuffle=True))
    elif feature == "stream":
        class Stream(torch.utils.data.IterableDataset):
            def __iter__(self):
                return iter(tensors(n, 0))

        model = Regressor(sleep)
        trainer = pl.Trainer(**common, logger=False, enable_checkpointing=False)
        say(event="ready", pid=os.getpid())
        trainer.fit(model, DataLoader(Stream(), batch_size=8))
    elif feature == "cli":
        from lightning.pytorch.cli import LightningCLI

        loggers = [{"class_path": f"lightning.pytorch.loggers.{kind}Logger", "init_args": {"save_dir": root, "name": name}}
                   for kind, name in (("TensorBoard", "tb"), ("CSV", "csv"))]
        say(event="ready", pid=os.getpid())
        cli = LightningCLI(
            Regressor, Numbers, seed_everything_default=0,
            trainer_defaults={**common, "logger": loggers, "log_every_n_steps": 5, "enable_checkpointing": False},
            args=["fit", f"--model.sleep={sleep}", f"--data.n={n}"],
        )
        model, trainer = cli.model, cli.trainer
    else:
        raise SystemExit(f"unknown feature {feature!r}")
    opts = trainer.optimizers
    ledger = trainer.strategy.ledger
    say(
        event="done", pid=os.getpid(), global_step=trainer.global_step, left=trainer.strategy.left,
        params=digest(model.parameters()), buffers=digest(model.buffers()),
        optim=digest(v for opt in opts for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
        optimizer_steps=[max((int(st["step"]) for st in opt.state.values()), default=0) for opt in opts],
        callbacks=callback_state(trainer),
        scaler=getattr(trainer.precision_plugin, "scaler", None) and trainer.precision_plugin.scaler.state_dict(),
        epochs={str(e): sorted(ledger.counts(e).items()) for e in range(epochs)},
    )


if __name__ == "__main__":
    main()
