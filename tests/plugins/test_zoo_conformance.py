"""One conformance harness for every registered strategy (``STRATEGIES.names()``, default arguments).

Each strategy runs through the real client loop (its hooks included) and the trainer's aggregation path:

* zero updates (clients already at their optimum) leave the global model where it is, round after round;
* identical updates: the result does not depend on how many clients sent them, and equals the strategy's
  known step (``w + u`` for averaging and robust rules);
* the order the clients arrive in does not change the new model or the server state;
* ``state_dict`` survives ``torch.save`` / ``torch.load(weights_only=True)``, and a strategy restored from it
  continues exactly as the original.

A strategy installed later (a third-party plugin) is picked up by the parametrisation for free.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable

import pytest
import torch
from torch import Tensor

from lightfed import ClientUpdate, ParamSpec, Strategy
from lightfed.registry import STRATEGIES
from tests.plugins.zoo_testing import TinyRegressor, aggregate, regression_clients, train_clients

NAMES = STRATEGIES.names()
POPULATION = 20


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


def make(name: str, module: torch.nn.Module) -> tuple[Strategy, ParamSpec, Tensor]:
    strategy = STRATEGIES.create(name)
    spec = ParamSpec.from_module(module)
    global_params = spec.flatten(spec.tensors(module))
    strategy.setup(spec, POPULATION, global_params)
    return strategy, spec, global_params


def copies(u: ClientUpdate, k: int) -> list[ClientUpdate]:
    return [ClientUpdate(i, u.delta.clone(), u.num_examples, u.num_steps, dict(u.metrics), {n: v.clone() for n, v in u.extras.items()}) for i in range(k)]


@pytest.mark.parametrize("name", NAMES)
def test_zero_updates_are_a_fixed_point(name):
    torch.manual_seed(0)
    module = TinyRegressor()
    strategy, spec, w = make(name, module)
    clients = dict(enumerate(regression_clients(7, 8, seed=1, module=module)))  # labels = the model's outputs
    states: dict = {}
    for r in range(2):
        updates = train_clients(strategy, module, spec, w, clients, states, r)
        assert all(bool((u.delta == 0).all()) for u in updates)
        new = aggregate(strategy, w, updates, r)
        torch.testing.assert_close(new, w, rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_identical_updates(name):
    torch.manual_seed(0)
    module = TinyRegressor()
    strategy, spec, w = make(name, module)
    (u,) = train_clients(strategy, module, spec, w, dict(enumerate(regression_clients(1, 8, seed=2))), {}, 0)
    assert bool((u.delta != 0).any())
    results = []
    for k in (7, 11):
        fresh = copy.deepcopy(strategy)
        results.append(aggregate(fresh, w, copies(u, k), 0))
    torch.testing.assert_close(results[0], results[1])
    key = name.lower()
    if key in FIRST_STEP:
        torch.testing.assert_close(results[0], FIRST_STEP[key](strategy, w, u))
    elif key in MEAN_LIKE:
        torch.testing.assert_close(results[0], w + u.delta)


@pytest.mark.parametrize("name", NAMES)
def test_client_order_does_not_matter(name):
    torch.manual_seed(0)
    module = TinyRegressor(batchnorm=True)
    strategy, spec, w = make(name, module)
    updates = train_clients(strategy, module, spec, w, dict(enumerate(regression_clients(9, 8, seed=3))), {}, 0)
    perm = torch.randperm(len(updates), generator=torch.Generator().manual_seed(5)).tolist()
    outcomes = []
    for order in (updates, updates[::-1], [updates[i] for i in perm]):
        fresh = copy.deepcopy(strategy)
        outcomes.append((aggregate(fresh, w, order, 0), fresh.state_dict()))
    for new, state in outcomes[1:]:
        torch.testing.assert_close(new, outcomes[0][0])
        torch.testing.assert_close(state, outcomes[0][1])


def _round_trip(obj: object) -> object:
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


@pytest.mark.parametrize("name", NAMES)
def test_state_round_trips_and_resume_is_exact(name):
    torch.manual_seed(0)
    module = TinyRegressor(batchnorm=True)
    original, spec, w0 = make(name, module)
    clients = dict(enumerate(regression_clients(8, 8, seed=4)))
    cohorts = [[0, 1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7], [0, 2, 3, 4, 5, 6, 7]]
    states: dict = {}
    w = w0
    for r in range(2):
        updates = train_clients(original, module, spec, w, {c: clients[c] for c in cohorts[r]}, states, r)
        w = aggregate(original, w, updates, r)
    saved = _round_trip({"strategy": original.state_dict(), "clients": states, "global": w})
    restored = STRATEGIES.create(name)
    restored.setup(spec, POPULATION, w0)  # the trainer calls setup before loading a checkpoint
    restored.load_state_dict(saved["strategy"])
    torch.testing.assert_close(restored.state_dict(), original.state_dict(), rtol=0, atol=0)
    outs = []
    for strategy, st, glob in ((original, states, w), (restored, saved["clients"], saved["global"])):
        updates = train_clients(strategy, module, spec, glob, {c: clients[c] for c in cohorts[2]}, st, 2)
        outs.append((aggregate(strategy, glob, updates, 2), strategy.state_dict(), st))
    assert torch.equal(outs[0][0], outs[1][0])
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=0, atol=0)


@pytest.mark.parametrize("name", NAMES)
def test_registered_with_description_and_defaults(name):
    entry = next(e for e in STRATEGIES.entries() if e.name == name)
    assert entry.description and not entry.description.startswith(("Base class", "A strategy"))
    strategy = entry.cls()  # every registered strategy must be constructible from its defaults (YAML: `strategy: Name`)
    assert isinstance(strategy, Strategy)
    assert math.isfinite(strategy.client_weight(ClientUpdate(0, torch.zeros(1), 3)))
