"""A small character-level language model for LEAF's Shakespeare next-character task."""

from __future__ import annotations

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from lightfed.data.text import IGNORE_INDEX, PAD_ID, VOCAB_SIZE
from lightfed.models._args import check_optimizer, check_positive_int

__all__ = ["CharLSTM"]


class CharLSTM(L.LightningModule):
    """LEAF's Shakespeare model: character embedding, stacked LSTM, linear layer over the vocabulary.

    LEAF (Caldas et al. 2018) uses an 8-dimensional embedding, two LSTM layers of 256 units and SGD with
    learning rate 0.8; those are the defaults. The model predicts the next character at every position.
    Targets ``y`` of shape ``(B, T)`` train/score every position (``-100`` marks padding); targets of
    shape ``(B,)`` score only the last position, i.e. one LEAF sample (``T`` characters -> the next one).
    ``{stage}_acc`` is the fraction of scored characters predicted correctly (micro-averaged, logged
    with the number of scored characters as its weight), LEAF's next-character accuracy.

    Args:
        vocab_size: Character ids (default: LEAF's 80 letters + unknown + padding).
        embed_dim: Embedding size.
        hidden: LSTM units per layer.
        num_layers: LSTM layers.
        lr: Learning rate.
        optimizer: ``"sgd"`` or ``"adam"``.
        momentum: SGD momentum.
        weight_decay: Weight decay.
    """

    def __init__(
        self,
        vocab_size: int = VOCAB_SIZE,
        embed_dim: int = 8,
        hidden: int = 256,
        num_layers: int = 2,
        lr: float = 0.8,
        optimizer: str = "sgd",
        momentum: float = 0.0,
        weight_decay: float = 0.0,
    ) -> None:
        super().__init__()
        if optimizer not in ("sgd", "adam"):
            raise ValueError(f"model.optimizer must be 'sgd' or 'adam', got {optimizer!r}.")
        check_optimizer(lr, momentum, weight_decay, example_lr=0.8)
        check_positive_int(vocab_size, "vocab_size", 2)
        for value, field in ((embed_dim, "embed_dim"), (hidden, "hidden"), (num_layers, "num_layers")):
            check_positive_int(value, field)
        self.save_hyperparameters()
        self.lr, self.optimizer_name, self.momentum, self.weight_decay = lr, optimizer, momentum, weight_decay
        self.embed = nn.Embedding(vocab_size, embed_dim, padding_idx=PAD_ID if PAD_ID < vocab_size else None)
        self.lstm = nn.LSTM(embed_dim, hidden, num_layers=num_layers, batch_first=True)
        self.out = nn.Linear(hidden, vocab_size)

    def forward(self, x: Tensor) -> Tensor:
        """Logits ``(B, T, vocab_size)`` of the character following each position."""
        h, _ = self.lstm(self.embed(x.long()))
        return self.out(h)

    def _scored(self, batch: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor]:
        x, y = batch
        logits = self(x)
        if y.dim() == 1:
            return logits[:, -1], y.long()
        return logits.reshape(-1, logits.shape[-1]), y.reshape(-1).long()

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        logits, y = self._scored(batch)
        loss = F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX)
        self.log("train_loss", loss, batch_size=max(1, int((y != IGNORE_INDEX).sum())))
        return loss

    def _eval(self, batch: tuple[Tensor, Tensor], stage: str) -> None:
        logits, y = self._scored(batch)
        valid = y != IGNORE_INDEX
        n = int(valid.sum())
        if n == 0:
            return
        self.log(f"{stage}_loss", F.cross_entropy(logits, y, ignore_index=IGNORE_INDEX), batch_size=n)
        acc = (logits.argmax(-1)[valid] == y[valid]).float().mean()
        self.log(f"{stage}_acc", acc, batch_size=n, prog_bar=True)

    def validation_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval(batch, "val")

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        self._eval(batch, "test")

    def configure_optimizers(self) -> torch.optim.Optimizer:
        params = [p for p in self.parameters() if p.requires_grad]
        if self.optimizer_name == "adam":
            return torch.optim.Adam(params, lr=self.lr, weight_decay=self.weight_decay)
        return torch.optim.SGD(params, lr=self.lr, momentum=self.momentum, weight_decay=self.weight_decay)
