"""A small outside-style Fabric project for test_fabric.py.

Written the way a Fabric user writes a loop: ``fabric.launch()``,
``fabric.setup`` with an LR scheduler, ``setup_dataloaders`` for a training
and a validation loader, ``fabric.backward``, gradient clipping, gradient
accumulation under ``no_backward_sync``, ``fabric.all_reduce`` of a metric
and ``fabric.all_gather`` of the ranks,
plus ``import chaos_lightning``, ``strategy="chaos"`` and the two chaos
rules: loop over ``fabric.strategy.epochs(E)`` and step the scheduler only
when ``fabric.strategy.step_applied``.

Prints JSON lines: ``ready``, each ``step`` (global step, world, applied),
each ``val`` (global step, the reduced loss, the gathered ranks), and ``done`` with what the test
compares across replicas: parameter, optimizer and scheduler digests, the
global step, the sample ledger.

argv: samples, epochs, seconds each step sleeps, accumulate (batches per step),
and optionally a root dir for a ``CSVLogger`` that ``fabric.log_dict`` writes
the loss to at every applied step (finalized at the end, as users do).
"""

from __future__ import annotations

import logging
import os
import sys
import time

import chaos_lightning  # noqa: F401  (registers strategy="chaos" for Fabric)
import torch
from lightning.fabric import Fabric
from lightning.fabric.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from _train_worker import digest
from _say import say  # one whole line per record (tests/_say.py)


def tensors(n: int, seed: int) -> TensorDataset:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, 6, generator=g)
    return TensorDataset(x, x.sum(1, keepdim=True))


def main() -> None:
    n, epochs, sleep, accumulate = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), int(sys.argv[4])
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    loggers = [CSVLogger(sys.argv[5], name="csv", flush_logs_every_n_steps=5)] if len(sys.argv) > 5 else []
    fabric = Fabric(strategy="chaos", accelerator="cpu", devices=int(os.environ.get("CHAOS_TEST_DEVICES", 1)),
                    loggers=loggers)
    fabric.launch()
    fabric.seed_everything(0)
    model = nn.Sequential(nn.Linear(6, 16), nn.Tanh(), nn.Linear(16, 1))
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-2)
    scheduler = torch.optim.lr_scheduler.StepLR(optimizer, step_size=7, gamma=0.9)
    model, optimizer, scheduler = fabric.setup(model, optimizer, scheduler=scheduler)
    train, val = fabric.setup_dataloaders(
        DataLoader(tensors(n, 0), batch_size=8, shuffle=True), DataLoader(tensors(32, 1), batch_size=16)
    )
    say(event="ready", pid=os.getpid())
    chaos = fabric.strategy
    for epoch in chaos.epochs(epochs):
        model.train()
        for i, (x, y) in enumerate(train):
            stepping = (i + 1) % accumulate == 0 or i + 1 == len(train)  # the epoch's last batch closes a window
            with fabric.no_backward_sync(model, enabled=not stepping):
                loss = nn.functional.mse_loss(model(x), y)
                fabric.backward(loss / accumulate)
                time.sleep(len(x) * float(os.environ.get("CHAOS_TEST_SAMPLE_SLEEP", 0)))  # this node's speed
                if chaos.step_downs == 0:  # slow for a while: until this node has stepped down once
                    time.sleep(float(os.environ.get("CHAOS_TEST_SLOW_UNTIL_BACK", 0)))
            if not stepping:
                continue
            fabric.clip_gradients(model, optimizer, max_norm=5.0)
            optimizer.step()
            optimizer.zero_grad()
            if chaos.step_applied:
                scheduler.step()
                fabric.log_dict({"loss": float(loss)}, step=chaos.global_step)
            say(event="step", step=chaos.global_step, world=fabric.world_size, applied=chaos.step_applied, pid=os.getpid(),
                epoch=epoch)
            time.sleep(sleep)
        model.eval()
        with torch.no_grad():
            total = sum(nn.functional.mse_loss(model(x), y, reduction="sum") for x, y in val)
        ranks = fabric.all_gather(torch.tensor(float(fabric.global_rank)))
        say(event="val", step=chaos.global_step, epoch=epoch, loss=float(fabric.all_reduce(total, reduce_op="mean")),
            world=fabric.world_size, rank=fabric.global_rank, ranks=ranks.flatten().tolist())
    for logger in fabric.loggers:
        logger.finalize("success")
    ledger = chaos.ledger
    say(
        event="done", pid=os.getpid(), global_step=chaos.global_step, left=chaos.left,
        params=digest(model.parameters()),
        optim=digest(v for st in optimizer.state.values() for v in st.values() if torch.is_tensor(v)),
        scheduler=scheduler.state_dict()["last_epoch"],
        epochs={str(e): sorted(ledger.counts(e).items()) for e in range(epochs)}, switches=chaos.events,
    )


if __name__ == "__main__":
    main()
