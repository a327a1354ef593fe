"""Byzantine clients for robustness experiments, as a wrapper around any strategy (not registered).

Select it with a dotted ``class_path`` in a config, wrapping the strategy under attack::

    strategy:
      class_path: plugins.attacks.SignFlipAttack
      init_args:
        strategy: {class_path: Krum, init_args: {f: 2}}
        fraction: 0.2
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from lightfed.context import ClientContext
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES
from lightfed.seeding import make_generator
from lightfed.strategy import Strategy


class SignFlipAttack(Strategy):
    """A fixed, seeded ``fraction`` of the clients are Byzantine: they send ``-scale`` times their honest update.

    The wrapped strategy runs unchanged (its client hooks, its aggregation, its state); after its
    :meth:`~lightfed.strategy.Strategy.on_client_end`, a Byzantine client replaces its delta ``d`` with
    ``-scale * d`` (the sign-flipping attack of the Byzantine-robust learning literature, e.g. Li et al.,
    "RSA: Byzantine-Robust Stochastic Aggregation Methods", AAAI 2019). Extras (SCAFFOLD's ``delta_c``, q-FedAvg's
    ``h``) are left honest: the attack targets the model update. The Byzantine clients are the first
    ``round(fraction * N)`` of a permutation of the population drawn from ``make_generator(seed,
    "sign_flip")``, the same in every round and on every process.

    Args:
        strategy: The strategy under attack (an instance or a registered name).
        fraction: Fraction of the population that is Byzantine, in ``[0, 1)``.
        scale: Magnitude of the flipped update (> 0; ``1`` is a plain sign flip).
        seed: Seed of the choice of Byzantine clients.

    Raises:
        ValueError: for ``fraction`` outside ``[0, 1)`` or ``scale <= 0``.
    """

    def __init__(self, strategy: Strategy | str = "FedAvg", fraction: float = 0.2, scale: float = 1.0, seed: int = 0) -> None:
        if not 0 <= fraction < 1:
            raise ValueError(f"SignFlipAttack fraction must be in [0, 1), got {fraction} (`strategy.init_args.fraction`).")
        if not scale > 0:
            raise ValueError(f"SignFlipAttack scale must be > 0, got {scale} (`strategy.init_args.scale`).")
        self.strategy = STRATEGIES.create(strategy) if isinstance(strategy, str) else strategy
        self.fraction = float(fraction)
        self.scale = float(scale)
        self.seed = seed
        # the wrapper declares its strategy's capabilities (plus its own on_client_end), never inferred
        self.needs_all_updates = self.strategy.needs_all_updates  # type: ignore[misc]
        self.uses_client_state = self.strategy.uses_client_state  # type: ignore[misc]
        self.samples_own_cohort = self.strategy.samples_own_cohort  # type: ignore[misc]
        self.client_hooks = self.strategy.client_hooks | {"on_client_end"}  # type: ignore[misc]
        self.byzantine: frozenset[int] = frozenset()

    @property
    def weighted(self) -> bool:
        """The wrapped strategy's ``weighted`` (example-count weights), which privacy mechanisms check."""
        return bool(getattr(self.strategy, "weighted", False))

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        count = round(self.fraction * num_clients)
        order = torch.randperm(num_clients, generator=make_generator(self.seed, "sign_flip"))
        self.byzantine = frozenset(order[:count].tolist())
        self.strategy.setup(spec, num_clients, global_params)

    # ------------------------------------------------------------------ the attack
    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        update = self.strategy.on_client_end(ctx, update)
        if update.client_id in self.byzantine:
            update.delta = -self.scale * update.delta
        return update

    # ------------------------------------------------------------------ everything else: the wrapped strategy
    def sample_clients(self, round_idx: int, num_clients: int, seed: int) -> list[int] | None:
        return self.strategy.sample_clients(round_idx, num_clients, seed)

    def round_metrics(self) -> dict[str, float]:
        return self.strategy.round_metrics()

    def check_cohort(self, cohort_size: float) -> None:
        self.strategy.check_cohort(cohort_size)

    def client_payload(self, round_idx: int) -> dict[str, Any]:
        return self.strategy.client_payload(round_idx)

    def on_client_start(self, ctx: ClientContext) -> None:
        self.strategy.on_client_start(ctx)

    def client_loss(self, ctx: ClientContext, loss: Tensor) -> Tensor:
        return self.strategy.client_loss(ctx, loss)

    def on_before_optimizer_step(self, ctx: ClientContext) -> None:
        self.strategy.on_before_optimizer_step(ctx)

    def eval_params(self, client_id: int, state: dict[str, Tensor], global_params: Tensor) -> Tensor:
        return self.strategy.eval_params(client_id, state, global_params)

    def client_weight(self, update: ClientUpdate) -> float:
        return self.strategy.client_weight(update)

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return self.strategy.aggregate(global_params, aggregate, round_idx)

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        return self.strategy.aggregate_updates(global_params, updates, weights, round_idx)

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)
