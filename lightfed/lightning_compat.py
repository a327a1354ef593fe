"""What a LightningModule sees of Lightning during a client visit, without a ``lightning.Trainer``.

The client loop (:mod:`lightfed.client`) builds no Trainer per visit. This module holds what stands in for
one (which hooks run, and what is refused, is :mod:`lightfed.lightning_hooks`):

* :class:`ClientTrainer`: ``self.trainer`` during a visit, with :class:`ClientStrategy` as its
  ``strategy`` (what ``self.optimizers()``, ``manual_backward`` and ``LightningOptimizer.step`` call);
* :class:`LogCapture`: ``self.log`` during a visit (batch-size-weighted means become the client's metrics);
* :func:`batch_size_of` and :func:`to_device` for batches of any structure (a tensor, a tuple, a dict, a
  ``BatchEncoding``, nested), with Lightning's own utilities behind a fast path for tuples of tensors.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightfed.context import Attached, LogSink
from lightfed.lightning_hooks import SchedulerConfig

__all__ = [
    "ClientStrategy", "ClientTrainer", "GradientClipper", "LogCapture", "RecordingTrainer", "TrainerStandInError",
    "batch_size_of", "to_device",
]


# ---------------------------------------------------------------------------------------- batches
def batch_size_of(batch: Any) -> int:
    """Examples in ``batch``: the length of its first tensor, as Lightning's ``extract_batch_size``.

    A tuple whose first item is a tensor (lightfed's in-memory batches) and a bare tensor take a fast path;
    anything else (a dict, a ``BatchEncoding``, nested lists) goes through Lightning's own function. A batch
    holding no tensor counts as one example.
    """
    if type(batch) is tuple and batch and isinstance(batch[0], Tensor):
        first = batch[0]
        return len(first) if first.ndim else 1
    if isinstance(batch, Tensor):
        return len(batch) if batch.ndim else 1
    if not batch and isinstance(batch, (list, tuple, dict)):
        return 0
    from lightning.pytorch.utilities.data import extract_batch_size
    from lightning.pytorch.utilities.exceptions import MisconfigurationException

    try:
        return extract_batch_size(batch)
    except (MisconfigurationException, RecursionError):
        return 1


def to_device(batch: Any, device: torch.device) -> Any:
    """``batch`` with every tensor in it moved to ``device`` (Lightning's ``move_data_to_device``).

    Dicts, ``BatchEncoding`` (its ``.to``), dataclasses, named tuples and nested lists keep their type.
    """
    from lightning.fabric.utilities.apply_func import move_data_to_device

    return move_data_to_device(batch, device)


# ---------------------------------------------------------------------------------------- self.log
class LogCapture(LogSink):
    """The client loop's log sink: what a visit's steps log becomes the client's metrics.

    Values are accumulated on their device (no host sync per step) and averaged over batches weighted by
    batch size; a logged torchmetrics ``Metric`` is computed once at the end and reset.
    """

    def __init__(self) -> None:
        self.sums: dict[str, Tensor] = {}
        self.weights: dict[str, float] = {}
        self.metrics: dict[str, Any] = {}
        self.batch_size = 1

    def log(self, name: str, value: Any, *args: Any, batch_size: int | None = None, **kwargs: Any) -> None:
        if hasattr(value, "compute") and hasattr(value, "reset"):  # torchmetrics.Metric
            self.metrics[name] = value
            return
        w = float(batch_size or self.batch_size)
        v = value.detach().float() if isinstance(value, Tensor) else torch.tensor(float(value))
        self.sums[name] = self.sums[name] + v * w if name in self.sums else v * w
        self.weights[name] = self.weights.get(name, 0.0) + w

    def results(self) -> dict[str, float]:
        out = {k: float(s) / self.weights[k] for k, s in self.sums.items()}
        for k, m in self.metrics.items():
            out[k] = float(m.compute())
            m.reset()
        return out


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


class ClientStrategy:
    """``self.trainer.strategy`` of the stand-in: what ``self.optimizers()``, ``manual_backward`` and a
    ``LightningOptimizer``'s ``step`` call.

    Args:
        backward: The loop's backward (``on_before_backward``, the precision's backward, ``on_after_backward``).
        step: The loop's optimizer step for manual optimization (``on_before_optimizer_step``, the step, the
            step count); ``None`` outside a visit.
    """

    def __init__(self, backward: Callable[..., None], step: Callable[[Optimizer], None]) -> None:
        self._backward, self._step = backward, step
        self.optimizers: list[Optimizer] = []
        self._wrapped: dict[int, Any] = {}
        self.lightning_module: nn.Module | None = None

    @property
    def _lightning_optimizers(self) -> list[Any]:
        """The visit's optimizers as ``LightningOptimizer`` (built once per optimizer object, on first use)."""
        from lightning.pytorch.core.optimizer import LightningOptimizer

        out = []
        for opt in self.optimizers:
            wrapped = self._wrapped.get(id(opt))
            if wrapped is None or wrapped._optimizer is not opt:
                wrapped = LightningOptimizer(opt)
                wrapped._strategy = self
                self._wrapped[id(opt)] = wrapped
            out.append(wrapped)
        return out

    def backward(self, closure_loss: Tensor, optimizer: Any = None, *args: Any, **kwargs: Any) -> Tensor:
        self._backward(closure_loss, *args, **kwargs)
        return closure_loss

    def optimizer_step(self, optimizer: Optimizer, closure: Callable[[], Any], model: Any = None, **kwargs: Any) -> Any:
        out = closure()
        self._step(optimizer)
        return out


