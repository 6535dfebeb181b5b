"""One training process for ``benchmarks/heterogeneity.py``: a small outside-style
Lightning project (an MLP classifier with Adam on synthetic data) with
``Trainer(strategy="chaos")``, whose per-sample compute dominates its step.

    python benchmarks/_hetero_worker.py --batch B --epochs E [--samples N] [--inputs I] [--hidden H] [--layers L]

The model and its ``say`` lines are ``benchmarks/_fit_worker.py``'s
(:class:`MLP`: the end of each ``optimizer_step`` stamped); the data set is
wide in samples and narrow in features (64 inputs, a 2048-sample batch per
process), so one step's compute (forward, backward and the collation of its
samples) grows with its samples and its fixed costs (Adam over 0.3 M
parameters, the all-reduce, Lightning's hooks) stay a small part: a member
given half the samples takes about half the time, which is what the shares
are about.  The distributed side comes from the environment (``CHAOS_*``, as
a user sets it); the driver sets ``CHAOS_RECORD_SAMPLES=1`` so that the
sample ledger is kept.

Lines on stdout (``time.monotonic()`` stamps, one clock for the host):

``ready``
    imports done, data and model built, Adam's first construction paid
    (its constructor imports ``torch._dynamo``: seconds of CPU a slowed
    node would otherwise spend inside ``fit``).
``step``
    one per training batch: ``gs`` (global step after it), ``world``,
    ``n`` (samples this process trained in it), ``t0``/``t1`` (batch start,
    end of ``optimizer_step``), ``cpu`` (process CPU time at ``t1``).
``done``
    ``fit`` returned: ``global_step``, digests of the parameters and of
    Adam's state (equal on every replica), and per epoch the ledger's
    verdict (``missing``, ``duplicated``, ``strangers`` counts; exact cover
    when all are 0).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import chaos_lightning  # noqa: E402,F401  (registers "chaos")
import lightning.pytorch as pl  # noqa: E402
import torch  # noqa: E402
from torch.utils.data import DataLoader, TensorDataset  # noqa: E402

from _fit_worker import MLP, say  # noqa: E402
from chaos_lightning.scenario.workload import digest  # noqa: E402


class Steps(pl.Callback):
    """Prints a ``step`` line per training batch, with the samples it held."""

    def __init__(self) -> None:
        self.t0 = 0.0
        self.n = 0
        self.world = 0

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any, batch_idx: int) -> None:
        self.t0 = time.monotonic()
        self.n = len(batch[0])
        self.world = trainer.world_size

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, *args: Any) -> None:
        print(json.dumps({"event": "step", "gs": trainer.global_step, "world": self.world, "n": self.n,
                          "t0": self.t0, "t1": pl_module.t_updated, "cpu": pl_module.cpu_updated}), flush=True)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--batch", type=int, required=True, help="per-process batch (the equal share)")
    p.add_argument("--epochs", type=int, required=True)
    p.add_argument("--samples", type=int, default=65536)
    p.add_argument("--inputs", type=int, default=64)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--layers", type=int, default=2)
    p.add_argument("--classes", type=int, default=10)
    args = p.parse_args()

    torch.set_num_threads(1)
    pl.seed_everything(0, workers=False, verbose=False)
    g = torch.Generator().manual_seed(0)
    x = torch.randn(args.samples, args.inputs, generator=g)
    y = torch.randint(0, args.classes, (args.samples,), generator=g)
    model = MLP(args.inputs, args.hidden, args.layers, args.classes)
    torch.optim.Adam([torch.nn.Parameter(torch.zeros(1))])  # pay Adam's first-use imports before the CPU limit
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=1, max_epochs=args.epochs, logger=False, callbacks=[Steps()],
        enable_checkpointing=False, enable_progress_bar=False, enable_model_summary=False,
    )
    say("ready", pid=os.getpid(), params=sum(p.numel() for p in model.parameters()))
    trainer.fit(model, DataLoader(TensorDataset(x, y), batch_size=args.batch, shuffle=True))
    opt = trainer.optimizers[0]
    ledger = trainer.strategy.ledger
    epochs = {}
    for e in ledger.epochs() if ledger is not None else []:
        epochs[str(e)] = {"missing": len(ledger.missing(e)), "duplicated": len(ledger.duplicates(e)),
                          "strangers": len(ledger.strangers(e))}
    say("done", pid=os.getpid(), global_step=trainer.global_step, params=digest(list(model.parameters())),
        optim=digest([v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]), epochs=epochs)


if __name__ == "__main__":
    main()
