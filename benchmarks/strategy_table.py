"""The strategy results table: every registered strategy on digits, same budget, one command.

    .venv/bin/python benchmarks/strategy_table.py --write    # a few minutes; rewrites docs/strategies.md
    .venv/bin/python benchmarks/strategy_table.py --rounds 3 --strategies FedAvg Krum   # prints only

For each strategy (``STRATEGIES.names()``: FedAvg, the zoo, and any installed plugin) it trains the same MLP
on scikit-learn's digits, split over 20 clients by a Dirichlet(alpha) label skew, all 20 clients in every
round, for the same number of rounds, local epochs, batch size and local learning rate, and reports the
final central test accuracy for

* ``Dir(0.1)`` (strong label skew) and ``Dir(1.0)`` (mild skew);
* ``Dir(1.0)`` with 20% of the clients Byzantine, sending sign-flipped updates (:class:`lightfed_zoo.attacks.
  SignFlipAttack`: the same 4 clients every round send ``-delta``), and the same with ``-4 delta``, which
  cancels the honest clients' mean (``0.8 - 4 * 0.2 = 0``) so that only a robust rule can still learn;
* the mean and worst-10% accuracy of the clients' own validation splits under ``Dir(0.1)`` (federated
  evaluation; Ditto evaluates each client's personal model there).

The strategies' hyper-parameters are their paper defaults (:data:`HYPER`); the robust rules are told the true
number of Byzantine clients (``f = 4``). Everything is seeded (``--seed``): rerunning gives the same table.
"""

from __future__ import annotations

import argparse
import logging
import re
import time
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import torch

from lightfed import FederatedTrainer
from lightfed.data.datasets import DigitsDataModule
from lightfed.data.partition import Dirichlet
from lightfed.models import MLPClassifier
from lightfed.registry import STRATEGIES
from lightfed_zoo.attacks import SignFlipAttack

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "strategies.md"
BEGIN, END = "<!-- strategy-table:begin -->", "<!-- strategy-table:end -->"

NUM_CLIENTS = 20
BYZANTINE_FRACTION = 0.2
F = round(BYZANTINE_FRACTION * NUM_CLIENTS)  # Byzantine clients per round (all clients take part)
LOCAL_LR = 0.3

#: Hyper-parameters per strategy (the rest are the class defaults); shown in the table.
HYPER: dict[str, dict[str, Any]] = {
    "FedAvg": {},
    "FedAvgM": {"server_lr": 1.0, "momentum": 0.9},
    "FedProx": {"mu": 0.01},
    "FedAdagrad": {"eta": 0.1, "tau": 1e-2},
    "FedAdam": {"eta": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "FedYogi": {"eta": 0.01, "beta1": 0.9, "beta2": 0.99, "tau": 1e-3},
    "FedMedian": {},
    "FedTrimmedAvg": {"beta": 0.2},
    "Krum": {"f": F},
    "MultiKrum": {"f": F},
    "Bulyan": {"f": F},
    "SCAFFOLD": {"server_lr": 1.0},
    "FedNova": {},
    "QFedAvg": {"q": 1.0},
    "Ditto": {"lam": 0.1, "personal_epochs": 1},
}


def run_one(
    name: str, alpha: float, flip_scale: float | None, rounds: int, seed: int, root: Path, fed_eval: bool
) -> dict[str, float]:
    """One federated run (``flip_scale``: Byzantine clients send ``-flip_scale * delta``); the last round's metrics."""
    L.seed_everything(seed, verbose=False)
    strategy = STRATEGIES.create(name, **HYPER.get(name, {}))
    if flip_scale is not None:
        strategy = SignFlipAttack(strategy, fraction=BYZANTINE_FRACTION, scale=flip_scale, seed=seed)
    data = DigitsDataModule(Dirichlet(num_clients=NUM_CLIENTS, alpha=alpha), seed=seed)
    trainer = FederatedTrainer(
        rounds=rounds, clients_per_round=NUM_CLIENTS, strategy=strategy, local_epochs=1, batch_size=16,
        eval_every=rounds, fed_eval_fraction=1.0 if fed_eval else 0.0, checkpoint_every=0, logger=False,
        enable_progress_bar=False, default_root_dir=str(root), seed=seed,
    )
    return trainer.fit(MLPClassifier(hidden=[32], lr=LOCAL_LR, momentum=0.0), data)[-1]


def measure(names: list[str], rounds: int, seed: int, root: Path) -> list[dict[str, Any]]:
    rows = []
    for name in names:
        start = time.perf_counter()
        skewed = run_one(name, 0.1, None, rounds, seed, root / name / "dir0.1", fed_eval=True)
        mild = run_one(name, 1.0, None, rounds, seed, root / name / "dir1.0", fed_eval=False)
        flip1 = run_one(name, 1.0, 1.0, rounds, seed, root / name / "flip1", fed_eval=False)
        flip4 = run_one(name, 1.0, 4.0, rounds, seed, root / name / "flip4", fed_eval=False)
        row = {
            "name": name,
            "dir0.1": skewed["central/test_acc"],
            "dir1.0": mild["central/test_acc"],
            "flip1": flip1["central/test_acc"],
            "flip4": flip4["central/test_acc"],
            "fed_mean": skewed.get("federated/val_acc_mean", float("nan")),
            "fed_worst": skewed.get("federated/val_acc_worst10", float("nan")),
            "seconds": time.perf_counter() - start,
        }
        rows.append(row)
        print(
            f"{name:<14} Dir(0.1) {row['dir0.1']:.3f}  Dir(1.0) {row['dir1.0']:.3f}  "
            f"flipped {row['flip1']:.3f} / x4 {row['flip4']:.3f}  "
            f"clients {row['fed_mean']:.3f}/{row['fed_worst']:.3f}  ({row['seconds']:.0f} s)",
            flush=True,
        )
    return rows


def _args_text(name: str) -> str:
    args = HYPER.get(name)
    if args is None:
        return "defaults"
    return ", ".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in args.items()) or "-"


