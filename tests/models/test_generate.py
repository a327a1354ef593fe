"""``lightfed fit`` of a CausalLM config, then ``lightfed generate`` from its checkpoint (tiny Llama, seconds)."""

from __future__ import annotations

from pathlib import Path

import pytest

from lightfed.cli import main

CONFIG = """
seed_everything: 0
model:
  class_path: lightfed.models.CausalLM
  init_args:
    model: {model}
    lora: {{r: 2, lora_alpha: 4, lora_dropout: 0.0, target_modules: [q_proj, v_proj]}}
    lr: 0.01
data:
  class_path: lightfed.data.text.ShakespeareCausalDataModule
  init_args:
    partitioner: {{class_path: lightfed.data.partition.Natural, init_args: {{min_size: 4, max_clients: 3}}}}
    model: {model}
    block_size: 32
    plays: [macbeth]
    held_out_speakers: 2
    test_subset: 16
strategy: FedITLoRA
trainer:
  rounds: 1
  clients_per_round: 3
  local_steps: 1
  batch_size: 4
  eval_batch_size: 16
  fed_eval_fraction: 0.0
  checkpoint_every: 1
  logger: false
  enable_progress_bar: false
  default_root_dir: {root}
"""


def test_fit_then_generate_from_the_checkpoint(tiny_llama: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    config = tmp_path / "c.yaml"
    config.write_text(CONFIG.format(model=tiny_llama, root=tmp_path / "run"))
    main(["fit", "--config", str(config)])
    ckpt = next((tmp_path / "run").rglob("last.ckpt"))
    capsys.readouterr()
    main(["generate", "--ckpt_path", str(ckpt), "--prompt", "To be", "--max_new_tokens", "5"])
    out = capsys.readouterr().out.strip().splitlines()
    assert len(out) == 1 and out[0].startswith("To be") and len(out[0]) > len("To be")


def test_generate_refuses_a_checkpoint_of_another_model(tmp_path: Path) -> None:
    with pytest.raises(SystemExit):
        main(["generate", "--ckpt_path", str(tmp_path / "missing.ckpt"), "--prompt", "x"])
