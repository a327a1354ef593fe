"""Datasets: :class:`~lightfed.data.datamodule.FederatedDataModule` subclasses that load real data.

Each implements :meth:`load` and returns pooled float32 inputs and int64 labels; the partitioner (the
first argument of each) then splits the training set into clients. All randomness (train/test splits,
subsets) is derived from the datamodule's ``seed``.

* :class:`DigitsDataModule` - scikit-learn's bundled 8x8 digits (1,797 images, offline, tiny).
* :class:`FashionMNISTDataModule` - Fashion-MNIST from its four IDX files (:func:`read_idx`).
* :class:`TensorDataModule` - your own tensors from a ``.pt`` or ``.npz`` file.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from lightfed.checks import check_range
from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.data.partition import Partitioner
from lightfed.seeding import make_generator

__all__ = ["DigitsDataModule", "FashionMNISTDataModule", "TensorDataModule", "read_idx", "stratified_split"]

# IDX type byte -> big-endian numpy dtype (http://yann.lecun.com/exdb/mnist/, "THE IDX FILE FORMAT").
_IDX_DTYPES = {0x08: ">u1", 0x09: ">i1", 0x0B: ">i2", 0x0C: ">i4", 0x0D: ">f4", 0x0E: ">f8"}


def read_idx(path: str | Path) -> np.ndarray:
    """Read an IDX file (the MNIST family's format), gzipped or not.

    The header is two zero bytes, a type byte (``0x08`` ubyte, ``0x09`` byte, ``0x0B`` short, ``0x0C``
    int, ``0x0D`` float, ``0x0E`` double), the number of dimensions, then one big-endian uint32 per
    dimension; the data follow in C order, big-endian. A path ending in ``.gz`` is decompressed.

    Args:
        path: The file.

    Returns:
        An array of the header's shape, in native byte order.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        ValueError: If the file is not readable gzip (for ``.gz``), or the magic number or the data length
            does not match the IDX format.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"IDX file {path} does not exist.")
    if path.suffix == ".gz":
        try:
            with gzip.open(path, "rb") as f:
                raw = f.read()
        except (OSError, EOFError, zlib.error) as err:
            raise ValueError(
                f"{path} is not a readable gzip file ({type(err).__name__}: {err}); it is truncated or corrupt: "
                f"fetch it again, or give the uncompressed IDX file."
            ) from err
    else:
        raw = path.read_bytes()
    if len(raw) < 4 or raw[0] != 0 or raw[1] != 0 or raw[2] not in _IDX_DTYPES:
        raise ValueError(
            f"{path} is not an IDX file: bad magic number {raw[:4].hex()} (expected 0000 followed by a type "
            f"byte in {sorted(hex(k) for k in _IDX_DTYPES)} and the number of dimensions)."
        )
    dtype, ndim = np.dtype(_IDX_DTYPES[raw[2]]), raw[3]
    shape = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    offset = 4 + 4 * ndim
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if len(raw) - offset != expected:
        raise ValueError(
            f"{path}: the header promises shape {shape} of {dtype} ({expected} bytes) but {len(raw) - offset} "
            f"bytes follow; the file is truncated or corrupt."
        )
    data = np.frombuffer(raw, dtype=dtype, offset=offset).reshape(shape)
    return data.astype(dtype.newbyteorder("="))


def stratified_split(
    labels: Tensor, test_fraction: float, seed: int, *keys: int | str
) -> tuple[Tensor, Tensor]:
    """Seeded stratified split: ``round(test_fraction * n_k)`` examples of each class ``k`` go to the test set.

    Args:
        labels: Integer labels, one per example.
        test_fraction: Fraction of each class held out, in (0, 1).
        seed: Run seed; the generator is ``make_generator(seed, "split", *keys)``.
        *keys: Further keys that name the split (e.g. the dataset).

    Returns:
        Sorted train and test index vectors (int64), disjoint, covering all examples.
    """
    gen = make_generator(seed, "split", *keys)
    train, test = [], []
    for k in torch.unique(labels):
        idx = torch.nonzero(labels == k).flatten()
        idx = idx[torch.randperm(len(idx), generator=gen)]
        n_test = int(round(test_fraction * len(idx)))
        test.append(idx[:n_test])
        train.append(idx[n_test:])
    return torch.cat(train).sort().values, torch.cat(test).sort().values


def _check_fraction(value: float, field: str) -> float:
    return check_range(value, f"data.{field}", 0, 1, low_open=True)


