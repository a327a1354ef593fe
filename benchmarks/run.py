"""lightfed's speed and memory benchmarks, one command (issue 2's ratio, issue 5's W1/W2/memory/scale).

    python benchmarks/run.py                        # every section, about 10 minutes on 2 busy cores
    python benchmarks/run.py --only w1 issue2       # some sections
    python benchmarks/run.py --quick                # fewer rounds and repeats (a smoke run)
    python benchmarks/run.py --json results.json    # also write every number
    python benchmarks/run.py --only w1 issue2 --lockstep   # W1 / issue2 with the methods taking turns round by round

Sections (``--only``):

* ``startup``    fresh interpreter to the end of the first round, lightfed vs a plain script;
* ``w1``         W1 through a plain PyTorch loop, lightfed's sequential and vmap executors, and sequential
                 with client-level DP (the DP row: clipping, noise and the accountant against ``sequential``);
* ``issue2``     the issue-2 workload (100 IID clients of ~15 digits), lightfed vs plain;
* ``w2``         W2 (32x32 digits, CNN) lightfed vs plain, with one and with two torch threads;
* ``scaling``    W2 on one and on two processes (one torch thread each, gloo), cohorts of 5 and 6 clients;
* ``memory``     peak RSS of W1-sized rounds with 10, 100 and 1,000 clients per round (one process each);
* ``population`` 1,000 vs 100,000 clients: start-up, seconds per round of 100, peak RSS;
* ``malloc``     W1 in child processes with and without the glibc malloc settings below;
* ``flower``     W1 through Flower's simulation, only if ``flwr`` is importable.

Speed sections run in this one process with one torch thread (W2 also with two). Methods are interleaved
and repeated; each figure is the median steady-state round (warm-up rounds skipped) of the best repeat,
which is what the machine can do when other jobs leave it alone. Ratios compare figures of one run.
``--lockstep`` (W1 / issue2) goes further on a shared machine: within a repeat the methods run in threads that
take turns one round at a time (:class:`workloads.Lockstep`), so the rounds compared ran seconds apart at most,
and it adds the **paired CPU ratio**: the median over repeats and steady rounds of (method's round r) /
(plain loop's round r of the same repeat).

glibc malloc: ``--malloc tuned`` re-executes the runner with ``MALLOC_MMAP_THRESHOLD_`` and
``MALLOC_TRIM_THRESHOLD_`` set (see :data:`MALLOC_ENV`), so freed tensors stay in the heap instead of being
unmapped and page-faulted back in; the ``malloc`` section measures both. On these workloads it made no
difference beyond noise (glibc's own thresholds adapt upwards after the first freed block, to 32 MiB, above
every tensor here), so the default is ``--malloc default``: glibc as it comes.
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from statistics import median
from typing import Any

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

#: glibc tunables: never serve allocations with mmap below 1 GiB, never give the heap back below 1 GiB.
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": str(2**30), "MALLOC_TRIM_THRESHOLD_": str(2**30)}
SECTIONS = ("startup", "w1", "issue2", "w2", "scaling", "memory", "population", "malloc", "flower")


# ---------------------------------------------------------------------------------------- helpers
def machine() -> dict[str, Any]:
    import torch

    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "torch": torch.__version__,
        "load_average": os.getloadavg(), "malloc_env": {k: os.environ.get(k) for k in MALLOC_ENV},
    }


def child(args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run a benchmark script in a fresh process and parse the JSON on its last line."""
    out = subprocess.run(
        [sys.executable, *args], capture_output=True, text=True, env={**os.environ, **(env or {})}, cwd=HERE.parent
    )
    if out.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed:\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def table(title: str, rows: list[tuple[str, ...]], header: tuple[str, ...]) -> None:
    widths = [max(len(str(r[i])) for r in [header, *rows]) for i in range(len(header))]
    print(f"\n== {title}")
    for r in [header, *rows]:
        print("  ".join(str(c).ljust(w) for c, w in zip(r, widths)))


