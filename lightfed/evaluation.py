r"""Central and federated evaluation of the global model, and the built-in callback that runs them.

Central: the module's ``test_step`` on the held-out test set. Federated: a seeded fraction of the clients
evaluate the global (or, for personalised strategies, their own) model on their validation split; the
mean and the mean of the worst 10% (fairness) are reported.

"Worst" depends on the metric: the lowest accuracies, but the *highest* losses and perplexities. With
``n`` evaluated clients and ``k = ceil(0.1 n)``,

.. math::

    \text{worst10} = \frac{1}{k} \sum_{i=1}^{k} v_{(i)}, \qquad
    v_{(1)} \le \dots \le v_{(n)} \text{ if higher is better,} \quad
    v_{(1)} \ge \dots \ge v_{(n)} \text{ otherwise.}

:func:`higher_is_better` decides from the metric's name (``loss``, ``ppl`` or ``perplexity`` in it: lower
is better) unless ``trainer.fed_eval_higher_is_better`` says so explicitly; the direction used is logged
once per run and reported as ``federated/higher_is_better`` (1 or 0).
"""

from __future__ import annotations

import logging
import math
import time
from typing import TYPE_CHECKING

import torch

from lightfed.callbacks import Callback
from lightfed.messages import RoundResult
from lightfed.sampling import worst_fraction_mean
from lightfed.seeding import make_generator

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer

log = logging.getLogger("lightfed")

#: Words in a metric's name that make lower values better (``val_loss``, ``val_ppl``, ``test_perplexity``).
LOWER_IS_BETTER = ("loss", "ppl", "perplexity")


def evaluate_central(trainer: FederatedTrainer) -> dict[str, float]:
    """The global model on the central test set (the module's ``test_step``), as ``central/<metric>``."""
    assert trainer.datamodule is not None and trainer.global_params is not None
    metrics = trainer.local.evaluate(trainer.datamodule.test_data(), trainer.global_params, "test", trainer.eval_batch_size)
    return {f"central/{k}": v for k, v in metrics.items()}


def evaluate_federated(
    trainer: FederatedTrainer, round_idx: int, per_client: dict[int, dict[str, float]] | None = None
) -> dict[str, float]:
    """The global (or personalised) model on a seeded fraction of the clients' own validation splits.

    ``per_client``, when given, receives each evaluated client's metrics (the per-client table writes them).
    """
    assert trainer.datamodule is not None and trainer.global_params is not None
    n = trainer.num_clients
    k = max(1, math.ceil(trainer.fed_eval_fraction * n))
    chosen = sorted(torch.randperm(n, generator=make_generator(trainer.seed, "fed_eval", round_idx))[:k].tolist())
    values: list[float] = []
    key = None
    for cid in chosen:
        data = trainer.datamodule.client_val(cid)
        if len(data) == 0:
            continue
        params = trainer.strategy.eval_params(cid, trainer.client_states.get(cid, {}), trainer.global_params)
        metrics = trainer.local.evaluate(data, params, "val", trainer.eval_batch_size)
        if not metrics:  # a module that logs nothing when evaluated, or has no evaluation step (it was told)
            continue
        key = key or metric_key(metrics, trainer.fed_eval_metric)
        values.append(metrics[key])
        if per_client is not None:
            per_client[cid] = dict(metrics)
    if not values or key is None:
        return {}
    higher = higher_is_better(key, trainer.fed_eval_higher_is_better)
    return {
        f"federated/{key}_mean": sum(values) / len(values),
        f"federated/{key}_worst10": worst_clients_mean(values, higher, 0.1),
        "federated/higher_is_better": float(higher),
        "federated/clients": float(len(values)),
    }


def higher_is_better(key: str, override: bool | None = None) -> bool:
    """Whether larger values of the metric ``key`` are better.

    Args:
        key: The logged metric's name (``val_acc``, ``val_ppl``).
        override: ``trainer.fed_eval_higher_is_better``; ``None`` decides from the name.

    Returns:
        ``override`` if given, else ``False`` when the name holds ``loss``, ``ppl`` or ``perplexity``
        (any case), ``True`` otherwise.
    """
    if override is not None:
        return override
    name = key.lower()
    return not any(word in name for word in LOWER_IS_BETTER)


def worst_clients_mean(values: list[float], higher_better: bool, fraction: float = 0.1) -> float:
    """Mean of the worst ``ceil(fraction * n)`` values: the lowest if higher is better, else the highest."""
    if higher_better:
        return worst_fraction_mean(values, fraction)
    return -worst_fraction_mean([-v for v in values], fraction)


def evaluate_round(
    trainer: FederatedTrainer, round_idx: int, per_client: dict[int, dict[str, float]] | None = None
) -> dict[str, float]:
    """Central and (if ``fed_eval_fraction > 0``) federated evaluation, plus ``round/eval_seconds``."""
    start = time.perf_counter()
    metrics = evaluate_central(trainer)
    if trainer.fed_eval_fraction > 0:
        metrics.update(evaluate_federated(trainer, round_idx, per_client))
    metrics["round/eval_seconds"] = time.perf_counter() - start
    return metrics


def metric_key(metrics: dict[str, float], wanted: str) -> str:
    """The logged metric named ``wanted``, or the one ending with it (``acc`` matches ``val_acc``)."""
    if wanted in metrics:
        return wanted
    matches = [k for k in metrics if k.endswith(wanted)]
    if len(matches) != 1:
        raise ValueError(
            f"trainer.fed_eval_metric={wanted!r} matches {matches or 'none'} of the logged metrics {sorted(metrics)}; "
            f"set it to one of them."
        )
    return matches[0]


class Evaluation(Callback):
    """Built in: evaluate every ``trainer.eval_every`` rounds and after the last one.

    The evaluation of a round is :meth:`evaluate` (central and federated, :func:`evaluate_round`); a
    subclass that overrides it, set as ``trainer.evaluation``, changes what every evaluation round runs.
    """

    def __init__(self) -> None:
        #: Each evaluated client's metrics from the latest evaluation (copied into ``RoundResult.client_eval``).
        self.client_metrics: dict[int, dict[str, float]] = {}
        self._direction_said: str | None = None

    def on_round_end(self, trainer: FederatedTrainer, result: RoundResult) -> None:
        done = result.round_idx + 1
        if done % trainer.eval_every == 0 or done == trainer.rounds:
            self.client_metrics = {}
            result.metrics.update(self.evaluate(trainer, result.round_idx))
            result.client_eval = dict(self.client_metrics)
            self._say_direction(result.metrics)

    def _say_direction(self, metrics: dict[str, float]) -> None:
        """Log once per run (and on a change) which clients the ``federated/*_worst10`` figure averages."""
        worst = [k for k in metrics if k.startswith("federated/") and k.endswith("_worst10")]
        if not worst or "federated/higher_is_better" not in metrics or worst[0] == self._direction_said:
            return
        self._direction_said = worst[0]
        higher = metrics["federated/higher_is_better"] == 1.0
        log.info("%s: the mean of the %s 10%% of the evaluated clients' values (%s is better)", worst[0],
                 "lowest" if higher else "highest", "higher" if higher else "lower")

    def evaluate(self, trainer: FederatedTrainer, round_idx: int) -> dict[str, float]:
        """The metrics of one evaluation round (``central/``, ``federated/``, ``round/eval_seconds``)."""
        return evaluate_round(trainer, round_idx, self.client_metrics)


__all__ = [
    "Evaluation", "LOWER_IS_BETTER", "evaluate_central", "evaluate_federated", "evaluate_round",
    "higher_is_better", "metric_key", "worst_clients_mean",
]
