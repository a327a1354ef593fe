"""Every audit example config (experiments/audit_*.yaml) parses through the ``lightfed fit`` parser, and so does
the no-DP override docs/auditing.md gives for the Fashion-MNIST table."""

from __future__ import annotations

import sys
from pathlib import Path
from unittest import mock

import pytest

from lightfed.cli import LightFedCLI

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CONFIGS = sorted(EXPERIMENTS.glob("audit_*.yaml"))
NO_DP = ["--privacy", "null", "--trainer.callbacks.init_args.canary_norm", "0.5"]


@pytest.mark.parametrize("config", CONFIGS, ids=lambda p: p.stem)
def test_audit_config_parses(config, tmp_path):
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightFedCLI(args=["--config", str(config), "--trainer.logger", "false",
                                "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.trainer.rounds > 0


def test_fashion_no_dp_override_parses(tmp_path):
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightFedCLI(args=["--config", str(EXPERIMENTS / "audit_fashion_dp_eps3.yaml"), *NO_DP,
                                "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.trainer.privacy is None
    audit = [c for c in cli.trainer.callbacks if type(c).__name__ == "OneShotCanaryAudit"]
    assert len(audit) == 1 and audit[0].canary_norm == 0.5


def test_attacks_rerun_a_config_without_its_audits(tmp_path):
    """``lightfed audit`` and LiRA's shadows build the run without ``trainer.callbacks`` or an ``audit:`` section
    (canaries would move the shadows and cost time)."""
    import yaml

    from lightfed.audit.cli import quiet_cli
    from tests.test_cli import CONFIG

    cfg = yaml.safe_load(yaml.safe_dump(CONFIG))
    cfg["audit"] = [{"class_path": "lightfed.audit.OneShotCanaryAudit", "init_args": {"num_canaries": 2}}]
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    assert quiet_cli(str(path), str(tmp_path)).trainer.callbacks == []
