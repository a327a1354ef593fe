"""Dataset loaders: shapes, dtypes, scaling, seeded splits, the IDX reader and clear errors."""

from __future__ import annotations

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest
import torch

from lightfed.data.datasets import (
    DigitsDataModule,
    FashionMNISTDataModule,
    TensorDataModule,
    read_idx,
    stratified_split,
)
from lightfed.data.partition import IID, Dirichlet, Natural


def write_idx(path: Path, array: np.ndarray, type_byte: int, compress: bool = False) -> Path:
    """An IDX file written by hand: two zero bytes, type byte, ndim, big-endian dims, big-endian data."""
    dtypes = {0x08: ">u1", 0x0C: ">i4", 0x0D: ">f4"}
    header = bytes([0, 0, type_byte, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
    payload = header + array.astype(dtypes[type_byte]).tobytes()
    with (gzip.open if compress else open)(path, "wb") as f:
        f.write(payload)
    return path


# ---------------------------------------------------------------------------------------- IDX
@pytest.mark.parametrize("compress", [False, True])
def test_read_idx_round_trip(tmp_path: Path, compress: bool) -> None:
    images = np.arange(2 * 3 * 4, dtype=np.uint8).reshape(2, 3, 4)
    ints = np.array([-7, 0, 123456], dtype=np.int32)
    floats = np.array([[0.5, -1.25]], dtype=np.float32)
    suffix = ".gz" if compress else ""

    got_images = read_idx(write_idx(tmp_path / f"a-idx3-ubyte{suffix}", images, 0x08, compress))
    got_ints = read_idx(write_idx(tmp_path / f"b-idx1-int{suffix}", ints, 0x0C, compress))
    got_floats = read_idx(write_idx(tmp_path / f"c-idx2-float{suffix}", floats, 0x0D, compress))

    assert got_images.shape == (2, 3, 4) and got_images.dtype == np.uint8
    np.testing.assert_array_equal(got_images, images)
    np.testing.assert_array_equal(got_ints, ints)
    assert got_ints.dtype.isnative
    np.testing.assert_array_equal(got_floats, floats)


def test_read_idx_rejects_bad_magic_and_truncation(tmp_path: Path) -> None:
    bad = tmp_path / "bad"
    bad.write_bytes(b"\x01\x00\x08\x01\x00\x00\x00\x02ab")
    truncated = write_idx(tmp_path / "short", np.zeros((4, 4), dtype=np.uint8), 0x08)
    truncated.write_bytes(truncated.read_bytes()[:-3])

    with pytest.raises(ValueError, match="magic number"):
        read_idx(bad)
    with pytest.raises(ValueError, match="truncated"):
        read_idx(truncated)
    with pytest.raises(FileNotFoundError, match="nope"):
        read_idx(tmp_path / "nope")


# ---------------------------------------------------------------------------------------- digits
def test_digits_shapes_dtypes_and_scaling() -> None:
    dm = DigitsDataModule(IID(5), test_fraction=0.2)
    arrays = dm.load()
    x, y = arrays.train
    x_test, y_test = arrays.test

    assert x.shape == (len(y), 64) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert len(y) + len(y_test) == 1797 and abs(len(y_test) - 0.2 * 1797) < 10
    assert float(x.min()) == 0.0 and float(x.max()) == 1.0
    assert torch.equal(arrays.labels, y) and arrays.num_classes == 10 and arrays.groups is None
    test_share = torch.bincount(y_test, minlength=10).double() / (
        torch.bincount(y, minlength=10) + torch.bincount(y_test, minlength=10)
    )
    assert torch.allclose(test_share, torch.full((10,), 0.2, dtype=torch.float64), atol=0.01)  # stratified
    assert DigitsDataModule(IID(5), flatten=False).load().train[0].shape[1:] == (1, 8, 8)


def test_digits_split_is_seeded() -> None:
    a, b, c = (DigitsDataModule(IID(5), seed=s).load().test[0] for s in (0, 0, 1))

    assert torch.equal(a, b)
    assert not torch.equal(a, c)


def test_digits_clients_after_setup() -> None:
    dm = DigitsDataModule(Dirichlet(10, alpha=0.5), val_fraction=0.25)
    dm.setup()

    assert dm.num_clients == 10
    assert int(dm.client_num_examples().sum()) + len(dm.val_part.indices) == len(dm.arrays.labels)
    xb, yb = next(dm.client_train(0).batches(8))
    assert xb.shape == (min(8, len(dm.client_train(0))), 64) and yb.dtype == torch.int64


def test_stratified_split_covers_everything() -> None:
    labels = torch.tensor([0] * 10 + [1] * 5 + [2])
    train, test = stratified_split(labels, 0.2, 0, "t")

    assert sorted(torch.cat([train, test]).tolist()) == list(range(16))
    assert torch.bincount(labels[test], minlength=3).tolist() == [2, 1, 0]


@pytest.mark.parametrize("bad", [0.0, 1.0, -0.1])
def test_digits_bad_test_fraction(bad: float) -> None:
    with pytest.raises(ValueError, match=r"data\.test_fraction"):
        DigitsDataModule(IID(5), test_fraction=bad)


# ---------------------------------------------------------------------------------------- Fashion-MNIST
def write_fake_fashion(root: Path, n_train: int = 30, n_test: int = 10) -> None:
    rng = np.random.default_rng(0)
    for split, n in (("train", n_train), ("t10k", n_test)):
        write_idx(
            root / f"{split}-images-idx3-ubyte.gz", rng.integers(0, 256, (n, 28, 28)), 0x08, compress=True
        )
        write_idx(root / f"{split}-labels-idx1-ubyte.gz", np.arange(n) % 10, 0x08, compress=True)


def test_fashion_reader_normalises_fake_files(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path)
    raw = read_idx(tmp_path / "train-images-idx3-ubyte.gz")

    arrays = FashionMNISTDataModule(IID(3), root=str(tmp_path)).load()
    flat = FashionMNISTDataModule(IID(3), root=str(tmp_path), flatten=True).load()

    expected = (torch.from_numpy(raw).float() / 255 - 0.2860) / 0.3530
    assert torch.allclose(arrays.train[0][:, 0], expected)
    assert arrays.train[0].shape == (30, 1, 28, 28) and arrays.test[0].shape == (10, 1, 28, 28)
    assert flat.train[0].shape == (30, 784)
    assert arrays.train[1].tolist() == [i % 10 for i in range(30)] and arrays.train[1].dtype == torch.int64


def test_fashion_train_subset_is_seeded(tmp_path: Path) -> None:
    write_fake_fashion(tmp_path, n_train=50)

    a = FashionMNISTDataModule(IID(2), root=str(tmp_path), train_subset=20, seed=0).load().train[0]
    b = FashionMNISTDataModule(IID(2), root=str(tmp_path), train_subset=20, seed=0).load().train[0]
    c = FashionMNISTDataModule(IID(2), root=str(tmp_path), train_subset=20, seed=1).load().train[0]

    assert a.shape[0] == 20 and torch.equal(a, b) and not torch.equal(a, c)
    with pytest.raises(ValueError, match=r"data\.train_subset=51"):
        FashionMNISTDataModule(IID(2), root=str(tmp_path), train_subset=51).load()
    with pytest.raises(ValueError, match=r"data\.train_subset"):
        FashionMNISTDataModule(IID(2), root=str(tmp_path), train_subset=0)


def test_fashion_missing_files_say_how_to_fix(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError) as err:
        FashionMNISTDataModule(IID(2), root=str(tmp_path / "empty")).load()

    message = str(err.value)
    assert str(tmp_path / "empty" / "train-images-idx3-ubyte.gz") in message
    assert "apt-get install dataset-fashion-mnist" in message and "data.root" in message


def test_fashion_mnist_from_debian_files() -> None:
    """The real files (``.ci/run`` installs Debian's dataset-fashion-mnist; without them this fails with the fix)."""
    dm = FashionMNISTDataModule(Dirichlet(10, alpha=1.0), train_subset=3000, seed=0)
    dm.setup()
    x, y = dm.arrays.train
    x_test, y_test = dm.arrays.test

    assert x.shape == (3000, 1, 28, 28) and x.dtype == torch.float32 and y.dtype == torch.int64
    assert x_test.shape == (10000, 1, 28, 28) and y_test.dtype == torch.int64
    assert set(y_test.tolist()) == set(range(10)) and torch.bincount(y_test).tolist() == [1000] * 10
    assert abs(float(x.mean())) < 0.05 and abs(float(x.std()) - 1.0) < 0.05  # the stated mean/std hold
    assert float(x.min()) == pytest.approx(-0.2860 / 0.3530, abs=1e-5)
    assert dm.num_clients == 10


# ---------------------------------------------------------------------------------------- own tensors
def make_tensors(n: int = 60) -> dict[str, torch.Tensor]:
    x = torch.randn(n, 3, generator=torch.Generator().manual_seed(0))
    x[:, 0] = torch.arange(n, dtype=torch.float32)  # an id, to trace examples through the split
    return {"x": x, "y": torch.arange(n) % 3, "writer": torch.arange(n) // 6}


def test_tensor_pt_round_trip(tmp_path: Path) -> None:
    data = make_tensors()
    path = tmp_path / "data.pt"
    torch.save(data, path)

    arrays = TensorDataModule(IID(4), str(path), test_fraction=0.25).load()
    ids_train, ids_test = arrays.train[0][:, 0].long(), arrays.test[0][:, 0].long()

    assert sorted(torch.cat([ids_train, ids_test]).tolist()) == list(range(60))
    assert len(ids_test) == 15
    assert torch.equal(arrays.train[0], data["x"][ids_train]) and torch.equal(
        arrays.train[1], data["y"][ids_train]
    )
    assert arrays.train[0].dtype == torch.float32 and arrays.train[1].dtype == torch.int64
    assert arrays.num_classes == 3 and arrays.groups is None


def test_tensor_npz_with_explicit_test_and_string_groups(tmp_path: Path) -> None:
    data = {k: v.numpy() for k, v in make_tensors().items()}
    writers = np.array([f"w{int(w):02d}" for w in data["writer"]])
    path = tmp_path / "data.npz"
    np.savez(
        path,
        x=data["x"].astype(np.float64),
        y=data["y"].astype(np.int32),
        writer=writers,
        x_test=data["x"][:7],
        y_test=data["y"][:7],
    )

    dm = TensorDataModule(Natural(min_size=1), str(path), group_key="writer", val_fraction=0.0)
    dm.setup()

    assert torch.equal(dm.arrays.test[0], torch.from_numpy(data["x"][:7]))
    assert len(dm.arrays.train[0]) == 60 and dm.arrays.train[0].dtype == torch.float32
    assert dm.num_clients == 10
    assert [dm.client_train(i).indices.tolist() for i in range(2)] == [list(range(6)), list(range(6, 12))]


def test_tensor_groups_follow_the_train_split(tmp_path: Path) -> None:
    path = tmp_path / "data.pt"
    torch.save(make_tensors(), path)

    arrays = TensorDataModule(IID(2), str(path), group_key="writer").load()

    assert torch.equal(arrays.groups, arrays.train[0][:, 0].long() // 6)


def test_tensor_missing_file_and_keys(tmp_path: Path) -> None:
    path = tmp_path / "data.pt"
    torch.save(make_tensors(), path)

    with pytest.raises(FileNotFoundError, match=r"data\.path"):
        TensorDataModule(IID(2), str(tmp_path / "missing.pt")).load()
    with pytest.raises(KeyError, match=r"data\.y_key='label'.*available keys: \['writer', 'x', 'y'\]"):
        TensorDataModule(IID(2), str(path), y_key="label").load()
    with pytest.raises(KeyError, match=r"data\.group_key='speaker'"):
        TensorDataModule(IID(2), str(path), group_key="speaker").load()
    with pytest.raises(ValueError, match=r"data\.path"):
        TensorDataModule(IID(2), str(tmp_path / "data.csv"))


def test_tensor_half_a_test_set_raises(tmp_path: Path) -> None:
    data = make_tensors()
    path = tmp_path / "data.pt"
    torch.save({**data, "x_test": data["x"][:3]}, path)

    with pytest.raises(KeyError, match="y_test"):
        TensorDataModule(IID(2), str(path)).load()
