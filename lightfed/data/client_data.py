"""Client data that lives on the worker's device once and is indexed, not copied.

A population's training examples are one tuple of tensors (``x, y, ...``); a client is a slice of one
index vector (:class:`Partition`, CSR layout). A population of 100,000 clients is therefore two index
tensors, and a client visit gathers only its own examples, batch by batch, in a seeded order.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import Tensor


@dataclass(frozen=True)
class Partition:
    """Client ``i`` owns ``indices[offsets[i]:offsets[i + 1]]`` of the pooled training set."""

    indices: Tensor
    offsets: Tensor

    @classmethod
    def from_lists(cls, clients: Sequence[Sequence[int] | Tensor]) -> Partition:
        parts = [torch.as_tensor(c, dtype=torch.long).reshape(-1) for c in clients]
        sizes = torch.tensor([len(p) for p in parts], dtype=torch.long)
        offsets = torch.zeros(len(parts) + 1, dtype=torch.long)
        offsets[1:] = torch.cumsum(sizes, 0)
        indices = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
        return cls(indices, offsets)

    @property
    def num_clients(self) -> int:
        return len(self.offsets) - 1

    def sizes(self) -> Tensor:
        return self.offsets[1:] - self.offsets[:-1]

    def client(self, i: int) -> Tensor:
        return self.indices[self.offsets[i] : self.offsets[i + 1]]

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
        """Yield batches (tuples like a ``TensorDataset`` DataLoader's), shuffled by ``generator`` if given.

        The client's examples are gathered once per call; batches are then slices of that gather.
        """
        n = len(self)
        idx = self.indices
        if generator is not None:
            perm = torch.randperm(n, generator=generator).to(idx.device)
            idx = idx[perm]
        local = tuple(t[idx] for t in self.tensors)
        stop = n - n % batch_size if drop_last else n
        for start in range(0, stop, batch_size):
            yield tuple(t[start : start + batch_size] for t in local)

    def num_batches(self, batch_size: int, drop_last: bool = False) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)
