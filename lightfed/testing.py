"""The plugin kit: conformance checks for strategies, privacy mechanisms and secure aggregation.

A plugin's own test suite calls these (``lightfed new-strategy`` writes one that does); lightfed's tests
run them over every registered plugin. Each check builds a toy model and toy clients, runs the real client
loop and the real server step (:func:`run_server_round`, exactly what the trainer runs), and raises
``AssertionError`` naming what broke::

    from lightfed.testing import check_strategy
    from my_package.strategies import GeoMed

    def test_geomed_conforms():
        check_strategy(GeoMed)                     # or check_strategy(lambda: GeoMed(eps=1e-4))

A plugin is given as a registered name, a class (built from its defaults) or a zero-argument factory.

Strategy checks (:data:`STRATEGY_CHECKS`): constructible from its defaults with a description; zero updates
are a fixed point; identical updates give a result that does not depend on how many clients sent them;
client order does not change the model or the server state; ``state_dict`` survives ``torch.save`` /
``torch.load(weights_only=True)`` and a restored strategy continues exactly. Privacy and secure-aggregation
checks: a round runs and gives a finite model; state round-trips; a combination the plugin cannot serve is
refused with a ``ValueError`` that says why (never another exception, never silently).
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Sequence
from typing import Any

import lightning as L
import torch
from torch import Tensor, nn

from lightfed.client import LocalTrainer
from lightfed.data.client_data import ClientData
from lightfed.messages import ClientUpdate, RunInfo
from lightfed.params import ParamSpec
from lightfed.privacy.base import PrivacyMechanism
from lightfed.registry import PRIVACY, SECURE_AGGREGATION, STRATEGIES, Registry
from lightfed.sampling import PoissonSampler
from lightfed.secagg.base import SecureAggregation
from lightfed.server import run_server_round
from lightfed.strategy import FedAvg, Strategy

#: The population the checks set strategies up with.
POPULATION = 20


# ---- toy pieces ------------------------------------------------------------------------------------------
class TinyRegressor(L.LightningModule):
    """A linear layer (3 -> 2) with MSE loss; ``batchnorm=True`` adds a BatchNorm (payload buffers)."""

    def __init__(self, lr: float = 0.05, batchnorm: bool = False) -> None:
        super().__init__()
        layers: list[nn.Module] = [nn.Linear(3, 2)]
        if batchnorm:
            layers.append(nn.BatchNorm1d(2))
        self.net = nn.Sequential(*layers)
        self.lr = lr

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def training_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> Tensor:
        x, y = batch
        return (self(x) - y).pow(2).mean()

    def test_step(self, batch: tuple[Tensor, Tensor], batch_idx: int) -> None:
        x, y = batch
        self.log("test_mse", (self(x) - y).pow(2).mean(), batch_size=len(x))

    def configure_optimizers(self) -> torch.optim.Optimizer:
        return torch.optim.SGD(self.parameters(), lr=self.lr)


def regression_clients(num: int, n: int, seed: int, module: nn.Module | None = None) -> list[ClientData]:
    """``num`` clients of ``n`` random regression examples each (labels from ``module`` if given, else random)."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(num):
        x = torch.randn(n, 3, generator=gen)
        if module is None:
            y = torch.randn(n, 2, generator=gen)
        else:
            with torch.no_grad():
                module.eval()
                y = module(x).detach()
                module.train()
        out.append(ClientData((x, y), torch.arange(n)))
    return out


def make_update(client_id: int, delta: Sequence[float], num_examples: int = 1, **extras: Sequence[float]) -> ClientUpdate:
    """A :class:`ClientUpdate` with an explicit delta (and extras), for driving :func:`run_server_round`."""
    return ClientUpdate(
        client_id=client_id, delta=torch.tensor(list(delta), dtype=torch.float32), num_examples=num_examples,
        extras={k: torch.tensor(list(v), dtype=torch.float32) for k, v in extras.items()},
    )


def factory(plugin: str | type | Callable[[], Any], registry: Registry = STRATEGIES) -> Callable[[], Any]:
    """A zero-argument factory from a registered name, a class (its defaults) or a factory."""
    if isinstance(plugin, str):
        return lambda: registry.create(plugin)
    return plugin


def set_up_strategy(make: Callable[[], Strategy], module: nn.Module) -> tuple[Strategy, ParamSpec, Tensor]:
    """A fresh strategy from ``make``, set up for ``module``'s payload and a population of :data:`POPULATION`."""
    strategy = make()
    spec = ParamSpec.from_module(module)
    global_params = spec.flatten(spec.tensors(module))
    strategy.setup(spec, POPULATION, global_params)
    return strategy, spec, global_params


