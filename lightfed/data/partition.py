"""Partitioners: split a pooled training set into clients, seeded and checked.

Each partitioner is a small class whose typed ``__init__`` is its config schema (jsonargparse
``class_path`` / ``init_args``); arguments are checked there, where they enter. :meth:`Partitioner.partition`
is a pure function of ``(labels, seed, groups)``: its randomness comes from a generator seeded by
:func:`lightfed.seeding.derive_seed` ``(seed, "partition", <name>)``, so the same seed gives the same clients
in every process. Clients are disjoint and each client's indices are sorted.

========================  =========================================================================
:class:`IID`              random equal-size split
:class:`Dirichlet`        label skew, per-class Dirichlet(alpha) over clients (Hsu et al. 2019)
:class:`Shards`           pathological label skew, a few label-sorted shards each (McMahan et al. 2017)
:class:`Natural`          one client per natural group key (writer, speaker, hospital)
:class:`QuantitySkew`     log-normal client sizes, IID labels
:class:`Explicit`         client index lists given by the user
========================  =========================================================================
"""

from __future__ import annotations

import numpy as np
import torch
from torch import Tensor

from lightfed.checks import check_int
from lightfed.data.client_data import Partition
from lightfed.seeding import derive_seed

__all__ = ["IID", "Dirichlet", "Explicit", "Natural", "Partitioner", "QuantitySkew", "Shards"]


class Partitioner:
    """Base class: map labels (and optional natural group keys) to a :class:`Partition`."""

    #: Whether :meth:`partition` reads the labels' values (not only their number): label-skew partitioners.
    needs_labels: bool = False
    #: Whether :meth:`partition` needs natural group keys (``groups``).
    needs_groups: bool = False

    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        """Split examples ``0..len(labels)-1`` into clients; every client non-empty, all disjoint."""
        raise NotImplementedError

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({args})"


# ---------------------------------------------------------------------------------------- helpers
def _check_int(value: object, field: str, minimum: int) -> int:
    return check_int(value, f"data.partitioner.{field}", minimum)


def _check_clients(num_clients: int, n: int, name: str) -> None:
    if num_clients > n:
        raise ValueError(
            f"data.partitioner.num_clients={num_clients} but the training set has only {n} examples; "
            f"{name} needs at least one example per client: lower data.partitioner.num_clients."
        )


def _rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng(derive_seed(seed, "partition", name))


def _as_numpy(labels: Tensor) -> np.ndarray:
    return labels.detach().cpu().reshape(-1).numpy()


def _to_partition(clients: list[np.ndarray]) -> Partition:
    return Partition.from_lists([np.sort(np.asarray(c, dtype=np.int64)) for c in clients])


# ---------------------------------------------------------------------------------------- IID
class IID(Partitioner):
    """A uniformly random split into ``num_clients`` clients of equal size (sizes differ by at most one).

    Args:
        num_clients: Number of clients (>= 1, at most the number of training examples).
    """

    def __init__(self, num_clients: int) -> None:
        self.num_clients = _check_int(num_clients, "num_clients", 1)

    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        n = len(labels)
        _check_clients(self.num_clients, n, "IID")
        perm = _rng(seed, "iid").permutation(n)
        return _to_partition(np.array_split(perm, self.num_clients))