# ---------------------------------------------------------------------------------------- speed
def dp_kwargs() -> dict[str, Any]:
    """The DP row's trainer arguments: client-level DP with a fixed clip on W1's fixed-size cohort of 10.

    FedAvg is uniform (client-level DP refuses example-count weights); against ``sequential`` it differs only
    in one scalar weight per client, so the two rows compare the cost of DP: clipping, noise, accounting.
    """
    from lightfed.privacy import DPFixedClipping
    from lightfed.strategy import FedAvg

    return {"privacy": DPFixedClipping(clip_norm=1.0, noise_multiplier=1.0, verbose=False),
            "strategy": FedAvg(weighted=False)}


def speed(
    workload_name: str, methods: list[str], repeats: int, rounds: int | None, warmup: int | None, lockstep: bool = False
) -> dict[str, Any]:
    """Interleave the methods ``repeats`` times; keep each method's best (lowest) median round.

    ``lockstep``: within a repeat the methods take turns round by round (:class:`workloads.Lockstep`), so
    round ``r`` of each method runs in the same few milliseconds of the machine's life.
    """
    from workloads import WORKLOADS, Lockstep, run_lightfed, run_plain

    kwargs = {k: v for k, v in (("rounds", rounds), ("warmup", warmup)) if v is not None}
    workload = WORKLOADS[workload_name](**kwargs)
    best: dict[str, Any] = {}
    best_cpu: dict[str, float] = {}

    def one(method: str) -> Any:
        if method.startswith("plain"):
            return run_plain(workload, shuffle_per_visit=method == "plain_shuffled")
        if method == "sequential_channels_last":
            timing = run_lightfed(WORKLOADS[workload_name](**kwargs, channels_last=True), executor="sequential")
            timing.label = "lightfed sequential, channels-last"
            return timing
        if method == "sequential_dp":
            timing = run_lightfed(workload, executor="sequential", **dp_kwargs())
            timing.label = "lightfed sequential, DP (DPFixedClipping z=1, C=1, PLD accountant)"
            return timing
        return run_lightfed(workload, executor=method)

    paired: dict[str, list[float]] = {m: [] for m in methods}  # lockstep: round r of a method / round r of plain
    for _ in range(repeats):
        if lockstep:
            timings = Lockstep(methods).run({m: (lambda m=m: one(m)) for m in methods})
            for method in methods:
                paired[method] += [a / b for a, b in zip(timings[method].steady_cpu, timings["plain"].steady_cpu)]
        else:
            timings = {m: one(m) for m in methods}
        for method in methods:
            timing = timings[method]
            if method not in best or timing.per_round < best[method].per_round:
                best[method] = timing
            best_cpu[method] = min(best_cpu.get(method, float("inf")), timing.cpu_per_round)
    base, base_cpu = best["plain"].per_round, best_cpu["plain"]
    rows = [
        (t.label, f"{t.per_round:.5f}", f"{t.per_round / base:.2f}x", f"{best_cpu[m]:.5f}",
         f"{best_cpu[m] / base_cpu:.2f}x", *((f"{median(paired[m]):.2f}x",) if lockstep else ()), f"{t.accuracy:.3f}")
        for m, t in best.items()
    ]
    table(
        f"{workload.name}: {workload.description}; {workload.rounds} rounds, {workload.warmup} warm-up, "
        f"best of {repeats}{', lockstep' if lockstep else ''}",
        rows, ("method", "wall s/round", "vs plain", "CPU s/round", "vs plain",
               *(("paired CPU ratio",) if lockstep else ()), "final acc"),
    )
    return {
        "workload": workload.name, "description": workload.description, "rounds": workload.rounds,
        "warmup": workload.warmup, "repeats": repeats, "lockstep": lockstep,
        "methods": {m: {"seconds_per_round": t.per_round, "ratio_vs_plain": t.per_round / base,
                        "cpu_seconds_per_round": best_cpu[m], "cpu_ratio_vs_plain": best_cpu[m] / base_cpu,
                        "accuracy": t.accuracy, "rounds": t.round_seconds, "cpu_rounds": t.cpu_seconds,
                        **({"paired_cpu_ratio_median": median(paired[m])} if lockstep else {})}
                    for m, t in best.items()},
    }


def section_w2(args: argparse.Namespace) -> dict[str, Any]:
    import torch

    out = {}
    methods = ["plain", "sequential", *(["sequential_channels_last"] if args.w2_channels_last else []),
               *(["vmap"] if args.w2_vmap else [])]
    for threads in args.w2_threads:
        torch.set_num_threads(threads)
        print(f"\n-- torch threads: {threads}")
        out[f"threads_{threads}"] = speed("W2", methods, args.w2_repeats, args.w2_rounds, 1)
    torch.set_num_threads(1)
    return out


