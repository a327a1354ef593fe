"""The federated LoRA table: FedIT, FFA-LoRA, FLoRA (one rank and mixed ranks), FedSA-LoRA, one command.

    lightfed central fit --config experiments/pretrain_fashion.yaml        # once: the pretrained CNN
    python benchmarks/lora_table.py --seeds 0 1 2                          # the table; rewrites docs/finetuning.md
    python benchmarks/lora_table.py --rounds 3 --seeds 0 --no-write        # a quick look

Task: Fashion-MNIST -> Animal-MNIST pretrain-then-federate. The Fashion-MNIST CNN (``--init``) is frozen;
rank-8 LoRA adapters (alpha 16) on its 3136 -> 128 layer and a new 128 -> 10 output layer are federated over 50
clients (Dirichlet(0.5) label skew), 10 per round, one local epoch of SGD (lr 0.05, momentum 0.9, batch 16),
``--rounds`` rounds. The variants are exactly the shipped configs (``experiments/strategy_*lora.yaml``,
``animal_lora_flora_mixed.yaml``): one strategy line apart.

Columns: central test accuracy of the global model (FedSA-LoRA's global model keeps B = 0, so its row also
gives the personalised figure: each client's own B on its own validation split), the mean over all 50
clients' validation splits (``federated/val_acc_mean``, personalised for FedSA-LoRA), bytes up and down per
client per round as the trainer counts them (``round/bytes_*``) and, for FLoRA, as the protocol sends them
(``strategy/bytes_up_adapters``, ``strategy/bytes_down_stack``), seconds per round (client training and
aggregation), and accuracy under client-level DP at epsilon 8 (DP-FedAvg, fixed clip, Poisson q = 0.2,
uniform weights) for the variants that compose with it (FLoRA does not: it is refused).
"""

from __future__ import annotations

import argparse
import logging
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightfed import FederatedTrainer, PoissonSampler  # noqa: E402
from lightfed.data.animal import AnimalMNISTDataModule  # noqa: E402
from lightfed.data.partition import Dirichlet  # noqa: E402
from lightfed.models.hf import LoRACNNClassifier  # noqa: E402
from lightfed.registry import STRATEGIES  # noqa: E402

DOC = ROOT / "docs" / "finetuning.md"
RUNS = ROOT / "runs" / "lora_table"
BEGIN, END = "<!-- lora-table:begin -->", "<!-- lora-table:end -->"
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["head.1"], "modules_to_save": ["head.3"]}

#: label -> (strategy name, strategy kwargs, lora extras, trainer.trainable)
VARIANTS: dict[str, tuple[str, dict[str, Any], dict[str, Any], list[str] | None]] = {
    "FedIT": ("FedITLoRA", {}, {}, None),
    "FFA-LoRA": ("FFALoRA", {}, {}, ["*lora_B*", "head.3.*"]),
    "FFA-LoRA alpha=128": ("FFALoRA", {}, {"lora_alpha": 128}, ["*lora_B*", "head.3.*"]),  # the paper's larger scaling
    "FLoRA r=8": ("FLoRA", {}, {"base_in_payload": True}, None),
    "FLoRA r in {2,4,8}": ("FLoRA", {"ranks": [2, 4, 8]}, {"base_in_payload": True}, None),
    "FedSA-LoRA": ("FedSALoRA", {}, {}, None),
}


def run(label: str, seed: int, rounds: int, init: str, dp_epsilon: float | None = None) -> dict[str, float]:
    name, kwargs, lora_extra, trainable = VARIANTS[label]
    L.seed_everything(seed, verbose=False)
    model = LoRACNNClassifier(lora={**LORA, **lora_extra}, lr=0.05, momentum=0.9)
    data = AnimalMNISTDataModule(Dirichlet(num_clients=50, alpha=0.5), test_fraction=0.2, val_fraction=0.2)
    privacy, sampler = None, None
    if dp_epsilon is not None:
        from lightfed.privacy import DPFixedClipping

        kwargs = {**kwargs, "weighted": False}
        privacy = DPFixedClipping(clip_norm=1.0, target_epsilon=dp_epsilon, clipping="client", verbose=False)
        sampler = PoissonSampler(0.2)
    trainer = FederatedTrainer(
        rounds=rounds, clients_per_round=10, sampler=sampler, strategy=STRATEGIES.create(name, **kwargs),
        privacy=privacy, trainable=trainable, init_checkpoint=init, init_ignore=["*lora_*", "head.3.*", "net.1.3.*"],
        local_epochs=1, batch_size=16, eval_every=rounds, fed_eval_fraction=1.0, checkpoint_every=0, logger=False,
        enable_progress_bar=False, default_root_dir=tempfile.mkdtemp(prefix=f"{name}-{seed}-", dir=RUNS), accelerator="cpu",
        num_threads=1, seed=seed,
    )
    history = trainer.fit(model, data)
    last = history[-1]
    seconds = [h["round/seconds"] for h in history]
    return {
        "acc": last["central/test_acc"],
        "fed": last.get("federated/val_acc_mean", float("nan")),
        "up": statistics.mean(h["round/bytes_up_per_client"] for h in history),
        "down": statistics.mean(h["round/bytes_down_per_client"] for h in history),
        "proto_up": statistics.mean(h.get("strategy/bytes_up_adapters", h["round/bytes_up_per_client"]) for h in history),
        "proto_down": statistics.mean(h.get("strategy/bytes_down_stack", h["round/bytes_down_per_client"]) for h in history),
        "sec": statistics.median(seconds),
        "eps": last.get("privacy/epsilon", float("nan")),
    }


