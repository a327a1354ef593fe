"""Coordinate-wise robust aggregation: median and trimmed mean (Yin et al. 2018)."""

from __future__ import annotations

import math

from torch import Tensor

from lightfed.messages import ClientUpdate
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy
from lightfed_zoo.strategies.base import check_fraction, coordinate_median, stack_deltas


@STRATEGIES.register("FedMedian")
class FedMedian(Strategy):
    """FedMedian (Yin et al. 2018): the new model moves by the coordinate-wise median of the updates.

    .. math::

        w_{t+1}[j] = w_t[j] + \\operatorname{med}\\{\\delta_1[j], \\dots, \\delta_n[j]\\},

    the median of an even count being the mean of the two middle values. Equivalent to the median of the
    client models, since the median commutes with the shift by ``w_t``. Yin, Chen, Ramchandran, Bartlett,
    "Byzantine-Robust Distributed Learning: Towards Optimal Statistical Rates", ICML 2018 (coordinate-wise
    median). Unweighted, as in the paper (example counts are ignored: a Byzantine client could
    claim any count). Needs every update, so it is incompatible with secure aggregation and central DP.
    """

    needs_all_updates = True

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        return global_params + coordinate_median(stack_deltas(updates))


@STRATEGIES.register("FedTrimmedAvg")
class FedTrimmedAvg(Strategy):
    """FedTrimmedAvg (Yin et al. 2018): coordinate-wise mean after dropping the beta-fraction extremes.

    For each coordinate ``j`` the ``n`` values ``delta_k[j]`` are sorted, the ``b = floor(beta * n)``
    smallest and ``b`` largest are dropped, and the remaining ``n - 2b`` are averaged:

    .. math::

        w_{t+1}[j] = w_t[j] + \\frac{1}{n - 2b} \\sum_{i=b+1}^{n-b} \\delta_{(i)}[j].

    Yin, Chen, Ramchandran, Bartlett, "Byzantine-Robust Distributed Learning: Towards Optimal Statistical
    Rates", ICML 2018 (coordinate-wise trimmed mean). Unweighted, as in the paper. ``beta < 1/2``
    guarantees ``n - 2b >= 1`` for every cohort size; ``beta = 0`` is the plain uniform mean.

    Args:
        beta: Fraction trimmed at each end, in ``[0, 0.5)``.

    Raises:
        ValueError: for ``beta`` outside ``[0, 0.5)``.
    """

    needs_all_updates = True

    def __init__(self, beta: float = 0.2) -> None:
        self.beta = check_fraction(beta, "beta", "FedTrimmedAvg", 0.0, 0.5)

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        n = len(updates)
        cut = math.floor(self.beta * n + 1e-9)  # 0.29 * 100 is 28.999...96 in floating point
        ordered = stack_deltas(updates).sort(dim=0).values
        return global_params + ordered[cut : n - cut].mean(dim=0)
