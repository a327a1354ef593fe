"""Small pieces the zoo's strategies share: example-count weights, argument checks, stacking updates.

Only lightfed's public API is used here, as a third-party plugin would.
"""

from __future__ import annotations

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.messages import ClientUpdate
from lightfed.params import ParamSpec


def check_fraction(value: float, name: str, owner: str, low: float, high: float, high_open: bool = True) -> float:
    """``value`` as a float if ``low <= value < high`` (``<= high`` with ``high_open=False``), else ``ValueError``."""
    ok = low <= value < high if high_open else low <= value <= high
    require(
        ok,
        f"{owner} {name} must be in [{low}, {high}{')' if high_open else ']'}, got {value} "
        f"(`strategy.init_args.{name}`).",
    )
    return float(value)


def stack_deltas(updates: list[ClientUpdate]) -> Tensor:
    """The round's deltas as one ``(num_updates, numel)`` matrix."""
    return torch.stack([u.delta for u in updates])


def parameter_mask(spec: ParamSpec, device: torch.device) -> Tensor:
    """Boolean vector over the flat payload: ``True`` at parameters, ``False`` at buffers."""
    parts = [torch.full((n,), not b, dtype=torch.bool, device=device) for n, b in zip(spec.numels, spec.is_buffer)]
    return torch.cat(parts) if parts else torch.zeros(0, dtype=torch.bool, device=device)


def coordinate_median(x: Tensor) -> Tensor:
    """Coordinate-wise median of the rows of ``x``; the mean of the two middle values for an even count.

    (``torch.median`` returns the lower middle value instead, which is not the median of the papers.)
    """
    n = x.shape[0]
    ordered = x.sort(dim=0).values
    if n % 2 == 1:
        return ordered[n // 2]
    return (ordered[n // 2 - 1] + ordered[n // 2]) / 2


def local_lr(optimizer: torch.optim.Optimizer) -> float:
    """The learning rate of the first parameter group (the local step size ``eta_l`` of the papers)."""
    return float(optimizer.param_groups[0]["lr"])


def restore_tensor(state: dict, key: str, like: Tensor | None, owner: str) -> Tensor:
    """``state[key]`` after checking it exists and has the shape of ``like`` (the tensor set up for this run).

    Raises:
        ValueError: if the key is missing or the shapes differ (a checkpoint of another model or strategy).
    """
    if key not in state:
        raise ValueError(f"{owner} state has no {key!r} (keys: {sorted(state)}); the checkpoint is not a {owner} one.")
    value = state[key]
    if like is not None and value is not None and tuple(value.shape) != tuple(like.shape):
        raise ValueError(
            f"{owner} state {key!r} has shape {tuple(value.shape)}, this run needs {tuple(like.shape)}; "
            f"resume with the same model and `trainer.trainable`."
        )
    return value
