"""Composition harness: every privacy mechanism x every registered strategy x secure aggregation on/off.

Each combination either trains to the same global model on two (simulated) ranks as on one, bit for bit,
or is refused before training with a message that names the reason. Two ranks are simulated in one
process the way Fabric runs them: each rank owns its own module, strategy, privacy mechanism and client
states, trains its shard of the cohort (:func:`lightfed.distributed.shard_cohort`), and the shards are
merged by the same packing the real all-reduce uses (:func:`lightfed.distributed.merge_in_process`). So a
mechanism that counts anything on its own shard (the adaptive-clipping bug of issue 11) gives another model
here exactly as it did on two gloo processes. ``tests/test_distributed.py`` runs real 2-process checks.
"""

from __future__ import annotations

import inspect
import math
import threading

import pytest
import torch

from lightfed import FederatedTrainer, PoissonSampler
from lightfed.data.partition import IID
from lightfed.distributed import merge_in_process
from lightfed.privacy import DPSGD, DPAdaptiveClipping, DPFixedClipping, LocalDP
from lightfed.registry import STRATEGIES, load_all_plugins
from tests.conftest import BoringFederatedData, boring_model

load_all_plugins()

PRIVACY = {
    "none": lambda: None,
    "DPFixedClipping": lambda: DPFixedClipping(clip_norm=0.5, noise_multiplier=0.8, verbose=False),
    "DPAdaptiveClipping": lambda: DPAdaptiveClipping(initial_clip=0.3, noise_multiplier=0.5, clipped_count_stddev=1.0,
                                                     verbose=False),
    "LocalDP": lambda: LocalDP(clip_norm=0.5, noise_multiplier=0.3, verbose=False),
    "DPSGD": lambda: DPSGD(max_grad_norm=1.0, noise_multiplier=0.7, verbose=False),
}
ROUNDS = 2


def make_strategy(name: str, private: bool):
    cls = STRATEGIES.get(name)
    kwargs = {}
    params = inspect.signature(cls).parameters
    if private and "weighted" in params:  # client-level DP needs uniform weights (or the weighted estimator)
        kwargs["weighted"] = False
    if "f" in params:  # Byzantine-robust rules: tolerate one attacker in a cohort of 6
        kwargs["f"] = 1
    return cls(**kwargs)


def make_trainer(strategy_name: str, privacy_name: str, secagg: bool, devices: int = 1) -> FederatedTrainer:
    secure = None
    if secagg:
        from lightfed.secagg import SecAggPlus

        secure = SecAggPlus(clip=4.0, max_weight=64.0)
    privacy = PRIVACY[privacy_name]()
    if secagg and privacy is not None and hasattr(privacy, "clipping"):
        privacy.clipping = "client"  # the server never holds an update to clip under secure aggregation
    return FederatedTrainer(
        rounds=ROUNDS, sampler=PoissonSampler(0.6), strategy=make_strategy(strategy_name, privacy is not None),
        privacy=privacy, secure_aggregation=secure, local_steps=2, batch_size=8, fed_eval_fraction=0,
        logger=False, enable_progress_bar=False, default_root_dir="unused", accelerator="cpu", devices=devices,
        fabric_strategy="ddp" if devices > 1 else "auto",
    )


def set_up(trainer: FederatedTrainer) -> FederatedTrainer:
    trainer._setup(boring_model(lr=0.05), BoringFederatedData(IID(num_clients=20), n=160))
    return trainer


def run_one(trainer: FederatedTrainer) -> list[dict[str, float]]:
    out = []
    for r in range(ROUNDS):
        out.append(trainer.run_round(r).metrics)
    return out


class InProcessReduce:
    """Two simulated ranks in two threads, one at a time: each trains and collects its shard, then both
    take the merge that the real all-reduce computes (:func:`merge_in_process`), as gloo gives each rank."""

    def __init__(self, world_size: int, numel: int, device: torch.device) -> None:
        self.turn = threading.Lock()  # one rank runs at a time: the global RNG and torch's threads are shared
        self.barrier = threading.Barrier(world_size)
        self.shards: list = [None] * world_size
        self.numel, self.device = numel, device

    def for_rank(self, rank: int):
        def reduce(shard):
            self.shards[rank] = shard
            self.turn.release()
            self.barrier.wait()
            self.turn.acquire()
            return merge_in_process(self.shards, self.numel, self.device)

        return reduce


def run_two_ranks(ranks: list[FederatedTrainer]) -> list[dict[str, float]]:
    out: list = []
    for r in range(ROUNDS):
        cohorts = [t.sample(r) for t in ranks]
        assert cohorts[0] == cohorts[1], "every rank samples the same cohort"
        hub = InProcessReduce(2, ranks[0].spec.numel, ranks[0].global_params.device)
        results: list = [None, None]

        def play(rank: int, hub=hub, results=results, r=r, cohort=cohorts[0]) -> None:
            with hub.turn:
                results[rank] = ranks[rank].play_round(r, cohort, rank, 2, hub.for_rank(rank))

        threads = [threading.Thread(target=play, args=(rank,)) for rank in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        out = [res.metrics for res in results]
    return out


def comparable(metrics: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in metrics.items() if k.startswith(("privacy/", "strategy/"))}


COMBOS = [(s, p, sa) for p in PRIVACY for s in sorted(STRATEGIES.names()) for sa in (False, True)]


@pytest.mark.parametrize(("strategy", "privacy", "secagg"), COMBOS, ids=[f"{s}-{p}-{'secagg' if a else 'plain'}" for s, p, a in COMBOS])
def test_two_ranks_equal_one_or_refused_before_training(strategy, privacy, secagg):
    try:
        one = set_up(make_trainer(strategy, privacy, secagg))
    except (ValueError, TypeError) as err:
        message = str(err)
        assert len(message) > 40 and any(w in message for w in ("strategy", "privacy", "secure", "DP", "clip", "weight")), message
        return
    if secagg:  # one process runs the protocol; two ranks are refused before any training, with the reason
        with pytest.raises(ValueError, match="secure_aggregation runs the protocol in one process"):
            make_trainer(strategy, privacy, secagg, devices=2)._setup(boring_model(), BoringFederatedData())
        run_one(one)
        assert all(math.isfinite(float(v)) for v in one.global_params)
        return
    ranks = [set_up(make_trainer(strategy, privacy, secagg)) for _ in range(2)]
    single = run_one(one)
    double = run_two_ranks(ranks)
    torch.testing.assert_close(ranks[0].global_params, ranks[1].global_params, atol=0, rtol=0)
    assert torch.equal(one.global_params, ranks[0].global_params)  # exact, order-free sums (lightfed/exact_sum.py)
    a, b = comparable(single[-1]), comparable(double[0])
    assert comparable(double[0]) == comparable(double[1])
    assert a.keys() == b.keys()
    for k in a:
        assert a[k] == pytest.approx(b[k], rel=1e-6, abs=1e-9), k
    assert one.client_states.keys() == ranks[0].client_states.keys()
