"""FedBuff: buffered asynchronous aggregation with staleness weights (Nguyen et al. 2022)."""

from __future__ import annotations

from typing import Any, Literal

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES
from lightfed.simtime.staleness import StalenessKind, check_staleness, staleness_of, staleness_weight
from lightfed.strategy import Strategy
from lightfed_zoo.strategies.base import check_fraction, restore_tensor
from lightfed_zoo.strategies.fedopt import adam_second_moment, adaptive_step


@STRATEGIES.register("FedBuff")
class FedBuff(Strategy):
    """FedBuff (Nguyen et al. 2022): the server steps once per ``K`` buffered, staleness-weighted updates.

    A flush of the buffer ``B`` (``|B| = K``, filled by the asynchronous engine ``trainer.clock:
    lightfed.simtime.BufferedAsync`` with ``trainer.clients_per_round: K``) computes

    .. math::

        \\bar\\Delta = \\frac{1}{K} \\sum_{k \\in B} s(\\tau_k)\\, \\Delta_k,
        \\qquad s(\\tau) = (1 + \\tau)^{-1/2},

    where ``tau_k`` is how many flushes happened since client ``k`` downloaded its model, then a server
    step: ``sgd`` ``w <- w + eta Delta``, ``momentum`` ``m <- beta m + Delta; w <- w + eta m`` (FedAvgM's),
    or ``adam`` (FedAdam's step, Reddi et al. 2021, no bias correction). Nguyen, Malik, Zhan, Yousefpour,
    Rabbat, Malek & Huba, "Federated Learning with Buffered Asynchronous Aggregation", AISTATS 2022,
    Algorithm 1 and Sec. 4.

    Paper vs. popular code: the paper divides by ``K``, not by the sum of the weights, so stale buffers step
    less; so does this implementation (under DP the denominator is the public ``K`` anyway), and so does
    FLSim's FedBuff. Clients are weighted uniformly (``weighted`` is fixed to ``False``): example counts
    would break DP's sensitivity and the paper does not use them. The ``max_staleness`` cut-off is the
    engine's (``trainer.clock.init_args.max_staleness``): a discarded update never enters the buffer.

    Args:
        server_lr: ``eta`` (> 0).
        staleness: ``s(tau)``: ``polynomial`` (``(1 + tau)^-a``, the paper's with ``a = 1/2``), ``hinge``
            or ``constant``.
        staleness_a: ``a`` of the polynomial or hinge function.
        staleness_b: ``b`` of the hinge function.
        server_optimizer: ``sgd``, ``momentum`` or ``adam``.
        momentum: ``beta`` of ``momentum``.
        beta1: Adam's first-moment decay.
        beta2: Adam's second-moment decay.
        tau: Adam's adaptivity (and ``v``'s start ``tau^2``).

    Raises:
        ValueError: for a non-positive ``server_lr`` or ``tau``, a decay outside ``[0, 1)``, an unknown
            optimizer or staleness function.
    """

    weighted = False

    def __init__(
        self,
        server_lr: float = 1.0,
        staleness: StalenessKind = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: int = 0,
        server_optimizer: Literal["sgd", "momentum", "adam"] = "sgd",
        momentum: float = 0.9,
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        owner = type(self).__name__
        require(server_lr > 0,
              f"{owner} server_lr must be > 0, got {server_lr} (`strategy.init_args.server_lr`).")
        require(server_optimizer in ("sgd", "momentum", "adam"),
              f"{owner} server_optimizer must be 'sgd', 'momentum' or 'adam', got {server_optimizer!r} "
              f"(`strategy.init_args.server_optimizer`).")
        require(tau > 0, f"{owner} tau must be > 0, got {tau} (`strategy.init_args.tau`).")
        check_staleness(staleness, staleness_a, staleness_b, owner)
        self.server_lr = float(server_lr)
        self.staleness, self.staleness_a, self.staleness_b = staleness, float(staleness_a), int(staleness_b)
        self.server_optimizer = server_optimizer
        self.momentum = check_fraction(momentum, "momentum", owner, 0.0, 1.0)
        self.beta1 = check_fraction(beta1, "beta1", owner, 0.0, 1.0)
        self.beta2 = check_fraction(beta2, "beta2", owner, 0.0, 1.0)
        self.tau = float(tau)
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        self.m = torch.zeros_like(global_params)
        self.v = torch.full_like(global_params, self.tau**2)

    def client_weight(self, update: ClientUpdate) -> float:
        """``s(tau_k)``: public, at most 1 (a function of the schedule, never of the client's data)."""
        return staleness_weight(staleness_of(update), self.staleness, self.staleness_a, self.staleness_b)

    def buffer_mean(self, aggregate: RoundAggregate) -> Tensor:
        """``sum_k s(tau_k) Delta_k / K`` (``num_clients`` is ``K``, or DP's public ``K``)."""
        return aggregate.delta_sum / max(float(aggregate.num_clients), 1.0)

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        delta = self.buffer_mean(aggregate)
        if self.m is None or self.v is None:
            self.setup(None, 0, global_params)  # type: ignore[arg-type]
        if self.server_optimizer == "sgd":
            return global_params + self.server_lr * delta
        if self.server_optimizer == "momentum":
            self.m = self.momentum * self.m + delta
            return global_params + self.server_lr * self.m
        new, self.m, self.v = adaptive_step(
            global_params, delta, self.m, self.v, eta=self.server_lr, beta1=self.beta1, tau=self.tau,
            second_moment=lambda v, d2: adam_second_moment(v, d2, self.beta2),
        )
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = restore_tensor(state, "m", self.m, type(self).__name__)
        self.v = restore_tensor(state, "v", self.v, type(self).__name__)
