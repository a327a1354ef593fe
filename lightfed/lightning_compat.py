"""What a LightningModule sees of Lightning during a client visit, without a ``lightning.Trainer``.

The client loop (:mod:`lightfed.client`) builds no Trainer per visit. This module holds what stands in for
one and what reads a module the way Lightning does:

* the hook tables (:data:`TRAIN_HOOKS`, :data:`EVAL_HOOKS`, :data:`REFUSED_HOOKS`) and :class:`ModuleHooks`,
  which of them a module overrides, read once per run;
* :func:`parse_optimizers`: ``configure_optimizers``'s return value, in every form Lightning documents;
* :class:`ClientTrainer`: ``self.trainer`` during a visit, with :class:`ClientStrategy` as its
  ``strategy`` (what ``self.optimizers()``, ``manual_backward`` and ``LightningOptimizer.step`` call);
* :func:`batch_size_of` and :func:`to_device` for batches of any structure (a tensor, a tuple, a dict, a
  ``BatchEncoding``, nested), with Lightning's own utilities behind a fast path for tuples of tensors;
* :class:`ModuleHookError`: an exception raised inside one of the module's hooks, named by the hook.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightfed.context import Attached

__all__ = [
    "EVAL_HOOKS", "REFUSED_HOOKS", "REUSABLE_OPTIMIZERS", "TRAIN_HOOKS", "ClientStrategy", "ClientTrainer",
    "GradientClipper", "ModuleHookError", "ModuleHooks", "RecordingTrainer", "SchedulerConfig",
    "TrainerStandInError", "batch_size_of", "hook_error", "parse_optimizers", "to_device",
]

#: LightningModule hooks the client loop calls during a visit when the module overrides them, in the order
#: ``lightning.Trainer.fit`` calls them (automatic optimization, one optimizer).
TRAIN_HOOKS = (
    "on_fit_start", "on_train_start", "on_train_epoch_start", "on_before_batch_transfer",
    "transfer_batch_to_device", "on_after_batch_transfer", "on_train_batch_start", "on_before_zero_grad",
    "optimizer_zero_grad", "on_before_backward", "on_after_backward", "on_before_optimizer_step",
    "configure_gradient_clipping", "lr_scheduler_step", "on_train_batch_end", "on_train_epoch_end",
    "on_train_end", "on_fit_end",
)

#: Hooks called around evaluation (``{stage}`` is ``validation`` or ``test``, after the step that runs).
EVAL_HOOKS = (
    "on_{stage}_model_eval", "on_{stage}_start", "on_{stage}_epoch_start", "on_{stage}_batch_start",
    "on_{stage}_batch_end", "on_{stage}_epoch_end", "on_{stage}_end", "on_{stage}_model_train",
)

_IN_INIT = "lightfed builds the payload from the module's parameters before any visit; create layers in __init__"

#: Hooks that change training and that the client loop cannot honour, with what to do instead.
REFUSED_HOOKS = {
    "optimizer_step": "lightfed steps the optimizer itself; put per-step changes in on_before_optimizer_step or "
                      "on_train_batch_start, use an LR scheduler with interval 'step', or manual optimization",
    "backward": "lightfed runs loss.backward() itself (through the precision plugin); use on_before_backward / "
                "on_after_backward",
    "setup": _IN_INIT,
    "configure_model": _IN_INIT,
    "teardown": "lightfed has no per-client setup/teardown; use on_fit_end (called at the end of each visit)",
    "configure_callbacks": "Lightning callbacks need a lightning.Trainer; use a lightfed.Callback (trainer.callbacks)",
    "on_save_checkpoint": "lightfed checkpoints hold the module's state_dict(); keep extra state in buffers",
    "on_load_checkpoint": "lightfed checkpoints hold the module's state_dict(); keep extra state in buffers",
}

#: Optimizers whose whole state lives in ``optimizer.state``, created lazily by ``step()``: clearing it and
#: restoring the groups' hyper-parameters gives exactly a fresh optimizer (tested bit for bit).
REUSABLE_OPTIMIZERS = (
    torch.optim.SGD, torch.optim.Adam, torch.optim.AdamW, torch.optim.RMSprop, torch.optim.Adamax,
    torch.optim.NAdam, torch.optim.RAdam, torch.optim.Adadelta,
)


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


# ---------------------------------------------------------------------------------------- errors
class ModuleHookError(ValueError):
    """An exception raised inside one of the LightningModule's own hooks during a visit or an evaluation.

    The message names the module, the hook and the original exception (kept as ``__cause__``), on one
    line: ``MyModule.configure_optimizers raised KeyError: 'lr'``. lightfed's CLI prints it as
    ``lightfed: error: ...`` (``LIGHTFED_TRACEBACK=1`` shows the traceback).

    Attributes:
        hook: The hook's name (``training_step``, ``configure_optimizers``, ...).
        module: The module's class name.
    """

    def __init__(self, module: str, hook: str, original: BaseException) -> None:
        self.module, self.hook, self.original = module, hook, original
        message = " ".join(str(original).split()) or "(no message)"
        super().__init__(f"{module}.{hook} raised {type(original).__name__}: {message}")


#: Methods of a LightningModule that Lightning calls (any of them may raise the user's error).
_USER_HOOKS = frozenset(
    {*TRAIN_HOOKS, "configure_optimizers", "training_step", "validation_step", "test_step", "forward",
     *(h.format(stage=s) for h in EVAL_HOOKS for s in ("validation", "test"))}
)


def hook_error(err: BaseException, modules: tuple[nn.Module, ...]) -> ModuleHookError | None:
    """The :class:`ModuleHookError` for ``err`` if it was raised inside a hook of one of ``modules``.

    Reads the traceback (no cost while nothing fails): the outermost frame that is a Lightning hook method
    (:data:`_USER_HOOKS`) whose ``self`` is one of ``modules`` names the hook. ``None`` when the error did not
    come from the module's code (lightfed's own checks keep their message), or is already a hook error.
    """
    if isinstance(err, ModuleHookError):
        return None
    tb = err.__traceback__
    while tb is not None:
        frame = tb.tb_frame
        name = frame.f_code.co_name
        if name in _USER_HOOKS and any(frame.f_locals.get("self") is m for m in modules):
            return ModuleHookError(type(frame.f_locals["self"]).__name__, name, err)
        tb = tb.tb_next
    return None


# ---------------------------------------------------------------------------------------- optimizers
@dataclass
class SchedulerConfig:
    """One LR scheduler of ``configure_optimizers``, with Lightning's ``interval`` / ``frequency`` keys."""

    scheduler: Any
    interval: str = "epoch"
    frequency: int = 1
    monitor: str | None = None


