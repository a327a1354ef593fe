"""q-FedAvg: fair resource allocation, q-FFL solved with local updates (Li et al. 2020)."""

from __future__ import annotations

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.context import ClientContext
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy
from lightfed_zoo.strategies.base import local_lr

_H = "qfedavg_h"
_EPS = 1e-10  # added to F_k, as in the authors' code, so that F_k^(q-1) stays finite at F_k = 0


@STRATEGIES.register("QFedAvg")
class QFedAvg(Strategy):
    """q-FedAvg (Li et al. 2020): clients with a higher loss get more weight, for a fairer accuracy spread.

    It minimises the q-FFL objective ``sum_k p_k F_k^{q+1}(w) / (q + 1)``. Client ``k`` measures its loss
    ``F_k = F_k(w^t)`` at the global model, runs its local epochs to ``wbar_k``, and sends

    .. math::

        \\Delta w_k = L (w^t - \\bar w_k), \\quad
        \\Delta_k = F_k^q \\Delta w_k, \\quad
        h_k = q F_k^{q-1} \\lVert \\Delta w_k \\rVert^2 + L F_k^q;

    the server steps ``w^{t+1} = w^t - sum_k Delta_k / sum_k h_k``. ``L`` estimates the Lipschitz constant
    of the gradient; as in the paper's experiments it defaults to ``1 / lr`` of the local optimiser.
    ``q = 0`` is FedAvg. Li, Sanjabi, Beirami, Smith, "Fair Resource Allocation in Federated Learning",
    ICLR 2020 (the q-FedAvg algorithm).

    To keep one model-sized tensor on the wire, ``-Delta_k`` travels as the update's delta and ``h_k`` as a
    one-element extra; both are summed with the client's weight, so the server's ratio of the two means is
    ``sum_k w_k Delta_k / sum_k w_k h_k``. The paper samples clients with probability ``p_k`` (proportional
    to their data) and sums uniformly; with this library's uniform sampling ``weighted=True`` (the default)
    puts ``p_k`` into the sums instead, and ``weighted=False`` is the literal uniform sum.

    Args:
        q: Fairness parameter (>= 0; larger is fairer, 0 is FedAvg).
        lipschitz: ``L`` (> 0); ``None`` uses ``1 / lr`` of each client's local optimiser.
        weighted: Weight clients by their number of examples (see above).

    Raises:
        ValueError: for ``q < 0`` or ``lipschitz <= 0``.
    """

    def __init__(self, q: float = 1.0, lipschitz: float | None = None, weighted: bool = True) -> None:
        require(q >= 0, f"QFedAvg q must be >= 0 (0 is FedAvg), got {q} (`strategy.init_args.q`).")
        require(
            lipschitz is None or lipschitz > 0,
            f"QFedAvg lipschitz must be > 0 or null (1 / local lr), got {lipschitz} (`strategy.init_args.lipschitz`).",
        )
        self.q = float(q)
        self.lipschitz = None if lipschitz is None else float(lipschitz)
        self.weighted = weighted

    @torch.no_grad()
    def on_client_start(self, ctx: ClientContext) -> None:
        """Measure ``F_k(w^t)``, the mean training loss of the client at the global model (eval mode)."""
        module = ctx.module
        was_training = module.training
        module.eval()
        total = torch.zeros((), dtype=torch.float64, device=ctx.global_params.device)
        count = 0
        for batch_idx, batch in enumerate(ctx.batches(0)):
            loss = ctx.training_loss(batch, batch_idx)
            if loss is None:
                continue
            total += loss.detach().double() * len(batch[0])
            count += len(batch[0])
        module.train(was_training)
        if count == 0 and ctx.num_examples > 0:
            raise RuntimeError(
                f"QFedAvg measures each client's loss at the global model over ctx.batches(0), but it yielded no "
                f"batch for client {ctx.client_id} ({ctx.num_examples} examples); run q-FedAvg with "
                f"`trainer.executor: sequential`."
            )
        ctx.extras["qfedavg_loss"] = float(total) / max(count, 1)

    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        if "qfedavg_loss" not in ctx.extras:
            raise RuntimeError(
                "QFedAvg.on_client_end ran without on_client_start in the same visit (no F_k(w^t) measured); "
                "run q-FedAvg with `trainer.executor: sequential`."
            )
        optimizer = ctx.optimizer if ctx.optimizer is not None else ctx.make_optimizer()
        lipschitz = self.lipschitz if self.lipschitz is not None else 1.0 / local_lr(optimizer)
        loss = ctx.extras["qfedavg_loss"] + _EPS
        step = -lipschitz * update.delta  # Delta w_k = L (w^t - wbar_k)
        loss_q = loss**self.q
        h = lipschitz * loss_q
        if self.q > 0:
            h += self.q * loss ** (self.q - 1) * float(step.double().pow(2).sum())
        update.delta = -loss_q * step
        update.extras[_H] = torch.tensor([h], dtype=update.delta.dtype, device=update.delta.device)
        return update

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        if _H not in aggregate.extras_sum:
            raise ValueError("QFedAvg updates carry no 'h' extra: the client hooks did not run on these updates.")
        h = aggregate.mean_extra(_H)
        if float(h) <= 0:
            return global_params.clone()
        return global_params + aggregate.mean_delta() / h
