"""Batched multi-LoRA clients against one client after another, on SmolLM2-135M (measure before building).

``K`` clients, each with its own LoRA adapters (r 8 on q_proj, v_proj) over the shared frozen base, each with
a batch of ``b`` x ``--block`` tokens. One training step of every client (forward + backward) is done

* (a) **sequentially**: peft's LoRA model (what lightfed's client loop runs), the k-th client's adapters
  copied in, its batch forward and backward, one client after another;
* (b) **batched**: one forward and backward of all ``K b`` rows through
  :class:`~lightfed.models.multilora.MultiLoRALinear` layers, each applying the k-th client's adapters to the
  k-th client's rows (grouped ``bmm``), the loss the sum of the clients' mean losses.

The script checks that (b)'s losses and every client's adapter gradients equal (a)'s (float32 tolerance) and
reports tokens per second of both and their ratio, the median of ``--repeats`` timed steps after a
warm-up, the two sides taking turns. Steps are timed in process CPU seconds (and wall seconds): on a machine
shared with other jobs the CPU time is the fair measure, since it does not count the time other processes
hold the core. One torch thread. ::

    python benchmarks/multilora.py --clients 2 4 8 --batch 2 4
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from lightfed.models.causal_lm import CausalLM
from lightfed.models.multilora import MultiLoRALinear, add_multi_lora

LORA = {"r": 8, "lora_alpha": 16, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _layer_of(name: str, layers: dict[str, MultiLoRALinear]) -> tuple[MultiLoRALinear, str]:
    """The batched layer and factor of a peft name (``model.model.layers.0.self_attn.q_proj.lora_A...``)."""
    factor = "lora_A" if ".lora_A." in name else "lora_B"
    return layers[name.removeprefix("model.").split(".lora_")[0]], factor


def compare(peft: CausalLM, batched: torch.nn.Module, layers: dict[str, MultiLoRALinear], k: int, b: int,
            block: int, repeats: int, seed: int) -> dict[str, float]:
    """Time (a) and (b) for ``k`` clients of ``b`` rows; check equal losses and gradients."""
    names = [n for n, p in peft.named_parameters() if p.requires_grad]
    params = dict(peft.named_parameters())
    gen = torch.Generator().manual_seed(seed)
    adapters = [{n: 0.02 * torch.randn(params[n].shape, generator=gen) for n in names} for _ in range(k)]
    with torch.no_grad():
        for c, ad in enumerate(adapters):
            for n, v in ad.items():
                layer, factor = _layer_of(n, layers)
                getattr(layer, factor).data[c] = v
    vocab = peft.model.config.vocab_size
    ids = torch.randint(0, vocab, (k * b, block), generator=gen)

    def sequential() -> tuple[list[float], list[dict[str, torch.Tensor]]]:
        losses, grads = [], []
        for c in range(k):
            with torch.no_grad():
                for n, v in adapters[c].items():
                    params[n].copy_(v)
            rows = ids[c * b:(c + 1) * b]
            peft.zero_grad(set_to_none=True)
            loss = peft.model(input_ids=rows, labels=rows).loss
            loss.backward()
            losses.append(loss.item())
            grads.append({n: params[n].grad for n in names})
        return losses, grads

    def together() -> list[float]:
        batched.zero_grad(set_to_none=True)
        logits = batched(input_ids=ids).logits
        per = [F.cross_entropy(logits[c * b:(c + 1) * b, :-1].reshape(-1, vocab),
                               ids[c * b:(c + 1) * b, 1:].reshape(-1)) for c in range(k)]
        torch.stack(per).sum().backward()
        return [x.item() for x in per]

    seq_losses, seq_grads = sequential()  # also the warm-up of both
    bat_losses = together()
    worst = 0.0
    for c in range(k):
        for n in names:
            layer, factor = _layer_of(n, layers)
            got, want = getattr(layer, factor).grad[c], seq_grads[c][n]
            worst = max(worst, float((got - want).abs().max() / want.abs().max().clamp_min(1e-30)))
    torch.testing.assert_close(torch.tensor(bat_losses), torch.tensor(seq_losses), rtol=1e-5, atol=1e-6)
    assert worst < 1e-3, f"batched gradients differ from sequential: max relative error {worst:.2e}"
    cpu: dict[str, list[float]] = {"sequential": [], "batched": []}
    wall: dict[str, list[float]] = {"sequential": [], "batched": []}
    for _ in range(repeats):
        for side, fn in (("sequential", sequential), ("batched", together)):
            start, start_cpu = time.perf_counter(), time.process_time()
            fn()
            cpu[side].append(time.process_time() - start_cpu)
            wall[side].append(time.perf_counter() - start)
    tokens = k * b * block
    seq, bat = statistics.median(cpu["sequential"]), statistics.median(cpu["batched"])
    return {"clients": k, "batch": b, "block": block, "tokens": tokens, "seq_cpu_seconds": seq,
            "batched_cpu_seconds": bat, "seq_tokens_per_s": tokens / seq,
            "batched_tokens_per_s": tokens / bat, "speedup": seq / bat,
            "seq_wall_seconds": statistics.median(wall["sequential"]),
            "batched_wall_seconds": statistics.median(wall["batched"]),
            "max_rel_grad_error": worst, "repeats": repeats}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clients", type=int, nargs="+", default=[2, 4, 8])
    p.add_argument("--batch", type=int, nargs="+", default=[2, 4])
    p.add_argument("--block", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--model", default=None, help="a model folder or .gguf file (default: packaged SmolLM2)")
    p.add_argument("--out", default="benchmarks/results/multilora.jsonl")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    peft = CausalLM(model=args.model, lora=LORA)
    peft.train()
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    print("| clients K | batch b | tokens | sequential tokens/CPU-s | batched tokens/CPU-s | "
          "batched / sequential | max rel. grad error |\n|---|---|---|---|---|---|---|", flush=True)
    for k in args.clients:
        batched = CausalLM(model=args.model).model  # a fresh base per K: the layers hold K adapters
        layers = add_multi_lora(batched, LORA["target_modules"], clients=k, r=LORA["r"],
                                alpha=LORA["lora_alpha"])
        batched.train()
        for b in args.batch:
            row = compare(peft, batched, layers, k, b, args.block, args.repeats, args.seed)
            with open(out, "a") as f:
                f.write(json.dumps({**row, "torch_threads": torch.get_num_threads(), "model": args.model,
                                    "load_average": os.getloadavg()}) + "\n")
            print(f"| {k} | {b} | {row['tokens']} | {row['seq_tokens_per_s']:.1f} | "
                  f"{row['batched_tokens_per_s']:.1f} | {row['speedup']:.2f}x | "
                  f"{row['max_rel_grad_error']:.1e} |", flush=True)
        del batched, layers


if __name__ == "__main__":
    main()
