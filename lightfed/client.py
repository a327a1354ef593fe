"""Local training of one client: a lean loop over the user's LightningModule hooks.

No ``lightning.Trainer`` is built per client visit (a Trainer plus ``fit()`` costs ~4 ms per visit,
~10x a small client's whole training). One worker module is reused; the global weights are copied into
it in place; the client's data is already on the device; the optimizer comes from the module's own
``configure_optimizers`` (fresh state per visit). Lightning Fabric's precision plugin still applies
(``precision="bf16-mixed"`` etc.), and what ``training_step`` passes to ``self.log`` is captured as the
client's training metrics.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

import torch
from torch import Tensor, nn
from torch.optim import Optimizer

from lightfed.context import ClientContext
from lightfed.data.client_data import ClientData
from lightfed.messages import ClientUpdate
from lightfed.params import ParamSpec
from lightfed.seeding import derive_seed
from lightfed.strategy import Strategy


class LogSink:
    """Stands in for ``LightningModule.log`` / ``log_dict`` while no Trainer is attached (subclasses: ``log``)."""

    def log(self, name: str, value: Any, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError

    def log_dict(self, dictionary: dict[str, Any], *args: Any, **kwargs: Any) -> None:
        for k, v in dictionary.items():
            self.log(k, v, *args, **kwargs)

    @contextlib.contextmanager
    def attach(self, module: nn.Module) -> Iterator[Any]:
        """Route ``module.log`` and ``module.log_dict`` here for the duration of the block."""
        module.__dict__["log"] = self.log
        module.__dict__["log_dict"] = self.log_dict
        try:
            yield self
        finally:
            module.__dict__.pop("log", None)
            module.__dict__.pop("log_dict", None)


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


def parse_optimizers(out: Any) -> tuple[Optimizer, list[dict[str, Any]]]:
    """Normalise what ``configure_optimizers`` returned into one optimizer and its schedulers.

    Accepts the forms Lightning documents for automatic optimization with one optimizer: an optimizer, a
    list/tuple of one, ``([opt], [sched])``, or a dict ``{"optimizer": ..., "lr_scheduler": ...}``.
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
    norm = [s if isinstance(s, dict) else {"scheduler": s, "interval": "epoch"} for s in scheds]
    return opt, norm