# ---------------------------------------------------------------------------------------- Dirichlet
class Dirichlet(Partitioner):
    """Label skew: each class is spread over the clients by proportions drawn from a Dirichlet.

    For every class :math:`k`, draw :math:`p_k \\sim \\mathrm{Dir}(\\alpha \\mathbf{1}_N)` over the :math:`N`
    clients and give client :math:`i` a fraction :math:`p_{k,i}` of the (shuffled) examples of class
    :math:`k`. Small :math:`\\alpha` (0.1) gives clients dominated by one or two classes; large :math:`\\alpha`
    (100) approaches IID. With ``self_balancing`` (the step of Yurochkin et al.'s reference code, also in
    FedLab and FedML), clients already holding more than :math:`n/N` examples get no share of the following
    classes, which keeps client sizes comparable. The whole draw is repeated until every client holds at
    least ``min_size`` examples.

    References: Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated
    Visual Classification", 2019; Yurochkin et al., "Bayesian Nonparametric Federated Learning of Neural
    Networks", ICML 2019.

    Args:
        num_clients: Number of clients (>= 1).
        alpha: Dirichlet concentration (> 0); smaller is more skewed.
        min_size: Fewest examples a client may hold (>= 1).
        max_retries: Draws to try before giving up (>= 1).
        self_balancing: Stop giving examples to clients above the mean size (see above).
    """

    needs_labels = True

    def __init__(
        self,
        num_clients: int,
        alpha: float = 0.5,
        min_size: int = 2,
        max_retries: int = 100,
        self_balancing: bool = True,
    ) -> None:
        self.num_clients = _check_int(num_clients, "num_clients", 1)
        if not alpha > 0 or not np.isfinite(alpha):
            raise ValueError(f"data.partitioner.alpha must be > 0 (and finite), got {alpha}.")
        self.alpha = float(alpha)
        self.min_size = _check_int(min_size, "min_size", 1)
        self.max_retries = _check_int(max_retries, "max_retries", 1)
        self.self_balancing = bool(self_balancing)

    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        y = _as_numpy(labels)
        n, num = len(y), self.num_clients
        _check_clients(num, n, "Dirichlet")
        if num * self.min_size > n:
            raise ValueError(
                f"data.partitioner.num_clients={num} x data.partitioner.min_size={self.min_size} exceeds the "
                f"{n} training examples; lower num_clients or min_size."
            )
        rng = _rng(seed, "dirichlet")
        _, y_idx = np.unique(y, return_inverse=True)
        by_class = [np.flatnonzero(y_idx == k) for k in range(int(y_idx.max()) + 1)]
        smallest = 0
        for _ in range(self.max_retries):
            clients, sizes = self._draw(by_class, n, rng)
            if sizes.min() >= self.min_size:
                return _to_partition([np.concatenate(c) for c in clients])
            smallest = max(smallest, int(sizes.min()))
        raise ValueError(
            f"Dirichlet(alpha={self.alpha}) could not give each of data.partitioner.num_clients={num} clients "
            f"at least data.partitioner.min_size={self.min_size} examples in data.partitioner.max_retries="
            f"{self.max_retries} draws (best smallest client: {smallest}); lower num_clients or min_size, "
            f"or raise alpha."
        )

    def _draw(
        self, by_class: list[np.ndarray], n: int, rng: np.random.Generator
    ) -> tuple[list[list[np.ndarray]], np.ndarray]:
        num = self.num_clients
        clients: list[list[np.ndarray]] = [[] for _ in range(num)]
        sizes = np.zeros(num, dtype=np.int64)
        for idx in by_class:
            idx = rng.permutation(idx)
            p = rng.dirichlet(np.full(num, self.alpha))
            if self.self_balancing:
                masked = p * (sizes < n / num)
                if masked.sum() > 0:
                    p = masked / masked.sum()
            cuts = (np.cumsum(p)[:-1] * len(idx)).astype(np.int64)
            for i, part in enumerate(np.split(idx, cuts)):
                clients[i].append(part)
                sizes[i] += len(part)
        return clients, sizes


