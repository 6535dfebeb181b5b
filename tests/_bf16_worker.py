"""A small outside-style Lightning project for test_strategy_bf16.py: a
``bf16-true`` model (parameters and optimizer state in bfloat16) trained with
``Trainer(strategy="chaos", precision="bf16-true")`` at a per-rank batch of
101, an odd size that bfloat16 cannot count past 256 exactly.  Prints JSON
lines: ready, each step, and at the end the hashes and the sample ledger.

argv: samples, epochs, seconds each step sleeps."""

from __future__ import annotations

import logging
import os
import sys
import time

import chaos_lightning  # noqa: F401  (registers strategy="chaos")
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset

from _train_worker import digest
from _say import say  # one whole line per record (tests/_say.py)


class Classifier(pl.LightningModule):
    def __init__(self, sleep: float) -> None:
        super().__init__()
        self.body = torch.nn.Sequential(torch.nn.Linear(12, 32), torch.nn.GELU(), torch.nn.Linear(32, 3))
        self.sleep = sleep

    def training_step(self, batch, batch_idx):
        x, y = batch
        time.sleep(self.sleep)
        loss = torch.nn.functional.cross_entropy(self.body(x), y)
        self.log("train_loss", loss)
        return loss

    def on_train_batch_end(self, outputs, batch, batch_idx):
        say(event="step", step=self.trainer.global_step, world=self.trainer.world_size,
            dtype=str(next(self.parameters()).dtype), batch=len(batch[0]))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05, momentum=0.9)


def main() -> None:
    n, epochs, sleep = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    pl.seed_everything(0, workers=False)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, 12, generator=g)
    data = TensorDataset(x, (x[:, :3].argmax(1)))
    model = Classifier(sleep)
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=1, precision="bf16-true", max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    say(event="ready", pid=os.getpid())
    trainer.fit(model, DataLoader(data, batch_size=101, shuffle=True))
    opt = trainer.optimizers[0]
    ledger = trainer.strategy.ledger
    say(
        event="done", pid=os.getpid(), global_step=trainer.global_step,
        dtype=str(next(model.parameters()).dtype),
        params=digest(model.parameters()),
        optim=digest(v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)),
        epochs={str(e): sorted(ledger.counts(e).items()) for e in range(epochs)},
    )


if __name__ == "__main__":
    main()
