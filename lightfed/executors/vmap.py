r"""Vectorised client training: a whole cohort in one ``torch.func`` program (``trainer.executor: vmap``).

The sequential executor runs ``sum_k s_k`` small optimizer steps for a cohort whose client ``k`` takes
``s_k`` steps; for clients of a few dozen examples each step is mostly Python and kernel-launch overhead.
This executor stacks the cohort's weights along a new leading dimension, ``W[k] = w_global`` for
``k = 1..K``, and runs ``max_k s_k`` *vectorised* steps instead:

.. math::

    \ell_k(W_k) = \frac{\sum_{i \in b_{k,t}} m_{k,i} \, \ell(W_k; x_i, y_i)}{\sum_i m_{k,i}}, \qquad
    g_k = \nabla_{W_k} \, \ell_k(W_k) = \nabla_{W_k} \sum_j \ell_j(W_j), \qquad
    W_k \leftarrow \mathrm{SGD}(W_k, g_k)

Batch ``b_{k,t}`` is client ``k``'s ``t``-th batch in exactly the order the sequential executor uses
(:meth:`ClientData.order` with :func:`lightfed.client.seed_batch_order`), padded to the
batch size with mask ``m_{k,i} = 0``. The clients' losses are computed by ``torch.func.vmap`` over
clients of a ``functional_call`` of the module with client ``k``'s weights; since the clients are
independent, one ordinary backward pass of ``sum_k l_k`` gives every ``g_k`` in its own slice. Clients
are sorted by their number of steps, so the clients still training at step ``t`` are a prefix of the
stack and finished clients cost nothing. The per-example losses come from one of two programs:

* ``cross_entropy`` - when ``training_step`` is ``cross_entropy(self(x), y)`` and logs nothing (checked
  on a real batch before the first round): one forward of the padded batch per client and
  ``cross_entropy(..., reduction="none")``;
* ``training_step`` - anything else: the module's own ``training_step`` on batches of one example,
  ``vmap``-ed over the batch (what it ``self.log``-s is averaged like the sequential executor does).

The strategy's :meth:`~lightfed.strategy.Strategy.client_loss` (FedProx's proximal term) is applied to
each client's batch loss inside the same program, with the module's parameters swapped for the
client's; ``on_client_start`` runs there too, before it, with fresh ``ctx.extras`` (enough for hooks that
cache references to the live weights, as FedProx does).

The result equals the sequential executor's up to float rounding when

* the loss ``training_step`` returns for a batch is the mean of its per-example losses (cross-entropy or
  MSE with ``reduction="mean"``, no class weights); this is checked on a real batch;
* the model has no batch statistics (BatchNorm: GroupNorm and LayerNorm are fine) and no random ops
  (dropout): a random op raises, it is never silently made deterministic;
* the module overrides none of the training hooks the sequential loop calls
  (:data:`lightfed.client.TRAIN_HOOKS`, checked with the same :class:`~lightfed.client.ModuleHooks`), and
  the loop uses neither ``gradient_clip_val`` nor ``accumulate_grad_batches``; evaluation hooks are fine;
* the optimizer from ``configure_optimizers`` is ``torch.optim.SGD`` (lr, momentum, dampening,
  nesterov, weight decay, maximize, per parameter group) without schedulers, and precision is 32-bit;
* the strategy's client side is at most ``on_client_start``, ``client_loss`` (a function of the weights,
  the loss and the round's payload, the same for every client: checked) and ``on_client_end``;
  strategies with ``on_before_optimizer_step`` (SCAFFOLD, FedNova) or client state, and privacy
  mechanisms that replace the local trainer (DP-SGD), are refused.

Anything else raises :class:`VmapUnsupportedError` naming the cause, before training; and before its
first round the executor trains the round's largest client both ways for :data:`PROBE_STEPS` steps and
refuses to go on if the updates differ.

Memory is O(cohort x model): the stacked weights, their gradients and momentum buffers.
``training_step`` receives the ``batch_idx`` of the cohort's longest client (exact for one local epoch).

References: Horace He, Richard Zou et al., "functorch: JAX-like composable function transforms for
PyTorch" (2021), whose model-ensembling and per-sample-gradient recipes this executor combines.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor
from torch.func import functional_call, vmap

from lightfed.client import LocalTrainer, seed_batch_order
from lightfed.context import ClientContext
from lightfed.data.client_data import ClientData
from lightfed.executors.base import Executor
from lightfed.executors.functional import LogRecorder, SwapCall, gather, gather_each, swap_names
from lightfed.executors.sgd import SGDHyper, sgd_hypers
from lightfed.executors.support import (
    FIX,
    VmapUnsupportedError,
    check_tensor_batches,
    check_vectorisable,
    overrides,
)
from lightfed.messages import ClientUpdate
from lightfed.registry import EXECUTORS

__all__ = ["PROBE_STEPS", "VmapExecutor"]

@EXECUTORS.register("vmap")
class VmapExecutor(Executor):
    """Trains the whole cohort at once with ``torch.func`` (see the module docstring for the math).

    Before its first round it checks, on real data, what it cannot know from the code: which loss
    program applies, that ``training_step`` vectorises over examples and its loss is their mean, that
    ``client_loss`` does not depend on which client it runs for, and that the round's largest client
    trained by both executors for :data:`PROBE_STEPS` steps gets the same update (rtol ``1e-3``, atol
    ``1e-5`` x its largest entry).

    Args:
        loss: ``"auto"`` (the ``cross_entropy`` program when the check shows ``training_step`` is
            ``cross_entropy(self(x), y)``, else ``training_step``), ``"training_step"`` or
            ``"cross_entropy"`` (an error if the check fails).
        verify: Run the checks above. ``False`` skips them (``"auto"`` then means ``"training_step"``);
            a set-up they would reject then trains wrongly.
        rtol: Relative tolerance of the loss checks.
        atol: Absolute tolerance of the loss checks.

    Raises:
        VmapUnsupportedError: In :meth:`setup` or the first :meth:`run`, for a set-up it cannot vectorise.
    """

    def __init__(self, loss: str = "auto", verify: bool = True, rtol: float = 1e-4, atol: float = 1e-6) -> None:
        if loss not in _LOSS_MODES:
            raise ValueError(f"trainer.executor.init_args.loss must be one of {_LOSS_MODES}, got {loss!r}.")
        self.loss = loss
        self.verify = verify
        self.rtol, self.atol = rtol, atol
        self._checked = False
        self._fast = loss == "cross_entropy"

    @property
    def program(self) -> str | None:
        """The loss program in use (``"cross_entropy"`` or ``"training_step"``); ``None`` before the first round."""
        if not self._checked:
            return None
        return "cross_entropy" if self._fast else "training_step"

    def setup(self, local: LocalTrainer) -> None:
        check_vectorisable(local)
        super().setup(local)
        self.module = local.module
        self.spec = local.spec
        self.strategy = local.strategy
        self._call = SwapCall(local.module)
        self._keys = swap_names(local.module, local.spec.names)
        self._recorder = LogRecorder()
        self._ctx: ClientContext | None = None
        self._has_start = overrides(local.strategy, "on_client_start")
        self._has_client_loss = overrides(local.strategy, "client_loss")
        self._forward_fn = vmap(self._forward, randomness="error")
        self._examples_fn = vmap(self._client_examples, in_dims=(0, 0, None), randomness="error")
        self._hooks_fn = vmap(self._hooks, randomness="error")
        self._checked = False
        self._fast = self.loss == "cross_entropy"

    # ------------------------------------------------------------------ the vectorised program
    def _swapped(self, params: dict[str, Tensor], fn: Callable[..., Any], *args: Any) -> Any:
        """``fn(*args)`` with the module's payload tensors replaced by ``params``."""
        swap = {key: v for n, v in params.items() for key in self._keys[n]}
        return functional_call(self._call, swap, (fn, *args), tie_weights=False)

    def _training_loss(self, batch: tuple[Tensor, ...], batch_idx: int) -> Tensor:
        out = self.module.training_step(batch, batch_idx)
        if out is None:
            raise VmapUnsupportedError(f"training_step returned None (a skipped batch) for a client batch. {FIX}")
        return out["loss"] if isinstance(out, dict) else out

    def _example_loss(
        self, params: dict[str, Tensor], example: tuple[Tensor, ...], batch_idx: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``training_step`` on a batch of one example (vmapped over the batch's examples)."""
        self._recorder.values = {}
        batch = tuple(t.unsqueeze(0) for t in example)
        loss = self._swapped(params, self._training_loss, batch, batch_idx)
        return loss, dict(self._recorder.values)

    def _client_hooks(self, ctx: ClientContext, loss: Tensor) -> Tensor:
        """``on_client_start`` (fresh ``ctx.extras``) then ``client_loss``, on the swapped-in weights."""
        ctx.extras = {}
        if self._has_start:
            self.strategy.on_client_start(ctx)
        return self.strategy.client_loss(ctx, loss) if self._has_client_loss else loss

    def _grads(
        self, params: dict[str, Tensor], batch: tuple[Tensor, ...], mask: Tensor, batch_idx: int, trained: list[str]
    ) -> tuple[tuple[Tensor | None, ...], Tensor, dict[str, Tensor]]:
        """Per-client gradients of the ``trained`` tensors (stacked), the clients' losses and logged sums.

        The clients are independent, so one backward pass of the sum of their losses gives each client's
        gradient in its own slice (cheaper than ``vmap(grad(...))``, which nests one more transform).
        """
        with torch.enable_grad():
            leaves = {n: p.detach().requires_grad_(n in trained) for n, p in params.items()}
            if self._fast:
                losses, sums = self._cross_entropy(leaves, batch), {}
            else:
                losses, logged = self._example_losses(leaves, batch, batch_idx)
                sums = {k: torch.where(mask, v.reshape(mask.shape), 0.0).sum(1).detach() for k, v in logged.items()}
            loss = torch.where(mask, losses, 0.0).sum(1) / mask.sum(1).clamp(min=1)
            if self._has_start or self._has_client_loss:
                loss = self._hooks_fn(leaves, loss)
            grads = torch.autograd.grad(loss.sum(), [leaves[n] for n in trained], allow_unused=True) if trained else ()
        return grads, loss.detach(), sums

    def _cross_entropy(self, params: dict[str, Tensor], batch: tuple[Tensor, ...]) -> Tensor:
        """``[k, B]`` per-example cross-entropy of the padded batches: only the forward is vmapped.

        ``-log_softmax(logits)[y]``, the same arithmetic as ``F.cross_entropy`` (which, under ``vmap``,
        would run a Python decomposition of ``nll_loss``).
        """
        logits = self._forward_fn(params, batch[0])
        return -logits.log_softmax(-1).gather(-1, batch[1].unsqueeze(-1)).squeeze(-1)

    def _forward(self, params: dict[str, Tensor], x: Tensor) -> Tensor:
        return self._swapped(params, self.module, x)

    def _example_losses(
        self, params: dict[str, Tensor], batch: tuple[Tensor, ...], batch_idx: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        """``[k, B]`` per-example ``training_step`` losses and logged values (vmap over clients and examples)."""
        return self._examples_fn(params, batch, batch_idx)

    def _client_examples(
        self, params: dict[str, Tensor], batch: tuple[Tensor, ...], batch_idx: int
    ) -> tuple[Tensor, dict[str, Tensor]]:
        return vmap(self._example_loss, in_dims=(None, 0, None))(params, batch, batch_idx)

    def _hooks(self, params: dict[str, Tensor], loss: Tensor) -> Tensor:
        return self._swapped(params, self._client_hooks, self._ctx, loss)

    # ------------------------------------------------------------------ a round
    def run(
        self,
        round_idx: int,
        clients: list[int],
        data: Callable[[int], ClientData],
        global_params: Tensor,
        payload: dict[str, Any],
        states: Callable[[int], dict[str, Tensor]],
    ) -> Iterator[ClientUpdate]:
        if not clients:
            return iter(())
        local = self.local
        datas = [data(c) for c in clients]
        check_tensor_batches(datas[0])
        optimizer, schedulers = local.make_optimizer()
        if schedulers:
            raise VmapUnsupportedError(f"configure_optimizers returned {len(schedulers)} LR scheduler(s). {FIX}")
        hypers = sgd_hypers(optimizer, local.tensors)
        del optimizer
        self._ctx = self._context(clients[0], round_idx, global_params, payload, len(datas[0]))
        if not self._checked and self.verify:
            self._check(round_idx, clients, datas, global_params, payload, hypers)
        self._checked = True
        self.module.train()
        with self._recorder.attach(self.module):
            updates = self._train(round_idx, clients, datas, global_params, hypers)
        if overrides(self.strategy, "on_client_end"):
            updates = [self._client_end(u, round_idx, global_params, payload) for u in updates]
        return iter(updates)

    def _context(
        self, client_id: int, round_idx: int, global_params: Tensor, payload: dict[str, Any], num_examples: int,
        step: int = 0,
    ) -> ClientContext:
        local = self.local
        return ClientContext(
            client_id=client_id, round_idx=round_idx, module=self.module, spec=self.spec,
            global_params=global_params, payload=payload, state={}, num_examples=num_examples,
            batches=lambda epoch: iter(()), make_optimizer=lambda: local.make_optimizer()[0], step=step,
        )

    def _schedule(
        self, round_idx: int, clients: list[int], datas: list[ClientData], max_steps: int | None = None
    ) -> tuple[Tensor, list[int]]:
        """``[K, S, B]`` example indices of every client's steps (``-1`` pads), and each client's step count.

        Client ``k``'s epoch ``e`` starts at step ``e * ceil(n_k / B)`` and fills its steps' slots with
        ``ClientData.order`` of :func:`~lightfed.client.seed_batch_order`; with ``local_steps``
        the last epoch is cut after the last step, as the sequential executor stops there (``max_steps``:
        every client stops after at most that many steps).
        """
        local, bsz = self.local, self.local.batch_size
        sizes = [len(d) for d in datas]
        per_epoch = [-(-n // bsz) for n in sizes]
        steps = [
            0 if n == 0 else (local.local_steps if local.local_steps is not None else p * local.local_epochs)
            for n, p in zip(sizes, per_epoch)
        ]
        if max_steps is not None:
            steps = [min(s, max_steps) for s in steps]
        longest = max(steps)
        sched = torch.full((len(clients), longest * bsz), -1, dtype=torch.long, device=datas[0].indices.device)
        for row, (cid, d, n, p, target) in enumerate(zip(clients, datas, sizes, per_epoch, steps)):
            for epoch in range(-(-target // p) if target else 0):
                first = epoch * p
                take = min(n, (target - first) * bsz)
                order = d.order(seed_batch_order(torch.Generator(), local.seed, round_idx, cid, epoch))
                sched[row, first * bsz : first * bsz + take] = order if take == n else order[:take]
        return sched.view(len(clients), longest, bsz), steps

    def _train(
        self, round_idx: int, clients: list[int], datas: list[ClientData], global_params: Tensor,
        hypers: list[SGDHyper | None], max_steps: int | None = None,
    ) -> list[ClientUpdate]:
        """Train ``clients`` together; their raw updates (before ``on_client_end``), in cohort order."""
        spec = self.spec
        sched, steps = self._schedule(round_idx, clients, datas, max_steps)
        order = sorted(range(len(clients)), key=lambda i: -steps[i])
        sched = sched[order]
        sorted_steps = [steps[i] for i in order]
        num = len(clients)
        pooled = datas[0].tensors
        shared = all(d.tensors is pooled or all(a is b for a, b in zip(d.tensors, pooled)) for d in datas)
        sources = None if shared else [datas[i].tensors for i in order]
        names = spec.names
        hypers_by_name = {n: h for n, h in zip(names, hypers) if h is not None}
        trained = list(hypers_by_name)
        flat = global_params.unsqueeze(0).repeat(num, 1)  # row k: client k's weights; params are views of it
        params = {n: v.view(num, *shape) for n, v, shape in zip(names, flat.split(spec.numels, dim=1), spec.shapes)}
        bufs: dict[str, Tensor | None] = dict.fromkeys(names)
        loss_sum = torch.zeros(num, device=global_params.device)
        seen = torch.zeros(num, device=global_params.device)
        logged: dict[str, Tensor] = {}
        for t in range(sorted_steps[0]):
            k = sum(1 for s in sorted_steps if s > t)
            idx = sched[:k, t]
            mask = idx >= 0
            safe = torch.where(mask, idx, idx[:, :1])
            batch = gather(pooled, safe) if sources is None else gather_each(sources[:k], safe)
            active = {n: p[:k] for n, p in params.items()}
            grads, loss, sums = self._grads(active, batch, mask, t, trained)
            with torch.no_grad():
                for n, g in zip(trained, grads):
                    if g is None:  # no gradient this step: torch.optim.SGD skips the parameter
                        continue
                    buf = bufs[n]
                    new_buf = hypers_by_name[n].step(active[n], g, None if buf is None else buf[:k])
                    if buf is None:  # step 0, when every client with data is active: [k0, ...] from now on
                        bufs[n] = new_buf
            count = mask.sum(1).to(loss_sum.dtype)
            loss_sum[:k].add_(loss * count)
            seen[:k].add_(count)
            for key, v in sums.items():
                acc = logged.setdefault(key, torch.zeros(num, device=loss_sum.device))
                acc[:k].add_(v)
        deltas = flat.sub_(global_params)
        losses = (loss_sum / seen.clamp(min=1)).tolist()
        counts = seen.clamp(min=1).tolist()
        logged_lists = {key: v.tolist() for key, v in logged.items()}
        updates: list[ClientUpdate] = [None] * num  # type: ignore[list-item]
        for pos, i in enumerate(order):
            metrics = {key: vals[pos] / counts[pos] for key, vals in logged_lists.items()}
            metrics["loss"] = losses[pos]
            updates[i] = ClientUpdate(
                client_id=clients[i], delta=deltas[pos], num_examples=len(datas[i]),
                num_steps=sorted_steps[pos], metrics=metrics,
            )
        return updates

    def _client_end(
        self, update: ClientUpdate, round_idx: int, global_params: Tensor, payload: dict[str, Any]
    ) -> ClientUpdate:
        """The strategy's ``on_client_end``, with the module holding the client's local weights."""
        self.spec.assign(self.local.tensors, global_params + update.delta)
        ctx = self._context(update.client_id, round_idx, global_params, payload, update.num_examples, update.num_steps)
        return self.strategy.on_client_end(ctx, update)

    # ------------------------------------------------------------------ checks on real data
    def _check(
        self, round_idx: int, clients: list[int], datas: list[ClientData], global_params: Tensor,
        payload: dict[str, Any], hypers: list[SGDHyper | None],
    ) -> None:
        """Once: the step vectorises, the loss is a per-example mean, ``client_loss`` ignores the client,
        and one client's update equals the sequential executor's."""
        sizes = [len(d) for d in datas]
        if max(sizes) == 0:
            return
        i = sizes.index(max(sizes))  # the most steps: step-dependent differences show
        probe = datas[i]
        batch = tuple(t.index_select(0, probe.indices[: self.local.batch_size]) for t in probe.tensors)
        params = dict(zip(self.spec.names, self.spec.unflatten(global_params)))
        self.spec.assign(self.local.tensors, global_params)
        self.module.train()
        with self._recorder.attach(self.module):
            if self.loss != "training_step":
                why = self._cross_entropy_mismatch(batch)
                if why and self.loss == "cross_entropy":
                    raise VmapUnsupportedError(f"executor loss='cross_entropy' but {why}. Use loss='training_step'.")
                self._fast = not why
            if not self._fast:
                self._check_loss(batch, params)
            if self._has_client_loss:
                self._check_client_loss(params, round_idx, global_params, payload)
            vec = self._train(round_idx, [clients[i]], [probe], global_params, hypers, PROBE_STEPS)[0]
        if overrides(self.strategy, "on_client_end"):
            vec = self._client_end(vec, round_idx, global_params, payload)
        local = self.local
        short = LocalTrainer(local.module, local.spec, local.strategy, **{**local.settings(), "local_steps": vec.num_steps})
        seq = short.fit_client(clients[i], round_idx, probe, global_params, {}, payload)
        scale = max(1.0, float(seq.delta.abs().max()))
        pairs = [("delta", vec.delta, seq.delta)] + [(k, vec.extras.get(k), v) for k, v in seq.extras.items()]
        for what, a, b in pairs:
            if a is None or a.shape != b.shape or not torch.allclose(a, b, rtol=1e-3, atol=1e-5 * scale):
                diff = float((a - b).abs().max()) if a is not None and a.shape == b.shape else float("nan")
                raise VmapUnsupportedError(
                    f"client {clients[i]}'s {what} trained by the vmap executor differs from the sequential "
                    f"executor's (max abs difference {diff:.3g}): something in training_step, "
                    f"{type(self.strategy).__name__}'s client hooks or the optimizer is not vectorised exactly. {FIX}"
                )

    def _cross_entropy_mismatch(self, batch: tuple[Tensor, ...]) -> str:
        """Why ``training_step`` is not ``cross_entropy(self(x), y)`` on ``batch`` ("" when it is)."""
        if len(batch) != 2 or batch[1].is_floating_point() or batch[1].dim() != 1:
            return "batches are not (inputs, integer labels)"
        self._recorder.values = {}
        try:
            with torch.no_grad():
                whole = self._training_loss(batch, 0).detach()
                ce = F.cross_entropy(self.module(batch[0]), batch[1])
        except Exception as err:  # noqa: BLE001 - any failure means "not this form"
            return f"cross_entropy(self(x), y) fails ({type(err).__name__}: {err})"
        if self._recorder.values:
            return f"training_step logs {sorted(self._recorder.values)}"
        if not torch.allclose(whole, ce, rtol=self.rtol, atol=self.atol):
            return f"training_step's loss {float(whole):.6g} is not cross_entropy(self(x), y) = {float(ce):.6g}"
        return ""

    def _check_loss(self, batch: tuple[Tensor, ...], params: dict[str, Tensor]) -> None:
        try:
            with torch.no_grad():
                whole = self._training_loss(batch, 0).detach()
                per_example = vmap(self._example_loss, in_dims=(None, 0, None), randomness="error")(params, batch, 0)[0]
        except VmapUnsupportedError:
            raise
        except Exception as err:  # noqa: BLE001 - re-raised with the fix
            raise VmapUnsupportedError(
                f"training_step of {type(self.module).__name__} could not be vectorised over examples "
                f"({type(err).__name__}: {err}). {FIX}"
            ) from err
        if not torch.allclose(whole, per_example.mean(), rtol=self.rtol, atol=self.atol):
            raise VmapUnsupportedError(
                f"training_step's loss on a batch of {len(batch[0])} examples is {float(whole):.6g}, but the mean "
                f"of its per-example losses is {float(per_example.mean()):.6g}: the loss is not a mean over "
                f"examples (class weights, sum reduction, batch statistics), so padded batches cannot be "
                f"masked exactly. {FIX}"
            )

    def _check_client_loss(
        self, params: dict[str, Tensor], round_idx: int, global_params: Tensor, payload: dict[str, Any]
    ) -> None:
        base = self._ctx
        assert base is not None
        other = self._context(base.client_id + 1, round_idx, global_params, payload, base.num_examples + 7, step=3)
        shifted = {n: p + 0.01 for n, p in params.items()}
        loss = torch.tensor(1.0, device=global_params.device)
        with torch.no_grad():
            a = self._swapped(shifted, self._client_hooks, base, loss)
            b = self._swapped(shifted, self._client_hooks, other, loss)
        if not torch.equal(a, b):
            raise VmapUnsupportedError(
                f"{type(self.strategy).__name__}.client_loss depends on the client (ctx.client_id, num_examples "
                f"or step), not only on the weights, the loss and the round's payload; the vmap executor applies "
                f"one client_loss to the whole cohort. {FIX}"
            )


_LOSS_MODES = ("auto", "training_step", "cross_entropy")

#: Steps of the one-client comparison with the sequential executor before the first round. Enough to
#: exercise momentum, epoch boundaries and step-dependent hooks; longer comparisons measure how a
#: chaotic trajectory amplifies float rounding, not correctness: on W2 (a CNN at lr 0.05) the
#: sequential executor with one and with two threads differs by 2e-7 after 4 steps and by 0.13 after 32.
PROBE_STEPS = 4
