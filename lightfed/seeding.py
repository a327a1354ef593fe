"""Randomness derived from ``(seed, *keys)``, never from global RNG state.

Every random choice of a run (which clients a round samples, the order of a client's batches, the dropout
masks of its local training, DP noise) draws from a generator seeded by a hash of the run seed and the
coordinates of that choice (round, client id, purpose). A run can therefore be resumed mid-way, sharded
over processes in any way, or re-run, and give the same numbers.
"""

from __future__ import annotations

import hashlib
import struct

import torch

_MASK_63 = (1 << 63) - 1


def derive_seed(seed: int, *keys: int | str) -> int:
    """A 63-bit seed determined by ``seed`` and ``keys`` (stable across processes and Python versions)."""
    h = hashlib.blake2b(digest_size=8)
    h.update(struct.pack("<q", int(seed)))
    for key in keys:
        data = key.encode() if isinstance(key, str) else struct.pack("<q", int(key))
        h.update(b"|" + data)
    return int.from_bytes(h.digest(), "little") & _MASK_63


def make_generator(seed: int, *keys: int | str, device: torch.device | str = "cpu") -> torch.Generator:
    """A ``torch.Generator`` seeded with :func:`derive_seed`."""
    gen = torch.Generator(device=device)
    gen.manual_seed(derive_seed(seed, *keys))
    return gen
