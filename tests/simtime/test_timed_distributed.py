"""Timed runs on two processes (gloo) equal one process: the same event order and the same model bits.

Every rank runs the same clock; a round's (or flush's) clients train at positions ``rank::2`` and the round
server sums them with the exact all-reduce. Prepare: the example configs, shortened; Execute: one process and
two; Assert: ``torch.equal`` on every exported tensor and equal per-round virtual times and policy counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

pytestmark = pytest.mark.distributed

REPO = Path(__file__).resolve().parents[2]
SHORT = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.fed_eval_fraction", "0.0",
         "--trainer.checkpoint_every", "0"]
TWO = ["--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.fabric_strategy", "ddp"]


def fit(config: str, root: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightfed.cli", "fit", "--config", str(REPO / "experiments" / config), *SHORT,
           "--trainer.default_root_dir", str(root), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]


def schedule(root: Path) -> list[dict[str, float]]:
    history = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["history"]
    return [{k: v for k, v in h.items() if k.startswith(("time/", "privacy/", "round/updates"))} for h in history]


def assert_one_equals_two(tmp_path: Path, config: str, *args: str) -> None:
    fit(config, tmp_path / "one", *args, "--trainer.devices", "1")
    fit(config, tmp_path / "two", *args, *TWO)
    a, b = (load_file(str(tmp_path / d / "global_model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert schedule(tmp_path / "one") == schedule(tmp_path / "two")


@pytest.mark.slow
def test_fedbuff_on_two_processes_equals_one(tmp_path):
    """FedBuff with visits training from stale versions on both ranks (57 s on the shared 2 cores: slow)."""
    assert_one_equals_two(tmp_path, "time_fedbuff.yaml", "--trainer.rounds", "6", "--trainer.eval_every", "6")


@pytest.mark.slow
def test_sync_rounds_with_deadline_on_two_processes_equal_one(tmp_path):
    assert_one_equals_two(tmp_path, "time_deadline.yaml", "--trainer.rounds", "4", "--trainer.eval_every", "4")


@pytest.mark.slow
def test_fedbuff_with_capped_dp_on_two_processes_equals_one_noise_included(tmp_path):
    assert_one_equals_two(tmp_path, "time_fedbuff_dp.yaml", "--trainer.rounds", "6", "--trainer.eval_every", "6")


@pytest.mark.slow
def test_the_two_process_example_config_equals_time_fedbuff(tmp_path):
    args = ["--trainer.rounds", "3", "--trainer.eval_every", "3"]
    fit("time_fedbuff.yaml", tmp_path / "one", *args)
    fit("time_fedbuff_2proc.yaml", tmp_path / "two", *args)
    a, b = (load_file(str(tmp_path / d / "global_model.safetensors")) for d in ("one", "two"))
    assert all(torch.equal(a[k], b[k]) for k in a)
