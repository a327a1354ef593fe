"""The server side of a round, in one place and one fixed order: :meth:`RoundServer.run`.

For every update a process receives (its shard of the cohort):

1. ``privacy.client_update``: what the client does before the update leaves it (client-side clipping,
   local noise, the clip bit written into ``update.counts``);
2. the NaN/Inf screen: a non-finite update is rejected (its client state is not committed);
3. the weight: ``strategy.client_weight``, then ``privacy.client_weight`` (uniform or capped under DP);
4. ``privacy.server_update``: server-side clipping;
5. the sum: streamed (:class:`~lightfed.aggregation.StreamingSum`), kept whole for robust strategies
   (:class:`~lightfed.aggregation.CollectAll`), or secure (a protocol's aggregator).

Then, once the shards are merged (``reduce``: one all-reduce, :func:`lightfed.distributed.merge_round`),
on every process alike:

6. :meth:`RoundServer.release`: the sums, post-processed by ``privacy.process_aggregate`` (noise, the
   fixed denominator, the released count). Under DP a round with no accepted update still releases a
   noisy sum of zeros, as the DP-FedAvg analysis assumes;
7. :meth:`RoundServer.step`: the strategy turns the released sums into the new global model;
8. ``privacy.after_round`` with the whole cohort (accounting), then the round's metrics.

Every per-client fact the server needs is part of the summed message (``extras`` and ``counts``), so it
is summed, all-reduced and secure-summed by construction: nothing is counted on a shard, and a
2-process round equals a 1-process round. The server also keeps the clients' persistent states (stateful
strategies): a client's working copy is committed only when its update is accepted.
"""

from __future__ import annotations

import itertools
import logging
import math
import time
import warnings
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from lightfed.aggregation import Aggregator, CollectAll, ShardResult, StreamingSum
from lightfed.messages import ClientRecord, ClientUpdate, RoundAggregate, RoundResult, RunInfo, all_finite
from lightfed.params import ParamSpec
from lightfed.privacy.base import PrivacyMechanism
from lightfed.secagg.base import SecureAggregation
from lightfed.strategy import Strategy

log = logging.getLogger("lightfed")

#: The cross-process reduce of a round: every process's shard in, the merged shard out (the same on all).
Reduce = Callable[[ShardResult], ShardResult]


@dataclass
class RoundOutcome:
    """What :meth:`RoundServer.run` gives back.

    Attributes:
        global_params: The new global payload (the old one when nothing was released).
        aggregate: The released (post-privacy) aggregate the strategy stepped on; ``None`` if nothing was
            released (no accepted update, or secure aggregation failed closed).
        result: Cohort, updates, rejected ids, ``skipped``, and the round's metrics (``round/``, ``client/``,
            ``privacy/``, ``strategy/``, ``secagg/``).
    """

    global_params: Tensor
    aggregate: RoundAggregate | None
    result: RoundResult


@dataclass
class ClientShard(ShardResult):
    """A process's :class:`ShardResult` with its clients' plaintext records (side information, gathered
    across processes like ``metrics``; never summed)."""

    clients: list[ClientRecord] = field(default_factory=list)


