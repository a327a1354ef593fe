"""Helpers of the vmap executor: swapping a module's tensors, recording its logs, gathering batches."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from lightfed.client import LogSink
from lightfed.executors.support import FIX, VmapUnsupportedError

__all__ = ["LogRecorder", "SwapCall", "gather", "gather_each", "swap_names"]


class SwapCall(nn.Module):
    """``functional_call`` target: runs ``fn(*args)`` while ``module``'s tensors are swapped."""

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        self.module = module

    def forward(self, fn: Callable[..., Any], *args: Any) -> Any:
        return fn(*args)


class LogRecorder(LogSink):
    """Stands in for ``module.log`` inside the vectorised step: keeps the (batched) values it is given."""

    def __init__(self) -> None:
        self.values: dict[str, Tensor] = {}

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        if hasattr(value, "compute") and hasattr(value, "reset"):
            raise VmapUnsupportedError(
                f"training_step logs the torchmetrics Metric {name!r}; a stateful metric cannot be updated "
                f"inside a vectorised step (log a tensor instead). {FIX}"
            )
        self.values[name] = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))


def swap_names(module: nn.Module, names: tuple[str, ...]) -> dict[str, list[str]]:
    """For each payload name, the ``SwapCall``-relative names to swap: one per distinct (module, attribute).

    A parameter shared by two modules (tied embeddings) must be swapped in both; a module reachable under
    two names (``self.net = nn.Sequential(self.features, self.head)``) must be swapped once, or
    ``functional_call``'s own weight tying swaps it twice and restores the wrong tensor.
    """
    aliases: dict[int, list[str]] = {}
    for alias, p in module.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(alias)
    params = dict(module.named_parameters())
    out: dict[str, list[str]] = {}
    for name in names:
        seen: set[tuple[int, str]] = set()
        keys = []
        for alias in aliases[id(params[name])]:
            prefix, _, attr = alias.rpartition(".")
            owner = (id(module.get_submodule(prefix)), attr)
            if owner not in seen:
                seen.add(owner)
                keys.append(f"module.{alias}")
        out[name] = keys
    return out


def gather(tensors: tuple[Tensor, ...], idx: Tensor) -> tuple[Tensor, ...]:
    """``[k, B, ...]`` rows of the pooled ``tensors`` at the ``[k, B]`` indices ``idx``."""
    flat = idx.reshape(-1)
    return tuple(t.index_select(0, flat).view(*idx.shape, *t.shape[1:]) for t in tensors)


def gather_each(sources: list[tuple[Tensor, ...]], idx: Tensor) -> tuple[Tensor, ...]:
    """Like :func:`gather` when clients index different tensors."""
    parts = [tuple(t.index_select(0, row) for t in src) for src, row in zip(sources, idx)]
    return tuple(torch.stack(cols) for cols in zip(*parts))
