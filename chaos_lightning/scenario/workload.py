"""The scenarios' training job: plain Lightning with ``strategy="chaos"``.

``python -m chaos_lightning.scenario.workload --run-dir RUN --name n0 [options]``

An MLP regression on synthetic data (seeded, no downloads), trained for as
many epochs as the scenario lasts.  Each training step sleeps ``--step-sleep``
seconds, standing in for the compute of a bigger model, so that a handful of
nodes on a 2-core machine do not just fight over the CPU.  The strategy
writes this node's trace (``CHAOS_TRACE``, set by the runner).

Validation and checkpoints are opt-in (off by default, so a scenario without
them runs the loop it always ran): ``--val-every N`` validates every N
training batches (``val_check_interval=N``, counted over the whole run, not
per epoch) on a small held-out set, ``VAL_BATCHES`` batches per node whatever
the world, each sleeping ``--val-sleep`` seconds; ``--ckpt-every N`` saves a
checkpoint every N global steps into ``RUN/ckpt`` (``ModelCheckpoint``, the
latest one kept).  The node's trace then also holds ``val_start``/``val_end``
around each validation and ``ckpt_start``/``ckpt_end`` around each save, so
a report can tell what the cluster was doing at an event
(:mod:`chaos_lightning.scenario.report`).

Ending a run: all replicas must stop at the same global step, or the last
collective would wait for those that stopped.  The runner writes a step
number into ``RUN/stop``; every node stops when its global step reaches it
(the runner picks one ahead of every node's step).

While it trains, the node keeps its sample ledger on disk too
(``RUN/ledger/<name>-<pid>/<epoch>.txt``, rewritten at most once a second
and at the end): one digit per sample, how many times this process's
committed steps trained it (9 for 9 or more).  A process killed by the
scenario leaves its ledger up to its last second, so the check of exactly
once can cover every epoch, also those that no finishing node trained
through (:func:`chaos_lightning.scenario.runner.check_invariants`).

On exit the node writes ``RUN/done/<name>.json``: its global step, a digest of
its parameters and optimizer state (equal on every replica) and its sample
ledger (how many times each sample was trained in each epoch, as far as this
node saw the epoch).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import os
import time
from pathlib import Path

import torch
from torch.utils.data import DataLoader, Dataset, TensorDataset

import chaos_lightning  # noqa: F401  (registers strategy="chaos")
import lightning.pytorch as pl
from lightning.pytorch.callbacks import ModelCheckpoint

#: validation batches per node (``limit_val_batches``): the same at any world
#: size, so a validation lasts about ``VAL_BATCHES * val_sleep`` everywhere
VAL_BATCHES = 4
#: held-out samples, in batches: enough for ``VAL_BATCHES`` per node at up to 16 nodes
VAL_SET_BATCHES = 16 * VAL_BATCHES


class Synthetic(Dataset):
    """``n`` samples ``x ~ N(0, 1)^d`` with ``y = tanh(x W1) w2`` plus noise."""

    def __init__(self, n: int, dim: int = 32) -> None:
        g = torch.Generator().manual_seed(0)
        self.x = torch.randn(n, dim, generator=g)
        w1, w2 = torch.randn(dim, 16, generator=g), torch.randn(16, 1, generator=g)
        self.y = torch.tanh(self.x @ w1) @ w2 + 0.1 * torch.randn(n, 1, generator=g)
        self._w = (w1, w2)

    def held_out(self, n: int) -> TensorDataset:
        """``n`` other samples of the same function (their own seed: the training set is unchanged)."""
        g = torch.Generator().manual_seed(1)
        w1, w2 = self._w
        x = torch.randn(n, w1.shape[0], generator=g)
        return TensorDataset(x, torch.tanh(x @ w1) @ w2 + 0.1 * torch.randn(n, 1, generator=g))

    def __len__(self) -> int:
        return len(self.x)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        return self.x[i], self.y[i]


class MLP(pl.LightningModule):
    def __init__(self, dim: int = 32, hidden: int = 256, step_sleep: float = 0.05, lr: float = 1e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.net = torch.nn.Sequential(
            torch.nn.Linear(dim, hidden), torch.nn.ReLU(), torch.nn.Linear(hidden, hidden), torch.nn.ReLU(),
            torch.nn.Linear(hidden, 1),
        )

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        x, y = batch
        time.sleep(self.hparams.step_sleep)
        loss = torch.nn.functional.mse_loss(self.net(x), y)
        self.log("train_loss", loss, on_step=False, on_epoch=True, sync_dist=True)
        return loss

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.Adam(self.parameters(), lr=self.hparams.lr)


class ValidatedMLP(MLP):
    """The MLP with a validation step: ``val_sleep`` seconds of stand-in work
    per batch, and the loss reduced over the current members (``sync_dist``:
    a collective outside the training step, as in a real project)."""

    def __init__(self, val_sleep: float = 0.0, **kwargs: object) -> None:
        super().__init__(**kwargs)
        self.val_sleep = val_sleep

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        x, y = batch
        time.sleep(self.val_sleep)
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), on_epoch=True, sync_dist=True,
                 batch_size=len(x))


class ValidationMarks(pl.Callback):
    """``val_start``/``val_end`` in the node's trace around each validation."""

    def on_validation_start(self, trainer: pl.Trainer, *args: object) -> None:
        if not trainer.sanity_checking:
            trainer.strategy.trace.emit("val_start", step=trainer.global_step, world=trainer.world_size)

    def on_validation_end(self, trainer: pl.Trainer, *args: object) -> None:
        if not trainer.sanity_checking:
            trainer.strategy.trace.emit("val_end", step=trainer.global_step)


