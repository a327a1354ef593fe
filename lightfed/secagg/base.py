"""The secure-aggregation contract: a round's sums without any individual update."""

from __future__ import annotations

from typing import Any

from lightfed.aggregation import Aggregator
from lightfed.strategy import Strategy


class SecureAggregation:
    """Base class of ``secure_aggregation:`` plugins (registry group ``lightfed.secure_aggregation``).

    :meth:`aggregator` returns a fresh :class:`~lightfed.aggregation.Aggregator` per round that the
    trainer feeds with each client's weighted update and that reveals only the sums (or ``None`` when
    the round fails closed).
    """

    def setup(self, *, strategy: Strategy, privacy: Any, numel: int, seed: int) -> None:
        """Refuse strategies that need individual updates; size the protocol."""
        if strategy.needs_all_updates:
            raise ValueError(
                f"secure aggregation reveals only sums, but {type(strategy).__name__} needs every individual "
                f"update (robust aggregation, or FLoRA's stacked adapters); use a linear strategy (FedAvg, FedAvgM, "
                f"FedAdam, FFALoRA, ...)."
            )

    def aggregator(self, round_idx: int, cohort: list[int]) -> Aggregator:
        raise NotImplementedError

    def round_metrics(self) -> dict[str, float]:
        """Metrics of the last round (bytes, dropouts, reconstruction time) to log under ``secagg/``."""
        return {}

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
