"""Shared "boring" pieces of the strategy-plugin tests: toy modules, client data, one simulated round.

Not a test module (no ``test_`` prefix); the tests import it as ``tests.plugins.zoo_testing``. The pieces a
plugin author needs too (``TinyRegressor``, ``regression_clients``, ``train_clients``, the server step) are
public in :mod:`lightfed.testing` and re-exported here.
"""

from __future__ import annotations

from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightfed import ClientData, ClientUpdate, ParamSpec, RoundAggregate, Strategy
from lightfed.context import ClientContext
from lightfed.testing import TinyRegressor, regression_clients, run_server_round, train_clients

__all__ = [
    "Quadratic", "TinyRegressor", "UnregisteredStrategy", "aggregate", "constant_client", "make_ctx", "regression_clients",
    "round_aggregate", "train_clients", "update",
]


class Quadratic(L.LightningModule):
    """``loss = 0.5 * ||w - mean(batch)||^2``: gradient ``w - a`` exactly, so every step is hand-computable."""

    def __init__(self, dim: int = 2, lr: float = 0.1, momentum: float = 0.0) -> None:
        super().__init__()
        self.w = nn.Parameter(torch.zeros(dim))
        self.lr, self.momentum = lr, momentum

    def training_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        self.log("train_loss_logged", 1.0)
        target = batch[0].mean(dim=0)
        return 0.5 * (self.w - target).pow(2).sum()

    def test_step(self, batch: tuple[Tensor, ...], batch_idx: int) -> None:
        self.log("test_loss", self.training_step(batch, batch_idx))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr, momentum=self.momentum)


def constant_client(target: list[float], n: int) -> ClientData:
    """A client of :class:`Quadratic` whose ``n`` examples all equal ``target`` (so every batch mean is exact)."""
    x = torch.tensor([target] * n, dtype=torch.float32)
    return ClientData((x,), torch.arange(n))


def make_ctx(
    module: nn.Module,
    global_params: Tensor | None = None,
    *,
    payload: dict[str, Any] | None = None,
    state: dict[str, Tensor] | None = None,
    data: ClientData | None = None,
    client_id: int = 0,
    round_idx: int = 0,
    batch_size: int = 64,
) -> ClientContext:
    """A :class:`ClientContext` built by hand, for calling client hooks directly."""
    spec = ParamSpec.from_module(module)
    flat = spec.flatten(spec.tensors(module)) if global_params is None else global_params
    data = data if data is not None else ClientData((torch.zeros(1, 1),), torch.arange(1))

    def batches(epoch: int) -> Any:
        return data.batches(batch_size)

    def make_optimizer() -> torch.optim.Optimizer:
        if hasattr(module, "configure_optimizers"):
            return module.configure_optimizers()
        return torch.optim.SGD([p for p in module.parameters() if p.requires_grad], lr=0.1)

    ctx = ClientContext(
        client_id=client_id, round_idx=round_idx, module=module, spec=spec, global_params=flat,
        payload=payload or {}, state=state if state is not None else {}, num_examples=len(data),
        batches=batches, make_optimizer=make_optimizer,
    )
    ctx.optimizer = make_optimizer()
    return ctx


def aggregate(strategy: Strategy, global_params: Tensor, updates: list[ClientUpdate], round_idx: int) -> Tensor:
    """The trainer's server step (:func:`lightfed.testing.run_server_round`) on ``updates``."""
    return run_server_round(strategy, global_params, updates, round_idx).global_params


def round_aggregate(deltas: list[list[float]], weights: list[float], extras: dict[str, list[list[float]]] | None = None) -> RoundAggregate:
    """A :class:`RoundAggregate` written out by hand: ``sum_k w_k x_k`` for the deltas and each extra."""
    w = torch.tensor(weights, dtype=torch.float32)
    d = torch.tensor(deltas, dtype=torch.float32)
    sums = {name: (w[:, None] * torch.tensor(v, dtype=torch.float32)).sum(0) for name, v in (extras or {}).items()}
    return RoundAggregate((w[:, None] * d).sum(0), float(w.sum()), len(weights), sums)


def update(client_id: int, delta: list[float], num_examples: int = 1, **extras: list[float]) -> ClientUpdate:
    """A :class:`ClientUpdate` with an explicit delta (and extras)."""
    return ClientUpdate(
        client_id=client_id, delta=torch.tensor(delta, dtype=torch.float32), num_examples=num_examples,
        extras={k: torch.tensor(v, dtype=torch.float32) for k, v in extras.items()},
    )


class UnregisteredStrategy(Strategy):
    """A strategy no registry knows: reachable only by its dotted class path (route 3)."""

    def __init__(self, scale: float = 1.0) -> None:
        if scale <= 0:
            raise ValueError(f"UnregisteredStrategy scale must be > 0, got {scale} (`strategy.init_args.scale`).")
        self.scale = scale

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return global_params + self.scale * aggregate.mean_delta()
