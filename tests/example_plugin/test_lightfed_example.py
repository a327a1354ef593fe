"""Tests of the example plugin, as its author would write them: hand-computed values, then one short run.

``lightfed``'s own suite runs them too; this directory (the package root) is on ``sys.path`` under pytest.
"""

from __future__ import annotations

import lightning as L
import pytest
import torch
from lightfed_example.strategies import FedMeanClip

from lightfed import STRATEGIES, ClientUpdate, FederatedTrainer, RoundAggregate
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import IID
from lightfed.models import MLPClassifier


def test_mean_step_is_clipped_to_max_norm():
    # Prepare: weighted sums of [3, 0] (n=1) and [3, 8] (n=3): mean = [3, 6], norm sqrt(45)
    s = FedMeanClip(max_norm=1.5)
    weights = [s.client_weight(ClientUpdate(0, torch.zeros(2), 1)), s.client_weight(ClientUpdate(1, torch.zeros(2), 3))]
    agg = RoundAggregate(torch.tensor([3.0 * 1 + 3.0 * 3, 0.0 * 1 + 8.0 * 3]), sum(weights), 2)
    # Execute
    out = s.aggregate(torch.tensor([1.0, 1.0]), agg, 0)
    # Assert: [3, 6] * 1.5 / sqrt(45) = [1.5 / sqrt(5), 3 / sqrt(5)]
    torch.testing.assert_close(out, torch.tensor([1.0 + 1.5 / 5**0.5, 1.0 + 3.0 / 5**0.5]))
    assert s.state_dict() == {"clipped_rounds": 1}


def test_small_steps_pass_unchanged_and_state_round_trips():
    s = FedMeanClip(max_norm=10.0, weighted=False)
    agg = RoundAggregate(torch.tensor([2.0, 2.0]), 2.0, 2)
    torch.testing.assert_close(s.aggregate(torch.zeros(2), agg, 0), torch.tensor([1.0, 1.0]))
    restored = FedMeanClip()
    restored.load_state_dict({"clipped_rounds": 4})
    assert restored.clipped_rounds == 4


def test_bad_max_norm_is_refused():
    with pytest.raises(ValueError, match="max_norm must be > 0"):
        FedMeanClip(max_norm=0.0)


def test_registered_and_trains(tmp_path):
    assert STRATEGIES.get("fedmeanclip").__name__ == "FedMeanClip"
    L.seed_everything(0)
    trainer = FederatedTrainer(
        rounds=3, clients_per_round=4, strategy=FedMeanClip(max_norm=0.05), local_steps=3, batch_size=32,
        fed_eval_fraction=0.0, logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path),
    )
    history = trainer.fit(MLPClassifier(hidden=[16], lr=0.3), DigitsDataModule(IID(num_clients=8)))
    assert all(row["round/update_norm"] == pytest.approx(0.05, rel=1e-4) for row in history)
    assert trainer.strategy.state_dict() == {"clipped_rounds": 3}
