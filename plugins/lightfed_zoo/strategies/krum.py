"""Krum, Multi-Krum (Blanchard et al. 2017) and Bulyan (El Mhamdi et al. 2018): Byzantine-robust selection."""

from __future__ import annotations

import warnings

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.messages import ClientUpdate
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES
from lightfed.strategy import Strategy
from lightfed_zoo.strategies.base import coordinate_median, stack_deltas


def pairwise_sq_distances(x: Tensor) -> Tensor:
    """``D[i, j] = ||x_i - x_j||^2`` for the rows of ``x``, in float64 from exact differences.

    (The ``|a|^2 + |b|^2 - 2ab`` shortcut loses the small distances between near-identical updates that
    decide Krum's choice.)
    """
    x64 = x.double()
    return torch.cdist(x64, x64, compute_mode="donot_use_mm_for_euclid_dist").pow(2)


def krum_scores(dist: Tensor, num_neighbours: int) -> Tensor:
    """Krum's score of each vector: the sum of its squared distances to its ``num_neighbours`` nearest others."""
    d = dist.clone()
    d.fill_diagonal_(float("inf"))
    return d.sort(dim=1).values[:, :num_neighbours].sum(dim=1)


def krum_order(dist: Tensor, num_neighbours: int) -> Tensor:
    """Indices from best to worst Krum score; ties go to the vector with the smaller sum of squared distances
    to all others (the more central one).

    Ties are not rare: with one neighbour, two mutually nearest vectors always have the same score. Breaking
    them by position would make the result depend on the order the clients arrived in.
    """
    scores = krum_scores(dist, num_neighbours)
    order = torch.argsort(dist.sum(dim=1), stable=True)
    return order[torch.argsort(scores[order], stable=True)]


def _check_f(f: int, owner: str) -> int:
    require(
        isinstance(f, int) and not isinstance(f, bool) and f >= 0,
        f"{owner} f (Byzantine clients tolerated per round) must be an int >= 0, got {f!r} (`strategy.init_args.f`).",
    )
    return f


@STRATEGIES.register("Krum")
class Krum(Strategy):
    """Krum (Blanchard et al. 2017): the update closest to its n - f - 2 nearest neighbours is the new step.

    With ``n`` updates of which at most ``f`` are Byzantine, each update ``i`` is scored

    .. math::

        s(i) = \\sum_{j \\in N_i} \\lVert \\delta_i - \\delta_j \\rVert^2,

    ``N_i`` being the ``n - f - 2`` updates nearest to ``delta_i`` (itself excluded), and the new model is
    ``w + delta_{i*}`` with ``i* = argmin_i s(i)``. Blanchard, El Mhamdi, Guerraoui, Stainer, "Machine Learning
    with Adversaries: Byzantine Tolerant Gradient Descent", NeurIPS 2017. The resilience
    guarantee needs ``n > 2f + 2`` (a warning otherwise); the score needs ``n - f - 2 >= 1`` (an error
    otherwise). Unweighted, as in the paper. Equal scores (two mutually nearest updates always tie when
    ``n - f - 2 = 1``) go to the update with the smaller sum of squared distances to all others, so the
    choice never depends on the order the clients arrived in.

    Paper vs. popular code: Flower's ``aggregate_krum`` silently uses ``max(1, n - f - 2)`` neighbours, so
    a too-large ``f`` runs as a different rule; here it is an error naming ``f`` and the cohort size.

    Args:
        f: Number of Byzantine clients per round to tolerate (int >= 0).

    Raises:
        ValueError: for ``f < 0`` or a non-int ``f``; at set-up if the whole population has fewer than
            ``f + 3`` clients; at aggregation if the round has fewer than ``f + 3`` updates.
    """

    needs_all_updates = True
    label = "Krum"

    def __init__(self, f: int = 1) -> None:
        self.f = _check_f(f, self.label)
        self._warned: set[int] = set()

    def min_updates(self) -> int:
        """The fewest updates a round must have (``n - f - 2 >= 1``)."""
        return self.f + 3

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        require(
            num_clients >= self.min_updates(),
            f"{self.label} with f={self.f} needs at least f + 3 = {self.min_updates()} updates per round, but the data "
            f"has only {num_clients} clients; lower `strategy.init_args.f` or raise the number of clients.",
        )

    def check_cohort(self, cohort_size: float) -> None:
        require(
            cohort_size >= self.min_updates(),
            f"{self.label} with f={self.f} needs at least {self.min_updates()} updates per round, but the sampler gives "
            f"{cohort_size:g} clients per round; raise `trainer.clients_per_round` (or the sampling rate) or lower "
            f"`strategy.init_args.f`.",
        )

    def check_round(self, n: int) -> None:
        """Raise if ``n`` updates are too few for the score; warn once if the guarantee ``n > 2f + 2`` fails."""
        require(
            n >= self.min_updates(),
            f"{self.label} with f={self.f} needs n - f - 2 >= 1, i.e. at least {self.min_updates()} updates, but the "
            f"round has n={n}; lower `strategy.init_args.f` or raise `trainer.clients_per_round`.",
        )
        if n <= 2 * self.f + 2 and n not in self._warned:
            self._warned.add(n)
            warnings.warn(
                f"{self.label} with f={self.f} and n={n} updates: Blanchard et al.'s resilience guarantee needs "
                f"n > 2f + 2 = {2 * self.f + 2}.",
                RuntimeWarning, stacklevel=3,
            )

    def select(self, order: Tensor, n: int) -> Tensor:
        """The chosen updates, given the indices from best to worst score (Krum: the best)."""
        return order[:1]

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        n = len(updates)
        self.check_round(n)
        deltas = stack_deltas(updates)
        chosen = self.select(krum_order(pairwise_sq_distances(deltas), n - self.f - 2), n)
        return global_params + deltas[chosen].mean(dim=0)


