"""Every experiments/strategy_*.yaml parses, validates and builds its strategy; one of them runs a round."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightfed.cli import LightFedCLI, main
from lightfed.registry import STRATEGIES

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CONFIGS = sorted(EXPERIMENTS.glob("strategy_*.yaml"))


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightfed"])


def test_one_config_per_zoo_strategy():
    zoo = {e.name.lower() for e in STRATEGIES.entries() if e.origin == "lightfed (entry point zoo)"}
    assert {f"strategy_{name}.yaml" for name in zoo} <= {p.name for p in CONFIGS}


@pytest.mark.parametrize("path", CONFIGS, ids=[p.stem for p in CONFIGS])
def test_config_builds_its_strategy(path, tmp_path):
    raw = yaml.safe_load(path.read_text())["strategy"]
    cli = LightFedCLI(args=["--config", str(path), "--trainer.default_root_dir", str(tmp_path)], run=False)
    strategy = cli.trainer.strategy
    wanted = raw if isinstance(raw, str) else raw["class_path"].rsplit(".", 1)[-1]
    assert type(strategy).__name__.lower() == wanted.lower()
    for key, value in ({} if isinstance(raw, str) else raw.get("init_args", {})).items():
        if not isinstance(value, dict):
            assert getattr(strategy, key) == value, key


def test_scaffold_config_runs(tmp_path):
    main(["fit", "--config", str(EXPERIMENTS / "strategy_scaffold.yaml"), "--trainer.rounds", "1",
          "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["strategy"]["name"] == "SCAFFOLD" and ckpt["progress"]["round"] == 1
    assert len(ckpt["client_states"]) == 10 and float(ckpt["strategy"]["state"]["c"].abs().sum()) > 0
