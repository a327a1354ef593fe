"""FedMeanClip: FedAvg with a trust region on the server step, written against lightfed's public API only."""

from __future__ import annotations

from typing import Any

from torch import Tensor

from lightfed import STRATEGIES, ClientUpdate, RoundAggregate, Strategy


@STRATEGIES.register("FedMeanClip")
class FedMeanClip(Strategy):
    """FedMeanClip: FedAvg whose mean update is scaled down to at most max_norm (a server trust region).

    ``w <- w + Delta * min(1, max_norm / ||Delta||)`` with ``Delta = sum_k w_k delta_k / sum_k w_k``, the
    FedAvg mean of the round's updates (``w_k = n_k``, or 1 with ``weighted=False``). A linear strategy: it
    only reads the round's weighted sums, so it streams, shards and composes with DP and secure aggregation.
    It counts the rounds whose step it clipped, as server state that goes into checkpoints.

    Args:
        max_norm: Largest L2 norm of the server step (> 0).
        weighted: Weight clients by their number of examples (``False``: uniform).

    Raises:
        ValueError: for ``max_norm <= 0``.
    """

    def __init__(self, max_norm: float = 1.0, weighted: bool = True) -> None:
        if not max_norm > 0:
            raise ValueError(f"FedMeanClip max_norm must be > 0, got {max_norm} (`strategy.init_args.max_norm`).")
        self.max_norm = float(max_norm)
        self.weighted = weighted
        self.clipped_rounds = 0

    def client_weight(self, update: ClientUpdate) -> float:
        return float(update.num_examples) if self.weighted else 1.0

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        step = aggregate.mean_delta()
        norm = float(step.norm())
        if norm > self.max_norm:
            self.clipped_rounds += 1
            step = step * (self.max_norm / norm)
        return global_params + step

    def state_dict(self) -> dict[str, Any]:
        return {"clipped_rounds": self.clipped_rounds}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.clipped_rounds = int(state["clipped_rounds"])
