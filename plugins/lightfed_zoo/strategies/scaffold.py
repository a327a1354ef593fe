"""SCAFFOLD: control variates against client drift (Karimireddy et al. 2020), option II."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.context import ClientContext
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy
from lightfed_zoo.strategies.base import local_lr, parameter_mask, restore_tensor

_C = "scaffold_c"


@STRATEGIES.register("SCAFFOLD")
class SCAFFOLD(Strategy):
    """SCAFFOLD (Karimireddy et al. 2020): local gradients corrected by control variates c - c_i (option II).

    The server keeps a control variate ``c`` and sends it with the model; client ``i`` keeps its own
    ``c_i`` (initially 0) in its persistent state. Every local step uses the corrected gradient

    .. math::

        y_i \\leftarrow y_i - \\eta_l\\, (g_i(y_i) - c_i + c),

    and after ``K`` steps the client sets (option II) and sends

    .. math::

        c_i^+ = c_i - c + \\frac{1}{K \\eta_l} (x - y_i), \\qquad
        (\\Delta y_i, \\Delta c_i) = (y_i - x,\\; c_i^+ - c_i).

    The server, with ``S`` the round's clients and ``N`` the population, steps

    .. math::

        x \\leftarrow x + \\eta_g \\operatorname{mean}_{i \\in S} \\Delta y_i, \\qquad
        c \\leftarrow c + \\frac{|S|}{N} \\operatorname{mean}_{i \\in S} \\Delta c_i.

    Karimireddy, Kale, Mohri, Reddi, Stich, Suresh, "SCAFFOLD: Stochastic Controlled Averaging for
    Federated Learning", ICML 2020, Algorithm 1. ``K eta_l`` is the sum of the learning rates of the steps
    actually taken (exact under a learning-rate schedule). Option II's identity assumes plain SGD; with
    local momentum or Adam the correction is applied to the gradient the optimizer receives, the usual
    practice. Under ``precision="16-mixed"`` the gradients are loss-scaled when the correction is added, so
    use 32-bit or ``bf16`` precision with SCAFFOLD. Control variates cover the payload's parameters; buffers
    (BatchNorm statistics) carry 0.
    ``|S|`` is the aggregate's released ``num_clients``: the realised count without privacy, and under
    client-level DP the public expected cohort ``m`` (DP never releases the realised count), so the step is
    ``q * mean(Delta c)`` there.
    ``c`` travels to clients each round (``bytes_down`` doubles) and ``Delta c_i`` is an extra of the
    update, summed with the same weight as ``Delta y_i``. The paper averages uniformly (``weighted=False``);
    with ``weighted=True`` both means use example-count weights. ``c`` is server state (checkpointed), each
    ``c_i`` client state (checkpointed by the simulation).

    Args:
        server_lr: Global step size ``eta_g`` (> 0; the paper's default is 1).
        weighted: Weight clients by their number of examples (``False``: the paper's uniform mean).

    Raises:
        ValueError: for ``server_lr <= 0``.
    """

    uses_client_state = True

    def __init__(self, server_lr: float = 1.0, weighted: bool = True) -> None:
        require(
            server_lr > 0,
            f"SCAFFOLD server_lr must be > 0, got {server_lr} (`strategy.init_args.server_lr`).",
        )
        self.server_lr = float(server_lr)
        self.weighted = weighted
        self.c: Tensor | None = None
        self.num_clients = 0

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        self.c = torch.zeros_like(global_params)
        self.num_clients = num_clients

    def client_payload(self, round_idx: int) -> dict[str, Any]:
        if self.c is None:
            raise RuntimeError("SCAFFOLD.setup() was not called: the server control variate does not exist yet.")
        return {_C: self.c}

    # ------------------------------------------------------------------ client side
    def on_client_start(self, ctx: ClientContext) -> None:
        c = ctx.payload[_C]
        c_i = ctx.state.get("c")
        if c_i is None:
            c_i = torch.zeros_like(c)
        correction = c - c_i
        params = [(p, corr) for p, corr, b in zip(ctx.local_tensors(), ctx.spec.unflatten(correction), ctx.spec.is_buffer) if not b]
        ctx.extras["scaffold"] = {"c": c, "c_i": c_i, "pairs": params, "lr_sum": 0.0}

    def on_before_optimizer_step(self, ctx: ClientContext) -> None:
        scratch = ctx.extras["scaffold"]
        for p, corr in scratch["pairs"]:
            if p.grad is not None:
                p.grad.add_(corr.to(p.grad.dtype))
        scratch["lr_sum"] += local_lr(ctx.optimizer)

    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        scratch = ctx.extras["scaffold"]
        c, c_i, lr_sum = scratch["c"], scratch["c_i"], scratch["lr_sum"]
        if lr_sum > 0:
            mask = parameter_mask(ctx.spec, c.device)
            c_new = torch.where(mask, c_i - c - update.delta / lr_sum, torch.zeros_like(c_i))
        else:  # no step taken: nothing learnt about the client's drift
            c_new = c_i.clone()
        ctx.state["c"] = c_new
        update.extras["delta_c"] = c_new - c_i
        return update

    # ------------------------------------------------------------------ server side
    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        if self.c is None:
            self.c = torch.zeros_like(global_params)
        if "delta_c" not in aggregate.extras_sum:
            raise ValueError("SCAFFOLD updates carry no 'delta_c' extra: the client hooks did not run on these updates.")
        scale = aggregate.num_clients / self.num_clients if self.num_clients else 1.0
        self.c = self.c + scale * aggregate.mean_extra("delta_c")
        return global_params + self.server_lr * aggregate.mean_delta()

    def state_dict(self) -> dict[str, Any]:
        return {"c": self.c}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.c = restore_tensor(state, "c", self.c, "SCAFFOLD")
