"""Simulated client dropouts at each of the four SecAgg+ stages.

A client that drops at a stage sends nothing from that stage on. The stages, in protocol order:

* ``advertise_keys`` -- before sending its two public keys (it never joins the round);
* ``share_keys`` -- before sending its encrypted Shamir shares (nobody masks with it);
* ``masked_input`` -- before sending its masked input (its neighbours' pairwise masks with it must be
  reconstructed from their shares of its mask-agreement key);
* ``unmasking`` -- after its masked input arrived, before answering the unmasking request (its input
  counts; its self mask is reconstructed from its neighbours' shares; it gives no shares itself).
"""

from __future__ import annotations

from collections.abc import Mapping

from lightfed.seeding import derive_seed

STAGES: tuple[str, ...] = ("advertise_keys", "share_keys", "masked_input", "unmasking")


class DropoutModel:
    """Decides whether a client drops at a stage; the default never drops anyone."""

    def drops(self, seed: int, round_idx: int, client_id: int, stage: str) -> bool:
        """``True`` if ``client_id`` goes silent at ``stage`` of round ``round_idx``."""
        return False


class StageDropout(DropoutModel):
    """Independent Bernoulli dropouts per client and stage, drawn from ``(seed, round, client, stage)``.

    Args:
        probabilities: ``{stage: p}`` (missing stages: 0), or one ``p`` for every stage.
    """

    def __init__(self, probabilities: float | Mapping[str, float] = 0.0) -> None:
        if isinstance(probabilities, Mapping):
            unknown = set(probabilities) - set(STAGES)
            if unknown:
                raise ValueError(
                    f"secure_aggregation.dropout has unknown stages {sorted(unknown)}; the stages are {list(STAGES)}."
                )
            probs = {s: float(probabilities.get(s, 0.0)) for s in STAGES}
        else:
            probs = dict.fromkeys(STAGES, float(probabilities))
        for stage, p in probs.items():
            if not 0.0 <= p < 1.0:
                raise ValueError(f"secure_aggregation.dropout[{stage!r}] must be in [0, 1), got {p}.")
        self.probabilities = probs

    def drops(self, seed: int, round_idx: int, client_id: int, stage: str) -> bool:
        p = self.probabilities[stage]
        if p == 0.0:
            return False
        u = derive_seed(seed, "secagg/dropout", round_idx, client_id, stage) / 2.0**63
        return u < p


class ScheduledDropout(DropoutModel):
    """Explicit dropouts: ``{round: {client: stage}}`` (what-if studies and tests).

    A round missing from the schedule has no dropouts; the key ``-1`` applies to every round.
    """

    def __init__(self, schedule: Mapping[int, Mapping[int, str]]) -> None:
        for plan in schedule.values():
            for stage in plan.values():
                if stage not in STAGES:
                    raise ValueError(f"unknown dropout stage {stage!r}; the stages are {list(STAGES)}.")
        self.schedule = {int(r): {int(c): s for c, s in plan.items()} for r, plan in schedule.items()}

    def drops(self, seed: int, round_idx: int, client_id: int, stage: str) -> bool:
        plan = self.schedule.get(round_idx, self.schedule.get(-1, {}))
        return plan.get(client_id) == stage
