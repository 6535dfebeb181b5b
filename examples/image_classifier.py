"""A small CNN image classifier trained with ``Trainer(strategy="chaos")``.

Plain Lightning code: the only chaos-specific lines are ``import
chaos_lightning`` and ``strategy="chaos"``.  The data is synthetic and built in
memory (nothing is downloaded): 16x16 grey images of sine gratings whose
*orientation* is the class (8 classes, 22.5 degrees apart), with a random
phase, frequency, orientation jitter and pixel noise.  The dataset is a pure
function of ``--seed``, so every node builds the same one (the elastic
sampler hands each node its share of the same index space).  Validation
accuracy climbs from chance (12.5 %) to about 95 % within a few epochs.

Run one process per node; the membership comes from the environment::

    # three nodes on one machine (one shell each, or with & as here);
    # training starts once 3 nodes are members (CHAOS_MIN_NODES)
    CHAOS_BIND=127.0.0.1:7000 CHAOS_MIN_NODES=3 python examples/image_classifier.py &
    CHAOS_BIND=127.0.0.1:7001 CHAOS_PEERS=127.0.0.1:7000 CHAOS_MIN_NODES=3 python examples/image_classifier.py &
    CHAOS_BIND=127.0.0.1:7002 CHAOS_PEERS=127.0.0.1:7000 CHAOS_MIN_NODES=3 python examples/image_classifier.py &

    # a 4th node joins the running fit through any member (it pulls the
    # current parameters, optimizer state and sampler cursor, then trains)
    CHAOS_BIND=127.0.0.1:7003 CHAOS_PEERS=127.0.0.1:7001 python examples/image_classifier.py &

    # a graceful leave: SIGTERM makes a node leave at the next step boundary
    # (its fit returns, exit code 0); the others go on without it
    kill -TERM %2

Several nodes on one machine share its cores: give each a share of the
intra-op threads (``OMP_NUM_THREADS=1`` for three nodes on two cores),
or the steps slow down severalfold.  All nodes must use the same flags (``--seed`` in particular).  Across
machines, bind a reachable address and set the same ``CHAOS_SECRET`` on every
node.  Rank 0 of the current membership writes the CSV log and the
checkpoints under ``--root-dir`` (printed at start and at the end).  The last
stdout line is a JSON summary (losses, accuracy, world size, global step,
parameter digest): identical on every node that finished.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
from typing import Any

import chaos_lightning  # noqa: F401  (registers strategy="chaos")
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset


def gratings(n: int, *, classes: int, size: int, seed: int) -> TensorDataset:
    """``n`` images ``(1, size, size)`` of noisy sine gratings; label = orientation bin.

    Balanced classes; a deterministic function of its arguments."""
    g = torch.Generator().manual_seed(seed)
    labels = torch.arange(n) % classes
    labels = labels[torch.randperm(n, generator=g)]
    step = math.pi / classes
    theta = labels * step + (torch.rand(n, generator=g) - 0.5) * 0.5 * step  # jitter: a quarter bin each way
    freq = 0.6 + 0.6 * torch.rand(n, generator=g)  # radians per pixel
    phase = 2 * math.pi * torch.rand(n, generator=g)
    coords = torch.arange(size, dtype=torch.float32) - (size - 1) / 2
    yy, xx = torch.meshgrid(coords, coords, indexing="ij")
    proj = xx * theta.cos().view(n, 1, 1) + yy * theta.sin().view(n, 1, 1)
    images = torch.sin(freq.view(n, 1, 1) * proj + phase.view(n, 1, 1))
    images = images + 1.5 * torch.randn(n, size, size, generator=g)
    return TensorDataset(images.unsqueeze(1), labels)


class SmallCNN(pl.LightningModule):
    """Two conv blocks, global average pooling, a linear head."""

    def __init__(self, classes: int = 8, width: int = 16, lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.features = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(),
            nn.AdaptiveAvgPool2d(1), nn.Flatten(),
        )
        self.head = nn.Linear(2 * width, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        loss = F.cross_entropy(self(x), y)
        # on_epoch + sync_dist: the epoch mean over every node's samples
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(x))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        logits = self(x)
        acc = (logits.argmax(dim=1) == y).float().mean()
        # sync_dist: reduced over whoever is a member when validation runs
        self.log("val_loss", F.cross_entropy(logits, y), prog_bar=True, sync_dist=True, batch_size=len(x))
        self.log("val_acc", acc, prog_bar=True, sync_dist=True, batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class Summary(pl.Callback):
    """Collects the epoch metrics (already reduced over the nodes) and prints
    a final JSON line; the same on every node that finished the fit."""

    def __init__(self) -> None:
        self.train_loss: list[float] = []
        self.val_loss: list[float] = []
        self.val_acc: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.val_loss.append(round(float(m["val_loss"]), 6))
        self.val_acc.append(round(float(m["val_acc"]), 6))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train_loss_epoch" in trainer.callback_metrics:
            self.train_loss.append(round(float(trainer.callback_metrics["train_loss_epoch"]), 6))

    def report(self, trainer: pl.Trainer, model: pl.LightningModule) -> dict[str, Any]:
        h = hashlib.sha256()
        for t in model.state_dict().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {
            "event": "done", "example": "image_classifier", "pid": os.getpid(),
            "world_size": trainer.world_size, "global_step": trainer.global_step, "epochs": trainer.current_epoch,
            "train_loss": self.train_loss, "val_loss": self.val_loss, "val_acc": self.val_acc,
            "params": h.hexdigest()[:16], "interrupted": trainer.interrupted,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="training epochs")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: no limit)")
    p.add_argument("--batch-size", type=int, default=64, help="per-node batch size")
    p.add_argument("--lr", type=float, default=3e-3, help="Adam learning rate")
    p.add_argument("--train-size", type=int, default=4096, help="synthetic training images")
    p.add_argument("--val-size", type=int, default=1024, help="synthetic validation images")
    p.add_argument("--seed", type=int, default=0, help="data and initialisation seed (the same on every node)")
    p.add_argument("--root-dir", default="runs/image_classifier", help="where rank 0 writes logs and checkpoints")
    p.add_argument("--progress-bar", action="store_true", help="show Lightning's progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True)
    train = gratings(args.train_size, classes=8, size=16, seed=args.seed)
    val = gratings(args.val_size, classes=8, size=16, seed=args.seed + 1)
    model = SmallCNN(classes=8, lr=args.lr)

    summary = Summary()
    checkpoint = ModelCheckpoint(monitor="val_acc", mode="max", save_last=True, filename="{epoch}-{step}-{val_acc:.3f}")
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=1,
        max_epochs=args.epochs, max_steps=args.max_steps, default_root_dir=args.root_dir,
        logger=CSVLogger(args.root_dir), callbacks=[checkpoint, summary], log_every_n_steps=10,
        enable_progress_bar=args.progress_bar, enable_model_summary=False,
    )
    print(f"logs and checkpoints: {os.path.abspath(args.root_dir)} (written by rank 0 of the current membership)", flush=True)
    trainer.fit(
        model,
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        DataLoader(val, batch_size=256),
    )
    print(f"checkpoints in {checkpoint.dirpath}; best {checkpoint.best_model_path or '(none yet)'}", flush=True)
    print(json.dumps(summary.report(trainer, model)), flush=True)


if __name__ == "__main__":
    main()
