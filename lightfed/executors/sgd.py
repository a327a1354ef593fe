"""``torch.optim.SGD``'s update on stacked per-client tensors (what the vmap executor steps with)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from lightfed.executors.support import FIX, VmapUnsupportedError

__all__ = ["SGDHyper", "sgd_hypers"]


@dataclass(frozen=True)
class SGDHyper:
    """One parameter group of ``torch.optim.SGD``, applied to stacked (per-client) tensors."""

    lr: float
    momentum: float = 0.0
    dampening: float = 0.0
    weight_decay: float = 0.0
    nesterov: bool = False
    maximize: bool = False

    @classmethod
    def from_group(cls, group: dict[str, Any]) -> SGDHyper:
        return cls(
            lr=float(group["lr"]), momentum=float(group.get("momentum", 0.0)),
            dampening=float(group.get("dampening", 0.0)), weight_decay=float(group.get("weight_decay", 0.0)),
            nesterov=bool(group.get("nesterov", False)), maximize=bool(group.get("maximize", False)),
        )

    def step(self, param: Tensor, grad: Tensor, buf: Tensor | None) -> Tensor | None:
        """``torch.optim.SGD``'s update of ``param`` in place; returns the new momentum buffer.

        ``d = g + wd * p``; with momentum ``mu``: ``b = d`` on the first step, else
        ``b = mu * b + (1 - dampening) * d``, and ``d = d + mu * b`` (Nesterov) or ``d = b``;
        then ``p = p - lr * d`` (``g`` negated first when maximising).
        """
        d = -grad if self.maximize else grad
        if self.weight_decay:
            d = d.add(param, alpha=self.weight_decay)
        if self.momentum:
            if buf is None:
                buf = d.clone()
            else:
                buf.mul_(self.momentum).add_(d, alpha=1 - self.dampening)
            d = d.add(buf, alpha=self.momentum) if self.nesterov else buf
        param.add_(d, alpha=-self.lr)
        return buf


def sgd_hypers(optimizer: Any, tensors: list[Tensor]) -> list[SGDHyper | None]:
    """The SGD hyper-parameters of each payload tensor (``None``: not optimised, never changes)."""
    if type(optimizer) is not torch.optim.SGD:
        raise VmapUnsupportedError(
            f"configure_optimizers returned {type(optimizer).__name__}; the vmap executor implements "
            f"torch.optim.SGD (momentum, dampening, nesterov, weight decay) exactly and no other optimizer. {FIX}"
        )
    by_id: dict[int, SGDHyper] = {}
    for group in optimizer.param_groups:
        hyper = SGDHyper.from_group(group)
        for p in group["params"]:
            by_id[id(p)] = hyper
    return [by_id.get(id(t)) for t in tensors]
