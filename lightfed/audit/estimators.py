"""Pure functions that turn attack statistics into epsilons: estimates and lower bounds.

Two kinds of numbers come out of an audit, and they mean different things:

* an **estimate** (:func:`epsilon_two_gaussians`, used by the one-shot canary audit): the epsilon of the
  best test between two *fitted* distributions. It is what the run leaks to that attack if the fits are
  right; it carries a bootstrap interval (:func:`bootstrap_interval`), never a guarantee;
* a **lower bound** (:func:`one_run_epsilon_lower_bound`): with probability at least ``1 - beta`` over the
  canaries' coin flips, the mechanism is *not* ``(epsilon, delta)``-DP for any smaller epsilon. A bound above
  the accountant's epsilon is proof of a bug (or of a false claim); a bound below it proves nothing.

Neither is a proof of privacy: an audit measures one attack, and a stronger attack may leak more.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from scipy import optimize, special, stats


@dataclass(frozen=True)
class GaussianFit:
    """Mean and standard deviation (``ddof=1``) of a sample, and its size."""

    mean: float
    std: float
    n: int

    @classmethod
    def of(cls, values: Sequence[float] | np.ndarray) -> GaussianFit:
        x = np.asarray(values, dtype=np.float64)
        if x.size < 2:
            raise ValueError(f"a Gaussian fit needs at least 2 values, got {x.size}.")
        return cls(float(x.mean()), float(x.std(ddof=1)), int(x.size))


def _log_mass(lo: float, hi: float, mean: float, std: float) -> float:
    """``log P[lo < X < hi]`` for ``X ~ N(mean, std^2)``, accurate in both tails."""
    if hi <= lo:
        return -math.inf
    a, b = (lo - mean) / std, (hi - mean) / std
    if a > 0:  # both in the upper tail: use survival functions
        la, lb = special.log_ndtr(-a), special.log_ndtr(-b)
    else:
        la, lb = special.log_ndtr(b), special.log_ndtr(a)
    if lb == -math.inf:
        return float(la)
    return float(la + math.log1p(-math.exp(min(lb - la, 0.0)))) if lb < la else -math.inf


def delta_two_gaussians(p: GaussianFit, q: GaussianFit, epsilon: float) -> float:
    """The hockey-stick divergence ``delta(eps) = sup_S P(S) - e^eps Q(S)`` of ``P = N(mu_p, s_p^2)`` from ``Q``.

    The supremum is attained on ``S = {x : log p(x)/q(x) > eps}``; the log-likelihood ratio is the quadratic
    ``a x^2 + b x + c`` with ``a = 1/(2 s_q^2) - 1/(2 s_p^2)``, ``b = mu_p/s_p^2 - mu_q/s_q^2`` and
    ``c = mu_q^2/(2 s_q^2) - mu_p^2/(2 s_p^2) + log(s_q/s_p)``, so ``S`` is a half-line (equal variances),
    the outside of two roots (``a > 0``) or the interval between them (``a < 0``).
    """
    if p.std <= 0 or q.std <= 0:
        raise ValueError(f"standard deviations must be > 0, got {p.std} and {q.std}.")
    a = 0.5 / q.std**2 - 0.5 / p.std**2
    b = p.mean / p.std**2 - q.mean / q.std**2
    c = 0.5 * q.mean**2 / q.std**2 - 0.5 * p.mean**2 / p.std**2 + math.log(q.std / p.std)
    intervals: list[tuple[float, float]]
    if abs(a) <= 1e-12 * max(1.0 / p.std**2, 1.0 / q.std**2):
        if b == 0:
            return 0.0
        t = (epsilon - c) / b
        intervals = [(t, math.inf)] if b > 0 else [(-math.inf, t)]
    else:
        disc = b * b - 4 * a * (c - epsilon)
        if disc <= 0:  # the ratio never crosses eps: S is empty (a < 0) or everything (a > 0, delta <= 0)
            return 0.0
        r1, r2 = sorted(((-b - math.sqrt(disc)) / (2 * a), (-b + math.sqrt(disc)) / (2 * a)))
        intervals = [(-math.inf, r1), (r2, math.inf)] if a > 0 else [(r1, r2)]
    log_p = np.logaddexp.reduce([_log_mass(lo, hi, p.mean, p.std) for lo, hi in intervals])
    log_q = np.logaddexp.reduce([_log_mass(lo, hi, q.mean, q.std) for lo, hi in intervals])
    if log_p == -math.inf or epsilon + log_q >= log_p:
        return 0.0
    return float(math.exp(log_p) * -math.expm1(epsilon + log_q - log_p))


def epsilon_two_gaussians(p: GaussianFit, q: GaussianFit, delta: float) -> float:
    """The smallest ``eps`` at which ``N(mu_p, s_p)`` and ``N(mu_q, s_q)`` are ``(eps, delta)``-indistinguishable.

    Both directions are taken (the larger epsilon), as differential privacy requires. For equal variances
    this is the epsilon of the ``mu``-GDP Gaussian mechanism with ``mu = |mu_p - mu_q| / s``
    (Dong, Roth & Su 2019): ``delta = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)``.

    Raises:
        ValueError: for ``delta`` outside ``(0, 1)``.
    """
    if not 0 < delta < 1:
        raise ValueError(f"delta must be in (0, 1), got {delta}.")

    def gap(eps: float) -> float:
        return max(delta_two_gaussians(p, q, eps), delta_two_gaussians(q, p, eps)) - delta

    if gap(0.0) <= 0:
        return 0.0
    hi = 1.0
    while gap(hi) > 0:
        hi *= 2
        if hi > 1e4:
            return math.inf
    return float(optimize.brentq(gap, hi / 2 if hi > 1 else 0.0, hi, xtol=1e-6))


def gdp_epsilon(mu: float, delta: float) -> float:
    """Epsilon at ``delta`` of ``mu``-GDP (the Gaussian mechanism with sensitivity / std ``= mu``)."""
    return epsilon_two_gaussians(GaussianFit(mu, 1.0, 2), GaussianFit(0.0, 1.0, 2), delta)


def bootstrap_interval(
    statistic: Callable[[np.ndarray, np.ndarray], float],
    seen: np.ndarray,
    unseen: np.ndarray,
    *,
    draws: int = 200,
    confidence: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile bootstrap interval of ``statistic(seen, unseen)``, resampling both samples with replacement.

    Returns:
        ``(low, high)``; ``(nan, nan)`` for ``draws == 0``.
    """
    if draws <= 0:
        return math.nan, math.nan
    rng = np.random.default_rng(seed)
    values = np.array([
        statistic(rng.choice(seen, seen.size), rng.choice(unseen, unseen.size)) for _ in range(draws)
    ])
    tail = 100 * (1 - confidence) / 2
    return float(np.percentile(values, tail)), float(np.percentile(values, 100 - tail))


