"""`lightfed central`: the centralised baseline, and pretrain-then-federate from the configs end to end."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
import torch

from lightfed import baseline
from lightfed.checkpoint import load_into, load_state_dict_file
from lightfed.cli import LightFedCLI
from lightfed.models import MLPClassifier
from tests.test_cli import CONFIG

DIGITS = """
seed_everything: 0
model:
  class_path: lightfed.models.MLPClassifier
  init_args: {{in_features: 64, hidden: [32], lr: 0.1, momentum: 0.9}}
data:
  class_path: lightfed.data.datasets.DigitsDataModule
  init_args:
    partitioner: {{class_path: lightfed.data.partition.IID, init_args: {{num_clients: 5}}}}
    batch_size: 32
trainer:
  max_epochs: 3
  accelerator: cpu
  logger: false
  enable_progress_bar: false
  enable_model_summary: false
  default_root_dir: {root}
"""


def reported(out: str) -> dict[str, float]:
    line = next(ln for ln in out.splitlines() if ln.startswith("centralised baseline"))
    return {k: float(v) for k, v in re.findall(r"(\w+)=([0-9.]+)", line)}


def test_central_fit_exports_the_model_and_reports_the_baseline(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    cfg = tmp_path / "digits.yaml"
    cfg.write_text(DIGITS.format(root=tmp_path))
    baseline.main(["fit", "--config", str(cfg)])
    out = capsys.readouterr().out
    exported = tmp_path / "model.safetensors"
    assert f"model weights: {exported}" in out and exported.is_file()
    assert "Lightning checkpoint: " in out
    metrics = reported(out)
    assert metrics["test_acc"] > 0.85
    # the exported weights are the model that scored: recompute its accuracy by hand
    model = MLPClassifier(in_features=64, hidden=[32])
    load_into(model, load_state_dict_file(exported))
    from lightfed.data.datasets import DigitsDataModule
    from lightfed.data.partition import IID

    dm = DigitsDataModule(IID(num_clients=5))
    dm.setup()
    x, y = dm.arrays.test
    with torch.no_grad():
        acc = float((model(x).argmax(-1) == y).float().mean())
    assert acc == pytest.approx(metrics["test_acc"], abs=1e-4)
    # `lightfed central test --ckpt_path <printed checkpoint>` scores the same model
    ckpt = next(ln for ln in out.splitlines() if ln.startswith("Lightning checkpoint: ")).split(": ", 1)[1]
    cli = baseline.CentralCLI(args=["test", "--config", str(cfg), "--ckpt_path", ckpt])
    assert float(cli.trainer.callback_metrics["test_acc"]) == pytest.approx(metrics["test_acc"], abs=1e-4)


def test_central_export_path_and_bad_init_checkpoint(tmp_path: Path) -> None:
    cfg = tmp_path / "digits.yaml"
    cfg.write_text(DIGITS.format(root=tmp_path))
    target = tmp_path / "elsewhere" / "weights.pt"
    baseline.main(["fit", "--config", str(cfg), "--trainer.max_epochs", "1", "--export", str(target)])
    assert set(load_state_dict_file(target)) == set(MLPClassifier(in_features=64, hidden=[32]).state_dict())
    with pytest.raises(FileNotFoundError, match="init_checkpoint"):
        missing = str(tmp_path / "missing.safetensors")
        baseline.main(["fit", "--config", str(cfg), "--init_checkpoint", missing])


def test_pretrain_on_fashion_then_federate_on_animals(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """experiments/pretrain_fashion.yaml -> model.safetensors -> experiments/animal_head.yaml, on a tiny budget."""
    small = ["--model.init_args.width", "8", "--model.init_args.hidden", "32"]
    baseline.main([
        "fit", "--config", "experiments/pretrain_fashion.yaml", *small,
        "--data.init_args.train_subset", "1500", "--trainer.max_epochs", "2",
        "--trainer.default_root_dir", str(tmp_path / "pretrain"), "--trainer.enable_progress_bar", "false",
    ])
    out = capsys.readouterr().out
    pretrained_path = tmp_path / "pretrain" / "model.safetensors"
    assert f"model weights: {pretrained_path}" in out
    assert reported(out)["test_acc"] > 0.4  # 1,500 Fashion-MNIST images, two epochs: well above chance (0.1)
    pretrained = load_state_dict_file(pretrained_path)

    cli = LightFedCLI(args=[
        "fit", "--config", "experiments/animal_head.yaml", *small,
        "--trainer.init_checkpoint", str(pretrained_path), "--trainer.rounds", "2",
        "--trainer.clients_per_round", "3", "--trainer.local_steps", "3", "--trainer.fed_eval_fraction", "0",
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.default_root_dir", str(tmp_path / "federate"),
    ])
    trainer, model = cli.trainer, cli.model
    # only the head travels, ...
    assert all(n.startswith("head.") for n in trainer.spec.names)
    head_numel = sum(p.numel() for n, p in model.named_parameters() if n.startswith("head."))
    assert trainer.history[-1]["round/bytes_up_per_client"] == 4 * head_numel
    # ... the pretrained features arrive untouched and stay bit-identical, the new last layer does not
    trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
    final = model.state_dict()
    assert all(torch.equal(final[k], pretrained[k]) for k in pretrained if k.startswith("features."))
    assert not torch.equal(final["head.3.weight"], pretrained["head.3.weight"])
    assert not torch.equal(final["head.1.weight"], pretrained["head.1.weight"])  # fine-tuned
    assert 0.0 <= trainer.history[-1]["central/test_acc"] <= 1.0

    # the centralised baseline of the same fine-tuning: same checkpoint, same trainable head, pooled data
    baseline.main([
        "fit", "--config", "experiments/animal_central.yaml", *small,
        "--init_checkpoint", str(pretrained_path), "--trainer.max_steps", "20",
        "--trainer.default_root_dir", str(tmp_path / "baseline"), "--trainer.enable_progress_bar", "false",
        "--trainer.logger", "false",
    ])
    out = capsys.readouterr().out
    head_params = f"training {head_numel:,} parameters"
    assert head_params in out
    tuned = load_state_dict_file(tmp_path / "baseline" / "model.safetensors")
    assert all(torch.equal(tuned[k], pretrained[k]) for k in pretrained if k.startswith("features."))
    assert not torch.equal(tuned["head.1.weight"], pretrained["head.1.weight"])


# ---- the baseline of a federated config ------------------------------------------------------------------

FEDERATED = {  # the CLI tests' federated config, with the trainer settings these tests translate
    **CONFIG,
    "privacy": None,
    "trainer": {"rounds": 4, "clients_per_round": 5, "local_epochs": 1, "batch_size": 8, "eval_every": 2,
                "fed_eval_fraction": 0.0, "enable_progress_bar": False, "checkpoint_every": 0},
}


def test_federated_config_translates_to_its_baseline():
    # Execute
    config, ignored = baseline.federated_to_central(FEDERATED, "experiments/digits_fedavg.yaml")
    # Assert: federated-only sections dropped and named, schedule kept for the round clock, clients' batch size
    assert "strategy" not in config and "privacy" not in config and ignored == ["strategy", "trainer.fed_eval_fraction", "trainer.checkpoint_every"]
    assert config["federated"] == {"rounds": 4, "clients_per_round": 5, "local_epochs": 1, "batch_size": 8,
                                   "eval_every": 2, "name": "digits_fedavg"}
    assert config["trainer"] == {"enable_progress_bar": False, "max_epochs": -1}
    assert config["data"]["init_args"]["batch_size"] == 8
    assert baseline.is_federated(FEDERATED) and not baseline.is_federated({"trainer": {"max_epochs": 3}})


def test_central_fit_reads_a_federated_config_and_logs_the_federated_tags_and_steps(tmp_path, capsys):
    """Issue 13: `lightfed central fit --config experiments/digits_fedavg.yaml` works and overlays in TensorBoard."""
    import yaml
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    from lightfed.cli import main

    # Prepare: the federated run's config, as `lightfed fit` takes it
    cfg = tmp_path / "digits_fed.yaml"
    cfg.write_text(yaml.safe_dump({**FEDERATED, "trainer": {**FEDERATED["trainer"], "default_root_dir": str(tmp_path)}}))
    fed = LightFedCLI(args=["fit", "--config", str(cfg)]).trainer
    # Execute
    main(["central", "fit", "--config", str(cfg), "--trainer.enable_model_summary", "false"])
    out, err = capsys.readouterr()
    # Assert: the baseline ran for the federated run's work, logged next to it under the same tags and steps
    assert "is a federated config; training its centralised baseline (ignored: strategy" in err
    assert reported(out)["test_acc"] > 0.5
    runs = {p.parent.parent.name: p.parent for p in tmp_path.glob("*/version_0/events.*")}
    assert set(runs) == {"digits_fed", "digits_fed_central"}
    steps = {}
    for name, folder in runs.items():
        acc = EventAccumulator(str(folder))
        acc.Reload()
        steps[name] = [e.step for e in acc.Scalars("central/test_acc")]
    assert steps["digits_fed"] == steps["digits_fed_central"] == [1, 3]
    assert fed.rounds == 4


def test_central_config_error_suggests_a_lightning_trainer_key(tmp_path, capsys):
    from lightfed.cli import main

    cfg = tmp_path / "c.yaml"
    cfg.write_text(DIGITS.format(root=tmp_path).replace("max_epochs: 3", "max_epochz: 3"))
    with pytest.raises(SystemExit) as exit_info:
        main(["central", "fit", "--config", str(cfg)])
    err = capsys.readouterr().err
    assert exit_info.value.code == 2 and "Did you mean 'trainer.max_epochs'?" in err, err
