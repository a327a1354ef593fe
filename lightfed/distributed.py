"""Sharding a round's cohort over processes, then one all-reduce of one flat tensor.

Each rank trains a deterministic, load-balanced shard of the cohort (greedy by client size, see
:func:`lightfed.sampling.split_evenly`) on its own *unwrapped* worker model -- a DDP-wrapped model would
hang as soon as ranks run different numbers of batches. The linear sums of all ranks are packed into one
flat tensor and all-reduced once; the small per-client side information (metrics, rejected ids, client
state of stateful strategies, full updates for robust strategies) travels in one ``all_gather_object``.
Every rank then applies the same strategy step to the same sums, so server state stays identical.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

from lightfed.aggregation import CollectAll, ShardResult, StreamingSum
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


def pack_shard(shard: ShardResult, numel: int, device: torch.device) -> tuple[dict[str, Any], Callable[[list[str], dict[str, int], list[str]], Tensor]]:
    """This process's side information (for ``all_gather_object``) and a builder of its flat sum vector.

    The flat vector ``[delta_sum, extras_sum..., counts_sum..., weight_sum, num_clients]`` is laid out by
    the names every process holds, known only after the side information is gathered.
    """
    aggregator = shard.aggregator
    assert isinstance(aggregator, StreamingSum)
    local = aggregator.result()
    info = {
        "metrics": shard.metrics, "rejected": shard.rejected, "states": shard.states, "extra": shard.extra,
        "steps": shard.steps,
        "extras": {k: v.numel() for k, v in (local.extras_sum.items() if local is not None else [])},
        "counts": sorted(local.counts_sum) if local is not None else [],
        "updates": [(u, w) for u, w in zip(aggregator.updates, aggregator.weights)] if isinstance(aggregator, CollectAll) else [],
    }

    def flat(names: list[str], sizes: dict[str, int], counts: list[str]) -> Tensor:
        out = torch.zeros(numel + sum(sizes[k] for k in names) + len(counts) + 2, dtype=torch.float32, device=device)
        if local is not None:
            parts = [local.delta_sum] + [local.extras_sum[k] for k in names]
            tail = [local.counts_sum.get(k, 0.0) for k in counts] + [local.weight_sum, float(local.num_clients)]
            out[: out.numel() - len(tail)] = torch.cat([p.reshape(-1) for p in parts])
            out[out.numel() - len(tail) :] = torch.tensor(tail, dtype=torch.float32, device=device)
        return out

    return info, flat


def layout(gathered: list[dict[str, Any]]) -> tuple[list[str], dict[str, int], list[str]]:
    """The extras' names and sizes and the counts' names over every process's side information."""
    names = sorted({k for g in gathered for k in g["extras"]})
    sizes = {k: n for g in gathered for k, n in g["extras"].items()}
    counts = sorted({k for g in gathered for k in g["counts"]})
    return names, sizes, counts


def unpack_shards(
    flat: Tensor, gathered: list[dict[str, Any]], numel: int, robust: bool, device: torch.device
) -> ShardResult:
    """The round's merged :class:`ShardResult` from the summed flat vector and every process's side information."""
    names, sizes, counts = layout(gathered)
    merged: StreamingSum = CollectAll() if robust else StreamingSum()
    if flat[-1] > 0:
        merged.delta_sum = flat[:numel].clone()
        offset = numel
        for k in names:
            merged.extras_sum[k] = flat[offset : offset + sizes[k]].clone()
            offset += sizes[k]
        for k in counts:
            merged.counts_sum[k] = float(flat[offset])
            offset += 1
        merged.weight_sum = float(flat[-2])
        merged.num_clients = int(round(float(flat[-1])))
    if isinstance(merged, CollectAll):
        pairs = sorted((p for g in gathered for p in g["updates"]), key=lambda p: p[0].client_id)
        merged.updates = [_update_to(u, device) for u, _ in pairs]
        merged.weights = [w for _, w in pairs]
    return ShardResult(
        merged,
        metrics=[m for g in gathered for m in g["metrics"]],
        rejected=sorted(c for g in gathered for c in g["rejected"]),
        extra=sum(g.get("extra", 0) for g in gathered),
        steps=sum(g.get("steps", 0) for g in gathered),
        states=to_device({c: s for g in gathered for c, s in g["states"].items()}, device),
    )


def merge_round(shard: ShardResult, numel: int, device: torch.device) -> ShardResult:
    """Combine every rank's shard (one ``all_gather_object``, one ``all_reduce``); the same on all ranks."""
    info, flat = pack_shard(shard, numel, device)
    gathered = all_gather_objects(to_cpu(info))
    vector = flat(*layout(gathered))
    dist.all_reduce(vector, op=dist.ReduceOp.SUM)
    return unpack_shards(vector, gathered, numel, isinstance(shard.aggregator, CollectAll), device)


def merge_in_process(shards: list[ShardResult], numel: int, device: torch.device) -> ShardResult:
    """What :func:`merge_round` computes, for shards held by one process (tests simulate ranks with it)."""
    packed = [pack_shard(s, numel, device) for s in shards]
    gathered = [to_cpu(info) for info, _ in packed]
    vector = torch.stack([flat(*layout(gathered)) for _, flat in packed]).sum(0)
    return unpack_shards(vector, gathered, numel, isinstance(shards[0].aggregator, CollectAll), device)


def _update_to(update: ClientUpdate, device: torch.device) -> ClientUpdate:
    update.delta = update.delta.to(device)
    update.extras = {k: v.to(device) for k, v in update.extras.items()}
    return update
