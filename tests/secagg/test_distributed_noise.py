"""Distributed DP noise under SecAgg+ carries the plan on every summed part (issue 24, item 8)."""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
import torch

from lightfed.messages import ClientUpdate, RunInfo
from lightfed.privacy import DPAdaptiveClipping, DPFixedClipping
from lightfed.sampling import UniformSampler
from lightfed.secagg import ScheduledDropout, SecAggPlus
from lightfed.secagg.protocol import shamir_threshold
from lightfed.secagg.secagg_plus import NOISE_TAIL, tail_multiplier
from lightfed.strategy import FedAvg
from tests.secagg.helpers import run_round


def dp_protocol(n, numel, z=1.0, clip_norm=1.0, **kwargs):
    """DPFixedClipping(clipping=client, noise_placement=distributed) with SecAggPlus, as the trainer sets them up."""
    privacy = DPFixedClipping(clip_norm=clip_norm, noise_multiplier=z, clipping="client", noise_placement="distributed",
                              verbose=False)
    privacy.setup(RunInfo(num_clients=n, sampler=UniformSampler(n), rounds=1,
                          strategy=FedAvg(weighted=False), seed=0))
    protocol = SecAggPlus(**kwargs)
    protocol.setup(strategy=FedAvg(weighted=False), privacy=privacy, numel=numel, seed=0)
    return protocol


def zero_updates(n, numel, extras=False):
    return [ClientUpdate(c, torch.zeros(numel), num_examples=3, metrics={"loss": 0.1 * c},
                         extras={"delta_c": torch.zeros(numel)} if extras else {}) for c in range(n)]


def test_extras_carry_the_same_noise_as_the_update():
    # SCAFFOLD's delta_c was released exactly (std 0.000) while delta_sum carried the noise
    n, numel = 6, 20000
    protocol = dp_protocol(n, numel, max_dropout=0.0)
    _, result = run_round(protocol, zero_updates(n, numel, extras=True), weights=[1.0] * n)
    target = 1.0  # z C, and n = n_min survivors
    assert float(result.delta_sum.double().std()) == pytest.approx(target, rel=0.03)
    assert float(result.extras_sum["delta_c"].double().std()) == pytest.approx(target, rel=0.03)


def test_update_and_extras_are_clipped_together_to_the_clip_norm():
    protocol = dp_protocol(3, 4, z=1e-9, clip_norm=1.0, max_dropout=0.0)
    ups = [ClientUpdate(c, torch.tensor([3.0, 0, 0, 0]), 3, extras={"delta_c": torch.tensor([0, 4.0, 0, 0])})
           for c in range(3)]
    _, result = run_round(protocol, ups, weights=[1.0] * 3)
    # ||(3, 4)|| = 5 -> scaled by 1/5: each client sends (0.6, 0.8)
    assert result.delta_sum[0].item() == pytest.approx(1.8, abs=1e-4)
    assert result.extras_sum["delta_c"][1].item() == pytest.approx(2.4, abs=1e-4)


def test_the_range_holds_the_noise_so_the_released_variance_meets_the_plan():
    # the numbers: default clip 1.0, z = C = 1, 5 clients, exactly n_min = 4 survivors; the range
    # [-1, 1] kept only 0.923 of the variance, below (zC)^2
    n, numel = 5, 40000
    protocol = dp_protocol(n, numel, dropout=ScheduledDropout({0: {0: "masked_input"}}))
    agg, result = run_round(protocol, zero_updates(n, numel), weights=[1.0] * n)
    assert protocol.min_survivors(n) == 4 and len(agg.server.view.u3) == 4
    var = float(result.delta_sum.double().var())
    # sample variance of 40000 Gaussians: relative standard error sqrt(2 / 40000) = 0.7%; 4 sigma below
    assert var >= 1.0 * (1 - 4 * math.sqrt(2 / numel)), var
    assert var == pytest.approx(1.0, rel=0.03)
    k = tail_multiplier(numel * n)
    assert n * numel * math.erfc(k / math.sqrt(2)) <= NOISE_TAIL
    assert agg.layout["delta"].bound == pytest.approx(1.0 + k * 0.5)  # (C + k sigma) / W, sigma = zC / sqrt(4)
    assert protocol.round_metrics()["clipped_fraction"] == 0.0


def test_client_metrics_are_not_sent_under_distributed_noise():
    protocol = dp_protocol(3, 10, max_dropout=0.0)
    agg, _ = run_round(protocol, zero_updates(3, 10), weights=[1.0] * 3)
    assert not [name for name in agg.layout.names() if name.startswith("metric/")]


def test_noise_source_os_cannot_be_recomputed_from_the_seed():
    def encoding(source):
        protocol = dp_protocol(2, 50, max_dropout=0.0, noise_source=source)
        agg = protocol.aggregator(0, [0, 1])
        update = zero_updates(2, 50)[0]
        agg.layout = protocol.layout_for(update, 2)
        return protocol.encode(update, 1.0, 0, agg.layout, agg.noise)[0]

    assert np.array_equal(encoding("seeded"), encoding("seeded"))  # reproducible: anyone with the seed can too
    assert not np.array_equal(encoding("os"), encoding("os"))
    with pytest.raises(ValueError, match="secure_aggregation.noise_source must be 'seeded' or 'os'"):
        SecAggPlus(noise_source="urandom")


@pytest.mark.parametrize("fraction, k", [(0.58, 50), (0.5, 8), (0.5, 7), (0.7, 10), (0.6, 5), (0.9, 30), (0.51, 100)])
def test_threshold_is_floor_of_the_configured_decimal_times_k_plus_one(fraction, k):
    assert shamir_threshold(fraction, k) == math.floor(Fraction(str(fraction)) * k) + 1
    assert shamir_threshold(0.58, 50) == 30  # float arithmetic gave 29


def test_compositions_that_would_release_something_unnoised_are_refused():
    with pytest.raises(ValueError, match="not supported by DPAdaptiveClipping: its clip count"):
        DPAdaptiveClipping(noise_multiplier=1.0, clipping="client", noise_placement="distributed")
    with pytest.raises(ValueError, match="weighted_estimator: true would release the secure sum of the weights"):
        DPFixedClipping(noise_multiplier=1.0, clipping="client", noise_placement="distributed",
                        weighted_estimator=True, weight_cap=10.0)


def test_the_dp_secagg_example_config_composes_distributed_noise(tmp_path, monkeypatch):
    import sys
    from pathlib import Path

    from lightfed.cli import LightFedCLI

    monkeypatch.setattr(sys, "argv", ["lightfed"])
    config = Path(__file__).resolve().parents[2] / "experiments" / "digits_dp_secagg.yaml"
    cli = LightFedCLI(args=["--config", str(config), "--trainer.logger", "false", "--trainer.default_root_dir",
                            str(tmp_path)], run=False)
    t = cli.trainer
    assert t.privacy.noise_placement == "distributed" and t.privacy.clipping == "client"
    assert isinstance(t.secure_aggregation, SecAggPlus) and t.secure_aggregation.noise_source == "os"
