"""The cryptographic primitives of SecAgg+, all from the ``cryptography`` package (OpenSSL).

Nothing here is hand-written crypto: X25519 key agreement, HKDF-SHA256, AES-256-CTR as the PRG that
expands a 256-bit seed into a mask vector, and AES-256-GCM (authenticated encryption) for the Shamir
shares that travel through the server. ``cryptography`` is imported lazily so that ``import lightfed``
works without it; the first use raises an :class:`ImportError` that names ``pip install -e ".[secagg]"``.

Key sizes are never shrunk: every private key, shared secret, self-mask seed and PRG key is 32 bytes.
"""

from __future__ import annotations

import functools
import hashlib
import os
import struct
from types import SimpleNamespace
from typing import Literal

import numpy as np

from lightfed.seeding import derive_seed

KEY_BYTES = 32  #: X25519 keys, shared secrets, seeds and AES-256 keys.
PUBLIC_KEY_BYTES = 32
AEAD_TAG_BYTES = 16
AEAD_NONCE_BYTES = 12

KeySource = Literal["seeded", "os"]


@functools.cache
def _lib() -> SimpleNamespace:
    """The ``cryptography`` objects SecAgg+ needs (imported on first use)."""
    try:
        from cryptography.hazmat.primitives import hashes
        from cryptography.hazmat.primitives.asymmetric.x25519 import X25519PrivateKey, X25519PublicKey
        from cryptography.hazmat.primitives.ciphers import Cipher, algorithms, modes
        from cryptography.hazmat.primitives.ciphers.aead import AESGCM
        from cryptography.hazmat.primitives.kdf.hkdf import HKDF
    except ImportError as err:  # pragma: no cover - CI installs the extra
        raise ImportError(
            "secure aggregation (SecAggPlus) needs the `cryptography` package: pip install -e \".[secagg]\" (in a checkout of lightfed)"
        ) from err
    return SimpleNamespace(
        hashes=hashes, X25519PrivateKey=X25519PrivateKey, X25519PublicKey=X25519PublicKey, Cipher=Cipher,
        algorithms=algorithms, modes=modes, AESGCM=AESGCM, HKDF=HKDF,
    )


def require_cryptography() -> None:
    """Raise the :class:`ImportError` naming ``pip install -e ".[secagg]"`` if ``cryptography`` is missing."""
    _lib()


def hkdf(secret: bytes, info: bytes, length: int = KEY_BYTES) -> bytes:
    """HKDF-SHA256 (RFC 5869) of ``secret`` with context ``info`` (the salt is the protocol label)."""
    lib = _lib()
    return lib.HKDF(algorithm=lib.hashes.SHA256(), length=length, salt=b"lightfed/secagg+/v1", info=info).derive(secret)


class KeyMaterial:
    """Where the clients' secret randomness (private keys, self-mask seeds, Shamir coefficients) comes from.

    ``"os"`` draws from :func:`os.urandom` (what a deployment does). ``"seeded"`` makes the simulation's
    whole server view reproducible: ``derive_seed(seed, "secagg", round, client, purpose, counter)``
    (:mod:`lightfed.seeding`) is expanded by HKDF-SHA256 into 32-byte blocks. The keys keep their full
    256-bit size and go through the same X25519 / HKDF / AES code paths; their *entropy* is then that of
    the run seed, which is right for a reproducible simulation and wrong for a deployment. The unmasked
    sum does not depend on the keys at all (masks cancel exactly), so both sources train identically.
    """

    def __init__(self, source: KeySource, seed: int, round_idx: int, client_id: int) -> None:
        if source not in ("seeded", "os"):
            raise ValueError(f"secure_aggregation.key_source must be 'seeded' or 'os', got {source!r}.")
        self.source = source
        self._keys = (seed, round_idx, client_id)

    def bytes(self, purpose: str, length: int = KEY_BYTES, counter: int = 0) -> bytes:
        """``length`` secret bytes for ``purpose`` (distinct purposes/counters give independent bytes)."""
        if self.source == "os":
            return os.urandom(length)
        seed, round_idx, client_id = self._keys
        ikm = struct.pack("<Q", derive_seed(seed, "secagg", round_idx, client_id, purpose, counter))
        return hkdf(ikm, f"simulation-key|{purpose}|{counter}".encode(), length)


