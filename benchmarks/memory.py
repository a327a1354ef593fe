"""Peak resident memory of FedAvg rounds for one cohort size (run by ``run.py``, one process per size).

A population of ``--population`` clients with W1's sizes (digits tiled so that Dirichlet(0.5) gives 3-29
examples per client) trains ``--rounds`` rounds of ``--clients-per-round`` clients. Printed as JSON:
the peak resident memory (``VmHWM``) when the first round starts (set-up done) and at the end, in MiB.

    python benchmarks/memory.py --clients-per-round 1000 --executor sequential
"""

from __future__ import annotations

import argparse
import json
import math
import resource
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))


def peak_rss_mib() -> float:
    """Peak resident memory of this process in MiB: ``VmHWM`` of ``/proc/self/status``.

    Not ``ru_maxrss``: Linux keeps that across ``exec``, so a child started by a big parent reports the
    parent's peak.
    """
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def current_rss_mib() -> float:
    with open("/proc/self/statm") as f:
        pages = int(f.read().split()[1])
    return pages * resource.getpagesize() / 2**20


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--clients-per-round", type=int, required=True)
    parser.add_argument("--population", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--executor", default="sequential")
    args = parser.parse_args(argv)

    import torch

    torch.set_num_threads(1)
    import lightning as L
    from workloads import TiledDigits

    import lightfed.executors  # noqa: F401 - registers "vmap"
    from lightfed import FederatedTrainer
    from lightfed.data.partition import Dirichlet
    from lightfed.models import MLPClassifier

    copies = max(1, math.ceil(args.population / 100))
    dm = TiledDigits(Dirichlet(num_clients=args.population, alpha=0.5), copies=copies)
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(in_features=64, hidden=[64], lr=0.1)
    marks: dict[str, float] = {}

    class Trainer(FederatedTrainer):
        def run_round(self, round_idx: int):  # type: ignore[no-untyped-def]
            if "setup_peak_mib" not in marks:
                marks["setup_peak_mib"] = peak_rss_mib()
                marks["setup_rss_mib"] = current_rss_mib()
            return super().run_round(round_idx)

    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            rounds=args.rounds, clients_per_round=args.clients_per_round, batch_size=16, eval_every=args.rounds + 1,
            fed_eval_fraction=0.0, checkpoint_every=0, logger=False, enable_progress_bar=False, default_root_dir=tmp,
            executor=args.executor,
        )
        history = trainer.fit(model, dm)
    out = {
        "clients_per_round": args.clients_per_round,
        "population": args.population,
        "executor": args.executor,
        "setup_peak_mib": marks["setup_peak_mib"],
        "peak_mib": peak_rss_mib(),
        "end_rss_mib": current_rss_mib(),
        "seconds_per_round": sum(h["round/seconds"] for h in history) / len(history),
    }
    out["rounds_extra_mib"] = out["peak_mib"] - out["setup_peak_mib"]
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
