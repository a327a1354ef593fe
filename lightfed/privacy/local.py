"""Local differential privacy: every client clips and noises its own update before it leaves.

Nobody has to be trusted: each report ``clip(Delta_k) + N(0, (z C)^2 I)`` is a Gaussian mechanism on the
client's own data. Changing that data arbitrarily moves the clipped update by up to ``2C`` (replace
one), so one report is a Gaussian with noise multiplier ``z / 2``; a client's epsilon composes over the
rounds it takes part in. The server's sampling gives no amplification here (the server sees who
reported), so the epsilon printed is that of the most frequent participant, and ``target_epsilon``
calibrates ``z`` for a client that takes part in every round. The price is noise ``z C`` per client
rather than per cohort: local DP needs far more noise than central DP for the same epsilon.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from typing import Any

from lightfed.messages import ClientUpdate, RunInfo
from lightfed.privacy.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    AccountantName,
    SamplingScheme,
    calibrate_noise_multiplier,
    default_delta,
    epsilon_for,
)
from lightfed.privacy.base import NoisePlan, PrivacyMechanism, check_noise_budget, check_positive
from lightfed.privacy.central import check_delta, check_dp_strategy
from lightfed.privacy.clipping import clip_update, gaussian_like
from lightfed.registry import PRIVACY
from lightfed.seeding import make_generator


def _report_scheme() -> SamplingScheme:
    # One local report: a Gaussian on one client's clipped update; "full" with N=1 gives GaussianDpEvent.
    return SamplingScheme("full", 1, 1.0, 1)


@PRIVACY.register("LocalDP")
class LocalDP(PrivacyMechanism):
    """Each client clips its update to ``C`` and adds ``N(0, (z C)^2)`` itself (local DP, Gaussian).

    Args:
        clip_norm: ``C`` for each client's whole update.
        noise_multiplier: ``z`` of each report (std ``z C`` per coordinate). Give this or ``target_epsilon``.
        target_epsilon: Calibrate ``z`` so that a client taking part in all ``rounds`` spends at most this.
        delta: The delta of every reported epsilon; default ``1 / N^1.1``.
        max_epsilon: Stop before a round in which a client could exceed this.
        accountant: ``"pld"`` or ``"rdp"``.
        verbose: Print the plan.
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float | None = None,
        max_epsilon: float | None = None,
        accountant: AccountantName = "pld",
        verbose: bool = True,
    ) -> None:
        check_positive(clip_norm, "clip_norm")
        check_noise_budget(
            noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta, accountant=accountant,
            max_epsilon=max_epsilon,
        )
        self.clip_norm = float(clip_norm)
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.delta = delta
        self.max_epsilon = max_epsilon
        self.accountant_name: AccountantName = accountant
        self.verbose = verbose
        self.participations: dict[int, int] = {}
        self._eps_cache: dict[int, float] = {}
        self.seed = 0

    def setup(self, info: RunInfo) -> None:
        num_clients, rounds, strategy, seed = info.num_clients, info.rounds, info.strategy, info.seed
        check_dp_strategy(strategy, "LocalDP", weighted_ok=False)
        check_delta(self.delta, num_clients)
        self.seed = seed
        self.delta_used = self.delta if self.delta is not None else default_delta(num_clients)
        z = self.noise_multiplier
        if z is None:
            assert self.target_epsilon is not None
            # The accountant's event for a report is GaussianDpEvent(z / 2): calibrate z / 2, then double it.
            z = 2 * calibrate_noise_multiplier(self.target_epsilon, self.delta_used, _report_scheme(), rounds, self.accountant_name)
        self.z = float(z)
        if self.verbose:
            print(
                f"[lightfed privacy] LocalDP: each client clips to C = {self.clip_norm:.4g} and adds N(0, (z*C)^2), "
                f"z = {self.z:.4g}; per report a Gaussian with multiplier z/2 (replace one client's data); "
                f"{self.accountant_name.upper()} accountant; delta {self.delta_used:.3g}"
                f"{' (default 1/N^1.1)' if self.delta is None else ''}; a client in all {rounds} rounds spends "
                f"epsilon {self.epsilon(rounds):.4g}.",
                flush=True,
            )

    def epsilon(self, participations: int) -> float:
        """Epsilon of a client after ``participations`` reports."""
        if participations not in self._eps_cache:
            self._eps_cache[participations] = epsilon_for(
                self.z / 2, _report_scheme(), participations, self.delta_used, self.accountant_name,
                DEFAULT_PLD_DISCRETIZATION,
            )
        return self._eps_cache[participations]

    def client_update(self, update: ClientUpdate, round_idx: int) -> ClientUpdate:
        clipped, _ = clip_update(update, self.clip_norm)
        std = self.z * self.clip_norm
        cid = update.client_id
        dev = clipped.delta.device
        delta = clipped.delta + gaussian_like(clipped.delta, std, make_generator(self.seed, "ldp_noise", round_idx, cid, device=dev))
        extras = {
            name: v + gaussian_like(v, std, make_generator(self.seed, "ldp_noise", round_idx, cid, name, device=v.device))
            for name, v in sorted(clipped.extras.items())
        }
        return ClientUpdate(cid, delta, clipped.num_examples, clipped.num_steps, clipped.metrics, extras, dict(clipped.counts))

    def client_weight(self, update: ClientUpdate, strategy_weight: float) -> float:
        return 1.0

    def can_run_round(self, round_idx: int) -> bool:
        if self.max_epsilon is None:
            return True
        most = max(self.participations.values(), default=0)
        return self.epsilon(most + 1) <= self.max_epsilon

    def noise_plan(self) -> NoisePlan:
        return NoisePlan(0.0, self.clip_norm, "client", "client")

    def after_round(self, round_idx: int, cohort: Sequence[int]) -> dict[str, float]:
        # Every member of the cohort sends one report (a rejected one still left its client): counted from
        # the whole cohort, which every process knows, never from the updates one process happened to see.
        for cid in cohort:
            self.participations[int(cid)] = self.participations.get(int(cid), 0) + 1
        counts = list(self.participations.values()) or [0]
        return {
            "epsilon": self.epsilon(max(counts)),
            "epsilon_median": self.epsilon(int(statistics.median_low(counts))),
            "delta": self.delta_used,
            "noise_multiplier": self.z,
        }

    def state_dict(self) -> dict[str, Any]:
        return {"mechanism": "LocalDP", "noise_multiplier": self.z, "participations": dict(self.participations)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != "LocalDP" or abs(float(state["noise_multiplier"]) - self.z) > 1e-12 * max(1.0, self.z):
            raise ValueError(
                f"the checkpoint's privacy state ({state.get('mechanism')!r}, z={state.get('noise_multiplier')}) does not "
                f"match this run's LocalDP (z={self.z}); resume with the same `privacy:` section."
            )
        self.participations = {int(k): int(v) for k, v in state["participations"].items()}
