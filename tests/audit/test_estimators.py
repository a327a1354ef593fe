"""The audit maths against closed forms, dp-accounting, brute-force integration and simulated mechanisms."""

from __future__ import annotations

import math

import numpy as np
import pytest
from scipy import stats

from lightfed.audit.estimators import (
    GaussianFit,
    best_one_run_bound,
    bootstrap_interval,
    delta_two_gaussians,
    epsilon_two_gaussians,
    gdp_epsilon,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)


@pytest.mark.parametrize("mu", [0.5, 1.0, 2.0])
def test_equal_variances_give_the_gaussian_mechanism_of_dp_accounting(mu):
    import dp_accounting as dpa

    acc = dpa.pld.PLDAccountant()
    acc.compose(dpa.GaussianDpEvent(1 / mu))  # sensitivity 1, std 1/mu: mu-GDP
    assert gdp_epsilon(mu, 1e-5) == pytest.approx(acc.get_epsilon(1e-5), rel=1e-5)


@pytest.mark.parametrize("mu", [0.3, 5.0, 20.0])
def test_equal_variances_solve_the_gdp_curve(mu):
    """Dong, Roth & Su 2019: delta(eps) = Phi(-eps/mu + mu/2) - e^eps Phi(-eps/mu - mu/2)."""
    eps = gdp_epsilon(mu, 1e-5)
    delta = stats.norm.cdf(-eps / mu + mu / 2) - math.exp(eps) * stats.norm.cdf(-eps / mu - mu / 2)
    assert delta == pytest.approx(1e-5, rel=1e-4)


def test_unequal_variances_match_numerical_integration():
    p, q = GaussianFit(1.0, 1.3, 2), GaussianFit(0.0, 1.0, 2)
    x = np.linspace(-40, 40, 2_000_001)
    dx = x[1] - x[0]
    for eps in (0.5, 2.0, 6.0):
        brute = np.sum(np.maximum(stats.norm.pdf(x, 1, 1.3) - math.exp(eps) * stats.norm.pdf(x, 0, 1), 0)) * dx
        assert delta_two_gaussians(p, q, eps) == pytest.approx(brute, rel=1e-4, abs=1e-12)
    eps = epsilon_two_gaussians(p, q, 1e-5)
    assert max(delta_two_gaussians(p, q, eps), delta_two_gaussians(q, p, eps)) == pytest.approx(1e-5, rel=1e-4)


def test_identical_gaussians_give_zero_and_bad_delta_is_refused():
    g = GaussianFit(0.3, 0.1, 10)
    assert epsilon_two_gaussians(g, g, 1e-5) == 0.0
    with pytest.raises(ValueError, match="delta must be in"):
        epsilon_two_gaussians(g, g, 0.0)


def test_bootstrap_interval_covers_the_estimate_and_is_seeded():
    rng = np.random.default_rng(0)
    seen, unseen = rng.normal(2.0, 1.0, 200), rng.normal(0.0, 1.0, 200)

    def stat(a, b):
        return epsilon_two_gaussians(GaussianFit.of(a), GaussianFit.of(b), 1e-5)

    low, high = bootstrap_interval(stat, seen, unseen, draws=100, seed=1)
    assert low < stat(seen, unseen) < high
    assert (low, high) == bootstrap_interval(stat, seen, unseen, draws=100, seed=1)


# ---------------------------------------------------------------------- Steinke, Nasr & Jagielski 2023
@pytest.mark.parametrize("r", [10, 100, 1000])
def test_all_correct_guesses_at_delta_zero_have_the_closed_form(r):
    """delta = 0, v = r: P[Bin(r, q) >= r] = q^r = beta, so eps = log(q / (1 - q)) with q = beta^(1/r)."""
    q = 0.05 ** (1 / r)
    assert one_run_epsilon_lower_bound(r, r, r, 0.0, 0.05) == pytest.approx(math.log(q / (1 - q)), rel=1e-5)


def test_one_run_values():
    """Values of the paper's Theorem 3.1 / Algorithm (95% confidence): perfect guesses saturate slowly in r."""
    assert one_run_epsilon_lower_bound(100, 100, 100) == pytest.approx(3.4930, abs=1e-3)
    assert one_run_epsilon_lower_bound(1000, 1000, 1000) == pytest.approx(5.8091, abs=1e-3)
    # delta > 0 only lowers the bound, and more so for more canaries m (the 2 m delta term)
    assert one_run_epsilon_lower_bound(1000, 100, 100, 1e-5) < one_run_epsilon_lower_bound(1000, 100, 100)
    assert one_run_epsilon_lower_bound(10**5, 100, 100, 1e-5) < one_run_epsilon_lower_bound(1000, 100, 100, 1e-5)
    # half right is chance: no evidence at all
    assert one_run_epsilon_lower_bound(1000, 1000, 500) == 0.0


