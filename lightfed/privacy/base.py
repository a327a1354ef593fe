"""The privacy-mechanism contract: post-processing before the round's sum and after it.

A mechanism wraps the aggregation of any strategy whose aggregate is a mean, in the fixed order of
:mod:`lightfed.server` (Apple pfl-research's ``Postprocessor`` design):

* **before the sum**, per update: :meth:`~PrivacyMechanism.client_update` on the client (clipping, local
  noise), :meth:`~PrivacyMechanism.client_weight`, :meth:`~PrivacyMechanism.server_update` on the server
  (server-side clipping). A per-client fact the mechanism needs later (a clip bit) is written into the
  update's ``counts``, so it is summed, all-reduced and secure-summed with the update; a mechanism never
  counts anything itself, so nothing depends on which process saw which client;
* **after the sum**: :meth:`~PrivacyMechanism.process_aggregate` (central noise, a fixed denominator, the
  released client count), then :meth:`~PrivacyMechanism.after_round` with the whole cohort (accounting).

:meth:`~PrivacyMechanism.noise_plan` publishes what secure aggregation needs to know (a typed
:class:`NoisePlan`, never attributes read by name). Every hook defaults to "do nothing".
"""

from __future__ import annotations

import inspect
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

from lightfed import checks
from lightfed.client import LocalTrainer
from lightfed.messages import ClientUpdate, RoundAggregate, RunInfo


def check_positive(value: float, field: str) -> None:
    """Raise a config error naming ``privacy.init_args.<field>`` unless ``value > 0``."""
    checks.check_positive(value, f"privacy.init_args.{field}")


def check_noise_budget(
    *,
    noise_multiplier: float | None,
    target_epsilon: float | None,
    delta: float | None,
    accountant: str,
    max_epsilon: float | None = None,
    zero_noise_ok: bool = True,
) -> None:
    """The checks every accounted mechanism makes of its noise and budget arguments, with the field named.

    Exactly one of ``noise_multiplier`` (>= 0, or > 0 unless ``zero_noise_ok``) and ``target_epsilon``
    (> 0); ``delta`` in (0, 1) when given; ``max_epsilon`` > 0 when given; accountant ``pld`` or ``rdp``.
    """
    if (noise_multiplier is None) == (target_epsilon is None):
        raise ValueError(
            f"give exactly one of privacy.init_args.noise_multiplier and target_epsilon (got "
            f"noise_multiplier={noise_multiplier}, target_epsilon={target_epsilon})."
        )
    if noise_multiplier is not None and not (noise_multiplier >= 0 if zero_noise_ok else noise_multiplier > 0):
        bound = ">= 0" if zero_noise_ok else "> 0"
        raise ValueError(f"privacy.init_args.noise_multiplier must be {bound}, got {noise_multiplier}.")
    if target_epsilon is not None:
        check_positive(target_epsilon, "target_epsilon")
    if delta is not None and not 0 < delta < 1:
        raise ValueError(f"privacy.init_args.delta must be in (0, 1), got {delta}.")
    if max_epsilon is not None:
        check_positive(max_epsilon, "max_epsilon")
    if accountant not in ("pld", "rdp"):
        raise ValueError(f"privacy.init_args.accountant must be 'pld' or 'rdp', got {accountant!r}.")


@dataclass(frozen=True)
class NoisePlan:
    """What a mechanism clips and where it adds noise, for the parts that compose with it.

    Attributes:
        noise_multiplier: ``z`` of the Gaussian noise on the round's update *sum* (std ``z * clip_norm``);
            0 when the mechanism adds none there (local DP and DP-SGD noise each client's own report).
        clip_norm: The L2 bound of one client's contribution this round (``None``: not clipped).
        placement: Where the mechanism's noise is added: ``"server"`` (the trusted server noises the sum),
            ``"distributed"`` (each client adds a share before secure aggregation masks it), ``"client"``
            (each client's own report or training), ``"none"``.
        clipping: Who clips: ``"server"`` (needs individual updates), ``"client"``, or ``"none"``.
    """

    noise_multiplier: float = 0.0
    clip_norm: float | None = None
    placement: Literal["none", "server", "distributed", "client"] = "none"
    clipping: Literal["none", "server", "client"] = "none"


_RUN_INFO_FIELDS = frozenset(("num_clients", "sampler", "rounds", "strategy", "seed", "client_num_examples"))


def _refuse_keyword_setup(cls: type) -> None:
    """Refuse, when the class is defined, a ``setup`` written against the old keyword signature.

    ``setup(self, *, num_clients, sampler, rounds, strategy, seed, client_num_examples=None)`` (lightfed
    0.1.0) became ``setup(self, info: RunInfo)``. A shim would keep only mechanisms that define ``setup``
    themselves working; one that subclasses a built-in and calls ``super().setup(num_clients=...)`` would
    still fail, later and less clearly. So the plugin fails at import, naming the one-line fix.
    """
    setup = cls.__dict__.get("setup")
    if setup is None or not callable(setup):
        return
    try:
        names = list(inspect.signature(setup).parameters)
    except (TypeError, ValueError):
        return
    old = [name for name in names if name in _RUN_INFO_FIELDS]
    if old:
        raise TypeError(
            f"lightfed: error: {cls.__qualname__}.setup takes the keywords {', '.join(old)}; "
            f"PrivacyMechanism.setup now takes one lightfed.messages.RunInfo: write "
            f"`def setup(self, info: RunInfo) -> None` and read info.num_clients, info.sampler, info.rounds, "
            f"info.strategy, info.seed, info.client_num_examples."
        )


class PrivacyMechanism:
    """Base class of ``privacy:`` plugins (registry group ``lightfed.privacy``)."""

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        _refuse_keyword_setup(cls)

    def setup(self, info: RunInfo) -> None:
        """Validate the combination (refuse robust strategies), calibrate noise, print the plan.

        ``info`` holds the run's facts (population, sampler, rounds, strategy, seed, and the clients' sizes
        when the trainer passes them: the weighted estimator's fixed denominator ``q W`` needs them).
        """

    def client_update(self, update: ClientUpdate, round_idx: int) -> ClientUpdate:
        """On the client, before the update leaves it (client-side clipping, local DP noise)."""
        return update

    def client_weight(self, update: ClientUpdate, strategy_weight: float) -> float:
        """The update's weight in the round's sums (DP: uniform or capped, never raw example counts)."""
        return strategy_weight

    def server_update(self, update: ClientUpdate, round_idx: int) -> ClientUpdate:
        """On the server, before summation (server-side clipping)."""
        return update

    def process_aggregate(self, aggregate: RoundAggregate, round_idx: int) -> RoundAggregate:
        """On the server, after summation (central noise, fixed denominator, the released count).

        Everything in the returned aggregate reaches the strategy, so it must all be accounted for: the
        realised client count, the weight sum and every count are either noised or replaced by public values.
        """
        return aggregate

    def noise_plan(self) -> NoisePlan:
        """Clip, noise multiplier and placement of the coming round (read by secure aggregation)."""
        return NoisePlan()

    def can_run_round(self, round_idx: int) -> bool:
        """``False`` stops training cleanly before ``round_idx`` (budget ``max_epsilon`` would be exceeded)."""
        return True

    def after_round(self, round_idx: int, cohort: Sequence[int]) -> dict[str, float]:
        """Account for the round; return metrics to log under ``privacy/``.

        ``cohort`` is the whole round's cohort, the same on every process (never one process's shard).
        """
        return {}

    def wrap_local_trainer(self, local: LocalTrainer) -> LocalTrainer:
        """Return the local trainer clients use (sample-level DP-SGD returns its own subclass)."""
        return local

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
