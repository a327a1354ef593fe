"""Measured privacy: empirical audits and attacks beside the accountant's epsilon.

* :class:`OneShotCanaryAudit` - one-shot empirical epsilon for client-level DP from random canary clients
  (Andrew et al., ICLR 2024), a :class:`~lightfed.callbacks.Callback` configured under ``trainer.callbacks``;
  with ``inclusion="coin"`` also the client-level one-run lower bound (Steinke et al. 2023) from the same canaries;
* :mod:`lightfed.audit.membership` - membership inference on a released model (loss threshold and offline
  LiRA with shadow re-runs of the config, example- and client-level; AUC, TPR at low FPR, ROC plot), run by
  ``lightfed audit`` (:mod:`lightfed.audit.cli`);
* :mod:`lightfed.audit.reconstruction` - reconstruction of a client's data from what a round releases of its
  update: exact analytic recovery from a fully connected first layer, iDLG labels, gradient inversion
  (Geiping et al. 2020), PSNR/SSIM, TensorBoard images;
* :func:`lightfed.audit.dpsgd_audit.one_run_audit` - the one-run audit of sample-level DP (Steinke et al. 2023):
  mislabelled canaries included with probability 1/2 in one ordinary run, an epsilon lower bound at 95%;
* :class:`ReleasedNoiseCheck` (:mod:`lightfed.audit.noise_check`) - a direct check of the noise the pipeline
  releases, per tensor and per block of coordinates, against the mechanism's noise plan;
* :mod:`lightfed.audit.estimators` - the pure maths: the epsilon of two Gaussians, bootstrap intervals, and
  the one-run lower bound of Steinke, Nasr & Jagielski (NeurIPS 2023).

Every audit is registered in :data:`lightfed.registry.AUDITS` (entry-point group ``lightfed.audits``). An audit
gives an estimate or a lower bound for one attack, never a proof of privacy: see docs/auditing.md.
"""

from lightfed.audit.canary import OneShotCanaryAudit
from lightfed.audit.estimators import (
    GaussianFit,
    best_one_run_bound,
    bootstrap_interval,
    epsilon_two_gaussians,
    gdp_epsilon,
    one_run_epsilon_lower_bound,
    one_run_p_value,
)
from lightfed.audit.noise_check import NoiseCheckReport, ReleasedNoiseCheck, check_released_noise

__all__ = [
    "GaussianFit", "NoiseCheckReport", "OneShotCanaryAudit", "ReleasedNoiseCheck", "check_released_noise", "best_one_run_bound", "bootstrap_interval", "epsilon_two_gaussians",
    "gdp_epsilon", "one_run_epsilon_lower_bound", "one_run_p_value",
]
