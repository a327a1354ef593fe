"""Virtual time to a target accuracy (synchronous FedAvg, deadline + over-selection, FedBuff; with and
without DP) and the simulator's overhead (events per second, memory against the population).

Measured, not a unit test. One torch thread; every number of a table comes from one invocation.

    python benchmarks/time_table.py --table            # docs/time.md's tables
    python benchmarks/time_table.py --overhead         # 10,000 clients, 1,000 flushes, and the memory sweep
    python benchmarks/time_table.py --clock-checkpoint # what checkpointing the clock costs (bytes, seconds)

The table's setting: digits, 400 IID clients (~3.6 examples each), logistic regression (lr 0.3), 4 local
steps of batch 8 per visit, the synthetic trace ``SyntheticTrace(seed=0, median_ms_per_sample=50,
compute_sigma=1)`` (a visit's median compute 1.6 virtual seconds, the slowest percent about 10x that;
everyone online). Targets are central test accuracy; a row that never reaches a target says so. About 5
minutes for ``--table`` and 3 for ``--overhead`` on one core of a busy machine.
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
import time
import tracemalloc
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

TARGETS = (0.8, 0.85, 0.9)


def trace() -> Any:
    from lightfed.simtime import SyntheticTrace

    return SyntheticTrace(seed=0, median_ms_per_sample=50.0, compute_sigma=1.0)


def run(
    mode: str,
    *,
    dp: bool,
    rounds: int,
    clients: int = 400,
    k: int = 10,
    concurrency: int = 100,
    eval_every: int = 5,
    partitioner: Any = None,
    seed: int = 0,
    max_participations: int = 5,
) -> dict[str, Any]:
    """One timed run; returns its history's time/accuracy pairs and the wall seconds."""
    import lightning as L

    from lightfed import FederatedTrainer
    from lightfed.data.datasets import DigitsDataModule
    from lightfed.data.partition import IID
    from lightfed.models import MLPClassifier
    from lightfed.simtime import BufferedAsync, DPCappedParticipation, SyncRounds
    from lightfed_zoo.strategies import FedBuff

    if mode == "sync":
        clock: Any = SyncRounds(trace=trace())
    elif mode == "deadline":
        clock = SyncRounds(trace=trace(), deadline=3.0, over_selection=1.3, stragglers="drop")
    else:
        clock = BufferedAsync(trace=trace(), concurrency=concurrency)
    privacy = (
        DPCappedParticipation(
            clip_norm=0.5, target_epsilon=8.0, max_participations=max_participations, verbose=False
        )
        if dp
        else None
    )
    strategy = FedBuff(server_lr=1.0)  # uniform weights (DP needs them); s(tau) = 1 in synchronous rounds
    L.seed_everything(seed, verbose=False)
    model = MLPClassifier(in_features=64, hidden=[], lr=0.3)
    data = DigitsDataModule(partitioner or IID(clients), val_fraction=0.0)
    with tempfile.TemporaryDirectory() as tmp:
        trainer = FederatedTrainer(
            rounds=rounds,
            clients_per_round=k,
            local_steps=4,
            batch_size=8,
            strategy=strategy,
            privacy=privacy,
            clock=clock,
            eval_every=eval_every,
            fed_eval_fraction=0.0,
            checkpoint_every=0,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=tmp,
            seed=seed,
        )
        start = time.perf_counter()
        history = trainer.fit(model, data)
        wall = time.perf_counter() - start
    curve = [(h["time/virtual_seconds"], h["central/test_acc"]) for h in history if "central/test_acc" in h]
    out: dict[str, Any] = {
        "mode": mode,
        "dp": dp,
        "rounds": len(history),
        "wall_seconds": round(wall, 1),
        "virtual_seconds": round(history[-1]["time/virtual_seconds"], 1),
        "final_acc": round(curve[-1][1], 4),
        "events": int(history[-1].get("time/events", 0)),
        "curve": curve,
    }
    for target in TARGETS:
        hit = next((t for t, acc in curve if acc >= target), None)
        out[f"seconds_to_{target}"] = None if hit is None else round(hit, 1)
    if dp:
        out["epsilon"] = round(history[-1]["privacy/epsilon"], 3)
        out["noise_multiplier"] = round(history[-1]["privacy/noise_multiplier"], 4)
    return out


#: (label, mode, K, rounds or flushes): synchronous rounds of 10 (and of 100, FedBuff's concurrency), FedBuff.
ROWS = (
    ("FedAvg, m=10", "sync", 10, 100),
    ("FedAvg, m=100", "sync", 100, 30),
    ("deadline 3 s, select 13 keep 10", "deadline", 10, 100),
    ("deadline 3 s, select 130 keep 100", "deadline", 100, 30),
    ("FedBuff K=10 C=100", "fedbuff", 10, 200),
    ("FedBuff K=40 C=100", "fedbuff", 40, 50),
)


def table(args: argparse.Namespace) -> list[dict[str, Any]]:
    rows = []
    for dp in (False, True):
        for label, mode, k, rounds in ROWS:
            # under DP every visit counts against the cap: give each row the cap its length needs
            visits = rounds * (math.ceil(1.3 * k) if mode == "deadline" else k) + (
                100 if mode == "fedbuff" else 0
            )
            cap = math.ceil(visits / 400) + 1
            row = {
                "label": label,
                "k": k,
                **run(mode, dp=dp, rounds=rounds, k=k, max_participations=cap, eval_every=1),
            }
            if dp:
                row["max_participations"] = cap
            rows.append(row)
            print(json.dumps({key: v for key, v in row.items() if key != "curve"}), flush=True)
    return rows


