"""One training process for test_strategy.py: an unmodified-style Lightning
module on synthetic data with ``Trainer(strategy="chaos")``; prints JSON lines
(ready, per-step progress, final hashes and the sample ledger).

Opt-in extras, by environment: ``CHAOS_TEST_VAL=V`` adds a validation set of
V samples whose ``sync_dist`` metrics are reported (event "val"), each
validation step sleeping ``CHAOS_TEST_VAL_SLEEP`` seconds;
``CHAOS_TEST_SCHED=1`` adds a StepLR scheduler and ``ScaleLRWithWorld``;
``CHAOS_TEST_CKPT_DIR`` + ``CHAOS_TEST_CKPT_EVERY=k`` save a checkpoint every
k steps (and report the ledger at step k, event "ledger_at");
``CHAOS_TEST_RESUME=path`` fits from that checkpoint; ``CHAOS_TEST_ACCUM=k``
and ``CHAOS_TEST_CLIP=v`` set gradient accumulation and clipping;
``CHAOS_TEST_HIDDEN=h`` widens the model (a bigger state to transfer) and
``CHAOS_TEST_SERVE_BPS=r`` makes this node serve joiners at most r bytes/s;
``CHAOS_TEST_PAUSE=s:t`` makes this node sleep t seconds in a user callback
after global step s (a slow checkpoint write: the agent thread keeps
answering, so nobody evicts it; event "paused" when it resumes);
``CHAOS_TEST_SAMPLE_SLEEP=t`` adds t seconds per sample of each training
batch (a node of that speed: the adaptive shares' test);
``CHAOS_TEST_SLOW_UNTIL_BACK=t`` adds t seconds to each training step until
this node has stepped down once (a straggler for a while: the step-down test);
``CHAOS_TEST_HOLD=s:path`` holds this node after global step s (event
"holding") until ``path`` exists, at most 30 s (a test that signals the
process then knows where its fit stands);
``CHAOS_TEST_NO_SERVE=1`` closes this node's shard server once training
starts (a joiner's pull from it fails: connection refused);
``CHAOS_TEST_VAL_EVERY=k`` validates every k batches (with ``CHAOS_TEST_VAL``);
``CHAOS_TEST_CLAMP=c`` clamps every parameter to [-c, c] after each batch, as
a WGAN critic does (parameters changed outside ``optimizer.step``);
``CHAOS_TEST_CSV=dir`` logs to a ``CSVLogger`` in ``dir`` every step;
``CHAOS_TEST_SIGTERM_AT=s`` makes this node send itself SIGTERM inside its
first training step after global step s (before the step's reduction: a
scheduler's SIGTERM landing mid-step)."""

from __future__ import annotations

import gc
import hashlib
import logging
import os
import signal
import sys
import time

import chaos_lightning  # registers "chaos"
import lightning.pytorch as pl
import torch
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch.utils.data import DataLoader, Dataset
from _say import say  # one whole line per record (tests/_say.py)


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
    def __init__(self, step_sleep: float, scheduler: bool = False, hidden: int = 16):
        super().__init__()
        self.net = torch.nn.Sequential(torch.nn.Linear(8, hidden), torch.nn.Tanh(), torch.nn.Linear(hidden, 1))
        self.step_sleep = step_sleep
        self.scheduler = scheduler

    def training_step(self, batch, batch_idx):
        x, y = batch
        time.sleep(self.step_sleep)  # make steps long enough to kill a peer mid-step
        time.sleep(len(x) * float(os.environ.get("CHAOS_TEST_SAMPLE_SLEEP", 0)))
        if self.trainer.strategy.step_downs == 0:  # slow until this node has once stepped down
            time.sleep(float(os.environ.get("CHAOS_TEST_SLOW_UNTIL_BACK", 0)))
        term_at = os.environ.get("CHAOS_TEST_SIGTERM_AT")
        if term_at and self.trainer.global_step >= int(term_at) and not getattr(self, "_termed", False):
            self._termed = True
            say(event="sigterm", step=self.trainer.global_step)
            os.kill(os.getpid(), signal.SIGTERM)
        return torch.nn.functional.mse_loss(self.net(x), y)

    def on_train_batch_end(self, outputs, batch, batch_idx):
        clamp = os.environ.get("CHAOS_TEST_CLAMP")
        if clamp:
            with torch.no_grad():
                for p in self.parameters():
                    p.clamp_(-float(clamp), float(clamp))
        lr = self.trainer.optimizers[0].param_groups[0]["lr"]
        say(
            event="step", step=self.trainer.global_step, world=self.trainer.world_size, pid=os.getpid(), lr=lr,
            epoch=self.current_epoch, batch=batch_idx, n=len(batch[0]),
        )

    def configure_optimizers(self):
        opt = torch.optim.Adam(self.parameters(), lr=1e-2)
        if not self.scheduler:
            return opt
        sched = torch.optim.lr_scheduler.StepLR(opt, step_size=7, gamma=0.9)
        return {"optimizer": opt, "lr_scheduler": {"scheduler": sched, "interval": "step"}}


