"""FedBuff on a hand-written arrival schedule of 3 clients: the exact model sequence, computed by hand.

Prepare: a one-number model ``w``; client ``k`` (target ``t_k``) sends ``Delta = (t_k - w_downloaded) / 2``;
visits last ``d_k`` virtual seconds; concurrency 2, buffer K = 2; the clients start in the scripted order
0, 1, 2, 0, 1, 2, ... FedBuff with ``eta = 1`` and ``s(tau) = 1 / sqrt(1 + tau)`` then gives (by hand):

====  ========================  ===============================================================
t     event                     buffer / model
====  ========================  ===============================================================
0     start c0, c1 from w0 = 0
1     c0 arrives, tau 0, 0.5    [c0]; start c2 from w0
2     c1 arrives, tau 0, 1.0    flush: w1 = (0.5 + 1.0) / 2 = 0.75; start c0 from w1
3     c0 arrives, tau 0, 0.125  [c0]; start c1 from w1
4     c2 arrives, tau 1, 2.0    flush: w2 = 0.75 + (0.125 + 2 / sqrt 2) / 2; start c2 from w2
5     c1 arrives, tau 1, 0.625  [c1]; start c0 from w2
6     c0 arrives, tau 0         flush: w3 = w2 + (0.625 / sqrt 2 + (1 - w2) / 2) / 2
====  ========================  ===============================================================
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch

from lightfed.messages import ClientUpdate, RoundResult
from lightfed.params import ParamSpec
from lightfed.server import RoundServer
from lightfed.simtime import BufferedAsync, VisitTime
from lightfed.strategy import Strategy
from lightfed_zoo.strategies import FedAsync, FedBuff

TARGETS = {0: 1.0, 1: 2.0, 2: 4.0}
DURATIONS = {0: 1.0, 1: 2.0, 2: 3.0}


class HalfwayBackend:
    """Each client moves halfway from the model it downloaded to its target; the server is lightfed's."""

    def __init__(self, strategy: Strategy, num_clients: int = 3) -> None:
        self.num_clients, self.seed = num_clients, 0
        self.params = torch.zeros(1, dtype=torch.float64)
        spec = ParamSpec(names=("w",), shapes=(torch.Size([1]),), is_buffer=(False,))
        strategy.setup(spec, num_clients, self.params)
        self.server = RoundServer(strategy, numel=1)
        self.server.expect_training = False  # hand-made updates carry no loss
        self.flushes: list[tuple[float, list[int]]] = []
        self.models: list[float] = []

    @property
    def global_params(self) -> torch.Tensor:
        return self.params

    def planned_steps(self, client_id: int) -> int:
        return 1

    def visit_time(self, client_id: int, steps: int) -> VisitTime:
        return VisitTime(0.0, DURATIONS[client_id % 3], 0.0)

    def train(
        self, client_id: int, visit_idx: int, global_params: torch.Tensor, steps: int | None
    ) -> ClientUpdate:
        return ClientUpdate(
            client_id, (TARGETS[client_id % 3] - global_params) / 2, num_examples=1, num_steps=1
        )

    def flush(self, round_idx: int, cohort: list[int], updates: list[ClientUpdate]) -> RoundResult:
        outcome = self.server.run(round_idx, cohort, updates, self.params)
        self.params = outcome.global_params
        self.models.append(float(self.params))
        return outcome.result


class Scripted(BufferedAsync):
    """Clients start in a written order instead of at random."""

    def __init__(self, order: list[int], **kwargs) -> None:
        super().__init__(**kwargs)
        self.order = itertools.cycle(order)

    def choose(self, now: float) -> int | None:
        return next(self.order)


