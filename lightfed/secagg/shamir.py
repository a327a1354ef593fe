"""Shamir t-of-k secret sharing (Shamir 1979) of 256-bit secrets over the prime field GF(2**256 + 297).

A secret ``s < 2**256`` is the constant term of a random polynomial ``f(x) = s + a_1 x + ... + a_(t-1)
x^(t-1)`` over GF(p); share ``i`` is ``(x_i, f(x_i))`` for distinct nonzero ``x_i``. Any ``t`` shares
determine ``f`` and hence ``s = f(0) = sum_i y_i prod_(j != i) x_j / (x_j - x_i)`` (Lagrange at zero);
any ``t - 1`` shares are independent of ``s`` (perfect secrecy), because for every candidate secret there
is exactly one polynomial of degree ``< t`` through them.

Why this is written here rather than imported: ``cryptography`` has no secret sharing; PyCryptodome's
``Crypto.Protocol.SecretSharing.Shamir`` works in GF(2**128) on 16-byte secrets only (a 32-byte X25519
key would have to be split in two independently shared halves, and it would add a second crypto
library); the small PyPI packages that exist are unmaintained or use ``random`` for the coefficients.
Shamir over a prime is a few lines of exact integer arithmetic (Python ints, ``pow(x, -1, p)`` for
inverses); the coefficients come from the caller's secret randomness (:class:`~lightfed.secagg.crypto.KeyMaterial`).

``p = 2**256 + 297`` is the smallest prime above ``2**256``, so every 32-byte secret (a self-mask seed, a
raw X25519 private key) is a field element without reduction. Shares serialise to 33 bytes.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

PRIME = 2**256 + 297
SECRET_BYTES = 32
SHARE_BYTES = 33  #: ceil(log2(PRIME) / 8)
_SAMPLE_BYTES = 48  #: 384 random bits reduced mod p: statistical distance from uniform < 2**-127


def split(secret: bytes, xs: Sequence[int], threshold: int, random_bytes: Callable[[int, int], bytes]) -> list[int]:
    """Shares ``f(x)`` for each ``x`` in ``xs`` of a random degree ``threshold - 1`` polynomial with ``f(0) = secret``.

    Args:
        secret: 32 bytes (big-endian integer ``< 2**256 < PRIME``).
        xs: Distinct nonzero evaluation points (the share holders' public ids plus one).
        threshold: ``t``: any ``t`` shares reconstruct, ``t - 1`` reveal nothing.
        random_bytes: ``random_bytes(n, counter)`` returns ``n`` secret random bytes, independent per counter.

    Returns:
        ``f(x)`` for each ``x`` (field elements).
    """
    if len(secret) != SECRET_BYTES:
        raise ValueError(f"Shamir secrets are {SECRET_BYTES} bytes, got {len(secret)}.")
    if not 1 <= threshold <= len(xs):
        raise ValueError(f"Shamir threshold must be in [1, {len(xs)}] for {len(xs)} shares, got {threshold}.")
    if len(set(xs)) != len(xs) or any(not 0 < x < PRIME for x in xs):
        raise ValueError(f"Shamir evaluation points must be distinct and in [1, p), got {list(xs)}.")
    coeffs = [int.from_bytes(secret, "big")]
    coeffs += [int.from_bytes(random_bytes(_SAMPLE_BYTES, i), "big") % PRIME for i in range(1, threshold)]
    return [_horner(coeffs, x) for x in xs]


def _horner(coeffs: list[int], x: int) -> int:
    acc = 0
    for c in reversed(coeffs):
        acc = (acc * x + c) % PRIME
    return acc


def reconstruct(shares: Sequence[tuple[int, int]], threshold: int) -> bytes:
    """The secret from at least ``threshold`` shares ``(x, f(x))`` (Lagrange interpolation at 0).

    Raises:
        ValueError: with fewer than ``threshold`` shares, repeated points, or a result that is not a
            32-byte secret (inconsistent shares).
    """
    if len(shares) < threshold:
        raise ValueError(f"Shamir reconstruction needs {threshold} shares, got {len(shares)}.")
    pts = list(shares)[:threshold]
    xs = [x for x, _ in pts]
    if len(set(xs)) != len(xs):
        raise ValueError(f"Shamir shares have repeated points {xs}.")
    secret = 0
    for i, (xi, yi) in enumerate(pts):
        num, den = 1, 1
        for j, xj in enumerate(xs):
            if j != i:
                num = num * xj % PRIME
                den = den * (xj - xi) % PRIME
        secret = (secret + yi * num * pow(den, -1, PRIME)) % PRIME
    if secret >= 2 ** (8 * SECRET_BYTES):
        raise ValueError("Shamir shares are inconsistent: the interpolated secret is not a 32-byte value.")
    return secret.to_bytes(SECRET_BYTES, "big")


def encode_share(y: int) -> bytes:
    """A field element as :data:`SHARE_BYTES` big-endian bytes."""
    return y.to_bytes(SHARE_BYTES, "big")


def decode_share(data: bytes) -> int:
    """Inverse of :func:`encode_share` (refuses values outside the field)."""
    y = int.from_bytes(data, "big")
    if len(data) != SHARE_BYTES or y >= PRIME:
        raise ValueError("malformed Shamir share.")
    return y
