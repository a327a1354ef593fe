"""Per-tensor and Dirac canaries (Nasr et al. 2023): a tensor released without noise shows in its own estimate."""

from __future__ import annotations

import pytest
import torch

from lightfed.audit import OneShotCanaryAudit
from tests.audit.conftest import dp, run
from tests.audit.test_noise_check import SkipsNoiseOn

ONE_TENSOR = slice(576, 768)  # net.3.weight of the audit MLP (net.1: 8 x 64, net.3: 64 x 3)


def audit(kind):
    return OneShotCanaryAudit(num_canaries=100, bootstrap=50, kind=kind)


def test_dirac_canaries_are_distinct_coordinates_spread_over_the_tensors(tmp_path):
    a = audit("dirac")
    run(tmp_path, [a], privacy=dp(), rounds=1)
    rows = a.directions
    assert torch.equal((rows != 0).sum(dim=1), torch.ones(200, dtype=torch.long))  # one coordinate each
    assert torch.equal(rows.sum(dim=1), torch.ones(200))
    assert len(set(rows.argmax(dim=1).tolist())) == 200  # inserted and held-out never share a coordinate
    assert {name for name, _, _ in a.groups} == {"net.1.weight", "net.1.bias", "net.3.weight"}  # 3-coordinate bias: too small
    assert set(a.report["groups"]) == {"net.1.weight", "net.1.bias", "net.3.weight"}
    with pytest.raises(ValueError, match="kind must be 'random', 'per_tensor' or 'dirac'"):
        OneShotCanaryAudit(kind="sparse")


@pytest.mark.slow
@pytest.mark.parametrize("kind", ["per_tensor", "dirac"])
def test_a_tensor_released_without_noise_stands_out_in_its_group(tmp_path, kind):
    """Measured (seed 0, 20 rounds): correct mechanism max group estimate 4.2 (per_tensor) / 10.1 (dirac) against
    a claim of 1.76; net.3.weight released exactly: 176 / 126 in its group (all iterates)."""
    honest, broken = audit(kind), audit(kind)
    mechanism = dp(SkipsNoiseOn)
    mechanism.exact = ONE_TENSOR
    run(tmp_path / "ok", [honest], privacy=dp())
    run(tmp_path / "broken", [broken], privacy=mechanism)
    claim = honest.report["claimed_epsilon"]
    assert honest.report["max_group_epsilon"] < 20 * claim
    assert broken.report["groups"]["net.3.weight"]["all_iterates"]["epsilon"] > 20 * claim
    assert broken.report["max_group_epsilon"] > 20 * claim