# ---------------------------------------------------------------------------------------- digits
class DigitsDataModule(FederatedDataModule):
    """scikit-learn's 8x8 handwritten digits (bundled with scikit-learn, no download).

    1,797 images of 10 classes; pixels 0..16 are scaled to [0, 1]. A seeded stratified split holds out
    ``test_fraction`` as the central test set. Small enough for unit tests and quick demos.

    Args:
        partitioner: How the training set is split into clients.
        val_fraction: Fraction of each client's examples held out for federated evaluation.
        batch_size: Batch size of the centralised dataloaders.
        seed: Seed of the test split, the partition and the validation splits.
        test_fraction: Fraction of each class in the central test set, in (0, 1).
        flatten: Inputs of shape ``(N, 64)`` if true, else ``(N, 1, 8, 8)``.
    """

    def __init__(
        self,
        partitioner: Partitioner,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
        test_fraction: float = 0.2,
        flatten: bool = True,
    ) -> None:
        super().__init__(partitioner, val_fraction=val_fraction, batch_size=batch_size, seed=seed)
        self.test_fraction = _check_fraction(test_fraction, "test_fraction")
        self.flatten = flatten

    def load(self) -> FederatedArrays:
        from sklearn.datasets import load_digits

        digits = load_digits()
        x = torch.as_tensor(digits.data, dtype=torch.float32) / 16.0
        y = torch.as_tensor(digits.target, dtype=torch.int64)
        if not self.flatten:
            x = x.reshape(-1, 1, 8, 8)
        train, test = stratified_split(y, self.test_fraction, self.seed, "digits")
        return FederatedArrays(
            train=(x[train], y[train]), test=(x[test], y[test]), labels=y[train], groups=None, num_classes=10
        )


# ---------------------------------------------------------------------------------------- Fashion-MNIST
class FashionMNISTDataModule(FederatedDataModule):
    """Fashion-MNIST (Xiao, Rasul, Vollgraf 2017): 60,000 + 10,000 28x28 grey images of 10 clothing classes.

    Reads the four IDX files ``{train,t10k}-{images-idx3,labels-idx1}-ubyte.gz`` under ``root`` (Debian's
    ``dataset-fashion-mnist`` package installs them at the default root). Pixels are scaled to [0, 1] and
    normalised, :math:`x \\mapsto (x - 0.2860) / 0.3530` (the training set's mean and std).

    Args:
        partitioner: How the training set is split into clients.
        root: Folder holding the four IDX files.
        val_fraction: Fraction of each client's examples held out for federated evaluation.
        batch_size: Batch size of the centralised dataloaders.
        seed: Seed of the subset, the partition and the validation splits.
        train_subset: Keep a seeded random subset of this many training examples (fast runs), or all.
        flatten: Inputs of shape ``(N, 784)`` if true, else ``(N, 1, 28, 28)``.
    """

    MEAN = 0.2860
    STD = 0.3530
    FILES = {
        "train_x": "train-images-idx3-ubyte.gz",
        "train_y": "train-labels-idx1-ubyte.gz",
        "test_x": "t10k-images-idx3-ubyte.gz",
        "test_y": "t10k-labels-idx1-ubyte.gz",
    }

    def __init__(
        self,
        partitioner: Partitioner,
        root: str = "/usr/share/datasets/fashion-mnist",
        val_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
        train_subset: int | None = None,
        flatten: bool = False,
    ) -> None:
        super().__init__(partitioner, val_fraction=val_fraction, batch_size=batch_size, seed=seed)
        if train_subset is not None and (isinstance(train_subset, bool) or train_subset < 1):
            raise ValueError(f"data.train_subset must be an int >= 1 or null, got {train_subset!r}.")
        self.root = root
        self.train_subset = train_subset
        self.flatten = flatten

    def source_name(self) -> str:
        return f"Fashion-MNIST under data.root={self.root!r}"

    def _images(self, path: Path) -> Tensor:
        raw = read_idx(path)
        if raw.ndim != 3 or raw.dtype != np.uint8:
            raise ValueError(
                f"{path}: expected uint8 images of shape (N, H, W), got {raw.dtype} {raw.shape}."
            )
        return torch.from_numpy(raw)

    def _normalise(self, raw: Tensor) -> Tensor:
        x = (raw.float() / 255.0 - self.MEAN) / self.STD
        return x.reshape(len(x), -1) if self.flatten else x.unsqueeze(1)

    def _labels(self, path: Path) -> Tensor:
        raw = read_idx(path)
        if raw.ndim != 1:
            raise ValueError(f"{path}: expected a vector of labels, got shape {raw.shape}.")
        return torch.from_numpy(raw).long()

    def load(self) -> FederatedArrays:
        root = Path(self.root)
        paths = {k: root / name for k, name in self.FILES.items()}
        missing = [str(p) for p in paths.values() if not p.is_file()]
        if missing:
            raise FileNotFoundError(
                f"Fashion-MNIST files not found: {', '.join(missing)}. Install them with "
                f"`sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu), or set data.root to a folder "
                f"holding the four IDX files {', '.join(self.FILES.values())}."
            )
        x_train, y_train = self._images(paths["train_x"]), self._labels(paths["train_y"])
        x_test, y_test = self._images(paths["test_x"]), self._labels(paths["test_y"])
        if len(x_train) != len(y_train) or len(x_test) != len(y_test):
            raise ValueError(f"Fashion-MNIST under {root}: image and label files disagree in length.")
        if self.train_subset is not None:
            if self.train_subset > len(y_train):
                raise ValueError(
                    f"data.train_subset={self.train_subset} exceeds the {len(y_train)} training examples; "
                    f"lower it or set it to null."
                )
            gen = make_generator(self.seed, "train_subset", "fashion_mnist")
            keep = torch.randperm(len(y_train), generator=gen)[: self.train_subset].sort().values
            x_train, y_train = x_train[keep], y_train[keep]
        x_train, x_test = self._normalise(x_train), self._normalise(x_test)
        return FederatedArrays(
            train=(x_train, y_train), test=(x_test, y_test), labels=y_train, groups=None, num_classes=10
        )


