"""A small character-level transformer language model trained with ``Trainer(strategy="chaos")``.

Plain Lightning code: the only chaos-specific lines are ``import
chaos_lightning`` and ``strategy="chaos"``.  Nothing is downloaded: the
default text is Python's own help text, the language reference topics that
``help("assignment")`` and friends show, which ship with the interpreter
(``pydoc_data.topics``: about 460,000 characters of English and code; the
first ``--max-chars`` are used).  ``--corpus zen`` trains on *The Zen of
Python* instead (the ``this`` module: tiny, the same in every Python, so the
model memorises it), ``--text FILE`` on any text file.  Tokens are characters
from a fixed vocabulary (printable ASCII and newline), so the model's shape
never depends on the text.  The model is a causal
``torch.nn.TransformerEncoder``; training uses the first 90 % of the text
cut into ``--block``-character windows and validation the last 10 %.  At the
end every node prints a greedy sample, which is the same everywhere because
the replicas are identical.

Run one process per node; the membership comes from the environment::

    # three nodes on one machine (one shell each, or with & as here);
    # training starts once 3 nodes are members (CHAOS_MIN_NODES)
    CHAOS_BIND=127.0.0.1:7000 CHAOS_MIN_NODES=3 python examples/language_model.py &
    CHAOS_BIND=127.0.0.1:7001 CHAOS_PEERS=127.0.0.1:7000 CHAOS_MIN_NODES=3 python examples/language_model.py &
    CHAOS_BIND=127.0.0.1:7002 CHAOS_PEERS=127.0.0.1:7000 CHAOS_MIN_NODES=3 python examples/language_model.py &

    # a 4th node joins the running fit through any member (it pulls the
    # current parameters, optimizer state and sampler cursor, then trains)
    CHAOS_BIND=127.0.0.1:7003 CHAOS_PEERS=127.0.0.1:7001 python examples/language_model.py &

    # a graceful leave: SIGTERM makes a node leave at the next step boundary
    # (its fit returns, exit code 0); the others go on without it
    kill -TERM %2

Several nodes on one machine share its cores: give each a share of the
intra-op threads (``OMP_NUM_THREADS=1`` for three nodes on two cores),
or the steps slow down severalfold.  All nodes must train on the same text with the same flags (the start line
prints the text's digest to compare: the help text changes between Python
versions).  Across machines, bind a reachable
address and set the same ``CHAOS_SECRET`` on every node.  Rank 0 of the
current membership writes the CSV log and the checkpoints under
``--root-dir`` (printed at start and at the end).  The last stdout line is a
JSON summary (losses, accuracy, world size, global step, parameter digest,
sample): identical on every node that finished.
"""

from __future__ import annotations

import argparse
import codecs
import contextlib
import hashlib
import importlib
import io
import json
import math
import os
from typing import Any

import chaos_lightning  # noqa: F401  (registers strategy="chaos")
import lightning.pytorch as pl
import torch
import torch.nn.functional as F
from lightning.pytorch.callbacks import ModelCheckpoint
from lightning.pytorch.loggers import CSVLogger
from torch import nn
from torch.utils.data import DataLoader, Dataset

VOCAB = "\n" + "".join(chr(c) for c in range(32, 127))  # 96 characters; anything else reads as "?"
STOI = {c: i for i, c in enumerate(VOCAB)}


def encode(text: str) -> torch.Tensor:
    """Character ids of ``text`` (characters outside ``VOCAB`` become ``?``)."""
    unknown = STOI["?"]
    return torch.tensor([STOI.get(c, unknown) for c in text], dtype=torch.long)


def decode(ids: torch.Tensor) -> str:
    return "".join(VOCAB[i] for i in ids.tolist())


def zen_of_python() -> str:
    """The Zen of Python from the standard library's ``this`` module (which
    prints it on import: silenced here)."""
    with contextlib.redirect_stdout(io.StringIO()):
        this = importlib.import_module("this")
    return codecs.decode(this.s, "rot13")


