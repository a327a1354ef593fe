"""What the vmap executor can train exactly, checked before any data is seen."""

from __future__ import annotations

from torch import nn

from lightfed.client import TRAIN_HOOKS, LocalTrainer
from lightfed.data.client_data import ClientData
from lightfed.strategy import Strategy

__all__ = ["FIX", "VmapUnsupportedError", "check_tensor_batches", "check_vectorisable", "overrides"]

FIX = "Use `trainer.executor: sequential` for it."


class VmapUnsupportedError(ValueError):
    """The model, optimizer, strategy or precision cannot be trained exactly by the vmap executor."""


def overrides(strategy: Strategy, hook: str) -> bool:
    """Whether ``strategy`` declares that it changes the client hook ``hook`` (:attr:`Strategy.client_hooks`)."""
    return hook in strategy.client_hooks


def check_vectorisable(local: LocalTrainer) -> None:
    """Raise :class:`VmapUnsupportedError` if ``local``'s set-up cannot be vectorised exactly.

    Checks what is known before any data is seen: the local trainer's type (privacy wrappers), precision,
    the loop's flags (gradient clipping, accumulation), the module's training hooks (the same
    :class:`~lightfed.client.ModuleHooks` the sequential loop reads), the strategy's client-side hooks,
    batch-statistics buffers and dropout layers. Evaluation hooks are fine: evaluation is the local trainer's.
    """
    if type(local) is not LocalTrainer:
        raise VmapUnsupportedError(
            f"the local trainer is {type(local).__name__} (a privacy mechanism such as DP-SGD replaced "
            f"lightfed's LocalTrainer); the vmap executor only vectorises the plain local loop. {FIX}"
        )
    precision = getattr(local.precision, "precision", "32-true")
    if str(precision) not in ("32-true", "32"):
        raise VmapUnsupportedError(f"trainer.precision={precision!r}: the vmap executor trains in 32-bit only. {FIX}")
    if local.gradient_clip_val:
        raise VmapUnsupportedError(
            f"gradient_clip_val={local.gradient_clip_val}: the vmap executor does not clip gradients. {FIX}"
        )
    if local.accumulate_grad_batches != 1:
        raise VmapUnsupportedError(
            f"accumulate_grad_batches={local.accumulate_grad_batches}: the vmap executor steps every batch. {FIX}"
        )
    if local.hooks.manual:
        raise VmapUnsupportedError(
            f"{type(local.module).__name__} uses manual optimization (automatic_optimization=False); the vmap "
            f"executor steps one SGD per client itself. {FIX}"
        )
    hooks = [h for h in TRAIN_HOOKS if h in local.hooks.overridden]
    if hooks:
        raise VmapUnsupportedError(
            f"{type(local.module).__name__} overrides the training hook(s) {', '.join(hooks)}; the vmap executor "
            f"trains the whole cohort in one vectorised program and calls no per-client training hook. {FIX}"
        )
    strategy = local.strategy
    if overrides(strategy, "on_before_optimizer_step") or strategy.uses_client_state:
        what = "on_before_optimizer_step" if overrides(strategy, "on_before_optimizer_step") else "client state"
        raise VmapUnsupportedError(
            f"strategy {type(strategy).__name__} uses {what} (per-step gradient edits or persistent client "
            f"state); the vmap executor runs on_client_start, client_loss and on_client_end only. {FIX}"
        )
    if local.spec.has_buffers:
        raise VmapUnsupportedError(
            f"the payload carries buffers ({[n for n, b in zip(local.spec.names, local.spec.is_buffer) if b][:3]}, "
            f"BatchNorm-style statistics updated by training); the vmap executor needs models without them "
            f"(GroupNorm/LayerNorm are fine). {FIX}"
        )
    for name, mod in local.module.named_modules():
        if isinstance(mod, nn.modules.batchnorm._NormBase) and mod.track_running_stats:
            raise VmapUnsupportedError(
                f"module {name!r} ({type(mod).__name__}) keeps running batch statistics; the vmap executor "
                f"needs models without them (GroupNorm/LayerNorm are fine). {FIX}"
            )
        if isinstance(mod, nn.modules.dropout._DropoutNd) and mod.p > 0:
            raise VmapUnsupportedError(
                f"module {name!r} ({type(mod).__name__}, p={mod.p}) is random during training; the vmap "
                f"executor does not reproduce the sequential executor's dropout masks. {FIX}"
            )


def check_tensor_batches(data: object) -> None:
    """Raise :class:`VmapUnsupportedError` unless ``data`` is in-memory tensors batched as tuples.

    The vmap executor gathers every client's batches from the pooled tensors by index; a map-style dataset
    (:class:`~lightfed.data.client_data.DatasetClientData`, its own ``collate_fn``) or dict batches are
    trained by the sequential executor.
    """
    if not isinstance(data, ClientData):
        raise VmapUnsupportedError(
            f"the clients' data is a {type(data).__name__} (a map-style dataset batched by its collate_fn); the "
            f"vmap executor gathers batches from in-memory tensors. {FIX}"
        )
    if data.keys is not None:
        raise VmapUnsupportedError(
            f"the clients' batches are dicts (keys {list(data.keys)}); the vmap executor vectorises tuples of "
            f"tensors. {FIX}"
        )
