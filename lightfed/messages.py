"""Small typed messages passed between the pieces of a federated round."""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import torch
from torch import Tensor

if TYPE_CHECKING:  # messages sit below the strategy and the samplers; they only carry them
    from lightfed.sampling import ClientSampler
    from lightfed.strategy import Strategy


def all_finite(tensors: Iterable[Tensor]) -> bool:
    """True if no tensor holds NaN or Inf.

    A finite float sum proves every term finite (IEEE: a NaN term makes the sum NaN, an Inf term makes it
    Inf or NaN), so one ``sum`` and one host read per tensor decide the common case; only a non-finite sum
    (a NaN/Inf term, or finite terms overflowing) pays for the exact ``abs().amax()``. This runs once per
    client update on the hot path: ~5 us against ~28 us for ``torch.isfinite(t).all()``, whose CPU kernel
    builds two boolean temporaries.
    """
    return all(t.numel() == 0 or _finite_sum(t) or _finite_amax(t) for t in tensors)


def _finite_amax(t: Tensor) -> bool:
    if t.is_complex():
        t = torch.view_as_real(t)
    return math.isfinite(float(t.detach().abs().amax()))


def _finite_sum(t: Tensor) -> bool:
    if t.is_complex():
        t = torch.view_as_real(t)
    return not t.is_floating_point() or math.isfinite(float(t.detach().sum()))


@dataclass(frozen=True)
class RunInfo:
    """The facts of a run that every set-up receives, written once.

    :meth:`lightfed.privacy.base.PrivacyMechanism.setup` and :meth:`lightfed.server.RoundServer.setup` take
    one ``RunInfo`` (the trainer builds it once per run), so a new fact is one new field, not a keyword
    added to every implementation.

    Attributes:
        num_clients: ``N``, the size of the client population.
        sampler: How each round's cohort is drawn (a privacy accountant derives its sampling rate from it).
        rounds: ``T``, the number of rounds the run is configured for.
        strategy: The run's strategy (a mechanism checks that it can make it private).
        seed: The run's seed; randomness derives from (seed, round, client id).
        client_num_examples: ``n_k``, training examples per client (length ``N``), when known; the weighted
            DP estimator needs them for its fixed denominator ``q W``, DP-SGD for each client's schedule.

    Raises:
        ValueError: ``client_num_examples`` does not have one entry per client.
    """

    num_clients: int
    sampler: ClientSampler
    rounds: int
    strategy: Strategy
    seed: int = 0
    client_num_examples: tuple[int, ...] | None = None

    def __post_init__(self) -> None:
        sizes = self.client_num_examples
        if sizes is not None:
            sizes = tuple(int(n) for n in sizes)
            object.__setattr__(self, "client_num_examples", sizes)
            if len(sizes) != self.num_clients:
                raise ValueError(
                    f"RunInfo.client_num_examples has {len(sizes)} entries but num_clients is "
                    f"{self.num_clients}: give one example count per client."
                )


@dataclass
class ClientUpdate:
    """What one client sends back after local training.

    Attributes:
        client_id: Index of the client in the population.
        delta: Flat vector ``local - global`` over the payload (trainable parameters, see
            :class:`~lightfed.params.ParamSpec`), float32.
        num_examples: Training examples the client holds (FedAvg's weight).
        num_steps: Optimizer steps the client ran (FedNova and friends need it).
        metrics: Scalar training metrics (mean over the client's batches).
        extras: Further flat tensors a strategy sends alongside ``delta`` (SCAFFOLD's control-variate
            delta, q-FedAvg's ``h``); linear aggregation sums each with the same weight as ``delta``.
        counts: Per-client scalar facts the server needs only as a *sum*, summed unweighted (adaptive
            clipping's centred clip bit). They ride inside the summed message, so they are all-reduced
            across processes and secure-summed under secure aggregation like the delta: no process or
            server ever counts them one client at a time.
    """

    client_id: int
    delta: Tensor
    num_examples: int
    num_steps: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
    extras: dict[str, Tensor] = field(default_factory=dict)
    counts: dict[str, float] = field(default_factory=dict)

    def is_finite(self) -> bool:
        """False if the delta or any extra holds NaN or Inf (such an update must never be aggregated)."""
        if not self.extras and self.delta.dtype == torch.float32:  # the common case, once per client on the hot path
            return math.isfinite(self.delta.sum().item()) or _finite_amax(self.delta)
        return all_finite([self.delta, *self.extras.values()])


