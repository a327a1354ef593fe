"""Client data that lives on the worker's device once and is indexed, not copied.

A population's training examples are one tuple of tensors (``x, y, ...``); a client is a slice of one
index vector (:class:`Partition`, CSR layout). A population of 100,000 clients is therefore two index
tensors, and a client visit gathers only its own examples, batch by batch, in a seeded order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Partition:
    """Client ``i`` owns ``indices[offsets[i]:offsets[i + 1]]`` of the pooled training set."""

    indices: Tensor
    offsets: Tensor

    @classmethod
    def from_lists(cls, clients: Sequence[Sequence[int] | Tensor]) -> Partition:
        if any(isinstance(c, Tensor) for c in clients):
            parts = [torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in clients]
            sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
            indices = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        else:  # arrays and lists: one numpy concatenation (100,000 clients in milliseconds, not seconds)
            arrays = [np.asarray(c, dtype=np.int64).reshape(-1) for c in clients]
            sizes = torch.tensor([len(a) for a in arrays], dtype=torch.long)
            indices = torch.from_numpy(np.concatenate(arrays)) if arrays else torch.zeros(0, dtype=torch.long)
        offsets = torch.zeros(len(sizes) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(sizes, 0)
        return cls(indices, offsets)

    @classmethod
    def grouped(cls, owner: Tensor, values: Tensor, num_clients: int) -> Partition:
        """Client ``c`` gets the ``values`` whose ``owner`` is ``c``, sorted ascending (one ``argsort``)."""
        values = values.long()
        if values.numel() == 0:
            return cls(values, torch.zeros(num_clients + 1, dtype=torch.long))
        order = torch.argsort(owner * (int(values.max()) + 1) + values)
        offsets = torch.zeros(num_clients + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(torch.bincount(owner, minlength=num_clients), 0)
        return cls(values[order], offsets)

    def owners(self) -> Tensor:
        """The client of each entry of ``indices``."""
        return torch.repeat_interleave(torch.arange(self.num_clients), self.sizes())

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def client(self, i: int) -> Tensor:
        bounds = self._bounds
        return self.indices[bounds[i] : bounds[i + 1]]

    @cached_property
    def _bounds(self) -> list[int]:
        """``offsets`` as Python ints: slicing with them skips two tensor reads per client visit."""
        return self.offsets.tolist()

    def __len__(self) -> int:
        return self.num_clients


@dataclass(frozen=True)
class ClientData:
    """The examples ``indices`` of the shared tensors ``tensors`` (one client's train or val split)."""

    tensors: tuple[Tensor, ...]
    indices: Tensor

    def __len__(self) -> int:
        return int(self.indices.numel())

    def batches(
        self, batch_size: int, generator: torch.Generator | None = None, drop_last: bool = False
    ) -> Iterator[tuple[Tensor, ...]]:
        """Batches (tuples like a ``TensorDataset`` DataLoader's), shuffled by ``generator`` if given.

        The client's examples are gathered once, when this is called (the generator is consumed then, not
        at the first ``next``); batches are slices of that gather (a client with one batch gets the gather).
        """
        n = len(self)
        idx = self.order(generator)
        local = tuple(t.index_select(0, idx) for t in self.tensors)
        stop = n - n % batch_size if drop_last else n
        if 0 < n <= batch_size and stop == n:
            return iter((local,))
        return (tuple(t[start : start + batch_size] for t in local) for start in range(0, stop, batch_size))

    def order(self, generator: torch.Generator | None = None) -> Tensor:
        """The client's example indices in the order :meth:`batches` visits them.

        ``indices`` permuted by ``torch.randperm(len(self), generator=generator)``, or unchanged without a
        generator. Executors that build batches themselves (the vectorised one) use this to keep exactly
        the sequential executor's batch order.
        """
        if generator is None:
            return self.indices
        perm = torch.randperm(len(self), generator=generator)
        if self.indices.device.type != "cpu":
            perm = perm.to(self.indices.device)
        return self.indices.index_select(0, perm)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)
