"""LoRA adapters inside the flat payload: where each layer's A, B and base weight lie, and client rank tiers.

A LoRA layer (Hu et al., ICLR 2022) computes ``W x + s B A x`` with ``A`` (``r x in``), ``B``
(``out x r``) and the scaling ``s = alpha / r``. ``peft`` names the factors
``<layer>.lora_A.<adapter>.weight`` and ``<layer>.lora_B.<adapter>.weight`` and the frozen weight
``<layer>.base_layer.weight``. :class:`LoRALayout` reads those names off a
:class:`~lightfed.params.ParamSpec` and gives, for every adapted layer, the slices of the flat payload
that hold each factor (absent when the factor is not part of the payload: FFA-LoRA freezes ``A``), so a
strategy can treat them as matrices: multiply them, stack them, mask ranks, keep them personal.

Convolutions are covered too: peft's conv ``A`` is ``(r, in, kh, kw)`` and ``B`` ``(out, r, 1, 1)``; both are
read as matrices ``(r, in*kh*kw)`` and ``(out, r)``, whose product reshapes to the base weight.

Heterogeneous ranks follow HetLoRA (Cho et al., "Heterogeneous LoRA for Federated Fine-tuning of
On-Device Foundation Models", EMNLP 2024): every client holds the global adapter of the largest rank
``R`` and a client of tier ``r <= R`` uses its first ``r`` rows of ``A`` and first ``r`` columns of ``B``.
:class:`RankTiers` assigns the tier of each client, from a seeded draw or from a table.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from lightfed.params import ParamSpec
from lightfed.seeding import make_generator

__all__ = ["LoRALayer", "LoRALayout", "RankTiers"]

_FACTOR = re.compile(r"^(?P<layer>.+)\.lora_(?P<factor>[AB])\.(?P<adapter>[^.]+)\.weight$")


@dataclass(frozen=True)
class LoRALayer:
    """One adapted layer and where its tensors lie in the flat payload.

    Attributes:
        layer: The layer's module name (``encoder.layer.0.attention.self.query``, ``head.1``).
        adapter: peft's adapter name (``default``).
        rank: ``R``, the adapter's (largest) rank.
        out_features: Rows of the base weight.
        a: Slice of ``A`` (``R x in``, flattened row-major) in the payload; ``None`` if ``A`` is frozen.
        b: Slice of ``B`` (``out x R``) in the payload; ``None`` if ``B`` is frozen.
        base: Slice of the base weight in the payload; ``None`` (the usual case) if it is frozen.
        a_shape, b_shape, base_shape: The tensors' shapes (``a_shape`` is known only if ``A`` travels,
            ``base_shape`` only if the base weight does).
    """

    layer: str
    adapter: str
    rank: int
    out_features: int
    a: slice | None
    b: slice | None
    base: slice | None
    a_shape: tuple[int, ...] | None
    b_shape: tuple[int, ...] | None
    base_shape: tuple[int, ...] | None

    @property
    def a_name(self) -> str:
        return f"{self.layer}.lora_A.{self.adapter}.weight"

    @property
    def b_name(self) -> str:
        return f"{self.layer}.lora_B.{self.adapter}.weight"

    @property
    def base_name(self) -> str:
        return f"{self.layer}.base_layer.weight"

    @property
    def in_features(self) -> int | None:
        """Columns of ``A`` (``in * kh * kw`` for a convolution); ``None`` if neither ``A`` nor the base travels."""
        shape = self.a_shape or self.base_shape
        return None if shape is None else math.prod(shape[1:])

    def a_matrix(self, flat: Tensor) -> Tensor:
        """``A`` of the payload ``flat`` as an ``(R, in)`` view."""
        assert self.a is not None, f"{self.layer}: A is not part of the payload"
        return flat[self.a].view(self.rank, -1)

    def b_matrix(self, flat: Tensor) -> Tensor:
        """``B`` of the payload ``flat`` as an ``(out, R)`` view."""
        assert self.b is not None, f"{self.layer}: B is not part of the payload"
        return flat[self.b].view(self.out_features, self.rank)


@dataclass(frozen=True)
class LoRALayout:
    """The LoRA layers of a payload (see the module docstring); empty for a model without adapters.

    Attributes:
        layers: The adapted layers, in payload order.
        numel: Length of the flat payload.
    """

    layers: tuple[LoRALayer, ...]
    numel: int

    @classmethod
    def from_spec(cls, spec: ParamSpec) -> LoRALayout:
        """Pair every ``lora_A`` / ``lora_B`` of ``spec`` by layer and adapter; find their base weights.

        Raises:
            ValueError: if ``A`` and ``B`` of a layer disagree on the rank.
        """
        offsets: dict[str, tuple[slice, tuple[int, ...]]] = {}
        start = 0
        for name, shape, n in zip(spec.names, spec.shapes, spec.numels):
            offsets[name] = (slice(start, start + n), tuple(shape))
            start += n
        found: dict[tuple[str, str], dict[str, str]] = {}
        for name in spec.names:
            m = _FACTOR.match(name)
            if m:
                found.setdefault((m["layer"], m["adapter"]), {})[m["factor"]] = name
        layers = []
        for (layer, adapter), factors in found.items():
            a = offsets.get(factors.get("A", ""))
            b = offsets.get(factors.get("B", ""))
            base = offsets.get(f"{layer}.base_layer.weight")
            rank_a = a[1][0] if a else None
            rank_b = b[1][1] if b else None
            if rank_a is not None and rank_b is not None and rank_a != rank_b:
                raise ValueError(f"LoRA layer {layer!r}: A has rank {rank_a} but B has rank {rank_b}.")
            rank = rank_a if rank_a is not None else rank_b
            out = b[1][0] if b else (base[1][0] if base else 0)
            layers.append(LoRALayer(
                layer, adapter, int(rank), int(out),
                a[0] if a else None, b[0] if b else None, base[0] if base else None,
                a[1] if a else None, b[1] if b else None, base[1] if base else None,
            ))
        layers.sort(key=lambda lay: (lay.a or lay.b).start)  # type: ignore[union-attr]
        return cls(tuple(layers), spec.numel)

    def __bool__(self) -> bool:
        return bool(self.layers)

    @property
    def max_rank(self) -> int:
        return max((lay.rank for lay in self.layers), default=0)

    def mask(self, factor: str, device: torch.device | None = None) -> Tensor:
        """Boolean vector over the payload: ``True`` on every layer's ``factor`` (``"a"``, ``"b"``, ``"base"``)."""
        out = torch.zeros(self.numel, dtype=torch.bool, device=device)
        for lay in self.layers:
            where = getattr(lay, factor)
            if where is not None:
                out[where] = True
        return out

    def beyond_rank(self, rank: int, device: torch.device | None = None) -> Tensor:
        """Boolean vector: ``True`` on the rows ``>= rank`` of every ``A`` and columns ``>= rank`` of every ``B``.

        The coordinates a client of tier ``rank`` does not use (HetLoRA's truncation of the largest adapter).
        """
        out = torch.zeros(self.numel, dtype=torch.bool, device=device)
        for lay in self.layers:
            if rank >= lay.rank:
                continue
            if lay.a is not None:
                out[lay.a].view(lay.rank, -1)[rank:] = True
            if lay.b is not None:
                out[lay.b].view(lay.out_features, lay.rank)[:, rank:] = True
        return out

    def adapter_numel(self, rank: int | None = None) -> int:
        """Numbers of the adapters in the payload at tier ``rank`` (``None``: the full rank ``R``)."""
        total = 0
        for lay in self.layers:
            r = lay.rank if rank is None else min(rank, lay.rank)
            if lay.a is not None:
                total += r * (lay.a.stop - lay.a.start) // lay.rank
            if lay.b is not None:
                total += r * lay.out_features
        return total


