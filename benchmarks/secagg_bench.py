"""SecAgg+ overhead versus plain FedAvg aggregation, and per-client cost versus cohort size.

Usage::

    python benchmarks/secagg_bench.py            # the full grid (~5-10 minutes on 2 busy cores)
    python benchmarks/secagg_bench.py --quick    # 100k parameters, cohorts 10 and 100 only

Part 1 times one round's aggregation for models of 100k and 1M parameters and cohorts of 10, 100 and 500,
with and without dropouts (5% of the clients at each of the masked-input and unmasking stages, shown
as "5% + 5%"):

* plain: ``StreamingSum`` -- the trainer's default aggregator (one weighted add per client);
* SecAgg+: the whole simulated protocol -- every client's keys, Shamir shares, encryption, encoding
  and masking, and the server's routing, summing and unmasking (:class:`SecAggPlusAggregator`).

All times are process CPU seconds (``time.process_time``), which a machine shared with other jobs
inflates far less than wall time; torch runs on one thread. Client work is reported per client (a real deployment runs the clients in parallel); server work is
the round total. Part 2 shows per-client cost against ``log n`` (SecAgg+ degree ``k = 2 ceil(log2 n)``)
next to the all-pairs graph of the original SecAgg (``k = n - 1``). Local training is not included.
Updates are drawn from a small pool of random vectors so that generating them costs nothing.
Prints Markdown tables (copied into docs/secure_aggregation.md).
"""

from __future__ import annotations

import argparse
import math
import platform
import time

import torch

from lightfed.aggregation import StreamingSum
from lightfed.messages import ClientUpdate
from lightfed.secagg import SecAggPlus
from lightfed.seeding import make_generator
from lightfed.strategy import FedAvg

POOL = 4


def updates(numel: int, cohort: int) -> list[ClientUpdate]:
    pool = [torch.randn(numel, generator=make_generator(0, "bench", i)) * 0.01 for i in range(POOL)]
    return [ClientUpdate(c, pool[c % POOL], num_examples=10 + c % 5, metrics={"loss": 1.0}) for c in range(cohort)]


def plain_seconds(batch: list[ClientUpdate]) -> float:
    start = time.process_time()
    agg = StreamingSum()
    for u in batch:
        agg.add(u, float(u.num_examples))
    agg.result()
    return time.process_time() - start


def secagg_round(batch: list[ClientUpdate], dropout: float, num_neighbours: int | None = None) -> dict[str, float]:
    protocol = SecAggPlus(
        max_weight=16.0, clip=1.0, record_vectors=False, num_neighbours=num_neighbours, max_dropout=0.3,
        dropout={"masked_input": dropout, "unmasking": dropout}, timer="cpu",
    )
    protocol.setup(strategy=FedAvg(), privacy=None, numel=batch[0].delta.numel(), seed=0)
    start = time.process_time()
    agg = protocol.aggregator(0, [u.client_id for u in batch])
    for u in batch:
        agg.add(u, float(u.num_examples))
    result = agg.result()
    total = time.process_time() - start
    m = protocol.round_metrics()
    return {"total": total, "ok": result is not None, **m}


def part1(sizes: list[int], cohorts: list[int], dropouts: list[float]) -> None:
    print("| params | clients | dropout | plain sum (CPU s) | SecAgg+ round (CPU s) | x plain | client (ms/client) | "
          "server (s) | unmask (s) | k | up (KB/client) | up / plain | failed |")
    print("|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for numel in sizes:
        for n in cohorts:
            batch = updates(numel, n)
            plain = min(plain_seconds(batch) for _ in range(2))
            for p in dropouts:
                r = secagg_round(batch, p)
                print(
                    f"| {numel:,} | {n} | {f'{p:.0%} + {p:.0%}' if p else 'none'} | {plain:.3f} | {r['total']:.2f} | {r['total'] / plain:.0f} | "
                    f"{1000 * r['client_seconds']:.1f} | {r['server_seconds']:.2f} | {r['reconstruction_seconds']:.2f} | "
                    f"{r['neighbours']:.0f} | {r['bytes_up_per_client'] / 1000:.1f} | {r['upload_expansion']:.3f} | "
                    f"{'yes' if not r['ok'] else 'no'} |",
                    flush=True,
                )


def part2(numel: int, cohorts: list[int], all_pairs: list[int]) -> None:
    print(f"\nPer-client cost vs cohort size ({numel:,} parameters, no dropout)\n")
    print("| graph | clients | log2 n | k | client (ms/client) | up (KB/client) | down (KB/client) |")
    print("|---|---:|---:|---:|---:|---:|---:|")
    rows = [("SecAgg+", n, None) for n in cohorts] + [("all pairs", n, n - 1) for n in all_pairs]
    for name, n, k in rows:
        r = secagg_round(updates(numel, n), 0.0, num_neighbours=k)
        print(
            f"| {name} | {n} | {math.log2(n):.1f} | {r['neighbours']:.0f} | {1000 * r['client_seconds']:.1f} | "
            f"{r['bytes_up_per_client'] / 1000:.1f} | {r['bytes_down_per_client'] / 1000:.1f} |",
            flush=True,
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="100k parameters, cohorts 10 and 100 only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    print(f"# SecAgg+ benchmark ({platform.processor() or platform.machine()}, torch threads = 1)\n")
    if args.quick:
        part1([100_000], [10, 100], [0.0, 0.05])
        part2(100_000, [10, 100], [10, 100])
        return
    start = time.perf_counter()
    part1([100_000, 1_000_000], [10, 100, 500], [0.0, 0.05])
    part2(100_000, [10, 30, 100, 300, 1000], [10, 30, 100, 300])
    print(f"\ntotal benchmark time: {time.perf_counter() - start:.0f} s")


if __name__ == "__main__":
    main()
