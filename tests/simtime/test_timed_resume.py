"""Resuming a timed run: the clock is in the checkpoint, so stop-and-resume equals an uninterrupted run.

Prepare: an uninterrupted run of 4 rounds, and a run of 2 rounds resumed for 2 more from its checkpoint.
Assert: the same final model bit for bit, the same per-round virtual times and policy counts (the event order),
and the same final clock state (pending events, kept versions' weights, participation counts).
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lightfed import integrity
from lightfed.simtime import BufferedAsync, DPCappedParticipation, SyncRounds, SyntheticTrace
from lightfed_zoo.strategies import FedBuff
from tests.conftest import BoringFederatedData, boring_model
from tests.simtime.test_timed_trainer import make_trainer

#: Wall-clock metrics differ between two runs of the same schedule, and the stopped run also evaluated its
#: last round; everything else must be equal.
SKIP = ("round/seconds", "round/eval", "central/")


def trace() -> SyntheticTrace:
    return SyntheticTrace(seed=0, online_fraction=0.6, compute_sigma=1.5)


def sync_clock() -> SyncRounds:
    return SyncRounds(trace=trace(), deadline=30.0, over_selection=1.5, stragglers="partial")


def buffered_clock(**kwargs) -> BufferedAsync:
    return BufferedAsync(trace=trace(), concurrency=4, **kwargs)


def run(tmp_path: Path, rounds: int, clock, ckpt: Path | None = None, **kwargs):
    kwargs.setdefault("strategy", FedBuff())
    trainer = make_trainer(tmp_path, rounds=rounds, clock=clock, **kwargs)
    trainer.fit(boring_model(), BoringFederatedData(), ckpt_path=str(ckpt) if ckpt else None)
    return trainer


def schedule(trainer) -> list[dict[str, float]]:
    return [{k: v for k, v in h.items() if not k.startswith(SKIP)} for h in trainer.history]


def assert_same_run(whole, resumed) -> None:
    assert torch.equal(whole.global_params, resumed.global_params)
    assert schedule(whole) == schedule(resumed)
    clock_digest = [integrity.digest({"clock": t.clock.state_dict()}) for t in (whole, resumed)]
    assert clock_digest[0] == clock_digest[1]


def test_sync_rounds_with_deadline_and_over_selection_resume_bit_for_bit(tmp_path):
    whole = run(tmp_path / "whole", 4, sync_clock())
    half = run(tmp_path / "half", 2, sync_clock())
    resumed = run(tmp_path / "resumed", 4, sync_clock(), half.last_checkpoint)

    assert_same_run(whole, resumed)
    assert any(h["time/selected"] > h["time/kept"] for h in whole.history)  # over-selection cut someone


def test_fedbuff_resumes_with_visits_in_flight_from_their_stale_versions(tmp_path):
    whole = run(tmp_path / "whole", 5, buffered_clock())
    half = run(tmp_path / "half", 3, buffered_clock())
    state = torch.load(half.last_checkpoint, weights_only=True)["clock"]
    resumed = run(tmp_path / "resumed", 5, buffered_clock(), half.last_checkpoint)

    assert len(state["clock"]["events"]) == 4  # the C visits in flight travel in the checkpoint
    assert state["snapshots"] and min(state["snapshots"]) < state["version"]  # a stale version is kept
    assert_same_run(whole, resumed)
    assert max(h["time/staleness_max"] for h in whole.history) > 0


def test_capped_dp_resumes_with_its_participation_counts_and_the_same_noise(tmp_path):
    def dp() -> DPCappedParticipation:
        return DPCappedParticipation(clip_norm=0.5, noise_multiplier=1.0, max_participations=3, verbose=False)

    whole = run(tmp_path / "whole", 5, buffered_clock(), privacy=dp())
    half = run(tmp_path / "half", 3, buffered_clock(), privacy=dp())
    resumed = run(tmp_path / "resumed", 5, buffered_clock(), half.last_checkpoint, privacy=dp())

    assert_same_run(whole, resumed)
    assert resumed.privacy.participations == whole.privacy.participations
    assert resumed.clock.participations == whole.clock.participations
    assert max(resumed.clock.participations.values()) <= 3
    assert resumed.history[-1]["privacy/epsilon"] == whole.history[-1]["privacy/epsilon"]


def test_a_resume_with_another_clock_setting_is_refused_naming_the_field(tmp_path):
    half = run(tmp_path / "half", 2, buffered_clock())
    with pytest.raises(ValueError, match=r"trainer.clock.init_args.concurrency=4, this run has 5") as err:
        run(tmp_path / "other", 4, BufferedAsync(trace=trace(), concurrency=5), half.last_checkpoint)
    assert "\n" not in str(err.value)
    with pytest.raises(ValueError, match=r"trainer.clock.init_args.trace.init_args.compute_sigma=1.5, this run has 1.0"):
        run(tmp_path / "trace", 4, BufferedAsync(concurrency=4), half.last_checkpoint)


def test_the_clock_state_is_covered_by_the_integrity_hash(tmp_path):
    half = run(tmp_path / "half", 2, buffered_clock())
    state = torch.load(half.last_checkpoint, weights_only=True)
    state["clock"]["clock"]["now"] += 1.0  # an edited virtual time
    edited = tmp_path / "edited.ckpt"
    torch.save(state, edited)

    with pytest.raises(ValueError, match="is corrupted"):
        run(tmp_path / "resumed", 4, buffered_clock(), edited)


def test_timed_and_untimed_checkpoints_do_not_cross(tmp_path):
    timed = run(tmp_path / "timed", 2, buffered_clock())
    untimed = run(tmp_path / "untimed", 2, None)

    with pytest.raises(ValueError, match="written by a timed run"):
        run(tmp_path / "a", 4, None, timed.last_checkpoint)
    with pytest.raises(ValueError, match="holds no virtual clock"):
        run(tmp_path / "b", 4, buffered_clock(), untimed.last_checkpoint)
