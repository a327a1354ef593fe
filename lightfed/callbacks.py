"""The trainer's callback seam: code that runs around the federated loop without the loop knowing it.

As Lightning's ``Callback``, every hook does nothing by default, so a callback overrides only what it
needs. Callbacks get the trainer (read what you need: ``log_dir``, ``is_global_zero``, ``global_params``,
``history``) and are listed in ``trainer.callbacks`` (a config can add its own, e.g. early stopping on a
round metric). A callback with state implements ``state_dict`` / ``load_state_dict`` and is checkpointed
under its :attr:`Callback.state_key` (the class name by default; as in Lightning, a callback that can appear
twice with different settings puts them in its key, e.g. with :meth:`Callback._generate_state_key`; two
callbacks that still share a key are told apart by their order, ``Key``, ``Key#2``, ...).
A callback reads what the trainer owns (``history``, ``global_params``), never what another callback wrote.

Two hooks reach into a round:

* :meth:`Callback.extra_updates` adds updates to the round on global rank 0 (an audit's canary clients).
  They travel the same server path as every client's update (privacy, the sum, secure aggregation), so
  an audit measures what the configured pipeline releases;
* :meth:`Callback.on_round_end` sees the round's :class:`~lightfed.messages.RoundResult` (and may add
  metrics to it) after the strategy step, before logging and checkpointing.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from lightfed.messages import ClientUpdate, RoundResult

if TYPE_CHECKING:  # the trainer imports this module; callbacks only read its attributes
    from lightfed.trainer import FederatedTrainer


class Callback:
    """Base class of trainer callbacks; every hook is a no-op."""

    @property
    def state_key(self) -> str:
        """The key of this callback's state in a checkpoint; unique among the trainer's callbacks."""
        return self.__class__.__qualname__

    def _generate_state_key(self, **kwargs: Any) -> str:
        """A :attr:`state_key` that tells instances apart by ``kwargs`` (Lightning's convention)."""
        return f"{self.__class__.__qualname__}{kwargs!r}"

    def setup(self, trainer: FederatedTrainer) -> None:
        """After the trainer's set-up (model, data, strategy, privacy ready), before a checkpoint is restored."""

    def on_fit_start(self, trainer: FederatedTrainer) -> None:
        """Before the first round of ``fit`` (after a resume)."""

    def on_round_start(self, trainer: FederatedTrainer, round_idx: int, cohort: list[int]) -> None:
        """Before the round's clients train."""

    def extra_updates(self, trainer: FederatedTrainer, round_idx: int, cohort: list[int]) -> Iterable[ClientUpdate]:
        """Updates to add to the round (called on global rank 0 only); they go through the server path."""
        return ()

    def on_round_end(self, trainer: FederatedTrainer, result: RoundResult) -> None:
        """After the strategy step; ``result.metrics`` may be extended (logged under the names given)."""

    def on_fit_end(self, trainer: FederatedTrainer) -> None:
        """After the last round, its checkpoint and the export."""

    def state_dict(self) -> dict[str, Any]:
        """State for checkpoints."""
        return {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`."""


__all__ = ["Callback"]
