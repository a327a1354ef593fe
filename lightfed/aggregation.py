"""Aggregators: where client contributions go during a round.

:class:`StreamingSum` keeps running weighted sums (O(model) memory, whatever the cohort size), exact and
independent of the order of the updates (:mod:`lightfed.exact_sum`);
:class:`CollectAll` keeps every update for strategies that need them (robust aggregation). A secure
aggregation plugin provides its own :class:`Aggregator` that only ever reveals the sums.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from torch import Tensor

from lightfed.exact_sum import ExactScalar, ExactSum
from lightfed.messages import ClientUpdate, RoundAggregate


class Aggregator:
    """Receives ``(update, weight)`` pairs one at a time; produces the round's sums."""

    def add(self, update: ClientUpdate, weight: float) -> None:
        raise NotImplementedError

    def result(self) -> RoundAggregate | None:
        """The round's sums, or ``None`` when nothing (or not enough) was received."""
        raise NotImplementedError


class StreamingSum(Aggregator):
    """Running ``sum_k w_k x_k`` and ``sum_k w_k`` for the delta and each extra; ``sum_k c_k`` for each count.

    Every sum is exact and order-free (:mod:`lightfed.exact_sum`): the tensors as integer bins (24 bytes a
    coordinate), the weights and counts as exact scalars. So the released sums have the same bits whatever
    the order of the updates and however the cohort is sharded over processes
    (:func:`lightfed.distributed.merge_round` all-reduces the same bins), and each coordinate is within one
    float32 ulp of the exact sum.
    """

    def __init__(self) -> None:
        self.delta_sum: ExactSum | None = None
        self.extras_sum: dict[str, ExactSum] = {}
        self.counts_sum: dict[str, ExactScalar] = {}
        self.weight_sum = ExactScalar()
        self.num_clients = 0

    def add(self, update: ClientUpdate, weight: float) -> None:
        if self.delta_sum is None:
            self.delta_sum = ExactSum(update.delta)
        self.delta_sum.add(update.delta, weight)
        for name, value in update.extras.items():
            acc = self.extras_sum.get(name)
            if acc is None:
                acc = self.extras_sum[name] = ExactSum(value)
            acc.add(value, weight)
        for name, count in update.counts.items():
            self.counts_sum.setdefault(name, ExactScalar()).add(float(count))
        self.weight_sum.add(weight)
        self.num_clients += 1

    def result(self) -> RoundAggregate | None:
        if self.delta_sum is None:
            return None
        return RoundAggregate(
            self.delta_sum.value(), self.weight_sum.value(), self.num_clients,
            {k: v.value() for k, v in self.extras_sum.items()},
            counts_sum={k: v.value() for k, v in self.counts_sum.items()},
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
