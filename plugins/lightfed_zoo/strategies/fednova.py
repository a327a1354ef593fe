"""FedNova: normalised averaging for heterogeneous local work (Wang et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.context import ClientContext
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy

_TAU = "fednova_tau"


@STRATEGIES.register("FedNova")
class FedNova(Strategy):
    """FedNova (Wang et al. 2020): each client's update is divided by its local work ||a_i||_1 before averaging.

    A client that runs more local steps moves further; plain averaging then optimises a skewed objective
    ("objective inconsistency"). FedNova normalises client ``i``'s cumulative update by ``||a_i||_1``, the
    sum of the weights its local solver gave its gradients, and rescales the mean by the effective number
    of steps ``tau_eff``:

    .. math::

        w_{t+1} = w_t + \\eta_g\\, \\tau_{\\text{eff}} \\sum_i p_i \\frac{\\delta_i}{\\lVert a_i \\rVert_1},
        \\qquad \\tau_{\\text{eff}} = \\sum_i p_i \\lVert a_i \\rVert_1,

    with ``p_i`` the clients' weights (example counts by default) normalised over the round. For plain
    SGD ``a_i = [1, ..., 1]`` and ``||a_i||_1 = tau_i``, the client's number of steps; for SGD with momentum
    ``rho``, ``||a_i||_1 = sum_{k=1}^{tau_i} (1 - rho^k) / (1 - rho)`` (the paper's momentum case).
    Wang, Liu, Liang, Joshi, Poor, "Tackling the Objective Inconsistency Problem in Heterogeneous Federated
    Optimization", NeurIPS 2020. Other optimisers (Adam) fall back to ``||a_i||_1 = tau_i``.
    With equal local work it is FedAvg.

    To stay linear (streamed, sharded, DP- and SecAgg-compatible) the client sends ``delta_i / ||a_i||_1``
    as its delta and ``||a_i||_1`` as a one-element extra; the round's weighted means of the two give
    ``sum_i p_i delta_i / ||a_i||_1`` and ``tau_eff``.

    Args:
        server_lr: Global step size ``eta_g`` (> 0).
        weighted: ``p_i`` proportional to example counts (``False``: uniform).

    Raises:
        ValueError: for ``server_lr <= 0``.
    """

    def __init__(self, server_lr: float = 1.0, weighted: bool = True) -> None:
        require(
            server_lr > 0, f"FedNova server_lr must be > 0, got {server_lr} (`strategy.init_args.server_lr`)."
        )
        self.server_lr = float(server_lr)
        self.weighted = weighted

    def on_client_start(self, ctx: ClientContext) -> None:
        ctx.extras["fednova"] = {"counter": 0.0, "norm": 0.0}

    def on_before_optimizer_step(self, ctx: ClientContext) -> None:
        opt = ctx.optimizer
        rho = float(opt.param_groups[0].get("momentum", 0.0)) if isinstance(opt, torch.optim.SGD) else 0.0
        scratch = ctx.extras["fednova"]
        # after k steps counter = (1 - rho^k) / (1 - rho); the sum over the steps is ||a_i||_1
        scratch["counter"] = rho * scratch["counter"] + 1.0
        scratch["norm"] += scratch["counter"]

    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        norm = ctx.extras["fednova"]["norm"]
        if norm > 0:
            update.delta = update.delta / norm
        update.extras[_TAU] = torch.tensor([norm], dtype=update.delta.dtype, device=update.delta.device)
        return update

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        if _TAU not in aggregate.extras_sum:
            raise ValueError("FedNova updates carry no local-work extra: the client hooks did not run on these updates.")
        tau_eff = aggregate.mean_extra(_TAU)
        return global_params + self.server_lr * tau_eff * aggregate.mean_delta()
