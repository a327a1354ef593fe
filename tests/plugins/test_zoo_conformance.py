"""One conformance harness for every registered strategy (``STRATEGIES.names()``, default arguments).

The checks are :mod:`lightfed.testing`'s, the same a plugin author runs (``lightfed.testing.check_strategy``);
here each runs on its own over every registered strategy, so a strategy installed later (a third-party
plugin) is picked up by the parametrisation for free. This file adds what only lightfed knows about its own
zoo: the exact first step of each strategy on identical updates (:data:`FIRST_STEP`, :data:`MEAN_LIKE`).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightfed import ClientUpdate, Strategy
from lightfed.registry import STRATEGIES
from lightfed.testing import STRATEGY_CHECKS, check_identical_updates

NAMES = STRATEGIES.names()


def _fedopt_step(s: Strategy, w: Tensor, u: ClientUpdate) -> Tensor:
    m = (1 - s.beta1) * u.delta
    v0 = torch.full_like(u.delta, s.tau**2)
    v = s.second_moment(v0, u.delta * u.delta)
    return w + s.eta * m / (v.sqrt() + s.tau)


#: The new model for k identical updates ``u`` in the first round, by strategy (default: ``w + u``).
FIRST_STEP: dict[str, Callable[[Strategy, Tensor, ClientUpdate], Tensor]] = {
    "fedadagrad": _fedopt_step,
    "fedadam": _fedopt_step,
    "fedyogi": _fedopt_step,
    "fednova": lambda s, w, u: w + u.delta * u.extras["fednova_tau"],
    "qfedavg": lambda s, w, u: w + u.delta / u.extras["qfedavg_h"],
}
#: Strategies whose first step on identical updates is ``w + u`` (checked; others only for replication).
MEAN_LIKE = {
    "fedavg", "fedavgm", "fedprox", "ditto", "scaffold", "fedmedian", "fedtrimmedavg", "krum", "multikrum", "bulyan",
}


@pytest.mark.parametrize("check", sorted(STRATEGY_CHECKS))
@pytest.mark.parametrize("name", NAMES)
def test_conformance(name, check):
    STRATEGY_CHECKS[check](name)


@pytest.mark.parametrize("name", sorted(n for n in NAMES if n.lower() in FIRST_STEP or n.lower() in MEAN_LIKE))
def test_known_first_step_on_identical_updates(name):
    key = name.lower()
    check_identical_updates(name, FIRST_STEP.get(key, lambda s, w, u: w + u.delta))
