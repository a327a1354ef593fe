"""Client-level DP hooks with hand-computed values: clipping, noise std, weights, adaptive clip, refusals."""

from __future__ import annotations

import math

import pytest
import torch

from lightfed.aggregation import StreamingSum
from lightfed.messages import ClientUpdate, RoundAggregate, RunInfo
from lightfed.privacy import DPAdaptiveClipping, DPFixedClipping, LocalDP, adaptive_update_noise_multiplier
from lightfed.privacy.clipping import clip_update, update_norm
from lightfed.registry import PRIVACY
from lightfed.sampling import PoissonSampler, UniformSampler
from lightfed.strategy import FedAvg, Strategy

N = 100


def upd(cid: int, delta: list[float], n: int = 4, **extras: list[float]) -> ClientUpdate:
    return ClientUpdate(
        cid, torch.tensor(delta), num_examples=n, extras={k: torch.tensor(v) for k, v in extras.items()}
    )


def setup(mech, sampler=None, strategy=None, num_clients=N, **kw):
    mech.setup(
        RunInfo(num_clients=num_clients, sampler=sampler or PoissonSampler(0.1), rounds=10,
                strategy=strategy or FedAvg(weighted=False), seed=3, **kw)
    )
    return mech


def run_round(mech, updates: list[ClientUpdate], round_idx: int = 0) -> RoundAggregate:
    """What the trainer does with a round's updates (client side, weight, server side, sum, noise)."""
    agg = StreamingSum()
    for u in updates:
        u = mech.client_update(u, round_idx)
        w = mech.client_weight(u, float(u.num_examples))
        agg.add(mech.server_update(u, round_idx), w)
    out = agg.result()
    assert out is not None
    return mech.process_aggregate(out, round_idx)


def test_registered_names():
    assert {"DPFixedClipping", "DPAdaptiveClipping", "LocalDP", "DPSGD"} <= set(PRIVACY.names())


# ---------------------------------------------------------------------- clipping
def test_clip_hand_computed():
    clipped, norm = clip_update(upd(0, [3.0, 4.0]), 1.0)
    assert norm == pytest.approx(5.0)
    assert torch.allclose(clipped.delta, torch.tensor([0.6, 0.8]))
    inside, norm = clip_update(upd(0, [0.3, 0.4]), 1.0)
    assert norm == pytest.approx(0.5) and torch.equal(inside.delta, torch.tensor([0.3, 0.4]))


def test_clip_covers_extras_jointly():
    u = upd(0, [3.0, 4.0], c=[0.0, 12.0])  # joint norm 13
    assert update_norm(u) == pytest.approx(13.0)
    clipped, _ = clip_update(u, 2.6)
    assert torch.allclose(clipped.delta, torch.tensor([0.6, 0.8]))
    assert torch.allclose(clipped.extras["c"], torch.tensor([0.0, 2.4]))


@pytest.mark.parametrize("side", ["server", "client"])
def test_client_and_server_side_clipping(side):
    mech = setup(DPFixedClipping(clip_norm=1.0, noise_multiplier=0.0, clipping=side, verbose=False))
    u = upd(0, [3.0, 4.0])
    after_client = mech.client_update(u, 0)
    after_server = mech.server_update(after_client, 0)
    expect_client = [0.6, 0.8] if side == "client" else [3.0, 4.0]
    assert torch.allclose(after_client.delta, torch.tensor(expect_client))
    assert torch.allclose(after_server.delta, torch.tensor([0.6, 0.8]))


# ---------------------------------------------------------------------- noise and the fixed denominator
def test_mean_noise_std_is_zC_over_expected_cohort_not_realised_count():
    z, c, dim = 1.5, 2.0, 40_000
    mech = setup(DPFixedClipping(clip_norm=c, noise_multiplier=z, verbose=False))  # q=0.1, N=100: m=10
    zeros = [ClientUpdate(k, torch.zeros(dim), 4) for k in range(7)]  # a realised cohort of 7
    agg = run_round(mech, zeros)
    mean = agg.mean_delta()
    assert agg.denominator == pytest.approx(10.0) and agg.weight_sum == pytest.approx(10.0)
    # Right: z*C/m = 0.3. Wrong formulas: z*C/7 = 0.4286 (realised count), z*C = 3 (no division),
    # z/m = 0.15 (noise not scaled by C). The std estimate over 40k draws has relative s.e. 0.35%.
    assert float(mean.std()) == pytest.approx(z * c / 10, rel=0.02)
    assert abs(float(mean.mean())) < 4 * 0.3 / math.sqrt(dim)


