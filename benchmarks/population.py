"""Start-up time and memory for a large client population (run by ``run.py``, one process per size).

Clients are lazy: a client is a slice of one index vector into the pooled tensors (CSR layout), never a
copy of its examples. To show that memory does not grow with the population, the pool stays the same
(sklearn's 1,437 training digits) while the population grows: :class:`SampledClients` gives each client
3-29 examples drawn from the pool (clients overlap; a benchmark device, not a partitioner for studies).
What grows is two index vectors, 8 bytes per client-example.

Printed as JSON: seconds to build the datamodule (partition + per-client validation split), to set up
the trainer and run the first round, steady seconds per round, and the peak resident memory (``VmHWM``)
in MiB. With
``--partitioners`` it also times lightfed's real ``IID`` and ``QuantitySkew`` partitioners on a label vector
of ``15 x population`` examples (labels only: the time is the partitioner's, not data loading's).

    python benchmarks/population.py --population 100000 --clients-per-round 100
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import torch
from torch import Tensor

sys.path.insert(0, str(Path(__file__).resolve().parent))

from lightfed.data.client_data import Partition  # noqa: E402
from lightfed.data.partition import Partitioner  # noqa: E402
from lightfed.seeding import make_generator  # noqa: E402


class SampledClients(Partitioner):
    """Benchmark-only: client ``i`` holds ``U{min_size..max_size}`` examples drawn from the pool (overlapping)."""

    def __init__(self, num_clients: int, min_size: int = 3, max_size: int = 29) -> None:
        self.num_clients, self.min_size, self.max_size = num_clients, min_size, max_size

    def partition(self, labels: Tensor, seed: int, groups: Tensor | None = None) -> Partition:
        gen = make_generator(seed, "sampled_clients")
        sizes = torch.randint(self.min_size, self.max_size + 1, (self.num_clients,), generator=gen)
        offsets = torch.zeros(self.num_clients + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(sizes, 0)
        indices = torch.randint(0, len(labels), (int(offsets[-1]),), generator=gen)
        return Partition(indices, offsets)


def peak_rss_mib() -> float:
    """Peak resident memory in MiB (``VmHWM``; ``ru_maxrss`` would report a big parent's peak)."""
    from memory import peak_rss_mib as peak

    return peak()


def time_partitioners(population: int) -> dict[str, float]:
    """Seconds lightfed's IID and QuantitySkew partitioners take for ``population`` clients of ~15 examples."""
    from lightfed.data.partition import IID, QuantitySkew

    labels = torch.randint(0, 10, (15 * population,), generator=make_generator(0, "labels"))
    out = {}
    parts = (("iid", IID(num_clients=population)), ("quantity_skew", QuantitySkew(num_clients=population, min_size=3)))
    for name, part in parts:
        t0 = time.perf_counter()
        part.partition(labels, seed=0)
        out[f"partition_{name}_seconds"] = time.perf_counter() - t0
    return out


def main(argv: list[str] | None = None) -> dict[str, float]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--population", type=int, required=True)
    parser.add_argument("--clients-per-round", type=int, default=100)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--executor", default="sequential")
    parser.add_argument("--partitioners", action="store_true")
    parser.add_argument("--val-fraction", type=float, default=0.0, help="per-client validation split")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)

    import lightning as L

    import lightfed.executors  # noqa: F401 - registers "vmap"
    from lightfed import FederatedTrainer
    from lightfed.data.datasets import DigitsDataModule
    from lightfed.models import MLPClassifier

    out: dict[str, float] = {"population": args.population, "clients_per_round": args.clients_per_round,
                             "val_fraction": args.val_fraction}
    t0 = time.perf_counter()
    dm = DigitsDataModule(SampledClients(args.population), val_fraction=args.val_fraction)
    dm.setup("fit")
    out["datamodule_setup_seconds"] = time.perf_counter() - t0
    L.seed_everything(0, verbose=False)
    model = MLPClassifier(in_features=64, hidden=[64], lr=0.1)
    starts: list[float] = []

    class Trainer(FederatedTrainer):
        def run_round(self, round_idx: int):  # type: ignore[no-untyped-def]
            if not starts:
                out["setup_peak_mib"] = peak_rss_mib()
            starts.append(time.perf_counter())
            return super().run_round(round_idx)

    t1 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        trainer = Trainer(
            rounds=args.rounds, clients_per_round=args.clients_per_round, batch_size=16,
            eval_every=args.rounds + 1, fed_eval_fraction=0.0, checkpoint_every=0, logger=False,
            enable_progress_bar=False, default_root_dir=tmp, executor=args.executor,
        )
        history = trainer.fit(model, dm)
    out["trainer_setup_seconds"] = starts[0] - t1
    out["first_round_seconds"] = history[0]["round/seconds"]
    steady = [h["round/seconds"] for h in history[1:]] or [history[0]["round/seconds"]]
    out["seconds_per_round"] = sorted(steady)[len(steady) // 2]
    out["start_to_first_round_end_seconds"] = out["datamodule_setup_seconds"] + out["trainer_setup_seconds"] + out["first_round_seconds"]
    out["index_bytes"] = float((dm.train_part.indices.numel() + dm.train_part.offsets.numel()) * 8)
    out["peak_mib"] = peak_rss_mib()
    out["rounds_extra_mib"] = out["peak_mib"] - out["setup_peak_mib"]
    if args.partitioners:  # after the peak is read: the 1.5M-label vectors are not part of a run
        out.update(time_partitioners(args.population))
    print(json.dumps(out))
    return out


if __name__ == "__main__":
    main()
