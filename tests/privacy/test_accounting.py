"""Accounting: events derived from the sampler, epsilons equal to dp-accounting called directly."""

from __future__ import annotations

import math

import dp_accounting as dpa
import numpy as np
import pytest
from dp_accounting import pld, rdp
from scipy import integrate, stats

from lightfed.privacy.accounting import (
    RoundAccountant,
    SamplingScheme,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_for,
    round_event,
    sum_noise_std,
)
from lightfed.sampling import ClientSampler, FullParticipation, PoissonSampler, UniformSampler

NR = dpa.NeighboringRelation
N, M, Q, Z, T = 200, 20, 0.1, 1.2, 30
DELTA = default_delta(N)


def direct(accountant, event, rounds: int = T, delta: float = DELTA) -> float:
    accountant.compose(event, rounds)
    return accountant.get_epsilon(delta)


# ---------------------------------------------------------------------- events from the sampler
def test_scheme_reads_the_sampler():
    assert SamplingScheme.from_sampler(PoissonSampler(Q), N) == SamplingScheme("poisson", N, Q, None)
    assert SamplingScheme.from_sampler(UniformSampler(M), N) == SamplingScheme("uniform", N, M / N, M)
    assert SamplingScheme.from_sampler(UniformSampler(0.25), N) == SamplingScheme("uniform", N, 0.25, 50)
    assert SamplingScheme.from_sampler(FullParticipation(), N) == SamplingScheme("full", N, 1.0, N)


def test_custom_sampler_is_refused():
    class Mine(ClientSampler):
        def sample(self, round_idx, num_clients, seed):
            return [0]

    with pytest.raises(ValueError, match="PoissonSampler"):
        SamplingScheme.from_sampler(Mine(), N)


def test_events_per_sampler_kind():
    poisson = round_event(Z, SamplingScheme.from_sampler(PoissonSampler(Q), N))
    assert poisson == dpa.PoissonSampledDpEvent(Q, dpa.GaussianDpEvent(Z))
    full = round_event(Z, SamplingScheme.from_sampler(FullParticipation(), N))
    assert full == dpa.GaussianDpEvent(Z)
    uniform = SamplingScheme.from_sampler(UniformSampler(M), N)
    # RDP: replace-one sensitivity 2C, so the event carries z / 2.
    assert round_event(Z, uniform, "rdp") == dpa.SampledWithoutReplacementDpEvent(N, M, dpa.GaussianDpEvent(Z / 2))
    # PLD: the dominating pair of sampling without replacement, (N(0), (1-q) N(0) + q N(2C)).
    assert round_event(Z, uniform, "pld") == dpa.PoissonSampledDpEvent(M / N, dpa.GaussianDpEvent(Z / 2))


# ---------------------------------------------------------------------- epsilon == dp-accounting directly
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_poisson_epsilon_equals_dp_accounting(accountant):
    scheme = SamplingScheme.from_sampler(PoissonSampler(Q), N)
    event = dpa.PoissonSampledDpEvent(Q, dpa.GaussianDpEvent(Z))
    if accountant == "pld":
        expected = direct(pld.PLDAccountant(NR.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3), event)
        library_default = direct(pld.PLDAccountant(), event)
        assert epsilon_for(Z, scheme, T, DELTA, "pld") == pytest.approx(library_default, rel=2e-3)
    else:
        expected = direct(rdp.RdpAccountant(), event)
    assert epsilon_for(Z, scheme, T, DELTA, accountant) == pytest.approx(expected, rel=1e-12)


def test_uniform_epsilon_equals_dp_accounting_with_halved_rdp_multiplier():
    scheme = SamplingScheme.from_sampler(UniformSampler(M), N)
    rdp_direct = direct(
        rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE),
        dpa.SampledWithoutReplacementDpEvent(N, M, dpa.GaussianDpEvent(Z / 2)),
    )
    assert epsilon_for(Z, scheme, T, DELTA, "rdp") == pytest.approx(rdp_direct, rel=1e-12)
    pld_direct = direct(
        pld.PLDAccountant(NR.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3),
        dpa.PoissonSampledDpEvent(M / N, dpa.GaussianDpEvent(Z / 2)),
    )
    eps_pld = epsilon_for(Z, scheme, T, DELTA, "pld")
    assert eps_pld == pytest.approx(pld_direct, rel=1e-12)
    # Both are upper bounds of the same mechanism; the PLD is the tight one.
    assert eps_pld <= epsilon_for(Z, scheme, T, DELTA, "rdp")
    # Forgetting to halve z for RDP would undercount: below even the tight PLD value.
    unhalved = direct(
        rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE),
        dpa.SampledWithoutReplacementDpEvent(N, M, dpa.GaussianDpEvent(Z)),
    )
    assert unhalved < eps_pld


def test_full_participation_is_a_plain_gaussian():
    scheme = SamplingScheme.from_sampler(FullParticipation(), N)
    expected = direct(pld.PLDAccountant(NR.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3), dpa.GaussianDpEvent(Z))
    assert epsilon_for(Z, scheme, T, DELTA) == pytest.approx(expected, rel=1e-12)
    # no amplification: a Poisson cohort of the same noise spends far less
    assert epsilon_for(Z, SamplingScheme.from_sampler(PoissonSampler(Q), N), T, DELTA) < expected / 3


