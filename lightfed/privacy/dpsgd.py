"""Sample-level DP-SGD inside each client with Opacus (Abadi et al. 2016, "Deep Learning with DP").

The unit of privacy is one training example of one client. Every local step draws a Poisson batch (each
of the client's ``n`` examples independently with probability ``p = min(1, B / n)``), computes
per-example gradients (Opacus ``GradSampleModule`` hooks on the user's LightningModule, which runs its
own ``training_step``), clips each to ``max_grad_norm`` and adds ``N(0, (z * max_grad_norm)^2)`` to their
sum before dividing by the expected batch size ``p n`` (Opacus ``DPOptimizer``). Each client's accountant
composes ``PoissonSampledDpEvent(p, GaussianDpEvent(z))`` once per step over every round in which the
client took part; it lives in the mechanism's state, keyed by client id, and is checkpointed.

Opacus traps handled here: its Lightning datamodule targets the old ``pytorch_lightning`` namespace, so
lightfed draws the Poisson batches itself; wrapping the same module again in a later round fails with
"Trying to add hooks twice", so the hooks are removed after every visit; BatchNorm mixes examples of a
batch and has no per-example gradient, so it is refused with a pointer to GroupNorm or
``opacus.validators.ModuleValidator.fix``.
"""

from __future__ import annotations

import contextlib
import math
import statistics
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightfed.client import LocalTrainer
from lightfed.context import ClientContext
from lightfed.data.client_data import ClientData
from lightfed.lightning_compat import SchedulerConfig
from lightfed.messages import RunInfo
from lightfed.privacy.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    AccountantName,
    SamplingScheme,
    calibrate_noise_multiplier,
    epsilon_for,
)
from lightfed.privacy.base import NoisePlan, PrivacyMechanism, check_noise_budget, check_positive
from lightfed.registry import PRIVACY
from lightfed.seeding import make_generator

#: Metric a DP-SGD client reports: the number of noisy steps it took (the server's accountant reads it).
STEPS_METRIC = "dp_steps"


def require_opacus() -> Any:
    """Import ``opacus`` or explain how to install it."""
    try:
        import opacus
    except ImportError as err:  # pragma: no cover - CI installs it
        raise ImportError("lightfed's DP-SGD needs Opacus: pip install -e \".[privacy]\" in a checkout") from err
    return opacus


def check_opacus_module(module: nn.Module) -> None:
    """Refuse modules Opacus cannot compute per-example gradients for (BatchNorm first and clearly)."""
    opacus = require_opacus()
    batchnorm = [name for name, m in module.named_modules() if isinstance(m, nn.modules.batchnorm._BatchNorm)]
    if batchnorm:
        raise ValueError(
            f"DP-SGD cannot train {type(module).__name__}: it has BatchNorm layers {batchnorm[:4]}, which mix the "
            f"examples of a batch, so no per-example gradient (and no per-example privacy) exists. Replace them "
            f"with GroupNorm (lightfed.models.CNNClassifier uses GroupNorm), or convert the model with "
            f"`opacus.validators.ModuleValidator.fix(model)` before training."
        )
    errors = opacus.validators.ModuleValidator.validate(module, strict=False)
    if errors:
        raise ValueError(
            f"Opacus cannot compute per-example gradients for {type(module).__name__}: "
            f"{'; '.join(str(e) for e in errors[:4])}. Try `opacus.validators.ModuleValidator.fix(model)`."
        )


def dpsgd_schedule(num_examples: int, batch_size: int, local_epochs: int, local_steps: int | None) -> tuple[float, int]:
    """Poisson rate ``p = min(1, B / n)`` and the number of steps per visit (``local_steps``, or
    ``local_epochs * max(1, round(n / B))`` as Opacus counts an epoch)."""
    n = max(int(num_examples), 1)
    rate = min(1.0, batch_size / n)
    steps = local_steps if local_steps is not None else local_epochs * max(1, round(n / batch_size))
    return rate, int(steps)


