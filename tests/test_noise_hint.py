"""Issue 24: a DP run whose noise swamps the mean update says so in one line before round 1."""

from __future__ import annotations

import logging
from pathlib import Path

import pytest
import yaml

from lightfed.cli import main
from lightfed.noise_hint import hint, noise_to_clip_ratio
from tests.test_cli import write_config


def test_ratio_is_noise_multiplier_over_expected_cohort():
    # sigma = z C on the sum; the mean divides by m: sigma / (C m) = z / m
    assert noise_to_clip_ratio(39.59, 80) == pytest.approx(0.494875)
    assert hint(0.9173, 80).endswith("small; DP usually costs a few points of accuracy here.")
    assert "large; expect a clear accuracy loss" in hint(8.0, 80)
    assert "the noise usually swamps the update" in hint(39.59, 80)


@pytest.mark.parametrize(("epsilon", "loud"), [(0.05, True), (8.0, False)])
def test_cli_prints_the_hint_before_training(tmp_path, caplog, epsilon, loud):
    cohort = 4 if loud else 20  # z / m: a small epsilon over 4 clients, a large one over all 20
    cfg = yaml.safe_load(Path(write_config(tmp_path, logger=False, rounds=1, clients_per_round=cohort)).read_text())
    cfg["privacy"] = {"class_path": "lightfed.privacy.DPFixedClipping",
                      "init_args": {"clip_norm": 1.0, "target_epsilon": epsilon}}
    cfg["strategy"] = {"class_path": "lightfed.strategy.FedAvg", "init_args": {"weighted": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    with caplog.at_level(logging.INFO, logger="lightfed"):
        main(["fit", "--config", str(tmp_path / "config.yaml")])
    lines = [r for r in caplog.records if r.getMessage().startswith("noise-to-clip ratio of the mean update")]
    assert len(lines) == 1
    assert ("swamps" in lines[0].getMessage()) == loud
    assert (lines[0].levelno == logging.WARNING) == loud
