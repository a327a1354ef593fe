"""The SecAggPlus plugin in the trainer: FedAvg equivalence, refusals, overflow, bytes, DP noise, failing closed."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import numpy as np
import pytest
import torch

from lightfed import FederatedTrainer, Strategy
from lightfed.cli import LightFedCLI
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import IID
from lightfed.models import MLPClassifier
from lightfed.privacy import DPFixedClipping, sum_noise_std
from lightfed.registry import SECURE_AGGREGATION, STRATEGIES
from lightfed.secagg import ScheduledDropout, SecAggPlus
from lightfed.strategy import FedAvg
from lightfed.trainer import RunFailedError
from tests.conftest import BoringFederatedData, boring_model
from tests.secagg.helpers import make_protocol, make_updates, run_round

REPO = Path(__file__).resolve().parents[2]


def fit_digits(tmp_path, secure_aggregation=None, rounds=1, **kwargs):
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(in_features=64, hidden=[32], lr=0.1)
    trainer = FederatedTrainer(
        rounds=rounds, clients_per_round=5, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
        fed_eval_fraction=0.0, checkpoint_every=0, secure_aggregation=secure_aggregation, **kwargs,
    )
    history = trainer.fit(model, DigitsDataModule(IID(num_clients=20)))
    return trainer, history


# ---------------------------------------------------------------------- FedAvg equivalence
def test_weighted_fedavg_under_secagg_equals_plain_fedavg_within_quantization_error(tmp_path):
    L.seed_everything(0, verbose=False)
    start = torch.cat([p.detach().reshape(-1) for p in MLPClassifier(in_features=64, hidden=[32], lr=0.1).parameters()])
    plain, _ = fit_digits(tmp_path / "plain")
    secure, history = fit_digits(tmp_path / "secure", SecAggPlus(max_weight=100.0, clip=1.0))
    protocol = secure.secure_aggregation
    m = history[0]
    assert m["secagg/failed"] == 0.0 and m["secagg/survivors"] == 5.0
    weight_sum = sum(secure.datamodule.client_num_examples()[c] for c in secure.sample(0))
    # |mean error| <= (n W clip / L) / sum_k w_k per coordinate (+ float32 rounding of the plain sum)
    bound = protocol.codec.error_bound(5, 1.0) * 100.0 / weight_sum + 1e-6
    diff = (secure.global_params - plain.global_params).abs().max()
    assert float(diff) < bound
    assert float((plain.global_params - start).abs().max()) > 100 * bound  # the round did move the model
    assert m["central/test_acc"] == pytest.approx(plain.history[0]["central/test_acc"], abs=0.01)


@pytest.mark.slow
def test_three_rounds_of_secure_fedavg_track_plain_fedavg(tmp_path):
    plain, _ = fit_digits(tmp_path / "plain", rounds=3)
    secure, history = fit_digits(tmp_path / "secure", SecAggPlus(max_weight=100.0), rounds=3)
    assert float((secure.global_params - plain.global_params).abs().max()) < 1e-3
    assert history[-1]["central/test_acc"] == pytest.approx(plain.history[-1]["central/test_acc"], abs=0.02)


# ---------------------------------------------------------------------- refusals
class Median(Strategy):
    """A robust strategy: needs every update."""

    needs_all_updates = True


def test_robust_strategy_is_refused(tmp_path):
    with pytest.raises(ValueError, match="Median needs every individual update"):
        SecAggPlus().setup(strategy=Median(), privacy=None, numel=10, seed=0)
    trainer = FederatedTrainer(rounds=1, clients_per_round=4, strategy=Median(), secure_aggregation=SecAggPlus(),
                               logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="use a linear strategy"):
        trainer.fit(boring_model(), BoringFederatedData())


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_every_registered_strategy_is_accepted_iff_linear(name):
    cls = STRATEGIES.get(name)
    strategy = cls.__new__(cls)  # only the class attribute matters; some strategies need constructor arguments
    if cls.needs_all_updates:
        with pytest.raises(ValueError, match="needs every individual update"):
            SecAggPlus().setup(strategy=strategy, privacy=None, numel=10, seed=0)
    else:
        SecAggPlus().setup(strategy=strategy, privacy=None, numel=10, seed=0)


def test_cohort_that_could_overflow_is_refused_before_the_round():
    protocol = make_protocol(numel=10, quantization_bits=20, modulus_bits=32)
    with pytest.raises(ValueError, match=r"4097 clients x 524287 .*at most 4096 clients.*modulus_bits to >= 33"):
        protocol.aggregator(0, list(range(4097)))


def test_weight_above_max_weight_is_refused():
    protocol = make_protocol(numel=10, max_weight=3.0)
    with pytest.raises(ValueError, match=r"weight 5, outside \[0, secure_aggregation.max_weight=3\]"):
        run_round(protocol, make_updates([0, 1, 2], 10), weights=[1.0, 5.0, 1.0])


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [({"clip": 0.0}, "secure_aggregation.clip"), ({"max_weight": -1.0}, "max_weight"),
     ({"threshold": 0.3}, "threshold"), ({"max_dropout": 1.0}, "max_dropout"),
     ({"modulus_bits": 80}, "modulus_bits"), ({"num_neighbours": 1}, "num_neighbours"),
     ({"key_source": "weak"}, "key_source"), ({"noise_multiplier": -1.0}, "noise_multiplier"),
     ({"dropout": {"typo": 0.1}}, "unknown stages")],
)
def test_bad_configuration_is_refused_naming_the_field(kwargs, match):
    with pytest.raises(ValueError, match=match):
        protocol = SecAggPlus(**kwargs)
        protocol.setup(strategy=FedAvg(), privacy=None, numel=10, seed=0)
        protocol.aggregator(0, list(range(4)))


def test_registered_and_resolvable_by_name():
    assert SECURE_AGGREGATION.get("secaggplus") is SecAggPlus


# ---------------------------------------------------------------------- metrics
def test_protocol_bytes_match_hand_count():
    """4 clients, all pairs (k=3, t=2), 100 parameters, no metrics: vector = 100 + weight + clipped = 102 words."""
    protocol = make_protocol(numel=100)
    run_round(protocol, make_updates([0, 1, 2, 3], 100, metrics=False))
    m = protocol.round_metrics()
    advertise = 4 + 2 * 32
    share_keys = 4 + 3 * (2 * 4 + (8 + 2 * 33) + 16)  # ids + AES-GCM(ids, two 33-byte shares) + tag
    masked = 4 + 102 * 4
    unmask = 4 + 3 * (4 + 33)
    assert m["bytes_up_per_client"] == advertise + share_keys + masked + unmask == 893
    neighbour_keys = 4 + 3 * advertise
    forwarded = 3 * (2 * 4 + 90)
    request = 4 * (2 + 3)
    assert m["bytes_down_per_client"] == neighbour_keys + forwarded + request == 522
    assert m["plain_bytes_per_client"] == 4 * 102
    assert m["upload_expansion"] == pytest.approx(893 / 408)
    assert (m["neighbours"], m["threshold"], m["dropouts"], m["failed"]) == (3.0, 2.0, 0.0, 0.0)


def test_failed_rounds_leave_the_model_unchanged_and_can_stop_training(tmp_path):
    everyone_drops = ScheduledDropout({-1: {c: "masked_input" for c in range(12)}})
    trainer = FederatedTrainer(rounds=3, clients_per_round=4, secure_aggregation=SecAggPlus(dropout=everyone_drops, max_weight=50.0),
                               logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path / "a"), fed_eval_fraction=0.0)
    model = boring_model()
    start = torch.cat([p.detach().reshape(-1).clone() for p in model.parameters()])
    with pytest.raises(RunFailedError, match=r"every round \(3\) released no client update .*failed closed"):
        trainer.fit(model, BoringFederatedData())  # a run that never aggregated must not exit 0
    history = trainer.history
    assert torch.equal(trainer.global_params, start)
    assert trainer.exported_model is None and trainer.last_checkpoint.is_file()
    assert [h["secagg/failed"] for h in history] == [1.0, 1.0, 1.0]
    assert history[-1]["secagg/failed_rounds"] == 3.0
    assert trainer.secure_aggregation.state_dict() == {"failed_rounds": 3, "rounds_run": 3}

    stopping = FederatedTrainer(rounds=3, clients_per_round=4, stop_on_failed_round=True,
                                secure_aggregation=SecAggPlus(dropout=everyone_drops, max_weight=50.0), logger=False,
                                enable_progress_bar=False, default_root_dir=str(tmp_path / "b"), fed_eval_fraction=0.0)
    with pytest.raises(RunFailedError, match="stop_on_failed_round"):
        stopping.fit(boring_model(), BoringFederatedData())
    assert len(stopping.history) == 1


def test_state_dict_round_trip():
    protocol = SecAggPlus()
    protocol.load_state_dict({"failed_rounds": 2, "rounds_run": 9})
    assert protocol.state_dict() == {"failed_rounds": 2, "rounds_run": 9}


def test_server_view_files_are_written(tmp_path):
    protocol = make_protocol(numel=20, server_view_dir=str(tmp_path / "views"))
    run_round(protocol, make_updates([0, 1, 2], 20), round_idx=4)
    assert (tmp_path / "views" / "round-00004.npz").is_file()


# ---------------------------------------------------------------------- distributed DP
def test_distributed_noise_on_the_sum_matches_the_accountants_std():
    """z = 1, C = 0.5: each of n = 20 clients adds N(0, (zC)^2 / n_min) with n_min = 15 (max_dropout 0.25).

    With exactly n_min survivors the sum carries N(0, (zC)^2), the accountant's assumption; with all 20 it
    carries more (20 / 15 of the variance), never less.
    """
    cohort, numel = list(range(20)), 20000
    zeros = [u for u in make_updates(cohort, numel, scale=0.0, metrics=False)]
    target = sum_noise_std(1.0, 0.5)
    for drop, factor in ((5, 1.0), (0, math.sqrt(20 / 15))):
        dropout = ScheduledDropout({0: {c: "masked_input" for c in range(drop)}})
        protocol = make_protocol(numel=numel, max_weight=1.0, clip=4.0, max_dropout=0.25, noise_multiplier=1.0, num_neighbours=19,
                                 noise_clip_norm=0.5, dropout=dropout)
        _, result = run_round(protocol, zeros, weights=[1.0] * 20)
        std = float(result.delta_sum.double().std())
        # sample std of 20000 Gaussians: relative standard error 1/sqrt(2 * 20000) = 0.5%
        assert std == pytest.approx(target * factor, rel=0.03)
        m = protocol.round_metrics()
        assert m["noise_std_target"] == target
        assert m["noise_std_sum"] == pytest.approx(target * factor)
        assert m["noise_std_per_client"] == pytest.approx(target / math.sqrt(15))
        assert m["clipped_fraction"] == 0.0


def test_distributed_noise_clips_each_weighted_update_to_the_clip_norm():
    protocol = make_protocol(numel=2000, max_weight=1.0, clip=4.0, noise_multiplier=1e-6, noise_clip_norm=0.5)
    updates = make_updates(list(range(4)), 2000, scale=1.0, metrics=False)
    _, result = run_round(protocol, updates, weights=[1.0] * 4)
    expected = sum(u.delta.double() * (0.5 / float(u.delta.double().norm())) for u in updates)
    assert float((result.delta_sum.double() - expected).abs().max()) < protocol.codec.error_bound(4, 4.0) + 1e-5


def test_distributed_dp_with_the_privacy_accountant_end_to_end(tmp_path):
    privacy = DPFixedClipping(clip_norm=0.5, noise_multiplier=0.8, clipping="client", verbose=False,
                              noise_placement="distributed")
    trainer = FederatedTrainer(
        rounds=2, clients_per_round=6, strategy=FedAvg(weighted=False), privacy=privacy,
        secure_aggregation=SecAggPlus(max_weight=1.0, clip=2.0, max_dropout=1 / 3), logger=False,
        enable_progress_bar=False, default_root_dir=str(tmp_path), fed_eval_fraction=0.0,
    )
    history = trainer.fit(boring_model(), BoringFederatedData())
    m = history[-1]
    assert m["secagg/noise_std_target"] == pytest.approx(sum_noise_std(0.8, 0.5))
    assert m["secagg/noise_std_per_client"] == pytest.approx(0.4 / math.sqrt(4))  # n_min = 6 - 2
    assert m["secagg/noise_std_sum"] >= m["secagg/noise_std_target"]
    assert 0 < m["privacy/epsilon"] < math.inf


def test_distributed_noise_without_secure_aggregation_is_refused(tmp_path):
    privacy = DPFixedClipping(clip_norm=0.5, noise_multiplier=0.8, clipping="client", verbose=False,
                              noise_placement="distributed")
    trainer = FederatedTrainer(rounds=1, strategy=FedAvg(weighted=False), privacy=privacy, logger=False,
                               enable_progress_bar=False, default_root_dir=str(tmp_path))
    with pytest.raises(ValueError, match="no secure_aggregation section"):
        trainer.fit(boring_model(), BoringFederatedData())
    with pytest.raises(ValueError, match="needs clipping: client"):
        DPFixedClipping(clip_norm=0.5, noise_multiplier=0.8, noise_placement="distributed")


def test_dp_compositions_that_would_be_wrong_are_refused():
    with pytest.raises(ValueError, match="clipping: client"):
        SecAggPlus().setup(strategy=FedAvg(weighted=False), numel=10, seed=0,
                           privacy=DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, clipping="server", verbose=False))
    central = DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, clipping="client", verbose=False)
    central.update_noise_multiplier = 1.0  # what setup() computes
    with pytest.raises(ValueError, match="noise the sum twice"):
        SecAggPlus(noise_multiplier=1.0).setup(strategy=FedAvg(weighted=False), privacy=central, numel=10, seed=0)
    with pytest.raises(ValueError, match="noise_clip_norm"):
        SecAggPlus(noise_multiplier=1.0).setup(strategy=FedAvg(), privacy=None, numel=10, seed=0)
    SecAggPlus().setup(strategy=FedAvg(weighted=False), privacy=central, numel=10, seed=0)  # central noise on the sum: fine


# ---------------------------------------------------------------------- the example config
def test_example_config_runs(tmp_path):
    cli = LightFedCLI(args=[
        "fit", "--config", str(REPO / "experiments" / "digits_secagg.yaml"), "--trainer.rounds", "1",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    ])
    assert isinstance(cli.trainer.secure_aggregation, SecAggPlus)
    m = cli.trainer.history[0]
    assert m["secagg/failed"] == 0.0 and m["secagg/neighbours"] >= 2
    assert np.isfinite(m["central/test_acc"])
