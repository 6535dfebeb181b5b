"""Every read or write of Lightning's private state, in one room.

Role in the whole: the twin of :mod:`._gloo_detach`.  Elastic training must
reach inside Lightning's loops where no hook exists: make the epoch as long
as the elastic sampler's remaining steps, give a newcomer the members' loop
progress, adopt the run's log and checkpoint folders, drop the SIGTERM
broadcast.  Those accesses are private API that may change in any Lightning
release, so they live here and nowhere else, and
``tests/test_lightning_internals.py`` pins them: it fails loudly on a
Lightning outside :data:`TESTED` and checks, on a real fit, that every
attribute listed in :data:`ATTRIBUTES` is where we write it.  At train start
the strategy runs :func:`missing` too and logs what a new Lightning moved.

Functions take the trainer and duck-type it, so one module serves
``lightning.pytorch`` and the standalone ``pytorch_lightning`` (the one
function needing a package import finds the trainer's own package).
"""

from __future__ import annotations

import importlib
from typing import Any

#: Lightning versions (major, minor) whose internals this module was tested
#: against, inclusive: 2.4 is the lowest ``pyproject.toml`` allows.
TESTED = ((2, 4), (2, 6))

#: The private paths we touch, from the trainer (for :func:`missing`).
ATTRIBUTES = (
    "fit_loop._combined_loader",
    "fit_loop._data_fetcher",
    "fit_loop.max_batches",
    "fit_loop.epoch_progress.current",
    "fit_loop.epoch_progress.total",
    "fit_loop.epoch_loop.restarting",
    "fit_loop.epoch_loop.batch_progress.current.ready",
    "fit_loop.epoch_loop.batch_progress.is_last_batch",
    "fit_loop.epoch_loop._batches_that_stepped",
    "fit_loop.epoch_loop._broadcast_sigterm_tensor",
    "fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total",
    "fit_loop.epoch_loop.val_loop._combined_loader",
    "val_check_batch",
)


def version_tested(version: str) -> bool:
    """Whether ``version`` (``"2.6.6"``) is within :data:`TESTED`."""
    try:
        major_minor = tuple(int(p) for p in version.split(".")[:2])
    except ValueError:
        return False
    return TESTED[0] <= major_minor <= TESTED[1]


def missing(trainer: Any) -> list[str]:
    """The paths of :data:`ATTRIBUTES` this trainer lacks (empty when all are there)."""
    gone = []
    for path in ATTRIBUTES:
        obj = trainer
        for name in path.split("."):
            if not hasattr(obj, name):
                gone.append(path)
                break
            obj = getattr(obj, name)
    return gone


def trainer_of(module: Any) -> Any:
    """The module's trainer, or None before it is attached (the public
    ``module.trainer`` raises then)."""
    return getattr(module, "_trainer", None) if module is not None else None


def drop_sigterm_broadcast(trainer: Any) -> None:
    """Lightning broadcasts a SIGTERM flag from rank 0 before every step: a
    collective we cannot abort (a hung peer stalled the survivors for the
    full 30 s PG timeout, measured) and an extra round trip per step.
    SIGTERM is ours (leave at the next boundary, carried in the step's
    all-reduce), so the broadcast goes."""
    trainer.fit_loop.epoch_loop._broadcast_sigterm_tensor = lambda: None


def set_epoch_length(trainer: Any, remaining: int, *, new_epoch: bool) -> None:
    """Make Lightning's epoch end after the sampler's ``remaining`` steps."""
    fit_loop = trainer.fit_loop
    combined = fit_loop._combined_loader
    if combined is None:
        return
    combined.limits = [remaining]
    epoch_loop = fit_loop.epoch_loop
    # a new epoch counts from 0, except when Lightning resumes one mid-way
    # from a checkpoint: it keeps the batches already done in the counter
    ready = epoch_loop.batch_progress.current.ready if (not new_epoch or epoch_loop.restarting) else 0
    if not new_epoch and fit_loop._data_fetcher is not None:
        iter(fit_loop._data_fetcher)  # drop batches planned under the old layout
    fit_loop.max_batches = ready + remaining
    if not new_epoch:
        # The fetcher flagged the step it served as the epoch's last under the
        # old plan; Lightning ends the epoch on that flag alone.  A failed last
        # step puts its samples back, so the epoch goes on (measured: without
        # this, a failed last window lost its 16 samples from the epoch).
        epoch_loop.batch_progress.is_last_batch = remaining == 0
    interval = trainer.val_check_interval
    if isinstance(interval, float) and trainer.val_check_batch is not None and trainer.val_check_batch != float("inf"):
        # a fraction of the epoch, as Lightning computes it at setup, but of
        # the epoch's current length
        trainer.val_check_batch = max(1, int(fit_loop.max_batches * interval))


def reset_val_dataloaders(trainer: Any) -> None:
    """Lightning builds the validation loader once, with the ``DistributedSampler``
    of the world at that time; drop it so the next validation builds one for
    the current world (every member evaluates its share, ``sync_dist`` reduces
    over the current members)."""
    trainer.fit_loop.epoch_loop.val_loop._combined_loader = None


def log_hyperparams(trainer: Any) -> None:
    """What Lightning does at setup, done later by the view's rank 0 (before
    the join every node believes it is rank 0)."""
    package = type(trainer).__module__.split(".trainer", 1)[0]  # lightning.pytorch or pytorch_lightning
    importlib.import_module(f"{package}.loggers.utilities")._log_hyperparams(trainer)


def output_paths(trainer: Any) -> dict[str, Any]:
    """The run's log versions and checkpoint folders, to send with the state."""
    return {
        "log_versions": [getattr(lg, "_version", None) for lg in trainer.loggers],
        "checkpoint_dirs": [cb.dirpath for cb in trainer.checkpoint_callbacks],
    }


def adopt_output_paths(trainer: Any, paths: dict[str, Any]) -> None:
    """Log version and checkpoint folders as the sender has them.

    Lightning picks them at setup, when every node still believes it is rank
    0 (there is no group before the join) and its broadcast of the checkpoint
    folder is a no-op: two nodes sharing a root dir picked ``version_0`` and
    ``version_1``.  Whoever is rank 0 later must write where the run writes.
    """
    versions, dirs = paths["log_versions"], paths["checkpoint_dirs"]
    if len(versions) == len(trainer.loggers):
        for logger, version in zip(trainer.loggers, versions):
            if version is not None and hasattr(logger, "_version") and logger._version != version:
                logger._version = version
                if hasattr(logger, "_experiment"):
                    logger._experiment = None  # reopened in the adopted folder when next used
    if len(dirs) == len(trainer.checkpoint_callbacks):
        for cb, dirpath in zip(trainer.checkpoint_callbacks, dirs):
            if dirpath is not None:
                cb.dirpath = dirpath


def load_progress(trainer: Any, epoch: int, global_step: int) -> None:
    """A newcomer continues the members' loop: same epoch, same global step.
    (Its epoch is as long as the steps the members have left in it.)"""
    fit_loop = trainer.fit_loop
    for tracker in (fit_loop.epoch_progress.current, fit_loop.epoch_progress.total):
        tracker.ready = tracker.started = tracker.processed = tracker.completed = epoch
    load_step(trainer, global_step)


def load_step(trainer: Any, global_step: int) -> None:
    """Lightning's global step (the optimizer steps tried, failed ones included)."""
    fit_loop = trainer.fit_loop
    step = fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total
    step.ready = step.completed = global_step
    fit_loop.epoch_loop._batches_that_stepped = global_step
