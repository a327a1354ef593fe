"""The direct noise check catches partial noise that canary estimates miss: planted bugs, each detected."""

from __future__ import annotations

import pytest

from lightfed.audit import ReleasedNoiseCheck, check_released_noise
from lightfed.messages import RoundAggregate, RunInfo
from lightfed.privacy import DPFixedClipping
from lightfed.registry import AUDITS
from lightfed.sampling import PoissonSampler, UniformSampler
from lightfed.secagg import SecAggPlus
from lightfed.strategy import FedAvg
from tests.audit.conftest import QuarterNoise, run

NAMES, NUMELS = ("net.0.weight", "net.0.bias", "net.2.weight", "net.2.bias"), (512, 64, 192, 3)  # the audit MLP
BIAS = slice(768, 771)


class SkipsNoiseOn(DPFixedClipping):
    """BROKEN on purpose: releases the coordinates ``self.exact`` of the sum without noise."""

    exact: slice | None = None

    def process_aggregate(self, aggregate: RoundAggregate, round_idx: int) -> RoundAggregate:
        clean = aggregate.delta_sum.clone()
        out = super().process_aggregate(aggregate, round_idx)
        if self.exact is not None:
            out.delta_sum[self.exact] = clean[self.exact]
        return out


def mechanism(cls=DPFixedClipping, exact=None, **kw):
    m = cls(clip_norm=0.5, noise_multiplier=1.0, verbose=False, **kw)
    m.exact = exact
    m.setup(RunInfo(num_clients=200, sampler=PoissonSampler(0.1), rounds=5,
                    strategy=FedAvg(weighted=False), seed=0))
    return m


def check(m, **kw):
    return check_released_noise(m, NAMES, NUMELS, **kw)


def test_a_correct_mechanism_passes_server_and_distributed():
    report = check(mechanism())
    assert report.ok, report.summary()
    assert all(t["ratio"] == pytest.approx(1.0, rel=0.15) for t in report.tensors.values())
    privacy = DPFixedClipping(clip_norm=0.5, noise_multiplier=1.0, clipping="client", noise_placement="distributed",
                              verbose=False)
    privacy.setup(RunInfo(num_clients=8, sampler=UniformSampler(8), rounds=1,
                          strategy=FedAvg(weighted=False), seed=0))
    secagg = SecAggPlus(max_dropout=0.0)
    secagg.setup(strategy=FedAvg(weighted=False), privacy=privacy, numel=sum(NUMELS), seed=0)
    report = check(privacy, secure_aggregation=secagg, rounds=3)
    assert report.ok, report.summary()


@pytest.mark.parametrize("exact, failed", [
    # every other coordinate released exactly (the 3-coordinate bias shows only in the exact count)
    (slice(0, None, 2), NAMES[:3]),
    (slice(576, 768), ("net.2.weight",)),        # one tensor
    (BIAS, ("net.2.bias",)),                     # the bias only
], ids=["every-other-coordinate", "one-tensor", "bias-only"])
def test_partial_noise_is_detected(exact, failed):
    report = check(mechanism(SkipsNoiseOn, exact=exact))
    assert not report.ok
    assert tuple(report.failed_tensors) == failed
    expected_exact = len(range(771)[exact])
    assert report.exact_coordinates == expected_exact
    assert report.num_failed_blocks >= 1


def test_a_quarter_of_the_noise_fails_every_tensor():
    report = check(mechanism(QuarterNoise))
    assert report.failed_tensors == list(NAMES) and report.exact_coordinates == 0
    assert report.tensors["net.0.weight"]["ratio"] == pytest.approx(0.25, rel=0.1)


def test_the_callback_stops_a_run_whose_noise_falls_short(tmp_path):
    assert AUDITS.get("ReleasedNoiseCheck") is ReleasedNoiseCheck
    bad = SkipsNoiseOn(clip_norm=0.5, noise_multiplier=1.0, verbose=False)
    bad.exact = BIAS
    with pytest.raises(ValueError, match=r"FALLS SHORT .*net.3.bias"):
        run(tmp_path / "bad", [ReleasedNoiseCheck()], privacy=bad, rounds=1)
    good = ReleasedNoiseCheck()
    run(tmp_path / "good", [good], privacy=DPFixedClipping(clip_norm=0.5, noise_multiplier=1.0, verbose=False), rounds=1)
    assert good.report.ok and (tmp_path / "good" / "audit_noise_check.json").is_file()
    with pytest.raises(ValueError, match="no noise plan to check"):
        check(_no_noise())


def _no_noise():
    m = DPFixedClipping(clip_norm=0.5, noise_multiplier=0.0, verbose=False)
    m.setup(RunInfo(num_clients=200, sampler=PoissonSampler(0.1), rounds=5,
                    strategy=FedAvg(weighted=False), seed=0))
    return m
