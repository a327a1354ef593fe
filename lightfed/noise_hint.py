"""One line before a DP run trains: how loud the noise is against the mean update, and what that means.

A target epsilon that is too small for the cohort does not fail: it trains a model no better than chance.
Before round 1, :class:`NoiseHint` prints the noise-to-clip ratio of the *mean* update,

    rho = sigma / (C * m) = z / m,

where ``sigma = z * C`` is the std of the Gaussian noise on the round's sum (McMahan et al. 2018, DP-FedAvg),
``C`` the clip norm and ``m`` the expected cohort: the std of the noise on the released mean, in units of the
largest norm one client's update may have. The thresholds :data:`QUIET` and :data:`LOUD` are rules of thumb
read off measured runs (benchmarks/README.md), not a guarantee.
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from lightfed.callbacks import Callback

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer

log = logging.getLogger("lightfed")

#: Below this ratio the noise costs little accuracy; above :data:`LOUD` the mean update is mostly noise.
QUIET, LOUD = 0.05, 0.2


def noise_to_clip_ratio(noise_multiplier: float, expected_cohort: float) -> float:
    """``z / m``: the std of the noise on the mean update, in units of the clip norm."""
    return noise_multiplier / max(expected_cohort, 1e-12)


def hint(noise_multiplier: float, expected_cohort: float) -> str:
    """The line :class:`NoiseHint` prints (see the module docstring for the ratio)."""
    rho = noise_to_clip_ratio(noise_multiplier, expected_cohort)
    head = (f"noise-to-clip ratio of the mean update {rho:.3g} (noise std z*C over C*m: "
            f"z = {noise_multiplier:.4g}, expected cohort m = {expected_cohort:.4g})")
    if rho < QUIET:
        return f"{head}: small; DP usually costs a few points of accuracy here."
    if rho < LOUD:
        return (f"{head}: large; expect a clear accuracy loss. More clients per round or a larger epsilon "
                f"lower it.")
    return (f"{head}: the noise usually swamps the update and the model barely learns. Raise the clients per "
            f"round (trainer.sampler's sampling_rate), raise target_epsilon, or train fewer rounds.")


class NoiseHint(Callback):
    """Logs :func:`hint` once before the first round of a run whose privacy mechanism noises the sum."""

    def on_fit_start(self, trainer: FederatedTrainer) -> None:
        privacy = trainer.privacy
        if privacy is None or not trainer.is_global_zero or trainer.round_idx > 0:
            return
        plan = privacy.noise_plan()
        if plan.noise_multiplier <= 0 or not plan.clip_norm:
            return
        cohort = float(trainer.sampler.expected_cohort(trainer.num_clients))
        rho = noise_to_clip_ratio(plan.noise_multiplier, cohort)
        (log.warning if rho >= QUIET else log.info)("%s", hint(plan.noise_multiplier, cohort))


__all__ = ["LOUD", "QUIET", "NoiseHint", "hint", "noise_to_clip_ratio"]
