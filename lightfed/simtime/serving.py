"""One call of the round server per synchronous round or buffer flush.

Issue 20 gives :class:`~lightfed.server.RoundServer` one verb, ``run(round_idx, cohort, updates,
global_params) -> RoundOutcome``, that does the whole server side (collect, release, step, account,
metrics). Until that lands on main, :func:`run_server` is the one place that composes the existing
methods in the same order; when it lands, its body becomes ``server.run(...)`` and nothing else in
:mod:`lightfed.simtime` changes.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass

from torch import Tensor

from lightfed.messages import ClientUpdate, RoundAggregate, RoundResult
from lightfed.server import RoundServer, round_statistics


@dataclass
class Outcome:
    """What a flush produced (the fields of issue 20's ``RoundOutcome``)."""

    global_params: Tensor
    aggregate: RoundAggregate | None
    result: RoundResult


def run_server(
    server: RoundServer,
    round_idx: int,
    cohort: list[int],
    updates: Iterable[ClientUpdate],
    global_params: Tensor,
    *,
    payload_bytes: int = 0,
    commit_state: Callable[[int], None] = lambda cid: None,
) -> Outcome:
    """The whole server side of one round over ``updates`` (steps 1-8 of :mod:`lightfed.server`).

    Returns:
        The new global payload (the old one when nothing was released), the released aggregate and the
        round's result, whose metrics hold ``round/*``, ``client/*``, ``privacy/*`` and ``secagg/*``.
    """
    start = time.perf_counter()
    aggregator = server.new_aggregator(round_idx, cohort)
    shard = server.collect(round_idx, aggregator, updates, commit_state)
    result = RoundResult(
        round_idx=round_idx, cohort=list(cohort), num_updates=len(shard.metrics), rejected=shard.rejected
    )
    aggregate = server.release(round_idx, shard.aggregator, global_params.device)
    new = global_params
    if aggregate is None:
        result.skipped = True
    else:
        new = server.step(global_params, aggregate, shard.aggregator, round_idx)
        result.metrics["round/update_norm"] = float((new - global_params).norm())
    result.metrics.update(server.account(round_idx, cohort))
    result.metrics.update({f"strategy/{k}": v for k, v in server.strategy.round_metrics().items()})
    client_metrics = shard.metrics
    if server.secure_aggregation is not None:
        secure = server.secure_aggregation.round_metrics()
        result.metrics.update({f"secagg/{k}": v for k, v in secure.items()})
        client_metrics = []  # the server learns only sums
        result.num_updates = int(secure.get("survivors", result.num_updates))
    seconds = time.perf_counter() - start
    result.metrics.update(round_statistics(result, client_metrics, payload_bytes, {}, seconds))
    return Outcome(new, aggregate, result)


__all__ = ["Outcome", "run_server"]