@STRATEGIES.register("MultiKrum")
class MultiKrum(Krum):
    """Multi-Krum (Blanchard et al. 2017): the mean of the m updates with the best Krum scores.

    Scores are Krum's (:class:`Krum`), computed once on all ``n`` updates; the ``m`` best are averaged
    uniformly: ``w + (1/m) sum_{i in best m} delta_i``. ``m = 1`` is Krum, ``m = n`` the plain mean.
    Blanchard et al., NeurIPS 2017, whose experiments use ``m = n - f``, the
    default here.

    Paper vs. popular code: Flower's Multi-Krum averages the selected updates weighted by example counts;
    the paper averages them uniformly, as here.

    Args:
        f: Number of Byzantine clients per round to tolerate (int >= 0).
        m: Updates to average (int >= 1); ``None`` means ``n - f`` for a round of ``n``.

    Raises:
        ValueError: for ``f < 0`` or ``m < 1``; at aggregation if ``m`` exceeds the round's updates or the
            round has fewer than ``f + 3`` updates.
    """

    label = "MultiKrum"

    def __init__(self, f: int = 1, m: int | None = None) -> None:
        super().__init__(f)
        require(
            m is None or (isinstance(m, int) and not isinstance(m, bool) and m >= 1),
            f"MultiKrum m (updates averaged) must be an int >= 1 or null (n - f), got {m!r} (`strategy.init_args.m`).",
        )
        self.m = m

    def select(self, order: Tensor, n: int) -> Tensor:
        m = self.m if self.m is not None else n - self.f
        require(
            m <= n,
            f"MultiKrum m={m} exceeds the round's {n} updates; lower `strategy.init_args.m` (or leave it null "
            f"for n - f) or raise `trainer.clients_per_round`.",
        )
        return order[:m]


@STRATEGIES.register("Bulyan")
class Bulyan(Strategy):
    """Bulyan (El Mhamdi et al. 2018): Krum-select n - 2f updates, then a coordinate-wise trimmed mean around the median.

    With ``n >= 4f + 3`` updates:

    1. *selection*: apply Krum recursively -- pick the Krum winner of the remaining set, move it to the
       selection ``S``, repeat -- until ``|S| = theta = n - 2f``;
    2. *aggregation*: for each coordinate ``j``, average the ``beta = theta - 2f`` values of
       ``{delta_s[j] : s in S}`` closest to their median:

    .. math::

        w_{t+1}[j] = w_t[j] + \\frac{1}{\\beta} \\sum_{s \\in B_j} \\delta_s[j], \\quad
        B_j = \\operatorname*{arg\\,min}_{|B| = \\beta} \\sum_{s \\in B} |\\delta_s[j] - \\operatorname{med}_{S}[j]|.

    El Mhamdi, Guerraoui, Rouault, "The Hidden Vulnerability of Distributed Learning in Byzantium", ICML
    2018. Unweighted. In the recursion a Krum call on ``r`` remaining updates uses
    ``r - f - 2`` neighbours; the last calls (``r`` down to ``2f + 1``) would have fewer than one, where
    this implementation (like Flower's) uses one neighbour. Equal Krum scores are broken as in
    :class:`Krum`, equal distances to the median by value order, so the result never depends on the order
    the clients arrived in.

    Args:
        f: Number of Byzantine clients per round to tolerate (int >= 0).

    Raises:
        ValueError: for ``f < 0``; at set-up if the population has fewer than ``4f + 3`` clients; at
            aggregation if the round has fewer than ``4f + 3`` updates.
    """

    needs_all_updates = True

    def __init__(self, f: int = 1) -> None:
        self.f = _check_f(f, "Bulyan")

    def min_updates(self) -> int:
        """The fewest updates a round must have (``n >= 4f + 3``)."""
        return 4 * self.f + 3

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        require(
            num_clients >= self.min_updates(),
            f"Bulyan with f={self.f} needs n >= 4f + 3 = {self.min_updates()} updates per round, but the data has "
            f"only {num_clients} clients; lower `strategy.init_args.f` or raise the number of clients.",
        )

    def check_cohort(self, cohort_size: float) -> None:
        require(
            cohort_size >= self.min_updates(),
            f"Bulyan with f={self.f} needs n >= 4f + 3 = {self.min_updates()} updates per round, but the sampler gives "
            f"{cohort_size:g} clients per round; raise `trainer.clients_per_round` (or the sampling rate) or lower "
            f"`strategy.init_args.f`.",
        )

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        n, f = len(updates), self.f
        require(
            n >= self.min_updates(),
            f"Bulyan with f={f} needs n >= 4f + 3 = {self.min_updates()} updates, but the round has n={n}; lower "
            f"`strategy.init_args.f` or raise `trainer.clients_per_round`.",
        )
        deltas = stack_deltas(updates)
        dist = pairwise_sq_distances(deltas)
        theta, beta = n - 2 * f, n - 4 * f
        remaining = list(range(n))
        selected: list[int] = []
        while len(selected) < theta:
            sub = dist[remaining][:, remaining]
            best = krum_order(sub, max(len(remaining) - f - 2, 1))[0]
            selected.append(remaining.pop(int(best)))
        ordered = deltas[selected].sort(dim=0).values
        distance = (ordered - coordinate_median(ordered)).abs()
        closest = torch.argsort(distance, dim=0, stable=True)[:beta]
        return global_params + ordered.gather(0, closest).mean(dim=0)
