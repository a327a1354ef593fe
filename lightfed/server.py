"""The server side of a round, in one place and one fixed order.

For every update a process receives (its shard of the cohort):

1. ``privacy.client_update``: what the client does before the update leaves it (client-side clipping,
   local noise, the clip bit written into ``update.counts``);
2. the NaN/Inf screen: a non-finite update is rejected (its client state is not committed);
3. the weight: ``strategy.client_weight``, then ``privacy.client_weight`` (uniform or capped under DP);
4. ``privacy.server_update``: server-side clipping;
5. the sum: streamed (:class:`~lightfed.aggregation.StreamingSum`), kept whole for robust strategies
   (:class:`~lightfed.aggregation.CollectAll`), or secure (a protocol's aggregator).

Then, once the shards are merged (one all-reduce, :mod:`lightfed.distributed`), on every process alike:

6. :meth:`RoundServer.release`: the sums, post-processed by ``privacy.process_aggregate`` (noise, the
   fixed denominator, the released count). Under DP a round with no accepted update still releases a
   noisy sum of zeros, as the DP-FedAvg analysis assumes;
7. :meth:`RoundServer.step`: the strategy turns the released sums into the new global model;
8. ``privacy.after_round`` with the whole cohort (accounting).

Every per-client fact the server needs is part of the summed message (``extras`` and ``counts``), so it
is summed, all-reduced and secure-summed by construction: nothing is counted on a shard, and a
2-process round equals a 1-process round.
"""

from __future__ import annotations

import itertools
import math
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field

import torch
from torch import Tensor

from lightfed.aggregation import Aggregator, CollectAll, StreamingSum
from lightfed.messages import ClientUpdate, RoundAggregate, RoundResult, all_finite
from lightfed.params import ParamSpec
from lightfed.privacy.base import PrivacyMechanism
from lightfed.sampling import ClientSampler
from lightfed.secagg.base import SecureAggregation
from lightfed.strategy import Strategy


@dataclass
class ShardResult:
    """What one process contributes to a round: its sums and the side information of its clients."""

    aggregator: Aggregator
    metrics: list[dict[str, float]] = field(default_factory=list)
    #: Updates added by callbacks (an audit's canaries): summed like any update, but not clients.
    extra: int = 0
    #: Optimizer steps the clients of this shard took (0 with updates: nobody trained).
    steps: int = 0
    rejected: list[int] = field(default_factory=list)
    states: dict[int, dict[str, Tensor]] = field(default_factory=dict)


class RoundServer:
    """Strategy, privacy and secure aggregation composed in the order of this module's docstring.

    Args:
        strategy: The aggregation strategy.
        privacy: A privacy mechanism, or ``None``.
        secure_aggregation: A secure aggregation protocol, or ``None``.
        numel: Length of the flat update (for the noisy sum of an empty DP round).
    """

    def __init__(
        self,
        strategy: Strategy,
        privacy: PrivacyMechanism | None = None,
        secure_aggregation: SecureAggregation | None = None,
        numel: int = 0,
    ) -> None:
        self.strategy = strategy
        self.privacy = privacy
        self.secure_aggregation = secure_aggregation
        self.numel = numel

    def setup(
        self, spec: ParamSpec, global_params: Tensor, sampler: ClientSampler, rounds: int, seed: int,
        client_num_examples: list[int],
    ) -> None:
        """Set up strategy, privacy and secure aggregation together; refuse what cannot compose, before training.

        Raises:
            ValueError: naming the reason (distributed noise without secure aggregation, a cohort too small for
                the strategy, a strategy the mechanism cannot make private, ...).
        """
        num_clients = len(client_num_examples)
        plan = self.privacy.noise_plan() if self.privacy is not None else None
        if plan is not None and plan.placement == "distributed" and self.secure_aggregation is None:
            raise ValueError(
                "privacy.noise_placement: distributed leaves the noise to secure aggregation, but no "
                "secure_aggregation section is configured: the sum would carry no noise. Add one or use server noise."
            )
        self.strategy.setup(spec, num_clients, global_params)
        if not self.strategy.samples_own_cohort:
            self.strategy.check_cohort(sampler.expected_cohort(num_clients))
        if self.privacy is not None:
            self.privacy.setup(
                num_clients=num_clients, sampler=sampler, rounds=rounds, strategy=self.strategy, seed=seed,
                client_num_examples=client_num_examples,
            )
        if self.secure_aggregation is not None:
            self.secure_aggregation.setup(strategy=self.strategy, privacy=self.privacy, numel=spec.numel, seed=seed)

    def new_aggregator(self, round_idx: int, cohort: list[int]) -> Aggregator:
        """The round's sum: secure, every update (robust strategies), or streamed."""
        if self.secure_aggregation is not None:
            return self.secure_aggregation.aggregator(round_idx, cohort)
        return CollectAll() if self.strategy.needs_all_updates else StreamingSum()

    def collect(
        self,
        round_idx: int,
        aggregator: Aggregator,
        updates: Iterable[ClientUpdate],
        commit_state: Callable[[int], None] = lambda cid: None,
        extra: Iterable[ClientUpdate] = (),
    ) -> ShardResult:
        """Steps 1-5 for this process's updates; ``commit_state(cid)`` keeps an accepted client's state.

        ``extra`` updates (a callback's, e.g. canaries) take the same path but are counted in
        :attr:`ShardResult.extra`, not as clients, and stay out of the client statistics.
        """
        shard = ShardResult(aggregator)
        privacy = self.privacy
        extra_ids: set[int] = set()
        for update in itertools.chain(updates, _marked(extra, extra_ids)):
            if privacy is not None:
                update = privacy.client_update(update, round_idx)
            if not update.is_finite():
                warnings.warn(
                    f"round {round_idx}: client {update.client_id} sent an update with NaN/Inf; it is excluded "
                    f"from the aggregate (the global model is not changed by it).",
                    RuntimeWarning, stacklevel=2,
                )
                shard.rejected.append(update.client_id)
                continue
            commit_state(update.client_id)
            weight = self.strategy.client_weight(update)
            if privacy is not None:
                weight = privacy.client_weight(update, weight)
                update = privacy.server_update(update, round_idx)
            aggregator.add(update, weight)
            if update.client_id in extra_ids:
                shard.extra += 1
            else:
                shard.metrics.append(update.metrics)
                shard.steps += int(update.num_steps)
        return shard

    def release(self, round_idx: int, aggregator: Aggregator, device: torch.device | None = None) -> RoundAggregate | None:
        """Step 6: the sums as the strategy may see them (``None``: nothing released this round)."""
        aggregate = aggregator.result()
        if aggregate is None and self.privacy is not None and self.secure_aggregation is None:
            if self.privacy.noise_plan().placement == "server":  # DP releases a noisy sum every round
                aggregate = RoundAggregate(torch.zeros(self.numel, device=device), 0.0, 0)
        if aggregate is None:
            return None
        if self.privacy is not None:
            aggregate = self.privacy.process_aggregate(aggregate, round_idx)
        return aggregate

    def step(
        self, global_params: Tensor, aggregate: RoundAggregate, aggregator: Aggregator, round_idx: int
    ) -> Tensor:
        """Step 7: the strategy's new global payload.

        Raises:
            FloatingPointError: the strategy produced NaN/Inf from finite updates.
        """
        if self.strategy.needs_all_updates:
            assert isinstance(aggregator, CollectAll)
            new = self.strategy.aggregate_updates(global_params, aggregator.updates, aggregator.weights, round_idx)
        else:
            new = self.strategy.aggregate(global_params, aggregate, round_idx)
        if not all_finite([new]):
            raise FloatingPointError(
                f"round {round_idx}: {type(self.strategy).__name__} produced a non-finite global model from finite "
                f"updates; the last checkpoint is intact. Lower the learning rates or check the strategy."
            )
        return new

    def account(self, round_idx: int, cohort: Sequence[int]) -> dict[str, float]:
        """Step 8: privacy accounting over the whole cohort; metrics under ``privacy/``."""
        if self.privacy is None:
            return {}
        return {f"privacy/{k}": v for k, v in self.privacy.after_round(round_idx, cohort).items()}