# ---------------------------------------------------------------------------------------- Shards
class Shards(Partitioner):
    """Pathological label skew: sort by label, cut into shards, give each client a few shards.

    The examples are sorted by label (ties in seeded random order) and cut into
    ``num_clients * classes_per_client`` contiguous shards of (nearly) equal size; each client receives
    ``classes_per_client`` shards. Shards are dealt so that a client's shards carry distinct (majority)
    labels whenever the label counts allow it: with balanced labels and shards that do not straddle a
    class boundary, every client then holds exactly ``classes_per_client`` labels. If one label has more
    shards than there are clients, shards are dealt uniformly at random as in the paper.

    Reference: McMahan et al., "Communication-Efficient Learning of Deep Networks from Decentralized
    Data", AISTATS 2017 (200 shards of 300 MNIST digits, two per client).

    Args:
        num_clients: Number of clients (>= 1).
        classes_per_client: Shards (hence labels) per client (>= 1).
    """

    needs_labels = True

    def __init__(self, num_clients: int, classes_per_client: int = 2) -> None:
        self.num_clients = _check_int(num_clients, "num_clients", 1)
        self.classes_per_client = _check_int(classes_per_client, "classes_per_client", 1)

    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        y = _as_numpy(labels)
        n, num, per = len(y), self.num_clients, self.classes_per_client
        _check_clients(num, n, "Shards")
        if num * per > n:
            raise ValueError(
                f"data.partitioner.num_clients={num} x data.partitioner.classes_per_client={per} shards "
                f"exceed the {n} training examples; lower num_clients or classes_per_client."
            )
        rng = _rng(seed, "shards")
        _, y_idx = np.unique(y, return_inverse=True)
        perm = rng.permutation(n)
        ordered = perm[np.argsort(y_idx[perm], kind="stable")]
        shards = np.array_split(ordered, num * per)
        shard_label = np.array([np.bincount(y_idx[s]).argmax() for s in shards])
        assignment = self._deal(shard_label, rng)
        return _to_partition([np.concatenate([shards[s] for s in row]) for row in assignment])

    def _deal(self, shard_label: np.ndarray, rng: np.random.Generator) -> list[list[int]]:
        """Give each client ``classes_per_client`` shard ids, of distinct labels when possible.

        Invariant (so the greedy deal never gets stuck): with ``r`` clients left, every label has at most
        ``r`` shards left and ``classes_per_client * r`` shards remain; labels with exactly ``r`` left are
        forced into the current client, the rest are drawn with probability proportional to what is left.
        """
        num, per = self.num_clients, self.classes_per_client
        counts = np.bincount(shard_label)
        if counts.max() > num:
            return rng.permutation(len(shard_label)).reshape(num, per).tolist()
        pools = [list(rng.permutation(np.flatnonzero(shard_label == k))) for k in range(len(counts))]
        rows: list[list[int]] = []
        for left in range(num, 0, -1):
            forced = np.flatnonzero(counts == left)
            free = np.flatnonzero((counts > 0) & (counts < left))
            k = per - len(forced)
            chosen = rng.choice(free, size=k, replace=False, p=counts[free] / counts[free].sum()) if k else []
            picked = np.concatenate([forced, np.asarray(chosen, dtype=np.int64)])
            counts[picked] -= 1
            rows.append([int(pools[label].pop()) for label in picked])
        return [rows[i] for i in rng.permutation(num)]


# ---------------------------------------------------------------------------------------- Natural
class Natural(Partitioner):
    """One client per distinct natural group key (writer, speaker, hospital).

    Groups with fewer than ``min_size`` examples are dropped, and their examples belong to no client.
    Clients are ordered by group key. With ``max_clients``, a seeded random subset of that many eligible
    groups is kept (as LEAF subsamples its users), still ordered by key.

    Reference: Caldas et al., "LEAF: A Benchmark for Federated Settings", 2018.

    Args:
        min_size: Fewest examples a group needs to become a client (>= 1).
        max_clients: Keep at most this many clients (>= 1), or all if ``None``.
    """

    needs_groups = True

    def __init__(self, min_size: int = 1, max_clients: int | None = None) -> None:
        self.min_size = _check_int(min_size, "min_size", 1)
        self.max_clients = None if max_clients is None else _check_int(max_clients, "max_clients", 1)

    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        if groups is None:
            raise ValueError(
                "data.partitioner is Natural, but this dataset has no natural group key (groups=None); "
                "choose IID, Dirichlet, Shards or QuantitySkew, or load data that has one "
                "(e.g. TensorDataModule with data.group_key)."
            )
        g = _as_numpy(groups)
        if len(g) != len(labels):
            raise ValueError(f"Natural: {len(g)} group keys for {len(labels)} training examples.")
        _, inverse, counts = np.unique(g, return_inverse=True, return_counts=True)
        eligible = np.flatnonzero(counts >= self.min_size)
        if len(eligible) == 0:
            raise ValueError(
                f"Natural: no group has data.partitioner.min_size={self.min_size} examples (largest: "
                f"{int(counts.max()) if len(counts) else 0}); lower data.partitioner.min_size."
            )
        if self.max_clients is not None and len(eligible) > self.max_clients:
            eligible = np.sort(_rng(seed, "natural").choice(eligible, self.max_clients, replace=False))
        members = np.split(np.argsort(inverse, kind="stable"), np.cumsum(counts)[:-1])
        return _to_partition([members[k] for k in eligible])


