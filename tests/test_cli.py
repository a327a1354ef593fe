"""The ``lightfed`` command: LightningCLI configs, overrides, plugin listing, bad input."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import lightning as L
import pytest
import torch
import yaml

from lightfed.cli import LightFedCLI, main

CONFIG = {
    "seed_everything": 0,
    "model": {"class_path": "lightfed.models.MLPClassifier", "init_args": {"in_features": 64, "hidden": [16], "lr": 0.1}},
    "data": {
        "class_path": "lightfed.data.datasets.DigitsDataModule",
        "init_args": {"partitioner": {"class_path": "lightfed.data.partition.IID", "init_args": {"num_clients": 20}}},
    },
    "strategy": "FedAvg",
    "trainer": {"rounds": 2, "clients_per_round": 4, "enable_progress_bar": False, "fed_eval_fraction": 0.0},
}


def write_config(tmp_path: Path, **trainer) -> str:
    cfg = yaml.safe_load(yaml.safe_dump(CONFIG))
    cfg["trainer"].update(default_root_dir=str(tmp_path), **trainer)
    path = tmp_path / "config.yaml"
    path.write_text(yaml.safe_dump(cfg))
    return str(path)


def test_fit_from_yaml_writes_logs_checkpoint_and_model(tmp_path):
    cli = LightFedCLI(args=["fit", "--config", write_config(tmp_path), "--trainer.rounds", "3"])
    trainer = cli.trainer
    assert trainer.rounds == 3 and len(trainer.history) == 3
    log_dir = trainer.log_dir
    assert log_dir.parent.name == "config"  # the run is named after its config file (config.yaml)
    assert (log_dir / "checkpoints" / "last.ckpt").is_file()
    assert (log_dir / "global_model.safetensors").is_file()
    saved = (log_dir / "config.yaml").read_text()
    assert "rounds: 3" in saved and "subcommand" not in saved
    events = list(log_dir.glob("events.out.tfevents.*"))
    assert events, "TensorBoard event file missing"
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(log_dir))
    acc.Reload()
    tags = acc.Tags()["scalars"]
    for tag in ("central/test_acc", "client/loss_mean", "round/update_norm", "round/bytes_up_per_client", "round/seconds"):
        assert tag in tags
    assert [e.step for e in acc.Scalars("round/seconds")] == [0, 1, 2]


def test_resume_through_cli(tmp_path):
    cfg = write_config(tmp_path, logger=False)
    first = LightFedCLI(args=["fit", "--config", cfg])
    ckpt = first.trainer.last_checkpoint
    resumed = LightFedCLI(args=["fit", "--config", cfg, "--trainer.rounds", "4", "--ckpt_path", str(ckpt),
                                "--trainer.default_root_dir", str(tmp_path / "r")])
    straight = LightFedCLI(args=["fit", "--config", cfg, "--trainer.rounds", "4",
                                 "--trainer.default_root_dir", str(tmp_path / "s")])
    assert torch.equal(resumed.trainer.global_params, straight.trainer.global_params)


def test_strategy_by_name_case_insensitive_and_unknown_name_lists_registered(tmp_path):
    cfg = write_config(tmp_path, logger=False, rounds=1)
    cli = LightFedCLI(args=["fit", "--config", cfg, "--strategy", "fedavg"])
    assert type(cli.trainer.strategy).__name__ == "FedAvg"
    with pytest.raises(ValueError, match=r"unknown strategy 'FedNope'; registered: .*FedAvg"):
        LightFedCLI(args=["fit", "--config", cfg, "--strategy", "FedNope"])


def test_strategy_init_args_validated_from_type_hints(tmp_path):
    cfg = write_config(tmp_path, logger=False, rounds=1)
    cli = LightFedCLI(args=["fit", "--config", cfg, "--strategy", "lightfed.FedAvg", "--strategy.server_lr", "0.5"])
    assert cli.trainer.strategy.server_lr == 0.5
    with pytest.raises(SystemExit):
        LightFedCLI(args=["fit", "--config", cfg, "--strategy", "lightfed.FedAvg", "--strategy.server_lr", "fast"])


@pytest.mark.parametrize(
    ("override", "message"),
    [
        (["--trainer.clients_per_round", "50"], "clients_per_round=50 but the data has only 20 clients"),
        (["--trainer.rounds", "0"], "trainer.rounds must be >= 1"),
        (["--trainer.init_checkpoint", "/nonexistent/w.ckpt"], "does not exist"),
    ],
)
def test_bad_input_fails_before_training_with_the_field(tmp_path, override, message):
    cfg = write_config(tmp_path, logger=False)
    with pytest.raises((ValueError, FileNotFoundError), match=message):
        LightFedCLI(args=["fit", "--config", cfg, *override])
    assert not (tmp_path / "checkpoints").exists()


def test_mismatching_init_checkpoint_lists_keys(tmp_path):
    torch.save({"net.1.weight": torch.zeros(16, 64), "bogus.weight": torch.zeros(2)}, tmp_path / "bad.pt")
    cfg = write_config(tmp_path, logger=False, init_checkpoint=str(tmp_path / "bad.pt"))
    with pytest.raises(ValueError, match=r"missing keys \['net.1.bias'.*unexpected keys \['bogus.weight'\]"):
        LightFedCLI(args=["fit", "--config", cfg])


def test_missing_resume_checkpoint(tmp_path):
    cfg = write_config(tmp_path, logger=False)
    with pytest.raises(FileNotFoundError, match="--ckpt_path"):
        LightFedCLI(args=["fit", "--config", cfg, "--ckpt_path", str(tmp_path / "nope.ckpt")])


def test_print_config_round_trips(tmp_path, capsys):
    cfg = write_config(tmp_path)
    with pytest.raises(SystemExit):
        LightFedCLI(args=["fit", "--config", cfg, "--print_config"])
    printed = yaml.safe_load(capsys.readouterr().out)
    assert printed["trainer"]["rounds"] == 2
    assert printed["strategy"]["class_path"].endswith("FedAvg")
    assert printed["data"]["init_args"]["partitioner"]["init_args"]["num_clients"] == 20


def test_strategies_command_lists_fedavg_with_origin(capsys):
    main(["strategies"])
    out = capsys.readouterr().out
    assert "FedAvg" in out and "Federated Averaging" in out and "lightfed.strategy" in out


def test_data_command_prints_statistics_and_plots(tmp_path, capsys):
    main(["data", "--config", write_config(tmp_path)])
    out = capsys.readouterr().out
    assert "20" in out and (tmp_path / "partition.png").stat().st_size > 1000


def test_console_script_help_runs():
    out = subprocess.run([sys.executable, "-m", "lightfed.cli", "fit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--trainer.rounds" in out.stdout and "--strategy" in out.stdout
    text = " ".join(out.stdout.split())  # argparse wraps the help text
    for own in ("lightfed.models.vision.MLPClassifier", "lightfed.models.vision.CNNClassifier",
                "lightfed.models.charlm.CharLSTM", "lightfed.data.datasets.DigitsDataModule",
                "lightfed.data.text.ShakespeareCharDataModule"):
        assert own in text, own


# ---- a CLI that speaks plainly -------------------------------------------------------------------------


def run_main(args: list[str], capsys) -> tuple[int, str, str]:
    with pytest.raises(SystemExit) as exit_info:
        main(args)
    out, err = capsys.readouterr()
    return exit_info.value.code, out, err


def error_lines(err: str) -> list[str]:
    """stderr without the lines other libraries print on their own (Lightning's ``Seed set to 0``)."""
    return [line for line in err.splitlines() if line.strip() and not line.startswith("Seed set")]


@pytest.mark.parametrize(
    ("mutate", "override", "expected"),
    [
        # jsonargparse validation: an unknown key, a value of the wrong type, a missing file
        (lambda c: c["trainer"].update(roundz=3), [], "does not accept option 'trainer.roundz'. Did you mean 'trainer.rounds'?"),
        (lambda c: None, ["--trainer.roundz", "3"], "Did you mean --trainer.rounds?"),
        (lambda c: None, ["--trainer.rounds", "fast"], "trainer.rounds: expected int, got 'fast'."),
        (lambda c: c.update(strategy={"class_path": "FedProx", "init_args": {"muu": 1}}), [],
         "strategy: lightfed_zoo.strategies.FedProx: Option 'muu' is not accepted. Did you mean 'mu'?"),
        # a plugin's __init__ raising inside jsonargparse (reported by it as a failed Union): the plugin's own text
        (lambda c: c.update(strategy={"class_path": "FedProx", "init_args": {"mu": -1.0}}), [],
         "FedProx mu must be >= 0 (0 is FedAvg), got -1.0 (`strategy.init_args.mu`)."),
        (lambda c: c["trainer"].update(sampler={"class_path": "lightfed.PoissonSampler", "init_args": {"sampling_rate": 2.0}}), [],
         "PoissonSampler sampling_rate must be in (0, 1], got 2.0."),
        # lightfed's checks while the run is set up: ValueError and FileNotFoundError
        (lambda c: c.update(strategy="FedNope"), [], "unknown strategy 'FedNope'; registered: "),
        (lambda c: c["trainer"].update(clients_per_round=50), [], "clients_per_round=50 but the data has only 20 clients"),
        (lambda c: c["trainer"].update(init_checkpoint="/nonexistent/w.ckpt"), [], "checkpoint '/nonexistent/w.ckpt' does not exist"),
    ],
    ids=["unknown-key", "unknown-flag", "wrong-type", "unknown-init-arg", "plugin-init", "sampler-init", "unknown-name",
         "setup-check", "missing-file"],
)
def test_config_error_is_one_line_and_exit_status_2(tmp_path, capsys, monkeypatch, mutate, override, expected):
    # Prepare
    monkeypatch.delenv("LIGHTFED_TRACEBACK", raising=False)
    cfg = yaml.safe_load(Path(write_config(tmp_path, logger=False)).read_text())
    mutate(cfg)
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    # Execute
    code, _, err = run_main(["fit", "--config", str(tmp_path / "config.yaml"), *override], capsys)
    # Assert
    lines = error_lines(err)
    assert code == 2
    assert len(lines) == 1, err
    assert lines[0].startswith("lightfed: error: ") and expected in lines[0]
    assert not (tmp_path / "checkpoints").exists()


def test_traceback_env_var_shows_the_exception(tmp_path, monkeypatch):
    monkeypatch.setenv("LIGHTFED_TRACEBACK", "1")
    with pytest.raises(ValueError, match="clients_per_round=50 but the data has only 20 clients"):
        main(["fit", "--config", write_config(tmp_path, logger=False, clients_per_round=50)])


def test_a_crash_keeps_its_traceback():
    from lightfed.cli import is_config_error

    with pytest.raises(TypeError) as crash:  # raised by torch, not by a check of lightfed's
        torch.zeros(2) + "x"
    assert not is_config_error(crash.value)


def test_console_script_config_error_is_one_line(tmp_path):
    cfg = write_config(tmp_path, logger=False, clients_per_round=50)
    out = subprocess.run([sys.executable, "-m", "lightfed.cli", "fit", "--config", cfg],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert error_lines(out.stderr) == [
        "lightfed: error: clients_per_round=50 but the data has only 20 clients; lower `trainer.clients_per_round`, "
        "or raise the partitioner's client count (`data.init_args.partitioner.init_args.num_clients`)."
    ]


@pytest.mark.parametrize("args", [["--help"], [], ["-h"]])
def test_top_level_help_lists_every_subcommand(capsys, args):
    if args:
        main(args)
        out = capsys.readouterr().out
    else:
        code, out, _ = run_main(args, capsys)
        assert code == 2
    listed = [line.split()[0] for line in out.split("commands:\n")[1].splitlines() if line.startswith("  ")]
    assert listed == ["fit", "test", "data", "strategies", "central", "new-strategy", "audit", "generate"]


def test_unknown_command_is_one_line(capsys):
    code, _, err = run_main(["fitt", "--config", "x.yaml"], capsys)
    assert code == 2 and error_lines(err) == [
        "lightfed: error: unknown command 'fitt'; the commands are fit, test, data, strategies, central, new-strategy, audit, generate. "
        "Did you mean 'fit'?"
    ]


def test_central_config_error_is_one_line(tmp_path, capsys):
    code, _, err = run_main(["central", "fit", "--trainer.max_epochz", "1"], capsys)
    assert code == 2 and len(error_lines(err)) == 1 and "Did you mean --trainer.max_epochs?" in err, err


def test_strategies_lists_every_executor_in_a_fresh_process():
    # a fresh interpreter: nothing else has imported lightfed.executors, which registers vmap
    out = subprocess.run([sys.executable, "-m", "lightfed.cli", "strategies"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0
    executors = out.stdout.split("lightfed.executors:")[1]
    assert "sequential" in executors and "vmap" in executors


def test_a_run_whose_rounds_all_fail_exits_1_with_one_line(tmp_path):
    """Issue 16: every update NaN (here: a learning rate that diverges at once) must not end with exit 0."""
    import subprocess
    import sys

    cfg = write_config(tmp_path, logger=False, rounds=2)
    out = subprocess.run(
        [sys.executable, "-m", "lightfed.cli", "fit", "--config", cfg, "--trainer.default_root_dir", str(tmp_path / "r"),
         "--model.init_args.lr", "1e30", "--trainer.max_failed_rounds", "2"],
        capture_output=True, text=True, timeout=300,
    )
    assert out.returncode == 1, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lightfed: error: ") and "released no client update" in last
    assert "Traceback" not in out.stderr
    assert not (tmp_path / "r" / "global_model.safetensors").exists()


# ---- issue 13: cheap commands, test from a checkpoint alone, a data command that builds no model ---------


def test_help_and_new_strategy_do_not_import_lightning_or_torch(tmp_path):
    code = (
        "import sys; from lightfed.cli import main; main(['--help']); "
        f"main(['new-strategy', 'Cheap', '--dir', {str(tmp_path)!r}]); "
        "print('heavy:', sorted(m for m in ('lightning', 'torch') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "heavy: []" in out.stdout


def test_import_lightfed_is_lazy_and_keeps_its_public_names():
    code = (
        "import sys, lightfed; print(sorted(m for m in ('lightning', 'torch') if m in sys.modules)); "
        "print(lightfed.Callback.__module__, lightfed.FederatedTrainer.__module__, len(lightfed.__all__))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    first, second = out.stdout.splitlines()
    assert first == "[]" and second == "lightfed.callbacks lightfed.trainer 31", out.stderr
    import lightfed

    assert all(getattr(lightfed, name) is not None for name in lightfed.__all__)


def test_test_command_reads_the_config_from_the_checkpoint(tmp_path, capsys):
    # Prepare: a run, then a checkpoint alone (the config file is gone)
    cfg = write_config(tmp_path, logger=False)
    ckpt = LightFedCLI(args=["fit", "--config", cfg]).trainer.last_checkpoint
    Path(cfg).unlink()
    # Execute
    main(["test", "--ckpt_path", str(ckpt)])
    # Assert: evaluated without error; no --config was needed
    assert "lightfed: error" not in capsys.readouterr().err


def test_test_command_without_config_names_what_to_give(tmp_path, capsys):
    torch.save({"state_dict": {}}, tmp_path / "plain.ckpt")
    code, _, err = run_main(["test", "--ckpt_path", str(tmp_path / "plain.ckpt")], capsys)
    assert code == 2 and "holds no config (not written by `lightfed fit`); give the run's config too" in err


class ModelThatMustNotBeBuilt(L.LightningModule):
    """Stands for a model whose construction loads pretrained weights."""

    def __init__(self, size: int = 1) -> None:
        raise RuntimeError("lightfed data built the model")


def test_data_command_builds_no_model_and_draws_every_client(tmp_path, capsys):
    cfg = yaml.safe_load(Path(write_config(tmp_path)).read_text())
    cfg["model"] = {"class_path": "tests.test_cli.ModelThatMustNotBeBuilt", "init_args": {"size": 2}}
    (tmp_path / "config.yaml").write_text(yaml.safe_dump(cfg))
    main(["data", "--config", str(tmp_path / "config.yaml")])
    out = capsys.readouterr().out
    assert "partition heatmap (20 clients, sorted)" in out and (tmp_path / "partition.png").stat().st_size > 1000
    assert "tag data/partition" in out


def test_trainer_flags_of_lightning_reach_the_client_loop(tmp_path):
    """gradient_clip_val, gradient_clip_algorithm and accumulate_grad_batches are trainer options of a config."""
    from lightfed.cli import LightFedCLI

    cfg = write_config(tmp_path, logger=False, rounds=1, gradient_clip_val=0.5, accumulate_grad_batches=2)
    cli = LightFedCLI(args=["--config", cfg], run=False)
    assert cli.trainer.loop_flags == {"gradient_clip_val": 0.5, "gradient_clip_algorithm": "norm", "accumulate_grad_batches": 2}
    cli.trainer.fit(cli.model, cli.datamodule)
    assert (cli.trainer.local.gradient_clip_val, cli.trainer.local.accumulate_grad_batches) == (0.5, 2)


def test_audit_is_a_command():
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-m", "lightfed.cli", "audit", "--help"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "--ckpt_path" in out.stdout


def test_listing_plugins_does_not_import_lightning():
    """Issue 13: `lightfed strategies` does not pay for Lightning (it lists the registries' entries)."""
    import subprocess
    import sys

    code = "import sys, lightfed.cli as c; c.print_plugins(); print('LIGHTNING', 'lightning' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "vmap" in out.stdout and "OneShotCanary" in out.stdout and "LIGHTNING False" in out.stdout
