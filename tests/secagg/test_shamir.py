"""Shamir t-of-k sharing over GF(2**256 + 297): hand-computed shares, any-t reconstruction, t-1 secrecy."""

from __future__ import annotations

import itertools
import os

import pytest
import sympy

from lightfed.secagg import shamir


def fixed_coefficients(*values: int):
    """A ``random_bytes`` that returns the given coefficients (as 48-byte big-endian integers)."""
    return lambda n, i: values[i - 1].to_bytes(n, "big")


def test_prime_field_is_the_smallest_prime_above_2_256():
    assert shamir.PRIME == 2**256 + 297
    assert sympy.isprime(shamir.PRIME)
    assert all(not sympy.isprime(2**256 + d) for d in range(1, 297, 2))


def test_shares_match_hand_computed_polynomial():
    # f(x) = 5 + 7x + 3x^2  ->  f(1) = 15, f(2) = 31, f(3) = 53, f(4) = 81
    secret = (5).to_bytes(32, "big")
    shares = shamir.split(secret, [1, 2, 3, 4], 3, fixed_coefficients(7, 3))
    assert shares == [15, 31, 53, 81]
    assert shamir.reconstruct([(2, 31), (4, 81), (1, 15)], 3) == secret


def test_coefficients_are_reduced_modulo_p():
    secret = (1).to_bytes(32, "big")
    a = shamir.PRIME + 2  # reduces to 2: f(x) = 1 + 2x
    assert shamir.split(secret, [1, 5], 2, fixed_coefficients(a)) == [3, 11]


@pytest.mark.parametrize(("k", "t"), [(5, 3), (8, 5), (6, 6)])
def test_any_t_shares_reconstruct(k, t):
    secret = os.urandom(32)
    xs = [3 * i + 2 for i in range(k)]
    ys = shamir.split(secret, xs, t, lambda n, i: os.urandom(n))
    for subset in itertools.combinations(zip(xs, ys), t):
        assert shamir.reconstruct(list(subset), t) == secret


def test_fewer_than_t_shares_are_refused_and_reveal_nothing():
    secret = (123456789).to_bytes(32, "big")
    ys = shamir.split(secret, [1, 2, 3], 3, fixed_coefficients(11, 13))
    with pytest.raises(ValueError, match="needs 3 shares, got 2"):
        shamir.reconstruct([(1, ys[0]), (2, ys[1])], 3)
    # perfect secrecy: for ANY candidate secret s' there is a degree-2 polynomial through the two shares
    # (x=1 and x=2) with f(0) = s'; here for s' = 0: f(x) = a x + b x^2 solves a + b = y1, 2a + 4b = y2.
    p = shamir.PRIME
    y1, y2 = ys[0], ys[1]
    b = (y2 - 2 * y1) * pow(2, -1, p) % p
    a = (y1 - b) % p
    assert (a + b) % p == y1 and (2 * a + 4 * b) % p == y2


def test_share_encoding_round_trip_and_validation():
    y = shamir.PRIME - 1
    assert shamir.decode_share(shamir.encode_share(y)) == y
    assert len(shamir.encode_share(y)) == shamir.SHARE_BYTES == 33
    with pytest.raises(ValueError, match="malformed"):
        shamir.decode_share(shamir.PRIME.to_bytes(33, "big"))
    with pytest.raises(ValueError, match="distinct"):
        shamir.split(bytes(32), [1, 1], 2, lambda n, i: bytes(n))
    with pytest.raises(ValueError, match="32 bytes"):
        shamir.split(bytes(16), [1, 2], 2, lambda n, i: bytes(n))
