"""Helpers shared by the secure-aggregation tests: seeded updates, one-round drivers, uniformity tests."""

from __future__ import annotations

import numpy as np
import torch
from scipy import stats

from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.secagg import SecAggPlus, SecAggPlusAggregator
from lightfed.seeding import make_generator
from lightfed.strategy import FedAvg


def make_protocol(numel: int = 500, seed: int = 0, **kwargs) -> SecAggPlus:
    kwargs.setdefault("max_weight", 8.0)  # make_updates weights are 1..7
    protocol = SecAggPlus(**kwargs)
    protocol.setup(strategy=FedAvg(), privacy=None, numel=numel, seed=seed)
    return protocol


def make_updates(cohort: list[int], numel: int, scale: float = 0.3, metrics: bool = True) -> list[ClientUpdate]:
    """Deterministic updates with coordinates uniform in ``[-scale, scale]`` and a loss metric."""
    out = []
    for cid in cohort:
        gen = make_generator(99, "test-update", cid)
        delta = (torch.rand(numel, generator=gen) * 2 - 1) * scale
        out.append(ClientUpdate(cid, delta, num_examples=1 + cid % 7, metrics={"loss": 0.5 + 0.1 * cid} if metrics else {}))
    return out


def run_round(
    protocol: SecAggPlus, updates: list[ClientUpdate], round_idx: int = 0, weights: list[float] | None = None
) -> tuple[SecAggPlusAggregator, RoundAggregate | None]:
    """Drive one round the way the trainer does: aggregator(), add() per client, result()."""
    cohort = [u.client_id for u in updates]
    agg = protocol.aggregator(round_idx, cohort)
    weights = weights if weights is not None else [float(u.num_examples) for u in updates]
    for update, weight in zip(updates, weights):
        agg.add(update, weight)
    return agg, agg.result()


def encodings(
    protocol: SecAggPlus, agg: SecAggPlusAggregator, updates: list[ClientUpdate], weights: list[float] | None = None
) -> dict[int, np.ndarray]:
    """Every client's encoded input x_u, recomputed from the public encoding (the test's oracle)."""
    weights = weights if weights is not None else [float(u.num_examples) for u in updates]
    assert agg.layout is not None
    return {u.client_id: protocol.encode(u, w, agg.round_idx, agg.layout, agg.noise)[0] for u, w in zip(updates, weights)}


def modular_sum(vectors: list[np.ndarray], modulus_bits: int) -> np.ndarray:
    total = np.zeros_like(vectors[0])
    for v in vectors:
        np.add(total, v, out=total)
    return total & total.dtype.type(2**modulus_bits - 1)


def high_bits_pvalue(vector: np.ndarray, modulus_bits: int, bits: int = 8) -> float:
    """Chi-square p-value that the top ``bits`` bits of the residues are uniform over ``2**bits`` bins."""
    top = (vector.astype(np.uint64) >> np.uint64(modulus_bits - bits)).astype(np.int64)
    counts = np.bincount(top, minlength=2**bits)
    return float(stats.chisquare(counts).pvalue)


def ks_pvalue(vector: np.ndarray, modulus_bits: int) -> float:
    """Kolmogorov-Smirnov p-value of ``residue / 2**b`` against Uniform[0, 1)."""
    return float(stats.kstest(vector.astype(np.float64) / 2.0**modulus_bits, "uniform").pvalue)
