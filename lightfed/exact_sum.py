"""Sums whose bits do not depend on the order of the terms: how a round is sharded cannot change the model.

A float32 sum rounds after every addition, so the same updates summed in another order (one process, or
two processes that each sum their shard and then all-reduce) differ in the last bits, and a chaotic
training run amplifies that to a different model (issue 24, item 7: 1.2e-2 after two rounds of a CNN).
Here every term is cut into integers on a grid that does not depend on the order, and integers add
exactly, so the sum is a function of the *multiset* of terms: the same bits for every order and every
sharding, and an integer all-reduce of the pieces gives them again.

**Tensors** (:class:`ExactSum`): the binned (indexed) summation of ReproBLAS (Demmel and Nguyen, "Parallel
reproducible summation", IEEE TC 2015; "Fast reproducible floating-point summation", ARITH 2013), with
integer bins. A term ``t = w x`` is formed in float64 and cut at fixed bit positions into ``K = 3``
signed 32-bit digits,

    t = sum_{k<K} d_k 2^(p_k) + r,   p_k = 32 (b - 1 - k),   |d_k| < 2^32,   |r| < 2^(p_(K-1)),

where the *block* ``b`` is the smallest integer with ``max |t| < 2^(32 b)`` over the tensor (the digits
are the base-2^32 digits of ``|t|`` with its sign; ``r`` is dropped). Each bin ``k`` keeps
``S_k = sum d_k`` in int64: exact, order-free. The block only grows while terms arrive; when it does,
the bins shift down by whole bins and the lowest fall off, which is exactly what cutting the earlier
terms at the new block would have dropped, so the state after all terms depends on the terms alone
(the final block is their maximum). Processes align to the largest block of any of them (an
order-free maximum), then all-reduce the int64 bins (:func:`lightfed.distributed.merge_round`).

Precision: a term loses less than ``2^(p_(K-1)) <= 2^-64 max |t|``; the bins are turned into a float in
float64 with every part of one sign (no cancellation), then rounded to the tensor's dtype. So each
coordinate of a float32 sum is within one float32 ulp of the exact sum, up to ``n 2^-64 max|t|`` (``n``
terms): a float32 running sum is off by up to ``(n - 1) 2^-24 sum |t|``. Overflow: ``|S_k| < n 2^32``
fits int64 for ``n < 2^31`` terms, which :meth:`ExactSum.add` enforces. Terms below ``2^-992`` are
dropped (the block is clamped to float64's range).

**Scalars** (:class:`ExactScalar`): weights, counts and clip bits. Every finite float64 is an integer
multiple of ``2^-1074``, so the sum is kept as a Python integer times ``2^-1074``: exact, and converted
back correctly rounded.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

#: Bits of one bin.
BIN_BITS = 32
#: Bins kept: 96 bits, at least 64 below the largest term's leading bit.
NUM_BINS = 3
#: Blocks that keep every scale ``2^(-p)`` of a float64 finite: ``|t| < 2^(32 b)``, ``b`` in this range.
MIN_BLOCK, MAX_BLOCK = -28, 32
#: ``|S_k| < terms * 2^32`` stays inside int64.
MAX_TERMS = 2**31 - 1
_SCALAR_SHIFT = 1074  # every finite float64 is an integer times 2**-1074


def block_of(magnitude: float) -> int:
    """The smallest block ``b`` with ``magnitude < 2^(32 b)`` (clamped to float64's range)."""
    if magnitude == 0.0:
        return MIN_BLOCK
    if not math.isfinite(magnitude):
        raise ValueError(f"an exact sum needs finite terms, got a term of magnitude {magnitude}.")
    exponent = math.frexp(magnitude)[1]  # magnitude < 2**exponent
    return min(max(-(-exponent // BIN_BITS), MIN_BLOCK), MAX_BLOCK)


class ExactSum:
    """``sum_k w_k x_k`` over tensors of one shape, with the same bits for every order of the terms.

    Args:
        like: A tensor of the terms' shape, dtype and device (the sum is returned like it).

    Attributes:
        bins: ``[NUM_BINS, numel]`` int64, bin 0 the most significant.
        block: The bins' position: bin ``k`` counts units of ``2^(32 (block - 1 - k))``.
        terms: Terms added (for the int64 overflow bound).
    """

    def __init__(self, like: Tensor) -> None:
        self.shape = like.shape
        self.dtype = like.dtype
        self.device = like.device
        work = torch.device("cpu") if like.device.type == "mps" else like.device  # MPS has no float64
        self.bins = torch.zeros(NUM_BINS, like.numel(), dtype=torch.int64, device=work)
        self.block = MIN_BLOCK
        self.terms = 0

    def add(self, x: Tensor, weight: float = 1.0) -> None:
        """Add ``weight * x`` (formed in float64, as every process forms it).

        Raises:
            ValueError: ``x`` has another shape, or the sum would exceed :data:`MAX_TERMS` terms.
        """
        if x.shape != self.shape:
            raise ValueError(f"exact sum of shape {tuple(self.shape)} cannot add a term of shape {tuple(x.shape)}.")
        if self.terms >= MAX_TERMS:
            raise ValueError(f"an exact sum holds at most {MAX_TERMS} terms (its int64 bins could overflow).")
        self.terms += 1
        t = x.detach().reshape(-1).to(self.bins.device, torch.float64, copy=True)
        if weight != 1.0:
            t.mul_(float(weight))
        magnitude = float(t.abs().max()) if t.numel() else 0.0
        if magnitude == 0.0:
            return
        self.align(max(self.block, block_of(magnitude)))
        for k in range(NUM_BINS):
            position = BIN_BITS * (self.block - 1 - k)
            digit = (t * 2.0**-position).trunc_()  # exact: a power-of-two scale and a truncation
            self.bins[k].add_(digit.to(torch.int64))
            if k < NUM_BINS - 1:
                t.sub_(digit, alpha=2.0**position)  # exact: clears the bits just moved into bin k

    def align(self, block: int) -> None:
        """Move the bins to ``block >= self.block``: shift down by whole bins, the lowest fall off."""
        if block < self.block:
            raise ValueError(f"cannot align an exact sum down from block {self.block} to {block}.")
        self.bins = _shifted(self.bins, block - self.block)
        self.block = block

    def merge(self, bins: Tensor, block: int, terms: int) -> None:
        """Add another exact sum of this shape, given by its ``bins`` at ``block`` (another process's)."""
        if self.terms + terms > MAX_TERMS:
            raise ValueError(f"an exact sum holds at most {MAX_TERMS} terms (its int64 bins could overflow).")
        top = max(self.block, block)
        self.align(top)
        self.bins += _shifted(bins.reshape(NUM_BINS, -1).to(self.bins.device), top - block)
        self.terms += terms

    def value(self) -> Tensor:
        """The sum as a tensor of the terms' dtype: within one ulp of the exact sum (see the module)."""
        bins = _carried(self.bins.clone())
        negative = bins[0] < 0  # after the carries the lower bins are in [0, 2^32): the top bin has the sign
        bins = _carried(torch.where(negative, -self.bins, self.bins))  # |sum|: every bin >= 0
        out = torch.zeros(bins.shape[1], dtype=torch.float64, device=bins.device)
        for k in reversed(range(NUM_BINS)):  # smallest first, all of one sign: no cancellation
            out.add_(bins[k].to(torch.float64), alpha=2.0 ** (BIN_BITS * (self.block - 1 - k)))
        out = torch.where(negative, -out, out)
        return out.to(self.device, self.dtype).reshape(self.shape)


def _shifted(bins: Tensor, shift: int) -> Tensor:
    """``bins`` moved ``shift >= 0`` bins down (towards less significant); the lowest fall off."""
    if shift == 0:
        return bins
    out = torch.zeros_like(bins)
    if shift < NUM_BINS:
        out[shift:] = bins[: NUM_BINS - shift]
    return out


def _carried(bins: Tensor) -> Tensor:
    """The same integer with every bin but the top in ``[0, 2^32)`` (the carries moved up), in place."""
    for k in range(NUM_BINS - 1, 0, -1):
        carry = bins[k] >> BIN_BITS  # arithmetic shift: floor division by 2^32
        bins[k] -= carry << BIN_BITS
        bins[k - 1] += carry
    return bins


class ExactScalar:
    """An exact sum of Python floats (weights, counts), the same for every order; ``value`` rounds once.

    Attributes:
        scaled: The sum times ``2^1074``, an integer (every finite float64 is an integer times ``2^-1074``).
    """

    def __init__(self, scaled: int = 0) -> None:
        self.scaled = scaled

    def add(self, x: float) -> None:
        """Add ``x`` exactly.

        Raises:
            ValueError: ``x`` is NaN or infinite.
        """
        x = float(x)
        if not math.isfinite(x):
            raise ValueError(f"an exact sum needs finite terms, got {x}.")
        numerator, denominator = x.as_integer_ratio()  # denominator = 2**j, j <= 1074
        self.scaled += numerator << (_SCALAR_SHIFT + 1 - denominator.bit_length())

    def value(self) -> float:
        """The sum, correctly rounded to float64 (Python's integer division rounds correctly)."""
        return self.scaled / (1 << _SCALAR_SHIFT)


__all__ = ["ExactScalar", "ExactSum", "block_of"]
