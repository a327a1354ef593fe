"""Every LoRA variant's shipped config (LoRA on the Animal-MNIST CNN) runs end to end for 2 short rounds."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightfed.cli import main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"
CONFIGS = ["strategy_feditlora.yaml", "strategy_ffalora.yaml", "strategy_flora.yaml", "animal_lora_flora_mixed.yaml",
           "strategy_fedsalora.yaml"]
pytestmark = pytest.mark.filterwarnings("ignore:LightningCLI's args parameter is intended")


@pytest.fixture(autouse=True)
def _plain_argv(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "argv", ["lightfed"])


@pytest.mark.parametrize("config", CONFIGS)
def test_lora_variant_config_runs_two_rounds(config, tmp_path):
    strategy = yaml.safe_load((EXPERIMENTS / config).read_text())["strategy"]
    name = strategy if isinstance(strategy, str) else strategy["class_path"]
    main([
        "fit", "--config", str(EXPERIMENTS / config), "--trainer.init_checkpoint", "null",  # no pretraining here
        "--trainer.rounds", "2", "--trainer.clients_per_round", "3", "--trainer.local_steps", "2",
        "--trainer.eval_every", "2", "--trainer.fed_eval_fraction", "0.1", "--trainer.eval_batch_size", "1000",
        "--trainer.default_root_dir", str(tmp_path), "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
    ])
    ckpt = torch.load(tmp_path / "checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["progress"]["round"] == 2 and ckpt["strategy"]["name"] == name
    assert (tmp_path / "global_model.safetensors").is_file()
    names = ckpt["model"]["payload_names"]
    assert any("lora_B" in n for n in names)
    assert any("lora_A" in n for n in names) == (name != "FFALoRA")  # FFA-LoRA: A stays home
    assert any(n.endswith("base_layer.weight") for n in names) == (name == "FLoRA")  # FLoRA merges into W
