"""Batched multi-LoRA equals per-client peft: the same losses and, adapter by adapter, the same gradients."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from lightfed.models import CausalLM
from lightfed.models.multilora import MultiLoRALinear, add_multi_lora

R, ALPHA, K, B, T = 2, 4.0, 3, 2, 8
LORA = {"r": R, "lora_alpha": ALPHA, "lora_dropout": 0.0, "target_modules": ["q_proj", "v_proj"]}


def _client_adapters(peft_names: list[str], shapes: list[torch.Size]) -> list[dict[str, torch.Tensor]]:
    """K clients' own (nonzero) A and B factors, seeded per client."""
    out = []
    for k in range(K):
        gen = torch.Generator().manual_seed(100 + k)
        out.append({n: 0.3 * torch.randn(s, generator=gen) for n, s in zip(peft_names, shapes, strict=True)})
    return out


def test_batched_forward_backward_equals_per_client_peft(tiny_llama: Path) -> None:
    # Prepare: per-client peft (CausalLM's LoRA) and the batched layer over a second copy of the same base.
    peft = CausalLM(model=str(tiny_llama), lora=LORA)
    names = [n for n, p in peft.named_parameters() if p.requires_grad]
    params = dict(peft.named_parameters())
    clients = _client_adapters(names, [params[n].shape for n in names])
    ids = torch.randint(3, 60, (K * B, T), generator=torch.Generator().manual_seed(0))
    batched = CausalLM(model=str(tiny_llama)).model
    layers = add_multi_lora(batched, ["q_proj", "v_proj"], clients=K, r=R, alpha=ALPHA)
    assert len(layers) == 4 and all(isinstance(v, MultiLoRALinear) for v in layers.values())
    with torch.no_grad():
        for k, adapters in enumerate(clients):
            for n, value in adapters.items():  # model.model.layers.0.self_attn.q_proj.lora_A.default.weight
                layer = layers[n.removeprefix("model.").split(".lora_")[0]]
                (layer.lora_A if ".lora_A." in n else layer.lora_B).data[k] = value
    assert [n for n, p in batched.named_parameters() if p.requires_grad] == [
        f"{name}.{f}" for name in layers for f in ("lora_A", "lora_B")]

    # Execute: (a) one client after another through peft; (b) one batched step, the sum of the clients' losses
    seq_loss, seq_grads = [], []
    for k, adapters in enumerate(clients):
        with torch.no_grad():
            for n, value in adapters.items():
                params[n].copy_(value)
        rows = ids[k * B:(k + 1) * B]
        loss = peft.model(input_ids=rows, labels=rows).loss
        peft.zero_grad()
        loss.backward()
        seq_loss.append(loss.item())
        seq_grads.append({n: params[n].grad.clone() for n in names})
    logits = batched(input_ids=ids).logits
    per_client = [F.cross_entropy(logits[k * B:(k + 1) * B, :-1].reshape(-1, logits.shape[-1]),
                                  ids[k * B:(k + 1) * B, 1:].reshape(-1)) for k in range(K)]
    torch.stack(per_client).sum().backward()

    # Assert: each client's loss, and the gradient of each of its factors, equal the per-client peft step.
    assert [x.item() for x in per_client] == pytest.approx(seq_loss, rel=1e-5)
    for k in range(K):
        for n in names:
            layer = layers[n.removeprefix("model.").split(".lora_")[0]]
            grad = (layer.lora_A if ".lora_A." in n else layer.lora_B).grad[k]
            assert seq_grads[k][n].abs().max() > 0
            torch.testing.assert_close(grad, seq_grads[k][n], rtol=1e-4, atol=1e-6)


def test_bad_input_is_refused_by_name() -> None:
    layer = MultiLoRALinear(torch.nn.Linear(4, 3), clients=2, r=1, alpha=1.0)
    with pytest.raises(ValueError, match="3 rows do not split into 2 clients"):
        layer(torch.zeros(3, 5, 4))
    with pytest.raises(ValueError, match=r"\['k_prj'\] match no nn.Linear"):
        add_multi_lora(torch.nn.Sequential(torch.nn.Linear(2, 2)), ["k_prj"], clients=2, r=1, alpha=1.0)
