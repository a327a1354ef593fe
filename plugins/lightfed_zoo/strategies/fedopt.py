"""FedAdagrad, FedAdam, FedYogi: adaptive server optimisers (Reddi et al. 2021)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.messages import RoundAggregate
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy
from lightfed_zoo.strategies.base import check_fraction, restore_tensor


def adaptive_step(
    global_params: Tensor, delta: Tensor, m: Tensor, v: Tensor, *, eta: float, beta1: float, tau: float,
    second_moment: Callable[[Tensor, Tensor], Tensor],
) -> tuple[Tensor, Tensor, Tensor]:
    """One server step of Reddi et al. (2021), Algorithm 2 (see :class:`FedOpt`): ``(w_{t+1}, m_t, v_t)``.

    Shared by the FedOpt strategies and any strategy that offers an adaptive server step (the LoRA strategies'
    ``server_optimizer: adam``); ``second_moment(v_{t-1}, Delta_t^2)`` is the variant's rule.
    """
    m = beta1 * m + (1 - beta1) * delta
    v = second_moment(v, delta * delta)
    return global_params + eta * m / (v.sqrt() + tau), m, v


def adam_second_moment(v: Tensor, delta_sq: Tensor, beta2: float) -> Tensor:
    """FedAdam's ``v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2``."""
    return beta2 * v + (1 - beta2) * delta_sq


class FedOpt(Strategy):
    """Adaptive Federated Optimization (Reddi et al. 2021, Algorithm 2), shared by the three variants.

    The round's mean update is the (negated) pseudo-gradient ``Delta_t = sum_k w_k delta_k / sum_k w_k``;
    the server keeps a first moment ``m`` and a second moment ``v`` and steps

    .. math::

        m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) \\Delta_t, \\qquad
        w_{t+1} = w_t + \\eta \\frac{m_t}{\\sqrt{v_t} + \\tau},

    with ``v_t`` given by the variant (:meth:`second_moment`), ``m_{-1} = 0`` and ``v_{-1} = tau^2`` (the
    paper requires ``v_{-1} >= tau^2``). Reddi, Charles, Zaheer, Garrett, Rush, Konecny, Kumar, McMahan,
    "Adaptive Federated Optimization", ICLR 2021.

    Paper vs. popular code: the paper has no bias correction and starts ``v`` at ``tau^2``, and so does
    this implementation. Flower's ``FedAdam`` (checked in 1.22 to 1.28, both ``flwr.server.strategy`` and
    ``flwr.serverapp.strategy``) multiplies ``eta`` by ``sqrt(1 - beta2^(t+1)) / (1 - beta1^(t+1))`` where
    ``t`` is its 1-based ``server_round`` (so round 1 already uses ``beta^2``), and its ``FedOpt``
    strategies start ``m`` and ``v`` at zero. The paper averages client updates uniformly
    (``weighted=False``); ``weighted=True`` (the default, as for every linear strategy here) uses
    example-count weights.
    """

    #: Name used in error messages.
    label = "FedOpt"

    def __init__(self, eta: float, beta1: float, beta2: float, tau: float, weighted: bool) -> None:
        name = self.label
        require(
            eta > 0, f"{name} eta (server learning rate) must be > 0, got {eta} (`strategy.init_args.eta`)."
        )
        require(tau > 0, f"{name} tau (adaptivity) must be > 0, got {tau} (`strategy.init_args.tau`).")
        self.eta = float(eta)
        self.beta1 = check_fraction(beta1, "beta1", name, 0.0, 1.0)
        self.beta2 = check_fraction(beta2, "beta2", name, 0.0, 1.0)
        self.tau = float(tau)
        self.weighted = weighted
        self.m: Tensor | None = None
        self.v: Tensor | None = None

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        self.m = torch.zeros_like(global_params)
        self.v = torch.full_like(global_params, self.tau**2)

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        """``v_t`` from ``v_{t-1}`` and ``Delta_t^2`` (the variant's rule)."""
        raise NotImplementedError

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        if self.m is None or self.v is None:
            self.m = torch.zeros_like(global_params)
            self.v = torch.full_like(global_params, self.tau**2)
        new, self.m, self.v = adaptive_step(
            global_params, aggregate.mean_delta(), self.m, self.v, eta=self.eta, beta1=self.beta1, tau=self.tau,
            second_moment=self.second_moment,
        )
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.m = restore_tensor(state, "m", self.m, self.label)
        self.v = restore_tensor(state, "v", self.v, self.label)


