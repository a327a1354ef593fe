"""The round server: one call (:meth:`RoundServer.run`) does the whole server side of a round.

Hand-computed references: FedAvg's weighted mean, the client-state commit rule, the reduce seam, and a DP
round's epsilon after N rounds against dp-accounting composed directly.
"""

from __future__ import annotations

import dp_accounting as dpa
import pytest
import torch

from lightfed.aggregation import ShardResult, StreamingSum
from lightfed.messages import ClientUpdate, RunInfo
from lightfed.privacy import DPFixedClipping
from lightfed.sampling import PoissonSampler
from lightfed.server import RoundOutcome, RoundServer, run_server_round
from lightfed.strategy import FedAvg
from lightfed.testing import make_update


def _updates() -> list[ClientUpdate]:
    return [make_update(0, [4.0, 0.0], num_examples=3), make_update(1, [0.0, 8.0], num_examples=1),
            make_update(2, [float("nan"), 1.0], num_examples=5)]


def test_run_is_fedavg_by_hand_and_the_step_by_step_sequence():
    # Prepare
    w = torch.tensor([1.0, 1.0])
    # Execute: one call, and the pieces it is made of, in the module docstring's order
    outcome = run_server_round(FedAvg(), w, _updates())
    server = RoundServer(FedAvg(), numel=2)
    shard = server.collect(0, server.new_aggregator(0, [0, 1, 2]), _updates())
    aggregate = server.release(0, shard.aggregator)
    stepped = server.step(w, aggregate, shard.aggregator, 0)
    # Assert: client 2 (NaN) is rejected; w + (3 * [4, 0] + 1 * [0, 8]) / 4 = [4, 3]
    assert isinstance(outcome, RoundOutcome)
    torch.testing.assert_close(outcome.global_params, torch.tensor([4.0, 3.0]), rtol=0, atol=0)
    assert torch.equal(outcome.global_params, stepped)
    torch.testing.assert_close(outcome.aggregate.delta_sum, torch.tensor([12.0, 8.0]), rtol=0, atol=0)
    assert outcome.result.rejected == [2] and outcome.result.num_updates == 2 and not outcome.result.skipped
    assert outcome.result.metrics["round/updates"] == 2.0 and outcome.result.metrics["round/rejected"] == 1.0
    assert outcome.result.metrics["round/update_norm"] == pytest.approx(13**0.5)  # |[3, 2]|
    assert outcome.result.metrics["round/bytes_up_per_client"] == 8.0


def test_a_round_that_releases_nothing_keeps_the_model():
    w = torch.tensor([1.0, 2.0])
    outcome = run_server_round(FedAvg(), w, [make_update(0, [float("inf"), 0.0])])
    assert outcome.aggregate is None and outcome.result.skipped and outcome.global_params is w


class _Stateful(FedAvg):
    uses_client_state = True


def test_client_state_is_committed_only_for_accepted_updates():
    server = RoundServer(_Stateful(), numel=2)
    server.client_states = {1: {"v": torch.tensor(7.0)}}
    for cid in (0, 1):
        server.client_state(cid)["v"] = torch.tensor(float(cid + 10))  # the clients' working copies
    updates = [make_update(0, [1.0, 1.0]), make_update(1, [float("nan"), 0.0])]
    outcome = server.run(0, [0, 1], updates, torch.zeros(2))
    assert outcome.result.rejected == [1]
    assert float(server.client_states[0]["v"]) == 10.0  # accepted: committed
    assert float(server.client_states[1]["v"]) == 7.0  # rejected: the old state stays


def test_reduce_sees_this_process_shard_and_its_merge_is_what_is_released():
    seen: list[ShardResult] = []

    def reduce(shard: ShardResult) -> ShardResult:  # "the other process" had one client sending [0, 4]
        seen.append(shard)
        assert isinstance(shard.aggregator, StreamingSum) and shard.aggregator.num_clients == 1
        shard.aggregator.add(make_update(9, [0.0, 4.0]), 1.0)
        shard.metrics.append({})
        return shard

    outcome = RoundServer(FedAvg(weighted=False), numel=2).run(
        0, [0, 9], [make_update(0, [2.0, 0.0])], torch.zeros(2), reduce=reduce
    )
    assert len(seen) == 1
    # ([2, 0] + [0, 4]) / 2
    torch.testing.assert_close(outcome.global_params, torch.tensor([1.0, 2.0]), rtol=0, atol=0)
    assert outcome.result.num_updates == 2


