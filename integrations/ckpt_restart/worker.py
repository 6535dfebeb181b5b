"""The training script torchrun runs for the checkpoint-restart baseline.

``torchrun ... -m chaos_lightning.integrations.ckpt_restart.worker --workdir W [options]``

The same Lightning job as the scenario workload
(:mod:`chaos_lightning.scenario.workload`: ``MLP(hidden, step_sleep)`` with
Adam on ``Synthetic(4096)``, 16 samples per process and step, one process per
node), but with Lightning's own ``strategy="ddp"`` (gloo; under torchrun
Lightning picks ``TorchElasticEnvironment``, so ranks and world come from the
agent), a ``ModelCheckpoint`` every ``--ckpt-every`` steps (``save_last``
only, no top-k copies) into ``W/ckpt`` and, on every start and restart,
``fit(ckpt_path="last")``: a fresh worker resumes from the latest checkpoint,
whatever it missed since is trained again.

Measurement: every process appends JSON lines to ``W/events/<node>.jsonl``
(``node`` from ``$CKPT_NODE``, set per agent by the benchmark; torchrun's
workers inherit the agent's environment), each with ``time.time()`` stamps:

``start``   the process's creation time (psutil), written after imports;
``built``   the model is built (the process is warm);
``resume``  ``on_train_start``: the checkpoint, if any, is loaded (``gs`` = its step);
``step``    the end of every training step (``gs`` global step, ``ws`` world size);
``error``   an exception escaped the step (a peer vanished): the process
            leaves at once with ``os._exit(1)``, as torchrun would make it
            do after its stop timeout anyway;
``sigterm`` torchrun's agent stops the worker for a new rendezvous round.

Two choices in the baseline's favour, both things a careful user of
torchrun would do (docs/baselines_ckpt_restart.md):

- **SIGTERM leaves at once.**  Lightning's own SIGTERM handler
  (``_SignalConnector._sigterm_notifier_fn``) runs a ``dist.broadcast``
  inside the signal handler; the agents stop their workers at different
  moments, so the ranks issue mismatched collectives and hang until the
  process-group timeout (seen: every survivor stuck 30 s, then the agent's
  30 s stop timeout, on each join).  From ``on_train_start`` on, the worker's
  SIGTERM handler is ``os._exit(143)``.  Nothing is lost by that: a step in
  flight never counted, and there is no save-on-exit either way.
- **Atomic checkpoints.**  ``last.ckpt`` is written to a temporary file in
  the same folder and renamed over it (:class:`AtomicCheckpointIO`), so a
  SIGTERM or SIGKILL in the middle of a save leaves the previous checkpoint
  intact (Lightning writes the file in place).

The DDP process-group timeout is short (``--pg-timeout``, default 30 s) so a
rank stuck in a gloo receive from a killed peer cannot hold the restart for
Lightning's default 30 minutes.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import time
import warnings
from datetime import timedelta
from pathlib import Path


def process_start() -> float:
    """This process's creation, wall clock, to ~10 ms.

    psutil's ``create_time`` adds the start tick to ``/proc/stat``'s boot time,
    which is whole seconds: up to 1 s off against ``time.time()``.  Instead:
    now minus the process's age (``CLOCK_BOOTTIME`` minus its start tick).
    """
    try:
        fields = Path("/proc/self/stat").read_text().rsplit(")", 1)[1].split()
        started = int(fields[19]) / os.sysconf("SC_CLK_TCK")  # field 22 (starttime), counted after "pid (comm)"
        return time.time() - (time.clock_gettime(time.CLOCK_BOOTTIME) - started)
    except (OSError, ValueError, IndexError, AttributeError):
        return time.time()


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m chaos_lightning.integrations.ckpt_restart.worker",
                                description=__doc__.split("\n\n")[0])
    p.add_argument("--workdir", type=Path, required=True, help="checkpoints in W/ckpt, events in W/events")
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--step-sleep", type=float, default=0.05)
    p.add_argument("--samples", type=int, default=4096)
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--ckpt-every", type=int, default=10, help="save last.ckpt every N training steps")
    p.add_argument("--pg-timeout", type=float, default=30.0, help="seconds; bounds every gloo collective")
    args = p.parse_args(argv)

    import torch
    from torch.utils.data import DataLoader

    import lightning.pytorch as pl
    from lightning.fabric.plugins.io.torch_io import TorchCheckpointIO
    from lightning.pytorch.callbacks import ModelCheckpoint
    from lightning.pytorch.strategies import DDPStrategy

    from chaos_lightning.scenario.workload import MLP, Synthetic

    node = os.environ.get("CKPT_NODE", f"pid{os.getpid()}")
    events_dir = args.workdir / "events"
    events_dir.mkdir(parents=True, exist_ok=True)
    out = open(events_dir / f"{node}.jsonl", "a", buffering=1)  # noqa: SIM115 (open for the process's life)

    def emit(ev: str, t: float | None = None, **kw: object) -> None:
        rec = {"ev": ev, "t": time.time() if t is None else t, "node": node, "pid": os.getpid(),
               "restart": int(os.environ.get("TORCHELASTIC_RESTART_COUNT", "0")), **kw}
        out.write(json.dumps(rec) + "\n")
        out.flush()

    emit("start", t=process_start(), imported=time.time())

    logging.getLogger("lightning").setLevel(logging.WARNING)
    logging.getLogger("lightning.pytorch").setLevel(logging.WARNING)
    warnings.filterwarnings("ignore")
    torch.set_num_threads(1)
    pl.seed_everything(0, workers=False, verbose=False)
    model = MLP(hidden=args.hidden, step_sleep=args.step_sleep)
    emit("built")

    class Stamps(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            emit("resume", gs=trainer.global_step, ws=trainer.world_size, rank=trainer.global_rank)

        def on_train_batch_end(self, trainer: pl.Trainer, *a: object) -> None:
            emit("step", gs=trainer.global_step, ws=trainer.world_size)

        def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exc: BaseException) -> None:
            emit("error", gs=trainer.global_step, error=f"{type(exc).__name__}: {exc}"[:300])
            out.close()
            os._exit(1)

    class AtomicCheckpointIO(TorchCheckpointIO):
        """Write to ``.<pid>.part`` beside the target, then rename over it (the name holds no "last")."""

        def save_checkpoint(self, checkpoint: dict, path: object, storage_options: object = None) -> None:
            path = Path(str(path))
            tmp = path.parent / f".{os.getpid()}.part"
            super().save_checkpoint(checkpoint, tmp, storage_options)
            os.replace(tmp, path)

    def leave_on_sigterm(signum: int, frame: object) -> None:
        emit("sigterm")
        os._exit(143)

    class LeaveOnSigterm(pl.Callback):
        def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
            signal.signal(signal.SIGTERM, leave_on_sigterm)

    world = int(os.environ.get("WORLD_SIZE", "1"))
    ckpt = ModelCheckpoint(dirpath=args.workdir / "ckpt", every_n_train_steps=args.ckpt_every, save_last=True,
                           save_top_k=0, save_on_train_epoch_end=False)
    trainer = pl.Trainer(
        strategy=DDPStrategy(process_group_backend="gloo", timeout=timedelta(seconds=args.pg_timeout)),
        accelerator="cpu", devices=1, num_nodes=world, max_epochs=-1, logger=False,
        enable_progress_bar=False, enable_model_summary=False, callbacks=[Stamps(), LeaveOnSigterm(), ckpt],
        plugins=[AtomicCheckpointIO()],
        default_root_dir=args.workdir,
    )
    loader = DataLoader(Synthetic(args.samples), batch_size=args.batch_size, shuffle=True)
    trainer.fit(model, loader, ckpt_path="last")
    out.close()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
