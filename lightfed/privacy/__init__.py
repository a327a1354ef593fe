"""Differential privacy for federated learning.

* :class:`DPFixedClipping` - client-level DP-FedAvg with a fixed clip (McMahan et al. 2018);
* :class:`DPAdaptiveClipping` - client-level DP-FedAvg with the adaptive clip (Andrew et al. 2021);
* :class:`LocalDP` - every client noises its own update;
* :class:`DPSGD` - sample-level DP-SGD inside every client (Opacus);
* :mod:`lightfed.privacy.accounting` - dp-accounting events derived from the sampler, calibration, and
  the checkpointable :class:`RoundAccountant`.

``dp_accounting`` and ``opacus`` are imported only when a mechanism is set up, so ``import lightfed``
works without them (``pip install -e ".[privacy]"``).
"""

from lightfed.privacy.accounting import (
    RoundAccountant,
    SamplingScheme,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_for,
    round_event,
    sum_noise_std,
)
from lightfed.privacy.base import NoisePlan, PrivacyMechanism
from lightfed.privacy.central import DPAdaptiveClipping, DPFixedClipping, adaptive_update_noise_multiplier
from lightfed.privacy.dpsgd import DPSGD, DPSGDLocalTrainer
from lightfed.privacy.local import LocalDP

__all__ = [
    "DPSGD", "DPAdaptiveClipping", "DPFixedClipping", "DPSGDLocalTrainer", "LocalDP", "NoisePlan", "PrivacyMechanism",
    "RoundAccountant", "SamplingScheme", "adaptive_update_noise_multiplier", "calibrate_noise_multiplier",
    "default_delta", "epsilon_for", "round_event", "sum_noise_std",
]
