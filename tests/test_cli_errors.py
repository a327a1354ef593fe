"""One line, never a traceback: unreadable checkpoints, unwritable folders, a full disk, Ctrl-C (issue 24)."""

from __future__ import annotations

import errno
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from lightfed.callbacks import Callback
from lightfed.cli import main
from lightfed.cli_errors import report
from tests.test_cli import error_lines, run_main, write_config


@pytest.fixture(autouse=True)
def _no_traceback_env(monkeypatch):
    monkeypatch.delenv("LIGHTFED_TRACEBACK", raising=False)


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory) -> Path:
    """The checkpoint of a 2-round run (logger off), shared by the tests that need a real file."""
    root = tmp_path_factory.mktemp("run")
    main(["fit", "--config", write_config(root, logger=False), "--trainer.default_root_dir", str(root / "out")])
    return root / "out" / "checkpoints" / "last.ckpt"


def one_line(err: str) -> str:
    lines = error_lines(err)
    assert len(lines) == 1, err
    return lines[0]


# ---- a checkpoint that cannot be read ------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_test_command_with_an_unreadable_checkpoint_is_one_line(tmp_path, capsys, finished_run, damage):
    # Prepare
    bad = tmp_path / "bad.ckpt"
    data = finished_run.read_bytes()
    bad.write_bytes(data[: len(data) // 2] if damage == "truncated" else b"#!/bin/sh\necho not a checkpoint\n" * 40)
    # Execute
    code, _, err = run_main(["test", "--ckpt_path", str(bad)], capsys)
    # Assert
    assert code == 2
    line = one_line(err)
    assert line.startswith(f"lightfed: error: --ckpt_path '{bad}' is not a readable checkpoint")
    assert "last.ckpt" in line


def test_fit_resuming_a_truncated_checkpoint_is_one_line(tmp_path, capsys, finished_run):
    # LightningCLI's own _parse_ckpt_path reads --ckpt_path before lightfed: it must not crash there
    bad = tmp_path / "trunc.ckpt"
    bad.write_bytes(finished_run.read_bytes()[:3000])
    cfg = write_config(tmp_path, logger=False)
    code, _, err = run_main(["fit", "--config", cfg, "--trainer.rounds", "4", "--ckpt_path", str(bad),
                             "--trainer.default_root_dir", str(tmp_path / "r")], capsys)
    assert code == 2 and "is not a readable checkpoint (truncated" in one_line(err)


def test_unreadable_checkpoint_through_the_console_script(tmp_path):
    """``python -m lightfed.cli`` runs cli.py as ``__main__``: its own checks are still config errors."""
    bad = tmp_path / "garbage.ckpt"
    bad.write_bytes(b"garbage" * 100)
    out = subprocess.run([sys.executable, "-m", "lightfed.cli", "test", "--ckpt_path", str(bad)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert one_line(out.stderr).startswith("lightfed: error: --ckpt_path")


# ---- folders that cannot be written, a full disk ------------------------------------------------------


@pytest.mark.parametrize("logger", [False, True])
@pytest.mark.parametrize("resume", [False, True])
def test_read_only_run_directory_is_refused_before_training(tmp_path, capsys, monkeypatch, finished_run, logger, resume):
    # Prepare: the folder reads as read-only (os.access is what a read-only mount answers, root included)
    import lightfed.cli_lightning as cl

    root = tmp_path / "ro"
    root.mkdir()
    access = cl.os.access
    monkeypatch.setattr(cl.os, "access", lambda path, mode, **kw: not str(path).startswith(str(root))
                        and access(path, mode, **kw))
    cfg = write_config(tmp_path, logger=logger)
    extra = ["--trainer.rounds", "3", "--ckpt_path", str(finished_run)] if resume else []
    # Execute
    code, _, err = run_main(["fit", "--config", cfg, "--trainer.default_root_dir", str(root / "run"), *extra], capsys)
    # Assert
    assert code == 2
    assert one_line(err) == (f"lightfed: error: trainer.default_root_dir '{root / 'run'}' cannot be written "
                             f"('{root}' is read-only); point trainer.default_root_dir at a writable folder.")
    assert list(root.iterdir()) == []


def test_disk_full_during_the_final_export_is_one_line_with_the_checkpoint(tmp_path, capsys, monkeypatch):
    # Prepare: the export's write fails as a full disk does
    import lightfed.checkpoint as ckpt_io

    def full(module, path):
        raise OSError(errno.ENOSPC, "No space left on device", str(path))

    monkeypatch.setattr(ckpt_io, "export_state_dict", full)
    cfg = write_config(tmp_path, logger=False)
    # Execute
    code, _, err = run_main(["fit", "--config", cfg], capsys)
    # Assert: exit 1 (the run failed), the file, the fix, the checkpoint that holds the finished rounds
    line = one_line(err)
    assert code == 1
    assert line.startswith(f"lightfed: error: cannot write '{tmp_path / 'global_model.safetensors'}': No space left "
                           f"on device. Free space on that disk")
    assert f"The checkpoint '{tmp_path / 'checkpoints' / 'round-00002.ckpt'}' holds round 2: resume with" in line


def test_read_only_peft_directory_is_one_line(tmp_path, capsys, monkeypatch):
    from lightfed.trainer import FederatedTrainer

    def read_only(self, *args):
        raise PermissionError(errno.EACCES, "Permission denied", str(self.log_dir / "peft" / "adapter"))

    monkeypatch.setattr(FederatedTrainer, "_export_adapters", read_only)
    code, _, err = run_main(["fit", "--config", write_config(tmp_path, logger=False)], capsys)
    line = one_line(err)
    assert code == 1
    assert line.startswith(f"lightfed: error: cannot write '{tmp_path / 'peft' / 'adapter'}': Permission denied. "
                           f"Make it writable, or point trainer.default_root_dir at a writable folder.")


def test_an_error_that_is_not_a_write_keeps_its_traceback():
    try:
        raise OSError(errno.ECONNRESET, "Connection reset")
    except OSError as err:
        assert report(err, "fit", []) is None


def test_out_of_memory_is_one_line():
    status, line = report(MemoryError("Unable to allocate 53.2 GiB"), "fit", [])
    assert status == 1 and line.startswith("lightfed: error: out of memory (Unable to allocate 53.2 GiB). Lower")
    assert "trainer.rounds" in line


def test_dp_run_of_a_billion_rounds_is_refused_up_front(tmp_path, capsys):
    cfg = yaml.safe_load(Path(write_config(tmp_path, logger=False)).read_text())
    cfg["privacy"] = {"class_path": "lightfed.privacy.DPFixedClipping", "init_args": {"clip_norm": 1.0, "noise_multiplier": 1.0}}
    cfg["strategy"] = {"class_path": "lightfed.strategy.FedAvg", "init_args": {"weighted": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(["fit", "--config", str(tmp_path / "config.yaml"), "--trainer.rounds", "1000000000"], capsys)
    assert code == 2
    assert one_line(err).startswith("lightfed: error: trainer.rounds=1000000000 with a privacy mechanism")


# ---- Ctrl-C ----------------------------------------------------------------------------------------------


class InterruptAt(Callback):
    """Presses Ctrl-C at the start of round ``at`` (0-based)."""

    def __init__(self, at: int = 3) -> None:
        self.at = at

    def on_round_start(self, trainer, round_idx, cohort) -> None:
        if round_idx == self.at:
            raise KeyboardInterrupt


def test_ctrl_c_names_the_round_and_the_resume_command_and_exits_130(tmp_path, capsys):
    # Prepare
    cfg = yaml.safe_load(Path(write_config(tmp_path, logger=False, rounds=5, checkpoint_every=2)).read_text())
    cfg["trainer"]["callbacks"] = [{"class_path": "tests.test_cli_errors.InterruptAt", "init_args": {"at": 3}}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    args = ["fit", "--config", str(tmp_path / "config.yaml")]
    # Execute
    code, _, err = run_main(args, capsys)
    # Assert
    ckpt = tmp_path / "checkpoints" / "round-00002.ckpt"
    assert code == 130
    assert one_line(err) == (
        f"lightfed: interrupted: stopped in round 4 of 5 (3 complete); the checkpoint '{ckpt}' holds round 2: "
        f"resume with `lightfed fit --config {tmp_path / 'config.yaml'} --ckpt_path {ckpt}`"
    )
    assert not (tmp_path / ".lightfed.lock").exists()  # the folder is free for the resume
    # and the command it prints resumes the run (without the interrupting callback)
    resume = re.search(r"`lightfed (.*)`", err)[1].split()
    cfg["trainer"]["callbacks"] = []
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    main(resume)
    assert (tmp_path / "global_model.safetensors").is_file()


def test_ctrl_c_before_any_checkpoint_says_the_run_starts_over(tmp_path, capsys):
    cfg = yaml.safe_load(Path(write_config(tmp_path, logger=False, rounds=5, checkpoint_every=0)).read_text())
    cfg["trainer"]["callbacks"] = [{"class_path": "tests.test_cli_errors.InterruptAt", "init_args": {"at": 1}}]
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    code, _, err = run_main(["fit", "--config", str(tmp_path / "config.yaml")], capsys)
    assert code == 130
    assert one_line(err).startswith("lightfed: interrupted: stopped in round 2 of 5 (1 complete); no checkpoint was "
                                    "written yet (trainer.checkpoint_every=0)")


# ---- arguments -------------------------------------------------------------------------------------------


def test_abbreviated_option_is_refused_not_taken_for_another(tmp_path, capsys):
    code, _, err = run_main(["fit", "--config", write_config(tmp_path, logger=False), "--trainer.round", "5"], capsys)
    assert code == 2 and "Did you mean --trainer.rounds?" in one_line(err)
    assert not (tmp_path / "checkpoints").exists()


def test_new_strategy_into_a_missing_folder_is_one_line(tmp_path, capsys):
    code, _, err = run_main(["new-strategy", "GeoMedX", "--dir", str(tmp_path / "missing" / "deeper")], capsys)
    assert code == 2
    assert one_line(err) == (f"lightfed: error: --dir '{tmp_path / 'missing' / 'deeper'}' is not an existing folder; "
                             f"create it first (mkdir -p) or fix the path.")
    assert not (tmp_path / "missing").exists()


def test_new_strategy_into_a_file_is_one_line(tmp_path, capsys):
    (tmp_path / "afile").write_text("x")
    code, _, err = run_main(["new-strategy", "GeoMedX", "--dir", str(tmp_path / "afile")], capsys)
    assert code == 2 and "is not an existing folder" in one_line(err)



# ---- errors that point the right way ---------------------------------------------------------------------


@pytest.mark.parametrize(
    ("override", "expected"),
    [
        (["--model.class_path", "lightfed.models.MLPClasifier"],
         "model: lightfed.models.MLPClasifier: module 'lightfed.models' has no attribute 'MLPClasifier'. "
         "Did you mean 'lightfed.models.MLPClassifier'?"),
        (["--strategy.class_path", "lightfed.strategy.FedAvgg"], "Did you mean 'lightfed.strategy.FedAvg'?"),
        (["--strategy.class_path", "FedProxx"], "strategy: Expected a dot import path string: FedProxx. Did you mean 'FedProx'?"),
        (["--strategy", "FedProxx"], "Did you mean 'FedProx'?"),
        (["--privacy.class_path", "lightfed.privacy.DPFixedClip"], "Did you mean 'lightfed.privacy.DPFixedClipping'?"),
    ],
    ids=["model", "dotted-strategy", "short-strategy", "registered-name", "privacy"],
)
def test_class_path_typo_names_the_field_and_the_closest_class(tmp_path, capsys, override, expected):
    code, _, err = run_main(["fit", "--config", write_config(tmp_path, logger=False), *override], capsys)
    line = one_line(err)
    assert code == 2 and expected in line
    assert line.startswith("lightfed: error: unknown strategy") or line.split(": ")[2] in ("model", "strategy", "privacy")


def test_too_many_clients_names_the_real_field(tmp_path, capsys):
    code, _, err = run_main(["fit", "--config", write_config(tmp_path, logger=False), "--trainer.clients_per_round",
                             "30", "--data.init_args.partitioner.init_args.num_clients", "20"], capsys)
    assert code == 2 and "`data.init_args.partitioner.init_args.num_clients`" in one_line(err)
    # the field it names exists: raising it makes the same command run
    (tmp_path / "ok").mkdir()
    main(["fit", "--config", write_config(tmp_path / "ok", logger=False), "--trainer.clients_per_round", "30",
          "--data.init_args.partitioner.init_args.num_clients", "30", "--trainer.rounds", "1"])


def test_dp_resume_with_more_rounds_is_not_told_to_change_rounds(tmp_path, capsys):
    # Prepare: a 2-round DP run calibrated by target_epsilon
    cfg = yaml.safe_load(Path(write_config(tmp_path, logger=False)).read_text())
    cfg["privacy"] = {"class_path": "lightfed.privacy.DPFixedClipping", "init_args": {"clip_norm": 1.0, "target_epsilon": 8.0}}
    cfg["strategy"] = {"class_path": "lightfed.strategy.FedAvg", "init_args": {"weighted": False}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    main(["fit", "--config", str(tmp_path / "config.yaml")])
    # Execute: resume it for more rounds
    code, _, err = run_main(["fit", "--config", str(tmp_path / "config.yaml"), "--trainer.rounds", "4",
                             "--ckpt_path", str(tmp_path / "checkpoints" / "last.ckpt"),
                             "--trainer.default_root_dir", str(tmp_path / "r")], capsys)
    # Assert
    line = one_line(err)
    assert code == 2 and "trainer.rounds (the noise was calibrated for the planned rounds" in line
    assert "changing only: evaluation, logging and checkpoint settings." in line and "only: rounds" not in line
    assert "privacy.init_args.noise_multiplier" in line


# ---- TensorBoard: one run, one folder, one step convention ----------------------------------------------


def test_resume_continues_in_the_runs_own_version_folder_with_round_index_steps(tmp_path):
    """Steps are the 0-based index of the round that produced the value (round 1 logs at step 0), in every
    tag; a resume from the run's own checkpoints writes into the same version_N, so each curve continues."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    # Prepare: 2 rounds with TensorBoard, then resume to 4 from its last.ckpt
    cfg = write_config(tmp_path, logger=True, rounds=2, checkpoint_every=1, eval_every=1)
    main(["fit", "--config", cfg])
    run = tmp_path / "config" / "version_0"
    # Execute
    main(["fit", "--config", cfg, "--trainer.rounds", "4", "--ckpt_path", str(run / "checkpoints" / "last.ckpt")])
    # Assert
    assert sorted(p.name for p in (tmp_path / "config").iterdir()) == ["version_0"]
    assert (run / "checkpoints" / "round-00004.ckpt").is_file() and (run / "global_model.safetensors").is_file()
    acc = EventAccumulator(str(run))
    acc.Reload()
    per_round = [t for t in acc.Tags()["scalars"] if not t.startswith(("final/", "best/"))]  # summaries: hparams
    assert {"round/seconds", "client/loss_mean", "central/test_acc"} <= set(per_round)
    for tag in per_round:
        assert [e.step for e in acc.Scalars(tag)] == [0, 1, 2, 3], tag


def test_quiet_by_default_and_verbose_on_request(tmp_path, finished_run):
    """No "Seed set", no "resuming ... changed settings: ckpt_path" around `lightfed test`'s two result lines."""
    import os

    cmd = [sys.executable, "-m", "lightfed.cli", "test", "--ckpt_path", str(finished_run)]
    env = {k: v for k, v in os.environ.items() if k != "LIGHTFED_VERBOSE"}
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0 and out.stderr.strip() == "", out.stderr
    assert [line.split(":")[0] for line in out.stdout.splitlines()] == ["central/test_loss", "central/test_acc"]
    loud = subprocess.run(cmd, capture_output=True, text=True, timeout=120, env={**env, "LIGHTFED_VERBOSE": "1"})
    assert "Seed set to 0" in loud.stderr
