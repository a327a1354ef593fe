"""Privacy-utility-leakage table on digits: accuracy, accountant epsilon, one-shot empirical epsilon; audit overhead.

    python benchmarks/audit_table.py              # seeds 0 1 2 (about 15 minutes on a shared 2-core CPU)
    python benchmarks/audit_table.py --seeds 0    # one seed
    python benchmarks/audit_table.py --overhead 3 # also time 3 runs with and without the audit (CPU seconds)

Every row is an example config under ``experiments/`` run as written through the ``lightfed fit`` parser, with
the one-shot canary audit (Andrew et al. 2024; 100 inserted + 100 held-out canaries, sampled like clients)
added by ``--trainer.callbacks+=``. The no-DP row audits with canaries of norm 0.5 (the DP rows' clip). The
table goes between the ``audit-table`` markers in docs/auditing.md and to stdout. The overhead is CPU time of
``fit`` (``time.process_time``), which other processes on a shared machine do not inflate as they do wall time.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from unittest import mock

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "auditing.md"
BEGIN, END = "<!-- audit-table:begin -->", "<!-- audit-table:end -->"
AUDIT = ["--trainer.callbacks+=lightfed.audit.OneShotCanaryAudit", "--trainer.callbacks.init_args.num_canaries=100"]

#: (row label, config, extra CLI arguments)
ROWS = [
    ("FedAvg, no DP", "digits_dp_eps8.yaml", ["--privacy", "null", *AUDIT, "--trainer.callbacks.init_args.canary_norm=0.5"]),
    ("DP-FedAvg, target eps 8", "digits_dp_eps8.yaml", AUDIT),
    ("DP-FedAvg, target eps 3", "digits_dp_eps3.yaml", AUDIT),
    ("DP-FedAvg, target eps 1", "digits_dp_eps1.yaml", AUDIT),
]


def run_config(config: str, extra: list[str], seed: int, workdir: str) -> tuple[dict[str, float], float]:
    """Fit one config through the CLI parser; its last round's metrics and the CPU seconds of ``fit``."""
    from lightfed.cli import LightFedCLI

    args = [
        "--config", str(ROOT / "experiments" / config), *extra, "--seed_everything", str(seed),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.checkpoint_every", "0", "--trainer.default_root_dir", workdir,
    ]
    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightFedCLI(args=args, run=False)
        start = time.process_time()
        history = cli.trainer.fit(cli.model, cli.datamodule)
        cpu = time.process_time() - start
    return dict(history[-1]), cpu


def fmt(values: list[float], digits: int = 3, pct: bool = False) -> str:
    vals = [v * 100 if pct else v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    if any(math.isinf(v) for v in vals):
        return "∞"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.1f}" if pct else f"{mean:.{digits}g}"
    sd = statistics.stdev(vals)
    return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.{digits}g} ± {sd:.2g}"


def interval(rows: list[dict[str, float]], tag: str) -> str:
    """The mean estimate and the mean of the bootstrap intervals' ends."""
    est = [r[f"audit/epsilon_{tag}"] for r in rows]
    low = statistics.fmean(r[f"audit/epsilon_{tag}_low"] for r in rows)
    high = statistics.fmean(r[f"audit/epsilon_{tag}_high"] for r in rows)
    return f"{fmt(est)} [{low:.3g}, {high:.3g}]"


def table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> str:
    lines = [
        f"Digits, 400 IID clients, Poisson q = 0.2, 50 rounds, logistic regression (650 parameters); mean ± std over "
        f"seeds {seeds}; empirical epsilons at the run's delta (1/400^1.1) with the mean 95% bootstrap interval over "
        f"canaries in brackets. Produced by `python benchmarks/audit_table.py`.",
        "",
        "| run | test accuracy (%) | accountant epsilon | empirical epsilon, final model | empirical epsilon, all iterates |",
        "|---|---|---|---|---|",
    ]
    for label, *_ in ROWS:
        rows = results[label]
        acc = [r.get("central/test_acc", math.nan) for r in rows]
        eps = [r.get("privacy/epsilon", math.inf) for r in rows]
        lines.append(f"| {label} | {fmt(acc, pct=True)} | {fmt(eps)} | {interval(rows, 'final')} | "
                     f"{interval(rows, 'all_iterates')} |")
    return "\n".join(lines)


def overhead(repeats: int) -> str:
    """CPU seconds of the eps-3 digits run without and with the audit, interleaved."""
    plain, audited = [], []
    for i in range(repeats):
        with tempfile.TemporaryDirectory() as a, tempfile.TemporaryDirectory() as b:
            plain.append(run_config("digits_dp_eps3.yaml", [], 0, a)[1])
            audited.append(run_config("digits_dp_eps3.yaml", AUDIT, 0, b)[1])
        print(f"overhead run {i}: {plain[-1]:.2f} s plain, {audited[-1]:.2f} s audited", file=sys.stderr, flush=True)
    p, a = statistics.median(plain), statistics.median(audited)
    return (f"Audit overhead on experiments/digits_dp_eps3.yaml (seed 0, median of {repeats} interleaved runs, CPU "
            f"seconds of fit): {p:.2f} s without, {a:.2f} s with 100 + 100 canaries: +{100 * (a - p) / p:.1f}%.")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--overhead", type=int, default=0, help="repeats of the overhead measurement (0: skip)")
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/auditing.md alone")
    args = parser.parse_args()
    results: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in ROWS}
    for label, config, extra in ROWS:
        for seed in args.seeds:
            with tempfile.TemporaryDirectory() as workdir:
                metrics, cpu = run_config(config, extra, seed, workdir)
            results[label].append(metrics)
            print(f"{label} seed {seed}: {cpu:.1f} CPU s, final {metrics['audit/epsilon_final']:.3g}, all iterates "
                  f"{metrics['audit/epsilon_all_iterates']:.3g}", file=sys.stderr, flush=True)
    text = table(results, args.seeds)
    if args.overhead:
        text += "\n\n" + overhead(args.overhead)
    print(text)
    if not args.no_write and DOC.exists():
        doc = DOC.read_text()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            DOC.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