# ---------------------------------------------------------------------------------------- processes
def section_startup(args: argparse.Namespace) -> dict[str, Any]:
    times: dict[str, list[float]] = {"plain": [], "plain+lightning": [], "lightfed": []}
    for _ in range(1 if args.quick else 3):
        for mode in times:
            t0 = time.perf_counter()
            subprocess.run([sys.executable, str(HERE / "startup.py"), mode], check=True, capture_output=True, cwd=HERE.parent)
            times[mode].append(time.perf_counter() - t0)
    best = {m: min(v) for m, v in times.items()}
    table("start-up: fresh interpreter to the end of the first W1-like round (best of runs)",
          [(m, f"{s:.2f}", f"{s - best['plain']:+.2f}") for m, s in best.items()], ("script", "seconds", "vs plain"))
    return {"seconds": best, "all": times, "difference": best["lightfed"] - best["plain"]}


def _concurrent(commands: list[list[str]], env: dict[str, str]) -> list[dict[str, Any]]:
    """Run the scripts at the same time, each in its own process; parse each one's last stdout line."""
    procs = [subprocess.Popen([sys.executable, *c], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                              env={**os.environ, **env}, cwd=HERE.parent) for c in commands]
    outs = [p.communicate() for p in procs]
    for p, (_, err) in zip(procs, outs):
        if p.returncode != 0:
            raise RuntimeError(f"scaling run failed:\n{err[-3000:]}")
    return [json.loads(o.strip().splitlines()[-1]) for o, _ in outs]