class LocalTrainer:
    """Trains clients one after another on one reused worker module.

    Args:
        module: The worker's LightningModule (already on the device, precision applied).
        spec: The payload layout.
        strategy: Its client-side hooks run inside the loop.
        precision: A Lightning Fabric precision plugin (``fabric.strategy.precision``); ``None`` is fp32.
        local_epochs: Passes over the client's data per visit (ignored if ``local_steps`` is set).
        local_steps: Exact number of optimizer steps per visit (cycling through the data).
        batch_size: Local batch size.
        seed: Run seed; batch order and the RNG of the visit (dropout) derive from (seed, round, client).
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
    ) -> None:
        if getattr(module, "automatic_optimization", True) is False:
            raise ValueError("lightfed clients need automatic optimization; the module sets automatic_optimization=False.")
        self.module = module
        self.spec = spec
        self.strategy = strategy
        self.precision = precision
        self.local_epochs = local_epochs
        self.local_steps = local_steps
        self.batch_size = batch_size
        self.seed = seed
        self.tensors = spec.tensors(module)
        self._submodules = list(module.modules())
        self._global_ref: Tensor | None = None
        self._global_views: list[Tensor] = []
        self._flat_views: list[Tensor] | None = None
        self._batch_gen = torch.Generator()  # reseeded per (round, client, epoch); ClientData.batches is eager

    # ------------------------------------------------------------------ helpers
    @torch.no_grad()
    def load_global(self, global_params: Tensor) -> None:
        """Copy ``global_params`` into the worker module in place.

        The views of the flat vector are cut once per global vector (once per round), not once per client.
        """
        if global_params is not self._global_ref:
            self._global_ref = global_params
            self._global_views = self.spec.unflatten(global_params)
        torch._foreach_copy_(self.tensors, self._global_views)

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
        return self.precision.forward_context() if self.precision is not None else contextlib.nullcontext()

    def _backward(self, loss: Tensor) -> None:
        if self.precision is not None:
            self.precision.backward(loss, self.module)
        else:
            loss.backward()

    def _optimizer_step(self, optimizer: Optimizer) -> None:
        if self.precision is not None:
            self.precision.optimizer_step(optimizer)
        else:
            optimizer.step()

    def make_optimizer(self) -> tuple[Optimizer, list[dict[str, Any]]]:
        return parse_optimizers(self.module.configure_optimizers())

    def training_loss(self, batch: Any, batch_idx: int) -> Tensor | None:
        with self._forward_context():
            out = self.module.training_step(batch, batch_idx)
        if out is None:
            return None
        return out["loss"] if isinstance(out, dict) else out

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
        module = self.module
        self.load_global(global_params)
        self.train_mode()
        seed_device_rng(derive_seed(self.seed, "client_rng", round_idx, client_id), global_params.device)

        def batches(epoch: int) -> Iterator[Any]:
            # the stream of make_generator(seed, "batches", round, client, epoch), without a new Generator
            self._batch_gen.manual_seed(derive_seed(self.seed, "batches", round_idx, client_id, epoch))
            return data.batches(self.batch_size, self._batch_gen)

        ctx = ClientContext(
            client_id=client_id, round_idx=round_idx, module=module, spec=self.spec,
            global_params=global_params, payload=payload or {}, state=state if state is not None else {},
            num_examples=len(data), batches=batches, make_optimizer=lambda: self.make_optimizer()[0],
            forward_context=self._forward_context,
        )
        optimizer, schedulers = self.make_optimizer()
        ctx.optimizer = optimizer
        self.strategy.on_client_start(ctx)
        capture = LogCapture()
        losses: list[tuple[Tensor | float, int]] = []  # (batch loss, batch size); summed once at the end
        with capture.attach(module):
            epoch = 0
            while True:
                for batch_idx, batch in enumerate(batches(epoch)):
                    bs = len(batch[0])
                    capture.batch_size = bs
                    loss = self.training_loss(batch, batch_idx)
                    if loss is None:
                        continue
                    loss = self.strategy.client_loss(ctx, loss)
                    optimizer.zero_grad(set_to_none=True)
                    self._backward(loss)
                    self.strategy.on_before_optimizer_step(ctx)
                    self._optimizer_step(optimizer)
                    ctx.step += 1
                    losses.append((loss.item() if loss.device.type == "cpu" else loss.detach(), bs))
                    for s in schedulers:
                        if s.get("interval", "epoch") == "step":
                            s["scheduler"].step()
                    if self.local_steps is not None and ctx.step >= self.local_steps:
                        break
                epoch += 1
                for s in schedulers:
                    if s.get("interval", "epoch") == "epoch":
                        s["scheduler"].step()
                if self.local_steps is not None:
                    if ctx.step >= self.local_steps or len(data) == 0:
                        break
                elif epoch >= self.local_epochs:
                    break
        metrics = capture.results()
        metrics["loss"] = sum(float(v) * n for v, n in losses) / max(sum(n for _, n in losses), 1)
        local = self.local_params()
        update = ClientUpdate(
            client_id=client_id, delta=local - global_params, num_examples=len(data),
            num_steps=ctx.step, metrics=metrics,
        )
        return self.strategy.on_client_end(ctx, update)

    # ------------------------------------------------------------------ evaluation
    @torch.no_grad()
    def evaluate(self, data: ClientData, params: Tensor, stage: str = "test", batch_size: int = 256) -> dict[str, float]:
        """Run the module's ``test_step`` (or ``validation_step``) over ``data`` with payload ``params``.

        Returns the batch-size-weighted means of what the step logged.
        """
        module = self.module
        self.spec.assign(self.tensors, params)
        step = _eval_step(module, stage)
        was_training = module.training
        module.eval()
        capture = LogCapture()
        with capture.attach(module):
            for batch_idx, batch in enumerate(data.batches(batch_size)):
                capture.batch_size = len(batch[0])
                with self._forward_context():
                    step(batch, batch_idx)
        module.train(was_training)
        return capture.results()


def _eval_step(module: nn.Module, stage: str) -> Any:
    import lightning as L

    order = ["test_step", "validation_step"] if stage == "test" else ["validation_step", "test_step"]
    for name in order:
        fn = getattr(type(module), name, None)
        if fn is not None and fn is not getattr(L.LightningModule, name, None):
            return getattr(module, name)
    raise ValueError(
        f"{type(module).__name__} defines neither test_step nor validation_step: lightfed evaluates the global "
        f"model with them. Add a step that logs e.g. self.log('{stage}_acc', acc)."
    )
