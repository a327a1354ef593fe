"""A small synthetic LightningDataModule of dict examples with a natural key, and a module that reads them.

What a user brings: a map-style dataset whose examples are dicts (``{"x", "y", "speaker"}``), served by a
LightningDataModule with its own ``collate_fn``, and a LightningModule that takes dict batches. lightfed wraps
it with :class:`~lightfed.data.datamodule.LightningDataSource` and a natural partition by :func:`speaker_of`
(``experiments/speakers_natural.yaml``). Examples are computed from their index when read (nothing is
stored), so the dataset can be as large as the benchmark wants (``benchmarks/datasource.py``: 1M examples).

Example ``i`` has speaker ``i mod S``, class ``(3 floor(i / S) + speaker) mod C`` and features
``x = e_y + 0.3 sin((i + 1) * (k + 1))`` over feature index ``k`` (``e_y``: the class's unit vector, repeated
over the features), so the task is learnable and every speaker sees every class with its own mix.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset

__all__ = ["SpeakerExamples", "SpeakersClassifier", "SpeakersDataModule", "collate_dicts", "label_of", "speaker_of"]


class SpeakerExamples(Dataset):
    """``n`` synthetic examples ``{"x": float[dim], "y": class, "speaker": key}``, computed on read."""

    def __init__(self, n: int, num_speakers: int = 20, num_classes: int = 4, dim: int = 16, offset: int = 0) -> None:
        self.n, self.num_speakers, self.num_classes, self.dim, self.offset = n, num_speakers, num_classes, dim, offset
        self._k = torch.arange(1, dim + 1, dtype=torch.float32)
        self._onehot = torch.eye(num_classes).repeat(1, -(-dim // num_classes))[:, :dim]

    def __len__(self) -> int:
        return self.n

    @property
    def speakers(self) -> Tensor:
        """Every example's speaker, computed at once (a column: ``group_key="speakers"`` reads no example)."""
        return (torch.arange(self.n) + self.offset) % self.num_speakers

    @property
    def targets(self) -> Tensor:
        """Every example's class (torchvision's attribute name: label-skew partitioners read it)."""
        i = torch.arange(self.n) + self.offset
        return (3 * (i // self.num_speakers) + i % self.num_speakers) % self.num_classes

    def __getitem__(self, i: int) -> dict[str, Any]:
        i = int(i) + self.offset
        speaker = i % self.num_speakers
        y = (3 * (i // self.num_speakers) + speaker) % self.num_classes
        x = self._onehot[y] + 0.3 * torch.sin((i + 1) * self._k)
        return {"x": x, "y": y, "speaker": speaker}


def speaker_of(example: dict[str, Any]) -> int:
    """The natural key of an example (its speaker): a ``key_fn`` for :class:`~lightfed.data.partition.Natural`."""
    return int(example["speaker"])


def label_of(example: dict[str, Any]) -> int:
    """The class of an example: a ``label_fn`` for label-skew partitioners (``Dirichlet``)."""
    return int(example["y"])


def collate_dicts(items: list[dict[str, Any]]) -> dict[str, Tensor]:
    """The datamodule's own ``collate_fn``: ``{"x": [B, dim], "y": [B]}`` (the speaker is dropped)."""
    return {"x": torch.stack([it["x"] for it in items]), "y": torch.tensor([it["y"] for it in items])}


class SpeakersDataModule(L.LightningDataModule):
    """:class:`SpeakerExamples` for training and a held-out test set, with :func:`collate_dicts`.

    Args:
        num_examples: Training examples.
        num_speakers: Distinct speakers (the natural key).
        num_classes: Classes.
        dim: Features per example.
        test_examples: Test examples (indices after the training ones).
        batch_size: Batch size of its loaders.
    """

    def __init__(self, num_examples: int = 2000, num_speakers: int = 20, num_classes: int = 4, dim: int = 16,
                 test_examples: int = 400, batch_size: int = 64) -> None:
        super().__init__()
        self.save_hyperparameters()
        self.train_set: SpeakerExamples | None = None
        self.test_set: SpeakerExamples | None = None

    def setup(self, stage: str | None = None) -> None:
        h = self.hparams
        self.train_set = SpeakerExamples(h.num_examples, h.num_speakers, h.num_classes, h.dim)
        self.test_set = SpeakerExamples(h.test_examples, h.num_speakers, h.num_classes, h.dim, offset=h.num_examples)

    def train_dataloader(self) -> DataLoader:
        return DataLoader(self.train_set, batch_size=self.hparams.batch_size, shuffle=True, collate_fn=collate_dicts)

    def test_dataloader(self) -> DataLoader:
        return DataLoader(self.test_set, batch_size=self.hparams.batch_size, collate_fn=collate_dicts)


class SpeakersClassifier(L.LightningModule):
    """A two-layer MLP on dict batches ``{"x", "y"}`` (what a Hugging Face-style module looks like).

    Args:
        dim: Input features.
        num_classes: Classes.
        hidden: Hidden width.
        lr: SGD learning rate.
    """

    def __init__(self, dim: int = 16, num_classes: int = 4, hidden: int = 32, lr: float = 0.1) -> None:
        super().__init__()
        self.lr = lr
        self.num_classes = num_classes
        self.net = nn.Sequential(nn.Linear(dim, hidden), nn.ReLU(), nn.Linear(hidden, num_classes))

    def training_step(self, batch: dict[str, Tensor], batch_idx: int) -> Tensor:
        return F.cross_entropy(self.net(batch["x"]), batch["y"])

    def test_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        logits = self.net(batch["x"])
        self.log("test_loss", F.cross_entropy(logits, batch["y"]))
        self.log("test_acc", (logits.argmax(-1) == batch["y"]).float().mean())

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)