def section_scaling(args: argparse.Namespace) -> dict[str, Any]:
    """W2 on 1 and 2 processes (``benchmarks/scaling.py``), and the machine's own 2-process ceiling.

    The ceiling: the plain loop alone, then two plain loops at once (independent processes, no
    communication); ``2 * alone / together`` is what two single-threaded processes can gain on this machine.
    Each figure is the best of ``--scaling-repeats`` interleaved runs.
    """
    rounds = "2" if args.quick else str(args.scaling_rounds)
    env = {"OMP_NUM_THREADS": "1"}
    base = [str(HERE / "scaling.py"), "--rounds", rounds, "--warmup", "1"]
    runs: dict[Any, dict[str, Any]] = {}

    def keep(key: Any, r: dict[str, Any]) -> None:
        if key not in runs or r["seconds_per_round"] < runs[key]["seconds_per_round"]:
            runs[key] = r

    for _ in range(1 if args.quick else args.scaling_repeats):
        keep("plain alone", child([*base, "--plain"], env=env))
        keep("plain 2 threads", child([*base, "--plain", "--threads", "2"], env={"OMP_NUM_THREADS": "2"}))
        together = _concurrent([[*base, "--plain"], [*base, "--plain"]], env)
        keep("plain together", max(together, key=lambda r: r["seconds_per_round"]))
        for cohort in (5, 6):
            for procs in (1, 2):
                keep((cohort, procs), child([*base, "--processes", str(procs), "--clients-per-round", str(cohort)], env=env))
    ceiling = 2 * runs["plain alone"]["seconds_per_round"] / runs["plain together"]["seconds_per_round"]
    rows = []
    for cohort in (5, 6):
        one, two = runs[cohort, 1], runs[cohort, 2]
        bound = cohort / -(-cohort // 2)  # the slowest rank trains ceil(cohort / 2) equal clients
        rows.append((str(cohort), f"{one['seconds_per_round']:.2f}", f"{two['seconds_per_round']:.2f}",
                     f"{one['seconds_per_round'] / two['seconds_per_round']:.2f}x", f"{bound:.2f}x",
                     f"{min(bound, ceiling):.2f}x", f"{one['accuracy']:.4f} / {two['accuracy']:.4f}"))
    table("scaling: W2 on 1 and 2 processes, one torch thread each (s/round, steady state)", rows,
          ("clients/round", "1 process", "2 processes", "speed-up", "bound (client granularity)",
           "bound (also machine)", "final acc 1 / 2"))
    print(f"   the plain W2 loop (5 clients/round) on one process with two torch threads: "
          f"{runs['plain 2 threads']['seconds_per_round']:.2f} s/round")
    print(f"   machine: the plain W2 loop alone {runs['plain alone']['seconds_per_round']:.2f} s/round, two at once "
          f"{runs['plain together']['seconds_per_round']:.2f} s/round each: two processes gain at most {ceiling:.2f}x")
    return {"ceiling": ceiling, "runs": {str(k): v for k, v in runs.items()}}


def section_memory(args: argparse.Namespace) -> dict[str, Any]:
    rows, out = [], []
    for executor in ("sequential", "vmap"):
        for m in (10, 100, 1000):
            r = child([str(HERE / "memory.py"), "--clients-per-round", str(m), "--executor", executor,
                       "--rounds", "2" if args.quick else "3"])
            out.append(r)
            rows.append((executor, str(m), f"{r['setup_peak_mib']:.1f}", f"{r['peak_mib']:.1f}",
                         f"{r['rounds_extra_mib']:.1f}", f"{r['seconds_per_round']:.3f}"))
    table("memory: FedAvg on a 1,000-client W1-sized population, one process per row (peak RSS = VmHWM, MiB)", rows,
          ("executor", "clients/round", "peak after set-up", "peak after rounds", "rounds add", "s/round"))
    return {"runs": out}


def section_population(args: argparse.Namespace) -> dict[str, Any]:
    rows, out = [], []
    for n, val in ((1000, 0.0), (100_000, 0.0), (100_000, 0.2)):
        r = child([str(HERE / "population.py"), "--population", str(n), "--rounds", "3" if args.quick else "5",
                   "--val-fraction", str(val), *(["--partitioners"] if (n, val) == (100_000, 0.0) else [])])
        out.append(r)
        rows.append((f"{n:,}", f"{val:g}", f"{r['datamodule_setup_seconds']:.2f}", f"{r['trainer_setup_seconds']:.2f}",
                     f"{r['first_round_seconds']:.3f}", f"{r['seconds_per_round']:.3f}", f"{r['index_bytes'] / 2**20:.1f}",
                     f"{r['setup_peak_mib']:.1f}", f"{r['rounds_extra_mib']:.1f}"))
    table("population: clients index one pool of 1,437 digits; rounds of 100 clients (one process per row)", rows,
          ("clients", "val fraction", "datamodule s", "trainer s", "round 1 s", "s/round", "index MiB", "peak after set-up MiB",
           "rounds add MiB"))
    big = out[1]
    if "partition_iid_seconds" in big:
        print(f"   partitioning 1.5M labels into 100,000 clients: IID {big['partition_iid_seconds']:.2f} s, "
              f"QuantitySkew {big['partition_quantity_skew_seconds']:.2f} s")
    return {"runs": out}


def section_malloc(args: argparse.Namespace) -> dict[str, Any]:
    """W1 and W2 (one thread) in child processes, with glibc's malloc defaults and with :data:`MALLOC_ENV`."""
    out: dict[str, Any] = {}
    for name in ("default", "tuned"):
        path = Path(os.environ.get("TMPDIR", "/tmp")) / f"lightfed_malloc_{name}.json"
        subprocess.run([sys.executable, str(HERE / "run.py"), "--only", "w1", "w2", "--w2-threads", "1", "--malloc", name,
                        "--w2-rounds", str(args.w2_rounds), "--json", str(path), *(["--quick"] if args.quick else [])],
                       check=True, capture_output=True, cwd=HERE.parent)
        data = json.loads(path.read_text())
        out[name] = {"W1": data["w1"]["methods"], "W2": data["w2"]["threads_1"]["methods"]}
    rows = []
    for workload in ("W1", "W2"):
        for m in out["default"][workload]:
            a, b = (out[k][workload][m]["seconds_per_round"] for k in ("default", "tuned"))
            rows.append((workload, m, f"{a:.5f}", f"{b:.5f}", f"{a / b:.2f}x"))
    table("malloc: glibc defaults vs MALLOC_MMAP_THRESHOLD_/MALLOC_TRIM_THRESHOLD_=1 GiB (child processes, one thread)",
          rows, ("workload", "method", "default s/round", "tuned s/round", "speed-up"))
    return out


def section_flower(args: argparse.Namespace) -> dict[str, Any]:
    if importlib.util.find_spec("flwr") is None:
        print("\n== flower: skipped (flwr is not installed; `pip install 'flwr[simulation]'` to compare)")
        return {"skipped": "flwr not installed"}
    import flower_compare

    r = flower_compare.run(rounds=10 if args.quick else 20, warmup=2 if args.quick else 5)
    table("flower: W1 through Flower's simulation engine (Ray), one CPU per virtual client",
          [(r["label"], f"{r['seconds_per_round']:.4f}", f"{r['import_seconds']:.2f}", f"{r['first_round_seconds']:.2f}")],
          ("method", "s/round", "import s", "run_simulation to end of round 1 s"))
    return r


# ---------------------------------------------------------------------------------------- main
def main(argv: list[str] | None = None) -> dict[str, Any]:
    parser = argparse.ArgumentParser(description="lightfed benchmarks", formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument("--repeats", type=int, default=3, help="interleaved repeats of W1 / issue2 (best kept)")
    parser.add_argument("--lockstep", action="store_true",
                        help="W1 / issue2: the methods take turns round by round (for a machine shared with other jobs)")
    parser.add_argument("--w2-repeats", type=int, default=1)
    parser.add_argument("--w2-rounds", type=int, default=4, help="W2 rounds (the first is warm-up)")
    parser.add_argument("--w2-threads", type=int, nargs="+", default=[1, 2], help="torch threads of the W2 runs")
    parser.add_argument("--w2-vmap", action="store_true", help="also run W2 through the vmap executor")
    parser.add_argument("--w2-channels-last", action="store_true",
                        help="also run W2 with CNNClassifier(channels_last=True)")
    parser.add_argument("--scaling-rounds", type=int, default=3, help="W2 rounds per scaling run (the first is warm-up)")
    parser.add_argument("--scaling-repeats", type=int, default=1, help="interleaved repeats of the scaling runs")
    parser.add_argument("--quick", action="store_true", help="fewer rounds and repeats")
    parser.add_argument("--malloc", choices=("tuned", "default", "inherit"), default="default")
    parser.add_argument("--json", type=Path, help="write every number to this file")
    args = parser.parse_args(argv)
    if args.quick:
        args.w2_rounds = min(args.w2_rounds, 3)

    want = MALLOC_ENV if args.malloc == "tuned" else {} if args.malloc == "default" else None
    if want is not None and any(os.environ.get(k) != want.get(k) for k in MALLOC_ENV):
        env = {k: v for k, v in os.environ.items() if k not in MALLOC_ENV} | want
        os.execve(sys.executable, [sys.executable, *sys.argv], env)

    import logging
    import warnings

    import torch

    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    import lightfed.executors  # noqa: F401 - registers "vmap"

    results: dict[str, Any] = {"machine": machine(), "argv": sys.argv[1:]}
    info = results["machine"]
    print(f"machine: {info['cpu']}, {info['cores']} cores, torch {info['torch']}, python {info['python']}, "
          f"load average {info['load_average'][0]:.2f}, malloc env {info['malloc_env']}")
    rounds, warmup = (10, 3) if args.quick else (None, None)
    repeats = 1 if args.quick else args.repeats
    for name in args.only:
        if name == "startup":
            results[name] = section_startup(args)
        elif name == "w1":
            methods = ["plain", "plain_shuffled", "sequential", "sequential_dp", "vmap"]
            results[name] = speed("W1", methods, repeats, rounds, warmup, args.lockstep)
        elif name == "issue2":
            results[name] = speed("issue2", ["plain", "plain_shuffled", "sequential", "vmap"], repeats, rounds, warmup, args.lockstep)
        elif name == "w2":
            results[name] = section_w2(args)
        elif name == "scaling":
            results[name] = section_scaling(args)
        elif name == "memory":
            results[name] = section_memory(args)
        elif name == "population":
            results[name] = section_population(args)
        elif name == "malloc":
            results[name] = section_malloc(args)
        elif name == "flower":
            results[name] = section_flower(args)
    results["load_average_end"] = os.getloadavg()
    print(f"\nload average at the end: {results['load_average_end'][0]:.2f}")
    if args.json:
        args.json.write_text(json.dumps(results, indent=1))
    return results


if __name__ == "__main__":
    main()