class KeyPair:
    """An X25519 key pair (RFC 7748); the private key is 32 raw bytes so it can be secret-shared."""

    def __init__(self, private: bytes) -> None:
        if len(private) != KEY_BYTES:
            raise ValueError(f"an X25519 private key is {KEY_BYTES} bytes, got {len(private)}.")
        lib = _lib()
        self._sk = lib.X25519PrivateKey.from_private_bytes(private)
        self.private = private
        self.public = self._sk.public_key().public_bytes_raw()

    def agree(self, peer_public: bytes) -> bytes:
        """The 32-byte X25519 shared secret with ``peer_public``."""
        return self._sk.exchange(_lib().X25519PublicKey.from_public_bytes(peer_public))


def agree(private: bytes, peer_public: bytes) -> bytes:
    """X25519(``private``, ``peer_public``): the 32-byte Diffie-Hellman shared secret."""
    lib = _lib()
    return lib.X25519PrivateKey.from_private_bytes(private).exchange(lib.X25519PublicKey.from_public_bytes(peer_public))


def pair_info(label: str, round_idx: int, u: int, v: int) -> bytes:
    """HKDF context binding a derived key to its purpose, the round and the unordered pair ``{u, v}``."""
    a, b = (u, v) if u < v else (v, u)
    return f"{label}|round={round_idx}|{a}|{b}".encode()


# ---------------------------------------------------------------------- PRG
_ZEROS: dict[int, bytes] = {}


def prg_words(key: bytes, length: int, dtype: np.dtype) -> np.ndarray:
    """Expand a 256-bit ``key`` into ``length`` uniform words of ``dtype`` (uint32/uint64) with AES-256-CTR.

    The keystream of AES-CTR under a uniformly random key is computationally indistinguishable from
    uniform bytes, so every word is uniform over ``[0, 2**(8 * itemsize))`` and its low ``b`` bits are
    uniform over ``Z_(2**b)``. A key is only ever used for one vector, so the all-zero counter block is safe.
    """
    if len(key) != KEY_BYTES:
        raise ValueError(f"the PRG key must be {KEY_BYTES} bytes, got {len(key)}.")
    lib = _lib()
    nbytes = length * np.dtype(dtype).itemsize
    zeros = _ZEROS.get(nbytes)
    if zeros is None:
        _ZEROS.clear()  # keep one buffer: the vector length is fixed within a run
        zeros = _ZEROS[nbytes] = bytes(nbytes)
    enc = lib.Cipher(lib.algorithms.AES(key), lib.modes.CTR(bytes(16))).encryptor()
    stream = enc.update(zeros)
    enc.finalize()
    return np.frombuffer(stream, dtype=dtype)


# ---------------------------------------------------------------------- authenticated encryption
def aead_encrypt(key: bytes, sender: int, plaintext: bytes, associated: bytes) -> bytes:
    """AES-256-GCM of ``plaintext`` under ``key``; the nonce is the sender's id (one message per sender and key)."""
    nonce = struct.pack("<Q", sender) + b"\x00" * (AEAD_NONCE_BYTES - 8)
    return _lib().AESGCM(key).encrypt(nonce, plaintext, associated)


def aead_decrypt(key: bytes, sender: int, ciphertext: bytes, associated: bytes) -> bytes:
    """Inverse of :func:`aead_encrypt`; raises ``cryptography.exceptions.InvalidTag`` if anything was altered."""
    nonce = struct.pack("<Q", sender) + b"\x00" * (AEAD_NONCE_BYTES - 8)
    return _lib().AESGCM(key).decrypt(nonce, ciphertext, associated)


def digest(array: np.ndarray) -> str:
    """SHA-256 of an array's bytes (what the server view keeps when it does not keep whole vectors)."""
    return hashlib.sha256(np.ascontiguousarray(array).tobytes()).hexdigest()
