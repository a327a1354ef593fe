"""SecAgg+ over each flush's cohort, with dropouts from the trace instead of coins."""

from __future__ import annotations

import pytest
import torch

from lightfed import FederatedTrainer
from lightfed.secagg import SecAggPlus
from lightfed.simtime import BufferedAsync, FedScaleTrace, SyntheticTrace, TraceDropout
from lightfed_zoo.strategies import FedBuff
from tests.conftest import BoringFederatedData, boring_model


def run(tmp_path, secure: bool) -> FederatedTrainer:
    secagg = SecAggPlus(clip=2.0, max_weight=1.0, max_dropout=0.5, dropout=TraceDropout()) if secure else None
    trainer = FederatedTrainer(
        rounds=3,
        clients_per_round=4,
        batch_size=8,
        local_steps=2,
        strategy=FedBuff(),
        secure_aggregation=secagg,
        clock=BufferedAsync(trace=SyntheticTrace(seed=0), concurrency=4),
        logger=False,
        enable_progress_bar=False,
        default_root_dir=str(tmp_path),
        eval_every=3,
        fed_eval_fraction=0.0,
        checkpoint_every=0,
    )
    trainer.fit(boring_model(), BoringFederatedData())
    return trainer


def test_a_flush_under_secagg_equals_the_plain_flush_up_to_quantization(tmp_path):
    plain, secure = run(tmp_path / "p", False), run(tmp_path / "s", True)

    assert torch.allclose(plain.global_params, secure.global_params, atol=1e-4)
    assert [h["secagg/survivors"] for h in secure.history] == [4.0, 4.0, 4.0]


class FakeClock:
    def __init__(self, trace, now: float) -> None:
        self.trace, self.clock = trace, type("C", (), {"now": now})()

    def online_at(self, client_id: int, t: float) -> bool:
        return self.trace.profile(client_id).available(t)


def test_trace_dropout_drops_who_is_offline_at_the_flush_or_leaves_during_the_protocol():
    trace = FedScaleTrace(
        {k: {"computation": 1.0, "communication": 1.0} for k in range(3)},
        {
            0: {"active": [0], "inactive": [100], "finish_time": 1000},
            1: {"active": [0], "inactive": [52], "finish_time": 1000},
            2: {"active": [60], "inactive": [100], "finish_time": 1000},
        },
    )
    dropout = TraceDropout(protocol_seconds=5.0)
    with pytest.raises(ValueError, match="configure trainer.clock"):
        dropout.drops(0, 0, 0, "advertise_keys")
    dropout.bind(FakeClock(trace, now=50.0))  # type: ignore[arg-type]

    stages = {
        c: [
            s
            for s in ("advertise_keys", "share_keys", "masked_input", "unmasking")
            if dropout.drops(0, 0, c, s)
        ]
        for c in range(3)
    }

    assert stages == {0: [], 1: ["unmasking"], 2: ["advertise_keys", "unmasking"]}
