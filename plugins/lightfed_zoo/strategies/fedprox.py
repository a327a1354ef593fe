"""FedProx: a proximal term in every client's loss (Li et al. 2020)."""

from __future__ import annotations

from torch import Tensor

from lightfed.checks import require
from lightfed.context import ClientContext
from lightfed.messages import RoundAggregate
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy


@STRATEGIES.register("FedProx")
class FedProx(Strategy):
    """FedProx (Li et al. 2020): each client minimises its loss plus (mu/2)||w - w_global||^2.

    Client ``k`` approximately solves

    .. math::

        \\min_w\\; h_k(w; w^t) = F_k(w) + \\frac{\\mu}{2} \\lVert w - w^t \\rVert_2^2,

    which adds ``mu * (w - w^t)`` to every local gradient and keeps heterogeneous clients near the global
    model; the server then averages as FedAvg: ``w^{t+1} = w^t + server_lr * mean_k delta_k``. Li, Sahu,
    Zaheer, Sanjabi, Talwalkar, Smith, "Federated Optimization in Heterogeneous Networks", MLSys 2020,
    Algorithm 2. The term runs over the payload's parameters (buffers have no gradient).

    Paper vs. popular code: the paper's term is the *squared* Euclidean norm over all parameters, as here.
    Flower's FedProx example (``strategy/fedprox.py`` docstring) adds ``(mu/2) * sum_l ||w_l - w^t_l||``,
    a sum of per-layer *unsquared* norms, whose gradient has constant magnitude ``mu/2`` per layer.

    Args:
        mu: Proximal coefficient (>= 0; ``0`` is FedAvg).
        server_lr: Server learning rate (> 0; the paper uses 1).
        weighted: Weight clients by their number of examples (``False``: uniform).

    Raises:
        ValueError: for ``mu < 0`` or ``server_lr <= 0``.
    """

    def __init__(self, mu: float = 0.01, server_lr: float = 1.0, weighted: bool = True) -> None:
        require(mu >= 0, f"FedProx mu must be >= 0 (0 is FedAvg), got {mu} (`strategy.init_args.mu`).")
        require(
            server_lr > 0, f"FedProx server_lr must be > 0, got {server_lr} (`strategy.init_args.server_lr`)."
        )
        self.mu = float(mu)
        self.server_lr = float(server_lr)
        self.weighted = weighted

    def on_client_start(self, ctx: ClientContext) -> None:
        ctx.extras["fedprox_pairs"] = ctx.param_pairs()

    def client_loss(self, ctx: ClientContext, loss: Tensor) -> Tensor:
        if self.mu == 0:
            return loss
        pairs = ctx.extras.get("fedprox_pairs") or ctx.param_pairs()
        prox = sum((local - glob).pow(2).sum() for local, glob in pairs)
        return loss + 0.5 * self.mu * prox

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return global_params + self.server_lr * aggregate.mean_delta()
