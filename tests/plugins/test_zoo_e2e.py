"""Every registered strategy end to end: a FederatedTrainer run on tiny digits, then an exact resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightfed import FederatedTrainer
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import IID, Dirichlet
from lightfed.models import MLPClassifier
from lightfed.registry import STRATEGIES

CHANCE_LOSS = 2.302  # ln(10): the central test loss of a model that has learnt nothing


def run(name: str, root: str, rounds: int = 4, ckpt_path: str | None = None, **kwargs) -> FederatedTrainer:
    L.seed_everything(0)
    model = MLPClassifier(hidden=[32], lr=0.3)
    data = DigitsDataModule(IID(num_clients=10))
    trainer = FederatedTrainer(
        rounds=rounds, clients_per_round=7, strategy=name, local_steps=5, batch_size=32, eval_every=rounds,
        checkpoint_every=2, fed_eval_fraction=0.0, logger=False, enable_progress_bar=False, default_root_dir=root,
        **kwargs,
    )
    trainer.fit(model, data, ckpt_path=ckpt_path)
    return trainer


@pytest.mark.parametrize("name", STRATEGIES.names())
def test_trains_on_digits_and_resumes_exactly(name, tmp_path):
    full = run(name, str(tmp_path / "full"))
    last = full.history[-1]
    assert last["round/updates"] == 7.0 and last["round/rejected"] == 0.0
    assert last["central/test_loss"] < CHANCE_LOSS - 0.1, last  # it learnt something in 4 short rounds
    assert last["central/test_acc"] > 0.3, last
    resumed = run(name, str(tmp_path / "resumed"), ckpt_path=str(tmp_path / "full" / "checkpoints" / "round-00002.ckpt"))
    assert resumed.round_idx == 4 and len(resumed.history) == 4
    assert torch.equal(resumed.global_params, full.global_params)
    torch.testing.assert_close(resumed.strategy.state_dict(), full.strategy.state_dict(), rtol=0, atol=0)
    torch.testing.assert_close(resumed.client_states, full.client_states, rtol=0, atol=0)
    assert resumed.history[-1]["central/test_acc"] == last["central/test_acc"]


def test_ditto_personal_models_beat_the_global_model_on_skewed_clients(tmp_path):
    L.seed_everything(0)
    data = DigitsDataModule(Dirichlet(num_clients=8, alpha=0.1, min_size=8))
    trainer = FederatedTrainer(
        rounds=4, clients_per_round=8, strategy="Ditto", local_steps=5, batch_size=32, fed_eval_fraction=1.0,
        checkpoint_every=0, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
    )
    history = trainer.fit(MLPClassifier(hidden=[32], lr=0.3), data)
    personal = history[-1]["federated/val_acc_mean"]
    assert len(trainer.client_states) == 8 and all("personal" in s for s in trainer.client_states.values())
    global_accs = [
        trainer.local.evaluate(data.client_val(c), trainer.global_params, "val")["val_acc"]
        for c in range(8) if len(data.client_val(c))
    ]
    assert personal > sum(global_accs) / len(global_accs) + 0.1, (personal, global_accs)
