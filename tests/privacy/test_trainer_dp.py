"""Client-level DP inside the round loop: epsilon per round, the max_epsilon stop, checkpoint resume."""

from __future__ import annotations

import lightning as L
import pytest
import torch

from lightfed import FederatedTrainer, PoissonSampler
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import IID
from lightfed.models import MLPClassifier
from lightfed.privacy import DPAdaptiveClipping, DPFixedClipping
from lightfed.privacy.accounting import SamplingScheme, default_delta, epsilon_for
from lightfed.strategy import FedAvg

NUM_CLIENTS, RATE, Z = 40, 0.25, 1.0


def fit(tmp_path, mech, rounds: int, ckpt_path: str | None = None, sub: str = "run") -> FederatedTrainer:
    L.seed_everything(0)
    trainer = FederatedTrainer(
        rounds=rounds, sampler=PoissonSampler(RATE), strategy=FedAvg(weighted=False), privacy=mech,
        logger=False, enable_progress_bar=False, default_root_dir=str(tmp_path / sub), fed_eval_fraction=0.0,
        eval_every=100, checkpoint_every=0, batch_size=8,
    )
    trainer.fit(MLPClassifier(lr=0.1), DigitsDataModule(IID(num_clients=NUM_CLIENTS)), ckpt_path=ckpt_path)
    return trainer


def expected_eps(rounds: int) -> float:
    scheme = SamplingScheme("poisson", NUM_CLIENTS, RATE)
    return epsilon_for(Z, scheme, rounds, default_delta(NUM_CLIENTS))


def test_epsilon_logged_each_round_equals_dp_accounting(tmp_path, capsys):
    trainer = fit(tmp_path, DPFixedClipping(clip_norm=0.5, noise_multiplier=Z), rounds=2)
    plan = capsys.readouterr().out
    assert "Poisson sampling, q=0.25" in plan and "default 1/N^1.1" in plan and "PLD" in plan
    eps = [row["privacy/epsilon"] for row in trainer.history]
    assert eps == pytest.approx([expected_eps(1), expected_eps(2)], rel=1e-9)
    assert trainer.history[0]["privacy/delta"] == pytest.approx(NUM_CLIENTS**-1.1)
    assert torch.isfinite(trainer.global_params).all()


def test_max_epsilon_stops_before_the_round_that_would_exceed_it(tmp_path):
    budget = (expected_eps(2) + expected_eps(3)) / 2
    trainer = fit(tmp_path, DPFixedClipping(noise_multiplier=Z, max_epsilon=budget, verbose=False), rounds=5)
    assert len(trainer.history) == 2 and trainer.round_idx == 2
    assert trainer.history[-1]["privacy/epsilon"] <= budget < expected_eps(3)
    state = torch.load(trainer.last_checkpoint, weights_only=True)
    assert state["progress"]["round"] == 2 and state["privacy"]["accountant"]["rounds"] == 2


def test_resume_neither_resets_nor_double_counts(tmp_path):
    first = fit(tmp_path, DPAdaptiveClipping(noise_multiplier=Z, clipped_count_stddev=2.0, verbose=False), rounds=2, sub="a")
    clip_after_2 = first.privacy.clip
    resumed = fit(
        tmp_path, DPAdaptiveClipping(noise_multiplier=Z, clipped_count_stddev=2.0, verbose=False), rounds=3,
        ckpt_path=str(first.last_checkpoint), sub="b",
    )
    assert [r["privacy/epsilon"] for r in resumed.history] == pytest.approx([expected_eps(t) for t in (1, 2, 3)], rel=1e-9)
    assert resumed.privacy.accountant.rounds == 3
    assert resumed.history[2]["privacy/clip_norm"] == pytest.approx(clip_after_2)  # the clip carried over
    with pytest.raises(ValueError, match="noise_multiplier"):
        fit(tmp_path, DPAdaptiveClipping(noise_multiplier=2 * Z, clipped_count_stddev=2.0, verbose=False), rounds=3,
            ckpt_path=str(first.last_checkpoint), sub="c")


def test_weighted_estimator_gets_the_population_weight_from_the_trainer(tmp_path):
    mech = DPFixedClipping(noise_multiplier=Z, weighted_estimator=True, weight_cap=30.0, verbose=False)
    L.seed_everything(0)
    trainer = FederatedTrainer(
        rounds=1, sampler=PoissonSampler(RATE), strategy=FedAvg(weighted=True), privacy=mech, logger=False,
        enable_progress_bar=False, default_root_dir=str(tmp_path), fed_eval_fraction=0.0, checkpoint_every=0,
    )
    dm = DigitsDataModule(IID(num_clients=NUM_CLIENTS))
    trainer.fit(MLPClassifier(lr=0.1), dm)
    sizes = dm.client_num_examples().tolist()  # ~28-29 examples: some weights are capped below 1
    assert any(n < 30 for n in sizes)
    assert mech.denominator == pytest.approx(RATE * sum(min(n / 30.0, 1.0) for n in sizes))