def test_noise_is_seeded_by_round_and_covers_extras():
    mech = setup(DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, verbose=False))
    a = run_round(mech, [upd(0, [0.0] * 1000, c=[0.0] * 1000)], round_idx=4)
    b = run_round(mech, [upd(0, [0.0] * 1000, c=[0.0] * 1000)], round_idx=4)
    c = run_round(mech, [upd(0, [0.0] * 1000, c=[0.0] * 1000)], round_idx=5)
    assert torch.equal(a.delta_sum, b.delta_sum) and not torch.equal(a.delta_sum, c.delta_sum)
    assert float(a.extras_sum["c"].std()) == pytest.approx(1.0, rel=0.15)
    assert not torch.equal(a.extras_sum["c"], a.delta_sum)


def test_uniform_weights_ignore_example_counts():
    mech = setup(DPFixedClipping(clip_norm=10.0, noise_multiplier=0.0, verbose=False), sampler=UniformSampler(4))
    agg = run_round(mech, [upd(0, [1.0], n=1), upd(1, [3.0], n=100)])
    # sum 4 over the fixed cohort m = 4 (not the 2 that arrived, not weighted by n)
    assert agg.mean_delta().item() == pytest.approx(1.0)


def test_weighted_estimator_hand_computed():
    mech = setup(
        DPFixedClipping(clip_norm=10.0, noise_multiplier=0.0, weighted_estimator=True, weight_cap=5.0, verbose=False),
        sampler=PoissonSampler(0.5), strategy=FedAvg(weighted=True), num_clients=4,
        client_num_examples=[2, 5, 10, 20],
    )
    # w = min(n / 5, 1) = [0.4, 1, 1, 1], W = 3.4, denominator q W = 1.7
    assert mech.denominator == pytest.approx(1.7)
    agg = run_round(mech, [upd(0, [1.0], n=2), upd(1, [2.0], n=5), upd(2, [4.0], n=10)])
    assert agg.mean_delta().item() == pytest.approx((0.4 * 1 + 2 + 4) / 1.7)
    given = setup(
        DPFixedClipping(noise_multiplier=0.0, weighted_estimator=True, weight_cap=5.0, total_weight=3.4, verbose=False),
        sampler=PoissonSampler(0.5),
    )
    assert given.denominator == pytest.approx(1.7)


def test_weighted_estimator_without_sizes_says_which_field():
    with pytest.raises(ValueError, match="total_weight"):
        setup(DPFixedClipping(noise_multiplier=1.0, weighted_estimator=True, weight_cap=5.0, verbose=False))


# ---------------------------------------------------------------------- refusals
def test_example_weighted_fedavg_is_refused_with_the_reason():
    with pytest.raises(ValueError, match=r"n_k \* C.*weighted: false"):
        setup(DPFixedClipping(noise_multiplier=1.0, verbose=False), strategy=FedAvg(weighted=True))
    with pytest.raises(ValueError, match="weighted"):
        setup(LocalDP(noise_multiplier=1.0, verbose=False), strategy=FedAvg())


def test_robust_and_self_sampling_strategies_are_refused():
    class Median(Strategy):
        needs_all_updates = True

    class Picky(Strategy):
        def sample_clients(self, round_idx, num_clients, seed):
            return [0]

    with pytest.raises(ValueError, match="individual update"):
        setup(DPFixedClipping(noise_multiplier=1.0, verbose=False), strategy=Median())
    with pytest.raises(ValueError, match="sample_clients"):
        setup(DPAdaptiveClipping(noise_multiplier=1.0, verbose=False), strategy=Picky())


