"""Seconds per round of lightfed's FedIT on SmolLM2-135M against a plain PyTorch + peft loop doing the same steps.

Both sides train the same LoRA model (r 8 on q_proj, v_proj), on the same clients' 64-token blocks, with a fresh
AdamW per client visit, ``--local-steps`` steps of ``--batch`` blocks, and average the adapters' updates (FedIT).
The plain loop is what a user would write without lightfed: reset the adapters to the global ones, train,
subtract, average. The rounds alternate (lightfed, plain, lightfed, ...: a callback runs the plain round after each lightfed
round, outside its timing), and each side's round is timed in
process CPU seconds as well as wall seconds: on a machine shared with other jobs the CPU time is the fair
measure, since it does not count the time other processes hold the cores. One torch thread. Peak memory is the
process's maximum resident set size at the end.

    python benchmarks/llm_speed.py --clients 4 --rounds 3
"""

from __future__ import annotations

import argparse
import resource
import statistics
import tempfile
import time
from typing import Any

import torch

from lightfed import FederatedTrainer, FullParticipation
from lightfed.callbacks import Callback
from lightfed.data.partition import Natural
from lightfed.data.text import ShakespeareCausalDataModule
from lightfed.models.causal_lm import CausalLM

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def plain_round(model: CausalLM, dm: ShakespeareCausalDataModule, args: argparse.Namespace, round_idx: int) -> None:
    """One FedIT round written by hand: per client, fresh AdamW from the global adapters; then the mean update."""
    params = [p for p in model.parameters() if p.requires_grad]
    start = [p.detach().clone() for p in params]
    total = [torch.zeros_like(p) for p in params]
    for cid in range(dm.num_clients):
        with torch.no_grad():
            for p, s in zip(params, start):
                p.copy_(s)
        opt = torch.optim.AdamW(params, lr=args.lr)
        data = dm.client_train(cid)
        gen = torch.Generator().manual_seed(1000 * round_idx + cid)
        batches = data.batches(args.batch, generator=gen)
        for _, batch in zip(range(args.local_steps), batches):
            out = model.model(**batch)
            out.loss.backward()
            opt.step()
            opt.zero_grad()
        with torch.no_grad():
            for t, p, s in zip(total, params, start):
                t += p - s
    with torch.no_grad():
        for p, s, t in zip(params, start, total):
            p.copy_(s + t / dm.num_clients)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, default=4)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--local-steps", type=int, default=2)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--lr", type=float, default=2e-3)
    p.add_argument("--model", default=None, help="a model folder or .gguf file (default: the packaged SmolLM2)")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    dm = ShakespeareCausalDataModule(Natural(min_size=12, max_clients=args.clients), model=args.model,
                                     block_size=args.block,
                                     plays=["hamlet"], held_out_speakers=3, test_subset=8, val_fraction=0.0)
    dm.setup()
    ours, plain = (CausalLM(model=args.model, lora=LORA, lr=args.lr) for _ in range(2))
    plain.train()
    times: dict[str, list[tuple[float, float]]] = {"lightfed": [], "plain": []}

    class Interleave(Callback):
        """Times each lightfed round (client training to the strategy step), then runs one plain round."""

        def on_round_start(self, trainer: Any, round_idx: int, cohort: list[int]) -> None:
            self.clock = (time.process_time(), time.perf_counter())

        def on_round_end(self, trainer: Any, result: Any) -> None:
            times["lightfed"].append((time.process_time() - self.clock[0], time.perf_counter() - self.clock[1]))
            cpu, wall = time.process_time(), time.perf_counter()
            plain_round(plain, dm, args, result.round_idx)
            times["plain"].append((time.process_time() - cpu, time.perf_counter() - wall))

    # rounds + 2: the first (warm-up) and the last (it evaluates) are left out of the statistics
    trainer = FederatedTrainer(
        rounds=args.rounds + 2, sampler=FullParticipation(), strategy="FedITLoRA", local_steps=args.local_steps,
        batch_size=args.batch, eval_every=10**6, eval_batch_size=8, fed_eval_fraction=0.0, checkpoint_every=0,
        logger=False, enable_progress_bar=False, default_root_dir=tempfile.mkdtemp(prefix="llm-speed-"),
        accelerator="cpu", num_threads=1, callbacks=[Interleave()],
    )
    trainer.fit(ours, dm)
    times = {k: v[1:-1] for k, v in times.items()}
    tokens = args.clients * args.local_steps * args.batch * args.block
    for side, ts in times.items():
        cpu, wall = statistics.median(t[0] for t in ts), statistics.median(t[1] for t in ts)
        print(f"{side:9s} CPU s/round {cpu:7.1f}  wall s/round {wall:7.1f}  tokens/CPU-s {tokens / cpu:6.1f}")
    ratio = statistics.median(a[0] / b[0] for a, b in zip(times["lightfed"], times["plain"]))
    print(f"lightfed / plain CPU time per round: {ratio:.3f} (median over {args.rounds} paired rounds; "
          f"{args.clients} clients x {args.local_steps} steps x {args.batch} x {args.block} tokens)")
    print(f"peak RSS {resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f} MB")


if __name__ == "__main__":
    main()
