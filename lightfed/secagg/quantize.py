"""Fixed-point encoding of real vectors into Z_(2**b) with stochastic rounding, and the no-wrap check.

A coordinate ``x`` of a segment with clipping bound ``B`` is clipped to ``[-B, B]``, scaled by
``s = L / B`` with ``L = 2**(q-1) - 1`` (``q`` = ``value_bits``) and stochastically rounded,
``Q(x) = floor(s x + U)``, ``U ~ Uniform[0, 1)``, so ``E[Q(x)] = s x`` (unbiased) and
``|Q(x) - s x| < 1``; ``|Q(x)| <= L``. ``Q(x)`` is stored modulo ``2**b`` (two's complement).

The sum of ``n`` encodings lies in ``[-n L, n L]``; it is recovered exactly from its residue mod ``2**b``
when ``n L <= 2**(b-1) - 1``, which :meth:`FixedPoint.check_capacity` enforces (refusing the round
otherwise). Decoding divides by ``s``; the decoded sum of ``n`` unclipped inputs then differs from
their true sum by less than ``n / s = n B / L`` per coordinate (:meth:`FixedPoint.error_bound`),
and by about ``sqrt(n) B / (sqrt(6) L)`` in standard deviation.

Arithmetic in Z_(2**b) uses native wrapping ``uint32`` (``b <= 32``) or ``uint64`` words: ``2**b`` divides
the word modulus, so reducing at the end (``& (2**b - 1)``) gives the same residue.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor


@dataclass(frozen=True)
class Segment:
    """A named slice ``[start, start + length)`` of the secure vector, clipped to ``[-bound, bound]``."""

    name: str
    start: int
    length: int
    bound: float

    @property
    def stop(self) -> int:
        return self.start + self.length


@dataclass(frozen=True)
class Layout:
    """The public layout of the vector every client of a round contributes (agreed before masking)."""

    segments: tuple[Segment, ...]

    @classmethod
    def build(cls, parts: list[tuple[str, int, float]]) -> Layout:
        """Lay ``(name, length, bound)`` parts out back to back."""
        segments, start = [], 0
        for name, length, bound in parts:
            if not bound > 0:
                raise ValueError(f"secure-aggregation segment {name!r} needs a positive clipping bound, got {bound}.")
            segments.append(Segment(name, start, int(length), float(bound)))
            start += int(length)
        return cls(tuple(segments))

    @property
    def length(self) -> int:
        return self.segments[-1].stop if self.segments else 0

    def __getitem__(self, name: str) -> Segment:
        for seg in self.segments:
            if seg.name == name:
                return seg
        raise KeyError(name)

    def names(self) -> list[str]:
        return [seg.name for seg in self.segments]


class FixedPoint:
    """Signed fixed point with ``value_bits`` per client value in the ring Z_(2**modulus_bits).

    Args:
        value_bits: ``q``: each clipped coordinate becomes an integer in ``[-(2**(q-1) - 1), 2**(q-1) - 1]``.
        modulus_bits: ``b``: masks and sums live in Z_(2**b); 32 keeps the wire size of float32.
    """

    def __init__(self, value_bits: int, modulus_bits: int) -> None:
        if not 2 <= value_bits <= 53:
            raise ValueError(f"secure_aggregation.quantization_bits must be in [2, 53], got {value_bits}.")
        if not value_bits < modulus_bits <= 64:
            raise ValueError(
                f"secure_aggregation.modulus_bits must be in ({value_bits}, 64] (above quantization_bits="
                f"{value_bits}, so that at least two clients can be summed), got {modulus_bits}."
            )
        self.value_bits = value_bits
        self.modulus_bits = modulus_bits
        self.levels = 2 ** (value_bits - 1) - 1
        self.dtype = np.dtype(np.uint32 if modulus_bits <= 32 else np.uint64)
        self.mask = self.dtype.type(2**modulus_bits - 1)

    @property
    def max_clients(self) -> int:
        """The largest ``n`` with ``n L <= 2**(b-1) - 1``: more clients could wrap the sum."""
        return (2 ** (self.modulus_bits - 1) - 1) // self.levels

    def check_capacity(self, num_clients: int) -> None:
        """Refuse a cohort whose sum could wrap around the modulus.

        Raises:
            ValueError: with the numbers and the two ways out.
        """
        if num_clients > self.max_clients:
            need = self.levels * num_clients
            raise ValueError(
                f"secure aggregation could overflow: {num_clients} clients x {self.levels} (2**{self.value_bits - 1} - 1, "
                f"the largest value of quantization_bits={self.value_bits}) = {need} > 2**{self.modulus_bits - 1} - 1 = "
                f"{2 ** (self.modulus_bits - 1) - 1} (modulus_bits={self.modulus_bits}); at most {self.max_clients} "
                f"clients fit. Raise secure_aggregation.modulus_bits to >= {need.bit_length() + 1}, lower "
                f"quantization_bits, or sample fewer clients per round."
            )

    def scale(self, bound: float) -> float:
        return self.levels / bound

    def error_bound(self, num_clients: int, bound: float) -> float:
        """Hard bound on ``|decoded sum - true sum|`` per coordinate for unclipped inputs: ``n B / L``."""
        return num_clients * bound / self.levels

    def encode(self, values: np.ndarray | Tensor, layout: Layout, rng: np.random.Generator) -> tuple[np.ndarray, int]:
        """Clip, scale and stochastically round ``values`` (laid out as ``layout``) into Z_(2**b).

        Args:
            values: The real vector (any float dtype; computed in float64).
            layout: Its segments and clipping bounds.
            rng: Source of the rounding uniforms (seeded through :func:`lightfed.seeding.derive_seed`).

        Returns:
            The residues (``self.dtype``) and the number of coordinates that had to be clipped.
        """
        if isinstance(values, Tensor):
            values = values.detach().cpu().numpy()
        x = np.array(values, dtype=np.float64, copy=True).reshape(-1)
        if x.size != layout.length:
            raise ValueError(f"vector of length {x.size} does not match the round's layout ({layout.length}).")
        uniforms = rng.random(x.size)
        clipped = 0
        for seg in layout.segments:
            v = x[seg.start : seg.stop]
            clipped += int(np.count_nonzero(v > seg.bound)) + int(np.count_nonzero(v < -seg.bound))
            np.clip(v, -seg.bound, seg.bound, out=v)
            v *= self.scale(seg.bound)
        x += uniforms
        np.floor(x, out=x)
        np.clip(x, -self.levels, self.levels, out=x)  # only float rounding at exactly +-bound can reach L + 1
        residues = x.astype(np.int64).astype(self.dtype)  # two's complement: a wrap modulo the word size
        residues &= self.mask
        return residues, clipped

    def to_signed(self, residues: np.ndarray) -> np.ndarray:
        """The representative in ``[-2**(b-1), 2**(b-1))`` of each residue, as int64."""
        signed = residues.astype(np.int64)
        if self.modulus_bits < 64:
            signed[signed >= 2 ** (self.modulus_bits - 1)] -= 2**self.modulus_bits
        return signed

    def decode(self, residues: np.ndarray, layout: Layout) -> Tensor:
        """Real values (float64) of a sum of encodings (no wrap assumed: see :meth:`check_capacity`)."""
        signed = torch.from_numpy(self.to_signed(residues)).to(torch.float64)
        for seg in layout.segments:
            signed[seg.start : seg.stop] /= self.scale(seg.bound)
        return signed