def train_clients(
    strategy: Strategy,
    module: nn.Module,
    spec: ParamSpec,
    global_params: Tensor,
    clients: dict[int, ClientData],
    states: dict[int, dict[str, Tensor]],
    round_idx: int,
    local_steps: int | None = 2,
    local_epochs: int = 1,
    batch_size: int = 4,
    seed: int = 0,
) -> list[ClientUpdate]:
    """Run the real client loop (:class:`~lightfed.client.LocalTrainer`, the strategy's hooks included)."""
    local = LocalTrainer(
        module, spec, strategy, precision=None, local_epochs=local_epochs, local_steps=local_steps,
        batch_size=batch_size, seed=seed,
    )
    payload = strategy.client_payload(round_idx)
    updates = []
    for cid in sorted(clients):
        state = states.setdefault(cid, {}) if strategy.uses_client_state else {}
        updates.append(local.fit_client(cid, round_idx, clients[cid], global_params, state, payload))
    return updates


def round_trip(obj: Any) -> Any:
    """``obj`` through ``torch.save`` and ``torch.load(weights_only=True)``, as a checkpoint carries it."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    buffer.seek(0)
    return torch.load(buffer, weights_only=True)


def copies(u: ClientUpdate, k: int) -> list[ClientUpdate]:
    """``k`` clients that send exactly ``u``."""
    return [
        ClientUpdate(i, u.delta.clone(), u.num_examples, u.num_steps, dict(u.metrics),
                     {n: v.clone() for n, v in u.extras.items()}, dict(u.counts))
        for i in range(k)
    ]


# ---- strategies ------------------------------------------------------------------------------------------
def check_defaults(plugin: str | type | Callable[[], Strategy]) -> None:
    """Constructible from its defaults (``strategy: Name`` in YAML), a Strategy with a finite client weight;
    a registered class also has a one-line description (what ``lightfed strategies`` prints)."""
    strategy = factory(plugin)()
    assert isinstance(strategy, Strategy), f"{type(strategy).__name__} is not a lightfed.Strategy"
    weight = strategy.client_weight(ClientUpdate(0, torch.zeros(1), 3))
    assert math.isfinite(weight) and weight >= 0, f"{type(strategy).__name__}.client_weight gave {weight}"
    entry = next((e for e in STRATEGIES.entries() if e.cls is type(strategy)), None)
    if entry is not None:
        assert entry.description and not entry.description.startswith(("Base class", "A strategy")), (
            f"{entry.name} needs a docstring whose first line says what it is (`lightfed strategies` prints it)"
        )


def check_zero_updates_are_a_fixed_point(plugin: str | type | Callable[[], Strategy]) -> None:
    """Clients already at their optimum send zero updates; the global model must stay put, round after round."""
    torch.manual_seed(0)
    module = TinyRegressor()
    strategy, spec, w = set_up_strategy(factory(plugin), module)
    clients = dict(enumerate(regression_clients(7, 8, seed=1, module=module)))  # labels = the model's outputs
    states: dict[int, dict[str, Tensor]] = {}
    for r in range(2):
        updates = train_clients(strategy, module, spec, w, clients, states, r)
        assert all(bool((u.delta == 0).all()) for u in updates), "the toy clients should send zero updates"
        new = run_server_round(strategy, w, updates, r).global_params
        torch.testing.assert_close(new, w, rtol=0, atol=0, msg=lambda m, r=r: f"zero updates moved the model (round {r}): {m}")


def check_identical_updates(
    plugin: str | type | Callable[[], Strategy],
    expected: Callable[[Strategy, Tensor, ClientUpdate], Tensor] | None = None,
) -> None:
    """7 and 11 clients sending the same update give the same model; ``expected(strategy, w, u)``, if given,
    is that model (``lambda s, w, u: w + u.delta`` for averaging and robust rules)."""
    torch.manual_seed(0)
    module = TinyRegressor()
    strategy, spec, w = set_up_strategy(factory(plugin), module)
    (u,) = train_clients(strategy, module, spec, w, dict(enumerate(regression_clients(1, 8, seed=2))), {}, 0)
    assert bool((u.delta != 0).any())
    results = [run_server_round(copy.deepcopy(strategy), w, copies(u, k), 0).global_params for k in (7, 11)]
    torch.testing.assert_close(results[0], results[1], msg=lambda m: f"the result depends on the number of identical updates: {m}")
    if expected is not None:
        torch.testing.assert_close(results[0], expected(strategy, w, u))


def check_client_order_does_not_matter(plugin: str | type | Callable[[], Strategy]) -> None:
    """The same updates in another order give the same model and the same server state."""
    torch.manual_seed(0)
    module = TinyRegressor(batchnorm=True)
    strategy, spec, w = set_up_strategy(factory(plugin), module)
    updates = train_clients(strategy, module, spec, w, dict(enumerate(regression_clients(9, 8, seed=3))), {}, 0)
    perm = torch.randperm(len(updates), generator=torch.Generator().manual_seed(5)).tolist()
    outcomes = []
    for order in (updates, updates[::-1], [updates[i] for i in perm]):
        fresh = copy.deepcopy(strategy)
        outcomes.append((run_server_round(fresh, w, order, 0).global_params, fresh.state_dict()))
    for new, state in outcomes[1:]:
        torch.testing.assert_close(new, outcomes[0][0], msg=lambda m: f"client order changed the model: {m}")
        torch.testing.assert_close(state, outcomes[0][1], msg=lambda m: f"client order changed the server state: {m}")


def check_state_round_trips(plugin: str | type | Callable[[], Strategy]) -> None:
    """``state_dict`` survives a checkpoint (``weights_only=True``) and a restored strategy continues exactly."""
    torch.manual_seed(0)
    make = factory(plugin)
    module = TinyRegressor(batchnorm=True)
    original, spec, w0 = set_up_strategy(make, module)
    clients = dict(enumerate(regression_clients(8, 8, seed=4)))
    cohorts = [[0, 1, 2, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6, 7], [0, 2, 3, 4, 5, 6, 7]]
    states: dict[int, dict[str, Tensor]] = {}
    w = w0
    for r in range(2):
        updates = train_clients(original, module, spec, w, {c: clients[c] for c in cohorts[r]}, states, r)
        w = run_server_round(original, w, updates, r).global_params
    saved = round_trip({"strategy": original.state_dict(), "clients": states, "global": w})
    restored = make()
    restored.setup(spec, POPULATION, w0)  # the trainer calls setup before loading a checkpoint
    restored.load_state_dict(saved["strategy"])
    torch.testing.assert_close(restored.state_dict(), original.state_dict(), rtol=0, atol=0)
    outs = []
    for strategy, st, glob in ((original, states, w), (restored, saved["clients"], saved["global"])):
        updates = train_clients(strategy, module, spec, glob, {c: clients[c] for c in cohorts[2]}, st, 2)
        outs.append((run_server_round(strategy, glob, updates, 2).global_params, strategy.state_dict(), st))
    assert torch.equal(outs[0][0], outs[1][0]), "a strategy restored from its state_dict continued differently"
    torch.testing.assert_close(outs[0][1], outs[1][1], rtol=0, atol=0)
    torch.testing.assert_close(outs[0][2], outs[1][2], rtol=0, atol=0)


#: Every strategy check by name (parametrise a test over it to see each one fail on its own).
STRATEGY_CHECKS: dict[str, Callable[..., None]] = {
    "defaults": check_defaults,
    "zero_updates": check_zero_updates_are_a_fixed_point,
    "identical_updates": check_identical_updates,
    "client_order": check_client_order_does_not_matter,
    "state_round_trip": check_state_round_trips,
}


def check_strategy(plugin: str | type | Callable[[], Strategy]) -> None:
    """Run every check of :data:`STRATEGY_CHECKS` on ``plugin``."""
    for check in STRATEGY_CHECKS.values():
        check(plugin)


# ---- privacy mechanisms and secure aggregation ------------------------------------------------------------
class _NeedsAllUpdates(Strategy):
    """A robust-style strategy that needs every individual update (what sums-only parts must refuse)."""

    needs_all_updates = True

    def __init__(self) -> None:
        self.weighted = False

    def aggregate_updates(self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int) -> Tensor:
        return global_params + torch.stack([u.delta for u in updates]).median(0).values


def _random_updates(round_idx: int, cohort: Sequence[int], numel: int, scale: float = 0.1) -> list[ClientUpdate]:
    gen = torch.Generator().manual_seed(1000 + round_idx)
    return [ClientUpdate(cid, scale * torch.randn(numel, generator=gen), 5 + cid % 3, num_steps=2) for cid in cohort]


def _refused_or_accepted(action: Callable[[], Any], what: str) -> bool:
    """Run ``action``; ``True`` if it was refused with a ``ValueError`` that says why, ``False`` if accepted."""
    try:
        action()
    except ValueError as err:
        assert len(str(err).strip()) >= 20, f"{what} was refused with a ValueError that does not say why: {err!r}"
        return True
    except Exception as err:  # noqa: BLE001 - the check is precisely that nothing else escapes
        raise AssertionError(f"{what} raised {type(err).__name__} ({err}); refuse a combination with a ValueError") from err
    return False


def run_info(strategy: Strategy, rounds: int = 3, seed: int = 0) -> RunInfo:
    """The :class:`~lightfed.messages.RunInfo` the kit sets mechanisms up with.

    :data:`POPULATION` clients of ``5 + k % 3`` examples each, a Poisson sampler of rate 0.5.
    """
    return RunInfo(
        num_clients=POPULATION, sampler=PoissonSampler(0.5), rounds=rounds, strategy=strategy, seed=seed,
        client_num_examples=[5 + cid % 3 for cid in range(POPULATION)],
    )


def _set_up_privacy(mechanism: PrivacyMechanism, strategy: Strategy, rounds: int = 3, seed: int = 0) -> None:
    mechanism.setup(run_info(strategy, rounds, seed))


def check_privacy_mechanism(plugin: str | type | Callable[[], PrivacyMechanism], numel: int = 6) -> None:
    """A privacy mechanism serves FedAvg, round-trips its state, and refuses what it cannot serve plainly.

    With ``FedAvg(weighted=False)``, a Poisson sampler and :data:`POPULATION` clients: two rounds of
    :func:`run_server_round` give a finite model and finite metrics; the state after them survives a
    checkpoint (``weights_only=True``), and a mechanism restored from it releases the same third round
    (noise must come from (seed, round), not the global RNG); a strategy that needs individual updates is
    either served or refused with a ``ValueError`` that says why.
    """
    make = factory(plugin, PRIVACY)
    mechanism = make()
    assert isinstance(mechanism, PrivacyMechanism), f"{type(mechanism).__name__} is not a lightfed PrivacyMechanism"
    strategy = FedAvg(weighted=False)
    _set_up_privacy(mechanism, strategy)
    w = torch.zeros(numel)
    cohort = list(range(0, POPULATION, 2))
    for r in range(2):
        updates = _random_updates(r, cohort, numel)
        w = run_server_round(strategy, w, updates, r, privacy=mechanism).global_params
        assert bool(torch.isfinite(w).all()), f"round {r} under {type(mechanism).__name__} gave a non-finite model"
    saved = round_trip(mechanism.state_dict())
    restored = make()
    _set_up_privacy(restored, FedAvg(weighted=False))
    restored.load_state_dict(saved)
    outs = []
    for m in (mechanism, restored):
        outcome = run_server_round(FedAvg(weighted=False), w, _random_updates(2, cohort, numel), 2, privacy=m)
        outs.append(outcome.global_params)
    torch.testing.assert_close(outs[0], outs[1], rtol=0, atol=0,
                               msg=lambda m: f"a restored {type(mechanism).__name__} released another round: {m}")
    _refused_or_accepted(lambda: _set_up_privacy(make(), _NeedsAllUpdates()), f"{type(mechanism).__name__} with a strategy that needs every update")


def check_secure_aggregation(
    plugin: str | type | Callable[[], SecureAggregation], numel: int = 6, atol: float = 1e-3
) -> None:
    """A secure aggregation protocol releases the plain FedAvg sum, round-trips its state, refuses robust rules.

    Two rounds of :func:`run_server_round` under the protocol equal the same rounds without it within
    ``atol`` (its quantisation); its state survives a checkpoint; setting it up for a strategy that needs
    every individual update raises a ``ValueError`` that says why (a protocol that reveals only sums cannot
    serve it).
    """
    make = factory(plugin, SECURE_AGGREGATION)
    protocol = make()
    assert isinstance(protocol, SecureAggregation), f"{type(protocol).__name__} is not a lightfed SecureAggregation"
    strategy = FedAvg()
    protocol.setup(strategy=strategy, privacy=None, numel=numel, seed=0)
    w_secure = w_plain = torch.zeros(numel)
    cohort = list(range(8))
    for r in range(2):
        updates = _random_updates(r, cohort, numel)
        w_secure = run_server_round(strategy, w_secure, updates, r, secure_aggregation=protocol).global_params
        w_plain = run_server_round(FedAvg(), w_plain, _random_updates(r, cohort, numel), r).global_params
        torch.testing.assert_close(w_secure, w_plain, rtol=0, atol=atol,
                                   msg=lambda m, r=r: f"round {r} under {type(protocol).__name__} differs from the plain sum: {m}")
    restored = make()
    restored.setup(strategy=FedAvg(), privacy=None, numel=numel, seed=0)
    restored.load_state_dict(round_trip(protocol.state_dict()))
    torch.testing.assert_close(restored.state_dict(), protocol.state_dict(), rtol=0, atol=0)
    refused = _refused_or_accepted(
        lambda: make().setup(strategy=_NeedsAllUpdates(), privacy=None, numel=numel, seed=0),
        f"{type(protocol).__name__} with a strategy that needs every update",
    )
    assert refused, f"{type(protocol).__name__} accepted a strategy that needs every individual update"


__all__ = [
    "POPULATION", "STRATEGY_CHECKS", "TinyRegressor", "check_client_order_does_not_matter", "check_defaults",
    "check_identical_updates", "check_privacy_mechanism", "check_secure_aggregation", "check_state_round_trips",
    "check_strategy", "check_zero_updates_are_a_fixed_point", "copies", "factory", "make_update",
    "regression_clients", "round_trip", "run_info", "run_server_round", "set_up_strategy", "train_clients",
]