def python_help_text() -> str:
    """The language reference topics bundled with the interpreter, in a fixed order."""
    from pydoc_data.topics import topics

    return "\n".join(topics[k] for k in sorted(topics))


class Windows(Dataset):
    """``block + 1``-character slices of ``ids`` starting every ``stride``
    characters: input and next-character target."""

    def __init__(self, ids: torch.Tensor, block: int, stride: int) -> None:
        if len(ids) <= block:
            raise ValueError(f"text of {len(ids)} characters is too short for windows of {block}")
        self.ids, self.block, self.stride = ids, block, stride

    def __len__(self) -> int:
        return (len(self.ids) - self.block - 1) // self.stride + 1

    def __getitem__(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        chunk = self.ids[i * self.stride : i * self.stride + self.block + 1]
        return chunk[:-1], chunk[1:]


class CharTransformer(pl.LightningModule):
    """A causal transformer over characters: token and position embeddings,
    ``layers`` pre-norm encoder layers under a causal mask, a linear head."""

    def __init__(self, block: int = 64, dim: int = 64, heads: int = 4, layers: int = 2, dropout: float = 0.1,
                 lr: float = 3e-3) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.tok = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Embedding(block, dim)
        layer = nn.TransformerEncoderLayer(dim, heads, 4 * dim, dropout, batch_first=True, norm_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, len(VOCAB))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        t = ids.shape[1]
        x = self.tok(ids) + self.pos(torch.arange(t, device=ids.device))
        mask = nn.Transformer.generate_square_subsequent_mask(t, device=ids.device)
        return self.head(self.norm(self.encoder(x, mask=mask, is_causal=True)))

    def _loss(self, batch: tuple[torch.Tensor, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor]:
        x, y = batch
        logits = self(x)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), y.reshape(-1))
        acc = (logits.argmax(-1) == y).float().mean()
        return loss, acc

    def training_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> torch.Tensor:
        loss, _ = self._loss(batch)
        # on_epoch + sync_dist: the epoch mean over every node's samples
        self.log("train_loss", loss, on_step=True, on_epoch=True, prog_bar=True, sync_dist=True, batch_size=len(batch[0]))
        return loss

    def validation_step(self, batch: tuple[torch.Tensor, torch.Tensor], batch_idx: int) -> None:
        loss, acc = self._loss(batch)
        # sync_dist: reduced over whoever is a member when validation runs
        self.log("val_loss", loss, prog_bar=True, sync_dist=True, batch_size=len(batch[0]))
        self.log("val_acc", acc, sync_dist=True, batch_size=len(batch[0]))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.AdamW(self.parameters(), lr=self.hparams.lr, weight_decay=0.01)

    @torch.no_grad()
    def generate(self, prompt: str, n: int) -> str:
        """``prompt`` continued by ``n`` greedily chosen characters."""
        was_training = self.training
        self.eval()
        ids = encode(prompt).unsqueeze(0)
        for _ in range(n):
            logits = self(ids[:, -self.hparams.block :])
            ids = torch.cat([ids, logits[:, -1].argmax(-1, keepdim=True)], dim=1)
        self.train(was_training)
        return decode(ids[0])


