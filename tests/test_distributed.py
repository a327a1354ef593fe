"""Two processes (gloo) give the same global model as one process, and resume across rank counts."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from tests.test_cli import write_config

pytestmark = pytest.mark.distributed


def run_cli(args: list[str]) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    out = subprocess.run([sys.executable, "-m", "lightfed.cli", "fit", *args], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-3000:]


def weights(path: Path) -> dict[str, torch.Tensor]:
    return load_file(str(path / "global_model.safetensors"))


# ~50 s: slow. CI keeps two real 2-process runs (the quickstart's bits, private rounds) and the in-process
# rank compositions of tests/test_composition.py.
@pytest.mark.parametrize("strategy", [pytest.param("FedAvg", marks=pytest.mark.slow)])
def test_two_processes_equal_one_process_and_resume_across_rank_counts(tmp_path, strategy):
    cfg = write_config(tmp_path, logger=False, rounds=4, clients_per_round=7, checkpoint_every=2)
    run_cli(["--config", cfg, "--strategy", strategy, "--trainer.default_root_dir", str(tmp_path / "one")])
    run_cli(["--config", cfg, "--strategy", strategy, "--trainer.default_root_dir", str(tmp_path / "two"),
             "--trainer.devices", "2", "--trainer.fabric_strategy", "ddp"])
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    # every client's record is gathered to rank 0: the same table as one process writes
    table_one, table_two = (tmp_path / d / "clients.csv" for d in ("one", "two"))
    rows_one, rows_two = (table.read_text().splitlines() for table in (table_one, table_two))
    assert len(rows_one) == 1 + 4 * 7 and rows_two[0] == rows_one[0]  # a header, 4 rounds of 7 clients
    assert [r.split(",")[:5] for r in rows_two] == [r.split(",")[:5] for r in rows_one]
    for k in a:  # exact, order-free round sums: the same bits on two processes as on one
        assert torch.equal(a[k], b[k]), k
    # rounds 0-1 on two processes, then resume rounds 2-3 on one process
    run_cli(["--config", cfg, "--strategy", strategy, "--trainer.default_root_dir", str(tmp_path / "mixed"),
             "--ckpt_path", str(tmp_path / "two" / "checkpoints" / "round-00002.ckpt")])
    c = weights(tmp_path / "mixed")
    for k in a:
        torch.testing.assert_close(a[k], c[k], atol=1e-6, rtol=0)


REPO = Path(__file__).resolve().parents[1]


def test_two_process_example_config_equals_the_quickstart(tmp_path):
    """experiments/digits_fedavg_2proc.yaml is the quickstart on two ranks: the same global model."""
    import yaml

    config = yaml.safe_load((REPO / "experiments" / "digits_fedavg_2proc.yaml").read_text())
    assert config["trainer"]["devices"] == 2 and config["trainer"]["fabric_strategy"] == "ddp"
    short = ["--trainer.rounds", "2", "--trainer.fed_eval_fraction", "0.0", "--trainer.logger", "false"]
    run_cli(["--config", str(REPO / "experiments" / "digits_fedavg.yaml"), *short,
             "--trainer.default_root_dir", str(tmp_path / "one")])
    run_cli(["--config", str(REPO / "experiments" / "digits_fedavg_2proc.yaml"), *short,
             "--trainer.default_root_dir", str(tmp_path / "two")])
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    assert a.keys() == b.keys()
    # every client's record is gathered to rank 0: the same table as one process writes
    table_one, table_two = (tmp_path / d / "clients.csv" for d in ("one", "two"))
    rows_one, rows_two = (table.read_text().splitlines() for table in (table_one, table_two))
    assert len(rows_one) == 1 + 2 * 10 and rows_two[0] == rows_one[0]  # a header, 2 rounds of 10 clients
    assert [r.split(",")[:5] for r in rows_two] == [r.split(",")[:5] for r in rows_one]
    for k in a:  # exact, order-free round sums: the same bits on two processes as on one
        assert torch.equal(a[k], b[k]), k


@pytest.mark.parametrize("privacy", ["DPAdaptiveClipping", pytest.param("LocalDP", marks=pytest.mark.slow)])
def test_private_rounds_on_two_processes_equal_one(tmp_path, privacy):
    """Issue 11, finding 2, on real gloo processes: adaptive clipping's clip and LocalDP's accounting are the
    same on two processes as on one (they used to be counted on each rank's shard), and so is the model."""
    config = REPO / "experiments" / "digits_dp_adaptive_eps3.yaml"
    extra = ["--trainer.rounds", "3", "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
             "--trainer.eval_every", "3", "--trainer.checkpoint_every", "0", "--privacy.init_args.initial_clip", "1000"]
    if privacy == "LocalDP":
        extra += ["--privacy", "lightfed.privacy.LocalDP", "--privacy.init_args.target_epsilon", "20",
                  "--privacy.init_args.clip_norm", "1.0"]
        extra = [e for e in extra if e not in ("--privacy.init_args.initial_clip", "1000")]
    run_cli(["--config", str(config), *extra, "--trainer.default_root_dir", str(tmp_path / "one")])
    run_cli(["--config", str(config), *extra, "--trainer.default_root_dir", str(tmp_path / "two"),
             "--trainer.devices", "2", "--trainer.fabric_strategy", "ddp"])
    a, b = weights(tmp_path / "one"), weights(tmp_path / "two")
    for k in a:
        torch.testing.assert_close(a[k], b[k], atol=1e-6, rtol=1e-6)  # float32 sums in another order
    ha = torch.load(tmp_path / "one" / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["history"]
    hb = torch.load(tmp_path / "two" / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["history"]
    for ra, rb in zip(ha, hb):
        for key in ("privacy/epsilon", "privacy/clip_norm", "privacy/next_clip_norm", "privacy/unclipped_fraction"):
            if key in ra:
                assert ra[key] == pytest.approx(rb[key], rel=1e-9, abs=1e-12), key