def test_fixed_size_cohort_needs_the_without_replacement_pair_not_replace_one_pld():
    """dp-accounting's REPLACE_ONE PLD (Poisson + substitution) underestimates a fixed-size cohort.

    Every client holds the update +C except one, which a neighbour replaces by -C. With noise z*C on the sum
    of a uniformly drawn cohort of m, the two outputs are (in units of C, after shifting by the common part)
    P = N(0, z^2) and P' = (1-q) N(0, z^2) + q N(-2, z^2). Their hockey-stick divergence is the true delta.
    """
    q, z, eps = 0.1, 1.0, 0.5
    p = lambda x: stats.norm.pdf(x, 0, z)  # noqa: E731
    pp = lambda x: (1 - q) * stats.norm.pdf(x, 0, z) + q * stats.norm.pdf(x, -2, z)  # noqa: E731

    def hockey_stick(a, b):
        return integrate.quad(lambda x: max(a(x) - math.exp(eps) * b(x), 0.0), -30, 30, points=[-2, 0], limit=200)[0]

    true_delta = max(hockey_stick(p, pp), hockey_stick(pp, p))
    scheme = SamplingScheme("uniform", 1000, q, 100)
    ours = pld.PLDAccountant(NR.ADD_OR_REMOVE_ONE).compose(round_event(z, scheme, "pld")).get_delta(eps)
    ours_rdp = rdp.RdpAccountant(neighboring_relation=NR.REPLACE_ONE).compose(round_event(z, scheme, "rdp")).get_delta(eps)
    replace_one = pld.PLDAccountant(NR.REPLACE_ONE).compose(
        dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z))
    ).get_delta(eps)
    assert replace_one < true_delta / 5  # not an upper bound: would print a false epsilon
    assert true_delta <= ours <= true_delta * 1.01  # tight
    assert ours_rdp >= true_delta  # valid, looser


# ---------------------------------------------------------------------- calibration, delta, noise std
@pytest.mark.parametrize("accountant", ["pld", "rdp"])
def test_calibration_meets_the_target_tightly(accountant):
    scheme = SamplingScheme.from_sampler(PoissonSampler(Q), N)
    z = calibrate_noise_multiplier(3.0, DELTA, scheme, 50, accountant)
    assert epsilon_for(z, scheme, 50, DELTA, accountant) <= 3.0
    assert epsilon_for(z - 0.01, scheme, 50, DELTA, accountant) > 3.0


def test_calibration_refuses_a_meaningless_target():
    with pytest.raises(ValueError, match="almost no noise"):
        calibrate_noise_multiplier(1e6, DELTA, SamplingScheme("poisson", N, Q), 1)


def test_default_delta_and_noise_std():
    assert default_delta(500) == pytest.approx(500**-1.1)
    assert default_delta(500) < 1 / 500
    assert sum_noise_std(1.5, 0.4) == pytest.approx(0.6)
    assert epsilon_for(0.0, SamplingScheme("poisson", N, Q), 3, DELTA) == math.inf
    assert epsilon_for(1.0, SamplingScheme("poisson", N, Q), 0, DELTA) == 0.0


# ---------------------------------------------------------------------- the stateful accountant
def test_round_accountant_steps_and_round_trips():
    scheme = SamplingScheme.from_sampler(PoissonSampler(Q), N)
    acc = RoundAccountant(Z, scheme, DELTA)
    eps = [acc.step() for _ in range(3)]
    assert eps == sorted(eps) and eps[0] > 0
    assert eps[-1] == pytest.approx(epsilon_for(Z, scheme, 3, DELTA))
    fresh = RoundAccountant(Z, scheme, DELTA)
    fresh.load_state_dict(acc.state_dict())
    assert fresh.rounds == 3 and fresh.epsilon() == pytest.approx(eps[-1])
    assert fresh.step() == pytest.approx(epsilon_for(Z, scheme, 4, DELTA))


def test_round_accountant_refuses_another_mechanism():
    scheme = SamplingScheme.from_sampler(PoissonSampler(Q), N)
    acc = RoundAccountant(Z, scheme, DELTA)
    acc.step()
    with pytest.raises(ValueError, match="noise_multiplier"):
        RoundAccountant(Z * 2, scheme, DELTA).load_state_dict(acc.state_dict())
    with pytest.raises(ValueError, match="scheme"):
        RoundAccountant(Z, SamplingScheme.from_sampler(UniformSampler(M), N), DELTA).load_state_dict(acc.state_dict())


def test_sampler_rates_match_the_simulation():
    """The q the accountant uses is the inclusion frequency the simulated sampler produces."""
    sampler = PoissonSampler(0.3)
    counts = np.zeros(N)
    for r in range(200):
        counts[sampler.sample(r, N, seed=1)] += 1
    assert counts.mean() / 200 == pytest.approx(SamplingScheme.from_sampler(sampler, N).rate, abs=0.01)
