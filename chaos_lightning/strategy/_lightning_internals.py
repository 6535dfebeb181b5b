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

import copy
import csv
import importlib
import os
from typing import Any, Callable

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
    "fit_loop.epoch_loop._skip_next_val",
    "fit_loop.epoch_loop.on_run_start",
    "fit_loop.epoch_loop.scheduler_progress",
    "fit_loop.epoch_loop.automatic_optimization.optim_progress.optimizer.step.total",
    "fit_loop.epoch_loop.manual_optimization.optim_step_progress.total",
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
    if not new_epoch:
        # The fetcher flagged the step it served as the epoch's last under the
        # old plan; Lightning ends the epoch on that flag alone.  A failed last
        # step puts its samples back, so the epoch goes on (measured: without
        # this, a failed last window lost its 16 samples from the epoch).
        epoch_loop.batch_progress.is_last_batch = remaining == 0
    _apply_epoch_length(trainer, ready, remaining)


def _apply_epoch_length(trainer: Any, ready: int, remaining: int) -> None:
    fit_loop = trainer.fit_loop
    fit_loop.max_batches = ready + remaining
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


def _is_save_config(callback: Any) -> bool:
    """LightningCLI's ``SaveConfigCallback`` (or a subclass), from either
    package, without importing the CLI (it needs jsonargparse)."""
    return any(c.__name__ == "SaveConfigCallback" and c.__module__.endswith(".cli") for c in type(callback).__mro__)


def defer_cli_config(trainer: Any) -> None:
    """Hold LightningCLI's ``config.yaml`` until the join (see :func:`save_cli_config`).

    ``SaveConfigCallback.setup`` writes it at setup on the process that
    believes it is rank 0, and before the join every node does (measured:
    every process wrote its own ``config.yaml``); its own collectives (a
    broadcast of "the file exists") would meet the members' training
    all-reduce in a node that joins mid-fit.  Its ``setup`` is replaced, for
    this process only, by a no-op until the join.
    """
    for cb in trainer.callbacks:
        if _is_save_config(cb) and "setup" not in vars(cb):
            cb.setup = lambda *args, **kwargs: None


def _log_dir(trainer: Any) -> str:
    """``Trainer.log_dir`` without its broadcast (only one rank asks here)."""
    if not trainer.loggers:
        return trainer.default_root_dir
    logger = trainer.loggers[0]
    kind = type(logger).__name__
    return logger.log_dir if kind in ("TensorBoardLogger", "CSVLogger") else logger.save_dir


def save_cli_config(trainer: Any, *, rank0: bool) -> None:
    """After the join: the view's rank 0 writes ``config.yaml`` into the run's
    log folder (adopted from the members) unless it is there already (the
    run's founders wrote it), and runs the callback's ``save_config``
    extension; every node then counts it as saved.  What Lightning's setup
    does, once per run instead of once per process, and without
    collectives.  Lightning's refusal to overwrite a previous run's file is
    not kept: the file found is this run's (the folder is the members')."""
    for cb in trainer.callbacks:
        if not _is_save_config(cb) or cb.already_saved:
            continue
        vars(cb).pop("setup", None)
        if rank0:
            if cb.save_to_log_dir:
                log_dir = _log_dir(trainer)
                path = os.path.join(log_dir, cb.config_filename)
                if not os.path.isfile(path):
                    os.makedirs(log_dir, exist_ok=True)
                    cb.parser.save(cb.config, path, skip_none=False, overwrite=cb.overwrite, multifile=cb.multifile)
            cb.save_config(trainer, trainer.lightning_module, "fit")
        cb.already_saved = True


def output_paths(trainer: Any) -> dict[str, Any]:
    """The run's log versions and checkpoint folders, to send with the state."""
    return {
        # resolved here (a logger picks its version when first asked): the
        # sender's choice becomes everyone's, for the second logger of a
        # list too (measured: a CSVLogger behind a TensorBoardLogger was
        # first asked by the new rank 0, which picked version_1)
        "log_versions": logger_versions(trainer.loggers),
        "checkpoint_dirs": [cb.dirpath for cb in trainer.checkpoint_callbacks],
        # not in ModelCheckpoint's state_dict, but it decides whether a save
        # (and its barrier) happens at a step: every member must agree
        "checkpoint_steps": [getattr(cb, "_last_global_step_saved", None) for cb in trainer.checkpoint_callbacks],
    }


