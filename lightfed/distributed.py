"""Sharding a round's cohort over processes, then one all-reduce of one flat tensor.

Each rank trains a deterministic, load-balanced shard of the cohort (greedy by client size, see
:func:`lightfed.sampling.split_evenly`) on its own *unwrapped* worker model -- a DDP-wrapped model would
hang as soon as ranks run different numbers of batches. The linear sums of all ranks are packed into one
flat tensor and all-reduced once; the small per-client side information (metrics, rejected ids, client
state of stateful strategies, full updates for robust strategies) travels in one ``all_gather_object``.
Every rank then applies the same strategy step to the same sums, so server state stays identical.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightfed.aggregation import Aggregator, CollectAll, StreamingSum
from lightfed.checkpoint import to_cpu, to_device
from lightfed.messages import ClientUpdate
from lightfed.sampling import split_evenly


def shard_cohort(cohort: list[int], sizes: Tensor, world_size: int, rank: int) -> list[int]:
    """The clients of ``cohort`` this rank trains (balanced by training-set size)."""
    if world_size == 1:
        return cohort
    return split_evenly(cohort, world_size, [int(sizes[c]) for c in cohort])[rank]


def all_gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def merge_round(
    aggregator: Aggregator, side: dict[str, Any], numel: int, device: torch.device
) -> tuple[Aggregator, dict[str, Any]]:
    """Combine every rank's aggregator and side information; returns the global ones (same on all ranks).

    Args:
        aggregator: This rank's :class:`StreamingSum` or :class:`CollectAll`.
        side: This rank's ``{"metrics": [...], "rejected": [...], "states": {cid: state}}``.
        numel: Length of the flat update.
        device: Device of the collective.
    """
    assert isinstance(aggregator, StreamingSum)
    local = aggregator.result()
    extras_meta = {k: v.numel() for k, v in (local.extras_sum.items() if local is not None else [])}
    info = {
        **side,
        "extras": extras_meta,
        "updates": [(u, w) for u, w in zip(aggregator.updates, aggregator.weights)] if isinstance(aggregator, CollectAll) else [],
    }
    gathered = all_gather_objects(to_cpu(info))
    names = sorted({k for g in gathered for k in g["extras"]})
    sizes = {k: n for g in gathered for k, n in g["extras"].items()}
    flat = torch.zeros(numel + sum(sizes[k] for k in names) + 2, dtype=torch.float32, device=device)
    if local is not None:
        parts = [local.delta_sum] + [local.extras_sum[k] for k in names]
        flat[: flat.numel() - 2] = torch.cat([p.reshape(-1) for p in parts])
        flat[-2] = local.weight_sum
        flat[-1] = local.num_clients
    dist.all_reduce(flat, op=dist.ReduceOp.SUM)
    merged: StreamingSum = CollectAll() if isinstance(aggregator, CollectAll) else StreamingSum()
    if flat[-1] > 0:
        merged.delta_sum = flat[:numel].clone()
        offset = numel
        for k in names:
            merged.extras_sum[k] = flat[offset : offset + sizes[k]].clone()
            offset += sizes[k]
        merged.weight_sum = float(flat[-2])
        merged.num_clients = int(round(float(flat[-1])))
    if isinstance(merged, CollectAll):
        pairs = sorted((p for g in gathered for p in g["updates"]), key=lambda p: p[0].client_id)
        merged.updates = [_update_to(u, device) for u, _ in pairs]
        merged.weights = [w for _, w in pairs]
    out_side = {
        "metrics": [m for g in gathered for m in g["metrics"]],
        "rejected": sorted(c for g in gathered for c in g["rejected"]),
        "states": to_device({c: s for g in gathered for c, s in g["states"].items()}, device),
    }
    return merged, out_side


def _update_to(update: ClientUpdate, device: torch.device) -> ClientUpdate:
    update.delta = update.delta.to(device)
    update.extras = {k: v.to(device) for k, v in update.extras.items()}
    return update
