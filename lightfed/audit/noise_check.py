"""A direct check of the noise a DP pipeline releases, per tensor and per coordinate block, against its plan.

Canary estimates (:mod:`lightfed.audit.canary`) measure what an attack learns, and a mechanism that skips the
noise on *part* of the update can hide in them: with every other coordinate released exactly the true epsilon
is infinite, yet random-direction canaries read 2-4 against a claim of 3, because each direction is half
noised. This check looks at the noise itself. It drives a copy of the run's pipeline -- the privacy
mechanism's client side, weight and server side, the round's sum (secure aggregation included, with its
distributed noise shares), then :meth:`~lightfed.privacy.base.PrivacyMechanism.process_aggregate` -- with
all-zero updates from ``m`` clients for ``R`` rounds, so the released sum *is* the noise. The plan
(:class:`~lightfed.privacy.base.NoisePlan`) says every coordinate of the sum carries ``N(0, (z C)^2)`` at least.
For each group ``g`` of ``n_g`` released values (a tensor over ``R`` rounds; a block of ``block`` consecutive
coordinates of a tensor over ``R`` rounds)

    Q_g = sum_{i in g} x_i^2 / (z C)^2  ~  chi^2(n_g)   under the plan,

and the group fails when ``P(chi^2(n_g) <= Q_g) < alpha / G`` (``G`` groups: a Bonferroni bound, so a correct
pipeline fails with probability below ``alpha``). More noise than planned never fails (distributed noise is
sized for the fewest survivors). A coordinate released exactly in every round (``x_i = 0`` exactly, which
Gaussian noise never gives) fails outright. The check runs on copies: the run's accountant, clip and
secure-aggregation state are untouched.

Limits: strategy extras (SCAFFOLD's control variates) are not part of the zero updates; the check covers the
update payload. It verifies the noise, not the clipping (canaries at ``clip_multiple > 1`` do that).
"""

from __future__ import annotations

import copy
import json
import math
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any

import torch
from scipy import stats
from torch import Tensor

from lightfed.aggregation import StreamingSum
from lightfed.callbacks import Callback
from lightfed.messages import ClientUpdate
from lightfed.privacy.base import PrivacyMechanism
from lightfed.registry import AUDITS

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer


@dataclass
class NoiseCheckReport:
    """What :func:`check_released_noise` found.

    Attributes:
        target_std: ``z C``, the planned std of every coordinate of the released sum.
        rounds, cohort, block, alpha: The check's settings.
        tensors: Per tensor: measured std of the released noise, its ratio to the plan, the lower-tail p-value.
        failed_tensors: Tensors whose noise falls short of the plan.
        failed_blocks: ``"name[start:stop]"`` of every block that falls short (the first 20).
        num_failed_blocks: How many blocks fall short.
        exact_coordinates: Coordinates released exactly (zero noise) in every round.
        ok: No tensor, no block and no coordinate falls short.
    """

    target_std: float
    rounds: int
    cohort: int
    block: int
    alpha: float
    tensors: dict[str, dict[str, float]] = field(default_factory=dict)
    failed_tensors: list[str] = field(default_factory=list)
    failed_blocks: list[str] = field(default_factory=list)
    num_failed_blocks: int = 0
    exact_coordinates: int = 0
    ok: bool = True

    def summary(self) -> str:
        if self.ok:
            return (f"released noise matches the plan (std z*C = {self.target_std:.4g}) in every tensor and every block "
                    f"of {self.block} coordinates over {self.rounds} rounds")
        worst = min(self.tensors.items(), key=lambda kv: kv[1]["ratio"])
        return (f"released noise FALLS SHORT of the plan (std z*C = {self.target_std:.4g}): tensors {self.failed_tensors[:5]}, "
                f"{self.num_failed_blocks} blocks of {self.block} (first {self.failed_blocks[:3]}), {self.exact_coordinates} "
                f"coordinates released exactly; lowest ratio {worst[1]['ratio']:.3g} in {worst[0]}")


def released_noise(
    privacy: PrivacyMechanism, secure_aggregation: Any, numel: int, cohort: int, round_idx: int,
    device: torch.device | str = "cpu",
) -> Tensor:
    """The update sum a copy of the pipeline releases for ``cohort`` all-zero updates in round ``round_idx``."""
    privacy, secure_aggregation = copy.deepcopy(privacy), copy.deepcopy(secure_aggregation)
    members = list(range(cohort))
    aggregator: Any = secure_aggregation.aggregator(round_idx, members) if secure_aggregation is not None else StreamingSum()
    for cid in members:
        update = privacy.client_update(ClientUpdate(cid, torch.zeros(numel, device=device), num_examples=1), round_idx)
        weight = privacy.client_weight(update, 1.0)
        aggregator.add(privacy.server_update(update, round_idx), weight)
    aggregate = aggregator.result()
    if aggregate is None:
        raise RuntimeError(f"the noise check's round {round_idx} released nothing (secure aggregation failed closed).")
    return privacy.process_aggregate(aggregate, round_idx).delta_sum.detach().double().cpu()


