"""The bundled image classifiers."""

from __future__ import annotations

from pathlib import Path

import lightning as L
import torch
from safetensors.torch import load_file

from lightfed import FederatedTrainer
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import IID
from lightfed.models import CNNClassifier


def _cnn(channels_last: bool) -> CNNClassifier:
    L.seed_everything(3, verbose=False)
    return CNNClassifier(in_channels=1, image_size=8, width=4, hidden=16, lr=0.05, channels_last=channels_last)


def test_channels_last_stores_nhwc_weights_with_the_same_values() -> None:
    a, b = _cnn(False), _cnn(True)
    conv_a, conv_b = a.features[4].weight, b.features[4].weight  # 4 input channels (with 1, NCHW == NHWC)
    assert conv_a.is_contiguous() and not conv_b.is_contiguous()
    assert conv_b.is_contiguous(memory_format=torch.channels_last)
    for (name, p), (_, q) in zip(a.state_dict().items(), b.state_dict().items()):
        assert torch.equal(p, q), name


def test_channels_last_trains_to_the_same_global_model(tmp_path: Path) -> None:
    """Two federated rounds: NHWC convolutions change only float rounding; the export is a plain state dict."""
    out = {}
    for cl in (False, True):
        trainer = FederatedTrainer(
            rounds=2, clients_per_round=4, batch_size=16, logger=False, enable_progress_bar=False,
            fed_eval_fraction=0.0, checkpoint_every=0, default_root_dir=str(tmp_path / str(cl)),
        )
        trainer.fit(_cnn(cl), DigitsDataModule(IID(num_clients=20), val_fraction=0.0, flatten=False))
        out[cl] = (trainer.global_params, load_file(str(tmp_path / str(cl) / "global_model.safetensors")))
    torch.testing.assert_close(out[True][0], out[False][0], rtol=0, atol=1e-5)
    initial = torch.cat([p.detach().reshape(-1) for p in _cnn(False).parameters()])
    assert float((out[True][0] - initial).abs().max()) > 1e-3  # the rounds trained something
    for k, v in out[False][1].items():
        torch.testing.assert_close(out[True][1][k], v, rtol=0, atol=1e-5)


def test_channels_last_example_config_runs(tmp_path: Path) -> None:
    import subprocess
    import sys

    import yaml

    config = Path(__file__).resolve().parents[2] / "experiments" / "digits_cnn_channels_last.yaml"
    assert yaml.safe_load(config.read_text())["model"]["init_args"]["channels_last"] is True
    proc = subprocess.run(
        [sys.executable, "-m", "lightfed.cli", "fit", "--config", str(config), "--trainer.rounds", "2",
         "--trainer.logger", "false", "--trainer.default_root_dir", str(tmp_path)],
        capture_output=True, text=True, timeout=300,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    weights = load_file(str(tmp_path / "global_model.safetensors"))
    assert weights["features.4.weight"].shape == (32, 16, 3, 3)
