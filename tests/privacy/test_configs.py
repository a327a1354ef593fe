"""The DP example configs parse into the mechanisms and samplers they describe."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from lightfed.cli import LightFedCLI
from lightfed.privacy import DPSGD, DPAdaptiveClipping, DPFixedClipping

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


@pytest.mark.parametrize(
    "name, cls, target, kind",
    [("digits_dp_eps1", DPFixedClipping, 1.0, "poisson"), ("digits_dp_eps3", DPFixedClipping, 3.0, "poisson"),
     ("digits_dp_eps8", DPFixedClipping, 8.0, "poisson"), ("digits_dp_adaptive_eps3", DPAdaptiveClipping, 3.0, "poisson"),
     ("digits_dpsgd", DPSGD, 8.0, "uniform")],
)
def test_dp_config_parses(tmp_path, monkeypatch, name, cls, target, kind):
    monkeypatch.setattr(sys, "argv", ["lightfed"])  # pytest's own arguments are not for the CLI
    cli = LightFedCLI(
        args=["--config", str(EXPERIMENTS / f"{name}.yaml"), "--trainer.logger", "false",
              "--trainer.default_root_dir", str(tmp_path)],
        run=False,
    )
    trainer = cli.trainer
    assert type(trainer.privacy) is cls and trainer.privacy.target_epsilon == target
    assert trainer.sampler.kind == kind
    if cls is not DPSGD:  # client-level DP needs uniform weights
        assert trainer.strategy.weighted is False
