"""Bad data is refused at set-up, naming the datamodule (and the file), not mid-round with torch's message."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.data.datasets import DigitsDataModule, TensorDataModule, read_idx
from lightfed.data.partition import IID


class _Given(FederatedDataModule):
    """A third-party datamodule whose ``load`` returns whatever the test hands it."""

    def __init__(self, arrays: FederatedArrays) -> None:
        super().__init__(IID(num_clients=2), val_fraction=0.0)
        self.given = arrays

    def load(self) -> FederatedArrays:
        return self.given


def _arrays(n: int = 20, n_test: int = 6, num_classes: int | None = 3, **changes) -> FederatedArrays:
    x, y = torch.randn(n, 4, generator=torch.Generator().manual_seed(0)), torch.arange(n) % 3
    xt, yt = torch.randn(n_test, 4), torch.arange(n_test) % 3
    fields = {"train": (x, y), "test": (xt, yt), "labels": y, "num_classes": num_classes}
    fields.update(changes)
    return FederatedArrays(**fields)


def _save(tmp_path: Path, name: str = "data.pt", **tensors) -> str:
    n = 30
    data = {"x": torch.randn(n, 3, generator=torch.Generator().manual_seed(0)), "y": torch.arange(n) % 3}
    data.update(tensors)
    path = tmp_path / name
    if path.suffix == ".npz":
        np.savez(path, **{k: v.numpy() for k, v in data.items()})
    else:
        torch.save(data, path)
    return str(path)


# ---------------------------------------------------------------------------------------- item 4: label range
@pytest.mark.parametrize("bad", [12, -1])
def test_labels_out_of_range_are_refused_at_setup(bad: int) -> None:
    # Prepare: one training label outside [0, 10)
    y = torch.arange(20) % 10
    y[7] = bad
    dm = _Given(_arrays(train=(torch.randn(20, 4), y), labels=y, num_classes=10))

    # Execute / Assert
    with pytest.raises(ValueError, match=rf"(?s)_Given.*training labels.*\[0, 10\).*{bad}.*1 of 20"):
        dm.setup()


def test_test_targets_out_of_range_are_refused() -> None:
    yt = torch.tensor([0, 1, 2, 3, 1, 0])
    with pytest.raises(ValueError, match=r"test targets.*\[0, 3\).*3"):
        _Given(_arrays(test=(torch.randn(6, 4), yt))).setup()


def test_negative_labels_are_refused_without_num_classes() -> None:
    y = torch.arange(20) % 3 - 1
    with pytest.raises(ValueError, match=r"training labels must be >= 0, but hold \[-1\] \(7 of 20\).*negative"):
        _Given(_arrays(train=(torch.randn(20, 4), y), labels=y, num_classes=None)).setup()


def test_tensor_file_declares_num_classes(tmp_path: Path) -> None:
    y = torch.arange(30) % 3
    y[4] = 12
    path = _save(tmp_path, y=y)

    with pytest.raises(ValueError, match=rf"(?s){tmp_path}.*\[0, 10\).*12"):
        TensorDataModule(IID(2), path, num_classes=10).setup()
    with pytest.raises(ValueError, match=r"data\.num_classes"):
        TensorDataModule(IID(2), path, num_classes=1)


def test_tensor_file_with_label_minus_one_names_the_file(tmp_path: Path) -> None:
    y = torch.arange(30) % 3
    y[0] = -1
    with pytest.raises(ValueError, match=rf"(?s){tmp_path}.*negative"):
        TensorDataModule(IID(2), _save(tmp_path, y=y)).setup()


def test_ignore_index_targets_are_allowed() -> None:
    # char-LM style: (N, T) integer targets whose padding is -100 (F.cross_entropy's ignore_index)
    y = torch.randint(0, 5, (20, 8), generator=torch.Generator().manual_seed(1))
    y[:, -2:] = -100
    x = torch.randint(0, 5, (20, 8))
    dm = _Given(FederatedArrays(train=(x, y), test=(x[:4], y[:4, 0]), labels=y[:, 0], num_classes=5))
    dm.setup()
    assert dm.num_clients == 2


# ---------------------------------------------------------------------------------------- item 5: NaN / Inf
def test_nan_and_inf_features_are_counted_by_row() -> None:
    x = torch.randn(20, 4)
    x[3, 1] = float("nan")
    x[3, 2] = float("inf")  # same row: counted once
    x[9, 0] = -float("inf")
    with pytest.raises(ValueError, match=r"2 of 20 training examples.*NaN or Inf.*\[3, 9\]"):
        _Given(_arrays(train=(x, torch.arange(20) % 3))).setup()


def test_nan_in_test_features_is_refused() -> None:
    xt = torch.randn(6, 4)
    xt[5] = float("nan")
    with pytest.raises(ValueError, match=r"1 of 6 test examples.*NaN or Inf"):
        _Given(_arrays(test=(xt, torch.arange(6) % 3))).setup()


def test_nan_in_a_tensor_file_names_the_file(tmp_path: Path) -> None:
    x = torch.randn(30, 3)
    x[[1, 2, 5]] = float("nan")
    with pytest.raises(ValueError, match=rf"(?s){tmp_path}.*3 of \d+ training examples.*NaN"):
        TensorDataModule(IID(2), _save(tmp_path, x=x, x_test=torch.randn(4, 3), y_test=torch.arange(4) % 3)).setup()


def test_huge_but_finite_features_pass() -> None:
    # a sum that overflows float32 must not be mistaken for an Inf in the data
    x = torch.full((20, 4), 3e38)
    _Given(_arrays(train=(x, torch.arange(20) % 3))).setup()


# ---------------------------------------------------------------------------------------- item 6: integer labels
def test_fractional_labels_in_a_file_are_refused(tmp_path: Path) -> None:
    y = torch.rand(30, generator=torch.Generator().manual_seed(0))  # all in [0, 1): .long() made them class 0
    with pytest.raises(ValueError, match=rf"{tmp_path}.*'y'.*30 of 30.*not whole numbers"):
        TensorDataModule(IID(2), _save(tmp_path, y=y)).setup()


def test_whole_float_labels_in_a_file_are_accepted(tmp_path: Path) -> None:
    path = _save(tmp_path, "data.npz", y=(torch.arange(30) % 3).double())
    dm = TensorDataModule(IID(2), path)
    dm.setup()
    assert dm.arrays.train[1].dtype == torch.int64 and dm.arrays.num_classes == 3


def test_float_labels_from_a_load_are_refused() -> None:
    y = torch.rand(20)
    with pytest.raises(ValueError, match=r"training labels.*float32.*integer class ids"):
        _Given(_arrays(train=(torch.randn(20, 4), y), labels=y)).setup()


def test_float_targets_are_allowed_without_num_classes() -> None:
    # regression: a float target and integer partition labels, no num_classes
    y = torch.randn(20)
    dm = _Given(_arrays(train=(torch.randn(20, 4), y), test=(torch.randn(6, 4), torch.randn(6)),
                        labels=torch.arange(20) % 3, num_classes=None))
    dm.setup()


# ---------------------------------------------------------------------------------------- item 7: lengths
def test_test_tensors_of_different_lengths_are_refused() -> None:
    with pytest.raises(ValueError, match=r"test tensors.*6.*5"):
        _Given(_arrays(test=(torch.randn(6, 4), torch.arange(5) % 3))).setup()


def test_x_test_and_y_test_of_different_lengths_in_a_file(tmp_path: Path) -> None:
    path = _save(tmp_path, x_test=torch.randn(7, 3), y_test=torch.arange(5) % 3)
    with pytest.raises(ValueError, match=rf"{tmp_path}.*7 test inputs but 5 test labels"):
        TensorDataModule(IID(2), path).load()


def test_labels_of_another_length_than_the_training_tensors() -> None:
    with pytest.raises(ValueError, match=r"19 labels for 20 training examples"):
        _Given(_arrays(labels=torch.arange(19) % 3)).setup()


# ---------------------------------------------------------------------------------------- item 8: unreadable files
@pytest.mark.parametrize("suffix", [".pt", ".npz"])
@pytest.mark.parametrize("content", [b"", b"this is not a tensor file\n", b"PK\x03\x04garbage"])
def test_unreadable_files_name_the_path_and_format(tmp_path: Path, suffix: str, content: bytes) -> None:
    path = tmp_path / f"data{suffix}"
    path.write_bytes(content)
    with pytest.raises(ValueError, match=rf"data\.path='{path}'.*could not be read.*(torch\.save|np\.savez)"):
        TensorDataModule(IID(2), str(path)).setup()


def test_a_zip_that_is_not_a_torch_file(tmp_path: Path) -> None:
    import zipfile

    path = tmp_path / "data.pt"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("hello.txt", "hi")
    with pytest.raises(ValueError, match=rf"data\.path='{path}'.*could not be read"):
        TensorDataModule(IID(2), str(path)).setup()


def test_a_truncated_gzip_idx_file_names_the_path(tmp_path: Path) -> None:
    import gzip

    path = tmp_path / "labels-idx1-ubyte.gz"
    path.write_bytes(gzip.compress(b"\x00\x00\x08\x01" + b"\x00\x00\x00\x05" + bytes(5))[:12])
    with pytest.raises(ValueError, match=rf"{path}.*not a readable gzip"):
        read_idx(path)


# ---------------------------------------------------------------------------------------- the shipped datasets pass
def test_check_arrays_accepts_digits() -> None:
    from lightfed.data.datamodule import check_arrays

    dm = DigitsDataModule(IID(4))
    check_arrays(dm.load(), "digits")
