"""Partitioners: disjoint, complete, seeded, and as skewed as their parameters say."""

from __future__ import annotations

import pytest
import torch
from sklearn.datasets import load_digits
from torch import Tensor

from lightfed.data.client_data import Partition
from lightfed.data.partition import IID, Dirichlet, Natural, Partitioner, QuantitySkew, Shards


@pytest.fixture(scope="module")
def digits_labels() -> Tensor:
    return torch.as_tensor(load_digits().target, dtype=torch.int64)


def clients(part: Partition) -> list[list[int]]:
    return [part.client(i).tolist() for i in range(part.num_clients)]


def mean_tv(part: Partition, labels: Tensor) -> float:
    """Mean total-variation distance of client label distributions to the global one."""
    k = int(labels.max()) + 1
    q = torch.bincount(labels, minlength=k).double() / len(labels)
    tvs = []
    for idx in clients(part):
        p = torch.bincount(labels[idx], minlength=k).double() / len(idx)
        tvs.append(0.5 * float((p - q).abs().sum()))
    return sum(tvs) / len(tvs)


COMPLETE = [
    IID(10),
    Dirichlet(10),
    Dirichlet(10, alpha=0.1, self_balancing=False),
    Shards(10),
    QuantitySkew(10),
]


@pytest.mark.parametrize("partitioner", COMPLETE, ids=repr)
def test_disjoint_sorted_and_complete(partitioner: Partitioner, digits_labels: Tensor) -> None:
    part = partitioner.partition(digits_labels, seed=0)

    assert part.num_clients == 10
    assert part.indices.dtype == torch.int64
    assert sorted(part.indices.tolist()) == list(range(len(digits_labels)))  # disjoint and complete
    for idx in clients(part):
        assert len(idx) > 0
        assert idx == sorted(idx)


@pytest.mark.parametrize("partitioner", COMPLETE, ids=repr)
def test_seeded(partitioner: Partitioner, digits_labels: Tensor) -> None:
    a = partitioner.partition(digits_labels, seed=3)
    b = partitioner.partition(digits_labels, seed=3)
    c = partitioner.partition(digits_labels, seed=4)

    assert torch.equal(a.indices, b.indices) and torch.equal(a.offsets, b.offsets)
    assert clients(a) != clients(c)


def test_iid_sizes_differ_by_at_most_one(digits_labels: Tensor) -> None:
    sizes = IID(7).partition(digits_labels, seed=0).sizes()

    assert int(sizes.max() - sizes.min()) <= 1
    assert int(sizes.sum()) == len(digits_labels)


def test_dirichlet_small_alpha_is_more_skewed(digits_labels: Tensor) -> None:
    skewed = Dirichlet(20, alpha=0.1).partition(digits_labels, seed=0)
    near_iid = Dirichlet(20, alpha=100.0).partition(digits_labels, seed=0)

    def mean_classes(part: Partition) -> float:
        return sum(len(set(digits_labels[idx].tolist())) for idx in clients(part)) / part.num_clients

    assert mean_tv(skewed, digits_labels) > mean_tv(near_iid, digits_labels) + 0.4
    assert mean_tv(near_iid, digits_labels) < 0.15
    assert mean_classes(skewed) < mean_classes(near_iid) - 3


def test_dirichlet_min_size_respected(digits_labels: Tensor) -> None:
    for seed in range(3):
        sizes = Dirichlet(20, alpha=0.1, min_size=15).partition(digits_labels, seed=seed).sizes()
        assert int(sizes.min()) >= 15


def test_dirichlet_gives_up_after_max_retries(digits_labels: Tensor) -> None:
    p = Dirichlet(50, alpha=0.01, min_size=30, max_retries=3)

    with pytest.raises(ValueError, match="max_retries=3") as err:
        p.partition(digits_labels, seed=0)
    assert "raise alpha" in str(err.value) and "min_size" in str(err.value)


@pytest.mark.parametrize(("num_clients", "per"), [(10, 2), (100, 2), (20, 3), (10, 1)])
def test_shards_give_exactly_classes_per_client_on_balanced_labels(num_clients: int, per: int) -> None:
    labels = torch.arange(num_clients * per * 30) % 10  # each class a whole number of 30-example shards

    part = Shards(num_clients, classes_per_client=per).partition(labels, seed=1)

    assert sorted(part.indices.tolist()) == list(range(len(labels)))
    assert [len(set(labels[idx].tolist())) for idx in clients(part)] == [per] * num_clients


def test_shards_are_pathologically_skewed(digits_labels: Tensor) -> None:
    part = Shards(10, classes_per_client=2).partition(digits_labels, seed=0)

    assert max(len(set(digits_labels[idx].tolist())) for idx in clients(part)) <= 4
    assert mean_tv(part, digits_labels) > 0.6


