"""One client visit, lightfed against a plain PyTorch visit, and the cost of each per-visit item.

    python benchmarks/visit.py            # A/B of a visit (issue-2 clients), then the items in isolation
    python benchmarks/visit.py --workload w1   # the same on W1's uneven clients (3-29 examples)

A/B: the same 10 clients, interleaved repeats, CPU time per visit (25th percentile of the repeats):
``plain`` copies the global weights, builds ``SGD`` and steps over pre-cut batches; ``fit_client`` is
``LocalTrainer.fit_client``; ``executor + NaN screen`` adds the sequential executor, the datamodule lookup and
``ClientUpdate.is_finite``. Items: each operation alone, best of 5 x 3,000 calls (a torch op inside the
training loop costs several times its isolated figure).
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parent))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", choices=["issue2", "w1"], default="issue2")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from workloads import cohorts, issue2, prepared, w1

    from lightfed import FederatedTrainer
    from lightfed.client import seed_device_rng
    from lightfed.seeding import derive_seed, make_generator

    workload = issue2() if args.workload == "issue2" else w1()
    dm, model = prepared(workload)
    trainer = FederatedTrainer(rounds=1, logger=False, enable_progress_bar=False, checkpoint_every=0,
                               default_root_dir=tempfile.mkdtemp(), fed_eval_fraction=0.0)
    trainer._setup(model, dm)
    local, g = trainer.executor.local, trainer.global_params
    net = copy.deepcopy(model.net)
    params = list(net.parameters())
    numels = [p.numel() for p in params]
    cids = cohorts(workload, dm.num_clients)[0]  # the first round's cohort
    pre = {c: list(dm.client_train(c).batches(16, make_generator(0, "batches", 0, c, 0))) for c in cids}

    def plain() -> None:
        for c in cids:
            with torch.no_grad():
                for p, v in zip(params, torch.split(g, numels)):
                    p.copy_(v.view_as(p))
            opt = torch.optim.SGD(params, lr=0.1)
            for x, y in pre[c]:
                opt.zero_grad(set_to_none=True)
                F.cross_entropy(net(x), y).backward()
                opt.step()
            torch.cat([p.detach().reshape(-1) for p in params]) - g

    def fit_client() -> None:
        for c in cids:
            local.fit_client(c, 0, dm.client_train(c), g, {}, {})

    def executor() -> None:
        for update in trainer.executor.run(0, cids, dm.client_train, g, {}, lambda c: {}):
            update.is_finite()

    fns = {"plain visit": plain, "fit_client": fit_client, "executor + NaN screen": executor}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for _ in range(40):
        for name, fn in fns.items():
            t = time.process_time()
            for _ in range(20):
                fn()
            times[name].append((time.process_time() - t) / (20 * len(cids)) * 1e6)
    base = sorted(times["plain visit"])[len(times["plain visit"]) // 4]
    print(f"A/B of one {workload.name} client visit (CPU us, 25th percentile of 40 repeats)")
    for name, v in times.items():
        q = sorted(v)[len(v) // 4]
        print(f"  {name:24s} {q:7.1f} us  {q / base:.3f}x")

    t = torch.randn(4810)
    data = dm.client_train(3)
    gen = torch.Generator()

    def best(fn, n: int = 3000) -> float:  # type: ignore[no-untyped-def]
        out = math.inf
        for _ in range(5):
            s = time.perf_counter()
            for _ in range(n):
                fn()
            out = min(out, (time.perf_counter() - s) / n * 1e6)
        return out

    items = {
        "isfinite(t).all() (4,810 floats)": lambda: bool(torch.isfinite(t).all()),
        "isfinite(float(t.sum()))": lambda: math.isfinite(float(t.sum())),
        "module.configure_optimizers()": lambda: model.configure_optimizers(),
        "SGD(params)": lambda: torch.optim.SGD(params, lr=0.1),
        "derive_seed": lambda: derive_seed(0, "client_rng", 3, 17),
        "seed_device_rng (CPU)": lambda: seed_device_rng(12345, torch.device("cpu")),
        "shuffled batches of a client": lambda: list(data.batches(16, gen)),
        "torch profiler range (record_function)": lambda: torch.autograd.profiler.record_function("x").__enter__().__exit__(None, None, None),
    }
    print("items in isolation (wall us, best of 5 x 3,000)")
    for name, fn in items.items():
        print(f"  {name:34s} {best(fn):7.2f} us")


if __name__ == "__main__":
    main()
