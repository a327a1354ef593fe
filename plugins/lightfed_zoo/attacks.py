"""Byzantine clients for robustness experiments, as wrappers around any strategy (not registered).

Select one with a dotted ``class_path`` in a config, wrapping the strategy under attack::

    strategy:
      class_path: lightfed_zoo.attacks.SignFlipAttack
      init_args:
        strategy: {class_path: Krum, init_args: {f: 2}}
        fraction: 0.2

Every attack picks the same Byzantine clients for the same ``(fraction, seed)``: the first ``round(fraction *
N)`` of a permutation drawn from ``make_generator(seed, "sign_flip")``, fixed for the run and equal on every
process, so attacks are compared on the same clients. Two kinds:

* **client-side** (:class:`SignFlipAttack`, :class:`GaussianAttack`, :class:`LabelFlipAttack`,
  :class:`BackdoorAttack`): a Byzantine client changes what it sends after its own training (its
  :meth:`~lightfed.strategy.Strategy.on_client_end`), knowing only its own data;
* **colluding, omniscient** (:class:`ALIEAttack`, :class:`MinMaxAttack`): the Byzantine clients of a round see
  every honest update of that round (the strongest threat model of the papers) and all send one crafted
  update. These need the round's individual updates, so they set ``needs_all_updates`` (a linear strategy
  under them is fed the same sums it would get); they cannot run under DP or secure aggregation, which never
  release individual updates.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from scipy import stats
from torch import Tensor

from lightfed.aggregation import StreamingSum
from lightfed.callbacks import Callback
from lightfed.context import ClientContext
from lightfed.messages import ClientUpdate, RoundAggregate, RoundResult
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES
from lightfed.seeding import make_generator
from lightfed.strategy import Strategy


class ByzantineAttack(Strategy):
    """Base of the attacks: delegates every hook to the wrapped strategy and fixes the Byzantine clients.

    Args:
        strategy: The strategy under attack (an instance or a registered name).
        fraction: Fraction of the population that is Byzantine, in ``[0, 1)``.
        seed: Seed of the choice of Byzantine clients.

    Raises:
        ValueError: for ``fraction`` outside ``[0, 1)``.
    """

    #: Colluding attacks craft updates from the round's honest ones (they need every update).
    colludes: bool = False

    def __init__(self, strategy: Strategy | str = "FedAvg", fraction: float = 0.2, seed: int = 0) -> None:
        name = type(self).__name__
        if not 0 <= fraction < 1:
            raise ValueError(f"{name} fraction must be in [0, 1), got {fraction} (`strategy.init_args.fraction`).")
        self.strategy = STRATEGIES.create(strategy) if isinstance(strategy, str) else strategy
        self.fraction = float(fraction)
        self.seed = seed
        # the wrapper declares its strategy's capabilities (plus its own hooks), never inferred
        self.needs_all_updates = self.colludes or self.strategy.needs_all_updates  # type: ignore[misc]
        self.uses_client_state = self.strategy.uses_client_state  # type: ignore[misc]
        self.samples_own_cohort = self.strategy.samples_own_cohort  # type: ignore[misc]
        own = set() if self.colludes else {"on_client_end"}
        self.client_hooks = self.strategy.client_hooks | own  # type: ignore[misc]
        self.byzantine: frozenset[int] = frozenset()

    @property
    def weighted(self) -> bool:
        """The wrapped strategy's ``weighted`` (example-count weights), which privacy mechanisms check."""
        return bool(getattr(self.strategy, "weighted", False))

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        count = round(self.fraction * num_clients)
        order = torch.randperm(num_clients, generator=make_generator(self.seed, "sign_flip"))
        self.byzantine = frozenset(order[:count].tolist())
        self.spec = spec
        self.strategy.setup(spec, num_clients, global_params)

    # ------------------------------------------------------------------ the attack (subclasses)
    def corrupt(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        """What a Byzantine client sends instead of ``update`` (client-side attacks)."""
        return update

    def craft(self, honest: list[Tensor], round_idx: int) -> Tensor:
        """The one update every Byzantine client of the round sends, from the honest deltas (colluding attacks)."""
        raise NotImplementedError

    # ------------------------------------------------------------------ where the attack enters
    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        update = self.strategy.on_client_end(ctx, update)
        if not self.colludes and update.client_id in self.byzantine:
            update = self.corrupt(ctx, update)
        return update

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        if self.colludes:
            honest = [u.delta for u in updates if u.client_id not in self.byzantine]
            if honest and len(honest) < len(updates):
                bad = self.craft(honest, round_idx)
                updates = [
                    ClientUpdate(u.client_id, bad.clone(), u.num_examples, u.num_steps, u.metrics, u.extras, u.counts)
                    if u.client_id in self.byzantine else u
                    for u in updates
                ]
        if self.strategy.needs_all_updates:
            return self.strategy.aggregate_updates(global_params, updates, weights, round_idx)
        total = StreamingSum()  # a linear strategy gets exactly the sums it would have got
        for update, weight in zip(updates, weights):
            total.add(update, weight)
        aggregate = total.result()
        return global_params if aggregate is None else self.strategy.aggregate(global_params, aggregate, round_idx)

    # ------------------------------------------------------------------ everything else: the wrapped strategy
    def check_cohort(self, cohort_size: float) -> None:
        self.strategy.check_cohort(cohort_size)

    def sample_clients(self, round_idx: int, num_clients: int, seed: int) -> list[int] | None:
        return self.strategy.sample_clients(round_idx, num_clients, seed)

    def round_metrics(self) -> dict[str, float]:
        return self.strategy.round_metrics()

    def client_payload(self, round_idx: int) -> dict[str, Any]:
        return self.strategy.client_payload(round_idx)

    def on_client_start(self, ctx: ClientContext) -> None:
        self.strategy.on_client_start(ctx)

    def client_loss(self, ctx: ClientContext, loss: Tensor) -> Tensor:
        return self.strategy.client_loss(ctx, loss)

    def on_before_optimizer_step(self, ctx: ClientContext) -> None:
        self.strategy.on_before_optimizer_step(ctx)

    def eval_params(self, client_id: int, state: dict[str, Tensor], global_params: Tensor) -> Tensor:
        return self.strategy.eval_params(client_id, state, global_params)

    def client_weight(self, update: ClientUpdate) -> float:
        return self.strategy.client_weight(update)

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return self.strategy.aggregate(global_params, aggregate, round_idx)

    def state_dict(self) -> dict[str, Any]:
        return self.strategy.state_dict()

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.strategy.load_state_dict(state)


class SignFlipAttack(ByzantineAttack):
    """A fixed, seeded ``fraction`` of the clients are Byzantine: they send ``-scale`` times their honest update.

    The wrapped strategy runs unchanged (its client hooks, its aggregation, its state); after its
    :meth:`~lightfed.strategy.Strategy.on_client_end`, a Byzantine client replaces its delta ``d`` with
    ``-scale * d`` (the sign-flipping attack of the Byzantine-robust learning literature, e.g. Li et al.,
    "RSA: Byzantine-Robust Stochastic Aggregation Methods", AAAI 2019). Extras (SCAFFOLD's ``delta_c``, q-FedAvg's
    ``h``) are left honest: the attack targets the model update.

    Args:
        strategy: The strategy under attack (an instance or a registered name).
        fraction: Fraction of the population that is Byzantine, in ``[0, 1)``.
        scale: Magnitude of the flipped update (> 0; ``1`` is a plain sign flip).
        seed: Seed of the choice of Byzantine clients.

    Raises:
        ValueError: for ``fraction`` outside ``[0, 1)`` or ``scale <= 0``.
    """

    def __init__(self, strategy: Strategy | str = "FedAvg", fraction: float = 0.2, scale: float = 1.0, seed: int = 0) -> None:
        if not scale > 0:
            raise ValueError(f"SignFlipAttack scale must be > 0, got {scale} (`strategy.init_args.scale`).")
        super().__init__(strategy, fraction, seed)
        self.scale = float(scale)

    def corrupt(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        update.delta = -self.scale * update.delta
        return update


class GaussianAttack(ByzantineAttack):
    """Byzantine clients send pure noise ``N(0, std^2 I)`` instead of their update.

    The noise is drawn from ``(seed, "gaussian", round, client)``. A classic baseline of the Byzantine-robust
    literature (e.g. Blanchard et al., "Machine Learning with Adversaries: Byzantine Tolerant Gradient
    Descent", NeurIPS 2017, Gaussian Byzantine workers).

    Args:
        strategy: The strategy under attack.
        fraction: Fraction of Byzantine clients, in ``[0, 1)``.
        std: Standard deviation of every coordinate (> 0).
        seed: Seed of the Byzantine clients and of the noise.
    """

    def __init__(self, strategy: Strategy | str = "FedAvg", fraction: float = 0.2, std: float = 1.0, seed: int = 0) -> None:
        if not std > 0:
            raise ValueError(f"GaussianAttack std must be > 0, got {std} (`strategy.init_args.std`).")
        super().__init__(strategy, fraction, seed)
        self.std = float(std)

    def corrupt(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        gen = make_generator(self.seed, "gaussian", ctx.round_idx, update.client_id)
        noise = torch.randn(update.delta.shape, generator=gen, dtype=torch.float32) * self.std
        update.delta = noise.to(device=update.delta.device, dtype=update.delta.dtype)
        return update


class ALIEAttack(ByzantineAttack):
    """"A Little Is Enough" (Baruch, Baruch & Goldberg, NeurIPS 2019): stay inside the honest spread.

    Every Byzantine client of the round sends ``mu - z * sigma`` (coordinate-wise mean and standard deviation of
    the round's honest updates), with the paper's ``z = Phi^-1((n - s) / n)``, ``s = floor(n / 2 + 1) - f``
    (``n`` updates, ``f`` Byzantine): small enough per coordinate that median- and distance-based rules keep it,
    consistent enough to bias the mean. Omniscient variant (the attackers see all honest updates).

    Args:
        strategy: The strategy under attack.
        fraction: Fraction of Byzantine clients, in ``[0, 1)``.
        z: Override of the paper's ``z`` (``None``: computed per round).
        seed: Seed of the Byzantine clients.
    """

    colludes = True

    def __init__(self, strategy: Strategy | str = "FedAvg", fraction: float = 0.2, z: float | None = None, seed: int = 0) -> None:
        super().__init__(strategy, fraction, seed)
        self.z = z

    def z_for(self, n: int, f: int) -> float:
        """The paper's ``z_max`` for ``n`` updates of which ``f`` are Byzantine (at least 0)."""
        if self.z is not None:
            return float(self.z)
        s = math.floor(n / 2 + 1) - f
        return max(0.0, float(stats.norm.ppf((n - s) / n)))

    def craft(self, honest: list[Tensor], round_idx: int) -> Tensor:
        stack = torch.stack(honest)
        n = self._round_size
        std = stack.std(0, unbiased=False) if len(honest) > 1 else torch.zeros_like(stack[0])
        return stack.mean(0) - self.z_for(n, n - len(honest)) * std

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        self._round_size = len(updates)
        return super().aggregate_updates(global_params, updates, weights, round_idx)


class MinMaxAttack(ByzantineAttack):
    """AGR-agnostic Min-Max (Shejwalkar & Houmansadr, NDSS 2021, "Manipulating the Byzantine").

    The Byzantine update is ``mu + gamma * p`` with ``mu`` the honest mean and ``p`` a perturbation (``"std"``:
    ``-sigma``; ``"unit"``: ``-mu / ||mu||``; ``"sign"``: ``-sign(mu)``), and ``gamma`` the largest value (binary
    search from ``gamma_init``, as in the paper) such that its largest distance to any honest update is at most
    the largest distance between two honest updates: it never looks like an outlier, yet moves as far as it can.

    Args:
        strategy: The strategy under attack.
        fraction: Fraction of Byzantine clients, in ``[0, 1)``.
        perturbation: ``"std"``, ``"unit"`` or ``"sign"``.
        gamma_init: Start of the search for ``gamma``.
        seed: Seed of the Byzantine clients.
    """

    colludes = True

    def __init__(
        self, strategy: Strategy | str = "FedAvg", fraction: float = 0.2, perturbation: str = "std",
        gamma_init: float = 10.0, seed: int = 0,
    ) -> None:
        if perturbation not in ("std", "unit", "sign"):
            raise ValueError(f"MinMaxAttack perturbation must be 'std', 'unit' or 'sign', got {perturbation!r}.")
        super().__init__(strategy, fraction, seed)
        self.perturbation = perturbation
        self.gamma_init = float(gamma_init)

    def craft(self, honest: list[Tensor], round_idx: int) -> Tensor:
        stack = torch.stack(honest).double()
        mu = stack.mean(0)
        if self.perturbation == "std":
            p = -stack.std(0, unbiased=False)
        elif self.perturbation == "unit":
            p = -mu / mu.norm().clamp_min(1e-12)
        else:
            p = -torch.sign(mu)
        bound = torch.cdist(stack, stack).max()
        gamma, step, best = self.gamma_init, self.gamma_init / 2, 0.0
        for _ in range(50):  # the paper's halving search, stopped at a relative step of ~1e-15
            ok = torch.cdist((mu + gamma * p)[None], stack).max() <= bound
            if ok:
                best = max(best, gamma)
            gamma = gamma + step if ok else gamma - step
            step /= 2
        return (mu + best * p).to(honest[0].dtype)


def _classification_batch(name: str, batch: Any) -> tuple[Tensor, Tensor]:
    """``(inputs, integer labels)`` of a batch, or a clear error for models this attack cannot handle."""
    if not (isinstance(batch, (tuple, list)) and len(batch) == 2 and torch.is_tensor(batch[1])
            and not batch[1].is_floating_point() and batch[1].dim() == 1):
        kind = type(batch).__name__ if not isinstance(batch, (tuple, list)) else f"a {len(batch)}-tuple"
        raise TypeError(
            f"{name} poisons classification data: it needs batches (inputs, integer labels of shape [batch]), got "
            f"{kind}. It cannot attack this model (language models, dict batches); use SignFlipAttack, "
            f"GaussianAttack, ALIEAttack or MinMaxAttack, which only change the update."
        )
    return batch[0], batch[1]


def retrain_poisoned(ctx: ClientContext, poison: Callable[[Tensor, Tensor], tuple[Tensor, Tensor]]) -> Tensor:
    """Re-run the client's visit from the global model on poisoned batches; the new delta.

    As many optimizer steps as the honest visit took (``ctx.step``), over the client's seeded batches, with a
    fresh optimizer from the module's ``configure_optimizers``; the client's own data, nothing else.
    """
    with torch.no_grad():
        for local, glob in zip(ctx.local_tensors(), ctx.global_tensors()):
            local.copy_(glob)
    optimizer = ctx.make_optimizer()
    steps, epoch, done = max(int(ctx.step), 1), 0, 0
    while done < steps:
        seen = False
        for i, batch in enumerate(ctx.batches(epoch)):
            seen = True
            loss = ctx.training_loss(poison(*batch), i)
            if loss is None:
                continue
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            done += 1
            if done >= steps:
                break
        if not seen:
            break
        epoch += 1
    return ctx.local_params() - ctx.global_params


class LabelFlipAttack(ByzantineAttack):
    """Byzantine clients train on their own data with every label ``y`` replaced by ``num_classes - 1 - y``.

    Data poisoning (e.g. Tolpegin et al., "Data Poisoning Attacks Against Federated Learning Systems", ESORICS
    2020): the update is an honest training run on wrong labels, so it looks like a client's update.

    Args:
        strategy: The strategy under attack.
        fraction: Fraction of Byzantine clients, in ``[0, 1)``.
        num_classes: Number of classes of the task.
        seed: Seed of the Byzantine clients.

    Raises:
        TypeError: during training, for a model whose batches are not ``(inputs, integer labels)``.
    """

    def __init__(self, strategy: Strategy | str = "FedAvg", fraction: float = 0.2, num_classes: int = 10, seed: int = 0) -> None:
        if num_classes < 2:
            raise ValueError(f"LabelFlipAttack num_classes must be >= 2, got {num_classes}.")
        super().__init__(strategy, fraction, seed)
        self.num_classes = int(num_classes)

    def poison(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x, y = _classification_batch(type(self).__name__, (x, y))
        return x, self.num_classes - 1 - y

    def corrupt(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        update.delta = retrain_poisoned(ctx, self.poison).to(update.delta.dtype)
        return update


class BackdoorAttack(ByzantineAttack):
    """Model replacement with a backdoor trigger (Bagdasaryan et al., AISTATS 2020, "How To Backdoor FL").

    A Byzantine client trains on its data where a ``poison_fraction`` of each batch carries the trigger (the
    last ``trigger_size`` input features set to ``trigger_value``) and the label ``target_label``, then scales
    its delta by ``boost`` (the paper's ``gamma = n / eta`` replaces the global model by the backdoored one under
    FedAvg). :class:`BackdoorAccuracy` reports how often the global model sends triggered test inputs of other
    classes to ``target_label``.

    Args:
        strategy: The strategy under attack.
        fraction: Fraction of Byzantine clients, in ``[0, 1)``.
        target_label: The label the trigger selects.
        trigger_size: Input features (flattened) overwritten by the trigger.
        trigger_value: Their value.
        poison_fraction: Share of each training batch that is triggered (the rest keeps clean accuracy up).
        boost: Scale of the Byzantine delta (1: no model replacement).
        seed: Seed of the Byzantine clients.

    Raises:
        TypeError: during training, for a model whose batches are not ``(floating inputs, integer labels)``.
    """

    def __init__(
        self, strategy: Strategy | str = "FedAvg", fraction: float = 0.1, target_label: int = 0, trigger_size: int = 4,
        trigger_value: float = 16.0, poison_fraction: float = 0.5, boost: float = 1.0, seed: int = 0,
    ) -> None:
        if trigger_size < 1 or not 0 < poison_fraction <= 1 or not boost > 0:
            raise ValueError(
                f"BackdoorAttack needs trigger_size >= 1, poison_fraction in (0, 1] and boost > 0, got "
                f"{trigger_size}, {poison_fraction}, {boost}."
            )
        super().__init__(strategy, fraction, seed)
        self.target_label = int(target_label)
        self.trigger_size = int(trigger_size)
        self.trigger_value = float(trigger_value)
        self.poison_fraction = float(poison_fraction)
        self.boost = float(boost)

    def apply_trigger(self, x: Tensor) -> Tensor:
        """``x`` with the trigger stamped on every example."""
        if not x.is_floating_point():
            raise TypeError(f"BackdoorAttack stamps a trigger on floating inputs; got {x.dtype} inputs (token ids?).")
        flat = x.reshape(len(x), -1).clone()
        flat[:, -self.trigger_size :] = self.trigger_value
        return flat.reshape(x.shape)

    def poison(self, x: Tensor, y: Tensor) -> tuple[Tensor, Tensor]:
        x, y = _classification_batch(type(self).__name__, (x, y))
        k = max(1, round(self.poison_fraction * len(x)))
        x, y = x.clone(), y.clone()
        x[:k] = self.apply_trigger(x[:k])
        y[:k] = self.target_label
        return x, y

    def corrupt(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        update.delta = (self.boost * retrain_poisoned(ctx, self.poison)).to(update.delta.dtype)
        return update


class BackdoorAccuracy(Callback):
    """Backdoor accuracy next to clean accuracy: ``attack/backdoor_acc`` whenever the round was evaluated.

    The share of central test examples whose label is not the target that the global model classifies as the
    :class:`BackdoorAttack`'s ``target_label`` once the trigger is stamped on them. Needs the run's strategy to be
    a :class:`BackdoorAttack`.
    """

    def setup(self, trainer: Any) -> None:
        if not isinstance(trainer.strategy, BackdoorAttack):
            raise ValueError(
                f"BackdoorAccuracy measures a BackdoorAttack, but the run's strategy is "
                f"{type(trainer.strategy).__name__}; wrap the strategy in lightfed_zoo.attacks.BackdoorAttack."
            )

    def on_round_end(self, trainer: Any, result: RoundResult) -> None:
        if not any(k.startswith("central/") for k in result.metrics):
            return
        attack: BackdoorAttack = trainer.strategy
        test = trainer.datamodule.test_data()
        x, y = (t.index_select(0, test.indices) for t in test.tensors[:2])
        keep = y != attack.target_label
        module = trainer.module
        trainer.local.spec.assign(trainer.local.tensors, trainer.global_params)
        was_training = module.training
        module.eval()
        with torch.no_grad():
            pred = module(attack.apply_trigger(x[keep])).argmax(-1)
        module.train(was_training)
        result.metrics["attack/backdoor_acc"] = float((pred == attack.target_label).float().mean())
