"""Sums whose bits do not depend on the order of the terms: how a round is sharded cannot change the model.

A float32 sum rounds after every addition, so the same updates summed in another order (one process, or
two processes that each sum their shard and then all-reduce) differ in the last bits, and a chaotic
training run amplifies that to a different model (issue 24, item 7: 1.2e-2 after two rounds of a CNN).
Here every term is cut into integers on a grid that does not depend on the order, and integers add
exactly, so the sum is a function of the *multiset* of terms: the same bits for every order and every
sharding, and an integer all-reduce of the pieces gives them again.

**Tensors** (:class:`ExactSum`): the binned (indexed) summation of ReproBLAS (Demmel and Nguyen, "Fast
reproducible floating-point summation", ARITH 2013; "Parallel reproducible summation", IEEE TC 2015),
with integer bins. A term ``t = w x`` is formed in float64 and cut at fixed bit positions into ``K = 3``
integer digits by rounding to nearest,

    t = sum_{k<K} d_k 2^(p_k) + r,   p_k = 32 (b - 1 - k),
    d_k = round((t - sum_{j<k} d_j 2^(p_j)) / 2^(p_k)),

so ``|d_k| <= 2^32`` and ``|r| <= 2^(p_(K-1) - 1)`` (dropped). The *block* ``b`` is the smallest integer
with ``max |t| < 2^(32 b)`` over the tensor. Each bin ``k`` keeps ``S_k = sum d_k``: integers, so exact and
order-free (float64 holds them exactly below 2^53, hence at most ``2^21`` terms; the all-reduce sends
int64). The first ``j`` digits of a term always sum to ``t`` rounded to the grid ``2^(p_(j-1))``, whatever
the block, so when a larger term raises the block, shifting the bins down by whole bins (the lowest fall
off) leaves exactly what cutting the earlier terms at the new block would have left: the state after all
terms depends on the terms alone (the final block is their maximum). Processes align to the largest block
of any of them (an order-free maximum), then all-reduce the bins (:func:`lightfed.distributed.merge_round`).

Precision: a term loses at most ``2^(p_(K-1) - 1) <= 2^-65 max |t|``; the integer ``sum_k S_k 2^(p_k)`` is
turned into float64 with every part of one sign (no cancellation), then rounded to the tensor's dtype. So
each coordinate of a float32 sum is within one float32 ulp of the exact sum, up to ``n 2^-65 max|t|``
(``n`` terms); a float32 running sum is off by up to ``(n - 1) 2^-24 sum |t|``. Terms below ``2^-992`` are
dropped (the block is clamped to float64's range). Memory: the bins take 24 bytes per coordinate (6x a
float32 sum), the all-reduce sends as many.

**Scalars** (:class:`ExactScalar`): weights, counts and clip bits. Every finite float64 is an integer
multiple of ``2^-1074``, so the sum is kept as a Python integer times ``2^-1074``: exact, and converted
back correctly rounded.
"""

from __future__ import annotations

import math
from collections.abc import Iterator

import torch
from torch import Tensor

