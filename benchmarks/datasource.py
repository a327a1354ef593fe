"""Set-up time and memory of a LightningDataModule as federated data (issue 21), on 1M synthetic examples.

    OMP_NUM_THREADS=1 PYTHONPATH=$PWD python benchmarks/datasource.py [--examples 1000000]

Each partitioner runs in a fresh process: peak RSS (VmHWM) before and after ``setup()`` and the wall time of
``setup()``, then one client's first batch. The dataset (:class:`lightfed.data.speakers.SpeakerExamples`)
computes examples on read, so what grows is lightfed's own state: the index lists, and the labels or keys.
Labels and keys come from a column (``targets``, ``group_key="speakers"``: no example is read) or from
``label_fn`` / ``key_fn`` (one read and one call per example: measured on ``--fn-examples``).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path


def peak_mib() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM"):
            return int(line.split()[1]) / 1024
    return float("nan")


def one(kind: str, n: int) -> dict:
    import torch

    from lightfed.data.datamodule import LightningDataSource
    from lightfed.data.partition import IID, Dirichlet, Natural
    from lightfed.data.speakers import SpeakersDataModule, label_of, speaker_of

    torch.set_num_threads(1)
    dm = SpeakersDataModule(num_examples=n, num_speakers=1000, num_classes=10)
    before = peak_mib()
    source = {
        "IID": lambda: LightningDataSource(dm, IID(1000)),
        "Dirichlet/targets": lambda: LightningDataSource(dm, Dirichlet(100, alpha=0.5)),
        "Natural/group_key": lambda: LightningDataSource(dm, Natural(), group_key="speakers"),
        "Dirichlet/label_fn": lambda: LightningDataSource(dm, Dirichlet(100, alpha=0.5), label_fn=label_of),
        "Natural/key_fn": lambda: LightningDataSource(dm, Natural(), key_fn=speaker_of),
    }[kind]()
    start = time.perf_counter()
    source.setup()
    seconds = time.perf_counter() - start
    after = peak_mib()
    start = time.perf_counter()
    batch = next(source.client_train(0).batches(16, torch.Generator().manual_seed(0)))
    first = time.perf_counter() - start
    return {"partitioner": kind, "examples": n, "clients": source.num_clients, "setup_s": seconds,
            "peak_rss_before_mib": before, "peak_rss_after_mib": after, "growth_mib": after - before,
            "first_batch_ms": first * 1e3, "batch_shape": list(batch["x"].shape)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=1_000_000)
    parser.add_argument("--fn-examples", type=int, default=100_000,
                        help="examples for the label_fn / key_fn rows (one Python call and one read per example)")
    parser.add_argument("--one", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.one:
        print(json.dumps(one(args.one, args.examples)))
        return
    rows = []
    kinds = [("IID", args.examples), ("Dirichlet/targets", args.examples), ("Natural/group_key", args.examples),
             ("Dirichlet/label_fn", args.fn_examples), ("Natural/key_fn", args.fn_examples)]
    for kind, n in kinds:
        out = subprocess.run([sys.executable, __file__, "--examples", str(n), "--one", kind],
                             capture_output=True, text=True, check=True)
        rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    header = ("partitioner", "examples", "clients", "setup s", "RSS growth MiB", "1st batch ms")
    print(f"{header[0]:<18} {header[1]:>9} {header[2]:>7} {header[3]:>8} {header[4]:>15} {header[5]:>12}")
    for r in rows:
        print(f"{r['partitioner']:<18} {r['examples']:>9} {r['clients']:>7} {r['setup_s']:>8.2f} "
              f"{r['growth_mib']:>15.1f} {r['first_batch_ms']:>12.2f}")
    print(json.dumps(rows))


if __name__ == "__main__":
    main()