def adopt_output_paths(trainer: Any, paths: dict[str, Any]) -> None:
    """Log version and checkpoint folders as the sender has them.

    Lightning picks them at setup, when every node still believes it is rank
    0 (there is no group before the join) and its broadcast of the checkpoint
    folder is a no-op: two nodes sharing a root dir picked ``version_0`` and
    ``version_1``.  Whoever is rank 0 later must write where the run writes.
    """
    dirs = paths["checkpoint_dirs"]
    adopt_logger_versions(trainer.loggers, paths["log_versions"])
    if len(dirs) == len(trainer.checkpoint_callbacks):
        steps = paths.get("checkpoint_steps") or [None] * len(dirs)
        for cb, dirpath, saved in zip(trainer.checkpoint_callbacks, dirs, steps):
            if dirpath is not None:
                cb.dirpath = dirpath
            if saved is not None and hasattr(cb, "_last_global_step_saved"):
                cb._last_global_step_saved = saved


def logger_versions(loggers: list[Any]) -> list[Any]:
    """Each logger's version, resolved (Trainer and Fabric loggers alike)."""
    return [lg.version if hasattr(lg, "_version") else None for lg in loggers]


def adopt_logger_versions(loggers: list[Any], versions: list[Any]) -> None:
    """The sender's versions: a later rank 0 writes into the run's folders."""
    if len(versions) != len(loggers):
        return
    for logger, version in zip(loggers, versions):
        if version is not None and hasattr(logger, "_version") and logger._version != version:
            logger._version = version
            if hasattr(logger, "_experiment"):
                logger._experiment = None  # reopened in the adopted folder when next used


def fabric_loggers(strategy: Any) -> list[Any]:
    """The loggers of the ``Fabric`` that owns ``strategy`` (Fabric hands its
    strategy no reference to itself or its loggers: found among the
    strategy's referrers, once, at the join).  Empty if there is none."""
    import gc

    from lightning.fabric import Fabric

    for ref in gc.get_referrers(strategy):
        # Python 3.11+ may report the instance, 3.10 its __dict__
        if isinstance(ref, Fabric) and getattr(ref, "_strategy", None) is strategy:
            return list(getattr(ref, "_loggers", []))
        if isinstance(ref, dict) and ref.get("_strategy") is strategy and "_loggers" in ref:
            return list(ref["_loggers"])
    return []


def loop_progress(trainer: Any) -> dict[str, Any]:
    """The loop's counters as they will stand once the batch in progress ends.

    A state sync runs at a step boundary (inside ``on_train_batch_end``, the
    batch processed but not yet completed, the logger's batch counter not yet
    advanced) or at train start (between batches).  The record is normalised
    to "between batches", and :func:`load_loop_progress` undoes that for a
    receiver that is itself inside a batch.  Every counter Lightning decides
    by travels: the batch index within the epoch and in total (validation
    every ``val_check_interval``), the optimizer steps of automatic and manual
    optimization (``global_step``, ``max_steps``), scheduler steps, and the
    batches that stepped (the loggers' step).
    """
    fit_loop = trainer.fit_loop
    loop = fit_loop.epoch_loop
    batch = loop.batch_progress.state_dict()
    in_batch = loop.batch_progress.current.processed > loop.batch_progress.current.completed
    if in_batch:  # this batch completes right after the boundary's hooks
        for part in ("total", "current"):
            batch[part]["completed"] = batch[part]["processed"]
    return {
        "epoch": fit_loop.epoch_progress.current.completed,
        "batch": batch,
        "scheduler": loop.scheduler_progress.state_dict(),
        "automatic": loop.automatic_optimization.optim_progress.state_dict(),
        "manual": loop.manual_optimization.optim_step_progress.state_dict(),
        "batches_that_stepped": loop._batches_that_stepped + int(in_batch),
    }