def _marked(updates: Iterable[ClientUpdate], ids: set[int]) -> Iterator[ClientUpdate]:
    for update in updates:
        ids.add(update.client_id)
        yield update


def round_statistics(
    result: RoundResult, client_metrics: list[dict[str, float]], payload_bytes: int, payload: dict, seconds: float
) -> dict[str, float]:
    """``round/*`` bookkeeping and the mean and std of every client training metric (``client/<m>_mean|_std``)."""
    extra = sum(v.numel() * v.element_size() for v in payload.values() if isinstance(v, Tensor))
    out = {
        "round/clients": float(len(result.cohort)),
        "round/updates": float(result.num_updates),
        "round/rejected": float(len(result.rejected)),
        "round/seconds": seconds,
        "round/bytes_down_per_client": float(payload_bytes + extra),
        "round/bytes_up_per_client": float(payload_bytes),
    }
    if result.extra_updates:
        out["round/extra_updates"] = float(result.extra_updates)
    for k in sorted({k for m in client_metrics for k in m}):  # Python floats: cheaper than a tensor per key
        vals = [float(m[k]) for m in client_metrics if k in m]
        mean = math.fsum(vals) / len(vals)
        out[f"client/{k}_mean"] = mean
        out[f"client/{k}_std"] = math.sqrt(math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return out


def run_server_round(
    strategy: Strategy,
    global_params: Tensor,
    updates: Sequence[ClientUpdate],
    round_idx: int = 0,
    privacy: PrivacyMechanism | None = None,
    secure_aggregation: SecureAggregation | None = None,
    cohort: Sequence[int] | None = None,
) -> Tensor:
    """One server step of ``strategy`` on explicit updates, exactly as the trainer runs it.

    For strategy authors and reviewers: no trainer, data or model needed. ``strategy`` (and ``privacy`` /
    ``secure_aggregation``) must already be set up. Returns the new global payload, or ``global_params``
    unchanged when the round released nothing.
    """
    server = RoundServer(strategy, privacy, secure_aggregation, global_params.numel())
    ids = list(cohort) if cohort is not None else [u.client_id for u in updates]
    shard = server.collect(round_idx, server.new_aggregator(round_idx, ids), updates)
    aggregate = server.release(round_idx, shard.aggregator, global_params.device)
    new = global_params if aggregate is None else server.step(global_params, aggregate, shard.aggregator, round_idx)
    server.account(round_idx, ids)
    return new


__all__ = ["RoundServer", "ShardResult", "round_statistics", "run_server_round"]
