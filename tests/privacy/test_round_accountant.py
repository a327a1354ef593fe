"""The round accountant is free per round: the epsilon curve is computed once, equal to dp-accounting.

References are dp-accounting itself: its PLD accountant given the round's event once per round (what
:meth:`RoundAccountant.curve` reproduces bit for bit), and the one-shot ``SelfComposedDpEvent`` of
:func:`epsilon_for` (equal to about 1e-10 relative).
"""

from __future__ import annotations

import math
import time

import dp_accounting as dpa
import pytest

from lightfed.privacy import accounting
from lightfed.privacy.accounting import RoundAccountant, SamplingScheme, epsilon_for

N, Q, Z, DELTA, T = 100, 0.1, 1.0, 1e-5, 12
POISSON = SamplingScheme("poisson", N, Q)


def test_the_curve_is_dp_accounting_composing_one_round_at_a_time():
    # Prepare: dp-accounting's own accountant, given the round's event once per round
    relation = dpa.NeighboringRelation.ADD_OR_REMOVE_ONE
    library = dpa.pld.PLDAccountant(relation, value_discretization_interval=1e-3)
    expected = []
    for _ in range(T):
        library.compose(dpa.PoissonSampledDpEvent(Q, dpa.GaussianDpEvent(Z)))
        expected.append(library.get_epsilon(DELTA))
    # Execute
    curve = RoundAccountant(Z, POISSON, DELTA, rounds=T).curve(T)
    # Assert: bit for bit; and the one-shot self-composition within 1e-9
    assert curve == expected
    assert curve[-1] == pytest.approx(epsilon_for(Z, POISSON, T, DELTA), rel=1e-9)


def test_a_round_costs_a_lookup_once_the_curve_is_known(monkeypatch):
    acc = RoundAccountant(Z, POISSON, DELTA, rounds=T)
    first = acc.step()  # the first request computes the whole curve
    calls = []
    monkeypatch.setattr(accounting, "pld_epsilon", lambda *a: calls.append(a) or math.nan)
    monkeypatch.setattr(accounting, "epsilon_for", lambda *a: calls.append(a) or math.nan)
    start = time.perf_counter()
    eps = [first] + [acc.step() for _ in range(T - 1)]
    assert time.perf_counter() - start < 0.01 and not calls
    assert eps == sorted(eps) and len(set(eps)) == T


def test_the_budget_stop_is_found_with_few_epsilons_and_matches_every_round():
    # Prepare: a budget between the epsilon of round 37 and 38, no planned rounds (one epsilon at a time)
    acc = RoundAccountant(Z, POISSON, DELTA)
    budget = (acc.epsilon(37) + acc.epsilon(38)) / 2
    fresh = RoundAccountant(Z, POISSON, DELTA)
    # Execute: the trainer asks before each round
    allowed = [t for t in range(1, 60) if fresh.within(budget, t)]
    # Assert: rounds 1..37, computed with about 2 log2(38) epsilons, not 59
    assert allowed == list(range(1, 38))
    assert len(fresh._cache) <= 2 * math.ceil(math.log2(38)) + 2


def test_rounds_no_memory_can_hold_fail_with_one_line():
    with pytest.raises(ValueError, match=r"cannot compose 1000000000 rounds.*accountant: rdp") as err:
        epsilon_for(Z, POISSON, 10**9, DELTA)
    assert "\n" not in str(err.value)
    assert 0 < epsilon_for(Z, POISSON, 10**9, DELTA, "rdp") < math.inf  # RDP composes any number of rounds
