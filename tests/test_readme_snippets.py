"""Issue 24: the README's DP snippet (experiments/dp_on_top.yaml) runs on the quickstart config as written."""

from __future__ import annotations

from pathlib import Path

from lightfed.cli_lightning import LightFedCLI

ROOT = Path(__file__).resolve().parents[1]


def test_dp_snippet_on_the_quickstart_config(tmp_path):
    cli = LightFedCLI(args=["fit", "--config", str(ROOT / "experiments" / "digits_fedavg.yaml"),
                            "--config", str(ROOT / "experiments" / "dp_on_top.yaml"), "--trainer.rounds", "2",
                            "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
                            "--trainer.default_root_dir", str(tmp_path)])
    trainer = cli.trainer
    assert type(trainer.privacy).__name__ == "DPFixedClipping" and trainer.strategy.weighted is False
    assert len(trainer.history) == 2 and trainer.history[-1]["privacy/epsilon"] > 0
    assert (tmp_path / "global_model.safetensors").is_file()
