"""One training process for test_convergence.py: the same seed, data and model
under ``Trainer(strategy="ddp")`` (a static world whose processes the test
starts, Lightning's externally-launched mode) or ``Trainer(strategy="chaos")``.

Usage: ``_convergence_worker.py STRATEGY N EPOCHS STEP_SLEEP SEED``.  For
``ddp`` the test sets ``MASTER_ADDR``, ``MASTER_PORT``, ``WORLD_SIZE``,
``NODE_RANK`` and ``LOCAL_RANK=0`` (so Lightning's ``LightningEnvironment``
sees externally created processes) and ``CONV_NUM_NODES``; for ``chaos`` the
usual ``CHAOS_*`` variables.  Prints JSON lines: ``ready`` (with the loss of
the initial model on the full data set), ``step`` (per step: global step,
world size, epoch) and ``done`` (final full-data-set loss, parameter digest,
switches).  Per-rank batch 4, Adam(lr=1e-2), data fixed by seed 0; ``SEED``
seeds the model's initialisation and the shuffling.  ``CONV_GATE=PATH``: the
process warms up (imports, model, trainer) and calls ``fit`` only once PATH
exists, so a test decides when a joiner joins.

``STRATEGY=reference`` (``SEED`` a comma-separated list, ``WORLD`` in
``CONV_NUM_NODES``): no Lightning, no processes; the same arithmetic in one
process, for each seed: every global step takes the next ``WORLD * 4``
samples of the epoch's permutation (``randperm`` seeded ``SEED + epoch``,
``DistributedSampler``'s recipe, which ``ElasticSampler`` shares) and applies
the mean gradient.  That is what ``ddp`` computes with equal per-rank batches
(up to float summation order), so it gives ddp's spread over seeds cheaply.
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
from torch.utils.data import DataLoader, Dataset
from _say import say  # one whole line per record (tests/_say.py)

BATCH = 4


class Teacher(Dataset):
    """``N`` samples of a fixed random 8 -> 1 teacher network (data seed 0, whatever ``SEED``)."""

    def __init__(self, n: int) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, 8, generator=g)
        w1, w2 = torch.randn(8, 8, generator=g), torch.randn(8, 1, generator=g)
        self.y = torch.tanh(self.x @ w1) @ w2

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class Student(pl.LightningModule):
    def __init__(self, step_sleep: float) -> None:
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.Tanh(), torch.nn.Linear(16, 1))
        self.step_sleep = step_sleep

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        if self.step_sleep:
            time.sleep(self.step_sleep)  # chaos: long enough steps to signal a node mid-epoch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        t = self.trainer
        say(event="step", step=t.global_step, world=t.world_size, epoch=t.current_epoch, pid=os.getpid())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-2)


def full_loss(model: Student, data: Teacher) -> float:
    """MSE of ``model`` on every sample of ``data`` (the comparison metric)."""
    with torch.no_grad():
        return float(torch.nn.functional.mse_loss(model.net(data.x), data.y))


def digest(tensors: Any) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def reference(n: int, epochs: int, world: int, seed: int) -> tuple[float, float]:
    """Initial and final full-data-set loss of data-parallel training with a
    static world, computed in one process (see the module docstring)."""
    pl.seed_everything(seed, workers=False)
    data, model = Teacher(n), Student(0.0)
    initial = full_loss(model, data)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    for epoch in range(epochs):
        order = torch.randperm(n, generator=torch.Generator().manual_seed(seed + epoch)).tolist()
        for lo in range(0, n, world * BATCH):
            idx = order[lo : lo + world * BATCH]
            opt.zero_grad()
            torch.nn.functional.mse_loss(model.net(data.x[idx]), data.y[idx]).backward()
            opt.step()
    return initial, full_loss(model, data)


def main() -> None:
    strategy, n, epochs, sleep = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), float(sys.argv[4])
    if strategy == "reference":
        for s in sys.argv[5].split(","):
            initial, final = reference(n, epochs, int(os.environ["CONV_NUM_NODES"]), int(s))
            say(event="reference", seed=int(s), initial_loss=initial, final_loss=final)
        say(event="done", pid=os.getpid())
        return
    seed = int(sys.argv[5])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    pl.seed_everything(seed, workers=False)
    data = Teacher(n)
    model = Student(sleep)
    kwargs: dict[str, Any] = {"num_nodes": int(os.environ["CONV_NUM_NODES"])} if strategy == "ddp" else {}
    trainer = pl.Trainer(
        strategy=strategy, accelerator="cpu", devices=1, max_epochs=epochs, logger=False,
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False, **kwargs,
    )
    say(event="ready", pid=os.getpid(), initial_loss=full_loss(model, data))
    gate, deadline = os.environ.get("CONV_GATE"), time.monotonic() + 120.0
    while gate and not os.path.exists(gate):
        if time.monotonic() > deadline:
            sys.exit(f"gate {gate} never opened")
        time.sleep(0.05)
    trainer.fit(model, DataLoader(data, batch_size=BATCH, shuffle=True))
    say(
        event="done", pid=os.getpid(), strategy=type(trainer.strategy).__name__,
        left=bool(getattr(trainer.strategy, "left", False)), global_step=trainer.global_step,
        epochs_completed=trainer.current_epoch, final_loss=full_loss(model, data),
        params=digest(model.parameters()), switches=getattr(trainer.strategy, "events", []),
    )


if __name__ == "__main__":
    main()
