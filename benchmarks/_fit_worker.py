"""One training process for ``benchmarks/steady_state.py``.

Role in the whole: the benchmark compares ``strategy="chaos"`` with
Lightning's own ``strategy="ddp"`` and measures what membership events cost
the survivors; it needs the *same* training process under both strategies
and timestamps taken inside it.  This worker is that process: an MLP of a
few MB with Adam on a synthetic classification set, a per-process batch, and
one JSON line on stdout per thing the driver times.

    python benchmarks/_fit_worker.py --strategy chaos|ddp --max-steps N [--batch B] ...

Configuration of the distributed side comes from the environment, as a user
would set it: for ``chaos`` ``CHAOS_BIND``/``CHAOS_PEERS``/``CHAOS_MIN_NODES``;
for ``ddp`` (processes started externally, one per node) ``MASTER_ADDR``,
``MASTER_PORT``, ``NODE_RANK``, ``LOCAL_RANK=0`` (its presence is what makes
Lightning's ``LightningEnvironment`` treat the processes as launched by the
user), ``WORLD_SIZE`` and ``RANK``, with ``--nodes`` as ``num_nodes``.

Timestamps are ``time.monotonic()`` (``CLOCK_MONOTONIC``: one clock for every
process on the host, so the driver can compare them with its own).  Lines:

``ready``
    imports done, data and model built (before ``Trainer.fit``).
``fit_start``
    ``on_fit_start``: model, optimizer and strategy set up, training about to
    start; for ``chaos`` the warm node asks to join right after this (at
    ``on_train_start``, once the loaders exist).
``step``
    one per training batch: ``seq`` (this process's batch counter), ``gs``
    (global step), ``world`` (world size the batch was trained in), ``t0``
    (``on_train_batch_start``) and ``t1`` (the end of ``optimizer_step``: the
    update is applied, the chaos strategy's step boundary has not run yet,
    whatever the callbacks' order), so a view switch falls between ``t1`` of
    one batch and ``t0`` of the next; ``cpu``: the process's CPU time (all
    threads, ``time.process_time()``) at ``t1``.
``switch``
    each entry the chaos strategy appended to ``strategy.events`` (the join at
    train start, view switches with their ``stall_s``), with ``after_seq``: the
    batch at whose boundary it happened (-1: before the first batch).  An entry
    with ``failed_step`` true means batch ``after_seq`` applied no update.
``done``
    ``fit`` returned.
"""

from __future__ import annotations

import argparse
import json
import os
import time
from typing import Any

import chaos_lightning  # noqa: F401  (registers "chaos")
import lightning.pytorch as pl
import torch
from torch.utils.data import DataLoader, TensorDataset


def say(event: str, **kw: Any) -> None:
    """One JSON line on stdout, flushed (the driver reads it as it comes)."""
    print(json.dumps({"event": event, "t": time.monotonic(), **kw}), flush=True)


class MLP(pl.LightningModule):
    """``layers`` hidden layers of ``hidden`` units with ReLU, cross-entropy, Adam."""

    def __init__(self, inputs: int, hidden: int, layers: int, classes: int) -> None:
        super().__init__()
        self.t_updated = 0.0  # end of the last optimizer_step (monotonic)
        self.cpu_updated = 0.0  # this process's CPU time (all threads) then
        dims = [inputs] + [hidden] * layers
        blocks: list[torch.nn.Module] = []
        for a, b in zip(dims, dims[1:]):
            blocks += [torch.nn.Linear(a, b), torch.nn.ReLU()]
        self.net = torch.nn.Sequential(*blocks, torch.nn.Linear(dims[-1], classes))

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        return torch.nn.functional.cross_entropy(self.net(x), y)

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=1e-3)

    def optimizer_step(self, *args: Any, **kwargs: Any) -> None:
        super().optimizer_step(*args, **kwargs)
        self.t_updated = time.monotonic()
        self.cpu_updated = time.process_time()


class Stamps(pl.Callback):
    """Prints the ``fit_start``, ``step`` and ``switch`` lines.

    Only hooks whose timing does not depend on where the chaos strategy puts
    its own callback: batch ends are read from :attr:`MLP.t_updated`.
    """

    def __init__(self) -> None:
        self.seq = -1
        self.t0 = 0.0
        self.world = 0
        self.reported = 0

    def on_fit_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        say("fit_start", pid=os.getpid())

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        events = getattr(trainer.strategy, "events", [])
        for e in events[self.reported:]:
            say("switch", after_seq=self.seq, **e)
        self.reported = len(events)
        self.seq += 1
        self.world = trainer.world_size
        self.t0 = time.monotonic()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        print(json.dumps({"event": "step", "seq": self.seq, "gs": trainer.global_step, "world": self.world,
                          "t0": self.t0, "t1": pl_module.t_updated, "cpu": pl_module.cpu_updated}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--strategy", choices=("chaos", "ddp"), required=True)
    p.add_argument("--nodes", type=int, default=1, help="ddp: num_nodes (one process per node)")
    p.add_argument("--max-steps", type=int, required=True)
    p.add_argument("--batch", type=int, default=64, help="per-process batch size")
    p.add_argument("--samples", type=int, default=65536, help="synthetic data set size")
    p.add_argument("--inputs", type=int, default=256)
    p.add_argument("--hidden", type=int, default=768)
    p.add_argument("--layers", type=int, default=3)
    p.add_argument("--classes", type=int, default=10)
    p.add_argument("--threads", type=int, default=1,
                   help="torch intra-op threads; set OMP_NUM_THREADS alike, or Lightning's ddp launcher resets it")
    args = p.parse_args()

    torch.set_num_threads(args.threads)
    pl.seed_everything(0, workers=False, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, args.inputs, generator=g)
    y = torch.randint(0, args.classes, (args.samples,), generator=g)
    model = MLP(args.inputs, args.hidden, args.layers, args.classes)
    params = sum(p.numel() for p in model.parameters())
    trainer = pl.Trainer(
        strategy=args.strategy, accelerator="cpu", devices=1, num_nodes=args.nodes if args.strategy == "ddp" else 1,
        max_steps=args.max_steps, max_epochs=-1, logger=False, callbacks=[Stamps()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    say("ready", pid=os.getpid(), params=params)
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True))
    say("done", pid=os.getpid(), global_step=trainer.global_step)


if __name__ == "__main__":
    main()