def data_note(seed: int) -> str:
    """The digits split the runs use, in numbers (read from the datamodule, not typed in)."""
    data = DigitsDataModule(Dirichlet(num_clients=NUM_CLIENTS, alpha=1.0), seed=seed)
    data.setup()
    assert data.arrays is not None
    train = sum(len(data.client_train(c)) for c in range(NUM_CLIENTS))
    val = sum(len(data.client_val(c)) for c in range(NUM_CLIENTS))
    return (
        f"Digits (scikit-learn): {train} training and {val} client-validation images over {NUM_CLIENTS} clients "
        f"(the Dir(1.0) split), {len(data.arrays.test[0])} central test images"
    )


def markdown(rows: list[dict[str, Any]], rounds: int, seed: int, seconds: float) -> str:
    head = (
        "| Strategy | Hyper-parameters | Dir(0.1) | Dir(1.0) | Dir(1.0), 20% send −Δ | Dir(1.0), 20% send −4Δ | "
        "Dir(0.1) clients: mean / worst 10% |\n|---|---|---:|---:|---:|---:|---:|\n"
    )
    body = "".join(
        f"| {r['name']} | {_args_text(r['name'])} | {r['dir0.1']:.3f} | {r['dir1.0']:.3f} | {r['flip1']:.3f} | "
        f"{r['flip4']:.3f} | "
        f"{r['fed_mean']:.3f} / {r['fed_worst']:.3f} |\n"
        for r in rows
    )
    foot = (
        f"\n{data_note(seed)}; all clients in every round, {rounds} rounds, 1 local epoch, batch 16, MLP 64-32-10, "
        f"local SGD lr {LOCAL_LR} (no momentum), seed {seed}; central test accuracy after the last round. "
        f"Sign-flip: {F} fixed clients send `-delta` (or `-4 delta`) every round; Krum / Multi-Krum / Bulyan use "
        f"f={F}. Produced by "
        f"`.venv/bin/python benchmarks/strategy_table.py --write` in {seconds / 60:.1f} min "
        f"(torch {torch.__version__}, CPU).\n"
    )
    return head + body + foot


def write_table(table: str, doc: Path = DOC) -> None:
    """Replace the text between the table markers of ``doc`` (the rest of the page is hand-written)."""
    text = doc.read_text()
    pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
    if not pattern.search(text):
        raise SystemExit(f"{doc} has no {BEGIN} ... {END} markers; add them where the table goes.")
    doc.write_text(pattern.sub(lambda _: f"{BEGIN}\n{table}{END}", text))


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=20, help="federated rounds per run (same for all)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--strategies", nargs="*", default=None, help="registered names (default: all)")
    parser.add_argument("--root", default="runs/strategy_table", help="where the runs write their checkpoints")
    parser.add_argument("--write", action="store_true",
                        help=f"also rewrite the table in {DOC} (default: print only)")
    parser.add_argument("--no-write", action="store_true", help="the default (kept for old command lines)")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    logging.getLogger("lightning").setLevel(logging.ERROR)
    logging.getLogger("lightning.fabric").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", category=RuntimeWarning, message=".*resilience guarantee.*")
    names = args.strategies or sorted(STRATEGIES.names(), key=lambda n: (n != "FedAvg", n.lower()))  # baseline first
    unknown = [n for n in names if n not in STRATEGIES]
    if unknown:
        parser.error(f"unknown strategies {unknown}; registered: {', '.join(STRATEGIES.names())}")
    start = time.perf_counter()
    rows = measure(names, args.rounds, args.seed, Path(args.root))
    table = markdown(rows, args.rounds, args.seed, time.perf_counter() - start)
    print("\n" + table)
    if args.write and not args.no_write:
        write_table(table)
        print(f"written to {DOC}")


if __name__ == "__main__":
    main()