# ---------------------------------------------------------------------------------------- own tensors
class TensorDataModule(FederatedDataModule):
    """Your own data from a ``.pt`` file (a dict of tensors) or an ``.npz`` file (named arrays).

    The file holds inputs under ``x_key`` and integer labels under ``y_key``; optionally a group key per
    example under ``group_key`` (for :class:`~lightfed.data.partition.Natural`), and an explicit test set
    under ``"{x_key}_test"`` / ``"{y_key}_test"`` (``x_test`` / ``y_test`` by default). Without a test set,
    a seeded stratified split holds out ``test_fraction``. Inputs are cast to float32 as they are (no
    scaling), labels to int64 (float labels must be whole numbers); group keys may be integers or, in an
    ``.npz``, strings (ordered by value). ``.pt`` files are read with ``torch.load(weights_only=True)``.
    At set-up the data are checked (:func:`~lightfed.data.datamodule.check_arrays`): labels in
    ``[0, num_classes)``, no NaN or Inf inputs, inputs and labels of one length.

    Args:
        partitioner: How the training set is split into clients.
        path: The ``.pt`` or ``.npz`` file.
        val_fraction: Fraction of each client's examples held out for federated evaluation.
        batch_size: Batch size of the centralised dataloaders.
        seed: Seed of the test split, the partition and the validation splits.
        test_fraction: Fraction of each class held out as the test set when the file has none, in (0, 1).
        x_key: Key of the inputs.
        y_key: Key of the labels.
        group_key: Key of the per-example group ids, or ``None``.
        num_classes: The number of classes (labels must lie in ``[0, num_classes)``), or ``None`` for the
            largest label + 1. Set it to the model's ``num_classes`` to have a stray label refused at load.
    """

    def __init__(
        self,
        partitioner: Partitioner,
        path: str,
        val_fraction: float = 0.2,
        batch_size: int = 64,
        seed: int = 0,
        test_fraction: float = 0.2,
        x_key: str = "x",
        y_key: str = "y",
        group_key: str | None = None,
        num_classes: int | None = None,
    ) -> None:
        super().__init__(partitioner, val_fraction=val_fraction, batch_size=batch_size, seed=seed)
        if Path(path).suffix not in (".pt", ".npz"):
            raise ValueError(f"data.path must name a .pt or .npz file, got {path!r}.")
        if num_classes is not None and (isinstance(num_classes, bool) or num_classes < 2):
            raise ValueError(f"data.num_classes must be an int >= 2 or null (the largest label + 1), got {num_classes!r}.")
        self.path = path
        self.test_fraction = _check_fraction(test_fraction, "test_fraction")
        self.x_key, self.y_key, self.group_key = x_key, y_key, group_key
        self.num_classes = num_classes

    def source_name(self) -> str:
        return f"data.path={self.path!r}"

    _FORMATS = {
        ".pt": "a .pt file: a dict of tensors written by torch.save({'x': x, 'y': y}, path)",
        ".npz": "an .npz file: named arrays written by np.savez(path, x=x, y=y)",
    }

    def _read(self) -> dict[str, np.ndarray | Tensor]:
        path = Path(self.path)
        if not path.is_file():
            raise FileNotFoundError(
                f"data.path={self.path!r} does not exist; point data.path at a .pt or .npz file."
            )
        try:
            if path.suffix == ".npz":
                with np.load(path, allow_pickle=False) as f:
                    if not isinstance(f, np.lib.npyio.NpzFile):
                        raise ValueError("it holds a single array, not named arrays")
                    return {k: f[k] for k in f.files}
            obj = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as err:  # noqa: BLE001 - re-raised with the path and the expected format
            first = (str(err).strip().splitlines() or [""])[0]
            raise ValueError(
                f"data.path={self.path!r} could not be read ({type(err).__name__}: {first}). "
                f"Expected {self._FORMATS[path.suffix]}."
            ) from err
        if not isinstance(obj, dict):
            raise ValueError(f"data.path={self.path!r} holds a {type(obj).__name__}; save a dict of tensors.")
        return obj

    def _get(self, data: dict, key: str, field: str) -> np.ndarray | Tensor:
        if key not in data:
            raise KeyError(
                f"data.{field}={key!r} is not in {self.path}; available keys: {sorted(data)}. "
                f"Set data.{field} to one of them."
            )
        return data[key]

    def _tensor(self, data: dict, key: str, field: str) -> Tensor:
        value = self._get(data, key, field)
        try:
            return torch.as_tensor(value)
        except (TypeError, ValueError, RuntimeError) as err:
            raise ValueError(
                f"{self.path}: {key!r} holds {type(value).__name__} that is not numbers ({err}); save a tensor or a "
                f"numeric array."
            ) from err

    def _class_ids(self, values: Tensor, key: str) -> Tensor:
        """Labels as int64; float labels must be whole numbers (``.long()`` would truncate 0.7 to class 0)."""
        if values.is_floating_point():
            bad = (values != values.round()) | ~torch.isfinite(values)
            if bool(bad.any()):
                raise ValueError(
                    f"{self.path}: labels {key!r} hold {int(bad.sum())} of {values.numel()} values that are not "
                    f"whole numbers (e.g. {values[bad][0].item():g}); classification needs integer class ids "
                    f"0, 1, ..., not scores or probabilities. Save the class of each example."
                )
        return values.long().reshape(-1)

    @staticmethod
    def _group_ids(values: np.ndarray | Tensor) -> Tensor:
        arr = values.cpu().numpy() if isinstance(values, Tensor) else np.asarray(values)
        if np.issubdtype(arr.dtype, np.integer):
            return torch.as_tensor(arr, dtype=torch.int64).reshape(-1)
        return torch.as_tensor(np.unique(arr.reshape(-1), return_inverse=True)[1], dtype=torch.int64)

    def load(self) -> FederatedArrays:
        data = self._read()
        x = self._tensor(data, self.x_key, "x_key").float()
        y = self._class_ids(self._tensor(data, self.y_key, "y_key"), self.y_key)
        groups = (
            None if self.group_key is None else self._group_ids(self._get(data, self.group_key, "group_key"))
        )
        if len(x) == 0:
            raise ValueError(f"data.path={self.path!r}: {self.x_key!r} holds no examples.")
        for name, t in (("labels", y), ("group keys", groups)):
            if t is not None and len(t) != len(x):
                raise ValueError(f"{self.path}: {len(x)} inputs but {len(t)} {name}.")
        xt_key, yt_key = f"{self.x_key}_test", f"{self.y_key}_test"
        if (xt_key in data) != (yt_key in data):
            raise KeyError(f"{self.path} has only one of {xt_key!r} / {yt_key!r}; save both or neither.")
        if xt_key in data:
            test = (self._tensor(data, xt_key, "x_key").float(), self._class_ids(self._tensor(data, yt_key, "y_key"), yt_key))
            if len(test[0]) != len(test[1]):
                raise ValueError(f"{self.path}: {len(test[0])} test inputs but {len(test[1])} test labels.")
            train_idx = torch.arange(len(y))
        else:
            train_idx, test_idx = stratified_split(y, self.test_fraction, self.seed, "tensor")
            test = (x[test_idx], y[test_idx])
        y_train = y[train_idx]
        num_classes = self.num_classes if self.num_classes is not None else int(torch.cat([y, test[1]]).max()) + 1
        return FederatedArrays(
            train=(x[train_idx], y_train),
            test=test,
            labels=y_train,
            groups=None if groups is None else groups[train_idx],
            num_classes=num_classes,
        )
