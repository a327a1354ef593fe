"""Robust strategies against Byzantine attacks on digits: clean and backdoor accuracy, one command.

    python benchmarks/attack_table.py                       # the grid in docs/strategies.md (~10 min, 1 CPU core)
    python benchmarks/attack_table.py --rounds 3 --no-write --strategies FedAvg Krum --attacks sign_flip

Every strategy (FedAvg, FedMedian, FedTrimmedAvg, Krum, MultiKrum, Bulyan) is trained against every behaviour
of ``plugins/lightfed_zoo/attacks.py`` (sign flip, Gaussian updates, label flipping, backdoor model replacement, ALIE,
min-max) with 10% and 20% of the population Byzantine, plus a clean run. The task is the attack configs'
(experiments/attack_*.yaml): digits over 50 IID clients, an MLP (64-64-10, SGD lr 0.1, momentum 0.9), 2 local
epochs of batch 16; here 15 clients a round (so Bulyan's ``n >= 4f + 3`` holds at 20%) and ``--rounds`` rounds
(default 20). The robust rules are told ``f = ceil(fraction * 15)`` (the expected Byzantine clients of a round,
rounded up: 2 at 10%, 3 at 20%); FedTrimmedAvg trims ``beta = 0.2`` at each end. Backdoor accuracy (triggered
test digits of other classes classified as the target 0, :class:`lightfed_zoo.attacks.BackdoorAccuracy`) is
measured in every run, attacked or not, so the clean runs show the trigger's base rate. Seeds (``--seeds``,
default 0; with several, each cell is the mean and the table states the largest standard deviation): the
Byzantine clients, the partition, the cohorts and the initial model all derive from the seed. The table goes
between the ``attack-table`` markers in docs/strategies.md and to stdout.
"""

from __future__ import annotations

import argparse
import logging
import math
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "plugins"))  # the zoo, importable from a checkout without an install

import lightning as L  # noqa: E402

from lightfed import FederatedTrainer  # noqa: E402
from lightfed.data.datasets import DigitsDataModule  # noqa: E402
from lightfed.data.partition import IID  # noqa: E402
from lightfed.models import MLPClassifier  # noqa: E402
from lightfed.registry import STRATEGIES  # noqa: E402
from lightfed_zoo import attacks  # noqa: E402

DOC = ROOT / "docs" / "strategies.md"
BEGIN, END = "<!-- attack-table:begin -->", "<!-- attack-table:end -->"
NUM_CLIENTS, COHORT = 50, 15
STRATEGY_NAMES = ["FedAvg", "FedMedian", "FedTrimmedAvg", "Krum", "MultiKrum", "Bulyan"]
#: attack key -> (column label, attack class, extra arguments)
ATTACKS: dict[str, tuple[str, type, dict[str, Any]]] = {
    "sign_flip": ("sign flip", attacks.SignFlipAttack, {}),
    "gaussian": ("Gaussian", attacks.GaussianAttack, {}),
    "label_flip": ("label flip", attacks.LabelFlipAttack, {}),
    "backdoor": ("backdoor (boost 5)", attacks.BackdoorAttack, {"boost": 5.0}),
    "alie": ("ALIE", attacks.ALIEAttack, {}),
    "min_max": ("min-max", attacks.MinMaxAttack, {}),
}
FRACTIONS = (0.1, 0.2)


def strategy_for(name: str, fraction: float) -> Any:
    f = max(1, math.ceil(fraction * COHORT - 1e-9))
    kwargs = {"Krum": {"f": f}, "MultiKrum": {"f": f}, "Bulyan": {"f": f}, "FedTrimmedAvg": {"beta": 0.2}}.get(name, {})
    return STRATEGIES.create(name, **kwargs)


def run_one(strategy: str, attack: str | None, fraction: float, rounds: int, seed: int, root: str) -> dict[str, float]:
    """One run; the last round's metrics (``central/test_acc``, ``attack/backdoor_acc``)."""
    L.seed_everything(seed, verbose=False)
    inner = strategy_for(strategy, fraction if attack else max(FRACTIONS))
    if attack is None:  # a clean run, still measuring the trigger's base rate
        wrapped = attacks.BackdoorAttack(inner, fraction=0.0, seed=seed)
    else:
        _, cls, extra = ATTACKS[attack]
        wrapped = cls(inner, fraction=fraction, seed=seed, **extra)
    callbacks = [attacks.BackdoorAccuracy()] if isinstance(wrapped, attacks.BackdoorAttack) else []
    trainer = FederatedTrainer(
        rounds=rounds, clients_per_round=COHORT, strategy=wrapped, local_epochs=2, batch_size=16,
        eval_every=rounds, fed_eval_fraction=0.0, checkpoint_every=0, logger=False, enable_progress_bar=False,
        default_root_dir=root, seed=seed, callbacks=callbacks,
    )
    data = DigitsDataModule(IID(num_clients=NUM_CLIENTS), val_fraction=0.0, seed=seed)
    return trainer.fit(MLPClassifier(hidden=[64], lr=0.1, momentum=0.9), data)[-1]


