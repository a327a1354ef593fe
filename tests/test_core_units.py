"""Unit tests of the small core pieces: FedAvg, aggregation, samplers, payload layout, registry, seeding."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lightfed import (
    ClientUpdate,
    CollectAll,
    FedAvg,
    FullParticipation,
    ParamSpec,
    PoissonSampler,
    Registry,
    RoundAggregate,
    StreamingSum,
    UniformSampler,
    derive_seed,
)
from lightfed.sampling import split_evenly, worst_fraction_mean


def upd(cid: int, delta: list[float], n: int, **extras: list[float]) -> ClientUpdate:
    return ClientUpdate(cid, torch.tensor(delta), n, extras={k: torch.tensor(v) for k, v in extras.items()})


def test_fedavg_is_the_example_weighted_mean_with_server_lr():
    # Prepare: deltas [1, 2] with 1 example and [3, 4] with 3 examples
    agg = StreamingSum()
    strategy = FedAvg(server_lr=0.5)
    for u in (upd(0, [1.0, 2.0], 1), upd(1, [3.0, 4.0], 3)):
        agg.add(u, strategy.client_weight(u))
    # Execute
    new = strategy.aggregate(torch.tensor([10.0, 20.0]), agg.result(), 0)
    # Assert: mean = ([1, 2] + 3 [3, 4]) / 4 = [2.5, 3.5]; w + 0.5 * mean
    assert torch.allclose(new, torch.tensor([11.25, 21.75]))
    assert FedAvg(weighted=False).client_weight(upd(0, [0.0], 7)) == 1.0


def test_streaming_sum_extras_and_fixed_denominator():
    agg = StreamingSum()
    agg.add(upd(0, [1.0], 2, c=[4.0, 0.0]), 2.0)
    agg.add(upd(1, [3.0], 2, c=[0.0, 8.0]), 1.0)
    res = agg.result()
    assert res.weight_sum == 3.0 and res.num_clients == 2
    assert torch.equal(res.delta_sum, torch.tensor([5.0]))
    assert torch.equal(res.mean_extra("c"), torch.tensor([8.0 / 3, 8.0 / 3]))
    res.denominator = 10.0
    assert torch.equal(res.mean_delta(), torch.tensor([0.5]))
    with pytest.raises(ValueError, match="no weight"):
        RoundAggregate(torch.zeros(1), 0.0, 0).mean_delta()


def test_collect_all_keeps_every_update_and_the_sums():
    agg = CollectAll()
    agg.add(upd(3, [1.0], 1), 1.0)
    agg.add(upd(1, [2.0], 1), 1.0)
    assert [u.client_id for u in agg.updates] == [3, 1] and agg.result().delta_sum.item() == 3.0


def test_nonfinite_detection():
    assert upd(0, [1.0], 1).is_finite()
    assert not upd(0, [float("nan")], 1).is_finite()
    assert not upd(0, [1.0], 1, c=[float("inf")]).is_finite()
    assert upd(0, [3e38, 3e38], 1).is_finite()  # finite terms whose float32 sum overflows: still finite
    assert not upd(0, [float("inf"), -float("inf")], 1).is_finite()
    assert not upd(0, [float("-inf"), 1.0], 1).is_finite()
    assert upd(0, [], 1).is_finite()
    assert not upd(0, [1.0, float("nan")], 1, c=[1.0]).is_finite()  # with extras: the general path


def test_uniform_sampler_count_fraction_seeded_and_bad_input():
    s = UniformSampler(10)
    a, b = s.sample(3, 100, seed=0), s.sample(3, 100, seed=0)
    assert a == b and len(a) == 10 == len(set(a)) and a == sorted(a)
    assert s.sample(4, 100, seed=0) != a and s.sample(3, 100, seed=1) != a
    assert len(UniformSampler(0.25).sample(0, 40, 0)) == 10
    with pytest.raises(ValueError, match="clients_per_round=10 but the data has only 5 clients"):
        s.validate(5)
    for bad in (0, -1, 1.5):
        with pytest.raises(ValueError, match="clients_per_round"):
            UniformSampler(bad)


def test_uniform_sampler_is_uniform():
    counts = torch.zeros(20)
    for r in range(2000):
        counts[UniformSampler(5).sample(r, 20, 0)] += 1
    # each client expected 500 times; binomial std ~ 19.4; 5 sigma bound
    assert (counts - 500).abs().max() < 100


def test_poisson_sampler_rate_and_variable_cohort():
    s = PoissonSampler(0.1)
    sizes = torch.tensor([len(s.sample(r, 1000, 0)) for r in range(200)], dtype=torch.float)
    # mean 100, std of the mean 9.5 / sqrt(200) ~ 0.67
    assert abs(sizes.mean().item() - 100) < 4 and sizes.std() > 5
    assert s.rate(1000) == 0.1 and s.kind == "poisson"
    assert FullParticipation().sample(0, 4, 0) == [0, 1, 2, 3]
    with pytest.raises(ValueError, match="sampling_rate"):
        PoissonSampler(0.0)


def test_split_evenly_balances_load_deterministically():
    shards = split_evenly([0, 1, 2, 3, 4], 2, [10, 1, 1, 1, 9])
    assert shards == [[0, 2], [1, 3, 4]]  # greedy by size: loads 11 and 11
    assert sorted(sum(shards, [])) == [0, 1, 2, 3, 4]
    assert worst_fraction_mean([0.9, 0.1, 0.5, 0.7, 0.3, 0.2, 0.8, 0.6, 0.4, 1.0, 0.0], 0.1) == pytest.approx(0.05)


def test_param_spec_flatten_assign_round_trip_with_buffers():
    net = nn.Sequential(nn.Linear(3, 2), nn.BatchNorm1d(2))
    spec = ParamSpec.from_module(net, include_buffers=True)
    assert spec.names == ("0.weight", "0.bias", "1.weight", "1.bias", "1.running_mean", "1.running_var")
    assert spec.numel == 6 + 2 + 2 + 2 + 2 + 2 and spec.num_bytes == 4 * 16
    flat = torch.arange(16, dtype=torch.float32)
    spec.assign(spec.tensors(net), flat)
    assert torch.equal(spec.flatten(spec.tensors(net)), flat)
    assert torch.equal(net[1].running_var, torch.tensor([14.0, 15.0]))
    assert spec.state_dict_from_flat(flat)["0.bias"].tolist() == [6.0, 7.0]


def test_param_spec_trainable_patterns():
    net = nn.Sequential(nn.Linear(3, 2), nn.Linear(2, 1))
    spec = ParamSpec.from_module(net, trainable=["1.*"])
    assert spec.names == ("1.weight", "1.bias") and not net[0].weight.requires_grad
    with pytest.raises(ValueError, match="matches no parameter"):
        ParamSpec.from_module(net, trainable=["head.*"])


def test_registry_decorator_duplicates_and_lookup():
    reg: Registry = Registry("widget", "lightfed.tests.none")

    @reg.register()
    class Alpha:
        """First widget."""

    assert reg.get("ALPHA") is Alpha and reg.names() == ["Alpha"]
    assert reg.entries()[0].description == "First widget."
    with pytest.raises(ValueError, match="already registered"):
        reg.add(type("Alpha", (), {}))
    with pytest.raises(KeyError, match="unknown widget 'beta'; registered: Alpha"):
        reg.get("beta")


def test_derive_seed_is_stable_and_key_sensitive():
    assert derive_seed(0, "a", 1) == derive_seed(0, "a", 1)
    assert len({derive_seed(0, "a", 1), derive_seed(0, "a", 2), derive_seed(1, "a", 1), derive_seed(0, "b", 1)}) == 4
    assert 0 <= derive_seed(2**40, "x") < 2**63


def test_all_finite_is_exact_when_the_sum_overflows() -> None:
    from lightfed.messages import all_finite

    big = torch.full((4,), 3e38)  # every term finite, the float32 sum overflows to inf
    assert all_finite([big, torch.zeros(0), torch.tensor([1, 2])])
    assert not all_finite([torch.tensor([1.0, float("-inf")])])
    assert not all_finite([torch.tensor([float("inf"), float("-inf")])])  # sum is NaN
    assert not all_finite([big, torch.tensor([0.0, float("nan")])])
    assert all_finite([torch.full((2,), 6e4, dtype=torch.float16)])  # the half sum overflows, amax decides
    assert not all_finite([torch.tensor([1.0, float("nan")], dtype=torch.bfloat16)])
    assert not all_finite([torch.tensor([complex(float("nan"), 0.0), 1 + 0j])])
    assert all_finite([torch.tensor([1 + 2j, 3 - 1j])])