# ---------------------------------------------------------------------- Steinke, Nasr & Jagielski 2023
def one_run_p_value(m: int, r: int, v: int, epsilon: float, delta: float = 0.0) -> float:
    """Probability of at least ``v`` correct guesses out of ``r`` under an ``(epsilon, delta)``-DP mechanism.

    Theorem 3.1 of Steinke, Nasr & Jagielski (NeurIPS 2023), "Privacy Auditing with One (1) Training Run":
    with ``m`` canaries each included independently with probability 1/2 and ``r`` guesses (abstaining on
    the rest), the number of correct guesses ``W`` of any attack satisfies

        P[W >= v] <= f(v) + 2 m delta * max_{i = 1..v} (f(v - i) - f(v)) / i,

    where ``f(v) = P[Binomial(r, e^eps / (1 + e^eps)) >= v]`` (randomized response is the worst case).

    Raises:
        ValueError: unless ``0 <= v <= r <= m``, ``epsilon >= 0`` and ``0 <= delta <= 1``.
    """
    if not 0 <= v <= r <= m:
        raise ValueError(f"need 0 <= correct <= guesses <= canaries, got v={v}, r={r}, m={m}.")
    if epsilon < 0 or not 0 <= delta <= 1:
        raise ValueError(f"need epsilon >= 0 and delta in [0, 1], got {epsilon}, {delta}.")
    q = 1.0 / (1.0 + math.exp(-epsilon))
    f_v = float(stats.binom.sf(v - 1, r, q))
    if delta == 0 or v == 0:
        return min(f_v, 1.0)
    i = np.arange(1, v + 1)
    between = np.cumsum(stats.binom.pmf(v - i, r, q))  # P[v - i <= W' < v] = f(v - i) - f(v)
    return min(f_v + 2 * m * delta * float(np.max(between / i)), 1.0)