def continue_logs(loggers: list[Any]) -> None:
    """This node is the view's rank 0 now: continue the run's logs, not
    start them again.

    A ``CSVLogger`` opens its writer lazily on rank 0, and Lightning's writer
    deletes a ``metrics.csv`` it finds in the log folder (measured: after a
    new rank 0 took over, steps 0-50 were gone).  Here the writer is opened
    at once with the file held aside (so there is nothing for it to delete),
    the file put back, and the writer told the columns already there, so it
    appends.  A writer this node opened in an earlier turn as rank 0 is told
    the columns too (others may have added some since).  Every step is
    crash-safe: a rank 0 killed at any instant leaves the history either in
    ``metrics.csv`` or in the held file, which the next rank 0 puts back
    (measured before: a rank 0 killed right after taking over left a
    ``metrics.csv`` that began at the kill's step).  Other loggers continue by
    themselves in the adopted version folder (:func:`adopt_output_paths`).
    """
    for logger in loggers:
        if type(logger).__name__ != "CSVLogger":
            continue
        path = os.path.join(logger.log_dir, "metrics.csv")
        held = path + ".chaos-held"
        if os.path.isfile(held) and not os.path.isfile(path):
            os.replace(held, path)  # a rank 0 died while holding it: the history is back
        if getattr(logger, "_experiment", None) is None:
            present = os.path.isfile(path)
            if present:
                os.replace(path, held)
            writer = logger.experiment  # finds no metrics.csv to remove
            if present:
                os.replace(held, path)
        else:
            writer = logger.experiment
        header: list[str] = []
        if os.path.isfile(path):
            with open(path, newline="") as f:
                header = next(csv.reader(f), [])
        writer.metrics_keys = sorted(header)
    _make_csv_rewrites_atomic()


def _make_csv_rewrites_atomic() -> None:
    """Lightning's CSV writer rewrites ``metrics.csv`` in place when a new
    column appears (truncate, then write every row): a rank 0 killed in
    between would leave the run's history truncated.  Written to a temporary
    file and renamed over it instead (``os.replace`` is atomic on POSIX), the
    file is always either the old history or the new one."""
    from lightning.fabric.loggers.csv_logs import _ExperimentWriter

    original = _ExperimentWriter._rewrite_with_new_header
    if getattr(original, "_chaos_atomic", False):
        return

    def rewrite(self: Any, fieldnames: list[str]) -> None:
        path = self.metrics_file_path
        if "file" not in getattr(self._fs, "protocol", ("file",)):
            return original(self, fieldnames)  # a remote store: Lightning's own way
        with open(path, newline="") as f:
            rows = list(csv.DictReader(f))
        tmp = path + ".chaos-tmp"
        with open(tmp, "w", newline="") as f:
            out = csv.DictWriter(f, fieldnames=fieldnames)
            out.writeheader()
            out.writerows(rows)
        os.replace(tmp, path)

    rewrite._chaos_atomic = True  # type: ignore[attr-defined]
    _ExperimentWriter._rewrite_with_new_header = rewrite


def hand_over_logs(loggers: list[Any]) -> None:
    """A leaver writes what its loggers buffered before it leaves, while it
    is still the one writing, so the next rank 0 continues after it."""
    for logger in loggers:
        logger.save()


