"""The LEAF character LSTM: scoring rules checked by hand, and two federated rounds on the plays."""

from __future__ import annotations

import math
from pathlib import Path

import lightning as L
import pytest
import torch
import torch.nn.functional as F

from lightfed import FederatedTrainer
from lightfed.client import LogCapture
from lightfed.data.partition import Natural
from lightfed.data.text import IGNORE_INDEX, VOCAB_SIZE, ShakespeareCharDataModule
from lightfed.models.charlm import CharLSTM


def small(**kwargs) -> CharLSTM:
    L.seed_everything(0, verbose=False)
    kwargs.setdefault("hidden", 16)
    return CharLSTM(**kwargs)


def test_leaf_defaults_and_shapes() -> None:
    model = CharLSTM()
    # LEAF: embedding 8, two LSTM layers of 256, linear to the vocabulary
    lstm = 4 * 256 * (8 + 256 + 2) + 4 * 256 * (256 + 256 + 2)
    assert sum(p.numel() for p in model.parameters()) == VOCAB_SIZE * 8 + lstm + 256 * VOCAB_SIZE + VOCAB_SIZE
    assert model(torch.zeros(3, 80, dtype=torch.long)).shape == (3, 80, VOCAB_SIZE)


def test_loss_and_accuracy_score_only_real_targets() -> None:
    model = small()
    x = torch.randint(0, 80, (2, 5))
    y = torch.randint(0, 80, (2, 5))
    y[1, 3:] = IGNORE_INDEX
    logits = model(x)
    keep = y != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], y[keep])
    with LogCapture().attach(model):
        assert torch.allclose(model.training_step((x, y), 0), expected)
        # one LEAF sample per row when y is a vector: only the last position is scored
        last = torch.tensor([3, 7])
        assert torch.allclose(model.training_step((x, last), 0), F.cross_entropy(logits[:, -1], last))


def test_accuracy_is_micro_averaged_over_scored_characters() -> None:
    model = small()
    x = torch.randint(0, 80, (3, 4))
    with torch.no_grad():
        pred = model(x).argmax(-1)
    y1 = pred.clone()  # batch 1: 12 scored characters, all right
    y2 = torch.full_like(pred, IGNORE_INDEX)
    y2[0, 0] = (pred[0, 0] + 1) % VOCAB_SIZE  # batch 2: 1 scored character, wrong
    capture = LogCapture()
    with capture.attach(model), torch.no_grad():
        model.test_step((x, y1), 0)
        model.test_step((x, y2), 1)
    assert capture.results()["test_acc"] == pytest.approx(12 / 13)  # not (1 + 0) / 2


def test_bad_optimizer() -> None:
    with pytest.raises(ValueError, match="model.optimizer"):
        CharLSTM(optimizer="rmsprop")


def test_two_federated_rounds_on_the_plays(tmp_path: Path) -> None:
    dm = ShakespeareCharDataModule(
        Natural(min_size=5, max_clients=8), plays=["macbeth"], seq_len=20, test_stride=20, test_subset=200
    )
    model = small(hidden=32, embed_dim=8)
    n_params = sum(p.numel() for p in model.parameters())
    trainer = FederatedTrainer(
        rounds=2, clients_per_round=4, local_steps=15, batch_size=8, logger=False, enable_progress_bar=False,
        default_root_dir=str(tmp_path), fed_eval_fraction=0.5, checkpoint_every=0,
    )
    history = trainer.fit(model, dm)
    assert dm.num_clients == 8
    assert [h["round/bytes_up_per_client"] for h in history] == [4.0 * n_params] * 2
    last = history[-1]
    # from uniform guessing (log 82 = 4.41 nats) the model learns the character frequencies within 2 x 15 steps
    assert last["central/test_loss"] < math.log(VOCAB_SIZE) - 0.5
    assert 0.0 <= last["central/test_acc"] <= 1.0 and 0.0 <= last["federated/val_acc_mean"] <= 1.0
    assert history[1]["client/loss_mean"] < history[0]["client/loss_mean"]
