"""The one-shot canary audit on SmolLM2-135M's LoRA adapters: FedIT over Shakespeare speakers, with and
without client-level DP.

Each setting is one FedIT run (r 8 on q_proj, v_proj: the audited vector is the 460,800 adapter numbers that
travel) with :class:`~lightfed.audit.OneShotCanaryAudit` under ``inclusion="coin"``: ``--canaries`` random
unit directions in the adapter vector, each inserted as a canary client on a fair coin (Steinke, Nasr &
Jagielski, NeurIPS 2023); every client and canary takes part in every round. Reported per setting:

* the **one-run lower bound** at ``--delta`` and 95% confidence (the larger of the final-model and
  all-iterates tests, each at 97.5%): the run is not DP for canary clients at any smaller epsilon;
* the one-shot **estimate** (Andrew et al., ICLR 2024) from the same canaries, final model and all iterates;
* the **accountant's epsilon** (``fedit_dp``: the clip and noise set for ``--epsilon`` at ``--delta``);
* canaries (inserted / candidates), rounds, clients, seconds.

Without DP the canaries need a norm: ``--canary-norm`` (default 1, about a client's update norm after one
AdamW step at lr 2e-3); under DP they are clipped to ``--clip`` like every client. One torch thread. Results
are appended to ``--out`` as JSON lines, one markdown row per setting is printed::

    python benchmarks/llm_audit.py --settings fedit fedit_dp --clients 40 --rounds 3

The clients come from ``benchmarks/llm_table.py``'s :func:`data` (same tokenizer, blocks, held-out speakers).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from llm_table import LORA, data  # noqa: E402 - the sibling benchmark's clients, not a copy of them

from lightfed import FederatedTrainer, FullParticipation  # noqa: E402
from lightfed.audit import OneShotCanaryAudit  # noqa: E402
from lightfed.models.causal_lm import CausalLM  # noqa: E402
from lightfed.registry import STRATEGIES  # noqa: E402


def run(args: argparse.Namespace, dp: bool) -> dict[str, Any]:
    """One FedIT run with the coin-inclusion canary audit; the audit's report and the run's cost."""
    from lightfed.privacy import DPFixedClipping

    torch.manual_seed(args.seed)
    dm = data(args)
    model = CausalLM(lora=LORA, lr=args.lr)
    privacy = None
    if dp:
        privacy = DPFixedClipping(clip_norm=args.clip, target_epsilon=args.epsilon, delta=args.delta,
                                  clipping="client", verbose=False)
    half = args.canaries // 2
    audit = OneShotCanaryAudit(
        num_canaries=half, num_held_out=args.canaries - half, inclusion="coin", delta=args.delta,
        canary_norm=None if dp else args.canary_norm, bootstrap=100, seed=args.seed,
    )
    trainer = FederatedTrainer(
        rounds=args.rounds, sampler=FullParticipation(), privacy=privacy, callbacks=[audit],
        strategy=STRATEGIES.create("FedITLoRA", weighted=not dp), local_steps=args.local_steps,
        batch_size=args.batch, eval_every=args.rounds, eval_batch_size=16, fed_eval_fraction=0.0,
        checkpoint_every=0, logger=False, enable_progress_bar=False, accelerator="cpu", num_threads=1,
        default_root_dir=tempfile.mkdtemp(prefix="llm-audit-"), seed=args.seed,
    )
    start = time.perf_counter()
    history = trainer.fit(model, dm)
    seconds = time.perf_counter() - start
    r = audit.report
    assert r is not None
    return {
        "epsilon_lower_bound": r["one_run"]["epsilon_lower_bound"],
        "lower_bound_final": r["one_run"]["final_model"]["epsilon_lower_bound"],
        "lower_bound_all_iterates": r["one_run"]["all_iterates"]["epsilon_lower_bound"],
        "guesses_final": [r["one_run"]["final_model"]["correct"], r["one_run"]["final_model"]["guesses"]],
        "estimate_final": r["final_model"]["epsilon"], "estimate_all_iterates": r["all_iterates"]["epsilon"],
        "accountant_epsilon": r["accountant_epsilon"], "claimed_epsilon": r["claimed_epsilon"],
        "delta": r["delta"], "canaries_inserted": audit.inserted, "candidates": r["one_run"]["candidates"],
        "dimension": r["dimension"], "canary_norm": r["canary_norm"], "rounds": len(history),
        "clients": dm.num_clients, "seconds": seconds,
        "sec_round": statistics.median(h["round/seconds"] for h in history),
        "ppl_seen": history[-1].get("central/test_ppl", math.nan),
    }


def row(r: dict[str, Any]) -> str:
    """One markdown row of the table printed at the end."""
    acc = r["accountant_epsilon"]
    return (
        f"| {r['setting']} | {r['epsilon_lower_bound']:.2f} ({r['lower_bound_final']:.2f} / "
        f"{r['lower_bound_all_iterates']:.2f}) | {r['estimate_final']:.3g} / "
        f"{r['estimate_all_iterates']:.3g} | {'-' if acc is None else f'{acc:.2f}'} | "
        f"{r['canaries_inserted']} / {r['candidates']} | {r['rounds']} | {r['clients']} | "
        f"{r['seconds']:.0f} |"
    )


HEAD = ("| setting | one-run lower bound (final / all iterates) | one-shot estimate (final / all iterates) | "
        "accountant epsilon | canaries inserted / candidates | rounds | clients | seconds |\n"
        "|---|---|---|---|---|---|---|---|")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--settings", nargs="+", default=["fedit", "fedit_dp"], choices=["fedit", "fedit_dp"])
    p.add_argument("--plays", nargs="+", default=["hamlet", "macbeth", "othello"])
    p.add_argument("--clients", type=int, default=40)
    p.add_argument("--min-blocks", type=int, default=4)
    p.add_argument("--held-out", type=int, default=3)
    p.add_argument("--test-blocks", type=int, default=48)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=1)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--canaries", type=int, default=64,
                   help="candidates, each inserted on a fair coin (at most about 1.5 x clients)")
    p.add_argument("--canary-norm", type=float, default=1.0, help="the canaries' norm without DP")
    p.add_argument("--epsilon", type=float, default=8.0)
    p.add_argument("--delta", type=float, default=1e-5)
    p.add_argument("--clip", type=float, default=0.05)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/llm_audit.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for setting in args.settings:
        result = {"setting": setting, **run(args, dp=setting == "fedit_dp"), "args": vars(args)}
        rows.append(result)
        with open(out, "a") as f:
            f.write(json.dumps(result) + "\n")
        print(row(result), flush=True)
    print("\n" + HEAD + "\n" + "\n".join(row(r) for r in rows))


if __name__ == "__main__":
    main()