@PRIVACY.register("DPSGD")
class DPSGD(PrivacyMechanism):
    """Sample-level DP-SGD in every client (Opacus), with a per-client accountant kept across rounds.

    Args:
        max_grad_norm: Per-example gradient clip.
        noise_multiplier: ``z`` of every step. Give this or ``target_epsilon``.
        target_epsilon: Calibrate ``z`` per client (from its ``p = B / n`` and steps per visit) so that a
            client that takes part in every round spends at most this.
        delta: The delta of every client's epsilon (should be below ``1 / n`` of the largest client).
        accountant: ``"pld"`` (default) or ``"rdp"``.
        secure_mode: Opacus's floating-point-attack-resistant noise (slower).
        verbose: Print the plan.
    """

    def __init__(
        self,
        max_grad_norm: float = 1.0,
        noise_multiplier: float | None = None,
        target_epsilon: float | None = None,
        delta: float = 1e-5,
        accountant: AccountantName = "pld",
        secure_mode: bool = False,
        verbose: bool = True,
    ) -> None:
        check_positive(max_grad_norm, "max_grad_norm")
        check_noise_budget(  # delta is required here (a float), and DP-SGD needs some noise
            noise_multiplier=noise_multiplier, target_epsilon=target_epsilon, delta=delta, accountant=accountant,
            zero_noise_ok=False,
        )
        self.max_grad_norm = float(max_grad_norm)
        self.noise_multiplier = noise_multiplier
        self.target_epsilon = target_epsilon
        self.delta = float(delta)
        self.accountant_name: AccountantName = accountant
        self.secure_mode = secure_mode
        self.verbose = verbose
        self.rounds = 1
        #: client id -> [sample rate p, noise multiplier z, steps composed]
        self.clients: dict[int, list[float]] = {}
        self._z_cache: dict[tuple[float, int], float] = {}
        self._eps_cache: dict[tuple[float, float, int], float] = {}
        self.client_num_examples: list[int] | None = None
        #: (batch_size, local_epochs, local_steps) of the local loop, set by :meth:`wrap_local_trainer`.
        self.schedule: tuple[int, int, int | None] = (1, 1, None)

    def setup(self, info: RunInfo) -> None:
        rounds, strategy, client_num_examples = info.rounds, info.strategy, info.client_num_examples
        require_opacus()
        name = type(strategy).__name__
        if {"client_loss", "on_before_optimizer_step"} & strategy.client_hooks:
            raise ValueError(
                f"DPSGD privatises the gradient of the module's training_step, but strategy {name} changes the local "
                f"loss or gradients (client_loss / on_before_optimizer_step), which per-example clipping would not "
                f"cover. Use a strategy without client-side gradient changes (FedAvg, FedAvgM, FedAdam, ...)."
            )
        self.rounds = rounds
        self.client_num_examples = list(client_num_examples) if client_num_examples is not None else None
        if self.verbose:
            z = f"z = {self.noise_multiplier}" if self.noise_multiplier is not None else (
                f"z calibrated per client for target epsilon {self.target_epsilon} if it took part in all {rounds} rounds"
            )
            print(
                f"[lightfed privacy] DPSGD: sample-level DP (add or remove one example of a client); Poisson batches "
                f"p = B/n per client, per-example clip {self.max_grad_norm}, {z}; {self.accountant_name.upper()} "
                f"accountant per client across its rounds; delta {self.delta:.3g}; reports max and median epsilon "
                f"over clients.",
                flush=True,
            )

    def noise_multiplier_for(self, rate: float, steps_per_visit: int) -> float:
        """``z`` of a client with Poisson rate ``rate`` (fixed, or calibrated for all rounds).

        Calibration uses the rate rounded *up* to a grid of ratio ``10^(1/20)`` (12%): a higher rate only
        spends more, so the client's real epsilon stays within the target, and a population of many
        different client sizes needs only a few calibrations.
        """
        if self.noise_multiplier is not None:
            return float(self.noise_multiplier)
        key = (_rate_grid(rate), steps_per_visit)
        if key not in self._z_cache:
            assert self.target_epsilon is not None
            self._z_cache[key] = calibrate_noise_multiplier(
                self.target_epsilon, self.delta, _step_scheme(key[0]), self.rounds * steps_per_visit, self.accountant_name
            )
        return self._z_cache[key]

    def wrap_local_trainer(self, local: LocalTrainer) -> LocalTrainer:
        check_opacus_module(local.module)
        self.schedule = (local.batch_size, local.local_epochs, local.local_steps)
        return DPSGDLocalTrainer(local, self)

    def charge(self, client_id: int, num_examples: int) -> None:
        """Compose one visit of ``client_id`` (its Poisson rate and steps follow from its size and the schedule)."""
        rate, steps = dpsgd_schedule(num_examples, *self.schedule)
        z = self.noise_multiplier_for(rate, steps)
        entry = self.clients.setdefault(client_id, [rate, z, 0])
        entry[2] += steps

    def noise_plan(self) -> NoisePlan:
        return NoisePlan(0.0, None, "client", "client")

    def client_epsilon(self, client_id: int) -> float:
        """Cumulative epsilon of ``client_id`` over every step it took (0 if it never trained)."""
        if client_id not in self.clients:
            return 0.0
        rate, z, steps = self.clients[client_id]
        key = (rate, z, int(steps))
        if key not in self._eps_cache:
            self._eps_cache[key] = epsilon_for(
                z, _step_scheme(rate), int(steps), self.delta, self.accountant_name, DEFAULT_PLD_DISCRETIZATION
            )
        return self._eps_cache[key]

    def after_round(self, round_idx: int, cohort: Sequence[int]) -> dict[str, float]:
        # Every member of the cohort trained with DP-SGD: charged from the whole cohort and the public
        # schedule (the same on every process), never from the updates one process happened to see.
        if self.client_num_examples is None:
            raise RuntimeError("DPSGD.setup() needs client_num_examples (the trainer passes them).")
        for cid in cohort:
            self.charge(int(cid), int(self.client_num_examples[cid]))
        eps = [self.client_epsilon(cid) for cid in self.clients]
        if not eps:
            return {"epsilon": 0.0, "epsilon_median": 0.0, "clients_trained": 0.0, "delta": self.delta}
        return {
            "epsilon": max(eps),
            "epsilon_median": float(statistics.median(eps)),
            "clients_trained": float(len(eps)),
            "delta": self.delta,
        }

    def state_dict(self) -> dict[str, Any]:
        return {
            "mechanism": "DPSGD",
            "delta": self.delta,
            "accountant": self.accountant_name,
            "clients": {int(k): [float(v[0]), float(v[1]), int(v[2])] for k, v in self.clients.items()},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("mechanism") != "DPSGD" or state.get("delta") != self.delta or state.get("accountant") != self.accountant_name:
            raise ValueError(
                f"the checkpoint's privacy state ({state.get('mechanism')!r}, delta={state.get('delta')}, "
                f"accountant={state.get('accountant')!r}) does not match this run's DPSGD (delta={self.delta}, "
                f"accountant={self.accountant_name!r}); resume with the same `privacy:` section."
            )
        self.clients = {int(k): [float(v[0]), float(v[1]), int(v[2])] for k, v in state["clients"].items()}


def _rate_grid(rate: float) -> float:
    """The smallest ``10^(k/20)`` (``k`` an integer) that is at least ``rate``, capped at 1."""
    if rate >= 1.0:
        return 1.0
    k = math.ceil(20 * math.log10(rate) - 1e-9)
    return min(1.0, max(rate, 10 ** (k / 20)))


def _step_scheme(rate: float) -> SamplingScheme:
    """One DP-SGD step: Poisson sampling of examples with rate ``p`` (a full batch when ``p = 1``)."""
    if rate >= 1.0:
        return SamplingScheme("full", 1, 1.0, 1)
    return SamplingScheme("poisson", 1, float(rate))


class DPSGDLocalTrainer(LocalTrainer):
    """lightfed's client loop with DP-SGD in its seams: Poisson batches, per-example clip, Gaussian noise.

    The loop, its hooks and its seeding are :class:`LocalTrainer`'s; this class fills the seams:

    * :meth:`train_batches`: ``max(1, round(n / B))`` Poisson batches per local epoch, each example with
      probability ``p`` (seeded by round, client and step); an empty batch still takes a pure-noise step,
      as the accountant assumes, without calling ``training_step`` (``loss`` 0, no gradient);
    * :meth:`visit_optimizer`: the module's optimizer wrapped in Opacus's ``DPOptimizer``;
    * :meth:`visit_scope`: Opacus's per-example gradient hooks (``GradSampleModule``), removed after the visit.

    Refused at set-up (they would edit or clip gradients that the ``DPOptimizer`` then overwrites, or change the
    accounted step): ``gradient_clip_val``, ``accumulate_grad_batches > 1``, and modules overriding
    ``on_after_backward``, ``on_before_optimizer_step`` or ``configure_gradient_clipping``.
    """

    #: Module hooks that see or edit the non-private summed gradient: refused under DP-SGD.
    GRADIENT_HOOKS = ("on_after_backward", "on_before_optimizer_step", "configure_gradient_clipping")

    def __init__(self, local: LocalTrainer, mechanism: DPSGD) -> None:
        settings = local.settings()
        if settings["gradient_clip_val"]:
            raise ValueError(
                f"gradient_clip_val={settings['gradient_clip_val']} with DPSGD: DP-SGD already clips every example's "
                f"gradient at max_grad_norm={mechanism.max_grad_norm} before the noise; a second clip of the noisy "
                f"sum is not part of the accounted mechanism. Remove gradient_clip_val (set privacy.max_grad_norm)."
            )
        if settings["accumulate_grad_batches"] != 1:
            raise ValueError(
                f"accumulate_grad_batches={settings['accumulate_grad_batches']} with DPSGD: each DP-SGD step is one "
                f"Poisson batch, as the accountant composes it. Raise batch_size instead."
            )
        super().__init__(local.module, local.spec, local.strategy, **settings)
        if self.hooks.manual:
            raise ValueError(
                f"{type(local.module).__name__} uses manual optimization (automatic_optimization=False) with DPSGD: "
                f"DP-SGD steps one DPOptimizer per accounted Poisson batch itself. Use automatic optimization, or "
                f"client-level DP (privacy: DPFedAvg-style mechanisms act on the update and compose with it)."
            )
        hooks = sorted(self.hooks.overridden & set(self.GRADIENT_HOOKS))
        if hooks:
            raise ValueError(
                f"{type(local.module).__name__} overrides LightningModule.{hooks[0]}, which sees or edits the summed "
                f"gradient that DPSGD's DPOptimizer replaces with its clipped, noised one: an edit there would be "
                f"silently lost. Remove it to train with DPSGD."
            )
        self.mechanism = mechanism
        self._rate, self._steps, self._epoch_len, self._z = 1.0, 0, 1, 0.0
        self._empty = False
        self._dp_optimizer: Any = None

    def poisson_batch(self, data: ClientData, rate: float, round_idx: int, client_id: int, step: int) -> Any:
        """Each example of the client independently with probability ``rate`` (seeded by round, client, step).

        The batch has the structure of the data's batches (``data.take``: a tuple, a dict, what the dataset's
        ``collate_fn`` builds); an empty draw is ``data.take`` of no example (for a dataset: ``[]``).
        """
        gen = make_generator(self.seed, "dpsgd_batch", round_idx, client_id, step)
        mask = torch.rand(len(data), generator=gen) < rate
        idx = data.indices[mask.to(data.indices.device)]
        self._empty = idx.numel() == 0
        return data.take(idx)

    def batches_per_epoch(self, data: ClientData) -> int:
        return max(1, round(len(data) / self.batch_size))

    def train_batches(self, ctx: ClientContext, data: ClientData, epoch: int) -> Iterator[Any]:
        start = epoch * self._epoch_len
        for step in range(start, min(self._steps, start + self._epoch_len)):
            yield self.poisson_batch(data, self._rate, ctx.round_idx, ctx.client_id, step)

    def training_loss(self, batch: Any, batch_idx: int) -> Tensor | None:
        if self._empty:  # set by poisson_batch just before: no example, no forward; the step is pure noise
            return torch.zeros((), device=self.tensors[0].device)
        loss = super().training_loss(batch, batch_idx)
        if loss is None:
            raise ValueError("DPSGD needs training_step to return a loss for every batch.")
        return loss

    def backward(self, loss: Tensor) -> None:
        if self._empty:
            for p in self._dp_optimizer.params:
                p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
        else:
            super().backward(loss)

    def visit_optimizer(self, ctx: ClientContext, data: ClientData) -> tuple[list[Any], list[SchedulerConfig]]:
        opacus = require_opacus()
        optimizers, schedulers = super().visit_optimizer(ctx, data)
        device = ctx.global_params.device
        self._dp_optimizer = opacus.optimizers.DPOptimizer(
            optimizers[0], noise_multiplier=self._z, max_grad_norm=self.mechanism.max_grad_norm,
            expected_batch_size=self._rate * len(data), loss_reduction="mean",
            generator=make_generator(self.seed, "dpsgd_noise", ctx.round_idx, ctx.client_id, device=device),
            secure_mode=self.mechanism.secure_mode,
        )
        return [self._dp_optimizer], schedulers

    @contextlib.contextmanager
    def visit_scope(self, ctx: ClientContext, data: ClientData) -> Iterator[dict[str, float]]:
        """Opacus's hooks for this visit only (re-wrapping never sees old ones); reports the visit's DP figures."""
        opacus = require_opacus()
        self._rate, self._steps = dpsgd_schedule(len(data), self.batch_size, self.local_epochs, self.local_steps)
        self._epoch_len = self.batches_per_epoch(data)
        self._z = self.mechanism.noise_multiplier_for(self._rate, self._steps)
        gsm = opacus.GradSampleModule(self.module, loss_reduction="mean", strict=True)
        extra: dict[str, float] = {}
        try:
            with warnings.catch_warnings():
                # Opacus's backward hooks fire on outputs when the inputs need no gradient (always, here).
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                yield extra
            extra.update({STEPS_METRIC: float(ctx.step), "dp_sample_rate": self._rate, "dp_noise_multiplier": self._z})
        finally:
            if self._dp_optimizer is not None:
                self._dp_optimizer.zero_grad(set_to_none=True)
                self._dp_optimizer = None
            gsm._close()
            for p in self.module.parameters():
                for attr in ("summed_grad", "grad_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
