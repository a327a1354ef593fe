"""LoRA-aware aggregation: FedIT, FFA-LoRA, FLoRA and FedSA-LoRA, one config line apart.

Averaging the two LoRA factors separately (FedIT) is not averaging the adapters: with ``p_k`` the clients'
weights, ``(sum_k p_k B_k)(sum_k p_k A_k) != sum_k p_k B_k A_k``, and the gap grows with client drift. The
variants here differ in what they send and how the server recombines it:

=============  ===================================  ===============================  ====================
strategy       up (per client)                      server                           DP / secure agg.
=============  ===================================  ===============================  ====================
FedITLoRA      A and B                              mean A, mean B (inexact)         yes
FFALoRA        B only (A frozen, shared)            mean B; mean(B) A exact          yes
FLoRA          A and B (any rank)                   stacks: sum_k p_k B_k A_k exact  no (every update)
FedSALoRA      A only (B personal)                  mean A                           yes
=============  ===================================  ===============================  ====================

Parameters that are not LoRA factors (a new head, ``modules_to_save``) are averaged as FedAvg averages
them, so on a model without adapters every variant is FedAvg. The server steps with the papers' rule,
``w += server_lr * Delta`` (``Delta`` the round's aggregate update), or, with ``server_optimizer: adam``, with
FedAdam on that same ``Delta`` (Reddi et al. 2021): for clients whose mean update is noisy and badly scaled,
e.g. one label per client. Adam only post-processes the released aggregate, so it changes neither what
travels, nor the exactness of FFA-LoRA and FLoRA, nor the composition with client-level DP.

Heterogeneous ranks (``ranks``) follow HetLoRA: a client of tier ``r`` trains the first ``r`` rows of each
``A`` and columns of each ``B`` of the global adapter of rank ``R``; the rest stay zero on the client and do
not enter its update (see :class:`~lightfed.models.lora.RankTiers`). Only the plugin's public API is used: the payload layout comes
from :class:`~lightfed.models.lora.LoRALayout`.
"""

from __future__ import annotations

import logging
from typing import Any

import torch
from torch import Tensor

from lightfed.checks import require
from lightfed.context import ClientContext
from lightfed.messages import ClientUpdate, RoundAggregate
from lightfed.models.lora import LoRALayout, RankTiers
from lightfed.params import ParamSpec
from lightfed.registry import STRATEGIES
from lightfed.seeding import make_generator
from lightfed.strategy import Strategy
from lightfed_zoo.strategies.base import check_fraction, restore_tensor
from lightfed_zoo.strategies.fedopt import adam_second_moment, adaptive_step

log = logging.getLogger("lightfed")

_SCRATCH = "lora"


