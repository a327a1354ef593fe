"""FedAvgM: federated averaging with server momentum (Hsu, Qi, Brown 2019)."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.messages import RoundAggregate
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy
from lightfed_zoo.strategies.base import check_fraction, restore_tensor


@STRATEGIES.register("FedAvgM")
class FedAvgM(Strategy):
    """FedAvgM (Hsu et al. 2019): FedAvg with heavy-ball momentum on the server.

    With the round's mean update ``Delta_t = sum_k w_k delta_k / sum_k w_k`` (``delta_k = local - global``):

    .. math::

        m_t = \\beta m_{t-1} + \\Delta_t, \\qquad w_{t+1} = w_t + \\eta\\, m_t, \\qquad m_{-1} = 0.

    This is Hsu, Qi, Brown, "Measuring the Effects of Non-Identical Data Distribution for Federated Visual
    Classification" (2019), written with ``delta = -pseudo-gradient``; ``momentum=0`` is FedAvg
    with a server learning rate. The momentum buffer is server state: it is checkpointed and restored.

    Args:
        server_lr: Server learning rate ``eta`` (> 0).
        momentum: Momentum ``beta`` in ``[0, 1)``.
        weighted: Weight clients by their number of examples (``False``: uniform).

    Raises:
        ValueError: for ``server_lr <= 0`` or ``momentum`` outside ``[0, 1)``.
    """

    def __init__(self, server_lr: float = 1.0, momentum: float = 0.9, weighted: bool = True) -> None:
        require(
            server_lr > 0, f"FedAvgM server_lr must be > 0, got {server_lr} (`strategy.init_args.server_lr`)."
        )
        self.server_lr = float(server_lr)
        self.momentum = check_fraction(momentum, "momentum", "FedAvgM", 0.0, 1.0)
        self.weighted = weighted
        self.buffer: Tensor | None = None

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        self.buffer = torch.zeros_like(global_params)

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        if self.buffer is None:
            self.buffer = torch.zeros_like(global_params)
        self.buffer = self.momentum * self.buffer + aggregate.mean_delta()
        return global_params + self.server_lr * self.buffer

    def state_dict(self) -> dict[str, Any]:
        return {"momentum_buffer": self.buffer}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.buffer = restore_tensor(state, "momentum_buffer", self.buffer, "FedAvgM")
