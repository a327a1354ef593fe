"""Privacy-utility table: epsilon vs final test accuracy on digits, written into docs/privacy.md.

    python benchmarks/privacy_table.py            # seeds 0 1 2, a few minutes on a laptop CPU
    python benchmarks/privacy_table.py --seeds 0  # one seed, quicker

Every row is one of the example configs under ``experiments/`` run exactly as written (through the same
CLI parser as ``lightfed fit``), or that config with ``--privacy null`` for the non-private baseline of the
same regime. Only logging, checkpoints and the seed are overridden. The table goes between the
``privacy-table`` markers in ``docs/privacy.md`` and to stdout.
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

import torch

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "privacy.md"
BEGIN, END = "<!-- privacy-table:begin -->", "<!-- privacy-table:end -->"

#: (row label, unit of privacy, config, extra CLI arguments)
ROWS = [
    ("FedAvg, no DP", "-", "digits_dp_eps8.yaml", ["--privacy", "null"]),
    ("DP-FedAvg, fixed clip, target eps 8", "client", "digits_dp_eps8.yaml", []),
    ("DP-FedAvg, fixed clip, target eps 3", "client", "digits_dp_eps3.yaml", []),
    ("DP-FedAvg, adaptive clip, target eps 3", "client", "digits_dp_adaptive_eps3.yaml", []),
    ("DP-FedAvg, fixed clip, target eps 1", "client", "digits_dp_eps1.yaml", []),
    ("FedAvg, no DP (DP-SGD regime)", "-", "digits_dpsgd.yaml", ["--privacy", "null"]),
    ("DP-SGD in clients, target eps 8", "example", "digits_dpsgd.yaml", []),
]


def run_config(config: str, extra: list[str], seed: int, workdir: str) -> dict[str, float]:
    """Fit one config through the CLI parser; return its last round's metrics plus wall-clock seconds."""
    from lightfed.cli import LightFedCLI

    args = [
        "--config", str(ROOT / "experiments" / config), *extra, "--seed_everything", str(seed),
        "--trainer.logger", "false", "--trainer.enable_progress_bar", "false",
        "--trainer.checkpoint_every", "0", "--trainer.default_root_dir", workdir,
    ]
    start = time.perf_counter()
    # LightningCLI warns when it gets `args` while sys.argv holds this script's own flags: hide those.
    with contextlib.redirect_stdout(io.StringIO()), mock.patch.object(sys, "argv", sys.argv[:1]):
        cli = LightFedCLI(args=args, run=False)
        history = cli.trainer.fit(cli.model, cli.datamodule)
    out = dict(history[-1])
    out["seconds"] = time.perf_counter() - start
    out["rounds"] = float(len(history))
    return out


def fmt(values: list[float], digits: int = 3, pct: bool = False) -> str:
    vals = [v * 100 if pct else v for v in values if not math.isnan(v)]
    if not vals:
        return "-"
    mean = statistics.fmean(vals)
    if len(vals) == 1:
        return f"{mean:.{digits}g}" if not pct else f"{mean:.1f}"
    sd = statistics.stdev(vals)
    if sd < 1e-9 * max(1.0, abs(mean)):
        return f"{mean:.{digits}g}" if not pct else f"{mean:.1f}"
    return f"{mean:.1f} ± {sd:.1f}" if pct else f"{mean:.{digits}g} ± {sd:.2g}"


def table(results: dict[str, list[dict[str, float]]], seeds: list[int]) -> str:
    lines = [
        f"Digits (sklearn, 1,797 images; 20% central test split), final global model, mean ± std over seeds {seeds}. "
        f"Produced by `python benchmarks/privacy_table.py`.",
        "",
        "| setting | unit of privacy | epsilon spent | delta | noise multiplier z | test accuracy (%) | seconds / run |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, unit, config, _extra in ROWS:
        runs = results[label]
        eps = [r.get("privacy/epsilon", math.nan) for r in runs]
        eps_text = fmt(eps)
        if "privacy/epsilon_median" in runs[0]:
            eps_text = f"max {eps_text} (median {fmt([r['privacy/epsilon_median'] for r in runs])})"
        delta = runs[0].get("privacy/delta")
        z = runs[0].get("privacy/noise_multiplier")
        lines.append(
            f"| {label} (`{config}`) | {unit} | {eps_text if unit != '-' else 'inf (no DP)'} | "
            f"{f'{delta:.2g}' if delta is not None else '-'} | {f'{z:.3g}' if z is not None else ('per client' if unit == 'example' else '-')} | "
            f"{fmt([r['central/test_acc'] for r in runs], pct=True)} | {statistics.fmean(r['seconds'] for r in runs):.0f} |"
        )
    return "\n".join(lines)


def write_doc(text: str) -> None:
    doc = DOC.read_text() if DOC.exists() else ""
    block = f"{BEGIN}\n{text}\n{END}"
    if BEGIN in doc and END in doc:
        head, rest = doc.split(BEGIN, 1)
        doc = head + block + rest.split(END, 1)[1]
    else:
        doc = doc.rstrip() + "\n\n" + block + "\n"
    DOC.write_text(doc)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--no-write", action="store_true", help="print the table without editing docs/privacy.md")
    args = parser.parse_args(argv)
    # The clients are tiny: one thread avoids oversubscription, which costs ~10x on a shared CPU.
    torch.set_num_threads(1)
    results: dict[str, list[dict[str, float]]] = {label: [] for label, *_ in ROWS}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for label, _unit, config, extra in ROWS:
                out = run_config(config, extra, seed, str(Path(tmp) / f"{len(results[label])}_{seed}"))
                results[label].append(out)
                eps = out.get("privacy/epsilon")
                print(
                    f"seed {seed}  {label:<42} acc {out['central/test_acc']:.4f}  "
                    f"eps {eps if eps is None else round(eps, 3)}  {out['seconds']:.0f}s",
                    file=sys.stderr, flush=True,
                )
    text = table(results, args.seeds)
    print(text)
    if not args.no_write:
        write_doc(text)
        print(f"\nwritten to {DOC}", file=sys.stderr)


if __name__ == "__main__":
    main()
