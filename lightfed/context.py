"""What a strategy's client-side hooks see while a client trains."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightfed.params import ParamSpec


@dataclass
class ClientContext:
    """One client visit, as seen by :class:`~lightfed.strategy.Strategy` client hooks.

    Attributes:
        client_id: The client being trained.
        round_idx: The current round (0-based).
        module: The worker's LightningModule, holding the client's local weights.
        spec: The payload layout.
        global_params: Flat payload of the global model at the start of the round (read-only).
        payload: What the strategy sends every client this round (:meth:`Strategy.client_payload`).
        state: This client's persistent state (``{name: tensor}``); the simulation keeps it between the
            rounds the client takes part in and checkpoints it. Mutate it in place.
        num_examples: Training examples of this client.
        optimizer: The local optimizer (set once training starts).
        step: Optimizer steps taken so far in this visit.
        batches: ``batches(epoch)`` yields this client's training batches for a local epoch, in the
            visit's seeded order; for strategies that run extra local passes (Ditto).
        make_optimizer: Builds a fresh optimizer from the module's ``configure_optimizers`` over given
            parameters.
    """

    client_id: int
    round_idx: int
    module: nn.Module
    spec: ParamSpec
    global_params: Tensor
    payload: dict[str, Any]
    state: dict[str, Tensor]
    num_examples: int
    batches: Callable[[int], Iterator[Any]]
    make_optimizer: Callable[[], Any]
    optimizer: Any = None
    step: int = 0
    extras: dict[str, Any] = field(default_factory=dict)

    def local_tensors(self) -> list[Tensor]:
        """The live payload tensors of the worker model (parameters carry gradients)."""
        return self.spec.tensors(self.module)

    def global_tensors(self) -> list[Tensor]:
        """Views of :attr:`global_params` shaped like :meth:`local_tensors`."""
        return self.spec.unflatten(self.global_params)

    def local_params(self) -> Tensor:
        """Flat copy of the current local payload."""
        return self.spec.flatten(self.local_tensors())
