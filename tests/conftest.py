"""Shared "Boring" fixtures: a tiny synthetic federated dataset and a tiny classifier.

The environment the suite needs is set here, before torch or transformers is imported, so the README's
``python -m pytest -q`` needs no exported variables: Hugging Face offline (every model is a local folder;
tests/models/test_hf.py also refuses sockets) and one OpenMP thread (the tests' tensors are tiny). A value
already in the environment wins.
"""

from __future__ import annotations

import os

for _name, _value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1", "OMP_NUM_THREADS": "1"}.items():
    os.environ.setdefault(_name, _value)

import lightning as L  # noqa: E402 - after the environment above
import pytest  # noqa: E402
import torch  # noqa: E402

from lightfed.data.datamodule import FederatedArrays, FederatedDataModule  # noqa: E402
from lightfed.data.partition import IID, Partitioner  # noqa: E402
from lightfed.models import MLPClassifier  # noqa: E402
from lightfed.seeding import make_generator  # noqa: E402


class BoringFederatedData(FederatedDataModule):
    """Three Gaussian blobs in 8 dimensions: separable, tiny, generated from the seed."""

    def __init__(self, partitioner: Partitioner | None = None, n: int = 240, val_fraction: float = 0.2, seed: int = 0) -> None:
        super().__init__(partitioner or IID(num_clients=12), val_fraction=val_fraction, batch_size=32, seed=seed)
        self.n = n

    def load(self) -> FederatedArrays:
        gen = make_generator(123, "boring")
        centers = torch.randn(3, 8, generator=gen) * 3
        y = torch.randint(0, 3, (self.n + 90,), generator=gen)
        x = centers[y] + torch.randn(len(y), 8, generator=gen)
        return FederatedArrays(train=(x[: self.n], y[: self.n]), test=(x[self.n :], y[self.n :]), labels=y[: self.n], num_classes=3)


def boring_model(seed: int = 0, **kwargs) -> MLPClassifier:
    L.seed_everything(seed, verbose=False)
    kwargs.setdefault("lr", 0.1)
    return MLPClassifier(in_features=8, hidden=[16], num_classes=3, **kwargs)


@pytest.fixture
def boring_data() -> BoringFederatedData:
    return BoringFederatedData()


@pytest.fixture(autouse=True)
def _one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