class Summary(pl.Callback):
    """Collects the epoch metrics (already reduced over the nodes) and prints
    a final JSON line; the same on every node that finished the fit."""

    def __init__(self) -> None:
        self.train_loss: list[float] = []
        self.val_loss: list[float] = []
        self.val_acc: list[float] = []

    def on_validation_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.sanity_checking:
            return
        m = trainer.callback_metrics
        self.val_loss.append(round(float(m["val_loss"]), 6))
        self.val_acc.append(round(float(m["val_acc"]), 6))

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if "train_loss_epoch" in trainer.callback_metrics:
            self.train_loss.append(round(float(trainer.callback_metrics["train_loss_epoch"]), 6))

    def report(self, trainer: pl.Trainer, model: CharTransformer, sample: str) -> dict[str, Any]:
        h = hashlib.sha256()
        for t in model.state_dict().values():
            h.update(t.detach().cpu().contiguous().numpy().tobytes())
        return {
            "event": "done", "example": "language_model", "pid": os.getpid(),
            "world_size": trainer.world_size, "global_step": trainer.global_step, "epochs": trainer.current_epoch,
            "train_loss": self.train_loss, "val_loss": self.val_loss, "val_acc": self.val_acc,
            "params": h.hexdigest()[:16], "sample": sample, "interrupted": trainer.interrupted,
        }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0], formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("--epochs", type=int, default=5, help="training epochs")
    p.add_argument("--max-steps", type=int, default=-1, help="stop after this many optimizer steps (-1: no limit)")
    p.add_argument("--batch-size", type=int, default=32, help="per-node batch size (windows)")
    p.add_argument("--block", type=int, default=64, help="context length in characters")
    p.add_argument("--dim", type=int, default=64, help="model width")
    p.add_argument("--layers", type=int, default=2, help="transformer layers")
    p.add_argument("--lr", type=float, default=3e-3, help="AdamW learning rate")
    p.add_argument("--corpus", choices=["python-help", "zen"], default="python-help", help="bundled text to train on")
    p.add_argument("--text", default=None, help="train on this UTF-8 text file instead")
    p.add_argument("--max-chars", type=int, default=120_000, help="use at most this many characters of the text")
    p.add_argument("--sample-length", type=int, default=120, help="characters generated at the end")
    p.add_argument("--seed", type=int, default=0, help="initialisation seed (the same on every node)")
    p.add_argument("--root-dir", default="runs/language_model", help="where rank 0 writes logs and checkpoints")
    p.add_argument("--progress-bar", action="store_true", help="show Lightning's progress bar")
    return p.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    pl.seed_everything(args.seed, workers=True)
    if args.text:
        with open(args.text, encoding="utf-8") as f:
            text, source = f.read(), args.text
    elif args.corpus == "zen":
        text, source = zen_of_python(), "the Zen of Python"
    else:
        text, source = python_help_text(), "Python's help topics (pydoc_data)"
    text = text[: args.max_chars]
    ids = encode(text)
    cut = math.floor(0.9 * len(ids))
    if args.corpus == "zen" and not args.text:  # tiny: every offset, and shorter validation windows
        train, val = Windows(ids[:cut], args.block, 1), Windows(ids[cut:], args.block // 2, 1)
    else:
        train, val = Windows(ids[:cut], args.block, args.block // 2), Windows(ids[cut:], args.block, args.block)
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    print(f"text: {source} ({len(text)} characters, sha256 {digest}); "
          f"{len(train)} training and {len(val)} validation windows", flush=True)

    model = CharTransformer(block=args.block, dim=args.dim, layers=args.layers, lr=args.lr)
    summary = Summary()
    checkpoint = ModelCheckpoint(monitor="val_loss", mode="min", save_last=True, filename="{epoch}-{step}-{val_loss:.3f}")
    trainer = pl.Trainer(
        strategy="chaos", accelerator="cpu", devices=1,
        max_epochs=args.epochs, max_steps=args.max_steps, default_root_dir=args.root_dir, gradient_clip_val=1.0,
        logger=CSVLogger(args.root_dir), callbacks=[checkpoint, summary], log_every_n_steps=10,
        enable_progress_bar=args.progress_bar, enable_model_summary=False,
    )
    print(f"logs and checkpoints: {os.path.abspath(args.root_dir)} (written by rank 0 of the current membership)", flush=True)
    trainer.fit(
        model,
        DataLoader(train, batch_size=args.batch_size, shuffle=True),
        DataLoader(val, batch_size=64),
    )
    print(f"checkpoints in {checkpoint.dirpath}; best {checkpoint.best_model_path or '(none yet)'}", flush=True)
    sample = model.generate(text[cut : cut + 16], args.sample_length)
    print("sample:\n" + sample, flush=True)
    print(json.dumps(summary.report(trainer, model, sample)), flush=True)


if __name__ == "__main__":
    main()
