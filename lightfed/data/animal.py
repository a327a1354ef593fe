"""Animal-MNIST: 10,000 28x28 animal silhouettes in 10 classes, from the ``animal-mnist`` package.

The PyPI package ``animal-mnist`` (install with ``--no-deps``: its loaders import TensorFlow, which lightfed
does not need) ships ``animal_mnist/data/Animal_MNIST/animal_{data,label}_version_3.gz``: gzipped pickles
of a ``uint8`` array ``(10000, 28, 28)`` and an ``int64`` label vector, 1,000 images per class. The
package is located with :func:`importlib.util.find_spec` and never imported, and the pickles are read
with an unpickler that only accepts NumPy arrays, so reading the files cannot run foreign code.

It pairs with Fashion-MNIST in the pretrain-then-federate workflow (``experiments/pretrain_fashion.yaml``
then ``experiments/animal_head.yaml``): same image size, different classes. By default the images are
normalised with Fashion-MNIST's statistics, so a model pretrained there sees inputs on the scale it knows
(Animal-MNIST's own are close: mean 0.273, std 0.406).
"""

from __future__ import annotations

import gzip
import importlib.util
import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch

from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.data.datasets import FashionMNISTDataModule, stratified_split
from lightfed.data.partition import Partitioner

__all__ = ["AnimalMNISTDataModule", "animal_mnist_dir", "read_numpy_pickle"]

ANIMAL_INSTALL = "pip install --no-deps animal-mnist==0.4"
FILES = {"x": "animal_data_version_3.gz", "y": "animal_label_version_3.gz"}
_ALLOWED = {
    ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
    ("numpy", "ndarray"), ("numpy", "dtype"),
}


class _NumpyOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _ALLOWED:
            raise pickle.UnpicklingError(f"refusing to load {module}.{name}: only NumPy arrays are accepted.")
        return super().find_class(module, name)


def read_numpy_pickle(path: str | Path) -> np.ndarray:
    """A NumPy array from a (gzipped) pickle, refusing any object that is not an array.

    Raises:
        pickle.UnpicklingError: the pickle holds something other than an array.
    """
    path = Path(path)
    opener = gzip.open if path.suffix == ".gz" else open
    with opener(path, "rb") as f:
        obj = _NumpyOnlyUnpickler(f).load()
    if not isinstance(obj, np.ndarray):
        raise pickle.UnpicklingError(f"{path} holds a {type(obj).__name__}, not a NumPy array.")
    return obj


def animal_mnist_dir(root: str | None = None) -> Path:
    """The folder of the two Animal-MNIST files: ``root``, or the installed ``animal-mnist`` package's.

    Raises:
        ImportError: the package is not installed (and no ``root`` given), naming the install command.
    """
    if root is not None:
        return Path(root).expanduser()
    spec = importlib.util.find_spec("animal_mnist")
    if spec is None or not spec.submodule_search_locations:
        raise ImportError(
            f"AnimalMNISTDataModule reads the files of the `animal-mnist` package, which is not installed: "
            f"`{ANIMAL_INSTALL}` (or set data.root to a folder holding {', '.join(FILES.values())})."
        )
    return Path(next(iter(spec.submodule_search_locations))) / "data" / "Animal_MNIST"


class AnimalMNISTDataModule(FederatedDataModule):
    """Animal-MNIST (10 classes x 1,000 silhouettes, 28x28), with a seeded stratified central test split.

    Pixels are scaled to [0, 1] and normalised, :math:`x \\mapsto (x - \\text{mean}) / \\text{std}`.

    Args:
        partitioner: How the training set is split into clients.
        root: Folder holding the two files (default: the ``animal-mnist`` package's).
        val_fraction: Fraction of each client's examples held out for federated evaluation.
        batch_size: Batch size of the centralised dataloaders.
        seed: Seed of the test split, the partition and the validation splits.
        test_fraction: Fraction of each class in the central test set, in (0, 1).
        flatten: Inputs of shape ``(N, 784)`` if true, else ``(N, 1, 28, 28)``.
        mean: Normalisation mean (default Fashion-MNIST's, for transfer from it).
        std: Normalisation standard deviation (default Fashion-MNIST's).
    """

    def __init__(
        self,
        partitioner: Partitioner,
        root: str | None = None,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
        test_fraction: float = 0.2,
        flatten: bool = False,
        mean: float = FashionMNISTDataModule.MEAN,
        std: float = FashionMNISTDataModule.STD,
    ) -> None:
        super().__init__(partitioner, val_fraction=val_fraction, batch_size=batch_size, seed=seed)
        if not 0 < test_fraction < 1:
            raise ValueError(f"data.test_fraction must be in (0, 1), got {test_fraction}.")
        if std <= 0:
            raise ValueError(f"data.std must be > 0, got {std}.")
        self.root, self.test_fraction, self.flatten, self.mean, self.std = root, test_fraction, flatten, mean, std

    def load(self) -> FederatedArrays:
        base = animal_mnist_dir(self.root)
        paths = {k: base / name for k, name in FILES.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Animal-MNIST files not found: {', '.join(missing)}. Install them with `{ANIMAL_INSTALL}` or set "
                f"data.root to a folder holding {', '.join(FILES.values())}."
            )
        images, labels = read_numpy_pickle(paths["x"]), read_numpy_pickle(paths["y"])
        if images.ndim != 3 or images.dtype != np.uint8 or labels.ndim != 1 or len(labels) != len(images):
            raise ValueError(
                f"Animal-MNIST under {base}: expected uint8 images (N, H, W) and N labels, got {images.dtype} "
                f"{images.shape} and {labels.shape}."
            )
        x = (torch.from_numpy(images.copy()).float() / 255.0 - self.mean) / self.std
        x = x.reshape(len(x), -1) if self.flatten else x.unsqueeze(1)
        y = torch.from_numpy(labels.astype(np.int64))
        train, test = stratified_split(y, self.test_fraction, self.seed, "animal_mnist")
        return FederatedArrays(
            train=(x[train], y[train]), test=(x[test], y[test]), labels=y[train], groups=None,
            num_classes=int(y.max()) + 1,
        )