@dataclass
class RoundAggregate:
    """The associative sums a linear strategy consumes: ``sum_k w_k x_k`` and ``sum_k w_k``.

    Everything a linear strategy learns about a round is in here, which is what lets the sums be
    streamed (O(model) memory), sharded over processes and all-reduced, noised for differential
    privacy, or computed under secure aggregation.

    Attributes:
        delta_sum: ``sum_k w_k * delta_k``.
        weight_sum: ``sum_k w_k``.
        num_clients: The number of clients the round releases: the realised count without privacy;
            under client-level DP the mechanism replaces it by the public expected cohort ``m`` (the realised
            count is never released, so no strategy can read it).
        extras_sum: ``sum_k w_k * extras_k[name]`` for each extra.
        denominator: What the mean divides by. ``None`` means ``weight_sum``; client-level DP sets a
            fixed expected value so the mean's sensitivity does not depend on the realised cohort.
        counts_sum: ``sum_k counts_k[name]`` (unweighted) for each count; a privacy mechanism replaces
            the counts it uses by their noisy release.
    """

    delta_sum: Tensor
    weight_sum: float
    num_clients: float
    extras_sum: dict[str, Tensor] = field(default_factory=dict)
    denominator: float | None = None
    counts_sum: dict[str, float] = field(default_factory=dict)

    def _denominator(self) -> float:
        den = self.weight_sum if self.denominator is None else self.denominator
        if den <= 0:
            raise ValueError("RoundAggregate has no weight: no client contributed to this round.")
        return den

    def mean_delta(self) -> Tensor:
        """The (weighted) mean update ``delta_sum / denominator``."""
        return self.delta_sum / self._denominator()

    def mean_extra(self, name: str) -> Tensor:
        """The (weighted) mean of the extra ``name``."""
        return self.extras_sum[name] / self._denominator()


@dataclass(frozen=True)
class ClientRecord:
    """One client's plaintext facts of a round, for per-client tables (:mod:`lightfed.client_table`).

    Attributes:
        client_id: Index of the client in the population.
        num_examples: Training examples the client holds.
        num_steps: Optimizer steps the client ran.
        metrics: The client's training metrics (mean over its batches), as it sent them.
        accepted: ``False``: the update held NaN/Inf and was left out of the sum.
    """

    client_id: int
    num_examples: int
    num_steps: int
    metrics: dict[str, float] = field(default_factory=dict)
    accepted: bool = True


@dataclass
class RoundResult:
    """What a round produced, for logging and callbacks.

    ``clients`` holds one :class:`ClientRecord` per client update the server saw (accepted or rejected,
    sorted by client id, gathered from every process); it is ``None`` when the server learns only sums:
    under secure aggregation, and under distributed noise (which needs it).
    """

    round_idx: int
    cohort: list[int]
    num_updates: int
    rejected: list[int] = field(default_factory=list)
    metrics: dict[str, float] = field(default_factory=dict)
    skipped: bool = False
    #: Updates a callback added (an audit's canaries): in the sum, never counted as clients.
    extra_updates: int = 0
    #: Per-client records (``None`` when the server only learns sums); see the class docstring.
    clients: list[ClientRecord] | None = None
    #: Each evaluated client's own validation metrics, on rounds with federated evaluation (client id ->
    #: the metrics its ``validation_step`` logged, e.g. ``val_acc``); empty on other rounds.
    client_eval: dict[int, dict[str, float]] = field(default_factory=dict)
