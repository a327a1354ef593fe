"""The LightningModule contract, read once per run: which hooks run, what is refused, the optimizers.

* the hook tables (:data:`TRAIN_HOOKS`, :data:`EVAL_HOOKS`, :data:`REFUSED_HOOKS`), :class:`ModuleHooks` (which
  of them a module overrides) and :class:`BoundHooks` (the overridden ones as bound methods, ``None`` else);
* :func:`parse_optimizers`: ``configure_optimizers``'s return value, in every form Lightning documents;
* :func:`check_manual` and :func:`say_not_evaluated`: what is refused or said at set-up;
* :class:`ModuleHookError` and :func:`hook_error`: an exception raised inside one of the module's hooks, named
  by the hook.

What the module sees of Lightning during a visit (``self.trainer``, ``self.log``) is in
:mod:`lightfed.lightning_compat`; the loop that calls the hooks is :mod:`lightfed.client`.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import nn
from torch.optim import Optimizer

if TYPE_CHECKING:
    from lightfed.strategy import Strategy

__all__ = [
    "EVAL_HOOKS", "REFUSED_HOOKS", "REUSABLE_OPTIMIZERS", "TRAIN_HOOKS", "BoundHooks", "ModuleHookError", "ModuleHooks",
    "SchedulerConfig", "check_manual", "eval_step", "hook_error", "parse_optimizers", "say_not_evaluated",
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


#: Module classes already told that they are not evaluated (said once per class and process).
_NOT_EVALUATED: set[type] = set()


def say_not_evaluated(module: nn.Module) -> None:
    """Warn, once per class and process, that a module without evaluation steps trains but is not evaluated."""
    cls = type(module)
    if cls in _NOT_EVALUATED:
        return
    _NOT_EVALUATED.add(cls)
    warnings.warn(
        f"lightfed: {cls.__name__} defines neither validation_step nor test_step, so the global model is not "
        f"evaluated (no central/ or federated/ metrics); it trains as usual. Add a test_step that logs e.g. "
        f"self.log('test_acc', acc) to evaluate it.",
        UserWarning, stacklevel=3,
    )


def check_manual(module: nn.Module, strategy: Strategy, clip: float | None, accumulate: int) -> None:
    """Refuse what manual optimization cannot honour (Lightning refuses the first two too)."""
    name = type(module).__name__
    if clip:
        raise ValueError(
            f"{name} uses manual optimization (automatic_optimization=False) with gradient_clip_val={clip}: "
            f"the loop does not step its optimizers. Call self.clip_gradients(opt, ...) in training_step instead."
        )
    if accumulate != 1:
        raise ValueError(
            f"{name} uses manual optimization (automatic_optimization=False) with accumulate_grad_batches="
            f"{accumulate}: the loop does not step its optimizers. Accumulate in training_step instead."
        )
    if "client_loss" in strategy.client_hooks:
        raise ValueError(
            f"strategy {type(strategy).__name__} changes the training loss (client_loss), but {name} uses manual "
            f"optimization: its training_step backpropagates its own losses. Use automatic optimization or a "
            f"strategy without a client loss (FedAvg, FedAdam, ...)."
        )


class BoundHooks:
    """The module's overridden training hooks as bound methods (``None``: not overridden), for one run."""

    def __init__(self, module: nn.Module, hooks: ModuleHooks) -> None:
        for name in TRAIN_HOOKS:
            setattr(self, name, hooks.bound(module, name))
        self.transfer = any(
            hooks.bound(module, n) is not None
            for n in ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
        )


def eval_step(module: nn.Module, stage: str) -> tuple[str, Any]:
    import lightning as L

    order = ["test_step", "validation_step"] if stage == "test" else ["validation_step", "test_step"]
    for name in order:
        fn = getattr(type(module), name, None)
        if fn is not None and fn is not getattr(L.LightningModule, name, None):
            return name, getattr(module, name)
    raise ValueError(
        f"{type(module).__name__} defines neither test_step nor validation_step: lightfed evaluates the global "
        f"model with them. Add a step that logs e.g. self.log('{stage}_acc', acc)."
    )
