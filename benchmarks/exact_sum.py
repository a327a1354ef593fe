"""The exact, order-free round sum (:mod:`lightfed.exact_sum`, issue 24 item 7): what it fixes, what it costs.

1. **1 vs 2 processes on W2**, 5 rounds: the largest ``|difference|`` between the global models after each
   round, with the old float32 sum (``--before-tree``: a checkout of the code before the exact sum, e.g.
   ``git archive 0c41efd | tar -x -C /tmp/before``) and with the exact sum (this tree). Each run is a fresh
   interpreter (``--run``); with ``--processes 2`` Lightning Fabric's launcher re-executes it for rank 1.
2. **The sum's cost per round**, W1 and W2 shapes, one thread, same run: the cohort's updates (W1: 10 of the
   MLP's 4,810 parameters; W2: 5 of the CNN's) added to the old float32 ``StreamingSum`` (kept below as
   :class:`FloatSum`) and to the exact one, then ``result()``; interleaved repeats, medians. With
   ``--before-exact FILE`` (an older ``lightfed/exact_sum.py``: ``git show 6decd53:lightfed/exact_sum.py``),
   its ``ExactSum`` is timed in the same loop too, against this tree's (adds plus ``value()``).
3. **W1 whole rounds**, the trainer with the exact sum against the same trainer with :class:`FloatSum`
   (interleaved repeats, median seconds per round).

    python benchmarks/exact_sum.py --before-tree /tmp/before --json exact_sum.json

Prints a JSON object (``--json`` also writes it).
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
import warnings
from pathlib import Path
from statistics import median

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))


class FloatSum:
    """The float32 ``StreamingSum`` before the exact sum (the baseline): ``acc.add_(x, alpha=w)`` in order."""

    def __init__(self) -> None:
        self.delta_sum = None
        self.extras_sum: dict = {}
        self.counts_sum: dict = {}
        self.weight_sum = 0.0
        self.num_clients = 0

    def add(self, update, weight: float) -> None:
        import torch

        if self.delta_sum is None:
            self.delta_sum = torch.zeros_like(update.delta)
        self.delta_sum.add_(update.delta, alpha=weight)
        for name, value in update.extras.items():
            acc = self.extras_sum.get(name)
            if acc is None:
                acc = self.extras_sum[name] = torch.zeros_like(value)
            acc.add_(value, alpha=weight)
        for name, count in update.counts.items():
            self.counts_sum[name] = self.counts_sum.get(name, 0.0) + float(count)
        self.weight_sum += weight
        self.num_clients += 1

    def result(self):
        from lightfed.messages import RoundAggregate

        if self.delta_sum is None:
            return None
        return RoundAggregate(
            self.delta_sum,
            self.weight_sum,
            self.num_clients,
            self.extras_sum,
            counts_sum=dict(self.counts_sum),
        )


def _quiet() -> None:
    import logging

    warnings.filterwarnings("ignore")
    for name in ("lightning", "lightning.fabric", "lightning.pytorch"):
        logging.getLogger(name).setLevel(logging.ERROR)


# ------------------------------------------------------------------------- 1. W2 on 1 / 2 processes
def run_w2(processes: int, rounds: int, out: str) -> None:
    """W2 through the trainer on ``processes`` CPU processes; rank 0 saves the global model each round."""
    import torch

    torch.set_num_threads(1)
    _quiet()
    from workloads import prepared, w2

    from lightfed import FederatedTrainer
    from lightfed.callbacks import Callback

    class Keep(Callback):
        def __init__(self) -> None:
            self.params: list = []
            self.seconds: list[float] = []

        def on_round_end(self, trainer, result) -> None:
            self.params.append(trainer.global_params.detach().cpu().clone())
            self.seconds.append(float(result.metrics.get("round/seconds", float("nan"))))

    workload = w2(rounds=rounds, warmup=1)
    dm, model = prepared(workload, seed=0)
    keep = Keep()
    kwargs = {"devices": processes, "fabric_strategy": "ddp"} if processes > 1 else {}
    with tempfile.TemporaryDirectory() as tmp:
        trainer = FederatedTrainer(
            rounds=rounds,
            clients_per_round=workload.clients_per_round,
            local_epochs=workload.local_epochs,
            batch_size=workload.batch_size,
            eval_every=rounds,
            fed_eval_fraction=0.0,
            checkpoint_every=0,
            logger=False,
            enable_progress_bar=False,
            default_root_dir=tmp,
            seed=0,
            accelerator="cpu",
            callbacks=[keep],
            **kwargs,
        )
        history = trainer.fit(model, dm)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        torch.save(
            {
                "params": keep.params,
                "seconds": keep.seconds,
                "accuracy": history[-1].get("central/test_acc", float("nan")),
            },
            out,
        )


def w2_processes(before_tree: str | None, rounds: int) -> dict:
    """Max |1-process - 2-process| of the global model after each round, for the old and the exact sum."""
    import torch

    trees = {"exact": str(HERE.parent)}
    if before_tree:
        trees = {"float32 (before)": before_tree, **trees}
    out: dict = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, tree in trees.items():
            runs = {}
            for n in (1, 2):
                path = os.path.join(tmp, f"{label[:5]}-{n}.pt")
                env = {**os.environ, "PYTHONPATH": tree, "OMP_NUM_THREADS": "1"}
                cmd = [
                    sys.executable,
                    str(Path(__file__).resolve()),
                    "--run",
                    "--processes",
                    str(n),
                    "--rounds",
                    str(rounds),
                    "--out",
                    path,
                ]
                done = subprocess.run(cmd, env=env, capture_output=True, text=True)
                if done.returncode != 0:
                    raise RuntimeError(done.stderr[-3000:])
                runs[n] = torch.load(path)
            diffs = [float((a - b).abs().max()) for a, b in zip(runs[1]["params"], runs[2]["params"])]
            out[label] = {
                "max_abs_diff_per_round": diffs,
                "bit_identical": all(torch.equal(a, b) for a, b in zip(runs[1]["params"], runs[2]["params"])),
                "accuracy_1_2": [runs[1]["accuracy"], runs[2]["accuracy"]],
                "seconds_per_round_1_2": [median(runs[1]["seconds"][1:]), median(runs[2]["seconds"][1:])],
            }
    return out


# ---------------------------------------------------------------------------------------- 2. the sum alone
def _before_exact_sum(path: str):
    """``ExactSum`` of an older ``exact_sum.py`` (loaded from ``path``), to time against this tree's."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("exact_sum_before", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.ExactSum