class _LoRAStrategy(Strategy):
    """Shared part of the LoRA strategies: the payload layout, rank tiers and the server step.

    The server step turns the round's aggregate update ``Delta`` into the new global model: ``"sgd"``
    (the papers') is ``w + server_lr * Delta``; ``"adam"`` is FedAdam (Reddi et al. 2021, Algorithm 2, as
    :class:`~lightfed_zoo.strategies.fedopt.FedAdam`: no bias correction, ``m`` starts at 0 and ``v`` at
    ``tau^2``):

    .. math::

        m_t = \\beta_1 m_{t-1} + (1 - \\beta_1) \\Delta_t, \\quad
        v_t = \\beta_2 v_{t-1} + (1 - \\beta_2) \\Delta_t^2, \\quad
        w_{t+1} = w_t + \\eta \\frac{m_t}{\\sqrt{v_t} + \\tau}, \\qquad \\eta = \\text{server\\_lr}.

    Args:
        server_lr: Scale of the server step (> 0): the server learning rate of SGD, Adam's ``eta``.
        weighted: Weight clients by their number of examples (``False``: uniform; client-level DP needs it).
        ranks: Tiers of heterogeneous clients (e.g. ``[2, 4, 8]``); ``None``: every client uses the full rank.
        rank_weights: Relative frequency of each tier (default equal).
        rank_seed: Seed of the tier draw (a client keeps its tier for the whole run).
        rank_file: CSV with columns ``client_id`` and ``rank`` (a data column); listed clients take that tier.
        server_optimizer: ``"sgd"`` or ``"adam"`` (see above).
        beta1: Adam's first-moment decay in ``[0, 1)``.
        beta2: Adam's second-moment decay in ``[0, 1)``.
        tau: Adam's adaptivity (> 0), also ``v``'s starting value ``tau^2``.

    Raises:
        ValueError: ``server_lr <= 0``, an unknown ``server_optimizer``, a ``beta`` outside ``[0, 1)``,
            ``tau <= 0``, or mixed ranks for a variant that cannot mix them.
    """

    #: Whether clients of different ranks can be aggregated (HetLoRA truncation).
    mixes_ranks: bool = True
    #: Which factors must (True) or must not (False) be in the payload; ``None``: either.
    needs_a: bool | None = None
    needs_b: bool | None = True
    needs_base: bool | None = None

    def __init__(
        self,
        server_lr: float = 1.0,
        weighted: bool = True,
        ranks: list[int] | None = None,
        rank_weights: list[float] | None = None,
        rank_seed: int = 0,
        rank_file: str | None = None,
        server_optimizer: str = "sgd",
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        name = type(self).__name__
        require(
            server_lr > 0, f"{name} server_lr must be > 0, got {server_lr} (`strategy.init_args.server_lr`)."
        )
        require(server_optimizer in ("sgd", "adam"),
              f"{name} server_optimizer must be 'sgd' or 'adam', got {server_optimizer!r} (`strategy.init_args.server_optimizer`).")
        require(tau > 0, f"{name} tau (Adam's adaptivity) must be > 0, got {tau} (`strategy.init_args.tau`).")
        self.server_lr = float(server_lr)
        self.server_optimizer = server_optimizer
        self.beta1 = check_fraction(beta1, "beta1", name, 0.0, 1.0)
        self.beta2 = check_fraction(beta2, "beta2", name, 0.0, 1.0)
        self.tau = float(tau)
        self.m: Tensor | None = None
        self.v: Tensor | None = None
        self.weighted = weighted
        self.ranks, self.rank_weights, self.rank_seed, self.rank_file = ranks, rank_weights, rank_seed, rank_file
        self.tiers: RankTiers | None = None
        if rank_file is not None:
            self.tiers = RankTiers.from_csv(rank_file, ranks=ranks, weights=rank_weights, seed=rank_seed)
        elif ranks is not None:
            self.tiers = RankTiers(ranks, rank_weights, rank_seed)
        if self.tiers is not None and self.tiers.is_mixed() and not self.mixes_ranks:
            raise ValueError(
                f"{name} cannot mix LoRA ranks ({sorted(set(self.tiers.ranks) | set(self.tiers.table.values()))} were "
                f"given): {self._why_no_mixing()} Use one rank, or FLoRA / FFALoRA / FedITLoRA for heterogeneous ranks."
            )
        self.layout = LoRALayout((), 0)
        self._masks: dict[int, Tensor] = {}

    def _why_no_mixing(self) -> str:
        return ""

    # ------------------------------------------------------------------ set-up
    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        """Find the adapters in the payload; check what this variant needs travels, and the tiers fit.

        Raises:
            ValueError: a factor is (or is not) in the payload when this variant needs the opposite, or a tier
                is above the adapters' rank.
        """
        self.layout = LoRALayout.from_spec(spec)
        self._masks = {}
        if self.server_optimizer == "adam":
            self.m, self.v = torch.zeros_like(global_params), torch.full_like(global_params, self.tau**2)
        name = type(self).__name__
        if not self.layout:
            log.warning("%s: the payload holds no LoRA adapter (no '*.lora_A.*' / '*.lora_B.*' parameter); it "
                        "aggregates like FedAvg.", name)
            return
        for factor, wanted, fix in (
            ("a", self.needs_a, self._fix_a()), ("b", self.needs_b, self._fix_b()), ("base", self.needs_base, self._fix_base()),
        ):
            if wanted is None:
                continue
            bad = [lay.layer for lay in self.layout.layers if (getattr(lay, factor) is not None) != wanted]
            if bad:
                what = {"a": "lora_A", "b": "lora_B", "base": "base weight"}[factor]
                state = "must not" if not wanted else "must"
                raise ValueError(f"{name}: the {what} of {bad[:3]} {state} be part of the payload. {fix}")
        small = min(lay.rank for lay in self.layout.layers)
        if self.tiers is not None and self.tiers.max_rank > small:
            raise ValueError(
                f"{name}: strategy.init_args.ranks go up to {self.tiers.max_rank}, but the adapters have rank r={small}; "
                f"set model.init_args.lora.r to the largest tier (a client of tier r uses the first r rows of A and "
                f"columns of B of the global adapter)."
            )

    def _fix_a(self) -> str:
        return ""

    def _fix_b(self) -> str:
        return "B trains: keep '*lora_B*' in trainer.trainable."

    def _fix_base(self) -> str:
        return ""

    # ------------------------------------------------------------------ server step
    def server_step(self, global_params: Tensor, delta: Tensor) -> Tensor:
        """The new global model from the round's aggregate update ``delta`` (SGD or Adam, see the class)."""
        if self.server_optimizer == "sgd":
            return global_params + self.server_lr * delta
        if self.m is None or self.v is None:
            self.m, self.v = torch.zeros_like(global_params), torch.full_like(global_params, self.tau**2)
        new, self.m, self.v = adaptive_step(
            global_params, delta, self.m, self.v, eta=self.server_lr, beta1=self.beta1, tau=self.tau,
            second_moment=lambda v, delta_sq: adam_second_moment(v, delta_sq, self.beta2),
        )
        return new

    def state_dict(self) -> dict[str, Any]:
        return {"m": self.m, "v": self.v} if self.server_optimizer == "adam" else {}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.server_optimizer == "adam":
            name = f"{type(self).__name__} (server_optimizer: adam)"
            self.m = restore_tensor(state, "m", self.m, name)
            self.v = restore_tensor(state, "v", self.v, name)

    # ------------------------------------------------------------------ ranks
    def client_rank(self, client_id: int) -> int:
        """The rank client ``client_id`` trains with (the adapters' rank without tiers)."""
        return self.layout.max_rank if self.tiers is None else self.tiers.rank(client_id)

    def _beyond(self, rank: int, device: torch.device) -> Tensor:
        mask = self._masks.get(rank)
        if mask is None or mask.device != device:
            mask = self._masks[rank] = self.layout.beyond_rank(rank, device)
        return mask

    def on_client_start(self, ctx: ClientContext) -> None:
        """Truncate the client's adapters to its tier: rows of A and columns of B beyond it are zero."""
        if self.tiers is None or not self.layout:
            return
        rank = self.client_rank(ctx.client_id)
        if rank >= self.layout.max_rank:
            return
        saved = []
        params = dict(ctx.module.named_parameters())
        with torch.no_grad():
            for lay in self.layout.layers:
                a = params[lay.a_name]
                if lay.a is None:  # A is frozen and not in the payload: restore it when the visit ends
                    saved.append((a, a.detach().clone()))
                a[rank:] = 0
                params[lay.b_name][:, rank:] = 0
        ctx.extras[_SCRATCH] = {"rank": rank, "saved": saved}

    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        """Coordinates beyond the client's tier did not train: they send 0 (not ``0 - global``)."""
        scratch = ctx.extras.get(_SCRATCH)
        if scratch is None:
            return update
        with torch.no_grad():
            for tensor, value in scratch["saved"]:
                tensor.copy_(value)
        update.delta = update.delta.masked_fill(self._beyond(scratch["rank"], update.delta.device), 0.0)
        return update


@STRATEGIES.register("FedITLoRA")
class FedITLoRA(_LoRAStrategy):
    """FedIT: LoRA factors averaged separately, ``A <- mean_k A_k``, ``B <- mean_k B_k`` (FedAvg on adapters).

    Zhang, Vahidian, Kuo, Li, Ruan, Xu, Chen, "Towards Building the Federated GPT: Federated Instruction
    Tuning", ICASSP 2024: FedAvg over the LoRA parameters, the recipe of most federated LoRA code and what
    lightfed did before it had a name. **Sends** A and B up and down. Inexact: the new adapter
    ``(sum p_k B_k)(sum p_k A_k)`` is not ``sum p_k B_k A_k``. Linear, so it composes with client-level DP
    and secure aggregation. With ``ranks`` it is HetLoRA's zero-padding aggregation (Cho et al. 2024) without
    its sparsity weighting: a coordinate only some tiers train is averaged with zeros from the others.

    Args:
        server_lr, weighted, ranks, rank_weights, rank_seed, rank_file, server_optimizer, beta1, beta2, tau: See
            :class:`_LoRAStrategy`.
    """

    needs_b = None

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return self.server_step(global_params, aggregate.mean_delta())


@STRATEGIES.register("FFALoRA")
class FFALoRA(_LoRAStrategy):
    """FFA-LoRA: A frozen at its shared seeded initialisation; only B trains and travels; B averaged.

    Sun, Qin, Li, Ding, "Improving LoRA in Privacy-preserving Federated Learning", ICLR 2024. Every client
    holds the same ``A`` (the model's seeded initialisation, never trained), so averaging is exact:

    .. math::

        \\Big(\\sum_k p_k B_k\\Big) A = \\sum_k p_k B_k A.

    **Sends** B only (half the adapter bytes up and down). The paper finds it more robust under DP (no
    noise on A, no quadratic noise term B A) and pairs it with a larger scaling ``alpha``. Linear: composes
    with client-level DP and secure aggregation. Mixed ranks are exact too (``B_k`` zero-padded).

    A must be frozen by the payload selection: ``trainer.trainable: ["*lora_B*", <head>]``; ``setup`` refuses
    a payload that carries ``lora_A``.

    Args:
        server_lr, weighted, ranks, rank_weights, rank_seed, rank_file, server_optimizer, beta1, beta2, tau: See
            :class:`_LoRAStrategy`.
    """

    needs_a = False

    def _fix_a(self) -> str:
        return ("FFA-LoRA freezes A at its initialisation: set trainer.trainable to B and the head only, e.g. "
                "trainable: ['*lora_B*', 'head.*'].")

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        return self.server_step(global_params, aggregate.mean_delta())


@STRATEGIES.register("FedSALoRA")
class FedSALoRA(_LoRAStrategy):
    """FedSA-LoRA: A shared and averaged, B personal (client state); personalised evaluation with each client's B.

    Guo, Wu, Tang, Zhou, Song, Xie, Wu, "Selective Aggregation for Low-Rank Adaptation in Federated
    Learning", ICLR 2025: the ``A`` matrices learn what is general across clients and the ``B`` matrices
    what is client-specific, so only ``A`` is aggregated, ``A <- mean_k A_k``, and each client keeps its
    ``B_k``. **Sends** A (and the non-LoRA payload, e.g. the head); B never leaves the client: its slots of
    the update are zero, and the server ignores those slots of the mean (so DP noise never reaches a B).
    The global model's B stays at its initialisation (zero): its central accuracy is the shared part's;
    federated evaluation (``trainer.fed_eval_fraction``) uses each client's own B (:meth:`eval_params`),
    and a client not yet visited starts from (and is evaluated with) the initial B. Linear: composes with
    client-level DP and secure aggregation. One rank for all clients.

    Args:
        server_lr, weighted, ranks, rank_weights, rank_seed, rank_file, server_optimizer, beta1, beta2, tau: See
            :class:`_LoRAStrategy`.
    """

    uses_client_state = True
    needs_a = None
    mixes_ranks = False

    def _why_no_mixing(self) -> str:
        return "each client's B is personal at its own rank, and the paper defines no shared A across ranks."

    def _fix_b(self) -> str:
        return "FedSA-LoRA trains each client's B locally: keep '*lora_B*' in trainer.trainable."

    def setup(self, spec: ParamSpec, num_clients: int, global_params: Tensor) -> None:
        super().setup(spec, num_clients, global_params)
        self._b_mask = self.layout.mask("b", global_params.device)

    def _b(self, device: torch.device) -> Tensor:
        if self._b_mask.device != device:
            self._b_mask = self._b_mask.to(device)
        return self._b_mask

    def on_client_start(self, ctx: ClientContext) -> None:
        """Load the client's own B (if it has one) over the global B."""
        personal = ctx.state.get("lora_B")
        if personal is None or not self.layout:
            return
        params = dict(ctx.module.named_parameters())
        with torch.no_grad():
            flat = torch.zeros(self.layout.numel, device=personal.device)
            flat[self._b(personal.device)] = personal
            for lay in self.layout.layers:
                params[lay.b_name].copy_(lay.b_matrix(flat).view_as(params[lay.b_name]))

    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        """Keep B in the client's state; its slots of the update are zero."""
        if not self.layout:
            return update
        mask = self._b(update.delta.device)
        ctx.state["lora_B"] = (ctx.global_params + update.delta)[mask].clone()
        update.delta = update.delta.masked_fill(mask, 0.0)
        return update

    def eval_params(self, client_id: int, state: dict[str, Tensor], global_params: Tensor) -> Tensor:
        personal = state.get("lora_B")
        if personal is None or not self.layout:
            return global_params
        out = global_params.clone()
        out[self._b(global_params.device)] = personal.to(global_params.device)
        return out

    def aggregate(self, global_params: Tensor, aggregate: RoundAggregate, round_idx: int) -> Tensor:
        step = aggregate.mean_delta()
        if self.layout:
            step = step.masked_fill(self._b(step.device), 0.0)  # B is personal: its (noisy) mean is not used
        return self.server_step(global_params, step)


@STRATEGIES.register("FLoRA")
class FLoRA(_LoRAStrategy):
    """FLoRA: the server stacks the clients' adapters, merges ``sum_k p_k B_k A_k`` exactly, re-initialises them.

    Wang, Shen, Chen, Wang, Li, Wang, Mei, Xu, "FLoRA: Federated Fine-Tuning Large Language Models with
    Heterogeneous Low-Rank Adaptations", NeurIPS 2024. Client ``k`` trains a fresh adapter of its own rank
    ``r_k``; stacking

    .. math::

        B = [B_1, \\dots, B_K], \\quad A = [p_1 A_1; \\dots; p_K A_K], \\qquad
        B A = \\sum_k p_k B_k A_k

    reconstructs the weighted mean of the clients' updates exactly, for any mix of ranks. The stacked
    update ``s B A`` (``s`` the LoRA scaling) is merged into the base weights ``W``, and the adapters are
    re-initialised (``A`` from a seeded Kaiming-uniform draw, as peft initialises it; ``B = 0``). Other
    payload tensors (a head) are averaged as FedAvg does.

    **Sends** up: each client's adapters at its rank, ``r_k (in + out)`` numbers per layer. Down, in the
    paper: the round's stack, ``sum_k r_k (in + out)`` per layer, which grows with the cohort (logged as
    ``strategy/bytes_down_stack``; ``strategy/bytes_up_adapters`` is the mean upload). In this simulation
    the merged ``W`` rides in the payload instead of the stack (the model is built with
    ``lora: {base_in_payload: true}``, and clients never train ``W``), so ``round/bytes_*`` count the dense
    ``W`` of the adapted layers; the ``strategy/bytes_*`` figures are the protocol's.

    With ``server_optimizer: adam`` the server's Adam steps the merged update of ``W`` (and the head's
    mean) instead of adding it; the adapters restart all the same.

    Needs every update (``needs_all_updates``): memory O(cohort x payload), and client-level DP and secure
    aggregation refuse it (they release only sums; ``sum_k p_k B_k A_k`` is not a sum of the sent factors).

    Args:
        seed: Seed of the re-initialised ``A`` (drawn per round and layer).
        server_lr, weighted, ranks, rank_weights, rank_seed, rank_file, server_optimizer, beta1, beta2, tau: See
            :class:`_LoRAStrategy`.
    """

    needs_all_updates = True
    needs_a = True
    needs_base = True

    def __init__(
        self,
        server_lr: float = 1.0,
        weighted: bool = True,
        ranks: list[int] | None = None,
        rank_weights: list[float] | None = None,
        rank_seed: int = 0,
        rank_file: str | None = None,
        seed: int = 0,
        server_optimizer: str = "sgd",
        beta1: float = 0.9,
        beta2: float = 0.99,
        tau: float = 1e-3,
    ) -> None:
        super().__init__(server_lr, weighted, ranks, rank_weights, rank_seed, rank_file, server_optimizer, beta1, beta2, tau)
        self.seed = int(seed)
        self._metrics: dict[str, float] = {}
        self._scaling: dict[str, float] = {}

    def _fix_a(self) -> str:
        return "FLoRA trains and stacks both factors: keep '*lora_*' in trainer.trainable."

    def _fix_base(self) -> str:
        return ("FLoRA merges the stacked adapters into the base weights, so the server must be able to change them: "
                "build the model with model.init_args.lora.base_in_payload: true (clients still never train them).")

    def on_client_start(self, ctx: ClientContext) -> None:
        """Freeze the base weights for local training; read the layers' LoRA scaling; truncate to the tier."""
        if not self.layout:
            return
        modules = dict(ctx.module.named_modules())
        params = dict(ctx.module.named_parameters())
        for lay in self.layout.layers:
            params[lay.base_name].requires_grad_(False)  # in the payload only so that the server can merge into it
            scaling = getattr(modules[lay.layer], "scaling", {}).get(lay.adapter)
            if scaling is None:
                raise ValueError(f"FLoRA: layer {lay.layer!r} has no peft LoRA scaling for adapter {lay.adapter!r}.")
            self._scaling[lay.layer] = float(scaling)
        super().on_client_start(ctx)

    def on_client_end(self, ctx: ClientContext, update: ClientUpdate) -> ClientUpdate:
        update = super().on_client_end(ctx, update)
        if self.layout:
            scale = [self._scaling[lay.layer] for lay in self.layout.layers]
            update.extras["lora_scaling"] = torch.tensor(scale, dtype=torch.float32, device=update.delta.device)
        return update

    def aggregate_updates(
        self, global_params: Tensor, updates: list[ClientUpdate], weights: list[float], round_idx: int
    ) -> Tensor:
        total = float(sum(weights))
        if total <= 0:
            raise ValueError("FLoRA: the round's updates have no weight.")
        p = [w / total for w in weights]
        step = sum(pk * u.delta for pk, u in zip(p, updates))  # FedAvg for everything that is not an adapter
        if not self.layout:
            return self.server_step(global_params, step)
        if any("lora_scaling" not in u.extras for u in updates):
            raise ValueError("FLoRA updates carry no 'lora_scaling' extra: FLoRA's client hooks did not run on these updates.")
        rank_sum = sum(self.client_rank(u.client_id) for u in updates)
        for i, lay in enumerate(self.layout.layers):  # the exact merged update of each base weight
            a_stack, b_stack = [], []
            for pk, u in zip(p, updates):
                r = self.client_rank(u.client_id)
                local = global_params + u.delta
                a_stack.append(pk * lay.a_matrix(local)[:r])
                b_stack.append(lay.b_matrix(local)[:, :r])
            scaling = updates[0].extras["lora_scaling"][i]
            assert lay.base is not None and lay.a is not None and lay.b is not None
            step[lay.base] = (scaling * (torch.cat(b_stack, dim=1) @ torch.cat(a_stack, dim=0))).reshape(-1)
            step[lay.a], step[lay.b] = 0.0, 0.0  # the adapters restart below
        new = self.server_step(global_params, step)
        for i, lay in enumerate(self.layout.layers):
            assert lay.a is not None and lay.b is not None
            new[lay.a] = self.initial_a(lay.rank, lay.a.stop - lay.a.start, round_idx, i, new.device)
            new[lay.b] = 0.0
        adapters = self.layout.adapter_numel()
        others = self.layout.numel - adapters - int(self.layout.mask("base").sum())
        up = sum(self.layout.adapter_numel(self.client_rank(u.client_id)) for u in updates) / len(updates)
        per_rank = adapters / max(self.layout.max_rank, 1)  # numbers of one rank of every adapter
        self._metrics = {
            "stack_rank": float(rank_sum),
            "bytes_up_adapters": 4.0 * (up + others),
            "bytes_down_stack": 4.0 * (rank_sum * per_rank + others),
        }
        return new

    def initial_a(self, rank: int, numel: int, round_idx: int, layer: int, device: torch.device) -> Tensor:
        """A fresh ``A`` (flat): peft's ``kaiming_uniform_(a=sqrt(5))``, i.e. ``U(-1/sqrt(in), 1/sqrt(in))``."""
        fan_in = numel // rank
        gen = make_generator(self.seed, "flora_A", round_idx, layer)
        bound = 1.0 / fan_in**0.5
        return ((torch.rand(numel, generator=gen, dtype=torch.float32) * 2 - 1) * bound).to(device)

    def round_metrics(self) -> dict[str, float]:
        return dict(self._metrics)