def test_dp_epsilon_after_n_rounds_equals_dp_accounting():
    # Prepare: client-level DP, Poisson q = 0.5 of 20 clients, z = 1.1, delta 1e-4, 4 rounds
    z, q, n, delta, rounds = 1.1, 0.5, 20, 1e-4, 4
    mech = DPFixedClipping(clip_norm=1.0, noise_multiplier=z, delta=delta, verbose=False)
    strategy = FedAvg(weighted=False)
    mech.setup(RunInfo(num_clients=n, sampler=PoissonSampler(q), rounds=rounds, strategy=strategy, seed=0))
    server = RoundServer(strategy, mech, numel=2)
    w = torch.zeros(2)
    # Execute
    for r in range(rounds):
        outcome = server.run(r, [0, 1], [make_update(0, [0.1, 0.0]), make_update(1, [0.0, 0.1])], w)
        w = outcome.global_params
    # Assert: the epsilon logged after N rounds is dp-accounting's N-fold Poisson-subsampled Gaussian
    acc = dpa.pld.PLDAccountant(dpa.NeighboringRelation.ADD_OR_REMOVE_ONE, value_discretization_interval=1e-3)
    acc.compose(dpa.SelfComposedDpEvent(dpa.PoissonSampledDpEvent(q, dpa.GaussianDpEvent(z)), rounds))
    assert outcome.result.metrics["privacy/epsilon"] == pytest.approx(acc.get_epsilon(delta), rel=1e-9)
    assert outcome.result.metrics["privacy/delta"] == delta


def test_each_client_update_is_recorded_with_its_facts_rejected_ones_marked():
    # Prepare: three clients, the NaN one (2) is rejected; an audit's extra update is not a client
    ups = _updates()
    ups[0].num_steps, ups[0].metrics = 4, {"loss": 0.5, "acc": 0.75}
    ups[1].num_steps, ups[1].metrics = 2, {"loss": 1.25}
    canary = make_update(100, [0.0, 0.0])
    # Execute
    server = RoundServer(FedAvg(), numel=2)
    server.expect_training = False
    result = server.run(0, [1, 0, 2], [ups[1], ups[0], ups[2]], torch.ones(2), extra=[canary]).result
    # Assert: sorted by client id, the canary absent, client 2 kept as rejected
    assert [(c.client_id, c.num_examples, c.num_steps, c.metrics, c.accepted) for c in result.clients] == [
        (0, 3, 4, {"loss": 0.5, "acc": 0.75}, True), (1, 1, 2, {"loss": 1.25}, True), (2, 5, 0, {}, False)]


def test_no_client_records_when_the_server_learns_only_sums():
    from tests.secagg.helpers import make_protocol, make_updates

    # secure aggregation: the server sees sums only
    protocol = make_protocol(numel=20)
    secure = RoundServer(FedAvg(), secure_aggregation=protocol, numel=20)
    secure.expect_training = False
    assert secure.run(0, [0, 1, 2, 3], make_updates([0, 1, 2, 3], 20), torch.zeros(20)).result.clients is None
    # distributed noise (it needs secure aggregation; the mark is the privacy plan's placement)
    distributed = DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, clipping="client",
                                  noise_placement="distributed", verbose=False)
    central = DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, verbose=False)
    assert RoundServer(FedAvg(), privacy=distributed, numel=20).sums_only
    assert not RoundServer(FedAvg(), privacy=central, numel=20).sums_only


def test_client_records_of_every_process_are_gathered_like_the_metrics():
    from lightfed.distributed import merge_in_process

    # Prepare: "rank 0" trains clients 3 and 0, "rank 1" trains client 1
    server = RoundServer(FedAvg(), numel=2)
    a = server.collect(0, StreamingSum(), [make_update(3, [1.0, 0.0]), make_update(0, [0.0, 1.0])])
    b = server.collect(0, StreamingSum(), [make_update(1, [1.0, 1.0], num_examples=2)])
    # Execute
    merged = merge_in_process([a, b], 2, torch.device("cpu"))
    # Assert
    assert sorted((c.client_id, c.num_examples) for c in merged.clients) == [(0, 1), (1, 2), (3, 1)]
