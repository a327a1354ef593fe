"""A delta that is not below 1/N is refused at set-up (the usual guidance: delta << 1/N)."""

from __future__ import annotations

import pytest

from lightfed.messages import RunInfo
from lightfed.privacy import DPAdaptiveClipping, DPFixedClipping, LocalDP
from lightfed.sampling import PoissonSampler
from lightfed.strategy import FedAvg


def setup(mech, n=400):
    mech.setup(RunInfo(num_clients=n, sampler=PoissonSampler(0.2), rounds=5,
                       strategy=FedAvg(weighted=False), seed=0))
    return mech


@pytest.mark.parametrize("cls", [DPFixedClipping, DPAdaptiveClipping, LocalDP])
def test_delta_above_one_over_n_is_refused_naming_the_bound(cls):
    # the case: 0.01 with 400 clients (1/N = 0.0025)
    with pytest.raises(ValueError, match=r"privacy.init_args.delta=0.01 is not below 1/N = 0.0025 for N=400 .*delta << 1/N"):
        setup(cls(noise_multiplier=1.0, delta=0.01, verbose=False))
    with pytest.raises(ValueError, match="not below 1/N"):
        setup(cls(noise_multiplier=1.0, delta=1 / 400, verbose=False))  # exactly 1/N: the outright leak fits too
    setup(cls(noise_multiplier=1.0, delta=1e-4, verbose=False))
    setup(cls(noise_multiplier=1.0, verbose=False))  # the default 1/N^1.1
