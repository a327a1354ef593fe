"""Client-level differential privacy for any linear strategy: DP-FedAvg with fixed or adaptive clipping.

The unit of privacy is a client: whatever one client holds, it can change the released global models
only a little. A round (McMahan, Ramage, Talwar & Zhang 2018, "Learning Differentially Private Recurrent
Language Models") is

    Delta_k <- Delta_k * min(1, C / ||Delta_k||)                (clip everything client k sends)
    S       =  sum_{k in cohort} w_k Delta_k + N(0, (z C)^2 I)   (Gaussian noise on the SUM)
    mean    =  S / D                                              (a FIXED denominator)

with uniform weights ``w_k = 1`` and ``D = m = qN`` (the expected cohort, never the realised count, so the
sensitivity of the mean is ``C / m`` whatever the cohort), or the paper's weighted estimator
``w_k = min(n_k / w_hat, 1)`` and ``D = q W`` with ``W = sum_k w_k`` over all ``N`` clients. The strategy then
consumes the noisy mean like any other (FedAvg, FedAvgM, FedAdam, ...: the server optimiser is
post-processing). Robust strategies need the individual updates, which DP never releases: refused.

:class:`DPAdaptiveClipping` replaces the fixed ``C`` by the quantile-tracking clip of Andrew, Thakkar,
McMahan & Ramaswamy 2021, "Differentially Private Learning with Adaptive Clipping".
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from typing import Any, Literal

import torch

from lightfed.messages import ClientUpdate, RoundAggregate, RunInfo
from lightfed.privacy.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    AccountantName,
    RoundAccountant,
    SamplingScheme,
    calibrate_noise_multiplier,
    default_delta,
    sum_noise_std,
)
from lightfed.privacy.base import NoisePlan, PrivacyMechanism, check_noise_budget, check_positive
from lightfed.privacy.clipping import clip_update, gaussian_like
from lightfed.registry import PRIVACY
from lightfed.seeding import make_generator
from lightfed.strategy import Strategy

log = logging.getLogger("lightfed")

#: The count adaptive clipping adds to each update: the centred clip bit ``b_k - 1/2``.
UNCLIPPED_COUNT = "dp_unclipped_centred"

def check_delta(delta: float | None, num_clients: int) -> None:
    """Refuse ``delta >= 1/N`` at set-up: the usual guidance is ``delta << 1/N``.

    A mechanism that publishes one randomly chosen client's data outright is ``(0, 1/N)``-DP: with
    ``delta >= 1/N`` the guarantee admits such a total leak of a client, so the epsilon it prints would mean
    nothing (Dwork & Roth 2014, Sec. 2.3). ``1/N^1.1`` (the default) is below it for every ``N > 1``.

    Raises:
        ValueError: naming ``privacy.init_args.delta``, the bound ``1/N`` and the default.
    """
    if delta is not None and delta >= 1.0 / num_clients:
        raise ValueError(
            f"privacy.init_args.delta={delta:g} is not below 1/N = {1.0 / num_clients:.3g} for N={num_clients} clients: "
            f"a mechanism that publishes one client's data outright satisfies (0, 1/N)-DP, so this epsilon would "
            f"promise nothing. Use delta << 1/N, e.g. leave it unset (default 1/N^1.1 = {default_delta(num_clients):.3g})."
        )


def check_dp_strategy(strategy: Strategy, mechanism: str, weighted_ok: bool) -> None:
    """Refuse strategies whose aggregate is not a mean of uniformly (or capped-)weighted updates.

    Raises:
        ValueError: for ``needs_all_updates`` strategies (median, Krum), strategies that pick their own
            cohort (the accountant would not describe it), and example-count weighting without the
            weighted estimator.
    """
    name = type(strategy).__name__
    if strategy.needs_all_updates:
        raise ValueError(
            f"{mechanism} releases only a noisy sum of clipped updates, but strategy {name} needs every "
            f"individual update (robust aggregation, or FLoRA's stacked adapters); its output would not be "
            f"differentially private. Use a linear strategy (FedAvg, FedAvgM, FedAdam, FFALoRA, ...) with DP."
        )
    if strategy.samples_own_cohort:
        raise ValueError(
            f"strategy {name} picks its own cohorts (it overrides sample_clients, so samples_own_cohort is set); the privacy accountant "
            f"derives its events from `trainer.sampler` and cannot describe that selection. Use a strategy that "
            f"leaves sampling to the trainer."
        )
    if strategy.weighted and not weighted_ok:
        raise ValueError(
            f"strategy {name} weights each update by its number of examples n_k, so one client can move the "
            f"weighted sum by n_k * C, not C: the noise z * C would be calibrated to the wrong sensitivity and the "
            f"printed epsilon would be false. Set `strategy: {{class_path: {name}, init_args: {{weighted: false}}}}` "
            f"(uniform weights, McMahan et al. 2018), or use the weighted estimator with capped weights: "
            f"`privacy.init_args.weighted_estimator: true` and `weight_cap: <w_hat>`."
        )


@PRIVACY.register("DPFixedClipping")
class DPFixedClipping(PrivacyMechanism):
    """Client-level DP-FedAvg with a fixed clip (McMahan et al. 2018); accountant from the sampler.

    Args:
        clip_norm: ``C``, the L2 bound of each client's whole update (all trainable parameters and extras
            flattened together).
        noise_multiplier: ``z``; noise std on the sum is ``z * C``. Give this or ``target_epsilon``.
        target_epsilon: Calibrate ``z`` so that ``rounds`` rounds spend at most this epsilon at ``delta``.
        delta: The delta of every reported epsilon; default ``1 / N^1.1``.
        max_epsilon: Stop training (with a checkpoint) before a round that would spend more than this.
        clipping: ``"server"`` (the trusted server clips what it receives) or ``"client"`` (clients clip
            before sending, so an honest client's update never leaves it unbounded).
        weighted_estimator: Use the weights ``w_k = min(n_k / weight_cap, 1)`` and denominator ``q W``.
        weight_cap: ``w_hat`` of the weighted estimator (examples at which a client gets full weight).
        total_weight: ``W = sum_k min(n_k / w_hat, 1)`` over all clients (treated as public, as in the
            paper); by default computed from the clients' sizes, which the trainer passes to :meth:`setup`.
        accountant: ``"pld"`` (tight, default) or ``"rdp"``.
        pld_discretization: Grid width of the PLD accountant.
        verbose: Print the privacy plan before training.
        noise_placement: ``"server"`` (the trusted server adds ``N(0, (zC)^2)`` to the sum) or
            ``"distributed"`` (each client adds its share before secure aggregation masks it, see
            docs/secure_aggregation.md; needs ``clipping: client`` and a ``secure_aggregation`` section).
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        max_epsilon: float | None = None,
        clipping: Literal["server", "client"] = "server",
        weighted_estimator: bool = False,
        weight_cap: float | None = None,
        total_weight: float | None = None,
        accountant: AccountantName = "pld",
        pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
        verbose: bool = True,
        noise_placement: Literal["server", "distributed"] = "server",
    ) -> None:
        check_positive(clip_norm, "clip_norm")
        if noise_placement not in ("server", "distributed"):
            raise ValueError(f"privacy.init_args.noise_placement must be 'server' or 'distributed', got {noise_placement!r}.")
        if noise_placement == "distributed" and clipping != "client":
            raise ValueError(
                "privacy.init_args.noise_placement: distributed needs clipping: client (the clients clip and noise "
                "their own updates before secure aggregation; the server never sees them to clip)."
            )
        if noise_placement == "distributed" and weighted_estimator:
            raise ValueError(
                "privacy.init_args.noise_placement: distributed with weighted_estimator: true would release the "
                "secure sum of the weights sum_k min(n_k / w_hat, 1) to the server without noise; use uniform weights "
                "(weighted_estimator: false) or noise_placement: server."
            )
        check_noise_budget(
            noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta, accountant=accountant,
            max_epsilon=max_epsilon,
        )
        if clipping not in ("server", "client"):
            raise ValueError(f"privacy.init_args.clipping must be 'server' or 'client', got {clipping!r}.")
        if weighted_estimator and weight_cap is None:
            raise ValueError("privacy.init_args.weighted_estimator needs weight_cap (w_hat, in examples).")
        if weight_cap is not None:
            check_positive(weight_cap, "weight_cap")
        if total_weight is not None:
            check_positive(total_weight, "total_weight")
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.clipping = clipping
        self.weighted_estimator = weighted_estimator
        self.weight_cap = weight_cap
        self.total_weight = total_weight
        self.accountant_name: AccountantName = accountant
        self.pld_discretization = pld_discretization
        self.verbose = verbose
        self.noise_placement = noise_placement
        self.seed = 0
        self.scheme: SamplingScheme | None = None
        self.accountant: RoundAccountant | None = None
        self.denominator = 1.0
        self.update_noise_multiplier = 0.0

    # ------------------------------------------------------------------ set-up
    def setup(self, info: RunInfo) -> None:
        num_clients, sampler, rounds, strategy, seed = (
            info.num_clients, info.sampler, info.rounds, info.strategy, info.seed
        )
        client_num_examples = info.client_num_examples
        check_dp_strategy(strategy, type(self).__name__, weighted_ok=self.weighted_estimator)
        check_delta(self.delta, num_clients)
        self.seed = seed
        self.rounds = rounds
        self.scheme = SamplingScheme.from_sampler(sampler, num_clients)
        self.delta_used = self.delta if self.delta is not None else default_delta(num_clients)
        z = self.noise_multiplier
        if z is None:
            assert self.target_epsilon is not None
            z = calibrate_noise_multiplier(
                self.target_epsilon, self.delta_used, self.scheme, rounds, self.accountant_name, self.pld_discretization
            )
        self.z = float(z)
        self.accountant = RoundAccountant(
            self.z, self.scheme, self.delta_used, self.accountant_name, self.pld_discretization, rounds=rounds
        )
        self.denominator = self._denominator(client_num_examples)
        self.update_noise_multiplier = self._update_noise_multiplier()
        if self.verbose:
            print(self.plan(), flush=True)

    def _denominator(self, client_num_examples: Sequence[int] | None) -> float:
        assert self.scheme is not None
        if not self.weighted_estimator:
            return self.scheme.expected_cohort
        assert self.weight_cap is not None
        total = self.total_weight
        if total is None:
            if client_num_examples is None:
                raise ValueError(
                    "the weighted estimator divides by q * W with W = sum_k min(n_k / w_hat, 1) over all clients, "
                    "but the clients' sizes were not passed to the privacy mechanism's setup; set "
                    "privacy.init_args.total_weight (or use uniform weights)."
                )
            total = sum(min(int(n) / self.weight_cap, 1.0) for n in client_num_examples)
        self.total_weight_used = float(total)
        return self.scheme.rate * float(total)

    def _update_noise_multiplier(self) -> float:
        """Noise multiplier of the update sum (adaptive clipping lowers it to pay for the clip count)."""
        return self.z

    @property
    def current_clip(self) -> float:
        """The clip applied this round."""
        return self.clip_norm

    def plan(self) -> str:
        """The privacy plan: mechanism, sampler, noise, delta and the epsilon after all rounds."""
        assert self.scheme is not None and self.accountant is not None
        eps_total = self.accountant.epsilon(self.rounds)
        how = f"calibrated for target epsilon {self.target_epsilon}" if self.target_epsilon is not None else "given"
        den = (
            f"q*W = {self.denominator:.4g} (weighted estimator, w_hat={self.weight_cap})"
            if self.weighted_estimator
            else f"m = {self.denominator:.4g} (fixed expected cohort)"
        )
        default = " (default 1/N^1.1)" if self.delta is None else ""
        lines = [
            f"[lightfed privacy] {type(self).__name__}: client-level DP ({self.scheme.neighbouring.replace('_', ' ')} one client)",
            f"  sampler      : {self.scheme.describe()}",
            f"  clipping     : {self.clipping}-side, {self._clip_text()}",
            f"  noise        : z = {self.z:.4g} ({how}); std on the sum z*C, on the mean z*C / {den}",
            f"  accountant   : {self.accountant_name.upper()} (dp-accounting), events from the sampler",
            f"  delta        : {self.delta_used:.3g}{default}",
            f"  rounds       : {self.rounds} -> epsilon {eps_total:.4g} at delta {self.delta_used:.3g}",
        ]
        if self.max_epsilon is not None:
            lines.append(f"  max_epsilon  : {self.max_epsilon} (training stops before a round that would exceed it)")
        if self.scheme.kind != "poisson":
            lines.append("  note         : Poisson sampling is the DP default: trainer.sampler: {class_path: lightfed.PoissonSampler}")
        return "\n".join(lines)

    def _clip_text(self) -> str:
        return f"C = {self.clip_norm:.4g}"

    # ------------------------------------------------------------------ round hooks
    def client_update(self, update: ClientUpdate, round_idx: int) -> ClientUpdate:
        return self._clip(update) if self.clipping == "client" else update

    def client_weight(self, update: ClientUpdate, strategy_weight: float) -> float:
        if self.weighted_estimator:
            assert self.weight_cap is not None
            return min(update.num_examples / self.weight_cap, 1.0)
        return 1.0

    def server_update(self, update: ClientUpdate, round_idx: int) -> ClientUpdate:
        return self._clip(update) if self.clipping == "server" else update

    def _clip(self, update: ClientUpdate) -> ClientUpdate:
        clipped, _ = clip_update(update, self.current_clip)
        return clipped

    def noise_plan(self) -> NoisePlan:
        return NoisePlan(self.update_noise_multiplier, self.current_clip, self.noise_placement, self.clipping)

    def process_aggregate(self, aggregate: RoundAggregate, round_idx: int) -> RoundAggregate:
        assert self.scheme is not None
        # What reaches the strategy besides the noisy sums is public: the fixed denominator and the expected
        # cohort m. The realised count and weight sum would move by one client's presence, unnoised.
        aggregate.num_clients = self.scheme.expected_cohort
        if self.noise_placement == "distributed":  # the clients' noise shares are already in the sum
            aggregate.denominator = aggregate.weight_sum = self.denominator
            return aggregate
        std = sum_noise_std(self.update_noise_multiplier, self.current_clip)
        device = aggregate.delta_sum.device
        aggregate.delta_sum = aggregate.delta_sum + gaussian_like(
            aggregate.delta_sum, std, make_generator(self.seed, "dp_noise", round_idx, device=device)
        )
        for name in sorted(aggregate.extras_sum):
            value = aggregate.extras_sum[name]
            aggregate.extras_sum[name] = value + gaussian_like(
                value, std, make_generator(self.seed, "dp_noise", round_idx, name, device=value.device)
            )
        aggregate.denominator = self.denominator
        aggregate.weight_sum = self.denominator
        return aggregate

    def can_run_round(self, round_idx: int) -> bool:
        if self.max_epsilon is None:
            return True
        assert self.accountant is not None
        return self.accountant.within(self.max_epsilon, self.accountant.rounds + 1)

    def after_round(self, round_idx: int, cohort: Sequence[int]) -> dict[str, float]:
        assert self.accountant is not None
        eps = self.accountant.step()
        return {
            "epsilon": eps,
            "delta": self.accountant.delta,
            "noise_multiplier": self.z,
            "clip_norm": self.current_clip,
        }

    # ------------------------------------------------------------------ checkpoints
    def state_dict(self) -> dict[str, Any]:
        assert self.accountant is not None
        return {"mechanism": type(self).__name__, "accountant": self.accountant.state_dict()}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if not state:
            raise ValueError(
                f"the checkpoint holds no privacy state but this run uses {type(self).__name__}; a resumed DP run "
                f"must start from a checkpoint of the same DP run (else its epsilon would restart at 0)."
            )
        if state.get("mechanism") != type(self).__name__:
            raise ValueError(
                f"the checkpoint was written by privacy mechanism {state.get('mechanism')!r}, this run uses "
                f"{type(self).__name__!r}; resume with the same `privacy:` section."
            )
        assert self.accountant is not None
        self.accountant.load_state_dict(state["accountant"])


