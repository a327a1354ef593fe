"""W2 on one and on several processes (one torch thread each): rounds sharded over ranks, one all-reduce.

Run by ``run.py --only scaling`` once per process count. With ``--processes N > 1`` this script is the
entry point Lightning Fabric's launcher re-executes for ranks 1..N-1 (``devices=N``, ``strategy="ddp"`` on
CPU, gloo); every rank trains its balanced shard of the round's cohort and rank 0 prints the timings as
JSON on the last line of stdout (the other ranks print nothing).

    python benchmarks/scaling.py --processes 2 --clients-per-round 6

``--plain`` times the plain PyTorch loop in this one process instead; ``run.py`` starts two of those at
once to measure what the machine itself gives two single-threaded processes (the ceiling of any 2-process
speed-up here: two vCPUs can share a physical core, caches and memory bandwidth).

Throughput is also bounded by the shard of the slowest rank: W2's cohort of 5 equal-sized clients splits 3 + 2
over two ranks, so two processes can go at most 5/3 = 1.67x as fast as one; a cohort of 6 splits 3 + 3
(at most 2x).
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import warnings
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--processes", type=int, default=1)
    parser.add_argument("--clients-per-round", type=int, default=5)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--plain", action="store_true", help="time the plain PyTorch loop instead (one process)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads of this process")
    args = parser.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    from workloads import run_lightfed, run_plain, w2

    workload = w2(rounds=args.rounds, warmup=args.warmup)
    workload.clients_per_round = args.clients_per_round
    if args.plain:
        timing = run_plain(workload)
    else:
        kwargs = {"devices": args.processes, "fabric_strategy": "ddp"} if args.processes > 1 else {}
        timing = run_lightfed(workload, "sequential", accelerator="cpu", **kwargs)
    if int(os.environ.get("LOCAL_RANK", "0")) != 0:  # Fabric's launcher sets LOCAL_RANK for ranks 1..N-1
        return
    print(json.dumps({
        "processes": args.processes, "threads": args.threads, "clients_per_round": args.clients_per_round, "rounds": args.rounds,
        "warmup": args.warmup, "seconds_per_round": timing.per_round, "round_seconds": timing.round_seconds,
        "accuracy": timing.accuracy,
    }))


if __name__ == "__main__":
    main()