class NoTraining:
    """A backend that trains nothing (a fixed tiny update): the engine's own cost, per event."""

    def __init__(self, num_clients: int) -> None:
        from lightfed.simtime import SyntheticTrace

        self.num_clients, self.seed, self.trace = (
            num_clients,
            0,
            SyntheticTrace(seed=0, median_ms_per_sample=50.0),
        )
        self.params = torch.zeros(650)

    @property
    def global_params(self) -> torch.Tensor:
        return self.params

    def planned_steps(self, client_id: int) -> int:
        return 4

    def visit_time(self, client_id: int, steps: int) -> Any:
        return self.trace.profile(client_id).seconds(samples=steps * 8, bytes_down=2600, bytes_up=2600)

    def train(self, client_id: int, visit_idx: int, global_params: torch.Tensor, steps: int | None) -> Any:
        from lightfed.messages import ClientUpdate

        return ClientUpdate(client_id, torch.full_like(global_params, 1e-3), 1, 4)

    def flush(self, round_idx: int, cohort: list[int], updates: list[Any]) -> Any:
        from lightfed.messages import RoundResult

        self.params = self.params + sum(u.delta for u in updates) / len(updates)
        return RoundResult(round_idx, cohort, len(updates))


def engine_only(population: int, flushes: int, k: int = 10, concurrency: int = 100) -> dict[str, float]:
    from lightfed.simtime import BufferedAsync

    engine = BufferedAsync(trace=NoTraining(population).trace, concurrency=concurrency)
    engine.start(NoTraining(population), buffer_size=k)
    start = time.perf_counter()
    for r in range(flushes):
        engine.run_round(None, r)
    wall = time.perf_counter() - start
    tracemalloc.start()  # a second, shorter run for the engine's Python heap (tracemalloc slows it down)
    again = BufferedAsync(trace=NoTraining(population).trace, concurrency=concurrency)
    again.start(NoTraining(population), buffer_size=k)
    for r in range(min(flushes, 200)):
        again.run_round(None, r)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
    return {
        "population": population,
        "flushes": flushes,
        "events": engine.counts["events"],
        "events_per_second": round(engine.counts["events"] / wall),
        "wall_seconds": round(wall, 2),
        "heap_peak_mib_200_flushes": round(peak / 2**20, 2),
    }


def overhead(args: argparse.Namespace) -> dict[str, Any]:
    from population import SampledClients

    out: dict[str, Any] = {}
    for population in args.populations:
        out[f"engine_only_{population}"] = engine_only(population, args.overhead_flushes)
        print(json.dumps(out[f"engine_only_{population}"]), flush=True)
    row = run(
        "fedbuff",
        dp=False,
        rounds=args.overhead_flushes,
        partitioner=SampledClients(args.population),
        eval_every=args.overhead_flushes,
    )
    row.pop("curve")
    row["population"] = args.population
    row["events_per_second"] = round(row["events"] / row["wall_seconds"])
    row["peak_rss_mib"] = round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)
    out["digits_fedbuff"] = row
    print(json.dumps(row), flush=True)
    return out


def clock_checkpoint(population: int = 10_000, flushes: int = 200, k: int = 10, concurrency: int = 100) -> dict:
    """Bytes and seconds of the clock's part of a checkpoint: FedBuff K=10, C=100, a 650-parameter model."""
    import io

    from lightfed import integrity
    from lightfed.simtime import BufferedAsync

    engine = BufferedAsync(trace=NoTraining(population).trace, concurrency=concurrency)
    engine.start(NoTraining(population), buffer_size=k)
    for r in range(flushes):
        engine.run_round(None, r)
    reps = 20
    start = time.perf_counter()
    for _ in range(reps):
        state = engine.state_dict()
    collect = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for _ in range(reps):
        buf = io.BytesIO()
        torch.save(state, buf)
    save = (time.perf_counter() - start) / reps
    start = time.perf_counter()
    for _ in range(reps):
        integrity.digest({"clock": state})
    digest = (time.perf_counter() - start) / reps
    again = BufferedAsync(trace=NoTraining(population).trace, concurrency=concurrency)
    again.start(NoTraining(population), buffer_size=k)
    start = time.perf_counter()
    again.load_state_dict(torch.load(io.BytesIO(buf.getvalue()), weights_only=True))
    load = time.perf_counter() - start
    return {
        "population": population, "flushes": flushes, "concurrency": concurrency, "model_floats": 650,
        "clock_bytes": buf.tell(), "events_pending": len(state["clock"]["events"]),
        "versions_held": len(state["snapshots"]), "participations_entries": len(state["participations"]),
        "state_dict_ms": round(collect * 1e3, 3), "torch_save_ms": round(save * 1e3, 3),
        "integrity_digest_ms": round(digest * 1e3, 3), "load_ms": round(load * 1e3, 3),
    }


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--table", action="store_true")
    parser.add_argument("--overhead", action="store_true")
    parser.add_argument("--clock-checkpoint", action="store_true")
    parser.add_argument("--population", type=int, default=10_000)
    parser.add_argument("--overhead-flushes", type=int, default=1000)
    parser.add_argument("--populations", type=int, nargs="*", default=[1_000, 10_000, 100_000])
    parser.add_argument("--out", type=str, default=None, help="write the JSON here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    result: dict[str, Any] = {}
    if args.table:
        result["table"] = table(args)
    if args.overhead:
        result["overhead"] = overhead(args)
    if args.clock_checkpoint:
        result["clock_checkpoint"] = clock_checkpoint()
        print(json.dumps(result["clock_checkpoint"]), flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