@pytest.mark.parametrize(
    "kwargs, field",
    [({}, "noise_multiplier"), ({"noise_multiplier": 1, "target_epsilon": 1}, "noise_multiplier"),
     ({"noise_multiplier": 1, "clip_norm": 0}, "clip_norm"), ({"noise_multiplier": 1, "delta": 2}, "delta"),
     ({"noise_multiplier": 1, "accountant": "gdp"}, "accountant"),
     ({"noise_multiplier": 1, "weighted_estimator": True}, "weight_cap")],
)
def test_bad_config_names_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        DPFixedClipping(**kwargs)


@pytest.mark.parametrize("mechanism", ["DPFixedClipping", "DPAdaptiveClipping", "LocalDP", "DPSGD"])
@pytest.mark.parametrize(
    "kwargs, match",
    [({}, "exactly one"), ({"noise_multiplier": 1, "target_epsilon": 1}, "exactly one"),
     ({"noise_multiplier": -1}, "noise_multiplier must be"), ({"target_epsilon": 0}, "target_epsilon must be > 0"),
     ({"noise_multiplier": 1, "delta": 1.5}, r"delta must be in \(0, 1\)"),
     ({"noise_multiplier": 1, "accountant": "gdp"}, "accountant must be 'pld' or 'rdp'")],
)
def test_every_accounted_mechanism_checks_its_budget_the_same_way(mechanism, kwargs, match):
    with pytest.raises(ValueError, match=match):
        PRIVACY.get(mechanism)(**kwargs)


def test_max_epsilon_and_dpsgd_zero_noise_are_refused():
    for name in ("DPFixedClipping", "LocalDP"):
        with pytest.raises(ValueError, match="max_epsilon must be > 0"):
            PRIVACY.get(name)(noise_multiplier=1.0, max_epsilon=0.0)
    with pytest.raises(ValueError, match=r"noise_multiplier must be > 0, got 0"):
        PRIVACY.get("DPSGD")(noise_multiplier=0.0)
    assert LocalDP(noise_multiplier=0.0).noise_multiplier == 0.0  # a clipping-only baseline stays allowed


# ---------------------------------------------------------------------- adaptive clipping
def test_adaptive_noise_multiplier_formula():
    assert adaptive_update_noise_multiplier(1.0, 2.0) == pytest.approx((1 - 1 / 16) ** -0.5)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        adaptive_update_noise_multiplier(1.0, 0.5)
    mech = setup(DPAdaptiveClipping(noise_multiplier=0.2, verbose=False))  # m = 10: sigma_b = m/20 = 0.5
    assert mech.sigma_b == pytest.approx(0.5)
    assert mech.update_noise_multiplier == pytest.approx((0.2**-2 - 1.0**-2) ** -0.5)
    with pytest.raises(ValueError, match="clipped_count_stddev"):
        setup(DPAdaptiveClipping(noise_multiplier=1.0, verbose=False))  # 2 sigma_b = 1 <= z


def test_adaptive_defaults_are_the_papers():
    mech = DPAdaptiveClipping(noise_multiplier=1.0, verbose=False)
    assert (mech.initial_clip, mech.target_quantile, mech.clip_learning_rate) == (0.1, 0.5, 0.2)


@pytest.mark.parametrize("side", ["server", "client"])
def test_adaptive_clip_shrinks_when_most_updates_fit(side):
    mech = setup(DPAdaptiveClipping(noise_multiplier=0.0, clipped_count_stddev=1e-9, clipping=side, verbose=False))
    run_round(mech, [upd(k, [0.01, 0.0]) for k in range(10)])  # all 10 of m=10 unclipped: b~ = 1
    assert mech.clip == pytest.approx(0.1 * math.exp(-0.2 * (1.0 - 0.5)), rel=1e-6)
    metrics = mech.after_round(0, list(range(10)))
    assert metrics["clip_norm"] == pytest.approx(0.1) and metrics["next_clip_norm"] == pytest.approx(mech.clip)


