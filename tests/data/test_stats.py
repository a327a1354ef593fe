"""Partition statistics on a hand-made partition, the table, and the label plot."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from torch import Tensor

from lightfed.data.client_data import Partition
from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import IID, Dirichlet, Partitioner
from lightfed.data.stats import format_statistics, partition_statistics, plot_label_distribution

LABELS = [0, 0, 1, 1, 2, 2, 0, 1]
CLIENTS = [[0, 1, 2], [3, 4, 5], [6, 7]]  # labels (0, 0, 1), (1, 2, 2), (0, 1)


class Fixed(Partitioner):
    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        return Partition.from_lists(CLIENTS)


class Tiny(FederatedDataModule):
    def load(self) -> FederatedArrays:
        y = torch.tensor(LABELS)
        x = torch.arange(len(y), dtype=torch.float32)[:, None]
        return FederatedArrays(train=(x, y), test=(x, y), labels=y, num_classes=3)


def test_statistics_on_a_hand_made_partition() -> None:
    stats = partition_statistics(Tiny(Fixed(), val_fraction=0.0))

    assert stats["num_clients"] == 3 and stats["num_classes"] == 3
    assert stats["label_histogram"].dtype == torch.int64
    assert stats["label_histogram"].tolist() == [[2, 1, 0], [0, 1, 2], [1, 1, 0]]
    assert stats["train_sizes"].tolist() == [3, 3, 2] and stats["val_sizes"].tolist() == [0, 0, 0]
    assert (stats["total_train"], stats["min_train"], stats["max_train"]) == (8, 2, 3)
    assert stats["median_train"] == 3.0 and stats["mean_train"] == pytest.approx(8 / 3)
    assert stats["mean_classes_per_client"] == 2.0
    q = [3 / 8, 3 / 8, 2 / 8]
    tv = [
        0.5 * (abs(2 / 3 - q[0]) + abs(1 / 3 - q[1]) + abs(0 - q[2])),
        0.5 * (abs(0 - q[0]) + abs(1 / 3 - q[1]) + abs(2 / 3 - q[2])),
        0.5 * (abs(1 / 2 - q[0]) + abs(1 / 2 - q[1]) + abs(0 - q[2])),
    ]
    assert stats["global_label_distribution"].tolist() == pytest.approx(q)
    assert stats["tv_distance"].tolist() == pytest.approx(tv)
    assert stats["mean_tv_distance"] == pytest.approx(sum(tv) / 3)
    h = -(2 / 3 * math.log(2 / 3) + 1 / 3 * math.log(1 / 3))
    assert stats["effective_classes"].tolist() == pytest.approx([math.exp(h), math.exp(h), 2.0])


def test_val_sizes_are_reported() -> None:
    stats = partition_statistics(Tiny(Fixed(), val_fraction=0.5))

    assert stats["val_sizes"].tolist() == [1, 1, 1] and stats["train_sizes"].tolist() == [2, 2, 1]
    assert (stats["total_val"], stats["min_val"], stats["max_val"]) == (3, 1, 1)
    assert stats["label_histogram"].tolist() == [[2, 1, 0], [0, 1, 2], [1, 1, 0]]  # train and val together


def test_iid_is_less_skewed_than_dirichlet() -> None:
    iid = partition_statistics(DigitsDataModule(IID(10)))
    skewed = partition_statistics(DigitsDataModule(Dirichlet(10, alpha=0.1)))

    assert skewed["mean_tv_distance"] > iid["mean_tv_distance"] + 0.4
    assert skewed["mean_effective_classes"] < iid["mean_effective_classes"] - 3
    assert int(iid["label_histogram"].sum()) == iid["total_train"] + iid["total_val"]


def test_format_statistics_table() -> None:
    text = format_statistics(partition_statistics(Tiny(Fixed(), val_fraction=0.0)))
    lines = text.splitlines()

    assert lines[0].startswith("clients: 3")
    header = lines.index(next(line for line in lines if line.split()[:2] == ["client", "train"]))
    assert lines[header].split() == ["client", "train", "val", "classes", "TV", "0", "1", "2"]
    assert lines[header + 1].split()[:5] == ["0", "3", "0", "2", "0.292"]
    assert lines[header + 2].split()[-3:] == ["0", "1", "2"]
    short = format_statistics(partition_statistics(Tiny(Fixed(), val_fraction=0.0)), max_rows=2)
    assert short.splitlines()[-1] == "... (1 more clients)"


def test_plot_writes_png_and_returns_figure(tmp_path: Path) -> None:
    path = tmp_path / "labels.png"

    fig = plot_label_distribution(Tiny(Fixed()), str(path))

    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    ax = fig.axes[0]
    assert len(ax.patches) == 3 * 3  # clients x classes bars
    assert [p.get_height() for p in ax.patches[:3]] == [2, 0, 1]  # class 0 of each client


def test_plot_max_clients_and_summary_writer(tmp_path: Path) -> None:
    from torch.utils import tensorboard  # core dependency; matplotlib comes with the test extra

    fig = plot_label_distribution(Tiny(Fixed()), max_clients=2)
    writer = tensorboard.SummaryWriter(str(tmp_path))
    writer.add_figure("data/label_distribution", fig, global_step=0)
    writer.close()

    assert len(fig.axes[0].patches) == 2 * 3
    assert "2 of 3 clients" in fig.axes[0].get_title()
    assert any(tmp_path.iterdir())


def test_plot_without_matplotlib_says_how_to_install(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "matplotlib", None)

    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_label_distribution(Tiny(Fixed()))


# ---- issue 13: the partition heatmap, in TensorBoard too; a slow preparation says so --------------------


def test_partition_heatmap_shows_every_client_sorted_with_class_names(tmp_path: Path) -> None:
    from lightfed.data.stats import client_order, plot_partition

    # Prepare: clients with labels (0, 0, 1), (1, 2, 2), (0, 1); a datamodule that names its classes
    dm = Tiny(Fixed(), val_fraction=0.0)
    dm.class_names = ["cat", "dog", "owl"]
    # Execute
    fig = plot_partition(dm, str(tmp_path / "p.png"))
    # Assert: sorted by dominant class then size (client 0: class 0, 3 ex; client 2: class 0, 2 ex; client 1: class 2)
    assert client_order(torch.tensor([[2, 1, 0], [0, 1, 2], [1, 1, 0]])).tolist() == [0, 2, 1]
    heat, sizes = fig.axes[0], fig.axes[1]
    assert [t.get_text() for t in heat.get_yticklabels()] == ["cat", "dog", "owl"]
    assert heat.images[0].get_array().shape == (3, 3)  # classes x every client
    assert [p.get_height() for p in sizes.patches] == [3, 2, 3]
    assert (tmp_path / "p.png").read_bytes()[:4] == b"\x89PNG"


def test_log_partition_writes_figure_and_table(tmp_path: Path) -> None:
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightfed.data.stats import log_partition

    logger = TensorBoardLogger(str(tmp_path), name="run")
    assert log_partition(logger, Tiny(Fixed())) and not log_partition(None, Tiny(Fixed()))
    acc = EventAccumulator(logger.log_dir)
    acc.Reload()
    assert "data/partition" in acc.Tags()["images"]
    assert any("data/partition_stats" in t for t in acc.Tags()["tensors"])


def test_a_slow_data_preparation_says_what_it_is_doing(capsys: pytest.CaptureFixture, monkeypatch: pytest.MonkeyPatch) -> None:
    import time

    import lightfed.data.datamodule as datamodule

    class Slow(Tiny):
        def load(self) -> FederatedArrays:
            time.sleep(0.3)
            return super().load()

    monkeypatch.setattr(datamodule, "SLOW_PREPARATION_S", 0.1)
    Slow(Fixed()).setup()
    Tiny(Fixed()).setup()  # quick: silent
    err = capsys.readouterr().err.splitlines()
    assert err[0] == "lightfed: preparing data Slow ..." and err[1].startswith("lightfed: data ready in ")
    assert len(err) == 2
