"""Fixed point in Z_(2**b): hand-computed encodings, unbiased stochastic rounding, the error bound, overflow refusal."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from lightfed.secagg.quantize import FixedPoint, Layout
from lightfed.seeding import derive_seed, make_generator


def rng(*keys):
    return np.random.default_rng(derive_seed(0, *keys))


def test_hand_computed_encoding_and_twos_complement():
    codec = FixedPoint(4, 8)  # L = 7, residues mod 256
    layout = Layout.build([("x", 4, 1.0)])
    values = torch.tensor([1.0, -1.0, 0.0, -3.0])  # -3 is clipped to -1
    residues, clipped = codec.encode(values, layout, rng("q"))
    assert residues.dtype == np.uint32
    assert residues.tolist() == [7, 256 - 7, 0, 256 - 7]
    assert clipped == 1
    assert codec.to_signed(residues).tolist() == [7, -7, 0, -7]
    assert codec.decode(residues, layout).tolist() == [1.0, -1.0, 0.0, -1.0]


def test_stochastic_rounding_is_unbiased_and_within_one_step():
    codec = FixedPoint(4, 16)  # s = 7: 0.5 -> 3.5 rounds to 3 or 4 with probability 1/2
    layout = Layout.build([("x", 20000, 1.0)])
    residues, _ = codec.encode(torch.full((20000,), 0.5), layout, rng("q"))
    q = codec.to_signed(residues)
    assert set(q.tolist()) == {3, 4}
    # mean of 20000 Bernoulli(1/2) steps: 3.5 +- 5 standard errors (0.0035 each)
    assert abs(q.mean() - 3.5) < 5 * 0.5 / np.sqrt(20000)


def test_sum_of_encodings_within_stated_bound():
    codec = FixedPoint(10, 32)
    layout = Layout.build([("a", 5000, 2.0), ("b", 3, 1.0)])
    n = 30
    xs = [torch.rand(5003, generator=make_generator(1, i), dtype=torch.float64) * 2 - 1 for i in range(n)]
    total = np.zeros(5003, dtype=codec.dtype)
    for i, x in enumerate(xs):
        enc, clipped = codec.encode(x, layout, rng(2, i))
        assert clipped == 0
        total += enc
    total &= codec.mask
    decoded = codec.decode(total, layout)
    err = (decoded - torch.stack(xs).sum(0)).abs()
    assert float(err[:5000].max()) < codec.error_bound(n, 2.0) == n * 2.0 / 511
    assert float(err[5000:].max()) < codec.error_bound(n, 1.0)
    # stochastic rounding errors are independent, so the typical error is ~sqrt(n), far inside the hard bound
    assert float(err[:5000].std()) < 3 * np.sqrt(n) * 2.0 / 511 / np.sqrt(6)


def test_wide_modulus_uses_uint64_and_handles_negative_sums():
    codec = FixedPoint(40, 64)
    layout = Layout.build([("x", 3, 1.0)])
    enc, _ = codec.encode(torch.tensor([-1.0, -0.5, 1.0]), layout, rng("w"))
    assert enc.dtype == np.uint64
    total = (enc + enc) & codec.mask
    assert codec.decode(total, layout).tolist() == pytest.approx([-2.0, -1.0, 2.0], abs=2 / codec.levels)


def test_overflow_is_refused_with_the_numbers():
    codec = FixedPoint(20, 32)
    assert codec.max_clients == (2**31 - 1) // (2**19 - 1) == 4096
    codec.check_capacity(4096)
    with pytest.raises(ValueError, match=r"4097 clients x 524287 .* > 2\*\*31 - 1 = 2147483647 .*at most 4096 clients"):
        codec.check_capacity(4097)


@pytest.mark.parametrize(("q", "b", "match"), [(1, 32, "quantization_bits"), (20, 20, "modulus_bits"), (20, 65, "modulus_bits")])
def test_bad_bit_widths_are_refused(q, b, match):
    with pytest.raises(ValueError, match=match):
        FixedPoint(q, b)


def test_layout_build_and_lookup():
    layout = Layout.build([("delta", 10, 1.0), ("weight", 1, 1.0)])
    assert layout.length == 11 and layout["weight"].start == 10 and layout.names() == ["delta", "weight"]
    with pytest.raises(ValueError, match="positive clipping bound"):
        Layout.build([("delta", 10, 0.0)])