class MarkedCheckpoint(ModelCheckpoint):
    """``ModelCheckpoint`` with ``ckpt_start``/``ckpt_end`` in the node's trace
    around each save (every rank: rank 0 writes, the others wait in the
    save's barrier)."""

    def _save_checkpoint(self, trainer: pl.Trainer, filepath: str) -> None:
        trace = trainer.strategy.trace
        trace.emit("ckpt_start", step=trainer.global_step)
        ok = False
        try:
            super()._save_checkpoint(trainer, filepath)
            ok = True
        finally:
            trace.emit("ckpt_end", step=trainer.global_step, ok=ok)


class StopAtStep(pl.Callback):
    """Stops fit once the global step reaches the number in ``path`` (when it exists)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.at: int | None = None

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        if self.at is None and self.path.exists():
            text = self.path.read_text().strip()
            if text.isdigit():
                self.at = int(text)
        if self.at is not None and trainer.global_step >= self.at:
            trainer.should_stop = True


class LedgerDump(pl.Callback):
    """Writes the strategy's sample ledger under ``root`` (module docstring),
    at most every ``every_s`` seconds and when fit ends; only the epochs that
    changed (a replica that took the members' state forgets its records of
    the current epoch: those files go)."""

    def __init__(self, root: Path, every_s: float = 1.0) -> None:
        self.root = root
        self.every_s = every_s
        self._next = 0.0
        self._written: dict[int, tuple[int, str, int]] = {}  # epoch -> (samples, digits, strangers) last written

    def dump(self, trainer: pl.Trainer) -> None:
        ledger = getattr(trainer.strategy, "ledger", None)
        if ledger is None:
            return
        epochs = ledger.epochs()
        self.root.mkdir(parents=True, exist_ok=True)
        for e in [e for e in self._written if e not in epochs]:
            (self.root / f"{e}.txt").unlink(missing_ok=True)
            del self._written[e]
        for e in epochs:
            counts = ledger.counts(e)
            total = sum(counts.values())
            if self._written.get(e, (None,))[0] == total and e < epochs[-1] - 1:
                continue  # an old epoch, unchanged (the last two are compared whole: a forget may keep the total)
            n = ledger.num_samples
            digits = "".join(str(min(counts.get(i, 0), 9)) for i in range(n))
            strangers = sum(1 for i in counts if not 0 <= i < n)
            if self._written.get(e) == (total, digits, strangers):
                continue
            tmp = self.root / f".{e}.tmp"
            tmp.write_text(f"{digits}\n{strangers}\n")
            os.replace(tmp, self.root / f"{e}.txt")
            self._written[e] = (total, digits, strangers)

    def on_train_batch_end(self, trainer: pl.Trainer, *args: object) -> None:
        now = time.monotonic()
        if now >= self._next:
            self._next = now + self.every_s
            self.dump(trainer)

    def on_train_end(self, trainer: pl.Trainer, *args: object) -> None:
        self.dump(trainer)


def digest(tensors: list[torch.Tensor]) -> str:
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:16]


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos_lightning.scenario.workload", description=__doc__.split("\n\n")[0])
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--name", required=True, help="this node's name in the scenario")
    p.add_argument("--samples", type=int, default=4096, help="training samples per epoch")
    p.add_argument("--batch-size", type=int, default=16, help="per-node batch size")
    p.add_argument("--hidden", type=int, default=256, help="hidden width (the state grows with its square)")
    p.add_argument("--step-sleep", type=float, default=0.05, help="seconds of stand-in compute per step")
    p.add_argument("--val-every", type=int, default=0, help="validate every N training batches (default 0: never)")
    p.add_argument("--val-sleep", type=float, default=0.0, help="seconds of stand-in work per validation batch")
    p.add_argument("--ckpt-every", type=int, default=0, help="save a checkpoint every N global steps (default 0: never)")
    p.add_argument("--allow-fault-injection", action="store_true",
                   help="serve the runner's link-cut requests (loopback scenarios; off in production)")
    args = p.parse_args(argv)

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=False, verbose=False)
    if args.allow_fault_injection:
        from chaos_lightning.agent import enable_fault_injection

        enable_fault_injection()  # the agent the strategy builds serves LinkFault
    callbacks: list[pl.Callback] = [StopAtStep(args.run_dir / "stop"),
                                    LedgerDump(args.run_dir / "ledger" / f"{args.name}-{os.getpid()}")]
    options: dict[str, object] = {}
    data = Synthetic(args.samples)
    loaders: dict[str, DataLoader] = {"train_dataloaders": DataLoader(data, batch_size=args.batch_size, shuffle=True)}
    if args.val_every > 0:
        model: MLP = ValidatedMLP(hidden=args.hidden, step_sleep=args.step_sleep, val_sleep=args.val_sleep)
        # every N batches of the whole run (check_val_every_n_epoch=None): an
        # epoch's length follows the world, so a per-epoch count could exceed it
        options.update(val_check_interval=args.val_every, check_val_every_n_epoch=None, num_sanity_val_steps=0,
                       limit_val_batches=VAL_BATCHES)
        loaders["val_dataloaders"] = DataLoader(data.held_out(VAL_SET_BATCHES * args.batch_size), batch_size=args.batch_size)
        callbacks.append(ValidationMarks())
    else:
        model = MLP(hidden=args.hidden, step_sleep=args.step_sleep)
    if args.ckpt_every > 0:
        # the latest checkpoint only (save_top_k=1, no monitor): a scenario
        # saves often, and every save replaces the one before
        callbacks.append(MarkedCheckpoint(args.run_dir / "ckpt", "{step}", every_n_train_steps=args.ckpt_every,
                                          save_top_k=1))
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=1, max_epochs=-1, logger=False,
        enable_checkpointing=args.ckpt_every > 0, enable_progress_bar=False, enable_model_summary=False,
        callbacks=callbacks, **options,
    )
    trainer.fit(model, **loaders)

    strategy = trainer.strategy
    for cb in trainer.callbacks:
        if isinstance(cb, LedgerDump):
            cb.dump(trainer)  # the last steps (on_train_end may not run when fit ends early)
    opt = trainer.optimizers[0]
    ledger = strategy.ledger
    summary = {
        "name": args.name,
        "pid": os.getpid(),
        "global_step": trainer.global_step,
        "left": strategy.left,
        "params": digest(list(model.parameters())),
        "optim": digest([v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]),
        "samples_per_epoch": args.samples,
        # per epoch: samples trained once, more than once, never (as this node saw it)
        "epochs": {
            str(e): {"once": sum(1 for n in ledger.counts(e).values() if n == 1), "duplicated": len(ledger.duplicates(e)),
                     "missing": len(ledger.missing(e)), "strangers": len(ledger.strangers(e))}
            for e in ledger.epochs()
        } if ledger else {},
    }
    done = args.run_dir / "done"
    done.mkdir(exist_ok=True)
    (done / f"{args.name}.json").write_text(json.dumps(summary))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
