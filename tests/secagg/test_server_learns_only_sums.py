"""Under secure aggregation the server learns sums only: adaptive clipping's clip bits and DP-SGD's accounting.

Issue 11, finding 4: adaptive clipping counted each client's clip bit in the (server-side) mechanism,
outside the secure sum. Now the centred bit rides inside the masked vector. The test that proves it is an
invariance: two rounds whose clients clip differently but whose *sums* of bits are equal leave the server
(its view of the protocol, and every privacy or strategy state it keeps) in the same state.
"""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from lightfed.messages import ClientUpdate, RunInfo
from lightfed.privacy import DPSGD, DPAdaptiveClipping
from lightfed.sampling import PoissonSampler
from lightfed.secagg import SecAggPlus
from lightfed.server import RoundServer
from lightfed.strategy import FedAvg

DIM = 4


def _updates(clipped: set[int]) -> list[ClientUpdate]:
    """Six clients; those in ``clipped`` send a long update (clipped at C = 0.5), the others a short one."""
    out = []
    for cid in range(6):
        v = torch.zeros(DIM)
        v[cid % DIM] = 3.0 if cid in clipped else 0.1
        out.append(ClientUpdate(cid, v, num_examples=4))
    return out


def _round(mech, updates):
    strategy = FedAvg(weighted=False)
    protocol = SecAggPlus(clip=1.0, max_weight=1.0, record_vectors=True)
    protocol.setup(strategy=strategy, privacy=mech, numel=DIM, seed=0)
    server = RoundServer(strategy, mech, protocol, DIM)
    shard = server.collect(0, server.new_aggregator(0, list(range(6))), updates)
    aggregate = server.release(0, shard.aggregator)
    return protocol.last_view, aggregate


def _adaptive():
    mech = DPAdaptiveClipping(initial_clip=0.5, noise_multiplier=0.0, clipped_count_stddev=1e-9, clipping="client",
                              verbose=False)
    mech.setup(RunInfo(num_clients=20, sampler=PoissonSampler(0.3), rounds=3,
                       strategy=FedAvg(weighted=False), seed=0))
    return mech


def test_adaptive_clip_bits_are_secure_summed_not_counted_per_client():
    a_mech, b_mech = _adaptive(), _adaptive()
    view_a, agg_a = _round(a_mech, _updates({0, 1}))
    view_b, agg_b = _round(b_mech, _updates({4, 5}))  # other clients clipped, same number of them
    # the count arrived as a sum inside the secure aggregate: 4 unclipped, 2 clipped -> sum(b - 1/2) = 1
    assert agg_a.counts_sum["dp_unclipped_centred"] == pytest.approx(1.0, abs=1e-4)
    assert a_mech.clip == pytest.approx(b_mech.clip, rel=1e-9)  # the server's state depends on the sum only
    assert a_mech.__dict__.keys() == b_mech.__dict__.keys()
    for key, value in vars(a_mech).items():
        assert not (isinstance(value, dict) and value), f"the mechanism keeps per-client data in {key!r}"
    # what the server saw: masked vectors (uniform-looking) and the unmasked *sum* of the inputs
    assert view_a.unmasked_sum is not None and not view_a.failed
    encoded_bits = []
    for _cid, masked in view_a.masked_inputs.items():
        assert masked.dtype.kind in "ui" and len(np.unique(masked)) > len(masked) // 2
        encoded_bits.append(int(masked[-2]))  # the count coordinate, masked: no 0/1 pattern survives
    assert len(set(encoded_bits)) == len(encoded_bits)


def test_dpsgd_accounting_needs_no_per_client_message_under_secure_aggregation():
    """DP-SGD charges every cohort member from the public schedule: the same ledger whatever the updates say."""
    def ledger(scale: float):
        mech = DPSGD(max_grad_norm=1.0, noise_multiplier=1.0, verbose=False)
        mech.setup(RunInfo(num_clients=6, sampler=PoissonSampler(0.5), rounds=2,
                           strategy=FedAvg(weighted=False), seed=0, client_num_examples=[8, 8, 16, 16, 32, 32]))
        mech.schedule = (8, 1, None)  # batch 8, one local epoch (what wrap_local_trainer records)
        updates = [ClientUpdate(c, torch.full((DIM,), scale * (c + 1)), num_examples=4) for c in range(6)]
        _round(mech, updates)
        mech.after_round(0, list(range(6)))
        return copy.deepcopy(mech.clients)

    a, b = ledger(0.01), ledger(0.3)
    assert a == b
    assert a[0] == [1.0, 1.0, 1] and a[2] == [0.5, 1.0, 2] and a[4] == [0.25, 1.0, 4]  # p = B/n, steps = n/B
