"""The messages of one SecAgg+ round, each with its size on the wire.

Client ids travel as 4-byte integers, public keys as 32 bytes, Shamir shares as 33 bytes, masked
vectors bit-packed at ``modulus_bits`` per coordinate. Signatures (needed only against an actively
malicious server, Bonawitz et al. 2017 section 6.4) are not modelled: the threat model is an
honest-but-curious server.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from lightfed.secagg.crypto import PUBLIC_KEY_BYTES
from lightfed.secagg.shamir import SHARE_BYTES

ID_BYTES = 4


@dataclass(frozen=True)
class AdvertiseKeys:
    """Stage 0, client -> server: the public keys ``c_pk`` (share encryption) and ``s_pk`` (mask agreement)."""

    sender: int
    c_pk: bytes
    s_pk: bytes

    @property
    def nbytes(self) -> int:
        return ID_BYTES + 2 * PUBLIC_KEY_BYTES


@dataclass(frozen=True)
class NeighbourKeys:
    """End of stage 0, server -> client: its neighbours' advertised keys and the Shamir threshold."""

    keys: dict[int, AdvertiseKeys]
    threshold: int

    @property
    def nbytes(self) -> int:
        return 4 + sum(m.nbytes for m in self.keys.values())


@dataclass(frozen=True)
class EncryptedShare:
    """AES-GCM ciphertext of ``sender || receiver || share(s_sk) || share(b)`` for ``receiver``."""

    sender: int
    receiver: int
    ciphertext: bytes

    @property
    def nbytes(self) -> int:
        return 2 * ID_BYTES + len(self.ciphertext)


@dataclass(frozen=True)
class ShareKeys:
    """Stage 1, client -> server: one encrypted share pair per neighbour (forwarded by the server)."""

    sender: int
    shares: tuple[EncryptedShare, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES + sum(s.nbytes for s in self.shares)


@dataclass(frozen=True)
class MaskedInput:
    """Stage 2, client -> server: ``y_u = x_u + PRG(b_u) + sum_v +-PRG(s_uv) mod 2**b``."""

    sender: int
    vector: np.ndarray
    modulus_bits: int

    @property
    def nbytes(self) -> int:
        return ID_BYTES + math.ceil(self.vector.size * self.modulus_bits / 8)


@dataclass(frozen=True)
class UnmaskRequest:
    """Stage 3, server -> client: which neighbours survived (send ``b`` shares) and which dropped (send ``s_sk`` shares)."""

    survivors: tuple[int, ...]
    dropped: tuple[int, ...]

    @property
    def nbytes(self) -> int:
        return ID_BYTES * (2 + len(self.survivors) + len(self.dropped))


@dataclass(frozen=True)
class UnmaskResponse:
    """Stage 3, client -> server: Shamir shares ``(x, y)`` keyed by the client they belong to.

    An honest client never puts the same owner in both maps (that would reveal the owner's input).
    """

    sender: int
    self_seed_shares: dict[int, tuple[int, int]] = field(default_factory=dict)
    mask_key_shares: dict[int, tuple[int, int]] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        n = len(self.self_seed_shares) + len(self.mask_key_shares)
        return ID_BYTES + n * (ID_BYTES + SHARE_BYTES)
