"""Ditto: personalised models regularised toward the global one (Li et al. 2021)."""

from __future__ import annotations

from torch import Tensor

from lightfed.checks import require
from lightfed.context import ClientContext
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy

_PERSONAL = "personal"


@STRATEGIES.register("Ditto")
class Ditto(Strategy):
    """Ditto (Li et al. 2021): FedAvg for the global model plus a personal model per client, pulled toward it.

    Each selected client ``k`` (i) trains the global model as in FedAvg and sends ``w_k - w^t``, and (ii)
    trains its personal model ``v_k`` on its own data for ``personal_epochs`` epochs on

    .. math::

        \\min_{v_k}\\; F_k(v_k) + \\frac{\\lambda}{2} \\lVert v_k - w^t \\rVert^2,

    i.e. ``v_k <- v_k - eta (grad F_k(v_k) + lambda (v_k - w^t))`` with the module's own optimiser. The
    server averages the global updates (FedAvg). Li, Hu, Beirami, Smith, "Ditto: Fair and Robust Federated
    Learning Through Personalization", ICML 2021, Algorithm 1. ``lambda = 0`` gives purely local models;
    large ``lambda`` gives the global one.

    ``v_k`` lives in the client's persistent state (checkpointed by the simulation); Algorithm 1 takes the
    initial ``v_k`` as an input, and here it is the global model the client first receives. Federated
    evaluation (``trainer.fed_eval_fraction``) evaluates each client's own validation split with its
    personal model (:meth:`eval_params`); clients never selected yet use the global model. Central
    accuracy is the global model's. Personal steps call ``backward`` without a gradient scaler (use 32-bit
    or ``bf16`` precision, not ``16-mixed``).

    Args:
        lam: ``lambda`` (>= 0), the pull of personal models toward the global model.
        personal_epochs: Local epochs of personal training per visit (>= 1; the paper's ``s`` steps).
        server_lr: Server learning rate of the global FedAvg step (> 0).
        weighted: Weight clients by their number of examples (``False``: uniform).

    Raises:
        ValueError: for ``lam < 0``, ``personal_epochs < 1`` or ``server_lr <= 0``.
    """

    uses_client_state = True

    def __init__(
        self, lam: float = 0.1, personal_epochs: int = 1, server_lr: float = 1.0, weighted: bool = True
    ) -> None:
        require(lam >= 0, f"Ditto lam must be >= 0, got {lam} (`strategy.init_args.lam`).")
        require(
            isinstance(personal_epochs, int) and personal_epochs >= 1,
            f"Ditto personal_epochs must be an int >= 1, got {personal_epochs!r} (`strategy.init_args.personal_epochs`).",
        )
        require(
            server_lr > 0, f"Ditto server_lr must be > 0, got {server_lr} (`strategy.init_args.server_lr`)."
        )
        self.lam = float(lam)
        self.personal_epochs = personal_epochs
        self.server_lr = float(server_lr)
        self.weighted = weighted

    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        """After the global update is computed, train the personal model on the same worker module."""
        personal = ctx.state.get(_PERSONAL)
        if personal is None:
            personal = ctx.global_params
        tensors = ctx.local_tensors()
        ctx.spec.assign(tensors, personal)
        pairs = ctx.param_pairs()
        optimizer = ctx.make_optimizer()
        ctx.module.train()
        for epoch in range(self.personal_epochs):
            for batch_idx, batch in enumerate(ctx.batches(epoch)):
                loss = ctx.training_loss(batch, batch_idx)
                if loss is None:
                    continue
                if self.lam > 0:
                    loss = loss + 0.5 * self.lam * sum((v - w).pow(2).sum() for v, w in pairs)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
        ctx.state[_PERSONAL] = ctx.spec.flatten(tensors)
        return update

    def eval_params(self, client_id: int, state: dict[str, Tensor], global_params: Tensor) -> Tensor:
        personal = state.get(_PERSONAL)
        return global_params if personal is None else personal.to(global_params.device)

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return global_params + self.server_lr * aggregate.mean_delta()

