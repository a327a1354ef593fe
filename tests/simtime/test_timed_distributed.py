"""Timed runs on several ranks equal one process: the same event order and the same model bits.

Two real processes (gloo; marked distributed and slow: each CLI test takes about a minute on the shared
2 cores), and ranks simulated as threads around the real round server and exact merge (fast).

Every rank runs the same clock; a round's (or flush's) clients train at positions ``rank::2`` and the round
server sums them with the exact all-reduce. Prepare: the example configs, shortened; Execute: one process and
two; Assert: ``torch.equal`` on every exported tensor and equal per-round virtual times and policy counts.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[2]
SHORT = ["--trainer.logger", "false", "--trainer.enable_progress_bar", "false", "--trainer.fed_eval_fraction", "0.0",
         "--trainer.checkpoint_every", "0"]
TWO = ["--trainer.devices", "2", "--trainer.accelerator", "cpu", "--trainer.fabric_strategy", "ddp"]


def fit(config: str, root: Path, *args: str) -> None:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [sys.executable, "-m", "lightfed.cli", "fit", "--config", str(REPO / "experiments" / config), *SHORT,
           "--trainer.default_root_dir", str(root), *args]
    out = subprocess.run(cmd, capture_output=True, text=True, env=env, timeout=300, cwd=REPO)
    assert out.returncode == 0, out.stderr[-3000:]


def schedule(root: Path) -> list[dict[str, float]]:
    history = torch.load(root / "checkpoints" / "last.ckpt", weights_only=True)["progress"]["history"]
    return [{k: v for k, v in h.items() if k.startswith(("time/", "privacy/", "round/updates"))} for h in history]


def assert_one_equals_two(tmp_path: Path, config: str, *args: str) -> None:
    fit(config, tmp_path / "one", *args, "--trainer.devices", "1")
    fit(config, tmp_path / "two", *args, *TWO)
    a, b = (load_file(str(tmp_path / d / "global_model.safetensors")) for d in ("one", "two"))
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert schedule(tmp_path / "one") == schedule(tmp_path / "two")


@pytest.mark.slow
@pytest.mark.distributed
def test_fedbuff_on_two_processes_equals_one_and_resumes_across_process_counts(tmp_path):
    """FedBuff with visits training from stale versions on both ranks; a checkpoint with visits in flight
    written on 2 processes resumes on 1, and one written on 1 resumes on 2, with the same bits."""
    args = ["--trainer.rounds", "6", "--trainer.eval_every", "6", "--trainer.checkpoint_every", "3"]
    assert_one_equals_two(tmp_path, "time_fedbuff.yaml", *args)
    fit("time_fedbuff.yaml", tmp_path / "two_then_one", *args, "--ckpt_path",
        str(tmp_path / "two" / "checkpoints" / "round-00003.ckpt"))
    fit("time_fedbuff.yaml", tmp_path / "one_then_two", *args, *TWO, "--ckpt_path",
        str(tmp_path / "one" / "checkpoints" / "round-00003.ckpt"))
    a = load_file(str(tmp_path / "one" / "global_model.safetensors"))
    for mixed in ("two_then_one", "one_then_two"):
        c = load_file(str(tmp_path / mixed / "global_model.safetensors"))
        assert all(torch.equal(a[k], c[k]) for k in a), mixed


@pytest.mark.slow
@pytest.mark.distributed
def test_sync_rounds_with_deadline_on_two_processes_equal_one(tmp_path):
    assert_one_equals_two(tmp_path, "time_deadline.yaml", "--trainer.rounds", "4", "--trainer.eval_every", "4")


@pytest.mark.slow
@pytest.mark.distributed
def test_fedbuff_with_capped_dp_on_two_processes_equals_one_noise_included(tmp_path):
    assert_one_equals_two(tmp_path, "time_fedbuff_dp.yaml", "--trainer.rounds", "6", "--trainer.eval_every", "6")


@pytest.mark.slow
@pytest.mark.distributed
def test_the_two_process_example_config_equals_time_fedbuff(tmp_path):
    args = ["--trainer.rounds", "3", "--trainer.eval_every", "3"]
    fit("time_fedbuff.yaml", tmp_path / "one", *args)
    fit("time_fedbuff_2proc.yaml", tmp_path / "two", *args)
    a, b = (load_file(str(tmp_path / d / "global_model.safetensors")) for d in ("one", "two"))
    assert all(torch.equal(a[k], b[k]) for k in a)


class RankBackend:
    """Rank ``rank`` of ``world_size`` simulated in a thread: real round server, exact sums, a shared reduce."""

    def __init__(self, rank: int, world_size: int, exchange: dict | None = None) -> None:
        from lightfed.params import ParamSpec
        from lightfed.server import RoundServer
        from lightfed.simtime import SyntheticTrace
        from lightfed_zoo.strategies import FedBuff

        self.rank, self.world_size, self.exchange = rank, world_size, exchange
        self.num_clients, self.seed = 12, 0
        self.params = torch.zeros(5)
        strategy = FedBuff(server_lr=0.7)
        strategy.setup(ParamSpec(names=("w",), shapes=(torch.Size([5]),), is_buffer=(False,)), 12, self.params)
        self.server = RoundServer(strategy, numel=5)
        self.server.expect_training = False
        self.trace = SyntheticTrace(seed=0, online_fraction=0.7)
        self.trained: list[int] = []

    @property
    def global_params(self) -> torch.Tensor:
        return self.params

    def planned_steps(self, client_id: int) -> int:
        return 2

    def visit_time(self, client_id: int, steps: int):
        return self.trace.profile(client_id).seconds(samples=16 * steps, bytes_down=20, bytes_up=20)

    def train(self, client_id: int, visit_idx: int, global_params: torch.Tensor, steps: int | None):
        from lightfed.messages import ClientUpdate

        self.trained.append(visit_idx)
        target = torch.randn(5, generator=torch.Generator().manual_seed(1000 * visit_idx + client_id))
        return ClientUpdate(client_id, (target - global_params).sin() / 3, num_examples=1, num_steps=1)

    def reduce(self, shard):
        from lightfed.distributed import merge_in_process

        ex = self.exchange
        assert ex is not None
        ex["slots"][self.rank] = shard
        ex["barrier"].wait()
        with ex["lock"]:
            merged = merge_in_process(list(ex["slots"]), 5, torch.device("cpu"))
        ex["barrier"].wait()
        return merged

    def flush(self, round_idx: int, cohort: list[int], updates: list):
        reduce = self.reduce if self.world_size > 1 else None
        outcome = self.server.run(round_idx, cohort, updates, self.params, reduce=reduce)
        self.params = outcome.global_params
        return outcome.result


def run_ranks(world_size: int, flushes: int = 8) -> tuple[list[RankBackend], list[list[dict[str, float]]]]:
    import threading

    from lightfed.simtime import BufferedAsync, SyntheticTrace

    exchange = {"slots": [None] * world_size, "barrier": threading.Barrier(world_size, timeout=30),
                "lock": threading.Lock()}
    backends = [RankBackend(r, world_size, exchange) for r in range(world_size)]
    metrics: list[list[dict[str, float]]] = [[] for _ in range(world_size)]

    errors: list[BaseException] = []

    def rank(r: int) -> None:
        try:
            engine = BufferedAsync(trace=SyntheticTrace(seed=0, online_fraction=0.7), concurrency=5)
            engine.start(backends[r], buffer_size=3)
            for f in range(flushes):
                result = engine.run_round(None, f)
                metrics[r].append({k: v for k, v in result.metrics.items() if k.startswith("time/")})
        except BaseException as err:  # noqa: BLE001 - reported by the test, never a hung thread
            errors.append(err)
            exchange["barrier"].abort()

    threads = [threading.Thread(target=rank, args=(r,), daemon=True) for r in range(world_size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    return backends, metrics


@pytest.mark.parametrize("world_size", [2, 3])
def test_buffered_async_sharded_over_ranks_equals_one_rank_in_process(world_size):
    """The fast composition: ranks as threads, the real server and exact merge; no process start-up."""
    (one,), (single,) = run_ranks(1)
    ranks, metrics = run_ranks(world_size)

    for backend, m in zip(ranks, metrics):
        assert torch.equal(backend.params, one.params)
        assert m == single  # the same event order, staleness and counts on every rank
    shares = [set(b.trained) for b in ranks]
    assert set().union(*shares) == set(one.trained) and sum(map(len, shares)) == len(one.trained)
    assert all(shares)  # every rank trained some visits
    assert max(m["time/staleness_max"] for m in single) > 0
