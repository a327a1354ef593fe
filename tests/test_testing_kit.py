"""lightfed.testing, the plugin kit: its checks pass on lightfed's own plugins and catch broken ones;
``lightfed new-strategy`` writes a package whose own test passes."""

from __future__ import annotations

import importlib
import sys

import pytest
import torch
from torch import Tensor

from lightfed import ClientUpdate, PrivacyMechanism, RoundAggregate, SecureAggregation, Strategy
from lightfed.cli import main
from lightfed.messages import RunInfo
from lightfed.privacy import DPSGD, DPAdaptiveClipping, DPFixedClipping, LocalDP
from lightfed.registry import STRATEGIES
from lightfed.secagg import SecAggPlus
from lightfed.testing import (
    check_client_order_does_not_matter,
    check_privacy_mechanism,
    check_secure_aggregation,
    check_state_round_trips,
    check_strategy,
    check_zero_updates_are_a_fixed_point,
    make_update,
    run_server_round,
)

# ---- broken strategies the harness must catch ------------------------------------------------------------


class FirstComeFirstServed(Strategy):
    """Takes the first client's update: depends on arrival order."""

    needs_all_updates = True

    def aggregate_updates(self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int) -> Tensor:
        return global_params + updates[0].delta


class Drifting(Strategy):
    """Moves the model even when every client is at its optimum."""

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return global_params + aggregate.mean_delta() + 0.01


class ForgetfulMomentum(Strategy):
    """Server momentum that is not in its state_dict: a resumed run continues differently."""

    def __init__(self) -> None:
        self.velocity: Tensor | None = None

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        step = aggregate.mean_delta()
        self.velocity = step if self.velocity is None else 0.9 * self.velocity + step
        return global_params + self.velocity


@pytest.mark.parametrize(
    ("strategy", "check", "message"),
    [
        (FirstComeFirstServed, check_client_order_does_not_matter, "client order changed the model"),
        (Drifting, check_zero_updates_are_a_fixed_point, "zero updates moved the model"),
        (ForgetfulMomentum, check_state_round_trips, "continued differently"),
    ],
)
def test_the_harness_catches_a_broken_strategy(strategy, check, message):
    with pytest.raises(AssertionError, match=message):
        check(strategy)


def test_fedavg_passes_every_check():
    check_strategy("FedAvg")


def test_run_server_round_is_the_public_server_step():
    # Prepare: two clients, 3 and 1 examples; FedAvg weighs them 3:1
    updates = [make_update(0, [4.0, 0.0], num_examples=3), make_update(1, [0.0, 8.0], num_examples=1)]
    # Execute
    outcome = run_server_round(STRATEGIES.create("FedAvg"), torch.tensor([1.0, 1.0]), updates)
    # Assert: w + (3 * [4, 0] + 1 * [0, 8]) / 4 = [1 + 3, 1 + 2]; released: 3 * [4, 0] + [0, 8] over 4
    torch.testing.assert_close(outcome.global_params, torch.tensor([4.0, 3.0]))
    torch.testing.assert_close(outcome.aggregate.delta_sum, torch.tensor([12.0, 8.0]))
    assert outcome.aggregate.weight_sum == 4.0 and outcome.result.num_updates == 2
    import lightfed.server

    assert run_server_round is lightfed.server.run_server_round


# ---- privacy mechanisms and secure aggregation ---------------------------------------------------------

MECHANISMS = {
    "DPFixedClipping": lambda: DPFixedClipping(clip_norm=0.5, noise_multiplier=0.8, verbose=False),
    "DPAdaptiveClipping": lambda: DPAdaptiveClipping(initial_clip=0.3, noise_multiplier=0.5, clipped_count_stddev=1.0,
                                                     verbose=False),
    "LocalDP": lambda: LocalDP(clip_norm=0.5, noise_multiplier=0.3, verbose=False),
    "DPSGD": lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=0.7, verbose=False),
}


