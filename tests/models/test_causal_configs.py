"""The causal-LM example configs run as written, with the tiny Llama swapped in for SmolLM2 (seconds)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from unittest import mock

import pytest

from lightfed.cli import LightFedCLI, main

EXPERIMENTS = Path(__file__).resolve().parents[2] / "experiments"


def tiny(folder: Path) -> list[str]:
    return ["--model.init_args.model", str(folder), "--data.init_args.model", str(folder)]


@pytest.mark.parametrize(("name", "rounds"), [("shakespeare_causal_lora", 8), ("shakespeare_causal_lora_dp", 10)])
def test_federated_configs_parse_and_build(name: str, rounds: int, tiny_llama: Path, tmp_path: Path) -> None:
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightFedCLI(args=["--config", str(EXPERIMENTS / f"{name}.yaml"), *tiny(tiny_llama),
                                "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert type(cli.model).__name__ == "CausalLM" and cli.trainer.rounds == rounds
    assert (cli.trainer.privacy is not None) == name.endswith("_dp")


def test_federated_config_runs_one_round(tiny_llama: Path, tmp_path: Path) -> None:
    main(["fit", "--config", str(EXPERIMENTS / "shakespeare_causal_lora.yaml"), *tiny(tiny_llama), "--trainer.rounds",
          "1", "--trainer.local_steps", "1", "--trainer.default_root_dir", str(tmp_path)])
    assert list(tmp_path.rglob("adapter_config.json")) and list(tmp_path.rglob("events.out.tfevents*"))


def test_central_config_runs_two_steps(tiny_llama: Path, tmp_path: Path) -> None:
    main(["central", "fit", "--config", str(EXPERIMENTS / "shakespeare_causal_central.yaml"), *tiny(tiny_llama),
          "--trainer.max_steps", "2", "--trainer.val_check_interval", "2", "--trainer.default_root_dir", str(tmp_path),
          "--trainer.enable_progress_bar", "false"])


def test_audit_config_runs_one_round_and_reports_the_one_run_bound(tiny_llama: Path, tmp_path: Path) -> None:
    main(["fit", "--config", str(EXPERIMENTS / "shakespeare_causal_lora_dp_audit.yaml"), *tiny(tiny_llama),
          "--trainer.rounds", "1", "--trainer.local_steps", "1", "--trainer.default_root_dir", str(tmp_path)])
    report = json.loads(next(tmp_path.rglob("audit_one_shot.json")).read_text())
    assert report["inclusion"] == "coin" and report["one_run"]["candidates"] == 80 and report["delta"] == 1e-5
    assert report["one_run"]["epsilon_lower_bound"] <= report["accountant_epsilon"]


def test_the_dp_config_without_privacy_is_the_documented_non_dp_row(tiny_llama: Path, tmp_path: Path) -> None:
    """docs/llm.md: `--privacy null` on shakespeare_causal_lora_dp.yaml gives the table's non-DP row."""
    with mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightFedCLI(args=["--config", str(EXPERIMENTS / "shakespeare_causal_lora_dp.yaml"), *tiny(tiny_llama),
                                "--privacy", "null", "--trainer.logger", "false",
                                "--trainer.default_root_dir", str(tmp_path)], run=False)
    assert cli.trainer.privacy is None and cli.trainer.rounds == 10
    assert cli.trainer.sampler.sampling_rate == 0.05 and cli.model.optimizer_name == "sgd" and cli.model.lr == 1.0
