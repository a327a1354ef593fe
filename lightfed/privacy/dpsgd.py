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

import math
import statistics
import warnings
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch import Tensor, nn

from lightfed.client import LocalTrainer, LogCapture
from lightfed.context import ClientContext
from lightfed.data.client_data import ClientData
from lightfed.messages import ClientUpdate
from lightfed.privacy.accounting import (
    DEFAULT_PLD_DISCRETIZATION,
    AccountantName,
    SamplingScheme,
    calibrate_noise_multiplier,
    epsilon_for,
)
from lightfed.privacy.base import NoisePlan, PrivacyMechanism, check_noise_budget, check_positive
from lightfed.registry import PRIVACY
from lightfed.sampling import ClientSampler
from lightfed.seeding import derive_seed, make_generator
from lightfed.strategy import Strategy

#: Metric a DP-SGD client reports: the number of noisy steps it took (the server's accountant reads it).
STEPS_METRIC = "dp_steps"


def require_opacus() -> Any:
    """Import ``opacus`` or explain how to install it."""
    try:
        import opacus
    except ImportError as err:  # pragma: no cover - CI installs it
        raise ImportError("lightfed's DP-SGD needs Opacus: pip install 'lightfed[privacy]'") from err
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

    def setup(
        self,
        *,
        num_clients: int,
        sampler: ClientSampler,
        rounds: int,
        strategy: Strategy,
        seed: int,
        client_num_examples: Sequence[int] | None = None,
    ) -> None:
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
    """A :class:`LocalTrainer` whose clients run DP-SGD: Poisson batches, per-example clip, Gaussian noise."""

    def __init__(self, local: LocalTrainer, mechanism: DPSGD) -> None:
        super().__init__(
            local.module, local.spec, local.strategy, local.precision, local.local_epochs, local.local_steps,
            local.batch_size, local.seed,
        )
        self.mechanism = mechanism

    def poisson_batch(self, data: ClientData, rate: float, round_idx: int, client_id: int, step: int) -> tuple[Tensor, ...]:
        """Each example of the client independently with probability ``rate`` (seeded by round, client, step)."""
        gen = make_generator(self.seed, "dpsgd_batch", round_idx, client_id, step)
        mask = torch.rand(len(data), generator=gen) < rate
        idx = data.indices[mask.to(data.indices.device)]
        return tuple(t[idx] for t in data.tensors)

    def fit_client(
        self,
        client_id: int,
        round_idx: int,
        data: ClientData,
        global_params: Tensor,
        state: dict[str, Tensor] | None = None,
        payload: dict[str, Any] | None = None,
    ) -> ClientUpdate:
        """Train ``client_id`` with DP-SGD from ``global_params``; the update reports its noisy steps."""
        opacus = require_opacus()
        module = self.module
        self.spec.assign(self.tensors, global_params)
        module.train()
        torch.manual_seed(derive_seed(self.seed, "client_rng", round_idx, client_id))
        rate, total_steps = dpsgd_schedule(len(data), self.batch_size, self.local_epochs, self.local_steps)
        epoch_len = max(1, round(len(data) / self.batch_size))
        z = self.mechanism.noise_multiplier_for(rate, total_steps)

        def batches(epoch: int) -> Iterator[Any]:
            return data.batches(self.batch_size, make_generator(self.seed, "batches", round_idx, client_id, epoch))

        optimizer, schedulers = self.make_optimizer()
        ctx = ClientContext(
            client_id=client_id, round_idx=round_idx, module=module, spec=self.spec, global_params=global_params,
            payload=payload or {}, state=state if state is not None else {}, num_examples=len(data),
            batches=batches, make_optimizer=lambda: self.make_optimizer()[0], optimizer=optimizer,
        )
        self.strategy.on_client_start(ctx)
        device = global_params.device
        dp_optimizer = opacus.optimizers.DPOptimizer(
            optimizer, noise_multiplier=z, max_grad_norm=self.mechanism.max_grad_norm,
            expected_batch_size=rate * len(data), loss_reduction="mean",
            generator=make_generator(self.seed, "dpsgd_noise", round_idx, client_id, device=device),
            secure_mode=self.mechanism.secure_mode,
        )
        # Fresh hooks for this visit, removed in `finally`: re-wrapping never sees old hooks.
        gsm = opacus.GradSampleModule(module, loss_reduction="mean", strict=True)
        capture = LogCapture()
        loss_sum = torch.zeros((), device=device)
        seen = steps = 0
        try:
            with capture.attach(module), warnings.catch_warnings():
                # Opacus's backward hooks fire on outputs when the inputs need no gradient (always, here).
                warnings.filterwarnings("ignore", message="Full backward hook is firing")
                for step in range(total_steps):
                    batch = self.poisson_batch(data, rate, round_idx, client_id, step)
                    bs = len(batch[0])
                    dp_optimizer.zero_grad(set_to_none=True)
                    if bs == 0:  # an empty Poisson batch still takes a (pure-noise) step, as the accountant assumes
                        for p in dp_optimizer.params:
                            p.grad_sample = torch.zeros((0, *p.shape), device=p.device, dtype=p.dtype)
                    else:
                        capture.batch_size = bs
                        loss = self.training_loss(batch, step)
                        if loss is None:
                            raise ValueError("DPSGD needs training_step to return a loss for every batch.")
                        loss.backward()
                        loss_sum += loss.detach().float() * bs
                        seen += bs
                    dp_optimizer.step()
                    ctx.step = steps = steps + 1
                    for s in schedulers:
                        if s.get("interval", "epoch") == "step" or steps % epoch_len == 0:
                            s["scheduler"].step()
        finally:
            dp_optimizer.zero_grad(set_to_none=True)
            gsm._close()
            for p in module.parameters():
                for attr in ("summed_grad", "grad_sample"):
                    if hasattr(p, attr):
                        delattr(p, attr)
        metrics = capture.results()
        metrics["loss"] = float(loss_sum) / max(seen, 1)
        metrics[STEPS_METRIC] = float(steps)
        metrics["dp_sample_rate"] = rate
        metrics["dp_noise_multiplier"] = z
        local = self.spec.flatten(self.tensors)
        update = ClientUpdate(
            client_id=client_id, delta=local - global_params, num_examples=len(data), num_steps=steps, metrics=metrics,
        )
        return self.strategy.on_client_end(ctx, update)