def parse_optimizers(out: Any, manual: bool = False) -> tuple[list[Optimizer], list[SchedulerConfig]]:
    """Normalise what ``configure_optimizers`` returned into its optimizers and schedulers.

    Accepts the forms Lightning documents: an optimizer, a list/tuple of them, ``([opts], [scheds])``, a
    dict ``{"optimizer": ..., "lr_scheduler": ...}`` (whose scheduler may be a dict with ``interval``
    (``"epoch"``/``"step"``) and ``frequency``), or a list of such dicts.

    Args:
        out: What ``configure_optimizers`` returned.
        manual: Manual optimization (``automatic_optimization = False``): several optimizers are allowed.

    Raises:
        ValueError: Several optimizers under automatic optimization, ``ReduceLROnPlateau`` (it monitors a
            metric no client visit produces), an unknown ``interval``, or anything else.
    """
    opts: list[Any]
    scheds: list[Any] = []
    if isinstance(out, dict):
        opts, scheds = [out["optimizer"]], [s for s in [out.get("lr_scheduler")] if s is not None]
    elif isinstance(out, Optimizer):
        opts = [out]
    elif isinstance(out, (list, tuple)) and len(out) == 2 and isinstance(out[0], (list, tuple)):
        opts, scheds = list(out[0]), list(out[1])
    elif isinstance(out, (list, tuple)) and out and all(isinstance(o, dict) for o in out):
        parsed = [parse_optimizers(o, manual=True) for o in out]
        opts, scheds = [o for p in parsed for o in p[0]], [s for p in parsed for s in p[1]]
    elif isinstance(out, (list, tuple)) and out and all(isinstance(o, Optimizer) for o in out):
        opts = list(out)
    else:
        raise ValueError(
            f"configure_optimizers must return an optimizer (optionally with LR schedulers), a list of them or a "
            f"dict with 'optimizer'; got {type(out).__name__}."
        )
    if len(opts) != 1 and not manual:
        raise ValueError(
            f"configure_optimizers returned {len(opts)} optimizers: automatic optimization steps exactly one. Set "
            f"self.automatic_optimization = False and step them in training_step (manual optimization)."
        )
    configs = [s if isinstance(s, SchedulerConfig) else _scheduler_config(s) for s in scheds]
    return opts, configs


