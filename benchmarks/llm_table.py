"""Federated LoRA on SmolLM2-135M over Shakespeare speakers: perplexity, memorisation of planted secrets, cost.

One row per setting, all on the same clients, test sets and canaries:

* ``base``     -- the packaged SmolLM2-135M-Instruct (de-quantised Q4_1, fp32), no training;
* ``central``  -- a plain PyTorch + peft loop (no lightfed) on the pooled text of the same clients, with as
                  many optimiser steps as the federated run takes in all (rounds x clients x local steps);
* ``fedit``    -- FedIT (LoRA factors averaged) through lightfed's trainer;
* ``fedit_dp`` -- the same under client-level DP (fixed clip, Gaussian noise) at ``--epsilon``;
* ``fedit_secagg`` -- FedIT under SecAgg+ (the server sees only the masked sum);
* ``ffa``, ``ffa_dp`` -- FFA-LoRA (Sun et al., ICLR 2024: A frozen, only B trained and averaged), without and
                  with client-level DP.

``--clients 0 --plays all --sampling-rate q`` samples each round's cohort by Poisson sampling with rate ``q``
from every speaker of the packaged plays (739 with >= 4 blocks): the population at which client-level DP has
enough clients per round to be usable, with the privacy amplification that Poisson sampling gives.

Columns: perplexity on held-out lines of training speakers (seen) and on wholly held-out speakers (unseen);
exposure (bits, exact over the 10^n secrets, n = ``--digits``) of a canary planted ``--repeats`` times in 1 client and of one
planted in ``--k`` clients, and whether greedy decoding of the prefix emits each secret; epsilon; bytes sent up
per client per round; seconds per round (for ``central``: the plain loop's seconds for one round's steps, the
baseline of the 1.10x target). One torch thread. Results are appended to ``--out`` (JSON lines), so settings can
run one at a time::

    python benchmarks/llm_table.py --settings base fedit --rounds 8 --clients 6
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

from lightfed import FederatedTrainer, FullParticipation, PoissonSampler
from lightfed.audit.exposure import (
    Canary,
    digit_secret_scores,
    exposure_from_scores,
    greedy_extracts,
    make_canaries,
    planted_lines,
)
from lightfed.data.partition import Natural
from lightfed.data.text import ShakespeareCausalDataModule
from lightfed.models.causal_lm import CausalLM
from lightfed.registry import STRATEGIES

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def data(args: argparse.Namespace, planted: dict[str, list[str]] | None = None) -> ShakespeareCausalDataModule:
    dm = ShakespeareCausalDataModule(
        Natural(min_size=args.min_blocks, max_clients=args.clients or None), block_size=args.block,
        plays=None if args.plays == ["all"] else args.plays,
        held_out_speakers=args.held_out, held_out_min_lines=40, planted=planted, test_subset=args.test_blocks,
        val_fraction=0.0, batch_size=args.batch, seed=args.seed,
    )
    dm.setup()
    return dm


def canaries(args: argparse.Namespace) -> tuple[list[Canary], dict[str, list[str]], list[str]]:
    """Canary 0 in the first client's text, canary 1 in the first ``k`` clients' text, each ``repeats`` times."""
    names = data(args).client_names()
    c = make_canaries(2, args.digits, args.seed)
    plan = [(c[0], names[:1]), (c[1], names[: args.k])]
    return c, planted_lines(plan, args.repeats), names


def evaluate(model: CausalLM, dm: ShakespeareCausalDataModule, cs: list[Canary], digits: int) -> dict[str, Any]:

    out: dict[str, Any] = {}
    model.eval()
    for name, split in (("ppl_seen", dm.test_data()), ("ppl_unseen", dm.unseen_test_data())):
        nll = count = 0.0
        with torch.no_grad():
            for batch in split.batches(16):
                s, _, n = model._stats(batch)
                nll, count = nll + float(s), count + float(n)
        out[name] = math.exp(nll / count)
    for i, c in enumerate(cs):
        start = time.perf_counter()
        scores = digit_secret_scores(model.model, model.tokenizer, c.prefix, digits)
        out[f"exposure_{i}"] = exposure_from_scores(scores, c.index)
        out[f"extracted_{i}"] = greedy_extracts(model.model, model.tokenizer, c)
        out["exposure_seconds"] = time.perf_counter() - start
    return out


def run_base(args: argparse.Namespace, dm: ShakespeareCausalDataModule, cs: list[Canary]) -> dict[str, Any]:
    return evaluate(CausalLM(lora=LORA), dm, cs, args.digits)


def run_central(args: argparse.Namespace, dm: ShakespeareCausalDataModule, cs: list[Canary]) -> dict[str, Any]:
    """A plain loop: the peft model, AdamW, the pooled blocks in seeded random batches; nothing of lightfed's loop."""
    torch.manual_seed(args.seed)
    model = CausalLM(lora=LORA, lr=args.lr)
    ids, mask, labels = (t[dm.train_part.indices] for t in dm.arrays.train)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=args.lr)
    steps = args.rounds * args.clients * args.local_steps
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    times = []
    for _ in range(steps):
        pick = torch.randint(0, len(ids), (args.batch,), generator=gen)
        start = time.perf_counter()
        out = model.model(input_ids=ids[pick], attention_mask=mask[pick], labels=labels[pick])
        out.loss.backward()
        opt.step()
        opt.zero_grad()
        times.append(time.perf_counter() - start)
    per_round = statistics.median(times) * args.clients * args.local_steps
    return {**evaluate(model, dm, cs, args.digits), "sec_round": per_round, "steps": steps}


