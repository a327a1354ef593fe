"""What runs alongside a client visit: the strategy's view of it and the module's logs.

* :class:`ClientContext` is what :class:`~lightfed.strategy.Strategy` client hooks see;
* :class:`LogSink` routes ``self.log`` while no Trainer is attached (the loop's capture, muting, vmap);
* :class:`Attached` sets module attributes for a block (``self.log``, ``self.trainer``).

What the user's LightningModule sees as ``self.trainer`` during a visit is in :mod:`lightfed.lightning_compat`.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor, nn

from lightfed.params import ParamSpec


class LogSink:
    """Stands in for ``LightningModule.log`` / ``log_dict`` while no Trainer is attached (subclasses: ``log``)."""

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def log_dict(self, dictionary: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        for k, v in dictionary.items():
            self.log(k, v, *args, **kwargs)

    def attach(self, module: nn.Module) -> Attached:
        """Route ``module.log`` and ``module.log_dict`` here for the block; restore what was attached before."""
        return Attached((module,), {"log": self.log, "log_dict": self.log_dict})


class Attached:
    """Set instance attributes of some modules for a ``with`` block, then restore what was there.

    A class rather than a generator context manager: it runs on every client visit, and costs ~1 us.
    """

    __slots__ = ("modules", "values", "saved")

    def __init__(self, modules: tuple[nn.Module, ...], values: dict[str, Any]) -> None:
        self.modules, self.values = modules, values

    def __enter__(self) -> Attached:
        self.saved = [{k: m.__dict__[k] for k in self.values if k in m.__dict__} for m in self.modules]
        for m in self.modules:
            m.__dict__.update(self.values)
        return self

    def __exit__(self, *exc: Any) -> None:
        for m, saved in zip(self.modules, self.saved):
            for k in self.values:
                m.__dict__.pop(k, None)
            m.__dict__.update(saved)


class MutedLog(LogSink):
    """Drops what the module logs (extra passes of a strategy that must not count as training metrics)."""

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        pass


MUTED = MutedLog()


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
        extras: Scratch space of the strategy for this visit (cached tensor lists, running sums); dropped
            when the visit ends (use :attr:`state` for what must persist).
        forward_context: Context manager of the run's precision for forward passes (autocast under
            ``bf16-mixed``); :meth:`training_loss` runs inside it.
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
    forward_context: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext

    def local_tensors(self) -> list[Tensor]:
        """The live payload tensors of the worker model (parameters carry gradients)."""
        return self.spec.tensors(self.module)

    def global_tensors(self) -> list[Tensor]:
        """Views of :attr:`global_params` shaped like :meth:`local_tensors`."""
        return self.spec.unflatten(self.global_params)

    def local_params(self) -> Tensor:
        """Flat copy of the current local payload."""
        return self.spec.flatten(self.local_tensors())

    def param_pairs(self) -> list[tuple[Tensor, Tensor]]:
        """``(live parameter, its global value)`` for every payload *parameter* (buffers excluded).

        What a proximal term ``||w - w_global||^2`` or a gradient correction runs over: buffers (BatchNorm
        statistics) travel in the payload but have no gradient.
        """
        pairs = zip(self.local_tensors(), self.global_tensors(), self.spec.is_buffer)
        return [(local, glob) for local, glob, is_buffer in pairs if not is_buffer]

    def training_loss(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The module's ``training_step`` loss on ``batch``, with the module's ``self.log`` muted.

        For strategies that run extra passes over the client's data (q-FedAvg's loss at the global model,
        Ditto's personal model) without counting them in the client's logged training metrics. Returns
        ``None`` when ``training_step`` skips the batch (returns ``None``).
        """
        with MUTED.attach(self.module), self.forward_context():
            out = self.module.training_step(batch, batch_idx)
        return step_loss(out)


def step_loss(out: Any) -> Tensor | None:
    """The loss in what ``training_step`` returned (a tensor, a dict with ``"loss"``, or ``None``)."""
    if out is None:
        return None
    return out["loss"] if isinstance(out, dict) else out
