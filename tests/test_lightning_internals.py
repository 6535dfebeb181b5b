"""The private Lightning attributes the strategy writes are where we write them.

``chaos_lightning.strategy._lightning_internals`` is the one module that
touches Lightning's private state; this pins it to the installed Lightning:
the version is one it was tested against, every listed attribute exists on a
real trainer in the middle of a real fit (a training batch and a validation
run), and a missing one is named, not silently skipped.
"""

from __future__ import annotations

import importlib
import types

import lightning
import lightning.pytorch as pl
import pytest
import pytorch_lightning
import torch
from torch.utils.data import DataLoader, TensorDataset

from chaos_lightning.strategy import _lightning_internals as internals


@pytest.mark.parametrize("package", [lightning, pytorch_lightning], ids=lambda p: p.__name__)
def test_the_installed_lightning_is_within_the_tested_range(package: types.ModuleType) -> None:
    assert internals.version_tested(package.__version__), (package.__version__, internals.TESTED)


def test_version_tested_bounds() -> None:
    low, high = internals.TESTED
    assert internals.version_tested(f"{low[0]}.{low[1]}.0") and internals.version_tested(f"{high[0]}.{high[1]}.9")
    assert not internals.version_tested(f"{low[0]}.{low[1] - 1}.0")
    assert not internals.version_tested(f"{high[0]}.{high[1] + 1}.0")
    assert not internals.version_tested("nonsense")


class Regressor(pl.LightningModule):
    def __init__(self) -> None:
        super().__init__()
        self.net = torch.nn.Linear(3, 1)
        self.seen: dict[str, list[str]] = {}

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def validation_step(self, batch, batch_idx):
        x, y = batch
        self.log("val_loss", torch.nn.functional.mse_loss(self.net(x), y))

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.05)

    def on_train_batch_end(self, outputs, batch, batch_idx) -> None:
        self.seen.setdefault("train batch", internals.missing(self.trainer))

    def on_validation_end(self) -> None:
        if not self.trainer.sanity_checking:
            self.seen.setdefault("validation", internals.missing(self.trainer))


@pytest.mark.timeout(120)
def test_every_listed_attribute_exists_mid_fit_and_a_missing_one_is_named() -> None:
    data = TensorDataset(torch.randn(24, 3), torch.randn(24, 1))
    model = Regressor()
    trainer = pl.Trainer(
        accelerator="cpu", devices=1, max_epochs=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False, val_check_interval=0.5,
    )
    trainer.fit(model, DataLoader(data, batch_size=4), DataLoader(data, batch_size=8))
    assert model.seen == {"train batch": [], "validation": []}

    # a Lightning that renamed one of them: missing() says which
    del trainer.fit_loop.epoch_loop._batches_that_stepped
    assert internals.missing(trainer) == ["fit_loop.epoch_loop._batches_that_stepped"]


@pytest.mark.parametrize("cli_module", ["lightning.pytorch.cli", "pytorch_lightning.cli"])
def test_save_config_callback_has_what_save_cli_config_uses(cli_module: str) -> None:
    """:func:`internals.save_cli_config` replays ``SaveConfigCallback.setup``
    without its broadcasts; the callback's fields it reads must be there
    (jsonargparse is a dev dependency: no skip)."""
    cli = importlib.import_module(cli_module)
    cb = cli.SaveConfigCallback(cli.LightningArgumentParser(), cli.Namespace())
    assert internals._is_save_config(cb)
    for name in ("parser", "config", "config_filename", "overwrite", "multifile", "save_to_log_dir", "already_saved"):
        assert hasattr(cb, name), name
    assert callable(cb.save_config)
    assert not internals._is_save_config(pl.callbacks.EarlyStopping("x"))


def test_fabric_loggers_finds_the_loggers_of_the_fabric_that_owns_the_strategy(monkeypatch, tmp_path) -> None:
    """Fabric gives its strategy no reference to itself: the strategy finds
    the loggers (whose version must travel with the state) among its referrers,
    reading ``Fabric._strategy`` and ``Fabric._loggers``."""
    import chaos_lightning  # noqa: F401  (registers strategy="chaos")
    from lightning.fabric import Fabric
    from lightning.fabric.loggers import CSVLogger

    monkeypatch.setenv("CHAOS_BIND", "127.0.0.1:0")
    loggers = [CSVLogger(str(tmp_path), name="a"), CSVLogger(str(tmp_path), name="b")]
    fabric = Fabric(strategy="chaos", accelerator="cpu", devices=1, loggers=loggers)
    other = Fabric(strategy="chaos", accelerator="cpu", devices=1)
    assert internals.fabric_loggers(fabric.strategy) == loggers
    assert internals.fabric_loggers(other.strategy) == []
    versions = internals.logger_versions(loggers)
    assert versions == [0, 0]
    internals.adopt_logger_versions(loggers, [3, None])
    assert internals.logger_versions(loggers) == [3, 0]


def _rows(path) -> list[dict]:
    import csv

    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def test_a_new_rank_0_continues_the_csv_history_whatever_instant_the_last_one_died(tmp_path, monkeypatch) -> None:
    """The history of ``metrics.csv`` survives a change of rank 0 at any
    instant: a fresh writer does not delete it, a writer from an earlier turn
    learns the columns added since, a file held aside by a rank 0 that died
    mid-takeover is put back, and a new column rewrites the file atomically."""
    from lightning.pytorch.loggers import CSVLogger
    from lightning.pytorch.utilities.rank_zero import rank_zero_only

    monkeypatch.setattr(rank_zero_only, "rank", 0, raising=False)  # this process writes, as a rank 0
    first = CSVLogger(tmp_path, name="csv", version=0)
    first.log_metrics({"loss": 1.0}, step=4)
    first.save()
    path = tmp_path / "csv" / "version_0" / "metrics.csv"
    # a rank 0 that died after holding the file aside, before putting it back
    path.rename(str(path) + ".chaos-held")
    second = CSVLogger(tmp_path, name="csv", version=0)
    internals.continue_logs([second])
    assert path.is_file() and not (tmp_path / "csv" / "version_0" / "metrics.csv.chaos-held").exists()
    second.log_metrics({"loss": 0.5, "lr": 0.1}, step=9)  # a new column: the file is rewritten
    second.save()
    assert [(r["step"], r["loss"], r["lr"]) for r in _rows(path)] == [("4", "1.0", ""), ("9", "0.5", "0.1")]
    assert sorted(p.name for p in path.parent.iterdir()) == ["metrics.csv"], "no temporary file left"
    # the first node is rank 0 again: its writer of the earlier turn learns the new column
    internals.continue_logs([first])
    first.log_metrics({"loss": 0.25, "lr": 0.05}, step=14)
    first.save()
    assert [r["step"] for r in _rows(path)] == ["4", "9", "14"] and _rows(path)[-1]["lr"] == "0.05"