def _scheduler_config(s: Any) -> SchedulerConfig:
    keys = ("scheduler", "interval", "frequency", "monitor")
    cfg = SchedulerConfig(**{k: v for k, v in s.items() if k in keys}) if isinstance(s, dict) else SchedulerConfig(s)
    if cfg.interval not in ("epoch", "step"):
        raise ValueError(f"lr_scheduler interval must be 'epoch' or 'step', got {cfg.interval!r}.")
    if isinstance(cfg.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
        raise ValueError(
            "configure_optimizers returned ReduceLROnPlateau: it monitors a validation metric, and a client "
            "visit runs no validation. Use a schedule of epochs or steps for clients."
        )
    return cfg


# ---------------------------------------------------------------------------------------- hooks
@dataclass(frozen=True)
class ModuleHooks:
    """Which LightningModule hooks a module overrides (read once per run; the loop skips the others).

    Attributes:
        overridden: Names from :data:`TRAIN_HOOKS` and the evaluation hooks the module's class overrides.
        lightning_modules: The model's LightningModules (the module and any nested ones: ``self.trainer``).
        manual: The module uses manual optimization (``automatic_optimization = False``).
        steps: Which of ``training_step``, ``validation_step``, ``test_step`` the module defines.
    """

    overridden: frozenset[str]
    lightning_modules: tuple[nn.Module, ...]
    manual: bool = False
    steps: frozenset[str] = frozenset({"training_step", "validation_step", "test_step"})

    @classmethod
    def of(cls, module: nn.Module) -> ModuleHooks:
        """Read ``module``'s hooks; refuse :data:`REFUSED_HOOKS` naming the hook.

        Raises:
            ValueError: The module overrides a hook the loop cannot honour.
        """
        import lightning as L

        manual = getattr(module, "automatic_optimization", True) is False
        if not isinstance(module, L.LightningModule):
            return cls(frozenset(), (), manual)
        stages = ("validation", "test")
        names = set(TRAIN_HOOKS) | {h.format(stage=s) for h in EVAL_HOOKS for s in stages} | set(REFUSED_HOOKS)
        base, cls_ = L.LightningModule, type(module)
        overridden = {n for n in names if getattr(cls_, n, None) is not getattr(base, n, None)}
        refused = sorted(overridden & set(REFUSED_HOOKS))
        if refused:
            name = refused[0]
            raise ValueError(
                f"{cls_.__name__} overrides LightningModule.{name}, which lightfed's client loop does not call: "
                f"{REFUSED_HOOKS[name]}. See docs/lightning_contract.md."
            )
        steps = {n for n in ("training_step", "validation_step", "test_step")
                 if getattr(cls_, n, None) is not getattr(base, n, None)}
        modules = tuple(m for m in module.modules() if isinstance(m, L.LightningModule))
        return cls(frozenset(overridden), modules, manual, frozenset(steps))

    def bound(self, module: nn.Module, name: str) -> Any:
        """The module's bound hook ``name`` if it overrides it, else ``None`` (one check per call site)."""
        return getattr(module, name) if name in self.overridden else None

    @property
    def evaluable(self) -> bool:
        """Whether the module defines ``validation_step`` or ``test_step`` (what evaluation runs)."""
        return bool(self.steps & {"validation_step", "test_step"})


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