@pytest.mark.parametrize("side", ["server", "client"])
def test_adaptive_clip_grows_when_most_updates_are_clipped(side):
    mech = setup(DPAdaptiveClipping(noise_multiplier=0.0, clipped_count_stddev=1e-9, clipping=side, verbose=False))
    ups = [upd(k, [5.0, 0.0]) for k in range(8)] + [upd(8 + k, [0.01, 0.0]) for k in range(2)]
    agg = run_round(mech, ups)  # b~ = 2 / 10
    assert mech.clip == pytest.approx(0.1 * math.exp(-0.2 * (0.2 - 0.5)), rel=1e-6)
    assert agg.delta_sum[0].item() == pytest.approx(8 * 0.1 + 2 * 0.01, rel=1e-5)  # clipped with C_0 = 0.1
    mech.after_round(0, list(range(10)))
    run_round(mech, [upd(k, [5.0, 0.0]) for k in range(10)], round_idx=1)  # b~ = 0: grows again
    assert mech.clip == pytest.approx(0.1 * math.exp(0.06) * math.exp(0.1), rel=1e-6)


def test_adaptive_noise_uses_the_clip_applied_in_the_round():
    z, dim = 0.3, 40_000
    mech = setup(DPAdaptiveClipping(noise_multiplier=z, initial_clip=2.0, verbose=False))
    zd = mech.update_noise_multiplier
    big = [ClientUpdate(k, torch.zeros(dim).index_fill_(0, torch.tensor([k]), 100.0), 4) for k in range(10)]
    agg = run_round(mech, big)  # all 10 of m = 10 clipped: the clip grows
    assert mech.clip > 2.0
    assert float(agg.mean_delta().std()) == pytest.approx(zd * 2.0 / 10, rel=0.02)  # C_t = 2, not C_{t+1}


def test_adaptive_clip_count_ignores_rejected_updates():
    """The centred clip bits travel in the updates' counts: only accepted (summed) updates count."""
    mech = setup(DPAdaptiveClipping(noise_multiplier=0.0, clipped_count_stddev=1e-9, clipping="client", verbose=False))
    sent = [mech.client_update(upd(k, [0.01]), 0) for k in range(10)]  # all fit, but only 5 are accepted
    agg = StreamingSum()
    for u in sent[:5]:
        agg.add(mech.server_update(u, 0), 1.0)
    out = mech.process_aggregate(agg.result(), 0)
    assert out.counts_sum["dp_unclipped_centred"] == pytest.approx(5 * 0.5, abs=1e-6)
    # centred estimate: sum(b - 1/2) / m + 1/2 = 2.5 / 10 + 0.5
    assert mech.clip == pytest.approx(0.1 * math.exp(-0.2 * (0.75 - 0.5)), rel=1e-6)
    assert not any(isinstance(v, dict) and v for v in vars(mech).values()), "no per-client bookkeeping in the mechanism"


# ---------------------------------------------------------------------- local DP
def test_local_dp_noise_per_client():
    mech = setup(LocalDP(clip_norm=2.0, noise_multiplier=0.5, verbose=False))
    out = mech.client_update(ClientUpdate(7, torch.full((40_000,), 10.0), 4), round_idx=0)
    # clipped to norm 2 (each coordinate 2/200 = 0.01), plus N(0, (0.5 * 2)^2)
    assert float(out.delta.mean()) == pytest.approx(0.01, abs=0.02)
    assert float(out.delta.std()) == pytest.approx(1.0, rel=0.02)
    assert mech.participations == {}  # counted from the cohort after the round, never per update
    assert mech.after_round(0, [7])["epsilon"] == pytest.approx(mech.epsilon(1))
    assert mech.participations == {7: 1}


def test_local_dp_state_round_trips_and_refuses_another_mechanism():
    mech = setup(LocalDP(noise_multiplier=0.5, verbose=False))
    mech.after_round(0, [1, 2])
    mech.after_round(1, [1])
    again = setup(LocalDP(noise_multiplier=0.5, verbose=False))
    again.load_state_dict(mech.state_dict())
    assert again.participations == {1: 2, 2: 1}
    assert again.after_round(2, [])["epsilon"] == pytest.approx(mech.epsilon(2))
    with pytest.raises(ValueError, match="LocalDP"):
        setup(LocalDP(noise_multiplier=1.0, verbose=False)).load_state_dict(mech.state_dict())