#: Bits of one bin.
BIN_BITS = 32
#: Bins kept: 96 bits, at least 64 below the largest term's leading bit.
NUM_BINS = 3
#: Blocks that keep every scale ``2^(-p)`` of a float64 finite: ``|t| < 2^(32 b)``, ``b`` in this range.
MIN_BLOCK, MAX_BLOCK = -28, 32
#: ``|S_k| <= terms * 2^32`` stays an exact float64 integer (< 2^53).
MAX_TERMS = 2**21 - 1
#: Coordinates processed at once (two float64 scratch buffers of this length: 1 MiB).
CHUNK = 2**16
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
        bins: ``[NUM_BINS, numel]`` float64 holding integers, bin 0 the most significant.
        block: The bins' position: bin ``k`` counts units of ``2^(32 (block - 1 - k))``.
        terms: Terms added (at most :data:`MAX_TERMS`).
    """

    def __init__(self, like: Tensor) -> None:
        self.shape = like.shape
        self.dtype = like.dtype
        self.device = like.device
        work = torch.device("cpu") if like.device.type == "mps" else like.device  # MPS has no float64
        self.bins = torch.zeros(NUM_BINS, like.numel(), dtype=torch.float64, device=work)
        self.block = MIN_BLOCK
        self.terms = 0
        self._buffers: tuple[Tensor, Tensor] | None = None
        self._rows: tuple[Tensor, tuple[Tensor, ...]] | None = None

    def add(self, x: Tensor, weight: float = 1.0) -> None:
        """Add ``weight * x`` (formed in float64, as every process forms it).

        Raises:
            ValueError: ``x`` has another shape or a non-finite value, or the sum would exceed
                :data:`MAX_TERMS` terms.
        """
        if x.shape != self.shape:
            raise ValueError(
                f"exact sum of shape {tuple(self.shape)} cannot add a term of shape {tuple(x.shape)}."
            )
        self._count(1)
        x = x.detach() if x.requires_grad else x
        x = x.reshape(-1) if x.dim() != 1 else x
        if x.numel() == 0:
            return
        weight = float(weight)
        low, high = torch.aminmax(x)  # NaN if any coordinate is NaN
        magnitude = abs(weight) * max(-low.item(), high.item())  # = max |fl(w x)|: rounding is monotone
        if not (math.isfinite(magnitude) and low.item() == low.item()):
            raise ValueError(
                f"an exact sum needs finite terms, got max |w x| = {magnitude} (weight {weight})."
            )
        if magnitude == 0.0:
            return
        self.align(max(self.block, block_of(magnitude)))
        units = [2.0 ** (BIN_BITS * (self.block - 1 - k)) for k in range(NUM_BINS)]
        for piece, rows, (t, digit) in self._chunks(x):  # chunks: the passes below stay in cache
            t.copy_(piece)
            if weight != 1.0:
                t.mul_(weight)
            for k, (row, unit) in enumerate(zip(rows, units)):
                torch.mul(t, 1.0 / unit, out=digit).round_()  # exact: a power-of-two scale, then an integer
                row.add_(digit)  # exact: integers below 2^53
                if k < NUM_BINS - 1:
                    t.sub_(digit, alpha=unit)  # exact: what is left after bin k, |t| <= unit / 2

    def _chunks(self, x: Tensor) -> Iterator[tuple[Tensor, tuple[Tensor, ...], tuple[Tensor, Tensor]]]:
        """``x`` in chunks of :data:`CHUNK`, each with its bins' rows and two float64 scratch buffers.

        The buffers (what is left of the term, its next digit) and the rows of a single-chunk sum are made
        once: a small model's update costs a few dozen tensor calls.
        """
        if self._buffers is None:
            n = min(CHUNK, self.bins.shape[1])
            self._buffers = (torch.empty(n, dtype=torch.float64, device=self.bins.device),
                             torch.empty(n, dtype=torch.float64, device=self.bins.device))
        if x.numel() <= CHUNK:
            if self._rows is None or self._rows[0] is not self.bins:
                self._rows = (self.bins, self.bins.unbind(0))
            yield x, self._rows[1], self._buffers
            return
        for piece, bins in zip(x.split(CHUNK), self.bins.split(CHUNK, dim=1)):
            n = piece.numel()
            buffers = self._buffers if n == CHUNK else (self._buffers[0][:n], self._buffers[1][:n])
            yield piece, bins.unbind(0), buffers

    def _count(self, terms: int) -> None:
        if self.terms + terms > MAX_TERMS:
            raise ValueError(
                f"an exact sum holds at most {MAX_TERMS} terms (its float64 bins hold integers below 2^53); "
                f"this one would hold {self.terms + terms}. Spread the cohort over more processes."
            )
        self.terms += terms

    def align(self, block: int) -> None:
        """Move the bins to ``block >= self.block``: shift down by whole bins, the lowest fall off."""
        if block < self.block:
            raise ValueError(f"cannot align an exact sum down from block {self.block} to {block}.")
        self.bins = _shifted(self.bins, block - self.block)
        self.block = block

    def packed(self, block: int) -> Tensor:
        """The bins at ``block >= self.block`` as one flat int64 tensor (for an all-reduce)."""
        self.align(block)
        return self.bins.to(torch.int64).reshape(-1)

    def merge(self, bins: Tensor, block: int, terms: int) -> None:
        """Add another exact sum of this shape: its ``bins`` (any integer or float dtype) at ``block``."""
        self._count(terms)
        top = max(self.block, block)
        self.align(top)
        self.bins += _shifted(bins.reshape(NUM_BINS, -1).to(self.bins.device, torch.float64), top - block)

    def value(self) -> Tensor:
        """The sum as a tensor of the terms' dtype: within one ulp of the exact sum (see the module).

        Elementwise, in chunks of :data:`CHUNK` coordinates: the temporaries stay in cache (on a large model
        whole-vector temporaries cost more than the adds).
        """
        out = torch.empty(self.bins.shape[1], dtype=torch.float64, device=self.bins.device)
        for bins, piece in zip(self.bins.split(CHUNK, dim=1), out.split(CHUNK)):
            # carried, the lower bins are in [0, 2^32), so the top bin has the sign of the sum
            negative = _carried(bins.clone())[0] < 0
            bins = _carried(torch.where(negative, -bins, bins))  # |sum|: every bin >= 0
            torch.mul(bins[NUM_BINS - 1], 2.0 ** (BIN_BITS * (self.block - NUM_BINS)), out=piece)
            for k in reversed(range(NUM_BINS - 1)):  # smallest first, all of one sign: no cancellation
                piece.add_(bins[k], alpha=2.0 ** (BIN_BITS * (self.block - 1 - k)))
            piece.copy_(torch.where(negative, -piece, piece))
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
    """The same integer with every bin but the top in ``[0, 2^32)`` (the carries moved up), in place.

    In float64, exactly: the bins hold integers of at most ``MAX_TERMS * 2^32 + MAX_TERMS < 2^53``.
    """
    for k in range(NUM_BINS - 1, 0, -1):
        carry = torch.floor(bins[k] * 2.0**-BIN_BITS)
        bins[k].sub_(carry, alpha=2.0**BIN_BITS)
        bins[k - 1].add_(carry)
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