@pytest.mark.parametrize("name", sorted(MECHANISMS))
def test_builtin_privacy_mechanisms_conform(name):
    check_privacy_mechanism(MECHANISMS[name])


class GlobalRngNoise(PrivacyMechanism):
    """Noise from torch's global RNG: a resumed run releases another round."""

    def process_aggregate(self, aggregate: RoundAggregate, round_idx: int) -> RoundAggregate:
        aggregate.delta_sum = aggregate.delta_sum + torch.randn(aggregate.delta_sum.shape)
        return aggregate


class CrashesOnRobust(PrivacyMechanism):
    """Refuses a robust strategy with the wrong exception and no reason."""

    def setup(self, info: RunInfo) -> None:
        if info.strategy.needs_all_updates:
            raise RuntimeError("no")


@pytest.mark.parametrize(
    ("mechanism", "message"),
    [(GlobalRngNoise, "released another round"), (CrashesOnRobust, "raised RuntimeError")],
)
def test_the_harness_catches_a_broken_privacy_mechanism(mechanism, message):
    with pytest.raises(AssertionError, match=message):
        check_privacy_mechanism(mechanism)


def test_secagg_plus_conforms():
    check_secure_aggregation(lambda: SecAggPlus(clip=4.0, max_weight=64.0))


class AcceptsEverything(SecureAggregation):
    """Forgets to refuse strategies that need every update."""

    def setup(self, *, strategy: Strategy, privacy, numel: int, seed: int) -> None:
        pass

    def aggregator(self, round_idx: int, cohort: list[int]):
        from lightfed.aggregation import StreamingSum

        return StreamingSum()


def test_the_harness_catches_secure_aggregation_that_accepts_a_robust_rule():
    with pytest.raises(AssertionError, match="accepted a strategy that needs every individual update"):
        check_secure_aggregation(AcceptsEverything)


# ---- lightfed new-strategy -------------------------------------------------------------------------------


def test_new_strategy_writes_a_package_whose_test_passes(tmp_path, capsys, monkeypatch):
    # Execute
    main(["new-strategy", "GeoMedKit", "--dir", str(tmp_path)])
    out = capsys.readouterr().out
    # Assert: the files, the entry point, and the generated test passing against the harness
    root = tmp_path / "lightfed-geo-med-kit"
    assert f"wrote {root}/" in out
    pyproject = (root / "pyproject.toml").read_text()
    assert '[project.entry-points."lightfed.strategies"]\ngeo_med_kit = "lightfed_geo_med_kit.strategies"' in pyproject
    monkeypatch.syspath_prepend(str(root))
    monkeypatch.syspath_prepend(str(root / "tests"))
    try:
        generated = importlib.import_module("test_geo_med_kit")
        generated.test_geo_med_kit_passes_the_lightfed_conformance_harness()
        generated.test_geo_med_kit_is_registered_by_name()
        with pytest.raises(ValueError, match=r"server_lr must be > 0, got 0 \(`strategy.init_args.server_lr`\)"):
            STRATEGIES.get("GeoMedKit")(server_lr=0)
    finally:
        if "GeoMedKit" in STRATEGIES:
            STRATEGIES.remove("GeoMedKit")
        for name in ("test_geo_med_kit", "lightfed_geo_med_kit.strategies", "lightfed_geo_med_kit"):
            sys.modules.pop(name, None)


@pytest.mark.parametrize(("name", "message"), [("geo med", "must be a Python class name"), ("Existing", "already exists")])
def test_new_strategy_refuses_a_bad_name_or_an_existing_folder_on_one_line(tmp_path, capsys, name, message):
    (tmp_path / "lightfed-existing").mkdir()
    with pytest.raises(SystemExit) as exit_info:
        main(["new-strategy", name, "--dir", str(tmp_path)])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and err[0].startswith("lightfed: error: ") and message in err[0]
