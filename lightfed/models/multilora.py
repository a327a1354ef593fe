r"""Batched multi-LoRA: ``K`` clients' adapters over one shared frozen base, in one forward/backward.

A round's cohort shares the frozen base model; only the LoRA factors differ between clients. Stacking the
clients' batches (client ``k``'s ``b`` rows at rows ``k b .. (k + 1) b - 1``) lets one forward pass serve
all of them, with each adapted linear layer applying client ``k``'s factors to client ``k``'s rows only:

.. math::

    y_{k} = x_{k} W^\top + \text{bias} + \frac{\alpha}{r} \, (x_{k} A_k^\top) B_k^\top,
    \qquad x_k \in \mathbb{R}^{b T \times d_{in}},\ A_k \in \mathbb{R}^{r \times d_{in}},\
    B_k \in \mathbb{R}^{d_{out} \times r},

the base product as one large matmul over all ``K b T`` rows and the adapters as a grouped (batched) matmul
``x.view(K, b T, d_in) @ A^T`` (LoRA: Hu et al., ICLR 2022; serving many adapters over one base: S-LoRA,
Sheng et al., MLSys 2024, and Punica, Chen et al., MLSys 2024). With the loss taken as the *sum* of the
clients' own mean losses, client ``k``'s factors get exactly the gradient of its own loss: no row of another
client reaches ``A_k`` or ``B_k``. tests/models/test_multilora.py checks it against per-client peft.

Whether it pays is a matter of hardware: benchmarks/multilora.py measures it against training the clients
one after another (benchmarks/README.md has the numbers). On the 2-core CPU it does not pay, so the client
loop trains clients sequentially; this layer is the GPU path.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from torch import Tensor, nn

__all__ = ["MultiLoRALinear", "add_multi_lora"]


class MultiLoRALinear(nn.Module):
    """A frozen ``nn.Linear`` plus ``clients`` independent LoRA adapters, one per contiguous block of rows.

    Args:
        base: The linear layer to adapt (its parameters are frozen).
        clients: ``K``, the number of adapters; the input's leading dimension must be a multiple of ``K``.
        r: LoRA rank.
        alpha: LoRA scaling numerator (the update is scaled by ``alpha / r``).

    Attributes:
        lora_A: ``(K, r, d_in)``, initialised as peft does (Kaiming-uniform, ``a = sqrt(5)``).
        lora_B: ``(K, d_out, r)``, initialised to zero.
    """

    def __init__(self, base: nn.Linear, clients: int, r: int, alpha: float) -> None:
        super().__init__()
        if clients < 1 or r < 1:
            raise ValueError(f"MultiLoRALinear needs clients >= 1 and r >= 1, got clients={clients}, r={r}.")
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.clients, self.r, self.scaling = clients, r, alpha / r
        kw = {"device": base.weight.device, "dtype": base.weight.dtype}
        self.lora_A = nn.Parameter(torch.empty(clients, r, base.in_features, **kw))
        self.lora_B = nn.Parameter(torch.zeros(clients, base.out_features, r, **kw))
        for k in range(clients):
            nn.init.kaiming_uniform_(self.lora_A.data[k], a=math.sqrt(5))

    def forward(self, x: Tensor) -> Tensor:
        """``x``: ``(K b, ..., d_in)``, client ``k``'s rows contiguous; returns ``(K b, ..., d_out)``."""
        if x.shape[0] % self.clients:
            raise ValueError(
                f"MultiLoRALinear: {x.shape[0]} rows do not split into {self.clients} clients' blocks.")
        grouped = x.reshape(self.clients, -1, x.shape[-1])  # (K, b T, d_in): client k's rows
        delta = torch.bmm(torch.bmm(grouped, self.lora_A.transpose(1, 2)), self.lora_B.transpose(1, 2))
        return self.base(x) + self.scaling * delta.reshape(*x.shape[:-1], -1)


def add_multi_lora(
    model: nn.Module, target_modules: Sequence[str], clients: int, r: int, alpha: float
) -> dict[str, MultiLoRALinear]:
    """Replace every ``nn.Linear`` whose last name is in ``target_modules`` by a :class:`MultiLoRALinear`.

    Every parameter of ``model`` is frozen first, so only the adapters train.

    Returns:
        The new layers by their module name (``model.layers.0.self_attn.q_proj``).

    Raises:
        ValueError: when a name in ``target_modules`` matches no linear layer.
    """
    for p in model.parameters():
        p.requires_grad_(False)
    found: dict[str, MultiLoRALinear] = {}
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if child_name in target_modules and isinstance(child, nn.Linear):
                layer = MultiLoRALinear(child, clients, r, alpha)
                setattr(module, child_name, layer)
                found[f"{name}.{child_name}" if name else child_name] = layer
    missing = [t for t in target_modules if not any(n.rsplit(".", 1)[-1] == t for n in found)]
    if missing:
        raise ValueError(
            f"add_multi_lora: target_modules {missing} match no nn.Linear of {type(model).__name__}.")
    return found