#: (m, r, v, delta, beta, epsilon lower bound) computed with two implementations that are not lightfed's: the paper's
#: own code (Steinke, Nasr & Jagielski 2023, arXiv 2305.08846, Appendix D, ``p_value_DP_audit`` / ``get_eps_audit``:
#: a running max over i, an integer-stepped bracket, 30 bisection steps, the low end returned) and Google DeepMind's
#: jax_privacy (``jax_privacy/auditing.py``, ``_one_run_p_value`` / ``_epsilon_one_run``: survival-function
#: differences, brentq). The two agreed to 1e-6 at every point; the values are the Appendix D code's, rounded.
ONE_RUN_REFERENCE = [
    (100, 100, 100, 0.0, 0.05, 3.492965),
    (1000, 1000, 1000, 0.0, 0.05, 5.809068),
    (1000, 100, 100, 1e-5, 0.05, 3.465376),
    (1000, 600, 600, 1e-5, 0.05, 5.270399),
    (1000, 500, 450, 1e-5, 0.05, 1.946012),
    (10000, 1000, 900, 1e-5, 0.05, 2.015194),
    (100000, 100, 100, 1e-5, 0.05, 0.809014),  # the 2 m delta term: the same guesses bound 3.47 with m = 1000
    (400, 80, 75, 400**-1.1, 0.05, 1.083499),
    (1000, 1000, 700, 1e-6, 0.1, 0.756724),
    (2000, 400, 300, 1e-4, 0.05, 0.888563),
    (1000, 200, 150, 0.0, 0.01, 0.715811),
    (1000, 200, 180, 1e-3, 0.01, 0.0),  # 2 m delta = 2: no refutation, however good the guesses
    (1000, 100, 55, 1e-5, 0.05, 0.0),
]
#: (m, r, v, epsilon, delta, p-value) from the same two implementations (equal to 10 significant digits).
ONE_RUN_P_REFERENCE = [
    (1000, 100, 90, 1.0, 1e-5, 0.0008412885614),
    (1000, 500, 400, 1.0, 1e-4, 0.00406780828),
    (100, 50, 40, 1.0, 0.0, 0.174292947),
    (10000, 1000, 800, 0.5, 1e-5, 0.0009419268033),
    (1000, 200, 120, 0.2, 1e-3, 0.1802269168),
]


@pytest.mark.parametrize(("m", "r", "v", "delta", "beta", "expected"), ONE_RUN_REFERENCE)
def test_one_run_bound_matches_the_papers_code_and_jax_privacy(m, r, v, delta, beta, expected):
    assert one_run_epsilon_lower_bound(m, r, v, delta, beta) == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize(("m", "r", "v", "epsilon", "delta", "expected"), ONE_RUN_P_REFERENCE)
def test_one_run_p_value_matches_the_papers_code_and_jax_privacy(m, r, v, epsilon, delta, expected):
    assert one_run_p_value(m, r, v, epsilon, delta) == pytest.approx(expected, rel=1e-8)


def test_p_value_is_the_binomial_tail_at_delta_zero_and_refuses_bad_counts():
    q = 1 / (1 + math.exp(-1.0))
    assert one_run_p_value(100, 50, 40, 1.0) == pytest.approx(stats.binom.sf(39, 50, q))
    with pytest.raises(ValueError, match="correct <= guesses <= canaries"):
        one_run_p_value(10, 20, 5, 1.0)


def _randomized_response(eps0: float, m: int, rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
    """m canaries in or out with probability 1/2; an eps0-DP randomized response of each bit as the score."""
    included = rng.random(m) < 0.5
    truthful = rng.random(m) < math.exp(eps0) / (1 + math.exp(eps0))
    return np.where(included == truthful, 1.0, -1.0) + rng.normal(0, 1e-3, m), included


@pytest.mark.parametrize("runs", [pytest.param(15, id="15-runs"), pytest.param(200, id="200-runs", marks=pytest.mark.slow)])
def test_the_bound_is_valid_on_randomized_response(runs):
    """eps0-DP randomized response: the 95% bound exceeds eps0 in at most ~5% of runs (allowing binomial slack)."""
    rng = np.random.default_rng(0)
    above = sum(best_one_run_bound(*_randomized_response(2.0, 400, rng))["epsilon_lower_bound"] > 2.0 for _ in range(runs))
    assert above <= stats.binom.ppf(0.999, runs, 0.05)


def test_the_bound_catches_a_leakier_mechanism():
    """The bound has teeth: a mechanism claiming eps 2 that is really eps 6 is refuted (bound > 2)."""
    bound = best_one_run_bound(*_randomized_response(6.0, 400, np.random.default_rng(1)))
    assert bound["epsilon_lower_bound"] > 2.0
    assert bound["correct"] > bound["guesses"] / 2