def load_loop_progress(trainer: Any, progress: dict[str, Any], *, remaining: Callable[[], int]) -> None:
    """A newcomer continues the members' loop: same epoch, batch index,
    optimizer and scheduler steps, logger step (see :func:`loop_progress`).

    At train start (a newcomer), Lightning's epoch loop has yet to reset its
    per-epoch counters for the epoch it is about to run, so those are put in
    place right after that reset (a one-shot wrapper of the epoch loop's
    ``on_run_start``), with the epoch's length and validation schedule
    (``remaining()`` steps left, asked then: the sampler's layout for the
    new world is made after this call) recomputed from them.  Inside a batch (a
    stale member back at a step boundary), everything is set at once, less
    what the end of this batch will add.
    """
    fit_loop = trainer.fit_loop
    loop = fit_loop.epoch_loop
    in_batch = loop.batch_progress.current.processed > loop.batch_progress.current.completed
    epoch = progress["epoch"]
    for tracker in (fit_loop.epoch_progress.current, fit_loop.epoch_progress.total):
        tracker.ready = tracker.started = epoch + int(in_batch)  # mid-epoch: started, not yet processed
        tracker.processed = tracker.completed = epoch
    loop.scheduler_progress.load_state_dict(progress["scheduler"])
    loop.automatic_optimization.optim_progress.load_state_dict(progress["automatic"])
    loop.manual_optimization.optim_step_progress.load_state_dict(progress["manual"])
    loop._batches_that_stepped = progress["batches_that_stepped"] - int(in_batch)
    loop.batch_progress.total.load_state_dict(progress["batch"]["total"])
    current = progress["batch"]["current"]
    if in_batch:
        loop.batch_progress.current.load_state_dict(current)
        for tracker in (loop.batch_progress.total, loop.batch_progress.current):
            tracker.completed -= 1
        return
    original = loop.on_run_start

    def on_run_start(data_fetcher: Any) -> None:
        del loop.on_run_start  # one shot: the class's method again from here on
        original(data_fetcher)
        loop.batch_progress.current.load_state_dict(current)
        _apply_epoch_length(trainer, loop.batch_progress.current.ready, remaining())

    loop.on_run_start = on_run_start


def validation_due(trainer: Any) -> bool:
    """Whether Lightning runs validation right after the batch in progress
    (asked at its end, as Lightning will)."""
    fit_loop = trainer.fit_loop
    return bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))


def skip_next_validation(trainer: Any) -> bool:
    """Lightning's own flag: no validation right after the batch in progress
    (asked at its end; the flag clears itself at the next check).  Whether
    one was due."""
    fit_loop = trainer.fit_loop
    due = bool(fit_loop.epoch_loop._should_check_val_fx(fit_loop._data_fetcher))
    fit_loop.epoch_loop._skip_next_val = True
    return due


def step_counters(trainer: Any) -> dict[str, Any]:
    """The loop's step counts as they stand at a step boundary (or after a
    switch): the optimizer steps of automatic and manual optimization and
    the scheduler steps.  :func:`uncount_step` puts them back."""
    loop = trainer.fit_loop.epoch_loop
    return {
        "automatic": loop.automatic_optimization.optim_progress.state_dict(),
        "manual": loop.manual_optimization.optim_step_progress.state_dict(),
        "scheduler": loop.scheduler_progress.state_dict(),
    }


def scheduler_states(trainer: Any) -> list[tuple[int, dict[str, Any]]]:
    """The step-interval LR schedulers' state, taken when a step's all-reduce
    fails: after anything that rescaled the learning rate for this batch,
    before Lightning steps the schedulers for it."""
    return [(i, copy.deepcopy(cfg.scheduler.state_dict()))
            for i, cfg in enumerate(trainer.lr_scheduler_configs) if cfg.interval == "step"]


def uncount_step(trainer: Any, counters: dict[str, Any], schedulers: list[tuple[int, dict[str, Any]]]) -> None:
    """A step whose all-reduce failed applied no update, but Lightning counted
    it (``global_step``, ``max_steps``, the step-interval schedulers, the
    loggers' step).  Put the counts back (``counters`` from the last boundary,
    ``schedulers`` from the failure) and hold off the loggers' batch
    counter, which Lightning advances right after this batch's end hooks."""
    loop = trainer.fit_loop.epoch_loop
    loop.automatic_optimization.optim_progress.load_state_dict(copy.deepcopy(counters["automatic"]))
    loop.manual_optimization.optim_step_progress.load_state_dict(copy.deepcopy(counters["manual"]))
    loop.scheduler_progress.load_state_dict(copy.deepcopy(counters["scheduler"]))
    configs = trainer.lr_scheduler_configs
    for i, state in schedulers:
        scheduler = configs[i].scheduler
        scheduler.load_state_dict(state)
        last = getattr(scheduler, "_last_lr", None)
        if last is not None:  # the learning rate itself lives in the optimizer's groups
            for group, lr in zip(scheduler.optimizer.param_groups, last):
                group["lr"] = lr
    loop._batches_that_stepped -= 1
