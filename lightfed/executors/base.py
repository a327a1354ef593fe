"""Executors: how a round's cohort gets trained on this process.

The sequential executor trains clients one after another on one reused worker module. Other executors
(vectorised training of a whole cohort with ``torch.func``) implement the same :meth:`Executor.run`.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from torch import Tensor

from lightfed.client import LocalTrainer
from lightfed.data.client_data import ClientData
from lightfed.messages import ClientUpdate
from lightfed.registry import EXECUTORS


class Executor:
    """Trains a list of clients from the same global weights and yields their updates."""

    def setup(self, local: LocalTrainer) -> None:
        """Receive the process's :class:`LocalTrainer` (module, spec, strategy hooks, precision)."""
        self.local = local

    def run(
        self,
        round_idx: int,
        clients: list[int],
        data: Callable[[int], ClientData],
        global_params: Tensor,
        payload: dict[str, Any],
        states: Callable[[int], dict[str, Tensor]],
    ) -> Iterator[ClientUpdate]:
        raise NotImplementedError


@EXECUTORS.register("sequential")
class SequentialExecutor(Executor):
    """One client after another on one reused model: the plain-PyTorch-loop baseline, minus nothing."""

    def run(
        self,
        round_idx: int,
        clients: list[int],
        data: Callable[[int], ClientData],
        global_params: Tensor,
        payload: dict[str, Any],
        states: Callable[[int], dict[str, Tensor]],
    ) -> Iterator[ClientUpdate]:
        for cid in clients:
            yield self.local.fit_client(cid, round_idx, data(cid), global_params, states(cid), payload)


def resolve_executor(executor: Executor | str) -> Executor:
    """``trainer.executor``: an instance, ``"sequential"``, or a registered name (``"vmap"``)."""
    if isinstance(executor, Executor):
        return executor
    if executor == "sequential":
        return SequentialExecutor()
    try:  # the package lightfed.executors, imported before this module, registered the built-in ones (vmap)
        return EXECUTORS.create(executor)
    except KeyError as err:
        raise ValueError(f"trainer.executor: {err.args[0]}") from None
