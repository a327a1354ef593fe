"""The federated LoRA tables: FedIT, FFA-LoRA, FLoRA (one rank and mixed ranks), FedSA-LoRA, one command each.

    lightfed central fit --config experiments/pretrain_fashion.yaml        # once: the pretrained CNN
    python benchmarks/lora_table.py --seeds 0 1 2                          # the table; rewrites docs/finetuning.md
    python benchmarks/lora_table.py --rounds 3 --seeds 0 --no-write        # a quick look
    python benchmarks/lora_table.py --task shakespeare --seeds 0 1 2 --dp-seeds 0   # the MiniLM table

Task ``animal`` (the default): Fashion-MNIST -> Animal-MNIST pretrain-then-federate. The Fashion-MNIST CNN
(``--init``) is frozen; rank-8 LoRA adapters (alpha 16) on its 3136 -> 128 layer and a new 128 -> 10 output
layer are federated over 50 clients (Dirichlet(0.5) label skew), 10 per round, one local epoch of SGD (lr 0.05,
momentum 0.9, batch 16), ``--rounds`` rounds. The variants are exactly the shipped configs (``experiments/strategy_*lora.yaml``,
``animal_lora_flora_mixed.yaml``): one strategy line apart.

Columns: central test accuracy of the global model (FedSA-LoRA's global model keeps B = 0, so its row also
gives the personalised figure: each client's own B on its own validation split), the mean over all 50
clients' validation splits (``federated/val_acc_mean``, personalised for FedSA-LoRA), bytes up and down per
client per round as the trainer counts them (``round/bytes_*``) and, for FLoRA, as the protocol sends them
(``strategy/bytes_up_adapters``, ``strategy/bytes_down_stack``), seconds per round (client training and
aggregation), and accuracy under client-level DP at epsilon 8 (DP-FedAvg, fixed clip, Poisson q = 0.2,
uniform weights) for the variants that compose with it (FLoRA does not: it is refused).

Task ``shakespeare``: the genre of a verse line (6 classes) with the packaged all-MiniLM-L6-v2, frozen, rank-8
LoRA adapters (alpha 16) on query/value and a new linear head, over the 446 (play, speaker) clients of
``experiments/shakespeare_lora.yaml`` (each holds ONE label), with that config's recipe (:data:`SHAKESPEARE`):
one local SGD step of 16 lines per visit, so a round's mean update is the pooled gradient of the cohort, and
Adam on the server, here each LoRA strategy's ``server_optimizer: adam`` on its own aggregate update (plain
server SGD learned less in a pilot). The variants are ``experiments/shakespeare_lora_{fedit,ffa,flora,
flora_mixed,fedsa}.yaml``, one strategy line apart. Columns as above; client accuracy is measured on a seeded
``fed_eval_fraction`` of the clients; DP is ``DPAdaptiveClipping`` (median clip), Poisson sampling, uniform
weights, epsilon 8 over the same rounds. Finished runs are kept in ``runs/lora_table/<task>.jsonl`` and reused
by a rerun with the same settings (``--fresh`` reruns them).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import logging
import statistics
import sys
import tempfile
import time
import warnings
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import lightning as L  # noqa: E402
import torch  # noqa: E402

from lightfed import FederatedTrainer, PoissonSampler  # noqa: E402
from lightfed.registry import STRATEGIES  # noqa: E402

DOC = ROOT / "docs" / "finetuning.md"
RUNS = ROOT / "runs" / "lora_table"
MARKERS = {
    "animal": ("<!-- lora-table:begin -->", "<!-- lora-table:end -->"),
    "shakespeare": ("<!-- lora-shakespeare-table:begin -->", "<!-- lora-shakespeare-table:end -->"),
}
LORA = {"r": 8, "lora_alpha": 16, "target_modules": ["head.1"], "modules_to_save": ["head.3"]}

#: label -> (strategy name, strategy kwargs, lora extras, trainer.trainable)
Variants = dict[str, tuple[str, dict[str, Any], dict[str, Any], list[str] | None]]
VARIANTS: Variants = {
    "FedIT": ("FedITLoRA", {}, {}, None),
    "FFA-LoRA": ("FFALoRA", {}, {}, ["*lora_B*", "head.3.*"]),
    "FFA-LoRA alpha=128": ("FFALoRA", {}, {"lora_alpha": 128}, ["*lora_B*", "head.3.*"]),  # the paper's larger scaling
    "FLoRA r=8": ("FLoRA", {}, {"base_in_payload": True}, None),
    "FLoRA r in {2,4,8}": ("FLoRA", {"ranks": [2, 4, 8]}, {"base_in_payload": True}, None),
    "FedSA-LoRA": ("FedSALoRA", {}, {}, None),
}
SHAKESPEARE_LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.05, "target_modules": ["query", "value"]}
SHAKESPEARE_VARIANTS: Variants = {
    "FedIT": ("FedITLoRA", {}, {}, None),
    "FFA-LoRA": ("FFALoRA", {}, {}, ["*lora_B*", "head.*"]),
    "FLoRA r=8": ("FLoRA", {}, {"base_in_payload": True}, None),
    "FLoRA r in {2,4,8}": ("FLoRA", {"ranks": [2, 4, 8]}, {"base_in_payload": True}, None),
    "FedSA-LoRA": ("FedSALoRA", {}, {}, None),
}
TASK_VARIANTS = {"animal": VARIANTS, "shakespeare": SHAKESPEARE_VARIANTS}
ROUNDS = {"animal": 30, "shakespeare": 20}  # the default --rounds of each task


@dataclass(frozen=True)
class Recipe:
    """The Shakespeare/MiniLM run shared by every variant (``experiments/shakespeare_lora_*.yaml`` write it out).

    Args:
        clients_per_round: Cohort of a round without DP (uniform sampling of the 446 speakers).
        lr: Client SGD learning rate of the one local step of 16 lines.
        server_optimizer: The LoRA strategies' server step on the round's aggregate update: ``"adam"`` (FedAdam,
            as ``experiments/shakespeare_lora.yaml``; a pilot of plain ``"sgd"`` reached less, see docs/finetuning.md).
        server_lr: Adam's ``eta`` (SGD's server learning rate).
        tau: Adam's adaptivity.
        dp_sampling_rate: Poisson rate of the DP runs.
        dp_initial_clip: Starting clip of ``DPAdaptiveClipping`` (it then tracks the median update norm).
        fed_eval_fraction: Fraction of the clients whose validation split gives the client accuracy.
        test_subset: Central test lines (the 27.6% majority and 38.2% ceiling are on these 2,000).
    """

    clients_per_round: int = 20
    lr: float = 0.1
    server_optimizer: str = "adam"
    server_lr: float = 0.003
    tau: float = 1e-4
    dp_sampling_rate: float = 0.1
    dp_initial_clip: float = 0.1
    fed_eval_fraction: float = 0.1
    test_subset: int = 2000


SHAKESPEARE = Recipe()


def build_animal(label: str, seed: int, rounds: int, init: str, dp_epsilon: float | None) -> tuple[Any, Any, FederatedTrainer]:
    from lightfed.data.animal import AnimalMNISTDataModule
    from lightfed.data.partition import Dirichlet
    from lightfed.models.hf import LoRACNNClassifier

    name, kwargs, lora_extra, trainable = VARIANTS[label]
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
    return model, data, trainer


def build_shakespeare(
    label: str, seed: int, rounds: int, dp_epsilon: float | None, recipe: Recipe = SHAKESPEARE
) -> tuple[Any, Any, FederatedTrainer]:
    from lightfed.data.partition import Natural
    from lightfed.data.text import ShakespeareLinesDataModule
    from lightfed.models.hf import HFSequenceClassifier

    name, kwargs, lora_extra, trainable = SHAKESPEARE_VARIANTS[label]
    kwargs = {**kwargs, "server_optimizer": recipe.server_optimizer, "server_lr": recipe.server_lr, "tau": recipe.tau}
    model = HFSequenceClassifier(num_classes=6, lora={**SHAKESPEARE_LORA, **lora_extra}, optimizer="sgd", lr=recipe.lr)
    data = ShakespeareLinesDataModule(
        Natural(min_size=50), max_length=32, test_fraction=0.1, test_subset=recipe.test_subset, val_fraction=0.2
    )
    privacy, sampler = None, None
    if dp_epsilon is not None:
        from lightfed.privacy import DPAdaptiveClipping

        kwargs = {**kwargs, "weighted": False}
        privacy = DPAdaptiveClipping(
            initial_clip=recipe.dp_initial_clip, target_quantile=0.5, target_epsilon=dp_epsilon, clipping="client",
            verbose=False,
        )
        sampler = PoissonSampler(recipe.dp_sampling_rate)
    trainer = FederatedTrainer(
        rounds=rounds, clients_per_round=recipe.clients_per_round, sampler=sampler,
        strategy=STRATEGIES.create(name, **kwargs), privacy=privacy, trainable=trainable, local_steps=1, batch_size=16,
        eval_every=rounds, eval_batch_size=256, fed_eval_fraction=recipe.fed_eval_fraction, checkpoint_every=0,
        logger=False, enable_progress_bar=False, default_root_dir=tempfile.mkdtemp(prefix=f"{name}-{seed}-", dir=RUNS),
        accelerator="cpu", num_threads=1, seed=seed,
    )
    return model, data, trainer


def run(task: str, label: str, seed: int, rounds: int, init: str, dp_epsilon: float | None = None) -> dict[str, float]:
    """Fit one variant; the row's figures (accuracies are the last round's, bytes means, seconds the median)."""
    L.seed_everything(seed, verbose=False)
    if task == "animal":
        model, data, trainer = build_animal(label, seed, rounds, init, dp_epsilon)
    else:
        model, data, trainer = build_shakespeare(label, seed, rounds, dp_epsilon)
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


def command(args: argparse.Namespace) -> str:
    """The command line that reproduces the table."""
    cmd = "python benchmarks/lora_table.py"
    if args.task != "animal":
        cmd += f" --task {args.task}"
    cmd += f" --rounds {args.rounds} --seeds {' '.join(map(str, args.seeds))}"
    if args.dp_seeds != args.seeds:
        cmd += f" --dp-seeds {' '.join(map(str, args.dp_seeds))}"
    return f"`{cmd}`"


def server(recipe: Recipe) -> str:
    """The server step in words."""
    if recipe.server_optimizer == "adam":
        return f"server Adam on each variant's aggregate update (eta {recipe.server_lr:g}, tau {recipe.tau:g})"
    return f"server step {recipe.server_lr:g} x the aggregate update"


def caption(args: argparse.Namespace) -> str:
    seeds = ", ".join(map(str, args.seeds))
    if args.task == "animal":
        return (
            f"Fashion-MNIST -> Animal-MNIST, LoRA r=8 on the CNN's 3136->128 layer + new output layer; 50 clients "
            f"Dirichlet(0.5), 10 per round, {args.rounds} rounds, seeds {seeds} (mean ± std over seeds where several). "
            f"{command(args)}."
        )
    r = SHAKESPEARE
    dp_seeds = ", ".join(map(str, args.dp_seeds))
    return (
        f"Shakespeare, genre of a verse line (6 classes; always answering the majority genre: 27.6%, centralised "
        f"LoRA ceiling: 38.2%), all-MiniLM-L6-v2 frozen + LoRA r=8 (alpha 16) on query/value + new head; 446 speaker "
        f"clients holding one label each, {r.clients_per_round} per round, one local SGD step of 16 lines (lr {r.lr}), "
        f"{server(r)}, {args.rounds} rounds, seeds {seeds} (mean ± std over seeds "
        f"where several). Client val. acc.: a seeded {r.fed_eval_fraction:.0%} of the clients' validation splits. "
        f"DP column: {'seed ' + dp_seeds + ' only' if len(args.dp_seeds) == 1 else 'seeds ' + dp_seeds}, DPAdaptiveClipping (median clip, from {r.dp_initial_clip}), Poisson "
        f"q = {r.dp_sampling_rate} (about {round(446 * r.dp_sampling_rate)} clients per round), uniform weights, "
        f"epsilon 8 over the {args.rounds} rounds. {command(args)}."
    )


def table(results: dict[str, list[dict[str, float]]], dp: dict[str, list[dict[str, float]]], args: argparse.Namespace) -> str:
    lines = [
        caption(args),
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


def cached_run(args: argparse.Namespace, label: str, seed: int, dp_epsilon: float | None = None) -> dict[str, float]:
    """:func:`run`, or its figures from ``runs/lora_table/<task>.jsonl`` when that exact run finished before."""
    if args.task == "shakespeare":
        setting = asdict(SHAKESPEARE)
    else:  # the pretrained CNN's bytes, so that a new pretraining reruns everything
        setting = {"init": hashlib.sha256(Path(args.init).read_bytes()).hexdigest()}
    key = json.dumps([args.task, label, seed, args.rounds, dp_epsilon, setting], sort_keys=True)
    log = RUNS / f"{args.task}.jsonl"
    if not args.fresh and log.is_file():
        rows = [entry["row"] for entry in map(json.loads, log.read_text().splitlines()) if entry["key"] == key]
        if rows:
            return rows[-1]  # the latest run of these settings
    start = time.perf_counter()
    row = run(args.task, label, seed, args.rounds, args.init, dp_epsilon)
    with log.open("a") as f:
        f.write(json.dumps({"key": key, "row": row}) + "\n")
    what = f"{label} seed {seed}" + (f" DP eps {dp_epsilon:g}" if dp_epsilon is not None else "")
    print(f"{what}: {row} ({time.perf_counter() - start:.0f} s)", flush=True)
    return row


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="animal", choices=list(TASK_VARIANTS))
    parser.add_argument("--rounds", type=int, default=None, help="rounds of every run (default: 30 animal, 20 shakespeare)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--dp-seeds", type=int, nargs="+", default=None, help="seeds of the DP column (default: --seeds)")
    parser.add_argument("--variants", nargs="+", default=None, help="a subset of the task's variants (default: all)")
    parser.add_argument("--init", default=str(ROOT / "runs" / "pretrain_fashion" / "model.safetensors"))
    parser.add_argument("--no-dp", action="store_true", help="skip the DP column")
    parser.add_argument("--fresh", action="store_true", help="rerun every run, ignoring runs/lora_table/<task>.jsonl")
    parser.add_argument("--no-write", action="store_true", help="print the table, do not rewrite docs/finetuning.md")
    args = parser.parse_args(argv)
    variants = TASK_VARIANTS[args.task]
    args.variants = args.variants or list(variants)
    if unknown := [v for v in args.variants if v not in variants]:
        parser.error(f"--variants {unknown} are not variants of --task {args.task}; choose from {list(variants)}.")
    args.rounds = args.rounds or ROUNDS[args.task]
    args.dp_seeds = args.dp_seeds or args.seeds
    if args.task == "animal" and not Path(args.init).is_file():
        raise SystemExit(f"{args.init} is missing: run `lightfed central fit --config experiments/pretrain_fashion.yaml` first.")
    warnings.filterwarnings("ignore")
    logging.getLogger("lightning").setLevel(logging.ERROR)
    torch.set_num_threads(1)
    RUNS.mkdir(parents=True, exist_ok=True)
    results: dict[str, list[dict[str, float]]] = {}
    dp: dict[str, list[dict[str, float]]] = {}
    for seed in args.seeds:  # seed-major: an interrupted run still has whole seeds (and rerunning resumes it)
        for label in args.variants:
            results.setdefault(label, []).append(cached_run(args, label, seed))
            if not args.no_dp and not label.startswith("FLoRA") and seed in args.dp_seeds:
                dp.setdefault(label, []).append(cached_run(args, label, seed, dp_epsilon=8.0))
    text = table(results, dp, args)
    print(text)
    if not args.no_write:
        begin, end = MARKERS[args.task]
        doc = DOC.read_text()
        head, rest = doc.split(begin, 1)
        _, tail = rest.split(end, 1)
        DOC.write_text(f"{head}{begin}\n{text}\n{end}{tail}")


if __name__ == "__main__":
    main()
