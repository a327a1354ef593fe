"""One process against two (one per core) for the same FedIT round on SmolLM2-135M, against the 2/1 bound.

Runs ``experiments/shakespeare_causal_lora.yaml`` through ``lightfed fit`` twice, changed only in the
round's size and in ``trainer.devices``: ``--clients`` Hamlet speakers, every one of them in every round
(``clients_per_round`` = ``--clients``), ``--local-steps`` steps of ``--batch`` blocks of 64 tokens each, one
torch thread per process, no evaluation until the last round and no generation samples. With ``devices: 2``
(``fabric_strategy: ddp``, gloo) each process trains a balanced shard of the cohort and the shards meet in one
all-reduce; the global model is the same as one process's (tests/test_distributed.py). The time of a round is
rank 0's ``round/seconds`` (its shard's training, the all-reduce and the server step), read back from
TensorBoard; the first round (warm-up) is left out, the median of the others is reported, and the ratio

    speedup = seconds per round (1 process) / seconds per round (2 processes)  (bound: 2)

Also reported: each run's wall seconds (process start, two model loads, the rounds, the final evaluation).
Results are appended to ``--out`` as JSON lines. On a machine where other jobs hold a core the second process
has nothing to run on: measure on a quiet machine. ::

    python benchmarks/llm_processes.py --clients 10 --rounds 3
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CONFIG = ROOT / "experiments" / "shakespeare_causal_lora.yaml"


def round_seconds(root: Path) -> list[float]:
    """Rank 0's ``round/seconds`` of every round, from the run's TensorBoard events."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = sorted(root.rglob("events.out.tfevents*"))
    if not events:
        raise RuntimeError(f"no TensorBoard events under {root}: the run logged nothing.")
    acc = EventAccumulator(str(events[0].parent))
    acc.Reload()
    return [e.value for e in sorted(acc.Scalars("round/seconds"), key=lambda e: e.step)]


def run(args: argparse.Namespace, devices: int) -> dict[str, float]:
    """One ``lightfed fit`` on ``devices`` processes: seconds per round (median after the first), wall."""
    root = Path(tempfile.mkdtemp(prefix=f"llm-processes-{devices}-"))
    overrides = [
        "--data.init_args.partitioner.init_args.max_clients", str(args.clients),
        "--data.init_args.partitioner.init_args.min_size", str(args.min_blocks),
        "--data.init_args.test_subset", str(args.test_blocks),
        "--trainer.clients_per_round", str(args.clients), "--trainer.rounds", str(args.rounds + 1),
        "--trainer.local_steps", str(args.local_steps), "--trainer.batch_size", str(args.batch),
        "--trainer.eval_every", "1000000", "--trainer.checkpoint_every", "0", "--trainer.callbacks=[]",
        "--trainer.num_threads", "1", "--trainer.enable_progress_bar", "false",
        "--trainer.accelerator", "cpu",
        "--trainer.default_root_dir", str(root), "--trainer.devices", str(devices),
    ]
    if devices > 1:
        overrides += ["--trainer.fabric_strategy", "ddp"]
    if args.model:
        overrides += ["--model.init_args.model", args.model, "--data.init_args.model", args.model]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
    start = time.perf_counter()
    out = subprocess.run([sys.executable, "-m", "lightfed.cli", "fit", "--config", str(CONFIG), *overrides],
                         capture_output=True, text=True, env=env, timeout=args.timeout)
    wall = time.perf_counter() - start
    if out.returncode != 0:
        raise RuntimeError(f"devices={devices} failed:\n{out.stderr[-3000:]}")
    seconds = round_seconds(root)
    if len(seconds) != args.rounds + 1:
        raise RuntimeError(
            f"devices={devices}: expected {args.rounds + 1} rounds in TensorBoard, got {len(seconds)}.")
    return {"sec_round": statistics.median(seconds[1:]), "rounds_seconds": seconds, "wall_seconds": wall}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=10)
    p.add_argument("--rounds", type=int, default=3, help="timed rounds (one warm-up round more is run)")
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--min-blocks", type=int, default=4,
                   help="fewest 64-token blocks a speaker needs (Hamlet: 17 speakers at 4)")
    p.add_argument("--test-blocks", type=int, default=8)
    p.add_argument("--model", default=None, help="a model folder or .gguf file (default: packaged SmolLM2)")
    p.add_argument("--timeout", type=int, default=7200)
    p.add_argument("--out", default="benchmarks/results/llm_processes.jsonl")
    args = p.parse_args(argv)
    one, two = run(args, 1), run(args, 2)
    speedup = one["sec_round"] / two["sec_round"]
    row = {"one": one, "two": two, "speedup": speedup, "bound": 2.0, "efficiency": speedup / 2,
           "cpus": os.cpu_count(), "load_average": os.getloadavg(), "args": vars(args)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(f"| processes | s/round | wall s |\n|---|---|---|\n"
          f"| 1 | {one['sec_round']:.1f} | {one['wall_seconds']:.0f} |\n"
          f"| 2 | {two['sec_round']:.1f} | {two['wall_seconds']:.0f} |\n"
          f"speedup {speedup:.2f}x of the 2x bound ({100 * speedup / 2:.0f}%); {args.clients} clients x "
          f"{args.local_steps} steps x {args.batch} x 64 tokens per round; "
          f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