def check_processes(secure_aggregation: SecureAggregation | None, world_size: int) -> None:
    """Refuse secure aggregation over several processes (called before any process starts).

    Raises:
        ValueError: a protocol and ``world_size > 1``.
    """
    if secure_aggregation is not None and world_size > 1:
        raise ValueError(
            "secure_aggregation runs the protocol in one process; use trainer.devices=1 with it "
            "(sharding a SecAgg round over processes is not supported)."
        )


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
        #: Bytes of one payload on the wire (``ParamSpec.num_bytes``; float32 until :meth:`setup`).
        self.num_bytes = 4 * numel
        #: Each client's persistent state (stateful strategies), as committed by accepted updates.
        self.client_states: dict[int, dict[str, Tensor]] = {}
        self._pending: dict[int, dict[str, Tensor]] = {}
        self._committed: list[int] = []
        self._payload: tuple[int, dict[str, Any]] | None = None
        #: Warn when the updates carry no training (no loss logged, no step taken): trained clients only.
        self.expect_training = True

    def setup(self, spec: ParamSpec, global_params: Tensor, info: RunInfo) -> None:
        """Set up strategy, privacy and secure aggregation together; refuse what cannot compose, up front.

        Args:
            spec: The flat layout of the payload.
            global_params: The initial global payload.
            info: The run's facts (``info.strategy`` must be this server's strategy).

        Raises:
            ValueError: naming the reason (distributed noise without secure aggregation, a cohort too small
                for the strategy, a strategy the mechanism cannot make private, ...).
        """
        if info.strategy is not self.strategy:
            raise ValueError(
                f"RunInfo.strategy is a {type(info.strategy).__name__}, not this server's "
                f"{type(self.strategy).__name__}: build the RunInfo with strategy=server.strategy."
            )
        self.numel, self.num_bytes = spec.numel, spec.num_bytes
        plan = self.privacy.noise_plan() if self.privacy is not None else None
        if plan is not None and plan.placement == "distributed" and self.secure_aggregation is None:
            raise ValueError(
                "privacy.noise_placement: distributed leaves the noise to secure aggregation, but no "
                "secure_aggregation section is configured: the sum would carry no noise. Add one or use "
                "server noise."
            )
        self.strategy.setup(spec, info.num_clients, global_params)
        if not self.strategy.samples_own_cohort:
            self.strategy.check_cohort(info.sampler.expected_cohort(info.num_clients))
        if self.privacy is not None:
            self.privacy.setup(info)
        if self.secure_aggregation is not None:
            self.secure_aggregation.setup(
                strategy=self.strategy, privacy=self.privacy, numel=spec.numel, seed=info.seed
            )

    # ------------------------------------------------------------------ before the round
    def can_run_round(self, round_idx: int) -> bool:
        """``False``: running ``round_idx`` would exceed the privacy budget (stop cleanly before it)."""
        return self.privacy is None or self.privacy.can_run_round(round_idx)

    def payload(self, round_idx: int) -> dict[str, Any]:
        """What the server sends each client of the round besides the global model (counted in bytes down)."""
        if self._payload is None or self._payload[0] != round_idx:
            self._payload = (round_idx, self.strategy.client_payload(round_idx))
        return self._payload[1]

    def client_state(self, client_id: int) -> dict[str, Tensor]:
        """A working copy of the client's persistent state; committed only if its update is accepted."""
        if not self.strategy.uses_client_state:
            return {}
        state = self._pending[client_id] = dict(self.client_states.get(client_id, {}))
        return state

    # ------------------------------------------------------------------ the round, in one call
    def run(
        self,
        round_idx: int,
        cohort: list[int],
        updates: Iterable[ClientUpdate],
        global_params: Tensor,
        *,
        extra: Iterable[ClientUpdate] = (),
        reduce: Reduce | None = None,
    ) -> RoundOutcome:
        """The server's whole round: collect, reduce, release, step, account, metrics (steps 1-8).

        Args:
            round_idx: The round (0-based).
            cohort: The whole round's cohort (the same on every process).
            updates: This process's clients' updates, consumed once (an executor's iterator: clients train
                while the server sums).
            global_params: The global payload the clients started from.
            extra: Updates that are not clients' (an audit's canaries): summed, never counted as clients.
            reduce: The cross-process merge of the shards (``None``: one process).

        Returns:
            The new global payload, the released aggregate and the round's :class:`RoundResult`.

        Raises:
            FloatingPointError: the strategy produced NaN/Inf from finite updates.
        """
        start = time.perf_counter()
        shard = self.collect(round_idx, self.new_aggregator(round_idx, cohort), updates, extra=extra)
        if reduce is not None:
            shard = reduce(shard)
        self.client_states.update(shard.states)
        result = RoundResult(round_idx=round_idx, cohort=cohort, num_updates=len(shard.metrics),
                             rejected=shard.rejected, extra_updates=shard.extra)
        if not self.sums_only:
            result.clients = sorted(getattr(shard, "clients", []), key=lambda c: c.client_id)
        untrained = shard.steps == 0 or not any("loss" in m for m in shard.metrics)
        if self.expect_training and shard.metrics and untrained:
            warnings.warn(
                f"round {round_idx}: none of the {len(shard.metrics)} clients trained on a loss "
                f"(training_step returned None for every batch, or the clients hold no data); their updates "
                f"carry no training.",
                RuntimeWarning, stacklevel=2,
            )
        aggregate = self.release(round_idx, shard.aggregator, global_params.device)
        new = global_params
        if aggregate is None:
            result.skipped = True
            log.warning("round %d produced no aggregate: the global model is unchanged.", round_idx)
        else:
            new = self.step(global_params, aggregate, shard.aggregator, round_idx)
            result.metrics["round/update_norm"] = float((new - global_params).norm())
        result.metrics.update(self.account(round_idx, cohort))
        result.metrics.update({f"strategy/{k}": v for k, v in self.strategy.round_metrics().items()})
        client_metrics = shard.metrics
        if self.secure_aggregation is not None:
            secure = self.secure_aggregation.round_metrics()
            result.metrics.update({f"secagg/{k}": v for k, v in secure.items()})
            # the server only learns sums: per-client statistics come from the secure sum, not from plaintext
            client_metrics = []
            result.num_updates = int(secure.get("survivors", result.num_updates))
        seconds = time.perf_counter() - start
        payload = self.payload(round_idx)
        result.metrics.update(round_statistics(result, client_metrics, self.num_bytes, payload, seconds))
        return RoundOutcome(new, aggregate, result)

    @property
    def sums_only(self) -> bool:
        """``True``: the server learns only sums (secure aggregation, distributed noise), no client record."""
        if self.secure_aggregation is not None:
            return True
        return self.privacy is not None and self.privacy.noise_plan().placement == "distributed"

    # ------------------------------------------------------------------ the steps of a round
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
        extra: Iterable[ClientUpdate] = (),
    ) -> ShardResult:
        """Steps 1-5 for this process's updates; an accepted client's working state is committed.

        ``extra`` updates (a callback's, e.g. canaries) take the same path but are counted in
        :attr:`ShardResult.extra`, not as clients, and stay out of the client statistics.
        """
        shard = ClientShard(aggregator)
        privacy = self.privacy
        extra_ids: set[int] = set()
        for update in itertools.chain(updates, _marked(extra, extra_ids)):
            if privacy is not None:
                update = privacy.client_update(update, round_idx)
            if not update.is_finite():
                warnings.warn(
                    f"round {round_idx}: client {update.client_id} sent an update with NaN/Inf; it is "
                    f"excluded from the aggregate (the global model is not changed by it).",
                    RuntimeWarning, stacklevel=2,
                )
                shard.rejected.append(update.client_id)
                if update.client_id not in extra_ids:
                    shard.clients.append(_record(update, accepted=False))
                continue
            self._commit(update.client_id, shard)
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
                shard.clients.append(_record(update))
        self._pending.clear()  # rejected clients' working copies are dropped
        return shard

    def _commit(self, client_id: int, shard: ShardResult) -> None:
        if client_id in self._pending:
            state = self.client_states[client_id] = self._pending.pop(client_id)
            shard.states[client_id] = state

    def release(
        self, round_idx: int, aggregator: Aggregator, device: torch.device | None = None
    ) -> RoundAggregate | None:
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
            new = self.strategy.aggregate_updates(
                global_params, aggregator.updates, aggregator.weights, round_idx
            )
        else:
            new = self.strategy.aggregate(global_params, aggregate, round_idx)
        if not all_finite([new]):
            raise FloatingPointError(
                f"round {round_idx}: {type(self.strategy).__name__} produced a non-finite global model from "
                f"finite updates; the last checkpoint is intact. Lower the learning rates or check the "
                f"strategy."
            )
        return new

    def account(self, round_idx: int, cohort: Sequence[int]) -> dict[str, float]:
        """Step 8: privacy accounting over the whole cohort; metrics under ``privacy/``."""
        if self.privacy is None:
            return {}
        return {f"privacy/{k}": v for k, v in self.privacy.after_round(round_idx, cohort).items()}


