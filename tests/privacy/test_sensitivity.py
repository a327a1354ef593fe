"""Statistical privacy test of every client-level mechanism: effective noise multiplier >= the charged one.

For each mechanism we build the neighbouring cohorts its accountant assumes (add/remove one client for
Poisson and full participation, replace one for a fixed-size cohort, replace one client's data for local
DP) and push both through the server side of a round, as the trainer does. Everything the round
releases to the strategy is measured: the sum, every extra, every count, the client count, the weight sum
and the denominator. With common random numbers (the same seed for both cohorts) the difference of the
two releases is the exact sensitivity; the noise std of each released part is estimated over seeds.
The effective multiplier ``1 / ||(Delta_i / sigma_i)_i||`` must not fall below the multiplier the
accountant charges (within 3 standard errors of the estimate).

Findings of issue 11 this catches: adaptive clipping's uncentred clip count (sensitivity 1 where the noise
split assumes 1/2: 1.551 against 1.650 on the eps-3 config's numbers) and the realised client count
reaching the strategy unnoised (SCAFFOLD read it).
"""

from __future__ import annotations

import copy
import math

import pytest
import torch

from lightfed.messages import ClientUpdate, RoundAggregate, RunInfo
from lightfed.privacy import DPAdaptiveClipping, DPFixedClipping, LocalDP
from lightfed.sampling import FullParticipation, PoissonSampler, UniformSampler
from lightfed.server import RoundServer
from lightfed.strategy import FedAvg

N, DIM = 100, 3
#: Seeds per estimate. The adaptive cases need the precision (the uncentred count gave 1.551 against 1.650,
#: 6% low; 3000 seeds put 3 standard errors at 3.9%); an unnoised release is caught with any number.
TRIALS = {"adaptive": 3000, "other": 800}


def _release(mech, updates: list[ClientUpdate], strategy, round_idx: int = 0) -> RoundAggregate:
    server = RoundServer(strategy, mech, None, DIM)
    shard = server.collect(round_idx, server.new_aggregator(round_idx, [u.client_id for u in updates]), updates)
    out = server.release(round_idx, shard.aggregator)
    assert out is not None
    return out


def _released_parts(agg: RoundAggregate) -> dict[str, torch.Tensor]:
    """Everything a strategy can read from the released aggregate, as float64 vectors by name."""
    parts = {"delta_sum": agg.delta_sum.double().reshape(-1)}
    parts |= {f"extra/{k}": v.double().reshape(-1) for k, v in agg.extras_sum.items()}
    parts |= {f"count/{k}": torch.tensor([float(v)], dtype=torch.float64) for k, v in agg.counts_sum.items()}
    parts["num_clients"] = torch.tensor([float(agg.num_clients)], dtype=torch.float64)
    parts["weight_sum"] = torch.tensor([float(agg.weight_sum)], dtype=torch.float64)
    parts["denominator"] = torch.tensor([float(agg._denominator())], dtype=torch.float64)
    return parts


def effective_multiplier(template, cohort_a, cohort_b, strategy, trials: int) -> tuple[float, float]:
    """``(z_eff, relative standard error)`` of the releases of two neighbouring cohorts."""
    samples: dict[str, list[torch.Tensor]] = {}
    shift: dict = {}
    template = copy.copy(template)
    template.accountant = None  # releasing needs no accountant; copying one per trial would dominate the cost
    for seed in range(trials):
        # shallow copies: a round rebinds (never mutates) the mechanism's per-round attributes (the clip)
        mech_a, mech_b = copy.copy(template), copy.copy(template)
        mech_a.seed = mech_b.seed = seed
        a = _released_parts(_release(mech_a, cohort_a, strategy))
        b = _released_parts(_release(mech_b, cohort_b, strategy))
        assert a.keys() == b.keys(), f"the neighbours release different parts: {sorted(a)} vs {sorted(b)}"
        for k in a:
            samples.setdefault(k, []).append(a[k])
            shift.setdefault(k, []).append(b[k] - a[k])
    for k, rows in shift.items():  # common random numbers: the shift does not depend on the noise draw
        d = torch.stack(rows)
        assert float((d - d[0]).abs().max()) <= 1e-4 * (1 + float(d[0].abs().max())), f"{k}: the shift varies with the seed"
        shift[k] = d[0]
    total, dof = 0.0, math.inf
    for k, rows in samples.items():
        x = torch.stack(rows)
        var = float(x.var(dim=0, unbiased=True).mean())
        norm2 = float(shift[k].pow(2).sum())
        if norm2 < 1e-12:
            continue
        if var < 1e-18:  # released exactly, and it moves with one client: no privacy at all
            return 0.0, 0.0
        total += norm2 / var
        dof = min(dof, trials * x.shape[1])
    z_eff = math.inf if total == 0 else total**-0.5
    return z_eff, math.sqrt(1 / (2 * dof)) if math.isfinite(dof) else 0.0


def _u(cid: int, vec: list[float]) -> ClientUpdate:
    return ClientUpdate(cid, torch.tensor(vec, dtype=torch.float32), num_examples=4)


