"""Sharding a round's cohort over processes, then one all-reduce of one flat tensor.

Each rank trains a deterministic, load-balanced shard of the cohort (greedy by client size, see
:func:`lightfed.sampling.split_evenly`) on its own *unwrapped* worker model -- a DDP-wrapped model would
hang as soon as ranks run different numbers of batches. The linear sums of all ranks are packed into one
flat tensor and all-reduced once; the small per-client side information (metrics, the clients' records,
rejected ids, client state of stateful strategies, full updates for robust strategies) travels in one
``all_gather_object``.
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
from lightfed.exact_sum import NUM_BINS, ExactScalar, ExactSum
from lightfed.messages import ClientUpdate
from lightfed.sampling import split_evenly
from lightfed.server import ClientShard


def shard_cohort(cohort: list[int], sizes: Tensor, world_size: int, rank: int) -> list[int]:
    """The clients of ``cohort`` this rank trains (balanced by training-set size)."""
    if world_size == 1:
        return cohort
    return split_evenly(cohort, world_size, [int(sizes[c]) for c in cohort])[rank]


def all_gather_objects(obj: Any) -> list[Any]:
    out: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


#: The extras' names, their sizes, and each sum's block (``None``: the delta's).
Layout = tuple[list[str], dict[str, int], dict[str | None, int]]


def pack_shard(
    shard: ShardResult, numel: int, device: torch.device
) -> tuple[dict[str, Any], Callable[..., Tensor]]:
    """This process's side information (for ``all_gather_object``) and a builder of its flat int64 bins.

    The sums are exact (:mod:`lightfed.exact_sum`): the weight and count sums travel as exact integers in
    the side information (summed there, exactly); the tensors' bins, moved to the largest block of any
    process, are the flat vector ``[delta bins, extras' bins...]`` that is all-reduced, laid out by the
    names every process holds, known only after the side information is gathered. Integer sums do not
    depend on the order, so every sharding of the cohort gives the same bits.
    """
    aggregator = shard.aggregator
    assert isinstance(aggregator, StreamingSum)
    sums: dict[str | None, ExactSum | None] = {None: aggregator.delta_sum, **aggregator.extras_sum}
    info = {
        "metrics": shard.metrics, "rejected": shard.rejected, "states": shard.states, "extra": shard.extra,
        "steps": shard.steps, "clients": getattr(shard, "clients", []),
        "extras": {k: v.bins.shape[1] for k, v in aggregator.extras_sum.items()},
        "sums": {k: (v.block, v.terms, v.dtype, tuple(v.shape)) for k, v in sums.items() if v is not None},
        "counts": {k: v.scaled for k, v in aggregator.counts_sum.items()},
        "weight": aggregator.weight_sum.scaled,
        "num_clients": aggregator.num_clients,
        "updates": [(u, w) for u, w in zip(aggregator.updates, aggregator.weights)] if isinstance(aggregator, CollectAll) else [],
    }

    def flat(names: list[str], sizes: dict[str, int], blocks: dict[str | None, int]) -> Tensor:
        parts = []
        for name, size in [(None, numel)] + [(k, sizes[k]) for k in names]:
            acc = sums.get(name)
            if acc is None:
                parts.append(torch.zeros(NUM_BINS * size, dtype=torch.int64, device=device))
            else:
                parts.append(acc.packed(blocks[name]).to(device))
        return torch.cat(parts)

    return info, flat


def layout(gathered: list[dict[str, Any]]) -> Layout:
    """The extras' names and sizes, and each sum's block: the largest of any process (``None``: the delta)."""
    names = sorted({k for g in gathered for k in g["extras"]})
    sizes = {k: n for g in gathered for k, n in g["extras"].items()}
    blocks: dict[str | None, int] = {}
    for g in gathered:
        for k, (block, *_) in g["sums"].items():
            blocks[k] = max(block, blocks.get(k, block))
    return names, sizes, blocks


def unpack_shards(
    flat: Tensor, gathered: list[dict[str, Any]], numel: int, robust: bool, device: torch.device
) -> ShardResult:
    """The round's merged :class:`ShardResult` from the summed flat bins and every process's side info."""
    names, sizes, blocks = layout(gathered)
    merged: StreamingSum = CollectAll() if robust else StreamingSum()
    offset = 0
    for name, size in [(None, numel)] + [(k, sizes[k]) for k in names]:
        bins = flat[offset : offset + NUM_BINS * size]
        offset += NUM_BINS * size
        if name not in blocks:
            continue
        _, _, dtype, shape = next(g["sums"][name] for g in gathered if name in g["sums"])
        acc = ExactSum(torch.empty(shape, dtype=dtype, device=device))
        acc.merge(bins, blocks[name], sum(g["sums"][name][1] for g in gathered if name in g["sums"]))
        if name is None:
            merged.delta_sum = acc
        else:
            merged.extras_sum[name] = acc
    for name in sorted({k for g in gathered for k in g["counts"]}):
        merged.counts_sum[name] = ExactScalar(sum(g["counts"].get(name, 0) for g in gathered))
    merged.weight_sum = ExactScalar(sum(g["weight"] for g in gathered))
    merged.num_clients = sum(g["num_clients"] for g in gathered)
    if isinstance(merged, CollectAll):
        pairs = sorted((p for g in gathered for p in g["updates"]), key=lambda p: p[0].client_id)
        merged.updates = [_update_to(u, device) for u, _ in pairs]
        merged.weights = [w for _, w in pairs]
    return ClientShard(
        merged,
        metrics=[m for g in gathered for m in g["metrics"]],
        clients=[c for g in gathered for c in g.get("clients", [])],
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