def _record(update: ClientUpdate, accepted: bool = True) -> ClientRecord:
    metrics = {k: float(v) for k, v in update.metrics.items()}
    return ClientRecord(update.client_id, int(update.num_examples), int(update.num_steps), metrics, accepted)


def _marked(updates: Iterable[ClientUpdate], ids: set[int]) -> Iterator[ClientUpdate]:
    for update in updates:
        ids.add(update.client_id)
        yield update


def round_statistics(
    result: RoundResult,
    client_metrics: list[dict[str, float]],
    payload_bytes: int,
    payload: dict,
    seconds: float,
) -> dict[str, float]:
    """``round/*`` bookkeeping and the mean and std of each client training metric (``client/<m>_mean``,
    ``client/<m>_std``)."""
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
        var = math.fsum((v - mean) ** 2 for v in vals) / (len(vals) - 1) if len(vals) > 1 else 0.0
        out[f"client/{k}_std"] = math.sqrt(var)
    return out


def run_server_round(
    strategy: Strategy,
    global_params: Tensor,
    updates: Sequence[ClientUpdate],
    round_idx: int = 0,
    privacy: PrivacyMechanism | None = None,
    secure_aggregation: SecureAggregation | None = None,
    cohort: Sequence[int] | None = None,
) -> RoundOutcome:
    """One server round of ``strategy`` on explicit updates: :meth:`RoundServer.run`, as the trainer runs it.

    For strategy authors and reviewers: no trainer, data or model needed. ``strategy`` (and ``privacy`` /
    ``secure_aggregation``) must already be set up. Returns the :class:`RoundOutcome`: ``.global_params``
    (``global_params`` unchanged when the round released nothing) and ``.aggregate``, the released sums.
    """
    server = RoundServer(strategy, privacy, secure_aggregation, global_params.numel())
    server.expect_training = False  # hand-made updates need not say how they were trained
    ids = list(cohort) if cohort is not None else [u.client_id for u in updates]
    return server.run(round_idx, ids, updates, global_params)


__all__ = [
    "ClientShard", "Reduce", "RoundOutcome", "RoundServer", "ShardResult", "check_processes",
    "round_statistics", "run_server_round",
]
