"""Aggregators: where client contributions go during a round.

:class:`StreamingSum` keeps running weighted sums (O(model) memory, whatever the cohort size);
:class:`CollectAll` keeps every update for strategies that need them (robust aggregation). A secure
aggregation plugin provides its own :class:`Aggregator` that only ever reveals the sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightfed.messages import ClientUpdate, RoundAggregate


class Aggregator:
    """Receives ``(update, weight)`` pairs one at a time; produces the round's sums."""

    def add(self, update: ClientUpdate, weight: float) -> None:
        raise NotImplementedError

    def result(self) -> RoundAggregate | None:
        """The round's sums, or ``None`` when nothing (or not enough) was received."""
        raise NotImplementedError


class StreamingSum(Aggregator):
    """Running ``sum_k w_k x_k`` and ``sum_k w_k`` for the delta and each extra; ``sum_k c_k`` for each count."""

    def __init__(self) -> None:
        self.delta_sum: Tensor | None = None
        self.extras_sum: dict[str, Tensor] = {}
        self.counts_sum: dict[str, float] = {}
        self.weight_sum = 0.0
        self.num_clients = 0

    def add(self, update: ClientUpdate, weight: float) -> None:
        if self.delta_sum is None:
            self.delta_sum = torch.zeros_like(update.delta)
        self.delta_sum.add_(update.delta, alpha=weight)
        for name, value in update.extras.items():
            acc = self.extras_sum.get(name)
            if acc is None:
                acc = self.extras_sum[name] = torch.zeros_like(value)
            acc.add_(value, alpha=weight)
        for name, count in update.counts.items():
            self.counts_sum[name] = self.counts_sum.get(name, 0.0) + float(count)
        self.weight_sum += weight
        self.num_clients += 1

    def result(self) -> RoundAggregate | None:
        if self.delta_sum is None:
            return None
        return RoundAggregate(
            self.delta_sum, self.weight_sum, self.num_clients, self.extras_sum, counts_sum=dict(self.counts_sum)
        )


class CollectAll(StreamingSum):
    """Keeps every update (and the sums), for strategies with ``needs_all_updates``."""

    def __init__(self) -> None:
        super().__init__()
        self.updates: list[ClientUpdate] = []
        self.weights: list[float] = []

    def add(self, update: ClientUpdate, weight: float) -> None:
        super().add(update, weight)
        self.updates.append(update)
        self.weights.append(weight)


@dataclass
class ShardResult:
    """What one process contributes to a round: its sums and the side information of its clients.

    The unit of the cross-process reduce (:func:`lightfed.distributed.merge_round` merges every process's
    shard into one, the same on all of them).
    """

    aggregator: Aggregator
    metrics: list[dict[str, float]] = field(default_factory=list)
    #: Updates added by callbacks (an audit's canaries): summed like any update, but not clients.
    extra: int = 0
    #: Optimizer steps the clients of this shard took (0 with updates: nobody trained).
    steps: int = 0
    rejected: list[int] = field(default_factory=list)
    #: The persistent client states accepted this round (stateful strategies), to share with every process.
    states: dict[int, dict[str, Tensor]] = field(default_factory=dict)
