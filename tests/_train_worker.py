"""One training process for test_strategy.py: an unmodified-style Lightning
module on synthetic data with ``Trainer(strategy="chaos")``; prints JSON lines
(ready, per-step progress, final hashes and the sample ledger)."""

from __future__ import annotations

import hashlib
import json
import logging
import os
import sys
import time

import chaos_lightning  # noqa: F401  (registers "chaos")
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, Dataset


def say(**kw) -> None:
    print(json.dumps(kw), flush=True)


class Indexed(Dataset):
    def __init__(self, n: int):
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        self.y = self.x @ torch.randn(8, 1, generator=g)

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int):
        return self.x[i], self.y[i]


class Regressor(pl.LightningModule):
    def __init__(self, step_sleep: float):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.step_sleep = step_sleep

    def training_step(self, batch, batch_idx):
        x, y = batch
        time.sleep(self.step_sleep)  # make steps long enough to kill a peer mid-step
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        say(event="step", step=self.trainer.global_step, world=self.trainer.world_size, pid=os.getpid())

    def configure_optimizers(self):
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def digest(tensors) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    n, epochs, sleep = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    # chaos_lightning's INFO lines (views, switches, stalls) go to the node's
    # log file, which a failing test names
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    pl.seed_everything(0, workers=False)
    model = Regressor(sleep)
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    say(event="ready", pid=os.getpid())
    trainer.fit(model, DataLoader(Indexed(n), batch_size=4, shuffle=True))
    strategy = trainer.strategy
    opt = trainer.optimizers[0]
    opt_tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    ledger = strategy.ledger
    say(
        event="done", pid=os.getpid(), left=strategy._left, global_step=trainer.global_step,
        params=digest(model.parameters()), optim=digest(opt_tensors),
        epochs={str(e): sorted(ledger.counts(e).items()) for e in range(epochs)} if ledger else {},
        switches=strategy.events,
    )


if __name__ == "__main__":
    main()
