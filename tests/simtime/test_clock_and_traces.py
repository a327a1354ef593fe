"""The virtual clock's order, the traces' formats and determinism, the synchronous policies' plan."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lightfed.messages import ClientUpdate, RoundResult
from lightfed.simtime import BufferedAsync, FedScaleTrace, SyncRounds, SyntheticTrace, VirtualClock, VisitTime
from lightfed.simtime.traces import DAY, DeviceProfile


def test_events_at_equal_times_come_out_by_client_then_scheduling_order():
    clock = VirtualClock()
    for cid, kind in [(5, "a"), (2, "b"), (5, "c"), (2, "d")]:
        clock.schedule(3.0, cid, kind)
    clock.schedule(1.0, 9, "first")

    order = [clock.pop().kind for _ in range(5)]

    assert order == ["first", "b", "d", "a", "c"]
    assert clock.now == 3.0
    with pytest.raises(ValueError, match="cannot schedule"):
        clock.schedule(2.0, 1, "past")


def test_visit_time_is_download_compute_upload_from_bytes_and_speeds():
    profile = DeviceProfile(ms_per_sample=2.0, down_kbps=800.0, up_kbps=200.0)

    t = profile.seconds(samples=160, bytes_down=10_000, bytes_up=10_000, compute_factor=3.0)

    assert (t.download, t.compute, t.upload) == pytest.approx((0.1, 0.96, 0.4))
    assert t.total == pytest.approx(1.46)


def test_fedscale_trace_reads_capacity_and_periodic_availability(tmp_path):
    capacity = {
        "1": {"computation": 10.0, "communication": 500.0},
        "2": {"computation": 20.0, "communication": 50.0},
    }
    availability = {
        1: {"active": [10, 100], "inactive": [50, 150], "finish_time": 200, "model": "x"},
        2: {"active": [0], "inactive": [200], "finish_time": 200},
    }
    (tmp_path / "cap.json").write_text(json.dumps(capacity))

    trace = FedScaleTrace(str(tmp_path / "cap.json"), availability)
    first, second = trace.profile(0), trace.profile(1)

    assert (first.ms_per_sample, first.down_kbps, first.up_kbps) == (10.0, 500.0, 500.0)
    assert [first.available(t) for t in (5, 10, 49, 50, 120, 210, 260)] == [
        False,
        True,
        True,
        False,
        True,
        True,
        False,
    ]
    assert first.online_until(120) == 150 and first.online_until(215) == 250
    assert (
        second.available(199.0) and trace.profile(2) == first
    )  # a third client cycles back to the first key
    with pytest.raises(ValueError, match="'computation' and 'communication'"):
        FedScaleTrace({1: {"computation": 1.0}})


def test_synthetic_trace_is_a_pure_function_of_seed_and_client():
    a, b = SyntheticTrace(seed=3, online_fraction=0.5), SyntheticTrace(seed=3, online_fraction=0.5)

    assert [a.profile(k) for k in range(50)] == [b.profile(k) for k in range(50)]
    assert SyntheticTrace(seed=4).profile(0) != SyntheticTrace(seed=3).profile(0)
    speeds = sorted(SyntheticTrace(seed=0, compute_sigma=1.0).profile(k).ms_per_sample for k in range(2000))
    assert 5 < speeds[1979] / speeds[1000] < 20  # the 99th percentile ~ e^2.33 ~ 10x the median
    online = [a.profile(k).available(t) for k in range(400) for t in (0.0, DAY / 3, 2 * DAY / 3)]
    assert 0.4 < sum(online) / len(online) < 0.6


class TableBackend:
    """Visit times from a table; updates are the client id (so a test sees who was kept)."""

    def __init__(self, seconds: dict[int, tuple[float, float, float]], steps: int = 10) -> None:
        self.num_clients, self.seed, self.steps = len(seconds), 0, steps
        self.seconds = seconds
        self.trained: list[tuple[int, int | None]] = []
        self.params = torch.zeros(1)

    @property
    def global_params(self) -> torch.Tensor:
        return self.params

    def planned_steps(self, client_id: int) -> int:
        return self.steps

    def visit_time(self, client_id: int, steps: int) -> VisitTime:
        return VisitTime(*self.seconds[client_id])

    def train(
        self, client_id: int, visit_idx: int, global_params: torch.Tensor, steps: int | None
    ) -> ClientUpdate:
        self.trained.append((client_id, steps))
        return ClientUpdate(client_id, torch.ones(1), 1)

    def flush(self, round_idx: int, cohort: list[int], updates: list[ClientUpdate]) -> RoundResult:
        return RoundResult(round_idx, cohort, len(updates))


def test_deadline_keeps_the_first_finishers_and_the_partial_work_of_stragglers():
    # 6 clients, m = 3, over-selection 2 (all 6 selected); compute 1 s per step x 10 steps for 0-3,
    # 4x slower for 4-5
    table = {k: (1.0, 10.0 if k < 4 else 40.0, 1.0) for k in range(6)}
    table[0] = (1.0, 5.0, 1.0)
    backend = TableBackend(table)
    policy = SyncRounds(deadline=20.0, over_selection=2.0, stragglers="partial")
    policy.attach(backend)
    policy.cohort_size = 3

    result = policy.run_round(None, 0)

    assert result.cohort == [0, 1, 2]  # 0 finishes at 7, 1 and 2 at 12 (ties by id), 3 is over-selected away
    assert result.metrics["time/round_seconds"] == 12.0
    assert result.metrics["time/partial"] == 0.0

    backend.trained.clear()
    slow = SyncRounds(deadline=20.0, over_selection=1.0, stragglers="partial")
    slow.attach(TableBackend({k: (1.0, 40.0, 1.0) for k in range(3)}))
    slow.cohort_size = 3
    partial = slow.run_round(None, 0)
    # 18 s of compute fit in the deadline: floor(18 / 4) = 4 of 10 steps each; the round lasts the deadline
    assert sorted(slow.backend.trained) == [(0, 4), (1, 4), (2, 4)]
    assert partial.metrics["time/round_seconds"] == 20.0 and partial.metrics["time/partial"] == 3.0


def test_deadline_drops_stragglers_and_clients_that_go_offline():
    trace = FedScaleTrace(
        {k: {"computation": 1.0, "communication": 1.0} for k in range(4)},
        {k: {"active": [0], "inactive": [5.0 if k == 1 else 1e9], "finish_time": 2e9} for k in range(4)},
    )
    backend = TableBackend({0: (1, 2, 1), 1: (1, 5, 1), 2: (1, 30, 1), 3: (1, 3, 1)})
    policy = SyncRounds(trace=trace, deadline=10.0, stragglers="drop")
    policy.attach(backend)
    policy.cohort_size = 4

    result = policy.run_round(None, 0)

    assert result.cohort == [0, 3]  # 1 would finish at 7 but goes offline at 5; 2 misses the deadline
    assert result.metrics["time/offline_dropouts"] == 1.0
    assert result.metrics["time/stragglers"] == 1.0
    assert (
        result.metrics["time/round_seconds"] == 10.0
    )  # fewer than m arrived: the server waits for the deadline


def _async_run(seed: int, flushes: int = 6) -> tuple[list[tuple[float, int, int]], list[float]]:
    class Logged(BufferedAsync):
        def choose(self, now: float) -> int | None:
            cid = super().choose(now)
            log.append((now, -1 if cid is None else cid, self.visits))
            return cid

    log: list[tuple[float, int, int]] = []
    trace = SyntheticTrace(seed=seed, online_fraction=0.5)
    backend = TableBackend({k: (0.5, 1.0 + trace.profile(k).ms_per_sample, 0.5) for k in range(60)})
    backend.seed = seed
    engine = Logged(trace=trace, concurrency=8)
    engine.start(backend, buffer_size=4)
    times = [engine.run_round(None, r).metrics["time/virtual_seconds"] for r in range(flushes)]
    return log, times


def test_same_seed_and_trace_give_the_same_event_order_bit_for_bit():
    first, second = _async_run(0), _async_run(0)

    assert first == second
    assert _async_run(1) != first
    assert all(math.isfinite(t) for t in first[1])


def test_async_engine_never_starts_offline_clients_and_loses_visits_cut_by_the_trace():
    # client 2 is never online; client 1 is online only during [0, 2) but its visits last 3 s
    trace = FedScaleTrace(
        {k: {"computation": 1.0, "communication": 1.0} for k in range(4)},
        {
            0: {"active": [0], "inactive": [1e9], "finish_time": 2e9},
            1: {"active": [0], "inactive": [2.0], "finish_time": 2e9},
            2: {"active": [1e9], "inactive": [1e9 + 1], "finish_time": 2e9},
            3: {"active": [0], "inactive": [1e9], "finish_time": 2e9},
        },
    )
    backend = TableBackend({0: (0, 1.0, 0), 1: (0, 3.0, 0), 2: (0, 1.0, 0), 3: (0, 1.5, 0)})
    engine = BufferedAsync(trace=trace, concurrency=2, idle_seconds=0.25)
    engine.start(backend, buffer_size=1)

    cohorts = [engine.run_round(None, r).cohort for r in range(12)]

    assert {c for cohort in cohorts for c in cohort} <= {0, 3}
    assert 2 not in engine.participations
    assert [c for c, _ in backend.trained if c in (1, 2)] == []  # a visit cut by the trace is never trained
    # client 1 started at t=0 (before its window closed) and was cut at t=2
    assert engine.participations[1] == 1 and engine.counts["offline_dropouts"] == 1