def _base(k: int = 8) -> list[ClientUpdate]:
    g = torch.Generator().manual_seed(1)
    return [ClientUpdate(c, torch.randn(DIM, generator=g) * 0.3, num_examples=4) for c in range(k)]


def _set_up(mech, sampler):
    mech.setup(RunInfo(num_clients=N, sampler=sampler, rounds=10, strategy=FedAvg(weighted=False), seed=0))
    return mech


# (mechanism, sampler, neighbouring relation)
CASES = {
    "fixed-poisson": (lambda: DPFixedClipping(clip_norm=1.0, noise_multiplier=1.2, verbose=False), PoissonSampler(0.08), "add"),
    "fixed-full": (lambda: DPFixedClipping(clip_norm=1.0, noise_multiplier=1.2, verbose=False), FullParticipation(), "add"),
    "fixed-uniform": (lambda: DPFixedClipping(clip_norm=1.0, noise_multiplier=1.2, verbose=False), UniformSampler(8), "replace"),
    "adaptive-uniform": (
        lambda: DPAdaptiveClipping(initial_clip=1.0, noise_multiplier=1.65, clipped_count_stddev=4.0, verbose=False),
        UniformSampler(8), "replace"),
    "fixed-client-side": (
        lambda: DPFixedClipping(clip_norm=1.0, noise_multiplier=1.2, clipping="client", verbose=False), PoissonSampler(0.08), "add"),
    # the numbers: z = 1.65, sigma_b = 4 (m = 80 there; the split depends on z and sigma_b only)
    "adaptive-poisson": (
        lambda: DPAdaptiveClipping(initial_clip=1.0, noise_multiplier=1.65, clipped_count_stddev=4.0, verbose=False),
        PoissonSampler(0.08), "add"),
    "adaptive-full": (
        lambda: DPAdaptiveClipping(initial_clip=1.0, noise_multiplier=1.65, clipped_count_stddev=4.0, verbose=False),
        FullParticipation(), "add"),
    "adaptive-client-side": (
        lambda: DPAdaptiveClipping(initial_clip=1.0, noise_multiplier=1.65, clipped_count_stddev=4.0, clipping="client",
                                   verbose=False), PoissonSampler(0.08), "add"),
}


def _neighbours(relation: str, clip: float) -> tuple[list[ClientUpdate], list[ClientUpdate]]:
    base = _base()
    # the worst case for a clipped sum plus a clip count: an update just inside the clip (unclipped, bit 1)
    edge = _u(99, [0.999 * clip, 0.0, 0.0])
    if relation == "add":
        return base, [*base, edge]
    far = _u(0, [0.0, -5.0 * clip, 0.0])  # clipped to norm C, bit 0, pointing elsewhere
    return [far, *base[1:]], [edge, *base[1:]]


@pytest.mark.parametrize("case", sorted(CASES))
def test_effective_multiplier_is_at_least_the_charged_one(case):
    make, sampler, relation = CASES[case]
    mech = _set_up(make(), sampler)
    # replace-one: the accountant's event carries z / 2 (sensitivity 2C of the sum, 1 of the centred count)
    charged = mech.z / 2 if mech.scheme.neighbouring == "replace_one" else mech.z
    a, b = _neighbours(relation, mech.current_clip)
    trials = TRIALS["adaptive" if case.startswith("adaptive") else "other"]
    z_eff, se = effective_multiplier(mech, a, b, FedAvg(weighted=False), trials)
    assert z_eff >= charged * (1 - 3 * se), f"{case}: effective multiplier {z_eff:.4f} < charged {charged:.4f} (se {se:.3%})"
    if relation == "add":  # the analysis is tight for add/remove: the charge is not wasted either
        assert z_eff <= charged * (1 + 3 * se) * 1.01, f"{case}: {z_eff:.4f} far above the charge {charged:.4f}"


def test_local_dp_report_multiplier():
    """Local DP: one client's report, its data replaced; the accountant charges z / 2 per report."""
    mech = _set_up(LocalDP(clip_norm=1.0, noise_multiplier=1.0, verbose=False), PoissonSampler(0.08))
    a, b = [_u(0, [0.0, -5.0, 0.0])], [_u(0, [0.0, 5.0, 0.0])]
    z_eff, se = effective_multiplier(mech, a, b, FedAvg(weighted=False), TRIALS["other"])
    assert z_eff >= mech.z / 2 * (1 - 3 * se)
    assert z_eff <= mech.z / 2 * (1 + 3 * se) * 1.01


def test_dp_releases_a_noisy_sum_in_a_round_without_accepted_updates():
    """The DP-FedAvg analysis assumes a noisy sum every round: a round whose updates were all rejected still releases one."""
    mech = _set_up(DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, verbose=False), PoissonSampler(0.08))
    server = RoundServer(FedAvg(weighted=False), mech, None, DIM)
    shard = server.collect(0, server.new_aggregator(0, [3]), [_u(3, [float("nan"), 0.0, 0.0])])
    assert shard.rejected == [3]
    out = server.release(0, shard.aggregator)
    assert out is not None and out.num_clients == pytest.approx(8.0) and out.denominator == pytest.approx(8.0)
    assert float(out.delta_sum.abs().sum()) > 0  # pure noise, std z C per coordinate
    assert "round/skipped" not in out.counts_sum