def pct(value: float) -> str:
    return "-" if value is None or math.isnan(value) else f"{100 * value:.1f}"


def mean_runs(runs: list[dict[str, float]]) -> dict[str, float]:
    """The mean of each metric over seeds, and ``{metric}_std`` (0 for one seed)."""
    out: dict[str, float] = {}
    for key in ("central/test_acc", "attack/backdoor_acc"):
        vals = [r[key] for r in runs if key in r and not math.isnan(r[key])]
        if vals:
            out[key] = statistics.fmean(vals)
            out[f"{key}_std"] = statistics.stdev(vals) if len(vals) > 1 else 0.0
    return out


def markdown(results: dict[tuple[str, str | None, float], dict[str, float]], strategies: list[str],
             attack_keys: list[str], rounds: int, seeds: list[int], seconds: float, runs: int) -> str:
    head = ["strategy", "clean"] + [f"{ATTACKS[a][0]} {int(100 * f)}%" for a in attack_keys for f in FRACTIONS]
    worst = max((r.get("central/test_acc_std", 0.0) for r in results.values()), default=0.0)
    spread = (f"mean over seeds {seeds} (largest standard deviation of a cell's clean accuracy: {100 * worst:.1f} points)"
              if len(seeds) > 1 else f"seed {seeds[0]}, one run per cell")
    lines = [
        f"Digits, {NUM_CLIENTS} IID clients, {COHORT} a round, {rounds} rounds, MLP 64-64-10, {spread} "
        f"({runs} runs, {seconds / 60:.1f} min on one shared CPU core). Cells: clean test accuracy (%); for the "
        f"backdoor, clean / backdoor accuracy (%), and the clean column's backdoor accuracy is the trigger's base rate "
        f"without an attacker. Robust rules get f = 2 at 10% and f = 3 at 20%; FedTrimmedAvg beta = 0.2. "
        f"Produced by `python benchmarks/attack_table.py`.",
        "",
        "| " + " | ".join(head) + " |",
        "|---|" + "---:|" * (len(head) - 1),
    ]
    for s in strategies:
        clean = results.get((s, None, 0.0), {})
        cells = [f"{pct(clean.get('central/test_acc', math.nan))} (bd {pct(clean.get('attack/backdoor_acc', math.nan))})"]
        for a in attack_keys:
            for f in FRACTIONS:
                r = results.get((s, a, f))
                if r is None:
                    cells.append("refused")
                elif a == "backdoor":
                    cells.append(f"{pct(r['central/test_acc'])} / {pct(r.get('attack/backdoor_acc', math.nan))}")
                else:
                    cells.append(pct(r["central/test_acc"]))
        lines.append(f"| {s} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0])
    parser.add_argument("--strategies", nargs="+", default=STRATEGY_NAMES)
    parser.add_argument("--attacks", nargs="+", default=list(ATTACKS), choices=list(ATTACKS))
    parser.add_argument("--no-write", action="store_true", help="print only; leave docs/strategies.md alone")
    args = parser.parse_args()
    logging.getLogger("lightning").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore")
    raw: dict[tuple[str, str | None, float], list[dict[str, float]]] = {}
    start = time.perf_counter()
    with tempfile.TemporaryDirectory() as root:
        for seed in args.seeds:
            for s in args.strategies:
                cells = [(None, 0.0)] + [(a, f) for a in args.attacks for f in FRACTIONS]
                for attack, fraction in cells:
                    t = time.perf_counter()
                    try:
                        run_root = str(Path(root) / f"{s}-{attack}-{fraction}-{seed}")
                        r = run_one(s, attack, fraction, args.rounds, seed, run_root)
                    except ValueError as err:  # a combination the strategy refuses (its message says why)
                        print(f"{s} {attack} {fraction}: refused: {err}", file=sys.stderr, flush=True)
                        continue
                    raw.setdefault((s, attack, fraction), []).append(r)
                    print(f"seed {seed} {s:<14} {attack or 'clean':<10} {fraction:.1f}: acc {pct(r['central/test_acc'])}, "
                          f"backdoor {pct(r.get('attack/backdoor_acc', math.nan))} ({time.perf_counter() - t:.1f} s)",
                          file=sys.stderr, flush=True)
    results = {k: mean_runs(v) for k, v in raw.items()}
    runs = sum(len(v) for v in raw.values())
    text = markdown(results, args.strategies, args.attacks, args.rounds, args.seeds, time.perf_counter() - start, runs)
    print(text)
    if not args.no_write and DOC.exists():
        doc = DOC.read_text()
        if BEGIN in doc and END in doc:
            head, rest = doc.split(BEGIN, 1)
            DOC.write_text(head + BEGIN + "\n" + text + "\n" + END + rest.split(END, 1)[1])


if __name__ == "__main__":
    main()
