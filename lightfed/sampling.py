"""Client samplers: which clients take part in a round.

Samplers are pure functions of ``(seed, round)``: no state to checkpoint, and every process of a
distributed run computes the same cohort. Each sampler also says what it is (:attr:`kind`,
:meth:`rate`), because the privacy accountant derives its events from the sampler actually used, never
from numbers entered by hand.
"""

from __future__ import annotations

import math

import torch

from lightfed.seeding import make_generator


class ClientSampler:
    """Base class: pick a cohort of client ids for a round."""

    #: ``"uniform"`` (fixed size, without replacement), ``"poisson"`` (each client independently) or
    #: ``"full"`` (every client, every round). Privacy accounting reads it.
    kind: str = "custom"

    def validate(self, num_clients: int) -> None:
        """Raise ``ValueError`` if this sampler cannot work with ``num_clients`` clients."""

    def sample(self, round_idx: int, num_clients: int, seed: int) -> list[int]:
        """Sorted client ids of round ``round_idx``."""
        raise NotImplementedError

    def expected_cohort(self, num_clients: int) -> float:
        """Expected number of clients per round."""
        raise NotImplementedError

    def rate(self, num_clients: int) -> float:
        """Sampling probability of any one client in a round."""
        return self.expected_cohort(num_clients) / num_clients


class UniformSampler(ClientSampler):
    """A fixed-size cohort drawn uniformly without replacement.

    Args:
        clients_per_round: A count (``int`` >= 1) or a fraction of the population (``float`` in (0, 1]).
    """

    kind = "uniform"

    def __init__(self, clients_per_round: int | float = 10) -> None:
        if isinstance(clients_per_round, bool) or clients_per_round <= 0:
            raise ValueError(f"clients_per_round must be a count >= 1 or a fraction in (0, 1], got {clients_per_round}.")
        if isinstance(clients_per_round, float) and clients_per_round > 1:
            raise ValueError(
                f"clients_per_round={clients_per_round} is a float > 1: give a count as an int or a fraction <= 1."
            )
        self.clients_per_round = clients_per_round

    def cohort_size(self, num_clients: int) -> int:
        if isinstance(self.clients_per_round, float):
            return max(1, int(round(self.clients_per_round * num_clients)))
        return int(self.clients_per_round)

    def validate(self, num_clients: int) -> None:
        m = self.cohort_size(num_clients)
        if m > num_clients:
            raise ValueError(
                f"clients_per_round={m} but the data has only {num_clients} clients; lower "
                f"`trainer.clients_per_round`, or raise the partitioner's client count "
                f"(`data.init_args.partitioner.init_args.num_clients`)."
            )

    def sample(self, round_idx: int, num_clients: int, seed: int) -> list[int]:
        m = self.cohort_size(num_clients)
        gen = make_generator(seed, "sample", round_idx)
        return sorted(torch.randperm(num_clients, generator=gen)[:m].tolist())

    def expected_cohort(self, num_clients: int) -> float:
        return float(self.cohort_size(num_clients))


class PoissonSampler(ClientSampler):
    """Each client joins independently with probability ``rate`` (variable cohort size).

    This is the sampling that privacy amplification by subsampling assumes; it is the DP default.
    """

    kind = "poisson"

    def __init__(self, sampling_rate: float = 0.1) -> None:
        if not 0 < sampling_rate <= 1:
            raise ValueError(f"PoissonSampler sampling_rate must be in (0, 1], got {sampling_rate}.")
        self.sampling_rate = sampling_rate

    def sample(self, round_idx: int, num_clients: int, seed: int) -> list[int]:
        gen = make_generator(seed, "sample", round_idx)
        mask = torch.rand(num_clients, generator=gen) < self.sampling_rate
        return torch.nonzero(mask).flatten().tolist()

    def expected_cohort(self, num_clients: int) -> float:
        return self.sampling_rate * num_clients

    def rate(self, num_clients: int) -> float:
        return self.sampling_rate


class FullParticipation(ClientSampler):
    """Every client, every round (cross-silo)."""

    kind = "full"

    def sample(self, round_idx: int, num_clients: int, seed: int) -> list[int]:
        return list(range(num_clients))

    def expected_cohort(self, num_clients: int) -> float:
        return float(num_clients)


def split_evenly(items: list[int], parts: int, sizes: list[int] | None = None) -> list[list[int]]:
    """Deterministic load balancing: split ``items`` into ``parts`` shards of near-equal total ``sizes``.

    Greedy longest-processing-time assignment (largest item to the lightest shard, ties by shard index),
    so every process computes the same shards.
    """
    sizes = sizes if sizes is not None else [1] * len(items)
    shards: list[list[int]] = [[] for _ in range(parts)]
    load = [0] * parts
    order = sorted(range(len(items)), key=lambda i: (-sizes[i], items[i]))
    for i in order:
        j = min(range(parts), key=lambda p: (load[p], p))
        shards[j].append(items[i])
        load[j] += sizes[i]
    return [sorted(s) for s in shards]


def worst_fraction_mean(values: list[float], fraction: float = 0.1) -> float:
    """Mean of the lowest ``ceil(fraction * n)`` values (the worst-10% clients' accuracy)."""
    if not values:
        return float("nan")
    k = max(1, math.ceil(fraction * len(values)))
    return sum(sorted(values)[:k]) / k
