"""Client-level DP without rounds: one Gaussian per flush a client can contribute to, no amplification.

A buffer flush releases ``S = sum_{k in buffer} w_k clip(Delta_k) + N(0, (z C)^2 I)`` with weights
``w_k = s(tau_k) <= 1`` (the strategy's staleness weight) and the fixed denominator ``K``. Who is in a buffer
is decided by the trace (who is online, how fast each device is) and the run's seed, never by a client's
data: the engine's schedule is a public, data-independent function. Under the *zero-out* neighbouring
relation (one client's data replaced by data whose update is zero; the device and its timing stay: Kairouz,
McMahan, Song, Thakkar, Thakurta & Xu 2021, "Practical and Private (Deep) Learning without Sampling or
Shuffling", Sec. 2), one client changes each flush it is part of by at most ``C`` in L2 and no other flush at
all. Each such flush is a Gaussian mechanism of multiplier ``z``; the flushes are adaptively composed (every
model is post-processing of the previous outputs). So client ``k`` spends ``Gaussian(z)`` composed ``P_k``
times, and the run spends the worst client's ``Gaussian(z)^(max_participations)``: dp-accounting's
``GaussianDpEvent(z)`` self-composed, which is :func:`lightfed.privacy.accounting.epsilon_for` with the
``"full"`` scheme. No sampling amplification is claimed: the trace does not give random, data-independent
*and secret* sampling, so none may be claimed.

What this needs, and what is refused (:func:`check_timed_privacy`):

* the engine caps participations (:class:`~lightfed.simtime.buffered.BufferedAsync` never starts a visit of
  a client at the cap, :class:`~lightfed.simtime.policies.SyncRounds` never selects one), and a client is
  never twice in one buffer;
* a visit's duration must not depend on the client's data: ``trainer.local_steps`` fixed (with epochs, the
  step count, hence the arrival time, would reveal the client's number of examples);
* the strategy's weight must be public and at most 1 (uniform, or a staleness weight), never ``n_k``;
* any other privacy mechanism is refused under a timed run: its accountant derives amplification from
  ``trainer.sampler``, which no longer decides who takes part.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Sequence
from typing import Any, Literal

from lightfed.checks import check_int, require
from lightfed.messages import RunInfo
from lightfed.privacy.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    AccountantName,
    RoundAccountant,
    SamplingScheme,
    calibrate_noise_multiplier,
    default_delta,
)
from lightfed.privacy.base import PrivacyMechanism
from lightfed.privacy.central import DPFixedClipping, check_delta, check_dp_strategy
from lightfed.registry import PRIVACY


@PRIVACY.register("DPCappedParticipation")
class DPCappedParticipation(DPFixedClipping):
    """Client-level DP per flush (clip each update, Gaussian noise on the flush's sum), no amplification.

    Args:
        clip_norm: ``C``, the L2 bound of each update.
        noise_multiplier: ``z`` (noise std on a flush's sum ``z C``). Give this or ``target_epsilon``.
        target_epsilon: Calibrate ``z`` so that ``max_participations`` flushes spend at most this epsilon.
        max_participations: ``P``, the most flushes any client may contribute to (the engine enforces it).
        delta: The delta of every reported epsilon; default ``1 / N^1.1``.
        clipping: ``"server"`` or ``"client"``.
        accountant: ``"pld"`` (default) or ``"rdp"``.
        pld_discretization: Grid width of the PLD accountant.
        verbose: Print the privacy plan before training.
    """

    def __init__(
        self,
        clip_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        max_participations: int = 1,
        delta: float | None = None,
        clipping: Literal["server", "client"] = "server",
        accountant: AccountantName = "pld",
        pld_discretization: float = DEFAULT_PLD_DISCRETIZATION,
        verbose: bool = True,
    ) -> None:
        super().__init__(
            clip_norm=clip_norm, noise_multiplier=noise_multiplier, target_epsilon=target_epsilon,
            delta=delta, clipping=clipping, accountant=accountant, pld_discretization=pld_discretization,
            verbose=verbose,
        )
        self.max_participations = check_int(max_participations, "privacy.init_args.max_participations", 1)
        self.participations: Counter[int] = Counter()
        #: Set by the clock that enforces the cap (:func:`check_timed_privacy`); else refused.
        self.enforced_by: str | None = None

    def setup(self, info: RunInfo) -> None:
        num_clients, sampler, rounds, strategy, seed = (
            info.num_clients, info.sampler, info.rounds, info.strategy, info.seed
        )
        check_dp_strategy(strategy, type(self).__name__, weighted_ok=False)
        check_delta(self.delta, num_clients)
        self.seed, self.rounds, self.num_clients = seed, rounds, num_clients
        k = max(1, int(round(sampler.expected_cohort(num_clients))))
        # Every flush is an unsampled Gaussian (kind "full" = GaussianDpEvent(z)) over a cohort of K.
        self.scheme = SamplingScheme("full", k, 1.0, k)
        self.delta_used = self.delta if self.delta is not None else default_delta(num_clients)
        z = self.noise_multiplier
        if z is None:
            assert self.target_epsilon is not None
            z = calibrate_noise_multiplier(
                self.target_epsilon, self.delta_used, self.scheme, self.max_participations,
                self.accountant_name, self.pld_discretization,
            )
        self.z = float(z)
        self.accountant = RoundAccountant(
            self.z, self.scheme, self.delta_used, self.accountant_name, self.pld_discretization
        )
        self.denominator = float(k)
        self.update_noise_multiplier = self.z
        if self.verbose:
            print(self.plan(), flush=True)

    def plan(self) -> str:
        assert self.accountant is not None and self.scheme is not None
        target = self.target_epsilon
        how = f"calibrated for target epsilon {target}" if target is not None else "given"
        return "\n".join([
            f"[lightfed privacy] {type(self).__name__}: client-level DP per flush (zero-out one client), "
            f"no amplification",
            f"  flush        : K = {self.scheme.cohort} updates, fixed denominator K, weights s(tau) <= 1",
            f"  clipping     : {self.clipping}-side, C = {self.clip_norm:.4g}",
            f"  noise        : z = {self.z:.4g} ({how}); std on the flush's sum z*C",
            f"  cap          : each client in at most {self.max_participations} flushes (clock-enforced)",
            f"  accountant   : {self.accountant_name.upper()}, GaussianDpEvent(z) composed per client",
            f"  delta        : {self.delta_used:.3g}",
            f"  worst client : epsilon {self.accountant.epsilon(self.max_participations):.4g} after "
            f"{self.max_participations} participations",
        ])

    def client_weight(self, update: Any, strategy_weight: float) -> float:
        """The strategy's public weight, capped at 1 so one client moves the sum by at most ``C``."""
        return min(float(strategy_weight), 1.0)

    def can_run_round(self, round_idx: int) -> bool:
        require(
            self.enforced_by is not None,
            "privacy: DPCappedParticipation composes at most max_participations flushes per client, which "
            "only an engine that enforces the cap may promise; use it with trainer.clock: "
            "lightfed.simtime.BufferedAsync (or SyncRounds).",
        )
        return True

    def after_round(self, round_idx: int, cohort: Sequence[int]) -> dict[str, float]:
        assert self.accountant is not None
        self.participations.update(cohort)
        worst = max(self.participations.values(), default=0)
        if worst > self.max_participations:  # the clock broke its promise: fail closed, never a false epsilon
            raise RuntimeError(
                f"flush {round_idx}: a client contributed to {worst} flushes, over "
                f"privacy.init_args.max_participations={self.max_participations}; the reported epsilon would "
                f"not hold."
            )
        self.accountant.rounds = worst
        return {
            "epsilon": self.accountant.epsilon(),
            "delta": self.accountant.delta,
            "noise_multiplier": self.z,
            "clip_norm": self.clip_norm,
            "participations_max": float(worst),
        }

    def state_dict(self) -> dict[str, Any]:
        """The accountant (its ``rounds`` are the worst client's flushes, not the run's rounds) and the counts.

        Stored as ``composed`` and ``flush_participations``: the generic resume checks read ``accountant`` as
        rounds run and ``participations`` as the sampler's draws, neither of which holds in a timed run.
        """
        assert self.accountant is not None
        return {
            "mechanism": type(self).__name__, "composed": self.accountant.state_dict(),
            "flush_participations": {int(c): int(n) for c, n in sorted(self.participations.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`; refuse counts whose worst client is not what the accountant composed.

        Raises:
            ValueError: no state, another mechanism, or an accountant inconsistent with the counts.
        """
        if state.get("mechanism") != type(self).__name__:
            raise ValueError(
                f"the checkpoint was written by privacy mechanism {state.get('mechanism')!r}, this run uses "
                f"{type(self).__name__!r}; resume with the same `privacy:` section."
            )
        if "composed" not in state:
            raise ValueError(
                "the checkpoint's DPCappedParticipation state predates resumable timed runs (no per-client "
                "flush counts); start the timed run from round 0."
            )
        assert self.accountant is not None
        self.accountant.load_state_dict(state["composed"])
        counts = Counter({int(k): int(v) for k, v in state["flush_participations"].items()})
        worst = max(counts.values(), default=0)
        if worst != self.accountant.rounds or worst > self.max_participations:
            raise ValueError(
                f"the checkpoint is inconsistent: its accountant composed {self.accountant.rounds} flushes for the "
                f"worst client, its counts say {worst} (cap {self.max_participations}); resuming would report a "
                f"wrong epsilon. Resume from another checkpoint."
            )
        self.participations = counts


def check_timed_privacy(privacy: PrivacyMechanism | None, local_steps: int | None, clock: Any) -> None:
    """Refuse privacy under a timed run unless its guarantee holds (module docstring); bind the enforcer.

    Raises:
        ValueError: naming why (a mechanism that claims amplification, a data-dependent visit duration, a
            clock that does not enforce the participation cap).
    """
    if privacy is None:
        return
    name, clock_name = type(privacy).__name__, type(clock).__name__
    if not isinstance(privacy, DPCappedParticipation):
        raise ValueError(
            f"privacy {name} under trainer.clock: its accountant takes its sampling amplification from "
            f"trainer.sampler, but in a timed run the trace decides who takes part (who is online, who "
            f"finishes first): the amplification would not hold. Use privacy: {{class_path: "
            f"lightfed.simtime.DPCappedParticipation}} (per-client composition, no amplification)."
        )
    if not getattr(clock, "caps_participations", False):
        raise ValueError(
            f"privacy DPCappedParticipation needs an engine that caps each client's participations; "
            f"trainer.clock {clock_name} does not. Use lightfed.simtime.BufferedAsync or SyncRounds."
        )
    if local_steps is None:
        raise ValueError(
            "privacy DPCappedParticipation under trainer.clock: with local epochs a visit's duration "
            "(steps x step time) reveals the client's number of examples through its arrival time; set "
            "trainer.local_steps."
        )
    privacy.enforced_by = clock_name


__all__ = ["DPCappedParticipation", "check_timed_privacy"]