def sum_cost(repeats: int, before_exact: str | None = None) -> dict:
    """Milliseconds to add a round's updates and release the sums: float32 against exact, W1 and W2 shapes."""
    import torch

    from lightfed.exact_sum import ExactSum

    torch.set_num_threads(1)
    from workloads import w1, w2

    from lightfed.aggregation import StreamingSum
    from lightfed.messages import ClientUpdate
    from lightfed.seeding import make_generator

    out = {}
    for workload in (w1(), w2()):
        numel = sum(p.numel() for p in workload.make_model().parameters())
        gen = make_generator(0, "exact_sum_bench")
        updates = [
            ClientUpdate(c, torch.randn(numel, generator=gen) * 1e-2, 100 + c)
            for c in range(workload.clients_per_round)
        ]

        def one_round(cls, updates=updates) -> float:
            start = time.perf_counter()
            agg = cls()
            for u in updates:
                agg.add(u, float(u.num_examples))
            agg.result()
            return time.perf_counter() - start

        def tensor_sum(cls, updates=updates) -> float:
            start = time.perf_counter()
            acc = cls(updates[0].delta)
            for u in updates:
                acc.add(u.delta, float(u.num_examples))
            acc.value()
            return time.perf_counter() - start

        times: dict[str, list[float]] = {"float32": [], "exact": [], "tensor": [], "tensor_before": []}
        before = _before_exact_sum(before_exact) if before_exact else None
        for repeat in range(repeats):
            times["float32"].append(one_round(FloatSum))
            times["exact"].append(one_round(StreamingSum))
            if before is not None:  # each goes first every other repeat
                for label, cls in [("tensor", ExactSum), ("tensor_before", before)][:: 1 - 2 * (repeat % 2)]:
                    times[label].append(tensor_sum(cls))
        f, e = median(times["float32"]) * 1e3, median(times["exact"]) * 1e3
        out[workload.name] = {
            "numel": numel,
            "clients": len(updates),
            "float32_ms": f,
            "exact_ms": e,
            "ratio": e / f,
        }
        if before is not None:
            now, then = median(times["tensor"]) * 1e3, median(times["tensor_before"]) * 1e3
            out[workload.name].update(exact_sum_ms=now, exact_sum_before_ms=then, before_over_now=then / now)
    return out


# ---------------------------------------------------------------------------------------- 3. W1 whole rounds
def w1_rounds(repeats: int) -> dict:
    """Median seconds per W1 round through the trainer, exact sum against :class:`FloatSum` (interleaved)."""
    import torch

    torch.set_num_threads(1)
    _quiet()
    from workloads import run_lightfed, w1

    import lightfed.server as server

    exact = server.StreamingSum
    per_round: dict[str, list[float]] = {"float32": [], "exact": []}
    accuracy = {}
    for _ in range(repeats):
        for label, cls in (("float32", FloatSum), ("exact", exact)):
            server.StreamingSum = cls  # what RoundServer.new_aggregator builds
            try:
                timing = run_lightfed(w1(rounds=20, warmup=5), "sequential", accelerator="cpu")
            finally:
                server.StreamingSum = exact
            per_round[label].append(timing.per_round)
            accuracy[label] = timing.accuracy
    f, e = median(per_round["float32"]), median(per_round["exact"])
    return {"float32_s": f, "exact_s": e, "ratio": e / f, "accuracy": accuracy}


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--before-tree", help="a checkout of lightfed with the old float32 sum (for the 'before')"
    )
    parser.add_argument(
        "--before-exact", help="an older lightfed/exact_sum.py: time its ExactSum against this tree's"
    )
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--only", nargs="*", default=["processes", "cost", "w1"])
    parser.add_argument("--json")
    parser.add_argument("--run", action="store_true", help=argparse.SUPPRESS)  # one W2 run (a subprocess)
    parser.add_argument("--processes", type=int, default=1, help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.run:
        run_w2(args.processes, args.rounds, args.out)
        return
    result: dict = {"load": os.getloadavg()}
    if "cost" in args.only:
        result["sum_cost_per_round"] = sum_cost(args.repeats, args.before_exact)
    if "w1" in args.only:
        result["w1_rounds"] = w1_rounds(max(args.repeats // 2, 1))
    if "processes" in args.only:
        result["w2_1_vs_2_processes"] = w2_processes(args.before_tree, args.rounds)
    text = json.dumps(result, indent=2)
    print(text)
    if args.json:
        Path(args.json).write_text(text + "\n")


if __name__ == "__main__":
    main()
