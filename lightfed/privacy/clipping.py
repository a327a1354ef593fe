"""L2 clipping of a client's whole update: the delta and every extra a strategy sends, flattened together.

Everything a client sends is covered: a strategy's extras (SCAFFOLD's control-variate delta, q-FedAvg's
``h``) are clipped jointly with the delta and noised with it, so the sensitivity of the round's sums is
exactly the clip norm ``C``.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from lightfed.messages import ClientUpdate


def update_norm(update: ClientUpdate) -> float:
    """``|| [delta, extras...] ||_2`` of everything the client sends (float64 accumulation)."""
    total = update.delta.double().pow(2).sum()
    for value in update.extras.values():
        total = total + value.double().pow(2).sum()
    return math.sqrt(float(total))


def clip_factor(norm: float, clip_norm: float) -> float:
    """``min(1, C / ||x||)``: the scale that brings ``x`` inside the L2 ball of radius ``C`` (1 for ``x = 0``)."""
    if clip_norm <= 0:
        raise ValueError(f"clip norm must be > 0, got {clip_norm}.")
    if not math.isfinite(norm):
        return 1.0  # NaN/Inf updates are rejected by the trainer; leave them as they are
    return 1.0 if norm <= clip_norm else clip_norm / norm


def clip_update(update: ClientUpdate, clip_norm: float) -> tuple[ClientUpdate, float]:
    """Scale the update (delta and extras together) to L2 norm at most ``clip_norm``.

    Returns:
        The clipped update (a new message; tensors are new only when scaled) and the norm before clipping.
    """
    norm = update_norm(update)
    factor = clip_factor(norm, clip_norm)
    if factor == 1.0:
        return update, norm
    scale: dict[str, Tensor] = {name: value * factor for name, value in update.extras.items()}
    clipped = ClientUpdate(
        client_id=update.client_id, delta=update.delta * factor, num_examples=update.num_examples,
        num_steps=update.num_steps, metrics=update.metrics, extras=scale, counts=dict(update.counts),
    )
    return clipped, norm


def gaussian_like(t: Tensor, std: float, generator: torch.Generator) -> Tensor:
    """``N(0, std^2)`` noise shaped like ``t`` from ``generator`` (drawn in float32 on ``t``'s device)."""
    noise = torch.randn(t.shape, generator=generator, device=t.device, dtype=torch.float32)
    return (noise * std).to(t.dtype)
