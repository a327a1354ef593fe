"""FedAsync: the global model moves on every arrival, by a staleness-weighted step (Xie et al. 2019)."""

from __future__ import annotations

from lightfed.checks import require
from lightfed.registry import STRATEGIES
from lightfed.simtime.staleness import StalenessKind
from lightfed_zoo.strategies.fedbuff import FedBuff


@STRATEGIES.register("FedAsync")
class FedAsync(FedBuff):
    """FedAsync (Xie, Koyejo & Gupta 2019, "Asynchronous Federated Optimization", Algorithm 1).

    Every arrival is a server step (run it with ``trainer.clients_per_round: 1`` under
    ``trainer.clock: lightfed.simtime.BufferedAsync``): client ``k`` trained from the model of version
    ``t - tau`` and sent ``Delta_k = x_new - x_{t-tau}``;

    .. math::

        \\alpha_t = \\alpha\\, s(\\tau), \\qquad x_t = x_{t-1} + \\alpha_t \\Delta_k,

    with ``s`` constant, polynomial ``(1 + tau)^-a`` or hinge (``1`` for ``tau <= b``, else
    ``1 / (a (tau - b) + 1)``). This is :class:`FedBuff` with ``K = 1``, plain SGD and ``eta = alpha``; with a
    larger ``trainer.clients_per_round`` (or in untimed rounds) it steps by ``alpha`` times the buffer's mean.

    Paper vs. popular code: the paper mixes models, ``x_t = (1 - alpha_t) x_{t-1} + alpha_t x_new``, which is
    ``x_{t-1} + alpha_t (Delta_k + x_{t-tau} - x_{t-1})``: it also pulls the model back towards the stale
    ``x_{t-tau}``. Like FLSim's FedAsync and the FedBuff paper's comparison, this implementation applies the
    update only (``x_{t-1} + alpha_t Delta_k``); the two agree when ``tau = 0``. The update form is what stays
    a linear aggregate, so it composes with DP and secure aggregation.

    Args:
        alpha: The mixing weight ``alpha`` in (0, 1] (paper: 0.6 to 0.9).
        staleness: ``constant``, ``polynomial`` or ``hinge``.
        staleness_a: ``a`` (paper: 0.5 polynomial, 10 hinge).
        staleness_b: ``b`` of the hinge (paper: 4).
    """

    def __init__(
        self,
        alpha: float = 0.6,
        staleness: StalenessKind = "polynomial",
        staleness_a: float = 0.5,
        staleness_b: int = 4,
    ) -> None:
        require(0 < alpha <= 1, f"FedAsync alpha must be in (0, 1], got {alpha} (`strategy.init_args.alpha`).")
        super().__init__(
            server_lr=alpha, staleness=staleness, staleness_a=staleness_a, staleness_b=staleness_b
        )
        self.alpha = float(alpha)