class RankTiers:
    """The LoRA rank (tier) of each client, to simulate devices of different capacity.

    A client's tier comes from ``table`` when it lists the client, else from a draw over ``ranks`` with
    probabilities ``weights``, seeded by ``(seed, client id)`` only: the same client has the same tier in
    every round, on every process and after a resume.

    Args:
        ranks: The tiers (each ``>= 1``).
        weights: Relative frequency of each tier (default: equal).
        seed: Seed of the draw.
        table: ``{client id: rank}`` for clients whose tier is known (read from a data column with
            :meth:`from_csv`).

    Raises:
        ValueError: for an empty or non-positive ``ranks``, or ``weights`` of the wrong length or sign.
    """

    def __init__(
        self, ranks: Sequence[int], weights: Sequence[float] | None = None, seed: int = 0,
        table: dict[int, int] | None = None,
    ) -> None:
        ranks = [int(r) for r in ranks]
        if not ranks or any(r < 1 for r in ranks):
            raise ValueError(f"strategy.init_args.ranks must be a non-empty list of ranks >= 1, got {ranks}.")
        if weights is not None and (len(weights) != len(ranks) or any(w < 0 for w in weights) or sum(weights) <= 0):
            raise ValueError(
                f"strategy.init_args.rank_weights must give one non-negative weight per rank {ranks} (not all 0), "
                f"got {list(weights)}."
            )
        self.ranks = ranks
        self.weights = torch.tensor(list(weights) if weights is not None else [1.0] * len(ranks), dtype=torch.float64)
        self.seed = int(seed)
        self.table = dict(table or {})
        bad = {c: r for c, r in self.table.items() if r < 1}
        if bad:
            raise ValueError(f"the rank table gives ranks < 1 to clients {sorted(bad)[:5]}: every rank must be >= 1.")

    @classmethod
    def from_csv(cls, path: str | Path, column: str = "rank", **kwargs: object) -> RankTiers:
        """Tiers from a CSV file with columns ``client_id`` and ``column``; unlisted clients are drawn.

        Raises:
            FileNotFoundError, ValueError: a missing file, or a file without the two columns.
        """
        path = Path(path).expanduser()
        if not path.is_file():
            raise FileNotFoundError(f"strategy.init_args.rank_file={str(path)!r} does not exist (a CSV client_id,{column}).")
        with path.open(newline="") as f:
            reader = csv.DictReader(f)
            if not reader.fieldnames or "client_id" not in reader.fieldnames or column not in reader.fieldnames:
                raise ValueError(
                    f"strategy.init_args.rank_file {str(path)!r} needs the columns 'client_id' and {column!r}; "
                    f"it has {reader.fieldnames}."
                )
            table = {int(row["client_id"]): int(row[column]) for row in reader}
        ranks = kwargs.pop("ranks", None) or sorted(set(table.values()))
        return cls(ranks, table=table, **kwargs)  # type: ignore[arg-type]

    def rank(self, client_id: int) -> int:
        """The tier of ``client_id``."""
        if client_id in self.table:
            return self.table[client_id]
        if len(self.ranks) == 1:
            return self.ranks[0]
        gen = make_generator(self.seed, "lora_rank", client_id)
        return self.ranks[int(torch.multinomial(self.weights, 1, generator=gen))]

    @property
    def max_rank(self) -> int:
        return max([*self.ranks, *self.table.values()])

    def is_mixed(self) -> bool:
        return len(set(self.ranks) | set(self.table.values())) > 1