def cell(values: list[float], pct: bool = True) -> str:
    scale = 100.0 if pct else 1.0
    values = [v * scale for v in values if v == v]
    if not values:
        return "--"
    if len(values) == 1:
        return f"{values[0]:.1f}"
    return f"{statistics.mean(values):.1f} ± {statistics.stdev(values):.1f}"


def table(results: dict[str, list[dict[str, float]]], dp: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    seeds = ", ".join(map(str, args.seeds))
    lines = [
        f"Fashion-MNIST -> Animal-MNIST, LoRA r=8 on the CNN's 3136->128 layer + new output layer; 50 clients "
        f"Dirichlet(0.5), 10 per round, {args.rounds} rounds, seeds {seeds} (mean ± std over seeds where several). "
        f"`python benchmarks/lora_table.py --rounds {args.rounds} --seeds {' '.join(map(str, args.seeds))}`.",
        "",
        "| Variant | Central test acc. % | Client val acc. % (FedSA: personalised) | Bytes up / client / round | "
        "Bytes down / client / round | s / round | Acc. % under DP, eps = 8 |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, rows in results.items():
        up, down = rows[0]["up"], rows[0]["down"]
        pup, pdown = statistics.mean(r["proto_up"] for r in rows), statistics.mean(r["proto_down"] for r in rows)
        if label.startswith("FLoRA"):
            wire_up = f"{pup:,.0f} (simulated payload {up:,.0f})"
            wire_down = f"{pdown:,.0f} (simulated payload {down:,.0f})"
        else:
            wire_up, wire_down = f"{up:,.0f}", f"{down:,.0f}"
        dp_rows = dp.get(label)
        dp_cell = "refused (needs every update)" if label.startswith("FLoRA") else (
            cell([r["fed" if label == "FedSA-LoRA" else "acc"] for r in dp_rows]) if dp_rows else "not run")
        lines.append(
            f"| {label} | {cell([r['acc'] for r in rows])} | {cell([r['fed'] for r in rows])} | {wire_up} | {wire_down} "
            f"| {statistics.mean(r['sec'] for r in rows):.2f} | {dp_cell} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--init", default=str(ROOT / "runs" / "pretrain_fashion" / "model.safetensors"))
    parser.add_argument("--no-dp", action="store_true", help="skip the DP column")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not rewrite docs/finetuning.md")
    args = parser.parse_args(argv)
    if not Path(args.init).is_file():
        raise SystemExit(f"{args.init} is missing: run `lightfed central fit --config experiments/pretrain_fashion.yaml` first.")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {}
    dp: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:  # seed-major: an interrupted run still has whole seeds
        for label in args.variants:
            start = time.perf_counter()
            results.setdefault(label, []).append(run(label, seed, args.rounds, args.init))
            print(f"{label} seed {seed}: {results[label][-1]} ({time.perf_counter() - start:.0f} s)", flush=True)
            if not args.no_dp and not label.startswith("FLoRA"):
                dp.setdefault(label, []).append(run(label, seed, args.rounds, args.init, dp_epsilon=8.0))
                print(f"{label} seed {seed} DP eps 8: {dp[label][-1]}", flush=True)
    text = table(results, dp, args)
    print(text)
    if not args.no_write:
        doc = DOC.read_text()
        head, rest = doc.split(BEGIN, 1)
        _, tail = rest.split(END, 1)
        DOC.write_text(f"{head}{BEGIN}\n{text}\n{END}{tail}")


if __name__ == "__main__":
    main()