class ClientTrainer:
    """What ``self.trainer`` is inside a client visit: a small stand-in for ``lightning.Trainer``.

    lightfed trains each client visit without a ``lightning.Trainer`` (building one costs ~10x a small
    client's training). This object carries what a module typically reads; any other attribute raises
    :class:`TrainerStandInError` naming it. ``self.current_epoch`` and ``self.global_step`` of the module
    read :attr:`current_epoch` and :attr:`global_step` through it. A visit is a one-process fit: ranks are 0.

    Attributes:
        current_epoch: The local epoch of this visit (0-based; every visit starts at 0).
        global_step: Optimizer steps taken in this visit.
        max_epochs: ``local_epochs`` (``None`` when ``local_steps`` is set).
        max_steps: ``local_steps`` (``-1`` when unset).
        estimated_stepping_batches: Optimizer steps this visit will take (right from the first
            ``configure_optimizers`` call on).
        num_training_batches: Training batches per local epoch of this visit.
        accumulate_grad_batches: Batches per optimizer step.
        gradient_clip_val: The loop's clip value (``None``: no clipping).
        gradient_clip_algorithm: ``"norm"`` or ``"value"``.
        precision_plugin: What ``LightningModule.clip_gradients`` clips with (:class:`GradientClipper`).
        strategy: :class:`ClientStrategy` (``self.optimizers()``, ``manual_backward``).
        optimizers: The visit's optimizers.
        lr_scheduler_configs: The visit's schedulers (:class:`SchedulerConfig`, ``.scheduler`` like Lightning's).
        training / validating / testing / sanity_checking: The stage (sanity checking never happens).
        logger / loggers: ``None`` / ``[]``: a client logs through ``self.log`` (captured as client metrics).
        callbacks / progress_bar_callback: ``[]`` / ``None`` (``self.print`` prints).
        global_rank / local_rank / node_rank / world_size / num_nodes / num_devices / is_global_zero:
            0, 0, 0, 1, 1, 1, ``True``.
        model / lightning_module: The worker module.
        client_id / round_idx: Which client and round this visit is (lightfed's own; not on a real Trainer).
    """

    _FIELDS = (
        "current_epoch", "global_step", "max_epochs", "max_steps", "estimated_stepping_batches",
        "num_training_batches", "accumulate_grad_batches", "gradient_clip_val", "gradient_clip_algorithm",
        "precision_plugin", "strategy", "optimizers", "lr_scheduler_configs", "training", "validating", "testing",
        "sanity_checking", "logger", "loggers", "callbacks", "progress_bar_callback", "global_rank", "local_rank",
        "node_rank", "world_size", "num_nodes", "num_devices", "is_global_zero", "model", "lightning_module",
        "client_id", "round_idx",
    )

    def __init__(
        self, *, max_epochs: int | None, max_steps: int, accumulate_grad_batches: int,
        gradient_clip_val: float | None, gradient_clip_algorithm: str, strategy: ClientStrategy | None = None,
    ) -> None:
        self.current_epoch = 0
        self.global_step = 0
        self.max_epochs = max_epochs
        self.max_steps = max_steps
        self.estimated_stepping_batches = 0
        self.num_training_batches = 0
        self.accumulate_grad_batches = accumulate_grad_batches
        self.gradient_clip_val = gradient_clip_val
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.precision_plugin = GradientClipper()
        self.strategy = strategy
        self.lr_scheduler_configs: list[SchedulerConfig] = []
        self.training = True
        self.validating = self.testing = self.sanity_checking = False
        self.logger = None
        self.loggers: list[Any] = []
        self.callbacks: list[Any] = []
        self.progress_bar_callback = None
        self.global_rank = self.local_rank = self.node_rank = 0
        self.world_size = self.num_nodes = self.num_devices = 1
        self.is_global_zero = True
        self.model: nn.Module | None = None
        self.client_id = -1
        self.round_idx = -1
        self.touched = False

    @property
    def optimizers(self) -> list[Any]:
        return self.strategy.optimizers if self.strategy is not None else []

    @optimizers.setter
    def optimizers(self, value: list[Any]) -> None:
        if self.strategy is not None:
            self.strategy.optimizers = value

    @property
    def lightning_module(self) -> nn.Module | None:
        return self.model

    def __getattr__(self, name: str) -> Any:  # only called for attributes the stand-in does not have
        if name.startswith("__"):
            raise AttributeError(name)
        raise TrainerStandInError(
            f"self.trainer.{name}: lightfed trains each client visit without a lightning.Trainer, and its "
            f"stand-in (lightfed.lightning_compat.ClientTrainer) has only {', '.join(self._FIELDS)}. Read what the "
            f"module needs from its own attributes or hyper-parameters instead (docs/lightning_contract.md)."
        )

    def attached(self, modules: tuple[nn.Module, ...]) -> Attached:
        """``module.trainer`` is this stand-in for the block (``modules``: the LightningModules of the model)."""
        return Attached(modules, {"_trainer": self})

    def probe(self) -> RecordingTrainer:
        """A :class:`RecordingTrainer` with this one's values (the first ``configure_optimizers`` reads it)."""
        rec = RecordingTrainer.__new__(RecordingTrainer)
        object.__getattribute__(rec, "__dict__").update(self.__dict__)
        object.__setattr__(rec, "touched", False)
        return rec


class RecordingTrainer(ClientTrainer):
    """A :class:`ClientTrainer` that remembers whether anything read it (``configure_optimizers`` probes)."""

    def __getattribute__(self, name: str) -> Any:
        if name in ClientTrainer._FIELDS:
            object.__setattr__(self, "touched", True)
        return super().__getattribute__(name)