def test_fedbuff_model_sequence_matches_the_hand_computed_schedule():
    backend = HalfwayBackend(FedBuff(server_lr=1.0))
    engine = Scripted([0, 1, 2], concurrency=2)
    engine.start(backend, buffer_size=2)

    results = [engine.run_round(None, r) for r in range(3)]

    w1 = 0.75
    w2 = w1 + (0.125 + 2.0 / math.sqrt(2)) / 2
    w3 = w2 + (0.625 / math.sqrt(2) + (1.0 - w2) / 2) / 2
    assert backend.models == pytest.approx([w1, w2, w3], abs=1e-12)
    assert [r.metrics["time/virtual_seconds"] for r in results] == [2.0, 4.0, 6.0]
    assert [r.metrics["time/staleness_max"] for r in results] == [0.0, 1.0, 1.0]
    assert [r.cohort for r in results] == [[0, 1], [0, 2], [0, 1]]


def test_max_staleness_discards_the_stale_arrival():
    backend = HalfwayBackend(FedBuff(server_lr=1.0))
    engine = Scripted([0, 1, 2], concurrency=2, max_staleness=0)
    engine.start(backend, buffer_size=2)

    engine.run_round(None, 0)
    second = engine.run_round(None, 1)

    # c2 (downloaded w0, tau 1 at t=4) is discarded; c0 (t=3) and c1 (t=5, tau 0) flush
    assert second.metrics["time/stale_discarded"] == 1.0
    assert second.cohort == [0, 1]
    assert second.metrics["time/virtual_seconds"] == 5.0


def test_fedasync_steps_on_every_arrival_with_alpha_times_staleness_weight():
    backend = HalfwayBackend(FedAsync(alpha=0.5, staleness="constant"))
    engine = Scripted([0, 1, 2], concurrency=2)
    engine.start(backend, buffer_size=1)

    for r in range(2):
        engine.run_round(None, r)

    # t=1: c0 from 0 -> w = 0.5 * 0.5 = 0.25; t=2: c1 (downloaded w=0) -> w = 0.25 + 0.5 * 1.0
    assert backend.models == pytest.approx([0.25, 0.75], abs=1e-12)


def _updates(values: list[float], staleness: list[int]) -> list[ClientUpdate]:
    return [
        ClientUpdate(k, torch.tensor([v], dtype=torch.float64), 1, metrics={"staleness": float(t)})
        for k, (v, t) in enumerate(zip(values, staleness, strict=True))
    ]


def test_fedbuff_server_momentum_by_hand():
    strategy = FedBuff(server_lr=0.5, server_optimizer="momentum", momentum=0.5)
    backend = HalfwayBackend(strategy)
    w = torch.zeros(1, dtype=torch.float64)

    w1 = backend.server.run(0, [0, 1], _updates([1.0, 3.0], [0, 0]), w).global_params
    w2 = backend.server.run(1, [0, 1], _updates([2.0, 8.0], [0, 3]), w1).global_params

    # m1 = (1 + 3)/2 = 2, w1 = 0.5 * 2 = 1; Delta2 = (2 + 8 / sqrt(4)) / 2 = 3, m2 = 0.5 * 2 + 3 = 4,
    # w2 = 1 + 0.5 * 4 = 3
    assert float(w1) == pytest.approx(1.0) and float(w2) == pytest.approx(3.0)


def test_fedbuff_adam_at_zero_staleness_is_fedadam_with_uniform_weights():
    from lightfed_zoo.strategies import FedAdam

    buff, adam = (
        FedBuff(server_lr=0.1, server_optimizer="adam", beta1=0.9, beta2=0.99, tau=1e-3),
        FedAdam(eta=0.1, beta1=0.9, beta2=0.99, tau=1e-3, weighted=False),
    )
    wb = wa = torch.zeros(1, dtype=torch.float64)
    sb, sa = HalfwayBackend(buff).server, HalfwayBackend(adam).server
    for r, values in enumerate(([1.0, 3.0], [-2.0, 0.5], [0.25, 0.25])):
        wb = sb.run(r, [0, 1], _updates(values, [0, 0]), wb).global_params
        wa = sa.run(r, [0, 1], _updates(values, [0, 0]), wa).global_params
        assert torch.allclose(wb, wa, rtol=0, atol=1e-12)