def test_quantity_skew_sizes_vary_more_than_iid(digits_labels: Tensor) -> None:
    skew = QuantitySkew(20, sigma=1.5, min_size=20).partition(digits_labels, seed=0).sizes().double()
    iid = IID(20).partition(digits_labels, seed=0).sizes().double()

    assert int(skew.min()) >= 20
    assert float(skew.std()) > 10 * max(float(iid.std()), 1.0)
    assert mean_tv(QuantitySkew(5, sigma=1.0).partition(digits_labels, seed=0), digits_labels) < 0.2


def test_quantity_skew_sigma_zero_is_equal_sizes(digits_labels: Tensor) -> None:
    sizes = QuantitySkew(8, sigma=0.0).partition(digits_labels, seed=0).sizes()

    assert int(sizes.max() - sizes.min()) <= 1


def test_natural_one_client_per_group_ordered_by_key() -> None:
    labels = torch.zeros(8, dtype=torch.long)
    groups = torch.tensor([5, 5, 3, 3, 3, 9, 7, 7])

    part = Natural(min_size=2).partition(labels, seed=0, groups=groups)

    assert clients(part) == [[2, 3, 4], [0, 1], [6, 7]]  # keys 3, 5, 7; key 9 (one example) dropped


def test_natural_max_clients_is_a_seeded_subset() -> None:
    labels = torch.zeros(40, dtype=torch.long)
    groups = torch.arange(40) // 4  # ten groups of four

    a = Natural(max_clients=3).partition(labels, seed=0, groups=groups)
    b = Natural(max_clients=3).partition(labels, seed=0, groups=groups)
    firsts = [groups[idx[0]].item() for idx in clients(a)]

    assert a.num_clients == 3 and clients(a) == clients(b)
    assert firsts == sorted(firsts)
    assert all(len(idx) == 4 and len(set(groups[idx].tolist())) == 1 for idx in clients(a))
    picks = {
        tuple(clients(Natural(max_clients=3).partition(labels, seed=s, groups=groups))[0]) for s in range(6)
    }
    assert len(picks) > 1


@pytest.mark.parametrize(
    ("make", "field"),
    [
        (lambda: IID(0), "data.partitioner.num_clients"),
        (lambda: IID(-3), "data.partitioner.num_clients"),
        (lambda: Dirichlet(0), "data.partitioner.num_clients"),
        (lambda: Dirichlet(10, alpha=0), "data.partitioner.alpha"),
        (lambda: Dirichlet(10, alpha=-0.5), "data.partitioner.alpha"),
        (lambda: Dirichlet(10, min_size=0), "data.partitioner.min_size"),
        (lambda: Dirichlet(10, max_retries=0), "data.partitioner.max_retries"),
        (lambda: Shards(0), "data.partitioner.num_clients"),
        (lambda: Shards(10, classes_per_client=0), "data.partitioner.classes_per_client"),
        (lambda: QuantitySkew(0), "data.partitioner.num_clients"),
        (lambda: QuantitySkew(10, sigma=-1.0), "data.partitioner.sigma"),
        (lambda: QuantitySkew(10, min_size=0), "data.partitioner.min_size"),
        (lambda: Natural(min_size=0), "data.partitioner.min_size"),
        (lambda: Natural(max_clients=0), "data.partitioner.max_clients"),
    ],
)
def test_bad_arguments_name_the_field(make, field: str) -> None:
    with pytest.raises(ValueError, match=field.replace(".", r"\.")):
        make()


@pytest.mark.parametrize(
    "partitioner", [IID(20), Dirichlet(20, min_size=1), Shards(20, 1), QuantitySkew(20, min_size=1)], ids=repr
)
def test_more_clients_than_examples_raises(partitioner: Partitioner) -> None:
    with pytest.raises(ValueError, match=r"data\.partitioner\.num_clients=20 .*only 10 examples"):
        partitioner.partition(torch.arange(10) % 2, seed=0)


@pytest.mark.parametrize(
    ("partitioner", "field"),
    [
        (Dirichlet(4, min_size=3), "min_size"),
        (QuantitySkew(4, min_size=3), "min_size"),
        (Shards(4, 3), "classes_per_client"),
    ],
    ids=repr,
)
def test_impossible_minimums_raise(partitioner: Partitioner, field: str) -> None:
    with pytest.raises(ValueError, match=f"data.partitioner.{field}"):
        partitioner.partition(torch.arange(10) % 2, seed=0)


def test_natural_without_groups_raises() -> None:
    with pytest.raises(ValueError, match="no natural group key"):
        Natural().partition(torch.zeros(5, dtype=torch.long), seed=0, groups=None)


def test_natural_with_no_group_large_enough_raises() -> None:
    with pytest.raises(ValueError, match=r"data\.partitioner\.min_size=5"):
        Natural(min_size=5).partition(
            torch.zeros(4, dtype=torch.long), seed=0, groups=torch.tensor([0, 0, 1, 1])
        )
