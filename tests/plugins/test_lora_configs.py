"""Every LoRA variant's shipped config (LoRA on the Animal-MNIST CNN) runs end to end for 2 short rounds; the
MiniLM variants' configs (``shakespeare_lora_*.yaml``) write out ``benchmarks/lora_table.py --task shakespeare``."""

from __future__ import annotations

import functools
import importlib.util
import sys
from pathlib import Path

import pytest
import torch
import yaml

from lightfed.cli import main
from lightfed.registry import STRATEGIES

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


SHAKESPEARE = {"fedit": "FedIT", "ffa": "FFA-LoRA", "flora": "FLoRA r=8", "flora_mixed": "FLoRA r in {2,4,8}",
               "fedsa": "FedSA-LoRA"}


@functools.cache
def lora_table():
    """``benchmarks/lora_table.py`` as a module (benchmarks/ is not a package)."""
    spec = importlib.util.spec_from_file_location("lora_table", EXPERIMENTS.parent / "benchmarks" / "lora_table.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules["lora_table"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.mark.parametrize("key", SHAKESPEARE)
def test_shakespeare_variant_config_is_the_table_recipe(key):
    # Prepare: the benchmark's variant and recipe, and the shipped config
    table = lora_table()
    name, kwargs, lora_extra, trainable = table.SHAKESPEARE_VARIANTS[SHAKESPEARE[key]]
    recipe = table.SHAKESPEARE
    raw = yaml.safe_load((EXPERIMENTS / f"shakespeare_lora_{key}.yaml").read_text())
    model, strategy, trainer = raw["model"]["init_args"], raw["strategy"], raw["trainer"]
    # Assert: the same model, strategy and round; the arguments are valid
    assert model["lora"] == {**table.SHAKESPEARE_LORA, **lora_extra}
    assert (model["optimizer"], model["lr"]) == ("sgd", recipe.lr)
    assert strategy["class_path"] == name
    assert strategy["init_args"] == {**kwargs, "server_optimizer": recipe.server_optimizer,
                                     "server_lr": recipe.server_lr, "beta1": 0.9, "beta2": 0.99, "tau": recipe.tau}
    assert trainer.get("trainable") == trainable
    assert (trainer["rounds"], trainer["clients_per_round"], trainer["local_steps"], trainer["batch_size"]) == (
        table.ROUNDS["shakespeare"], recipe.clients_per_round, 1, 16)
    assert trainer["fed_eval_fraction"] == recipe.fed_eval_fraction
    assert raw["data"]["init_args"]["test_subset"] == recipe.test_subset
    STRATEGIES.create(name, **strategy["init_args"])