def check_released_noise(
    privacy: PrivacyMechanism,
    names: list[str] | tuple[str, ...],
    numels: list[int] | tuple[int, ...],
    *,
    secure_aggregation: Any = None,
    cohort: int = 8,
    rounds: int = 8,
    block: int = 64,
    alpha: float = 1e-6,
    first_round: int = 0,
) -> NoiseCheckReport:
    """Compare the released noise per tensor and per block of coordinates with the plan (module docstring).

    Args:
        privacy: A set-up mechanism (copied, never changed).
        names, numels: The payload's tensors in order (``ParamSpec.names`` / ``numels``).
        secure_aggregation: A set-up secure aggregation (copied), or ``None``.
        cohort: Clients per checked round.
        rounds: ``R``, rounds checked.
        block: Coordinates per block.
        alpha: Bound on the probability that a correct pipeline fails the check.
        first_round: Round index of the first checked round (the noise is seeded by round).

    Raises:
        ValueError: the mechanism plans no noise on the sum (nothing to check).
    """
    plan = privacy.noise_plan()
    if plan.placement not in ("server", "distributed") or plan.noise_multiplier <= 0 or plan.clip_norm is None:
        raise ValueError(
            f"the noise check needs a mechanism that noises the round's sum, but {type(privacy).__name__} plans "
            f"{plan.placement!r} noise with multiplier {plan.noise_multiplier}; there is no noise plan to check."
        )
    target = float(plan.noise_multiplier) * float(plan.clip_norm)
    numel = int(sum(numels))
    draws = torch.stack([released_noise(privacy, secure_aggregation, numel, cohort, first_round + r) for r in range(rounds)])
    report = NoiseCheckReport(target, rounds, cohort, block, alpha)
    groups: list[tuple[str, bool, Tensor]] = []
    start = 0
    for name, n in zip(names, numels):
        part = draws[:, start : start + n]
        groups.append((name, True, part))
        for b in range(0, n, block):
            groups.append((f"{name}[{b}:{min(b + block, n)}]", False, part[:, b : b + block]))
        start += n
    threshold = alpha / len(groups)
    for label, whole, values in groups:
        q = float((values**2).sum()) / target**2
        p_low = float(stats.chi2.cdf(q, values.numel()))
        if whole:
            report.tensors[label] = {"std": math.sqrt(q / values.numel()) * target, "ratio": math.sqrt(q / values.numel()),
                                     "p_low": p_low}
        if p_low < threshold:
            if whole:
                report.failed_tensors.append(label)
            else:
                report.num_failed_blocks += 1
                if len(report.failed_blocks) < 20:
                    report.failed_blocks.append(label)
    report.exact_coordinates = int((draws == 0).all(dim=0).sum())
    report.ok = not (report.failed_tensors or report.num_failed_blocks or report.exact_coordinates)
    return report


@AUDITS.register("ReleasedNoiseCheck")
class ReleasedNoiseCheck(Callback):
    """Check the run's released noise against its plan before training (:func:`check_released_noise`).

    Configure it under ``trainer.callbacks``::

        trainer:
          callbacks:
            - class_path: lightfed.audit.ReleasedNoiseCheck

    Args:
        rounds: Rounds of all-zero updates checked.
        block: Coordinates per block.
        alpha: Bound on the probability that a correct pipeline fails.
        fail: Stop the run with an error when the noise falls short (else: a warning and the report).
        report_name: JSON report written in ``trainer.log_dir``.
    """

    def __init__(self, rounds: int = 8, block: int = 64, alpha: float = 1e-6, fail: bool = True,
                 report_name: str = "audit_noise_check.json") -> None:
        if rounds < 1 or block < 1 or not 0 < alpha < 1:
            raise ValueError(f"ReleasedNoiseCheck needs rounds >= 1, block >= 1 and alpha in (0, 1), got {rounds}, {block}, {alpha}.")
        self.rounds, self.block, self.alpha, self.fail = int(rounds), int(block), float(alpha), fail
        self.report_name = report_name
        self.report: NoiseCheckReport | None = None

    def setup(self, trainer: FederatedTrainer) -> None:
        if trainer.privacy is None:
            raise ValueError("ReleasedNoiseCheck checks a privacy mechanism's noise, but this run has no privacy section.")
        assert trainer.spec is not None
        cohort = max(2, round(trainer.sampler.expected_cohort(trainer.num_clients)))
        self.report = check_released_noise(
            trainer.privacy, trainer.spec.names, trainer.spec.numels, secure_aggregation=trainer.secure_aggregation,
            cohort=cohort, rounds=self.rounds, block=self.block, alpha=self.alpha,
        )
        if trainer.is_global_zero:
            path = trainer.log_dir / self.report_name
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(json.dumps(asdict(self.report), indent=2) + "\n")
            print(f"[lightfed audit] {self.report.summary()}  -> {path}", flush=True)
        if not self.report.ok and self.fail:
            raise ValueError(f"ReleasedNoiseCheck: the {self.report.summary()}; the run's epsilon would be false.")


__all__ = ["NoiseCheckReport", "ReleasedNoiseCheck", "check_released_noise", "released_noise"]
