"""Trainer(strategy="chaos") in this process, one node: registration, the
sampler swap, exactly-once epochs and the world size on the progress bar."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import chaos_lightning  # noqa: F401
from chaos_lightning.strategy.strategy import ChaosStrategy


class TinyBody:
    """A linear regressor, mixed into either package's ``LightningModule``."""

    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


class Tiny(TinyBody, pl.LightningModule):
    pass


@pytest.mark.timeout(120)
def test_one_node_fits_with_the_registered_strategy_and_trains_each_sample_once(monkeypatch):
    monkeypatch.delenv("CHAOS_PEERS", raising=False)
    monkeypatch.setenv("CHAOS_BIND", "127.0.0.1:0")
    data = TensorDataset(torch.randn(30, 4), torch.randn(30, 1))
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=1, max_epochs=2, logger=False,
        enable_checkpointing=False, enable_model_summary=False, enable_progress_bar=False,
    )
    assert isinstance(trainer.strategy, ChaosStrategy)
    trainer.fit(Tiny(), DataLoader(data, batch_size=4, shuffle=True))
    ledger = trainer.strategy.ledger
    for epoch in range(2):
        ledger.assert_exact_cover(epoch)
    assert trainer.global_step == 2 * 8  # ceil(30 / 4) steps per epoch, the short last batch included
    assert trainer.progress_bar_metrics["world"] == 1.0


def trainer_kwargs(**kw) -> dict:
    base = dict(
        accelerator="cpu", devices=1, logger=False, enable_checkpointing=False,
        enable_model_summary=False, enable_progress_bar=False,
    )
    base.update(kw)
    return base


@pytest.fixture
def lone_node(monkeypatch):
    monkeypatch.delenv("CHAOS_PEERS", raising=False)
    monkeypatch.setenv("CHAOS_BIND", "127.0.0.1:0")


@pytest.mark.timeout(120)
def test_a_global_batch_size_fixes_the_samples_per_step_whatever_the_loader_batch(lone_node):
    data = TensorDataset(torch.randn(30, 4), torch.randn(30, 1))
    trainer = pl.Trainer(strategy=ChaosStrategy(global_batch_size=6), max_epochs=1, **trainer_kwargs())
    trainer.fit(Tiny(), DataLoader(data, batch_size=4, shuffle=True))
    trainer.strategy.ledger.assert_exact_cover(0)
    assert trainer.global_step == 5  # 30 / 6, not ceil(30 / 4)


class SnapshotLedger(pl.Callback):
    """Copies epoch 0 of the strategy's ledger at ``step`` (after the strategy's
    own callback committed that step, ModelCheckpoint saved it)."""

    def __init__(self, step: int):
        self.step, self.seen = step, None

    def on_train_batch_end(self, trainer, *args):
        if trainer.global_step == self.step:
            self.seen = trainer.strategy.ledger.counts(0).copy()


@pytest.mark.timeout(120)
def test_ckpt_path_resumes_mid_epoch_and_each_sample_is_still_trained_once(lone_node, tmp_path):
    """ModelCheckpoint saves mid-epoch; the checkpoint holds the sampler's
    cursor (the strategy callback's state), and a run resumed from it trains
    the rest of that epoch: across both runs, each sample once."""
    from lightning.pytorch.callbacks import ModelCheckpoint

    data = TensorDataset(torch.randn(30, 4), torch.randn(30, 1))
    snap = SnapshotLedger(5)
    saver = ModelCheckpoint(dirpath=tmp_path, every_n_train_steps=5, save_top_k=-1, filename="{step}")
    first = pl.Trainer(strategy="chaos", max_epochs=1, callbacks=[saver, snap], **trainer_kwargs(enable_checkpointing=True))
    first.fit(Tiny(), DataLoader(data, batch_size=4, shuffle=True))
    assert snap.seen is not None and snap.seen.total() == 20

    second = pl.Trainer(strategy="chaos", max_epochs=2, **trainer_kwargs())
    second.fit(Tiny(), DataLoader(data, batch_size=4, shuffle=True), ckpt_path=tmp_path / "step=5.ckpt")
    ledger = second.strategy.ledger
    both = snap.seen + ledger.counts(0)
    assert sorted(both) == list(range(30)) and set(both.values()) == {1}, "epoch 0 across the resume: an exact cover"
    ledger.assert_exact_cover(1)
    assert second.global_step == 16


@pytest.mark.timeout(120)
def test_pytorch_lightning_trainer_gets_chaos_too(lone_node):
    """The standalone ``pytorch_lightning`` package has its own registry and
    its own base classes; "chaos" is registered there as well."""
    import pytorch_lightning as ptl

    class PtlTiny(TinyBody, ptl.LightningModule):
        pass

    trainer = ptl.Trainer(strategy="chaos", max_epochs=1, **trainer_kwargs())
    assert isinstance(trainer.strategy, ptl.strategies.DDPStrategy)
    assert type(trainer.strategy).__name__ == "ChaosStrategy"
    trainer.fit(PtlTiny(), DataLoader(TensorDataset(torch.randn(10, 4), torch.randn(10, 1)), batch_size=4))
    trainer.strategy.ledger.assert_exact_cover(0)
    assert trainer.global_step == 3


@pytest.mark.timeout(120)
def test_gradient_accumulation_and_clipping_commit_whole_windows(lone_node):
    """With ``accumulate_grad_batches=3`` the gradient is synced once per
    window, and the window's micro-batches are committed together."""
    data = TensorDataset(torch.randn(30, 4), torch.randn(30, 1))
    trainer = pl.Trainer(
        strategy="chaos", max_epochs=2, accumulate_grad_batches=3, gradient_clip_val=0.5, **trainer_kwargs()
    )
    trainer.fit(Tiny(), DataLoader(data, batch_size=4, shuffle=True))
    for epoch in range(2):
        trainer.strategy.ledger.assert_exact_cover(epoch)
    assert trainer.global_step == 2 * 3  # 8 micro-batches per epoch: windows of 3, 3 and 2