def run_federated(
    args: argparse.Namespace, dm: ShakespeareCausalDataModule, cs: list[Canary], dp: bool, secagg: bool = False,
    strategy: str = "FedITLoRA",
) -> dict[str, Any]:
    torch.manual_seed(args.seed)
    model = CausalLM(lora=LORA, lr=args.lr, optimizer=args.optimizer)
    privacy = secure = None
    if dp:
        from lightfed.privacy import DPFixedClipping

        privacy = DPFixedClipping(clip_norm=args.clip, target_epsilon=args.epsilon, clipping="client", verbose=False)
    if secagg:
        from lightfed.secagg import SecAggPlus

        secure = SecAggPlus(clip=1.0, max_weight=1024.0)
    trainer = FederatedTrainer(
        rounds=args.rounds, strategy=STRATEGIES.create(strategy, weighted=not (dp or args.uniform)),
        sampler=PoissonSampler(args.sampling_rate) if args.sampling_rate < 1 else FullParticipation(),
        privacy=privacy, secure_aggregation=secure, local_steps=args.local_steps, batch_size=args.batch, eval_every=args.rounds,
        trainable=["*lora_B*"] if strategy == "FFALoRA" else None,  # FFA-LoRA: A frozen, only B travels
        eval_batch_size=16, fed_eval_fraction=0.0, checkpoint_every=0, logger=False, enable_progress_bar=False,
        default_root_dir=tempfile.mkdtemp(prefix="llm-table-"), accelerator="cpu", num_threads=1, seed=args.seed,
    )
    history = trainer.fit(model, dm)
    trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
    last = history[-1]
    return {
        **evaluate(trainer.module, dm, cs, args.digits),
        "sec_round": statistics.median(h["round/seconds"] for h in history),
        "bytes_up": statistics.mean(h["round/bytes_up_per_client"] for h in history),
        "epsilon": last.get("privacy/epsilon", float("nan")),
        "clients_per_round": statistics.mean(h.get("round/clients", float("nan")) for h in history),
        "noise_std": last.get("privacy/noise_std", float("nan")),
        "central_ppl_trainer": last.get("central/test_ppl", float("nan")),
    }


def table(rows: list[dict[str, Any]]) -> str:
    head = ("| setting | ppl seen | ppl unseen | exposure 1 client (bits) | exposure k clients | extracted | epsilon | "
            "bytes up/client/round | s/round |\n|---|---|---|---|---|---|---|---|---|")
    lines = [head]
    for r in rows:
        fmt = lambda key, f="{:.1f}", r=r: "-" if key not in r or r[key] != r[key] else f.format(r[key])  # noqa: E731
        lines.append(
            f"| {r['setting']} | {fmt('ppl_seen')} | {fmt('ppl_unseen')} | {fmt('exposure_0')} | {fmt('exposure_1')} | "
            f"{int(r.get('extracted_0', 0))}/{int(r.get('extracted_1', 0))} | {fmt('epsilon')} | "
            f"{fmt('bytes_up', '{:,.0f}')} | {fmt('sec_round')} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["base", "central", "fedit", "fedit_dp"])
    p.add_argument("--plays", nargs="+", default=["hamlet"], help="play names, or 'all'")
    p.add_argument("--clients", type=int, default=6, help="at most this many speakers (0: all)")
    p.add_argument("--sampling-rate", type=float, default=1.0, help="Poisson rate per round (1: everyone)")
    p.add_argument("--optimizer", choices=["adamw", "sgd"], default="adamw", help="the clients' optimiser")
    p.add_argument("--uniform", action="store_true", help="uniform client weights without DP too")
    p.add_argument("--min-blocks", type=int, default=12)
    p.add_argument("--held-out", type=int, default=3)
    p.add_argument("--test-blocks", type=int, default=48)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=8)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--repeats", type=int, default=8)
    p.add_argument("--digits", type=int, default=3, help="secret length n: |R| = 10^n candidates, all scored")
    p.add_argument("--k", type=int, default=3)
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--clip", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/llm_table.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    cs, planted, names = canaries(args)
    dm = data(args, planted)
    assert dm.client_names() == names, "planting the canaries changed the clients"
    print(f"clients {names}; held out {dm.held_out_names}; train blocks {len(dm.arrays.train[0])}; "
          f"canaries {[c.text for c in cs]}", flush=True)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in args.settings:
        start = time.perf_counter()
        if setting == "base":
            row = run_base(args, dm, cs)
        elif setting == "central":
            row = run_central(args, dm, cs)
        elif setting in ("fedit", "fedit_dp", "fedit_secagg", "ffa", "ffa_dp"):
            row = run_federated(args, dm, cs, dp=setting.endswith("_dp"), secagg=setting == "fedit_secagg",
                                strategy="FFALoRA" if setting.startswith("ffa") else "FedITLoRA")
        else:
            raise SystemExit(f"llm_table: unknown setting {setting!r}")
        row = {"setting": setting, **row, "wall_seconds": time.perf_counter() - start, "args": vars(args)}
        rows.append(row)
        with open(out, "a") as f:
            f.write(json.dumps(row) + "\n")
        print(json.dumps({k: v for k, v in row.items() if k != "args"}), flush=True)
    print(table(rows))


if __name__ == "__main__":
    main()