class Validated(Regressor):
    """Validation: every rank counts the samples it evaluated; ``sync_dist``
    sums the counts over the current members; ``all_gather`` collects the
    ranks (the last step's gather is reported)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        from torchmetrics.aggregation import SumMetric

        # a torchmetrics metric syncs its states itself at compute (its own
        # all_gather unless the strategy routes it): the samples evaluated
        self.evaluated = SumMetric()

    def on_validation_start(self):
        if not self.trainer.sanity_checking:
            say(event="val_start", epoch=self.current_epoch, world=self.trainer.world_size)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        time.sleep(float(os.environ.get("CHAOS_TEST_VAL_SLEEP", 0)))
        self.log("val_count", float(len(x)), reduce_fx="sum", sync_dist=True, on_epoch=True, batch_size=1)
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y), sync_dist=True, batch_size=len(x))
        self.evaluated.update(torch.tensor(float(len(x))))
        self.log("val_metric", self.evaluated, on_epoch=True, batch_size=1)
        self.ranks = self.all_gather(torch.tensor(float(self.global_rank))).flatten().tolist()

    def on_validation_epoch_end(self):
        metrics = self.trainer.callback_metrics
        if "val_count" in metrics and not self.trainer.sanity_checking:
            say(event="val", epoch=self.current_epoch, world=self.trainer.world_size, count=float(metrics["val_count"]),
                metric=float(metrics["val_metric"]), ranks=self.ranks)


class LedgerAt(pl.Callback):
    """Reports which samples epoch 0 had committed at global step ``step``."""

    def __init__(self, step: int):
        self.step = step

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            say(event="ledger_at", step=self.step, counts=sorted(trainer.strategy.ledger.counts(0).items()))


def digest(tensors) -> str:
    """The tensors' exact bytes, any dtype (bfloat16 too: numpy has none, so as raw bytes)."""
    h = hashlib.sha256()
    for t in tensors:
        h.update(t.detach().contiguous().reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()[:16]


def main() -> None:
    n, epochs, sleep = int(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3])
    # chaos_lightning's INFO lines (views, switches, stalls) go to the node's
    # log file, which a failing test names
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(levelname)s %(message)s")
    logging.getLogger("lightning").setLevel(logging.WARNING)
    pl.seed_everything(0, workers=False)
    env = os.environ
    val = int(env.get("CHAOS_TEST_VAL", 0))
    sched = env.get("CHAOS_TEST_SCHED") == "1"
    model = (Validated if val else Regressor)(sleep, scheduler=sched, hidden=int(env.get("CHAOS_TEST_HIDDEN", 16)))
    callbacks: list[pl.Callback] = []
    if sched:
        callbacks.append(chaos_lightning.ScaleLRWithWorld("sqrt"))
    if env.get("CHAOS_TEST_CKPT_DIR"):
        every = int(env["CHAOS_TEST_CKPT_EVERY"])
        callbacks.append(ModelCheckpoint(env["CHAOS_TEST_CKPT_DIR"], "{step}", every_n_train_steps=every, save_top_k=-1))
        callbacks.append(LedgerAt(every))
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=int(env.get("CHAOS_TEST_DEVICES", 1)), max_epochs=epochs,
        logger=CSVLogger(env["CHAOS_TEST_CSV"], name="run") if env.get("CHAOS_TEST_CSV") else False,
        log_every_n_steps=1 if env.get("CHAOS_TEST_CSV") else 50, callbacks=callbacks,
        enable_checkpointing=bool(env.get("CHAOS_TEST_CKPT_DIR")), enable_progress_bar=False,
        enable_model_summary=False, num_sanity_val_steps=0,
        accumulate_grad_batches=int(env.get("CHAOS_TEST_ACCUM", 1)),
        gradient_clip_val=float(env["CHAOS_TEST_CLIP"]) if env.get("CHAOS_TEST_CLIP") else None,
        val_check_interval=int(env["CHAOS_TEST_VAL_EVERY"]) if env.get("CHAOS_TEST_VAL_EVERY") else None,
    )
    if env.get("CHAOS_TEST_SERVE_BPS"):
        # fault injector: this node serves state to joiners at most this fast
        class SlowServe(pl.Callback):
            def setup(self, trainer, pl_module, stage):
                trainer.strategy.shard_server.slow_down(float(env["CHAOS_TEST_SERVE_BPS"]))

        trainer.callbacks.append(SlowServe())
    if env.get("CHAOS_TEST_PAUSE"):
        at, seconds = env["CHAOS_TEST_PAUSE"].split(":")

        class Pause(pl.Callback):
            done = False

            def on_train_batch_end(self, trainer, *args):
                if not self.done and trainer.global_step >= int(at):
                    self.done = True
                    t0 = time.monotonic()
                    time.sleep(float(seconds))
                    say(event="paused", step=trainer.global_step, seconds=time.monotonic() - t0)

        trainer.callbacks.append(Pause())
    if env.get("CHAOS_TEST_HOLD"):
        at, gate = env["CHAOS_TEST_HOLD"].split(":", 1)

        class Hold(pl.Callback):
            done = False

            def on_train_batch_end(self, trainer, *args):
                if not self.done and trainer.global_step >= int(at):
                    self.done = True
                    say(event="holding", step=trainer.global_step)
                    deadline = time.monotonic() + 30
                    while not os.path.exists(gate) and time.monotonic() < deadline:
                        time.sleep(0.005)

        trainer.callbacks.append(Hold())
    if env.get("CHAOS_TEST_NO_SERVE"):
        # fault injector: nothing listens at this node's shard address any more
        class NoServe(pl.Callback):
            def on_train_start(self, trainer, pl_module):
                trainer.strategy.shard_server.close()
                say(event="no_serve")

        trainer.callbacks.append(NoServe())
    say(event="ready", pid=os.getpid())
    loaders = {"train_dataloaders": DataLoader(Indexed(n), batch_size=4, shuffle=True)}
    if val:
        loaders["val_dataloaders"] = DataLoader(Indexed(val), batch_size=5)
    trainer.fit(model, **loaders, ckpt_path=env.get("CHAOS_TEST_RESUME"))
    strategy = trainer.strategy
    opt = trainer.optimizers[0]
    opt_tensors = [v for st in opt.state.values() for v in st.values() if torch.is_tensor(v)]
    ledger = strategy.ledger
    say(
        event="done", pid=os.getpid(), left=strategy.left, global_step=trainer.global_step,
        params=digest(model.parameters()), optim=digest(opt_tensors),
        epochs={str(e): sorted(ledger.counts(e).items()) for e in range(epochs)} if ledger else {},
        switches=strategy.events, lr=opt.param_groups[0]["lr"], frozen=gc.get_freeze_count(),
    )


if __name__ == "__main__":
    main()
