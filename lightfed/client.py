"""Local training of one client: one loop over the user's LightningModule, in ``lightning.Trainer``'s order.

No ``lightning.Trainer`` is built per client visit (a Trainer plus ``fit()`` costs ~4 ms per visit, ~10x a
small client's whole training). One worker module is reused; the global weights are copied into it in place;
the client's data is already on the device. A visit is one Lightning ``fit`` of one client from the global
weights: the module's hooks run in Lightning's order for automatic optimization (which ones, and how a visit
differs from ``Trainer.fit``, is listed in ``docs/lightning_contract.md`` and :data:`TRAIN_HOOKS`), with
``self.trainer`` a small stand-in (:class:`~lightfed.context.ClientTrainer`). Hooks a module does not override
cost nothing per step: which ones it does is read once, when the :class:`LocalTrainer` is built.

The loop has three named seams a local-training variant overrides instead of copying the loop (DP-SGD does):
:meth:`LocalTrainer.train_batches` (where batches come from), :meth:`LocalTrainer.backward` and
:meth:`LocalTrainer.optimizer_step`; plus :meth:`LocalTrainer.visit_optimizer` (the visit's optimizer) and
:meth:`LocalTrainer.visit_scope` (set-up and tear-down around a visit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightfed.context import (
    ClientContext,
    ClientTrainer,
    LogSink,
    RecordingTrainer,
    SchedulerConfig,
    step_loss,
)
from lightfed.data.client_data import ClientData
from lightfed.lean_optim import LeanOptimizer
from lightfed.messages import ClientUpdate
from lightfed.params import ParamSpec
from lightfed.seeding import derive_seed
from lightfed.strategy import Strategy

__all__ = [
    "LocalTrainer", "LogCapture", "LogSink", "ModuleHooks", "REFUSED_HOOKS", "TRAIN_HOOKS", "parse_optimizers",
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

#: Hooks that change training and that the client loop cannot honour, with what to do instead.
REFUSED_HOOKS = {
    "optimizer_step": "lightfed steps the optimizer itself; put per-step changes in on_before_optimizer_step or "
                      "on_train_batch_start, or use an LR scheduler with interval 'step'",
    "backward": "lightfed runs loss.backward() itself (through the precision plugin); use on_before_backward / "
                "on_after_backward",
    "setup": "lightfed builds the payload from the module's parameters before any visit; create layers in __init__",
    "configure_model": "lightfed builds the payload from the module's parameters before any visit; create layers "
                       "in __init__",
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


def seed_device_rng(seed: int, device: torch.device) -> None:
    """Seed the global RNG that random ops on ``device`` draw from (dropout masks of a client visit).

    Equivalent to ``torch.manual_seed(seed)`` for ops on ``device``, without its cost on the hot path:
    ``torch.manual_seed`` also queues seeding of every uninitialised accelerator backend (CUDA, XPU, MTIA),
    each recording a formatted Python stack, ~0.7 ms per call, more than a small client's whole training.
    """
    torch.default_generator.manual_seed(seed)
    if device.type == "cuda":
        with torch.cuda.device(device):
            torch.cuda.manual_seed(seed)
    elif device.type != "cpu":
        torch.manual_seed(seed)


def parse_optimizers(out: Any) -> tuple[Optimizer, list[SchedulerConfig]]:
    """Normalise what ``configure_optimizers`` returned into one optimizer and its schedulers.

    Accepts the forms Lightning documents for automatic optimization with one optimizer: an optimizer, a
    list/tuple of one, ``([opt], [sched])``, or a dict ``{"optimizer": ..., "lr_scheduler": ...}`` whose
    scheduler may be a dict with ``interval`` (``"epoch"``/``"step"``) and ``frequency``.

    Raises:
        ValueError: Several optimizers, ``ReduceLROnPlateau`` (it monitors a metric no client visit
            produces), an unknown ``interval``, or anything else.
    """
    scheds: list[Any] = []
    if isinstance(out, dict):
        opt, sched = out["optimizer"], out.get("lr_scheduler")
        scheds = [sched] if sched is not None else []
    elif isinstance(out, Optimizer):
        opt = out
    elif isinstance(out, (list, tuple)) and len(out) == 2 and isinstance(out[0], (list, tuple)):
        opts, scheds = list(out[0]), list(out[1])
        if len(opts) != 1:
            raise ValueError(f"configure_optimizers returned {len(opts)} optimizers; lightfed clients use exactly one.")
        opt = opts[0]
    elif isinstance(out, (list, tuple)) and len(out) == 1:
        opt = out[0]
        if isinstance(opt, dict):
            return parse_optimizers(opt)
    else:
        raise ValueError(
            "configure_optimizers must return one optimizer (optionally with schedulers); got "
            f"{type(out).__name__}. Multiple optimizers / manual optimization are not supported for clients."
        )
    configs = []
    for s in scheds:
        cfg = SchedulerConfig(**{k: v for k, v in s.items() if k in ("scheduler", "interval", "frequency", "monitor")}) \
            if isinstance(s, dict) else SchedulerConfig(s)
        if cfg.interval not in ("epoch", "step"):
            raise ValueError(f"lr_scheduler interval must be 'epoch' or 'step', got {cfg.interval!r}.")
        if isinstance(cfg.scheduler, torch.optim.lr_scheduler.ReduceLROnPlateau):
            raise ValueError(
                "configure_optimizers returned ReduceLROnPlateau: it monitors a validation metric, and a client "
                "visit runs no validation. Use a schedule of epochs or steps for clients."
            )
        configs.append(cfg)
    return opt, configs


@dataclass(frozen=True)
class ModuleHooks:
    """Which LightningModule hooks a module overrides (read once per run; the loop skips the others).

    Attributes:
        overridden: Names from :data:`TRAIN_HOOKS` and the evaluation hooks the module's class overrides.
        lightning_modules: The model's LightningModules (the module and any nested ones: ``self.trainer``).
    """

    overridden: frozenset[str]
    lightning_modules: tuple[nn.Module, ...]

    @classmethod
    def of(cls, module: nn.Module) -> ModuleHooks:
        """Read ``module``'s hooks; refuse manual optimization and :data:`REFUSED_HOOKS` naming the hook.

        Raises:
            ValueError: The module uses manual optimization or overrides a hook the loop cannot honour.
        """
        import lightning as L

        if getattr(module, "automatic_optimization", True) is False:
            raise ValueError(
                f"{type(module).__name__} sets automatic_optimization=False (manual optimization): lightfed clients "
                f"run Lightning's automatic optimization with one optimizer. Return the loss from training_step."
            )
        if not isinstance(module, L.LightningModule):
            return cls(frozenset(), ())
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
        return cls(frozenset(overridden), tuple(m for m in module.modules() if isinstance(m, L.LightningModule)))

    def bound(self, module: nn.Module, name: str) -> Any:
        """The module's bound hook ``name`` if it overrides it, else ``None`` (one check per call site)."""
        return getattr(module, name) if name in self.overridden else None


