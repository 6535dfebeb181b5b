"""Trainer(strategy="chaos") in this process, one node: registration, the
sampler swap, exactly-once epochs and the world size on the progress bar."""

from __future__ import annotations

import lightning.pytorch as pl
import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import chaos_lightning  # noqa: F401
from chaos_lightning.strategy.strategy import ChaosStrategy


class Tiny(pl.LightningModule):
    def __init__(self):
        super().__init__()
        self.net = torch.nn.Linear(4, 1)

    def training_step(self, batch, batch_idx):
        x, y = batch
        return torch.nn.functional.mse_loss(self.net(x), y)

    def configure_optimizers(self):
        return torch.optim.SGD(self.parameters(), lr=0.1)


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
