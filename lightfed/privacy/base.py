"""The privacy-mechanism contract: post-processing of client updates and of the round's sums.

A mechanism wraps the aggregation of any strategy whose aggregate is a mean: it may change each
client's update on the client (clipping, local noise), choose the weights, and change the round's sums
on the server (central noise, a fixed denominator); an accountant tracks the privacy spent. Every hook
defaults to "do nothing", so a mechanism implements only what it changes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from lightfed.client import LocalTrainer
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.sampling import ClientSampler
from lightfed.strategy import Strategy


def check_positive(value: float, field: str) -> None:
    """Raise a config error naming ``privacy.init_args.<field>`` unless ``value > 0``."""
    if not value > 0:
        raise ValueError(f"privacy.init_args.{field} must be > 0, got {value}.")


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


class PrivacyMechanism:
    """Base class of ``privacy:`` plugins (registry group ``lightfed.privacy``)."""

    def setup(
        self,
        *,
        num_clients: int,
        sampler: ClientSampler,
        rounds: int,
        strategy: Strategy,
        seed: int,
        client_num_examples: Sequence[int] | None = None,
    ) -> None:
        """Validate the combination (refuse robust strategies), calibrate noise, print the plan.

        ``client_num_examples`` (training examples per client, when the trainer passes it) lets the
        weighted estimator compute its fixed denominator ``q W``.
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
        """On the server, after summation (central noise, fixed denominator)."""
        return aggregate

    def can_run_round(self, round_idx: int) -> bool:
        """``False`` stops training cleanly before ``round_idx`` (budget ``max_epsilon`` would be exceeded)."""
        return True

    def after_round(self, round_idx: int, num_sampled: int) -> dict[str, float]:
        """Account for the round; return metrics to log under ``privacy/``."""
        return {}

    def wrap_local_trainer(self, local: LocalTrainer) -> LocalTrainer:
        """Return the local trainer clients use (sample-level DP-SGD returns its own subclass)."""
        return local

    def state_dict(self) -> dict[str, Any]:
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""
