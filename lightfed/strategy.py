"""The strategy contract (the plugin API for aggregation algorithms) and FedAvg, the default.

A strategy decides four things, each a hook with a default so a simple strategy is a few lines:

* **who and what** -- :meth:`Strategy.sample_clients` (``None``: use the configured sampler) and
  :meth:`Strategy.client_payload` (config values and tensors sent to every client of a round);
* **client side** -- :meth:`on_client_start`, :meth:`client_loss`, :meth:`on_before_optimizer_step`,
  :meth:`on_client_end` change local training without touching the user's LightningModule, and may read
  and write the client's persistent ``ctx.state``;
* **server side** -- a *linear* strategy implements :meth:`aggregate` on a :class:`RoundAggregate`
  (weighted sums only), which keeps memory O(model), shards across processes with one all-reduce, and
  composes with differential privacy and secure aggregation; a strategy that needs every individual
  update (median, Krum) sets ``needs_all_updates = True`` and implements :meth:`aggregate_updates`;
* **state** -- :meth:`state_dict` / :meth:`load_state_dict` carry server state (momentum, Adam moments,
  control variates) through checkpoints.

Hook methods run on the worker that trains the client; with several processes every rank holds a copy
of the strategy and applies the same :meth:`aggregate` to the same all-reduced sums, so server state
stays identical on all ranks.
"""

from __future__ import annotations

from typing import Any, ClassVar, Final

from torch import Tensor

from lightfed.context import ClientContext
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES

#: The client-side hooks a strategy may change; :attr:`Strategy.client_hooks` declares which it uses.
CLIENT_HOOKS: Final = frozenset({"on_client_start", "client_loss", "on_before_optimizer_step", "on_client_end"})


class Strategy:
    """Base class of aggregation strategies; every hook does the FedAvg thing by default.

    Capabilities are declared as attributes, read by privacy mechanisms, secure aggregation and executors
    (never by inspecting methods, so a wrapper such as ``SignFlipAttack`` declares its wrapped strategy's):

    * :attr:`needs_all_updates`, :attr:`uses_client_state`, :attr:`samples_own_cohort`;
    * :attr:`client_hooks`: which of :data:`CLIENT_HOOKS` the strategy changes. A class that does not set
      it gets, once at class creation, the hooks it overrides, so forgetting it cannot hide a hook;
    * :attr:`weighted`: example-count weights (``n_k``) or uniform weights in the round's sums.
    """

    #: ``True`` for strategies that need each client's update (robust aggregators). They get the list in
    #: :meth:`aggregate_updates`; memory is then O(model x clients), and DP / secure aggregation refuse
    #: them because those only ever produce sums.
    needs_all_updates: ClassVar[bool] = False

    #: ``True`` for strategies whose clients keep state (``ctx.state``) between rounds.
    uses_client_state: ClassVar[bool] = False

    #: ``True`` for strategies that pick their own cohorts (:meth:`sample_clients`); client-level DP refuses
    #: them (its accountant derives its events from ``trainer.sampler``).
    samples_own_cohort: ClassVar[bool] = False

    #: The client-side hooks this strategy changes (DP-SGD refuses gradient and loss changes; the vmap
    #: executor runs only some hooks).
    client_hooks: ClassVar[frozenset[str]] = frozenset()

    #: ``True``: weight client ``k`` by its number of examples ``n_k``; ``False``: every client weighs 1.
    weighted: bool = True

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "client_hooks" not in cls.__dict__:
            inherited = frozenset().union(*(getattr(b, "client_hooks", frozenset()) for b in cls.__mro__[1:]))
            cls.client_hooks = inherited | {h for h in CLIENT_HOOKS if getattr(cls, h) is not getattr(Strategy, h)}
        if "samples_own_cohort" not in cls.__dict__ and cls.sample_clients is not Strategy.sample_clients:
            cls.samples_own_cohort = True

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        """Called once before the first round (and before a checkpoint's state is loaded)."""

    def check_cohort(self, cohort_size: float) -> None:
        """Raise ``ValueError`` at set-up if rounds of ``cohort_size`` clients (the sampler's fixed or expected
        size) are too small for this strategy (Krum needs ``n >= f + 3``), before any client trains."""

    # ------------------------------------------------------------------ who and what
    def sample_clients(self, round_idx: int, num_clients: int, seed: int) -> list[int] | None:
        """Pick this round's cohort; ``None`` (the default) uses the trainer's sampler."""
        return None

    def client_payload(self, round_idx: int) -> dict[str, Any]:
        """Values and tensors sent to every client of the round (counted in bytes down)."""
        return {}

    # ------------------------------------------------------------------ client side
    def on_client_start(self, ctx: ClientContext) -> None:
        """Before a client's first local step (global weights already loaded)."""

    def client_loss(self, ctx: ClientContext, loss: Tensor) -> Tensor:
        """Change the local loss (FedProx adds a proximal term); returns the loss to minimise."""
        return loss

    def on_before_optimizer_step(self, ctx: ClientContext) -> None:
        """After backward, before the optimizer step (SCAFFOLD corrects gradients here)."""

    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        """Turn the raw update into what the client sends (add extras, normalise, update ``ctx.state``)."""
        return update

    def eval_params(self, client_id: int, state: dict[str, Tensor], global_params: Tensor) -> Tensor:
        """The flat payload a client evaluates with in federated evaluation (Ditto: its personal model)."""
        return global_params

    # ------------------------------------------------------------------ server side
    def client_weight(self, update: ClientUpdate) -> float:
        """Weight of ``update`` in the round's sums: ``n_k`` if :attr:`weighted`, else 1."""
        return float(update.num_examples) if self.weighted else 1.0

    def round_metrics(self) -> dict[str, float]:
        """Diagnostics of the last server step, logged under ``strategy/`` every round (default: none)."""
        return {}

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        """New global payload from the round's weighted sums (linear strategies)."""
        return global_params + aggregate.mean_delta()

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        """New global payload from every update (strategies with ``needs_all_updates``)."""
        raise NotImplementedError(f"{type(self).__name__} sets needs_all_updates but has no aggregate_updates()")

    def state_dict(self) -> dict[str, Any]:
        """Server state for checkpoints (tensors and plain Python values)."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


@STRATEGIES.register("FedAvg")
class FedAvg(Strategy):
    """Federated Averaging (McMahan et al. 2017), with an optional server learning rate.

    ``w <- w + server_lr * sum_k n_k delta_k / sum_k n_k``, where ``delta_k`` is client ``k``'s
    ``local - global`` and ``n_k`` its number of examples (``weighted=False``: uniform weights).
    """

    def __init__(self, server_lr: float = 1.0, weighted: bool = True) -> None:
        if server_lr <= 0:
            raise ValueError(f"FedAvg server_lr must be > 0, got {server_lr}.")
        self.server_lr = server_lr
        self.weighted = weighted

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return global_params + self.server_lr * aggregate.mean_delta()


def resolve_strategy(strategy: Strategy | str | None) -> Strategy:
    """The strategy a config names: ``None`` is FedAvg, a string a registered name, or an instance."""
    if strategy is None:
        return FedAvg()
    if isinstance(strategy, str):
        try:
            return STRATEGIES.create(strategy)
        except KeyError as err:
            raise ValueError(err.args[0]) from err
    if not isinstance(strategy, Strategy):
        raise TypeError(f"strategy must be a lightfed Strategy or a registered name, got {type(strategy).__name__}.")
    return strategy
