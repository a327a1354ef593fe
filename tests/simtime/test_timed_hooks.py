"""Callbacks and per-client state in timed rounds: a round or a flush is a round for both."""

from __future__ import annotations

import pytest
import torch

from lightfed.callbacks import Callback
from lightfed.messages import ClientUpdate
from lightfed.simtime import BufferedAsync, SyncRounds, SyntheticTrace
from lightfed_zoo.strategies import SCAFFOLD, Ditto, FedBuff
from tests.conftest import BoringFederatedData, boring_model
from tests.simtime.test_timed_resume import assert_same_run
from tests.simtime.test_timed_trainer import make_trainer


class Recorder(Callback):
    """Sees every round's start and adds one fixed update (a canary) to each."""

    def __init__(self, canary: float = 0.0) -> None:
        self.starts: list[tuple[int, list[int], torch.Tensor]] = []
        self.ends: list[tuple[int, list[int], int]] = []
        self.after: list[torch.Tensor] = []
        self.canary = canary

    def on_round_start(self, trainer, round_idx, cohort):
        self.starts.append((round_idx, list(cohort), trainer.global_params.clone()))

    def extra_updates(self, trainer, round_idx, cohort):
        if not self.canary:
            return []
        delta = torch.full_like(trainer.global_params, self.canary)
        return [ClientUpdate(10_000, delta, num_examples=1, num_steps=1)]

    def on_round_end(self, trainer, result):
        self.ends.append((result.round_idx, list(result.cohort), result.extra_updates))
        self.after.append(trainer.global_params.clone())


def clocks() -> dict[str, object]:
    trace = SyntheticTrace(seed=0, online_fraction=0.7)
    return {"sync": SyncRounds(trace=trace, deadline=30.0, over_selection=1.5), "fedbuff": BufferedAsync(trace=trace,
                                                                                                         concurrency=4)}


@pytest.mark.parametrize("kind", ["sync", "fedbuff"])
def test_callbacks_see_every_timed_round_start_and_their_extra_updates_reach_the_server(tmp_path, kind):
    seen, canary = Recorder(), Recorder(canary=0.05)
    plain = make_trainer(tmp_path / "a", strategy=FedBuff(), clock=clocks()[kind], callbacks=[seen])
    plain.fit(boring_model(), BoringFederatedData())
    marked = make_trainer(tmp_path / "b", strategy=FedBuff(), clock=clocks()[kind], callbacks=[canary])
    marked.fit(boring_model(), BoringFederatedData())

    assert [r for r, _, _ in seen.starts] == [0, 1, 2, 3]
    assert [(r, c) for r, c, _ in seen.starts] == [(r, c) for r, c, _ in seen.ends]  # the round's cohort
    # the start sees the model the round steps from: the previous round's result (a flush's, too)
    assert all(torch.equal(seen.starts[r][2], seen.after[r - 1]) for r in range(1, 4))
    assert all(extra == 0 for _, _, extra in seen.ends)
    assert all(extra == 1 for _, _, extra in canary.ends)
    assert all(h["round/extra_updates"] == 1.0 for h in marked.history)
    assert not torch.equal(plain.global_params, marked.global_params)  # the canary moved the model


def test_scaffold_under_sync_rounds_keeps_client_state_and_resumes_it(tmp_path):
    def clock() -> SyncRounds:
        return SyncRounds(trace=SyntheticTrace(seed=0), deadline=30.0, over_selection=1.5)

    whole = make_trainer(tmp_path / "w", rounds=4, strategy=SCAFFOLD(), clock=clock())
    whole.fit(boring_model(), BoringFederatedData())
    half = make_trainer(tmp_path / "h", rounds=2, strategy=SCAFFOLD(), clock=clock())
    half.fit(boring_model(), BoringFederatedData())
    resumed = make_trainer(tmp_path / "r", rounds=4, strategy=SCAFFOLD(), clock=clock())
    resumed.fit(boring_model(), BoringFederatedData(), ckpt_path=str(half.last_checkpoint))

    assert whole.client_states and all(any(v.abs().sum() > 0 for v in s.values()) for s in whole.client_states.values())
    assert_same_run(whole, resumed)
    assert whole.client_states.keys() == resumed.client_states.keys()
    for c in whole.client_states:
        for k, v in whole.client_states[c].items():
            assert torch.equal(v, resumed.client_states[c][k])


@pytest.mark.parametrize("strategy", [SCAFFOLD, Ditto])
def test_buffered_async_refuses_per_client_state_naming_why(tmp_path, strategy):
    trainer = make_trainer(tmp_path, strategy=strategy(), clock=BufferedAsync(concurrency=4))
    with pytest.raises(ValueError, match="derive its state from a stale model"):
        trainer.fit(boring_model(), BoringFederatedData())


def test_the_canary_audit_runs_inside_a_private_fedbuff_run(tmp_path):
    """The real audit plugin's canaries ride every flush (extra updates, clipped and noised with the clients')."""
    from lightfed.audit import OneShotCanaryAudit
    from lightfed.simtime import DPCappedParticipation

    audit = OneShotCanaryAudit(num_canaries=4, bootstrap=10, participation="every_round")
    privacy = DPCappedParticipation(clip_norm=0.5, noise_multiplier=1.0, max_participations=3, verbose=False)
    trainer = make_trainer(tmp_path, strategy=FedBuff(), privacy=privacy, callbacks=[audit],
                           clock=BufferedAsync(concurrency=4))
    trainer.fit(boring_model(), BoringFederatedData())

    assert [h["round/extra_updates"] for h in trainer.history] == [4.0] * 4
    assert [h["audit/canaries_inserted"] for h in trainer.history] == [4.0] * 4
    assert audit.report["accountant_epsilon"] == pytest.approx(trainer.history[-1]["privacy/epsilon"])
