"""Local training of one client: one loop over the user's LightningModule, in ``lightning.Trainer``'s order.

No ``lightning.Trainer`` is built per client visit (a Trainer plus ``fit()`` costs ~4 ms per visit, ~10x a
small client's whole training). One worker module is reused; the global weights are copied into it in place;
the client's data is already on the device. A visit is one Lightning ``fit`` of one client from the global
weights: the module's hooks run in Lightning's order for automatic optimization (which ones, and how a visit
differs from ``Trainer.fit``, is listed in ``docs/lightning_contract.md`` and :data:`TRAIN_HOOKS`), with
``self.trainer`` a small stand-in (:class:`~lightfed.lightning_compat.ClientTrainer`; the hook tables and
what is refused are in :mod:`lightfed.lightning_hooks`). Hooks a module does not override
cost nothing per step: which ones it does is read once, when the :class:`LocalTrainer` is built.

The loop has three named seams a local-training variant overrides instead of copying the loop (DP-SGD does):
:meth:`LocalTrainer.train_batches` (where batches come from), :meth:`LocalTrainer.backward` and
:meth:`LocalTrainer.optimizer_step`; plus :meth:`LocalTrainer.visit_optimizer` (the visit's optimizer) and
:meth:`LocalTrainer.visit_scope` (set-up and tear-down around a visit).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightfed.context import ClientContext, LogSink, step_loss
from lightfed.data.client_data import ClientData
from lightfed.lean_optim import LeanOptimizer
from lightfed.lightning_compat import ClientStrategy, ClientTrainer, LogCapture, batch_size_of
from lightfed.lightning_hooks import (
    EVAL_HOOKS,
    REFUSED_HOOKS,
    REUSABLE_OPTIMIZERS,
    TRAIN_HOOKS,
    BoundHooks,
    ModuleHooks,
    SchedulerConfig,
    check_manual,
    eval_step,
    hook_error,
    parse_optimizers,
    say_not_evaluated,
)
from lightfed.messages import ClientUpdate
from lightfed.params import ParamSpec
from lightfed.seeding import derive_seed
from lightfed.strategy import Strategy

__all__ = [
    "EVAL_HOOKS", "REFUSED_HOOKS", "REUSABLE_OPTIMIZERS", "TRAIN_HOOKS", "LocalTrainer", "LogCapture", "LogSink",
    "ModuleHooks", "parse_optimizers", "seed_batch_order",
]


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


def seed_batch_order(
    generator: torch.Generator, seed: int, round_idx: int, client_id: int, epoch: int
) -> torch.Generator:
    """``generator`` seeded for client ``client_id``'s batch order in local epoch ``epoch`` of round ``round_idx``.

    The one rule every executor follows: the order is ``ClientData.order(generator)`` (a ``randperm`` of the
    client's examples) with the generator seeded by ``derive_seed(seed, "batches", round, client, epoch)``.
    """
    generator.manual_seed(derive_seed(seed, "batches", round_idx, client_id, epoch))
    return generator


class LocalTrainer:
    """Trains clients one after another on one reused worker module.

    Args:
        module: The worker's LightningModule (already on the device, precision applied). Its submodules'
            train/eval modes at construction are the ones every visit starts from (a frozen backbone left in
            eval mode stays in eval mode, as ``lightning.Trainer.fit`` keeps it).
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
        ValueError: For flags out of range, a hook in :data:`REFUSED_HOOKS`, or manual optimization with
            gradient clipping, accumulation or a strategy that changes the loss.
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
        if self.hooks.manual:
            check_manual(module, strategy, gradient_clip_val, int(accumulate_grad_batches))
        if not self.hooks.evaluable:
            say_not_evaluated(module)
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
        self._modes = [m.training for m in self._submodules]  # the user's per-submodule modes, kept every visit
        self._global_ref: Tensor | None = None
        self._global_views: list[Tensor] = []
        self._detached: list[Tensor] = []
        self._flat_views: list[Tensor] | None = None
        self._batch_gen = torch.Generator()  # reseeded per (round, client, epoch); ClientData.batches is eager
        self._calls = BoundHooks(module, self.hooks)
        self._strategy_loss = "client_loss" in strategy.client_hooks
        self._strategy_grads = "on_before_optimizer_step" in strategy.client_hooks
        # Fabric's 32-bit Precision only forwards the calls: skipped on the hot path
        self._precision = None if precision is None or type(precision) is _fabric_precision() else precision
        self._scaler = getattr(precision, "scaler", None)  # 16-mixed: hooks and clipping see unscaled gradients
        self._reusable: tuple[Optimizer, list[dict[str, Any]]] | None = None
        self._lean: LeanOptimizer | None = None  # the reused optimizer's step / zero_grad without profiler ranges
        self._reuse_checked = False
        self._ctx: ClientContext | None = None  # the visit in progress (manual optimization's steps count in it)
        self.trainer = ClientTrainer(
            max_epochs=None if local_steps is not None else local_epochs, max_steps=local_steps or -1,
            accumulate_grad_batches=self.accumulate_grad_batches, gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=gradient_clip_algorithm,
            strategy=ClientStrategy(self._manual_backward, self._manual_step),
        )
        self.trainer.model = module
        self.trainer.strategy.lightning_module = module

    def settings(self) -> dict[str, Any]:
        """The keyword arguments that rebuild this trainer's loop (for wrappers such as DP-SGD's)."""
        return dict(
            precision=self.precision, local_epochs=self.local_epochs, local_steps=self.local_steps,
            batch_size=self.batch_size, seed=self.seed, gradient_clip_val=self.gradient_clip_val,
            gradient_clip_algorithm=self.gradient_clip_algorithm,
            accumulate_grad_batches=self.accumulate_grad_batches, reuse_optimizer=self.reuse_optimizer,
        )

    @property
    def evaluates(self) -> bool:
        """Whether the module can be evaluated (it defines ``validation_step`` or ``test_step``)."""
        return self.hooks.evaluable

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
        """Every submodule back in the mode it had when the loop was built (normally: training).

        ``lightning.Trainer.fit`` does not switch submodules the user put in eval mode (a frozen BatchNorm
        backbone) to training mode, so neither does a visit; nothing is done when the modes already match.
        """
        if any(m.training is not t for m, t in zip(self._submodules, self._modes)):
            for m, t in zip(self._submodules, self._modes):
                m.training = t

    def _forward_context(self) -> contextlib.AbstractContextManager:
        return self._precision.forward_context() if self._precision is not None else contextlib.nullcontext()

    # ------------------------------------------------------------------ optimizer
    def make_optimizers(self) -> tuple[list[Optimizer], list[SchedulerConfig]]:
        """Fresh optimizers and their schedulers from the module's ``configure_optimizers`` (one, unless the
        module uses manual optimization)."""
        return parse_optimizers(self.module.configure_optimizers(), manual=self.hooks.manual)

    def make_optimizer(self) -> tuple[Optimizer, list[SchedulerConfig]]:
        """A fresh optimizer (the first, under manual optimization) and the schedulers."""
        optimizers, schedulers = self.make_optimizers()
        return optimizers[0], schedulers

    def _reset(self, optimizer: Optimizer, groups: list[dict[str, Any]]) -> Optimizer:
        optimizer.state.clear()
        for group, hyper in zip(optimizer.param_groups, groups):
            group.update(hyper)
        return optimizer

    def _first_optimizer(self) -> tuple[list[Optimizer], list[SchedulerConfig]]:
        """The run's first ``configure_optimizers``: decides whether later visits reuse its optimizer.

        It runs with a copy of the visit's ``self.trainer`` (``estimated_stepping_batches`` already right)
        that records whether it was read.
        """
        probe = self.trainer.probe()
        with probe.attached(self.hooks.lightning_modules):
            optimizers, schedulers = self.make_optimizers()
        self._reuse_checked = True
        optimizer = optimizers[0]
        if (
            self.reuse_optimizer and len(optimizers) == 1 and not self.hooks.manual and not schedulers
            and not probe.touched and type(optimizer) in REUSABLE_OPTIMIZERS and not optimizer.state
            and not optimizer._optimizer_step_pre_hooks and not optimizer._optimizer_step_post_hooks
        ):
            groups = [{k: v for k, v in g.items() if k != "params"} for g in optimizer.param_groups]
            self._reusable = (optimizer, [dict(g) for g in groups])
            self._lean = LeanOptimizer(optimizer)
        return optimizers, schedulers

    def visit_optimizer(self, ctx: ClientContext, data: ClientData) -> tuple[list[Optimizer], list[SchedulerConfig]]:
        """Seam: the visit's optimizers and schedulers (a reset reused optimizer, or ``configure_optimizers``)."""
        if self._reusable is not None:
            return [self._reset(*self._reusable)], []
        if not self._reuse_checked:
            return self._first_optimizer()
        return self.make_optimizers()

    # ------------------------------------------------------------------ seams
    def train_batches(self, ctx: ClientContext, data: ClientData, epoch: int) -> Iterable[Any]:
        """Seam: the batches of local epoch ``epoch`` (:meth:`batches_per_epoch` of them)."""
        return self.shuffled_batches(ctx, data, epoch)

    def batches_per_epoch(self, data: ClientData) -> int:
        """Seam: how many batches :meth:`train_batches` yields per epoch (the last one ends the epoch)."""
        return -(-len(data) // self.batch_size)

    def shuffled_batches(self, ctx: ClientContext, data: ClientData, epoch: int) -> Iterator[Any]:
        """The client's batches for ``epoch`` in the order of :func:`seed_batch_order` (what ``ctx.batches``
        gives strategies that run extra passes)."""
        gen = seed_batch_order(self._batch_gen, self.seed, ctx.round_idx, ctx.client_id, epoch)
        return data.batches(self.batch_size, gen)

    def backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """Seam: gradients of ``loss`` into ``.grad`` (through the precision plugin); ``args`` / ``kwargs``
        (``retain_graph=True`` from ``manual_backward``) go to ``backward``."""
        if self._precision is not None:
            self._precision.backward(loss, self.module, *args, **kwargs)
        else:
            loss.backward(*args, **kwargs)

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
        """Train client ``client_id`` from ``global_params``; return its update (local - global).

        Raises:
            ModuleHookError: One of the module's hooks raised; names the hook, keeps the message (and the
                original exception as ``__cause__``).
        """
        try:
            return self._visit(client_id, round_idx, data, global_params, state, payload)
        except Exception as err:
            wrapped = hook_error(err, self.hooks.lightning_modules)
            if wrapped is None:
                raise
            raise wrapped from err

    def _visit(
        self, client_id: int, round_idx: int, data: ClientData, global_params: Tensor,
        state: dict[str, Tensor] | None, payload: dict[str, Any] | None,
    ) -> ClientUpdate:
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
        trainer.num_training_batches = self.batches_per_epoch(data)
        trainer.lr_scheduler_configs = []
        capture = LogCapture()
        with trainer.attached(self.hooks.lightning_modules), capture.attach(self.module):
            with self.visit_scope(ctx, data) as extra:
                optimizers, schedulers = self.visit_optimizer(ctx, data)
                ctx.optimizer = optimizers[0]
                trainer.optimizers, trainer.lr_scheduler_configs = optimizers, schedulers
                self.strategy.on_client_start(ctx)
                self._ctx = ctx
                loss = self._fit(ctx, data, ctx.optimizer, schedulers, capture)
                self._ctx = None
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
        accumulate, local_steps, manual = self.accumulate_grad_batches, self.local_steps, self.hooks.manual
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
                bs = batch_size_of(batch)
                capture.batch_size = bs
                if manual:  # training_step steps the optimizers itself; Lightning steps no scheduler
                    out = self._manual_train_step(batch, batch_idx, losses, bs)
                else:
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

    def _manual_train_step(self, batch: Any, batch_idx: int, losses: list[tuple[Tensor | float, int]], bs: int) -> Any:
        """Manual optimization: ``training_step`` zeroes, backpropagates (``manual_backward``) and steps
        (``self.optimizers()``) itself; what it returns is logged as the batch's loss, as Lightning does."""
        with self._forward_context():
            out = self.module.training_step(batch, batch_idx)
        loss = step_loss(out)
        if isinstance(loss, Tensor):
            losses.append((loss.detach(), bs))
        return out

    def _manual_backward(self, loss: Tensor, *args: Any, **kwargs: Any) -> None:
        """``self.manual_backward(loss)``: the backward hooks around the loop's backward."""
        h = self._calls
        if h.on_before_backward is not None:
            h.on_before_backward(loss)
        self.backward(loss, *args, **kwargs)
        if h.on_after_backward is not None:
            h.on_after_backward()

    def _manual_step(self, optimizer: Optimizer) -> None:
        """A ``LightningOptimizer.step()`` of manual optimization (after its closure ran): the strategy's
        gradient hook, ``on_before_optimizer_step``, the step; ``global_step`` counts it."""
        ctx = self._ctx
        if self._scaler is not None:
            self.precision.unscale_gradients(optimizer)
        if self._strategy_grads and ctx is not None:
            self.strategy.on_before_optimizer_step(ctx)
        if self._calls.on_before_optimizer_step is not None:
            self._calls.on_before_optimizer_step(optimizer)
        self.optimizer_step(optimizer)
        if ctx is not None:
            ctx.step += 1
            self.trainer.global_step = ctx.step

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
        ``validation`` ones) are called around it in Lightning's order; every submodule's train/eval mode is
        restored afterwards (as Lightning's evaluation loop does, unless ``on_{stage}_model_train`` is
        overridden). Returns the batch-size-weighted means of what the step and the hooks logged; ``{}`` for a
        module with neither step (said once, when the loop is built).

        Raises:
            ModuleHookError: One of the module's hooks raised.
        """
        if not self.hooks.evaluable:
            return {}
        try:
            return self._evaluate(data, params, stage, batch_size)
        except Exception as err:
            wrapped = hook_error(err, self.hooks.lightning_modules)
            if wrapped is None:
                raise
            raise wrapped from err

    def _evaluate(self, data: ClientData, params: Tensor, stage: str, batch_size: int) -> dict[str, float]:
        module = self.module
        self.spec.assign(self.tensors, params)
        name, step = eval_step(module, stage)
        stage_name = name.removesuffix("_step")
        hook = self._eval_hooks(stage_name)
        modes = [m.training for m in self._submodules]
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
                    capture.batch_size = batch_size_of(batch)
                    hook("on_{stage}_batch_start", batch, batch_idx)
                    with self._forward_context():
                        out = step(batch, batch_idx)
                    hook("on_{stage}_batch_end", out, batch, batch_idx)
                hook("on_{stage}_epoch_end")
                hook("on_{stage}_end")
                hook("on_{stage}_model_train", default=None)
        finally:
            trainer.training, trainer.validating, trainer.testing = True, False, False
        if f"on_{stage_name}_model_train" not in self.hooks.overridden:
            for m, t in zip(self._submodules, modes):
                m.training = t
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
