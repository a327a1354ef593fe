"""A causal LM's FedIT round on two processes (gloo) gives the adapters one process gives: what
benchmarks/llm_processes.py times."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = [pytest.mark.distributed, pytest.mark.slow]  # two CLI runs: about a minute, minutes under load

CONFIG = Path(__file__).resolve().parents[2] / "experiments" / "shakespeare_causal_lora.yaml"


def test_two_processes_train_the_same_adapters_as_one(tiny_llama: Path, tmp_path: Path) -> None:
    common = ["--model.init_args.model", str(tiny_llama), "--data.init_args.model", str(tiny_llama),
              "--data.init_args.partitioner.init_args.max_clients", "4", "--data.init_args.test_subset", "4",
              "--trainer.clients_per_round", "4", "--trainer.rounds", "2", "--trainer.local_steps", "1",
              "--trainer.callbacks=[]", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    for name, extra in (("one", []), ("two", ["--trainer.devices", "2", "--trainer.fabric_strategy", "ddp"])):
        command = [sys.executable, "-m", "lightfed.cli", "fit", "--config", str(CONFIG), *common, *extra,
                   "--trainer.default_root_dir", str(tmp_path / name)]
        out = subprocess.run(command, capture_output=True, text=True, env=env, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
    one, two = (load_file(str(tmp_path / d / "global_model.safetensors")) for d in ("one", "two"))
    assert one.keys() == two.keys() and any("lora_B" in k for k in one)
    for k in one:  # exact, order-free round sums: the same bits on two processes as on one
        assert torch.equal(one[k], two[k]), k