# ---------------------------------------------------------------------------------------- QuantitySkew
class QuantitySkew(Partitioner):
    """Quantity skew: log-normal client sizes, labels IID.

    Draw weights :math:`w_i \\sim \\mathrm{LogNormal}(0, \\sigma^2)`; client :math:`i` gets
    ``min_size`` examples plus a share :math:`w_i / \\sum_j w_j` of the remaining
    :math:`n - N \\cdot \\text{min\\_size}` (largest-remainder rounding), taken from one random
    permutation. :math:`\\sigma = 0` gives equal sizes; every example is assigned.

    Reference: Li, Diao, Chen, He, "Federated Learning on Non-IID Data Silos: An Experimental Study",
    ICDE 2022 (quantity-based skew).

    Args:
        num_clients: Number of clients (>= 1).
        sigma: Standard deviation of the log sizes (>= 0); larger is more unequal.
        min_size: Fewest examples a client holds (>= 1).
    """

    def __init__(self, num_clients: int, sigma: float = 1.0, min_size: int = 2) -> None:
        self.num_clients = _check_int(num_clients, "num_clients", 1)
        if not sigma >= 0 or not np.isfinite(sigma):
            raise ValueError(f"data.partitioner.sigma must be >= 0 (and finite), got {sigma}.")
        self.sigma = float(sigma)
        self.min_size = _check_int(min_size, "min_size", 1)

    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        n, num = len(labels), self.num_clients
        _check_clients(num, n, "QuantitySkew")
        if num * self.min_size > n:
            raise ValueError(
                f"data.partitioner.num_clients={num} x data.partitioner.min_size={self.min_size} exceeds the "
                f"{n} training examples; lower num_clients or min_size."
            )
        rng = _rng(seed, "quantity_skew")
        w = rng.lognormal(0.0, self.sigma, num)
        share = w / w.sum() * (n - num * self.min_size)
        extra = np.floor(share).astype(np.int64)
        remainder = n - num * self.min_size - int(extra.sum())
        extra[np.argsort(extra - share, kind="stable")[:remainder]] += 1
        sizes = self.min_size + extra
        perm = rng.permutation(n)
        return _to_partition(np.split(perm, np.cumsum(sizes)[:-1]))


# ---------------------------------------------------------------------------------------- Explicit
class Explicit(Partitioner):
    """Clients given as explicit lists of training-example indices (client ``i`` owns ``clients[i]``).

    For a split decided elsewhere (a published client list, a split file). Lists must be non-empty and
    disjoint; an example in no list belongs to no client.

    Args:
        clients: One list of training-example indices per client.
    """

    def __init__(self, clients: list[list[int]]) -> None:
        if not clients or any(len(c) == 0 for c in clients):
            raise ValueError("data.partitioner.clients must be a non-empty list of non-empty index lists.")
        self.clients = clients

    def __repr__(self) -> str:
        return f"Explicit({len(self.clients)} clients)"

    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        part = Partition.from_lists(self.clients)
        n = len(labels)
        idx = part.indices
        if len(idx) and (int(idx.min()) < 0 or int(idx.max()) >= n):
            raise ValueError(
                f"data.partitioner.clients holds indices outside [0, {n}) (the training set has {n} examples)."
            )
        if len(torch.unique(idx)) != len(idx):
            raise ValueError(
                "data.partitioner.clients lists some examples for two clients; the lists must be disjoint."
            )
        return part
