"""Timed runs through the trainer: determinism, the equivalence with untimed FedAvg, privacy refusals."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightfed import FederatedTrainer
from lightfed.privacy import DPFixedClipping
from lightfed.privacy.accounting import SamplingScheme, epsilon_for
from lightfed.simtime import BufferedAsync, DPCappedParticipation, RoundClock, SyncRounds, SyntheticTrace
from lightfed_zoo.strategies import FedBuff
from tests.conftest import BoringFederatedData, boring_model


def make_trainer(tmp_path: Path, **kwargs) -> FederatedTrainer:
    kwargs.setdefault("rounds", 4)
    kwargs.setdefault("clients_per_round", 3)
    kwargs.setdefault("batch_size", 8)
    kwargs.setdefault("local_steps", 2)
    return FederatedTrainer(
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        eval_every=2,
        fed_eval_fraction=0.0,
        checkpoint_every=0,
        **kwargs,
    )


def fedbuff_run(tmp_path: Path, seed: int = 0, **kwargs) -> FederatedTrainer:
    trainer = make_trainer(
        tmp_path,
        seed=seed,
        strategy=FedBuff(),
        clock=BufferedAsync(trace=SyntheticTrace(seed=0, online_fraction=0.6), concurrency=4),
        **kwargs,
    )
    trainer.fit(boring_model(), BoringFederatedData())
    return trainer


def test_fedbuff_run_is_bit_for_bit_reproducible_and_logs_virtual_time(tmp_path):
    a, b, c = fedbuff_run(tmp_path / "a"), fedbuff_run(tmp_path / "b"), fedbuff_run(tmp_path / "c", seed=1)

    assert torch.equal(a.global_params, b.global_params)
    assert [h["time/virtual_seconds"] for h in a.history] == [h["time/virtual_seconds"] for h in b.history]
    assert not torch.equal(a.global_params, c.global_params)
    times = [h["time/virtual_seconds"] for h in a.history]
    assert times == sorted(times) and times[0] > 0
    assert a.history[-1]["central/test_acc"] > 0.5


def test_wait_for_all_sync_rounds_keep_every_selected_client_on_an_always_online_trace(tmp_path):
    trainer = make_trainer(tmp_path, clock=SyncRounds(trace=SyntheticTrace(seed=0)))
    trainer.fit(boring_model(), BoringFederatedData())

    for h in trainer.history:
        assert h["time/selected"] == h["time/kept"] == h["round/updates"] == 3
        assert h["time/stragglers"] == 0 and h["time/partial"] == 0
        assert h["time/round_seconds"] > 0


def test_dp_per_flush_accounts_the_worst_clients_participations_without_amplification(tmp_path):
    privacy = DPCappedParticipation(clip_norm=0.5, noise_multiplier=1.0, max_participations=2, verbose=False)
    trainer = fedbuff_run(tmp_path, privacy=privacy)

    worst = int(max(privacy.participations.values()))
    assert 1 <= worst <= 2
    expected = epsilon_for(1.0, SamplingScheme("full", 3, 1.0, 3), worst, privacy.delta_used)
    assert trainer.history[-1]["privacy/epsilon"] == pytest.approx(expected)
    assert privacy.denominator == 3.0


def test_privacy_that_claims_amplification_is_refused_under_a_clock(tmp_path):
    trainer = make_trainer(
        tmp_path,
        strategy=FedBuff(),
        privacy=DPFixedClipping(noise_multiplier=1.0, verbose=False),
        clock=BufferedAsync(concurrency=4),
    )
    with pytest.raises(ValueError, match="amplification would not hold"):
        trainer.fit(boring_model(), BoringFederatedData())


def test_capped_dp_is_refused_with_epochs_or_without_an_enforcing_engine(tmp_path):
    def dp() -> DPCappedParticipation:
        return DPCappedParticipation(noise_multiplier=1.0, max_participations=2, verbose=False)

    epochs = make_trainer(
        tmp_path / "e", strategy=FedBuff(), privacy=dp(), clock=BufferedAsync(concurrency=4), local_steps=None
    )
    with pytest.raises(ValueError, match="set trainer.local_steps"):
        epochs.fit(boring_model(), BoringFederatedData())
    uncapped = make_trainer(tmp_path / "s", strategy=FedBuff(), privacy=dp(), clock=RoundClock())
    with pytest.raises(ValueError, match="does not"):
        uncapped.fit(boring_model(), BoringFederatedData())
    untimed = make_trainer(tmp_path / "u", strategy=FedBuff(), privacy=dp())
    with pytest.raises(ValueError, match="only an engine that enforces the cap"):
        untimed.fit(boring_model(), BoringFederatedData())


def test_the_engine_never_starts_a_visit_over_the_participation_cap(tmp_path):
    trainer = make_trainer(
        tmp_path, rounds=6, strategy=FedBuff(), clock=BufferedAsync(concurrency=4, max_participations=2)
    )
    trainer.fit(boring_model(), BoringFederatedData())

    assert max(trainer.clock.participations.values()) <= 2


def test_sync_rounds_under_dp_never_select_a_client_over_the_cap(tmp_path):
    privacy = DPCappedParticipation(clip_norm=0.5, noise_multiplier=1.0, max_participations=1, verbose=False)
    trainer = make_trainer(tmp_path, privacy=privacy, strategy=FedBuff(), clock=SyncRounds(), rounds=4)
    trainer.fit(boring_model(), BoringFederatedData())

    assert max(privacy.participations.values()) == 1 and len(privacy.participations) == 12
    assert trainer.history[-1]["privacy/epsilon"] == pytest.approx(
        epsilon_for(1.0, SamplingScheme("full", 3, 1.0, 3), 1, privacy.delta_used)
    )


def test_a_run_longer_than_the_participation_cap_allows_stops_with_a_clear_error(tmp_path):
    trainer = make_trainer(tmp_path, rounds=10, strategy=FedBuff(), clock=SyncRounds(max_participations=1))
    with pytest.raises(RuntimeError, match="max_participations=1 times"):
        trainer.fit(boring_model(), BoringFederatedData())


def test_tensorboard_gets_accuracy_against_virtual_seconds_and_the_figure(tmp_path):
    from lightning.pytorch.loggers import TensorBoardLogger
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    trainer = FederatedTrainer(
        rounds=4, clients_per_round=3, batch_size=8, local_steps=2, strategy=FedBuff(), eval_every=2,
        fed_eval_fraction=0.0, checkpoint_every=0, enable_progress_bar=False, default_root_dir=str(tmp_path),
        logger=TensorBoardLogger(str(tmp_path), name="tb"), clock=BufferedAsync(concurrency=4),
    )
    trainer.fit(boring_model(), BoringFederatedData())

    events = EventAccumulator(trainer.logger.log_dir)
    events.Reload()
    seconds = {e.step: e.value for e in events.Scalars("time/virtual_seconds")}
    by_time = [(e.step, e.value) for e in events.Scalars("time/test_acc")]
    assert [step for step, _ in by_time] == [int(seconds[1]), int(seconds[3])]
    assert [v for _, v in by_time] == pytest.approx([h["central/test_acc"] for h in trainer.history[1::2]])
    assert "time/curve" in events.Tags()["images"]


def test_capped_dp_refuses_a_delta_of_one_over_n_or_more(tmp_path):
    """BoringFederatedData has 12 clients: delta 0.1 >= 1/12 would allow publishing one client's data."""
    privacy = DPCappedParticipation(noise_multiplier=1.0, max_participations=2, delta=0.1, verbose=False)
    trainer = make_trainer(tmp_path, strategy=FedBuff(), privacy=privacy, clock=BufferedAsync(concurrency=4))
    with pytest.raises(ValueError, match="delta"):
        trainer.fit(boring_model(), BoringFederatedData())
