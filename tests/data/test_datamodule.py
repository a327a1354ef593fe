"""The per-client validation split of FederatedDataModule."""

from __future__ import annotations

import pytest
import torch

from lightfed.data.client_data import Partition
from lightfed.data.datamodule import FederatedArrays, FederatedDataModule
from lightfed.data.partition import Partitioner
from lightfed.seeding import make_generator


def _reference_split(partition: Partition, val_fraction: float, seed: int) -> tuple[Partition, Partition]:
    """The definition, one client at a time: permute with the shared generator, cut, sort."""
    train, val = [], []
    gen = make_generator(seed, "val_split")
    for i in range(partition.num_clients):
        idx = partition.client(i)
        n_val = min(int(val_fraction * len(idx)), len(idx) - 1)
        perm = idx[torch.randperm(len(idx), generator=gen)]
        val.append(perm[:n_val].sort().values)
        train.append(perm[n_val:].sort().values)
    return Partition.from_lists(train), Partition.from_lists(val)


class _Fixed(Partitioner):
    def __init__(self, partition: Partition) -> None:
        self.fixed = partition

    def partition(self, labels: torch.Tensor, seed: int, groups: torch.Tensor | None = None) -> Partition:
        return self.fixed


class _Pool(FederatedDataModule):
    def __init__(self, partition: Partition, n: int, val_fraction: float, seed: int) -> None:
        super().__init__(_Fixed(partition), val_fraction=val_fraction, seed=seed)
        self.n = n

    def load(self) -> FederatedArrays:
        x = torch.arange(self.n, dtype=torch.float32)[:, None]
        return FederatedArrays(train=(x, torch.zeros(self.n, dtype=torch.long)), test=(x, x[:, 0].long()),
                               labels=torch.zeros(self.n, dtype=torch.long))


def _random_partition(num_clients: int, seed: int, max_size: int = 40) -> tuple[Partition, int]:
    g = torch.Generator().manual_seed(seed)
    sizes = torch.randint(1, max_size, (num_clients,), generator=g).tolist()
    pool = 2 * sum(sizes)
    clients = torch.split(torch.randperm(pool, generator=g)[: sum(sizes)], sizes)  # unsorted, gaps in the pool
    return Partition.from_lists(list(clients)), pool


@pytest.mark.parametrize("val_fraction", [0.0, 0.1, 0.2, 1 / 3, 0.5, 0.9])
@pytest.mark.parametrize("seed", [0, 7])
def test_val_split_equals_the_per_client_definition(val_fraction: float, seed: int) -> None:
    partition, pool = _random_partition(250, seed)
    dm = _Pool(partition, pool, val_fraction, seed)
    dm.setup()
    want_train, want_val = _reference_split(partition, val_fraction, seed)
    assert dm.train_part is not None and dm.val_part is not None
    assert torch.equal(dm.train_part.indices, want_train.indices)
    assert torch.equal(dm.train_part.offsets, want_train.offsets)
    assert torch.equal(dm.val_part.indices, want_val.indices)
    assert torch.equal(dm.val_part.offsets, want_val.offsets)


def test_val_split_sizes_and_disjointness_by_hand() -> None:
    # clients of 1, 2, 5 and 10 examples at val_fraction 0.5: floor(0.5 n) capped at n - 1 -> 0, 1, 2, 5
    sizes = [1, 2, 5, 10]
    partition = Partition.from_lists([list(range(s, 0, -1)) for s in sizes])  # descending: must come out sorted
    dm = _Pool(partition, 11, 0.5, seed=3)
    dm.setup()
    assert dm.val_part is not None and dm.train_part is not None
    assert dm.val_part.sizes().tolist() == [0, 1, 2, 5]
    assert dm.train_part.sizes().tolist() == [1, 1, 3, 5]
    for c, s in enumerate(sizes):
        tr, va = dm.client_train(c).indices.tolist(), dm.client_val(c).indices.tolist()
        assert tr == sorted(tr) and va == sorted(va)
        assert sorted(tr + va) == list(range(1, s + 1))


def test_grouped_keeps_duplicates_and_empty_clients() -> None:
    owner = torch.tensor([2, 0, 2, 2, 0])
    values = torch.tensor([5, 9, 1, 5, 3])
    p = Partition.grouped(owner, values, num_clients=4)
    assert p.offsets.tolist() == [0, 2, 2, 5, 5]
    assert p.indices.tolist() == [3, 9, 1, 5, 5]
    assert Partition.grouped(owner[:0], values[:0], 2).offsets.tolist() == [0, 0, 0]


@pytest.mark.parametrize(
    ("indices", "offsets", "match"),
    [
        ([0, 1, 2, 3], [1, 2, 4], "from 0 to len"),
        ([0, 1, 2, 3], [0, 3, 2, 4], "non-decreasing"),
        ([0, 1, 2, 11], [0, 2, 4], r"\[0, 11\)"),
    ],
)
def test_malformed_partitions_are_refused_by_name(indices, offsets, match) -> None:
    bad = Partition(torch.tensor(indices), torch.tensor(offsets))
    with pytest.raises(ValueError, match=match) as err:
        _Pool(bad, 11, 0.2, seed=0).setup()
    assert "_Fixed.partition" in str(err.value)