class _Hooks:
    """The module's overridden training hooks as bound methods (``None``: not overridden), for one run."""

    def __init__(self, module: nn.Module, hooks: ModuleHooks) -> None:
        for name in TRAIN_HOOKS:
            setattr(self, name, hooks.bound(module, name))
        self.transfer = any(
            hooks.bound(module, n) is not None
            for n in ("on_before_batch_transfer", "transfer_batch_to_device", "on_after_batch_transfer")
        )


class LocalTrainer:
    """Trains clients one after another on one reused worker module.

    Args:
        module: The worker's LightningModule (already on the device, precision applied).
        spec: The payload layout.
        strategy: Its client-side hooks run inside the loop (like Lightning callbacks: before the module's
            hook of the same moment).
        precision: A Lightning Fabric precision plugin (``fabric.strategy.precision``); ``None`` is fp32.
        local_epochs: Passes over the client's data per visit (ignored if ``local_steps`` is set).
        local_steps: Exact number of optimizer steps per visit (cycling through the data).
        batch_size: Local batch size.
        seed: Run seed; batch order and the RNG of the visit (dropout) derive from (seed, round, client).
        gradient_clip_val: Clip gradients before every optimizer step at this value (``None`` or 0: no
            clipping), as ``lightning.Trainer(gradient_clip_val=...)``: through the module's
            ``configure_gradient_clipping``, after ``on_before_optimizer_step``.
        gradient_clip_algorithm: ``"norm"`` (total 2-norm of all the optimizer's parameters) or ``"value"``.
        accumulate_grad_batches: Batches per optimizer step, as ``lightning.Trainer``: each batch's loss is
            divided by it, and the last, shorter window of an epoch still steps. ``local_steps`` counts
            optimizer steps.
        reuse_optimizer: Call ``configure_optimizers`` once per run and reset the optimizer between visits
            (clear ``optimizer.state``, restore every group's hyper-parameters) when that is exactly a fresh
            optimizer: one of :data:`REUSABLE_OPTIMIZERS`, no LR schedulers, and ``configure_optimizers`` does
            not read ``self.trainer``. Set ``False`` if ``configure_optimizers`` depends on something that
            changes between visits.

    Raises:
        ValueError: For flags out of range, manual optimization, or a hook in :data:`REFUSED_HOOKS`.
    """

    def __init__(
        self,
        module: nn.Module,
        spec: ParamSpec,
        strategy: Strategy,
        precision: Any = None,
        local_epochs: int = 1,
        local_steps: int | None = None,
        batch_size: int = 16,
        seed: int = 0,
        *,
        gradient_clip_val: float | None = None,
        gradient_clip_algorithm: str = "norm",
        accumulate_grad_batches: int = 1,
        reuse_optimizer: bool = True,
    ) -> None:
        if gradient_clip_val is not None and gradient_clip_val < 0:
            raise ValueError(f"gradient_clip_val must be >= 0 or None, got {gradient_clip_val}.")
        if gradient_clip_algorithm not in ("norm", "value"):
            raise ValueError(f"gradient_clip_algorithm must be 'norm' or 'value', got {gradient_clip_algorithm!r}.")
        if int(accumulate_grad_batches) != accumulate_grad_batches or accumulate_grad_batches < 1:
            raise ValueError(f"accumulate_grad_batches must be an integer >= 1, got {accumulate_grad_batches}.")
        self.hooks = ModuleHooks.of(module)
        self.module = module
        self.spec = spec
        self.strategy = strategy
        self.precision = precision
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.seed = seed
        self.gradient_clip_val = gradient_clip_val or None
        self.gradient_clip_algorithm = gradient_clip_algorithm
        self.accumulate_grad_batches = int(accumulate_grad_batches)
        self.reuse_optimizer = reuse_optimizer
        self.tensors = spec.tensors(module)
        self._submodules = list(module.modules())
        self._global_ref: Tensor | None = None
        self._global_views: list[Tensor] = []
        self._detached: list[Tensor] = []
        self._flat_views: list[Tensor] | None = None
        self._batch_gen = torch.Generator()  # reseeded per (round, client, epoch); ClientData.batches is eager
        self._calls = _Hooks(module, self.hooks)
        self._strategy_loss = "client_loss" in strategy.client_hooks
        self._strategy_grads = "on_before_optimizer_step" in strategy.client_hooks
        # Fabric's 32-bit Precision only forwards the calls: skipped on the hot path
        self._precision = None if precision is None or type(precision) is _fabric_precision() else precision
        self._scaler = getattr(precision, "scaler", None)  # 16-mixed: hooks and clipping see unscaled gradients
        self._reusable: tuple[Optimizer, list[dict[str, Any]]] | None = None
        self._lean: LeanOptimizer | None = None  # the reused optimizer's step / zero_grad without profiler ranges
        self._reuse_checked = False
        self.trainer = ClientTrainer(
            max_epochs=None if local_steps is not None else local_epochs, max_steps=local_steps or -1,
            accumulate_grad_batches=self.accumulate_grad_batches, gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
        )
        self.trainer.model = module

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this trainer's loop (for wrappers such as DP-SGD's)."""
        return dict(
            precision=self.precision, local_epochs=self.local_epochs, local_steps=self.local_steps,
            batch_size=self.batch_size, seed=self.seed, gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=self.gradient_clip_algorithm,
            accumulate_grad_batches=self.accumulate_grad_batches, reuse_optimizer=self.reuse_optimizer,
        )

    # ------------------------------------------------------------------ weights
    def load_global(self, global_params: Tensor) -> None:
        """Copy ``global_params`` into the worker module in place.

        The views of the flat vector are cut once per global vector (once per round), not once per client;
        the copy goes into detached aliases of the module's tensors (no ``no_grad`` context per visit).
        """
        if global_params is not self._global_ref:
            self._global_ref = global_params
            self._global_views = self.spec.unflatten(global_params)
            self._detached = [t.detach() for t in self.tensors]
        if any(d.data_ptr() != t.data_ptr() for d, t in zip(self._detached, self.tensors)):
            self._detached = [t.detach() for t in self.tensors]
        torch._foreach_copy_(self._detached, self._global_views)

    def local_params(self) -> Tensor:
        """Flat float32 copy of the worker module's payload (what :meth:`ParamSpec.flatten` returns).

        One ``cat`` of flat views cut once (contiguous float32 payloads; re-cut if a tensor's storage moved).
        """
        views = self._flat_views
        if views is None or any(v.data_ptr() != t.data_ptr() for v, t in zip(views, self.tensors)):
            if not all(t.dtype == torch.float32 and t.is_contiguous() for t in self.tensors):
                return self.spec.flatten(self.tensors)
            views = self._flat_views = [t.detach().view(-1) for t in self.tensors]
        return torch.cat(views)

    def train_mode(self) -> None:
        """``module.train()``, skipped when every submodule is already in training mode."""
        if not all(m.training for m in self._submodules):
            self.module.train()

    def _forward_context(self) -> contextlib.AbstractContextManager:
        return self._precision.forward_context() if self._precision is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ optimizer
    def make_optimizer(self) -> tuple[Optimizer, list[SchedulerConfig]]:
        """A fresh optimizer and its schedulers from the module's ``configure_optimizers``."""
        return parse_optimizers(self.module.configure_optimizers())

    def _reset(self, optimizer: Optimizer, groups: list[dict[str, Any]]) -> Optimizer:
        optimizer.state.clear()
        for group, hyper in zip(optimizer.param_groups, groups):
            group.update(hyper)
        return optimizer

    def _first_optimizer(self) -> tuple[Optimizer, list[SchedulerConfig]]:
        """The run's first ``configure_optimizers``: decides whether later visits reuse its optimizer."""
        probe = RecordingTrainer(
            max_epochs=self.trainer.max_epochs, max_steps=self.trainer.max_steps,
            accumulate_grad_batches=self.accumulate_grad_batches, gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=self.gradient_clip_algorithm,
        )
        with probe.attached(self.hooks.lightning_modules):
            optimizer, schedulers = self.make_optimizer()
        self._reuse_checked = True
        if (
            self.reuse_optimizer and not schedulers and not probe.touched and type(optimizer) in REUSABLE_OPTIMIZERS
            and not optimizer.state and not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
        ):
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            self._reusable = (optimizer, [dict(g) for g in groups])
            self._lean = LeanOptimizer(optimizer)
        return optimizer, schedulers

    def visit_optimizer(self, ctx: ClientContext, data: ClientData) -> tuple[Optimizer, list[SchedulerConfig]]:
        """Seam: the visit's optimizer and schedulers (a reset reused optimizer, or ``configure_optimizers``)."""
        if self._reusable is not None:
            return self._reset(*self._reusable), []
        if not self._reuse_checked:
            return self._first_optimizer()
        return self.make_optimizer()

    # ------------------------------------------------------------------ seams
    def train_batches(self, ctx: ClientContext, data: ClientData, epoch: int) -> Iterable[Any]:
        """Seam: the batches of local epoch ``epoch`` (:meth:`batches_per_epoch` of them)."""
        return self.shuffled_batches(ctx, data, epoch)

    def batches_per_epoch(self, data: ClientData) -> int:
        """Seam: how many batches :meth:`train_batches` yields per epoch (the last one ends the epoch)."""
        return -(-len(data) // self.batch_size)

    def shuffled_batches(self, ctx: ClientContext, data: ClientData, epoch: int) -> Iterator[Any]:
        """The client's batches for ``epoch`` in the order of ``(seed, "batches", round, client, epoch)``
        (what ``ctx.batches`` gives strategies that run extra passes)."""
        self._batch_gen.manual_seed(derive_seed(self.seed, "batches", ctx.round_idx, ctx.client_id, epoch))
        return data.batches(self.batch_size, self._batch_gen)

    def backward(self, loss: Tensor) -> None:
        """Seam: gradients of ``loss`` into ``.grad`` (through the precision plugin)."""
        if self._precision is not None:
            self._precision.backward(loss, self.module)
        else:
            loss.backward()

    def optimizer_step(self, optimizer: Optimizer) -> None:
        """Seam: one step of ``optimizer`` from the gradients (through the precision plugin)."""
        if self._precision is not None:
            self._precision.optimizer_step(optimizer)
        elif self._lean is not None and optimizer is self._lean.optimizer:
            self._lean.step()
        else:
            optimizer.step()

    def visit_scope(self, ctx: ClientContext, data: ClientData) -> contextlib.AbstractContextManager[dict[str, float]]:
        """Seam: set-up and tear-down around a visit's training; enters as a dict of extra metrics to report."""
        return contextlib.nullcontext({})

    def training_loss(self, batch: Any, batch_idx: int) -> Tensor | None:
        """The module's ``training_step`` loss on ``batch`` (in the precision's forward context)."""
        if self._precision is None:
            return step_loss(self.module.training_step(batch, batch_idx))
        with self._precision.forward_context():
            return step_loss(self.module.training_step(batch, batch_idx))

    def visit_steps(self, data: ClientData) -> int:
        """Optimizer steps a visit over ``data`` takes (``self.trainer.estimated_stepping_batches``)."""
        if self.local_steps is not None:
            return self.local_steps if len(data) else 0
        return self.local_epochs * -(-self.batches_per_epoch(data) // self.accumulate_grad_batches)

    # ------------------------------------------------------------------ one client visit
    def fit_client(
        self,
        client_id: int,
        round_idx: int,
        data: ClientData,
        global_params: Tensor,
        state: dict[str, Tensor] | None = None,
        payload: dict[str, Any] | None = None,
    ) -> ClientUpdate:
        """Train client ``client_id`` from ``global_params``; return its update (local - global)."""
        self.load_global(global_params)
        self.train_mode()
        seed_device_rng(derive_seed(self.seed, "client_rng", round_idx, client_id), global_params.device)
        ctx = ClientContext(
            client_id=client_id, round_idx=round_idx, module=self.module, spec=self.spec,
            global_params=global_params, payload=payload or {}, state=state if state is not None else {},
            num_examples=len(data), batches=lambda epoch: self.shuffled_batches(ctx, data, epoch),
            make_optimizer=lambda: self.make_optimizer()[0], forward_context=self._forward_context,
        )
        trainer = self.trainer
        trainer.client_id, trainer.round_idx = client_id, round_idx
        trainer.current_epoch = trainer.global_step = 0
        trainer.estimated_stepping_batches = self.visit_steps(data)
        capture = LogCapture()
        with trainer.attached(self.hooks.lightning_modules), capture.attach(self.module):
            with self.visit_scope(ctx, data) as extra:
                optimizer, schedulers = self.visit_optimizer(ctx, data)
                ctx.optimizer = optimizer
                trainer.optimizers, trainer.lr_scheduler_configs = [optimizer], schedulers
                self.strategy.on_client_start(ctx)
                loss = self._fit(ctx, data, optimizer, schedulers, capture)
            metrics = capture.results()
        if loss is not None:
            metrics["loss"] = loss
        metrics.update(extra)
        update = ClientUpdate(
            client_id=client_id, delta=self.local_params() - global_params, num_examples=len(data),
            num_steps=ctx.step, metrics=metrics,
        )
        return self.strategy.on_client_end(ctx, update)

    def _fit(
        self, ctx: ClientContext, data: ClientData, optimizer: Optimizer, schedulers: list[SchedulerConfig],
        capture: LogCapture,
    ) -> float | None:
        """The visit's epochs, hooks in ``lightning.Trainer.fit``'s order; returns the mean batch loss."""
        h, trainer = self._calls, self.trainer
        accumulate, local_steps = self.accumulate_grad_batches, self.local_steps
        losses: list[tuple[Tensor | float, int]] = []  # (batch loss, batch size); summed once at the end
        if h.on_fit_start is not None:
            h.on_fit_start()
        if h.on_train_start is not None:
            h.on_train_start()
        last = self.batches_per_epoch(data) - 1
        epoch = 0
        while True:
            trainer.current_epoch = epoch
            if h.on_train_epoch_start is not None:
                h.on_train_epoch_start()
            for batch_idx, batch in enumerate(self.train_batches(ctx, data, epoch)):
                if h.transfer:
                    batch = self._transfer(batch)
                if h.on_train_batch_start is not None and h.on_train_batch_start(batch, batch_idx) == -1:
                    break  # Lightning: -1 skips the rest of the epoch
                bs = len(batch[0])
                capture.batch_size = bs
                out = self._train_step(ctx, batch, batch_idx, optimizer, losses, bs)
                if accumulate == 1 or (batch_idx + 1) % accumulate == 0 or batch_idx == last:
                    self._step(ctx, optimizer, batch_idx)
                    for s in schedulers:
                        if s.interval == "step" and (batch_idx + 1) % s.frequency == 0:
                            self._scheduler_step(s)
                if batch_idx == last:
                    for s in schedulers:
                        if s.interval == "epoch" and (epoch + 1) % s.frequency == 0:
                            self._scheduler_step(s)
                if h.on_train_batch_end is not None:
                    h.on_train_batch_end(out, batch, batch_idx)
                if local_steps is not None and ctx.step >= local_steps:
                    break
            if h.on_train_epoch_end is not None:
                h.on_train_epoch_end()
            epoch += 1
            if local_steps is not None:
                if ctx.step >= local_steps or len(data) == 0:
                    break
            elif epoch >= self.local_epochs:
                break
        trainer.current_epoch = epoch  # Lightning: epochs completed, once training ends
        if h.on_train_end is not None:
            h.on_train_end()
        if h.on_fit_end is not None:
            h.on_fit_end()
        if not losses:  # training_step returned None for every batch: no loss to report, not a made-up 0
            return None
        return sum(float(v) * n for v, n in losses) / max(sum(n for _, n in losses), 1)

    def _train_step(
        self, ctx: ClientContext, batch: Any, batch_idx: int, optimizer: Optimizer,
        losses: list[tuple[Tensor | float, int]], bs: int,
    ) -> Any:
        """``training_step``, the strategy's ``client_loss``, zero_grad (first batch of a window), backward."""
        h = self._calls
        loss = self.training_loss(batch, batch_idx)
        if loss is None:  # Lightning: the step still zeroes the gradients and steps (with none)
            if self.accumulate_grad_batches == 1 or batch_idx % self.accumulate_grad_batches == 0:
                self._zero_grad(optimizer, batch_idx)
            return None
        if self._strategy_loss:
            loss = self.strategy.client_loss(ctx, loss)
        losses.append((loss.item() if loss.device.type == "cpu" else loss.detach(), bs))
        if self.accumulate_grad_batches > 1:
            if batch_idx % self.accumulate_grad_batches == 0:
                self._zero_grad(optimizer, batch_idx)
            loss = loss / self.accumulate_grad_batches
        else:
            self._zero_grad(optimizer, batch_idx)
        if h.on_before_backward is not None:
            h.on_before_backward(loss)
        self.backward(loss)
        if h.on_after_backward is not None:
            h.on_after_backward()
        return {"loss": loss.detach()}

    def _zero_grad(self, optimizer: Optimizer, batch_idx: int) -> None:
        h = self._calls
        if h.on_before_zero_grad is not None:
            h.on_before_zero_grad(optimizer)
        if h.optimizer_zero_grad is not None:
            h.optimizer_zero_grad(self.trainer.current_epoch, batch_idx, optimizer)
        elif self._lean is not None and optimizer is self._lean.optimizer:
            self._lean.zero_grad()
        else:
            optimizer.zero_grad(set_to_none=True)

    def _step(self, ctx: ClientContext, optimizer: Optimizer, batch_idx: int) -> None:
        """Strategy gradient hook, ``on_before_optimizer_step``, clipping, the optimizer step."""
        h = self._calls
        if self._scaler is not None:
            self.precision.unscale_gradients(optimizer)
        if self._strategy_grads:
            self.strategy.on_before_optimizer_step(ctx)
        if h.on_before_optimizer_step is not None:
            h.on_before_optimizer_step(optimizer)
        if h.configure_gradient_clipping is not None:
            h.configure_gradient_clipping(
                optimizer, gradient_clip_val=self.gradient_clip_val, gradient_clip_algorithm=self.gradient_clip_algorithm
            )
        elif self.gradient_clip_val:
            self.trainer.precision_plugin.clip_gradients(optimizer, self.gradient_clip_val, self.gradient_clip_algorithm)
        self.optimizer_step(optimizer)
        ctx.step += 1
        self.trainer.global_step = ctx.step

    def _scheduler_step(self, config: SchedulerConfig) -> None:
        if self._calls.lr_scheduler_step is not None:
            self._calls.lr_scheduler_step(config.scheduler, None)
        else:
            config.scheduler.step()

    def _transfer(self, batch: Any) -> Any:
        h = self._calls
        if h.on_before_batch_transfer is not None:
            batch = h.on_before_batch_transfer(batch, 0)
        if h.transfer_batch_to_device is not None:
            batch = h.transfer_batch_to_device(batch, self._device(), 0)
        if h.on_after_batch_transfer is not None:
            batch = h.on_after_batch_transfer(batch, 0)
        return batch

    def _device(self) -> torch.device:
        return self.tensors[0].device if self.tensors else torch.device("cpu")

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: ClientData, params: Tensor, stage: str = "test", batch_size: int = 256) -> dict[str, float]:
        """Run the module's ``test_step`` (or ``validation_step``) over ``data`` with payload ``params``.

        The hooks of the stage whose step runs (``on_test_epoch_start`` ... ``on_test_epoch_end``, or the
        ``validation`` ones) are called around it in Lightning's order. Returns the batch-size-weighted
        means of what the step and the hooks logged.
        """
        module = self.module
        self.spec.assign(self.tensors, params)
        name, step = _eval_step(module, stage)
        hook = self._eval_hooks(name.removesuffix("_step"))
        was_training = module.training
        trainer = self.trainer
        trainer.training, trainer.validating, trainer.testing = False, name == "validation_step", name == "test_step"
        capture = LogCapture()
        try:
            with trainer.attached(self.hooks.lightning_modules), capture.attach(module):
                hook("on_{stage}_model_eval", default=module.eval)
                hook("on_{stage}_start")
                hook("on_{stage}_epoch_start")
                for batch_idx, batch in enumerate(data.batches(batch_size)):
                    if self._calls.transfer:
                        batch = self._transfer(batch)
                    capture.batch_size = len(batch[0])
                    hook("on_{stage}_batch_start", batch, batch_idx)
                    with self._forward_context():
                        out = step(batch, batch_idx)
                    hook("on_{stage}_batch_end", out, batch, batch_idx)
                hook("on_{stage}_epoch_end")
                hook("on_{stage}_end")
                hook("on_{stage}_model_train", default=None)
        finally:
            trainer.training, trainer.validating, trainer.testing = True, False, False
        module.train(was_training)
        return capture.results()

    def _eval_hooks(self, stage: str) -> Any:
        module, overridden = self.module, self.hooks.overridden

        def call(template: str, *args: Any, default: Any = None) -> Any:
            name = template.format(stage=stage)
            if name in overridden:
                return getattr(module, name)(*args)
            return default() if default is not None else None

        return call


def _fabric_precision() -> type:
    from lightning.fabric.plugins.precision.precision import Precision

    return Precision


def _eval_step(module: nn.Module, stage: str) -> tuple[str, Any]:
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
