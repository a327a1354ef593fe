"""Animal-MNIST from the animal-mnist package: shapes, stratified split, normalisation, a safe reader."""

from __future__ import annotations

import gzip
import importlib.util
import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from lightfed.data.animal import AnimalMNISTDataModule, animal_mnist_dir, read_numpy_pickle
from lightfed.data.datasets import FashionMNISTDataModule
from lightfed.data.partition import IID, Dirichlet


def test_loads_the_packaged_images_with_a_stratified_split() -> None:
    dm = AnimalMNISTDataModule(Dirichlet(num_clients=20, alpha=0.5), test_fraction=0.2)
    dm.setup()
    x, y = dm.arrays.train
    tx, ty = dm.arrays.test
    assert x.shape == (8_000, 1, 28, 28) and tx.shape == (2_000, 1, 28, 28)
    assert torch.bincount(ty).tolist() == [200] * 10 and torch.bincount(y).tolist() == [800] * 10
    assert dm.num_clients == 20 and int(dm.client_num_examples().sum()) + int(dm.val_part.sizes().sum()) == 8_000
    # normalised with Fashion-MNIST's statistics: undoing it gives back the raw bytes
    raw = read_numpy_pickle(animal_mnist_dir() / "animal_data_version_3.gz")
    labels = read_numpy_pickle(animal_mnist_dir() / "animal_label_version_3.gz")
    pixels = (x * FashionMNISTDataModule.STD + FashionMNISTDataModule.MEAN) * 255
    assert torch.allclose(pixels, pixels.round(), atol=1e-3) and float(pixels.min()) > -1e-3
    # every training image is one of the packaged images with its label
    first = pixels[0, 0].round().to(torch.uint8).numpy()
    matches = np.flatnonzero((raw == first).all(axis=(1, 2)))
    assert len(matches) >= 1 and int(labels[matches[0]]) == int(y[0])


def test_flatten_and_own_statistics() -> None:
    dm = AnimalMNISTDataModule(IID(num_clients=2), flatten=True, mean=0.0, std=1.0)
    dm.setup()
    x = dm.arrays.train[0]
    assert x.shape == (8_000, 784) and float(x.min()) == 0.0 and float(x.max()) == 1.0


def test_split_is_seeded() -> None:
    a = AnimalMNISTDataModule(IID(num_clients=2), seed=1)
    b = AnimalMNISTDataModule(IID(num_clients=2), seed=1)
    c = AnimalMNISTDataModule(IID(num_clients=2), seed=2)
    for dm in (a, b, c):
        dm.setup()
    assert torch.equal(a.arrays.test[0], b.arrays.test[0])
    assert not torch.equal(a.arrays.test[0], c.arrays.test[0])


def test_reader_refuses_anything_but_arrays(tmp_path: Path) -> None:
    evil = tmp_path / "evil.gz"
    with gzip.open(evil, "wb") as f:
        f.write(pickle.dumps(os.system))  # a reference to a callable: never resolved
    with pytest.raises(pickle.UnpicklingError, match="refusing to load"):
        read_numpy_pickle(evil)
    plain = tmp_path / "dict.pkl"
    plain.write_bytes(pickle.dumps({"a": 1}))
    with pytest.raises(pickle.UnpicklingError, match="not a NumPy array"):
        read_numpy_pickle(plain)
    ok = tmp_path / "ok.gz"
    with gzip.open(ok, "wb") as f:
        f.write(pickle.dumps(np.arange(6, dtype=np.uint8).reshape(2, 3)))
    assert read_numpy_pickle(ok).tolist() == [[0, 1, 2], [3, 4, 5]]


def test_missing_package_and_files_say_how_to_fix(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(FileNotFoundError, match="animal-mnist==0.4.*data.root"):
        AnimalMNISTDataModule(IID(num_clients=2), root=str(tmp_path)).setup()
    real = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "animal_mnist" else real(name, *a))
    with pytest.raises(ImportError, match="pip install --no-deps animal-mnist==0.4"):
        AnimalMNISTDataModule(IID(num_clients=2)).setup()


def test_bad_arguments() -> None:
    with pytest.raises(ValueError, match="data.test_fraction"):
        AnimalMNISTDataModule(IID(num_clients=2), test_fraction=0.0)
    with pytest.raises(ValueError, match="data.std"):
        AnimalMNISTDataModule(IID(num_clients=2), std=0.0)