@PRIVACY.register("DPAdaptiveClipping")
class DPAdaptiveClipping(DPFixedClipping):
    """Client-level DP-FedAvg with the adaptive, quantile-tracking clip of Andrew et al. 2021.

    Each round, with ``C_t`` the clip applied in round ``t``:

    * ``b_k = 1`` if ``||Delta_k|| <= C_t`` (the update was not clipped), else 0; the client sends the
      *centred* bit ``b_k - 1/2`` as a count of its update (so it is summed with the update: across
      processes and inside secure aggregation), which moves the sum by at most 1/2 when a client is added
      or removed (TF Privacy's ``QuantileEstimatorQuery``);
    * noisy unclipped fraction ``b~ = (sum_k (b_k - 1/2) + N(0, sigma_b^2)) / m + 1/2``;
    * geometric update ``C_{t+1} = C_t * exp(-eta (b~ - gamma))``: if more than ``gamma`` of the updates
      fit, the clip shrinks, if fewer fit, it grows;
    * the update sum gets noise of std ``z_Delta * C_t``, with ``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)``,
      so the two Gaussian queries (update sum with sensitivity ``C_t``, centred count with sensitivity 1/2)
      compose to one Gaussian of multiplier ``z``: the accountant charges ``z``.

    Args:
        initial_clip: ``C_0`` (paper default 0.1).
        target_quantile: ``gamma`` (default 0.5, the median norm).
        clip_learning_rate: ``eta`` (default 0.2).
        clipped_count_stddev: ``sigma_b``; default ``m / 20``.
        noise_multiplier, target_epsilon, delta, max_epsilon, clipping, weighted_estimator, weight_cap,
            total_weight, accountant, pld_discretization, verbose: as :class:`DPFixedClipping`; ``z`` is
            the total noise multiplier that the accountant charges.
        noise_placement: Only ``"server"``: ``"distributed"`` is refused, because the clip count's noise is
            added by the server, which under secure aggregation would see the exact count first.
    """

    def __init__(
        self,
        initial_clip: float = 0.1,
        target_quantile: float = 0.5,
        clip_learning_rate: float = 0.2,
        clipped_count_stddev: float | None = None,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        max_epsilon: float | None = None,
        clipping: Literal["server", "client"] = "server",
        weighted_estimator: bool = False,
        weight_cap: float | None = None,
        total_weight: float | None = None,
        accountant: AccountantName = "pld",
        pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
        verbose: bool = True,
        noise_placement: Literal["server", "distributed"] = "server",
    ) -> None:
        check_positive(initial_clip, "initial_clip")
        if noise_placement == "distributed":
            raise ValueError(
                "privacy.init_args.noise_placement: distributed is not supported by DPAdaptiveClipping: its clip count "
                "sum_k (b_k - 1/2) is noised by the server after secure aggregation unmasks it, so the server would see "
                "the exact count first. Use DPFixedClipping with noise_placement: distributed, or noise_placement: server."
            )
        super().__init__(
            initial_clip, noise_multiplier, target_epsilon, delta, max_epsilon, clipping, weighted_estimator,
            weight_cap, total_weight, accountant, pld_discretization, verbose,
        )
        if not 0 < target_quantile < 1:
            raise ValueError(f"privacy.init_args.target_quantile must be in (0, 1), got {target_quantile}.")
        check_positive(clip_learning_rate, "clip_learning_rate")
        if clipped_count_stddev is not None:
            check_positive(clipped_count_stddev, "clipped_count_stddev")
        self.initial_clip = float(initial_clip)
        self.target_quantile = float(target_quantile)
        self.clip_learning_rate = float(clip_learning_rate)
        self.clipped_count_stddev = clipped_count_stddev
        self.clip = float(initial_clip)
        self.applied_clip = self.clip
        self.last_unclipped_fraction = float("nan")

    @property
    def current_clip(self) -> float:
        return self.clip

    def _clip_text(self) -> str:
        return (
            f"adaptive: C0 = {self.initial_clip:.4g}, target quantile {self.target_quantile}, eta "
            f"{self.clip_learning_rate}, sigma_b = {self.sigma_b:.4g}, update noise z_Delta = "
            f"{self.update_noise_multiplier:.4g}"
        )

    def _update_noise_multiplier(self) -> float:
        assert self.scheme is not None
        self.sigma_b = (
            float(self.clipped_count_stddev) if self.clipped_count_stddev is not None else self.scheme.expected_cohort / 20
        )
        return adaptive_update_noise_multiplier(self.z, self.sigma_b)

    def _clip(self, update: ClientUpdate) -> ClientUpdate:
        """Clip to this round's ``C_t``; the centred clip bit ``b_k - 1/2`` travels as a count of the update."""
        clipped, norm = clip_update(update, self.clip)
        if clipped is update:
            clipped = ClientUpdate(
                update.client_id, update.delta, update.num_examples, update.num_steps, update.metrics,
                update.extras, dict(update.counts),
            )
        clipped.counts[UNCLIPPED_COUNT] = (1.0 if norm <= self.clip else 0.0) - 0.5
        return clipped

    def process_aggregate(self, aggregate: RoundAggregate, round_idx: int) -> RoundAggregate:
        if self.noise_placement != "server":  # the count noise below is the server's: never after unmasking
            raise RuntimeError("DPAdaptiveClipping adds its clip-count noise on the server: noise_placement must be 'server'.")
        aggregate = super().process_aggregate(aggregate, round_idx)  # noise with the clip of this round
        assert self.scheme is not None
        gen = make_generator(self.seed, "dp_clip_count", round_idx)
        self.applied_clip = self.clip
        centred = float(aggregate.counts_sum.get(UNCLIPPED_COUNT, 0.0))
        noisy = centred + self.sigma_b * float(torch.randn((), generator=gen, dtype=torch.float64))
        aggregate.counts_sum[UNCLIPPED_COUNT] = noisy  # the released value replaces the exact sum
        fraction = noisy / self.scheme.expected_cohort + 0.5
        self.clip = self.clip * math.exp(-self.clip_learning_rate * (fraction - self.target_quantile))
        self.last_unclipped_fraction = fraction
        return aggregate

    def after_round(self, round_idx: int, cohort: Sequence[int]) -> dict[str, float]:
        metrics = super().after_round(round_idx, cohort)
        metrics["clip_norm"] = self.applied_clip  # the clip (and noise scale) of this round
        metrics["next_clip_norm"] = self.clip
        metrics["unclipped_fraction"] = self.last_unclipped_fraction
        metrics["update_noise_multiplier"] = self.update_noise_multiplier
        self.applied_clip = self.clip
        self.last_unclipped_fraction = float("nan")
        return metrics

    def state_dict(self) -> dict[str, Any]:
        return {**super().state_dict(), "clip": self.clip}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        super().load_state_dict(state)
        self.clip = self.applied_clip = float(state["clip"])


def adaptive_update_noise_multiplier(noise_multiplier: float, clipped_count_stddev: float) -> float:
    """``z_Delta = (z^-2 - (2 sigma_b)^-2)^(-1/2)`` (Andrew et al. 2021, Thm. 1).

    Raises:
        ValueError: if ``2 sigma_b <= z`` (the clip count alone would spend the whole budget).
    """
    z, sb = float(noise_multiplier), float(clipped_count_stddev)
    if z == 0:
        return 0.0
    rest = z**-2 - (2 * sb) ** -2
    if rest <= 0:
        raise ValueError(
            f"adaptive clipping needs 2 * clipped_count_stddev > noise_multiplier, got sigma_b={sb:.4g} and "
            f"z={z:.4g}: the clip count would use the whole privacy budget. Raise "
            f"privacy.init_args.clipped_count_stddev (default m/20), sample more clients per round, or raise z."
        )
    return rest**-0.5


__all__ = ["DPAdaptiveClipping", "DPFixedClipping", "adaptive_update_noise_multiplier", "check_delta", "check_dp_strategy"]