def one_run_epsilon_lower_bound(m: int, r: int, v: int, delta: float = 0.0, beta: float = 0.05) -> float:
    """The largest epsilon the audit refutes at confidence ``1 - beta`` (Steinke, Nasr & Jagielski 2023).

    The mechanism is not ``(eps, delta)``-DP for any ``eps`` below the returned value, unless an event of
    probability at most ``beta`` happened: the ``eps`` with :func:`one_run_p_value` equal to ``beta``
    (bisection; 0 when even ``eps = 0`` explains the guesses).
    """
    if not 0 < beta < 1:
        raise ValueError(f"beta (1 - confidence) must be in (0, 1), got {beta}.")
    if one_run_p_value(m, r, v, 0.0, delta) >= beta:
        return 0.0
    lo, hi = 0.0, 1.0
    while one_run_p_value(m, r, v, hi, delta) < beta:
        lo, hi = hi, hi * 2
        if hi > 1e3:
            return math.inf
    while hi - lo > 1e-6 * max(1.0, lo):
        mid = (lo + hi) / 2
        if one_run_p_value(m, r, v, mid, delta) < beta:
            lo = mid
        else:
            hi = mid
    return lo


def best_one_run_bound(
    scores: Sequence[float], included: Sequence[bool], delta: float = 0.0, beta: float = 0.05
) -> dict[str, float]:
    """Guess "in" for the ``k+`` highest scores and "out" for the ``k-`` lowest, abstaining on the rest.

    Steinke et al. choose ``(k+, k-)`` on a grid; every choice tried is a separate test, so the bound of the
    best one is valid at ``1 - beta * (number of choices)`` only. This uses a Bonferroni correction over the
    grid (``beta / len(grid)``), so the returned bound keeps confidence ``1 - beta``.

    Returns:
        ``epsilon_lower_bound`` and the ``guesses`` / ``correct`` / ``k_plus`` / ``k_minus`` that reached it.
    """
    s = np.asarray(scores, dtype=np.float64)
    inc = np.asarray(included, dtype=bool)
    m = s.size
    order = np.argsort(-s, kind="stable")
    hits_in = np.concatenate([[0], np.cumsum(inc[order])])  # correct "in" guesses among the top k
    hits_out = np.concatenate([[0], np.cumsum(~inc[order[::-1]])])  # correct "out" among the bottom k
    grid = sorted({max(1, int(round(m * f))) for f in (0.01, 0.02, 0.05, 0.1, 0.2, 0.3, 0.5)} | {0})
    pairs = [(kp, km) for kp in grid for km in grid if 0 < kp + km <= m]
    best = {"epsilon_lower_bound": 0.0, "guesses": 0.0, "correct": 0.0, "k_plus": 0.0, "k_minus": 0.0}
    for kp, km in pairs:
        v = int(hits_in[kp] + hits_out[km])
        if 2 * v <= kp + km:  # no better than chance: even eps = 0 explains it
            continue
        eps = one_run_epsilon_lower_bound(m, kp + km, v, delta, beta / len(pairs))
        if eps > best["epsilon_lower_bound"]:
            best = {"epsilon_lower_bound": eps, "guesses": float(kp + km), "correct": float(v),
                    "k_plus": float(kp), "k_minus": float(km)}
    return best


__all__ = [
    "GaussianFit", "best_one_run_bound", "bootstrap_interval", "delta_two_gaussians", "epsilon_two_gaussians",
    "gdp_epsilon", "one_run_epsilon_lower_bound", "one_run_p_value",
]
