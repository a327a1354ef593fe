"""What runs alongside a client visit: the strategy's view of it, the module's ``self.trainer`` and its logs.

* :class:`ClientContext` is what :class:`~lightfed.strategy.Strategy` client hooks see;
* :class:`ClientTrainer` is what the user's LightningModule sees as ``self.trainer`` during a visit (a small
  documented stand-in: lightfed builds no ``lightning.Trainer`` per client);
* :class:`LogSink` routes ``self.log`` while no Trainer is attached (the loop's capture, muting, vmap).
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import Any

import torch
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


# ---------------------------------------------------------------------------------------- self.trainer
class TrainerStandInError(RuntimeError):
    """The module asked ``self.trainer`` for something lightfed's per-client stand-in does not have."""


class GradientClipper:
    """``self.trainer.precision_plugin`` of the stand-in: what ``LightningModule.clip_gradients`` calls.

    Clips exactly as Lightning's ``Precision.clip_gradients``: every parameter of the optimizer's groups, by
    total 2-norm (``torch.nn.utils.clip_grad_norm_``) or by value (``clip_grad_value_``); ``clip_val <= 0``
    does nothing.
    """

    def clip_gradients(self, optimizer: Any, clip_val: float = 0.0, gradient_clip_algorithm: Any = "norm") -> None:
        if not clip_val or clip_val <= 0:
            return
        params = [p for group in optimizer.param_groups for p in group["params"]]
        if str(getattr(gradient_clip_algorithm, "value", gradient_clip_algorithm)).lower() == "value":
            torch.nn.utils.clip_grad_value_(params, clip_value=clip_val)
        else:
            torch.nn.utils.clip_grad_norm_(params, clip_val)


@dataclass
class SchedulerConfig:
    """One LR scheduler of ``configure_optimizers``, with Lightning's ``interval`` / ``frequency`` keys."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None


class ClientTrainer:
    """What ``self.trainer`` is inside a client visit: a small stand-in for ``lightning.Trainer``.

    lightfed trains each client visit without a ``lightning.Trainer`` (building one costs ~10x a small
    client's training). This object carries what a module typically reads; any other attribute raises
    :class:`TrainerStandInError` naming it. ``self.current_epoch`` and ``self.global_step`` of the module
    read :attr:`current_epoch` and :attr:`global_step` through it.

    Attributes:
        current_epoch: The local epoch of this visit (0-based; every visit starts at 0).
        global_step: Optimizer steps taken in this visit.
        max_epochs: ``local_epochs`` (``None`` when ``local_steps`` is set).
        max_steps: ``local_steps`` (``-1`` when unset).
        estimated_stepping_batches: Optimizer steps this visit will take.
        accumulate_grad_batches: Batches per optimizer step.
        gradient_clip_val: The loop's clip value (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        precision_plugin: What ``LightningModule.clip_gradients`` clips with (:class:`GradientClipper`).
        optimizers: The visit's optimizer, in a list.
        lr_scheduler_configs: The visit's schedulers (:class:`SchedulerConfig`, ``.scheduler`` like Lightning's).
        training / validating / testing / sanity_checking: The stage (sanity checking never happens).
        logger / loggers: ``None`` / ``[]``: a client logs through ``self.log`` (captured as client metrics).
        model: The worker module (what Lightning's default ``on_validation_model_eval`` switches to eval).
        client_id / round_idx: Which client and round this visit is (lightfed's own; not on a real Trainer).
    """

    _FIELDS = (
        "current_epoch", "global_step", "max_epochs", "max_steps", "estimated_stepping_batches",
        "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm", "precision_plugin",
        "optimizers", "lr_scheduler_configs", "training", "validating", "testing", "sanity_checking",
        "logger", "loggers", "model", "client_id", "round_idx",
    )

    def __init__(
        self, *, max_epochs: int | None, max_steps: int, accumulate_grad_batches: int,
        gradient_clip_val: float | None, gradient_clip_algorithm: str,
    ) -> None:
        self.current_epoch = 0
        self.global_step = 0
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.estimated_stepping_batches = 0
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.precision_plugin = GradientClipper()
        self.optimizers: list[Any] = []
        self.lr_scheduler_configs: list[SchedulerConfig] = []
        self.training = True
        self.validating = self.testing = self.sanity_checking = False
        self.logger = None
        self.loggers: list[Any] = []
        self.model: nn.Module | None = None
        self.client_id = -1
        self.round_idx = -1
        self.touched = False

    def __getattr__(self, name: str) -> Any:  # only called for attributes the stand-in does not have
        if name.startswith("__"):
            raise AttributeError(name)
        raise TrainerStandInError(
            f"self.trainer.{name}: lightfed trains each client visit without a lightning.Trainer, and its "
            f"stand-in (lightfed.context.ClientTrainer) has only {', '.join(self._FIELDS)}. Read what the module "
            f"needs from its own attributes or hyper-parameters instead (docs/lightning_contract.md)."
        )

    def attached(self, modules: tuple[nn.Module, ...]) -> Attached:
        """``module.trainer`` is this stand-in for the block (``modules``: the LightningModules of the model)."""
        return Attached(modules, {"_trainer": self})


class RecordingTrainer(ClientTrainer):
    """A :class:`ClientTrainer` that remembers whether anything read it (``configure_optimizers`` probes)."""

    def __getattribute__(self, name: str) -> Any:
        if name in ClientTrainer._FIELDS:
            object.__setattr__(self, "touched", True)
        return super().__getattribute__(name)