@STRATEGIES.register("FedAdagrad")
class FedAdagrad(FedOpt):
    """FedAdagrad (Reddi et al. 2021): Adagrad on the server, v_t = v_{t-1} + Delta_t^2.

    See :class:`FedOpt` for the update and the paper. Algorithm 2 keeps the first moment ``m_t`` for all
    three variants; ``beta1=0`` (the default) makes it plain Adagrad, ``w + eta * Delta_t / (sqrt(v_t) + tau)``.

    Args:
        eta: Server learning rate (> 0).
        beta1: First-moment decay in ``[0, 1)``.
        tau: Adaptivity ``tau`` (> 0); also ``v``'s starting value ``tau^2``.
        weighted: Weight clients by their number of examples (``False``: the paper's uniform mean).

    Raises:
        ValueError: for ``eta <= 0``, ``tau <= 0`` or ``beta1`` outside ``[0, 1)``.
    """

    label = "FedAdagrad"

    def __init__(self, eta: float = 0.1, beta1: float = 0.0, tau: float = 1e-2, weighted: bool = True) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=0.0, tau=tau, weighted=weighted)

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v + delta_sq


@STRATEGIES.register("FedAdam")
class FedAdam(FedOpt):
    """FedAdam (Reddi et al. 2021): Adam on the server, v_t = beta2 v_{t-1} + (1 - beta2) Delta_t^2.

    See :class:`FedOpt` for the update and the paper (no bias correction, as in the paper).

    Args:
        eta: Server learning rate (> 0).
        beta1: First-moment decay in ``[0, 1)``.
        beta2: Second-moment decay in ``[0, 1)``.
        tau: Adaptivity ``tau`` (> 0); also ``v``'s starting value ``tau^2``.
        weighted: Weight clients by their number of examples (``False``: the paper's uniform mean).

    Raises:
        ValueError: for ``eta <= 0``, ``tau <= 0`` or a ``beta`` outside ``[0, 1)``.
    """

    label = "FedAdam"

    def __init__(
        self, eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, weighted: bool = True
    ) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=beta2, tau=tau, weighted=weighted)

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return adam_second_moment(v, delta_sq, self.beta2)


@STRATEGIES.register("FedYogi")
class FedYogi(FedOpt):
    """FedYogi (Reddi et al. 2021): Yogi on the server, v_t = v_{t-1} - (1 - beta2) Delta_t^2 sign(v_{t-1} - Delta_t^2).

    See :class:`FedOpt` for the update and the paper. Yogi (Zaheer et al. 2018) grows ``v`` additively
    instead of Adam's multiplicative forgetting, so a few large updates cannot shrink the step size abruptly.

    Args:
        eta: Server learning rate (> 0).
        beta1: First-moment decay in ``[0, 1)``.
        beta2: Second-moment rate in ``[0, 1)``.
        tau: Adaptivity ``tau`` (> 0); also ``v``'s starting value ``tau^2``.
        weighted: Weight clients by their number of examples (``False``: the paper's uniform mean).

    Raises:
        ValueError: for ``eta <= 0``, ``tau <= 0`` or a ``beta`` outside ``[0, 1)``.
    """

    label = "FedYogi"

    def __init__(
        self, eta: float = 0.01, beta1: float = 0.9, beta2: float = 0.99, tau: float = 1e-3, weighted: bool = True
    ) -> None:
        super().__init__(eta=eta, beta1=beta1, beta2=beta2, tau=tau, weighted=weighted)

    def second_moment(self, v: Tensor, delta_sq: Tensor) -> Tensor:
        return v - (1 - self.beta2) * delta_sq * torch.sign(v - delta_sq)
