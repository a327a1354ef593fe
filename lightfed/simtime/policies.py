"""Synchronous rounds in virtual time: wait for everyone, or a deadline with over-selection and stragglers.

A round at virtual time ``t0`` with target cohort ``m`` (``trainer.clients_per_round``):

1. only clients online at ``t0`` (and under ``max_participations``) can be sampled;
   ``ceil(over_selection * m)`` of them are drawn uniformly, from ``(seed, round)``;
2. client ``k``'s visit ends at ``t0 + download_k + steps_k * step_k + upload_k``; a client whose online
   window closes before that drops out (a real dropout, not a coin);
3. the server keeps the first ``m`` to finish (ties by client id) -- Bonawitz et al. 2019, "Towards
   Federated Learning at Scale: System Design", select 130% and keep the first 100%;
4. with a ``deadline``, clients that would finish after ``t0 + deadline`` are stragglers: ``"drop"`` leaves
   them out; ``"partial"`` keeps the work they can do in time, ``floor((deadline - download - upload) /
   step)`` local steps (at least one), as FedProx tolerates partial work (Li et al. 2020, "Federated
   Optimization in Heterogeneous Networks", Sec. 3: a variable number of local updates per device);
5. the round ends when the ``m``-th kept update arrives, or at the deadline if fewer made it.

Without a deadline and with ``over_selection = 1`` this is plain synchronous FedAvg, timed: every round
lasts as long as its slowest client.

The kept clients train from the round's global model, each with its own state when the strategy keeps one
(SCAFFOLD, Ditto: the server's store, committed when the update is accepted, as in untimed rounds). With
several processes every rank plans the same round and trains the kept clients at its positions.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Literal

import torch

from lightfed.checks import check_int, check_positive, require
from lightfed.messages import RoundResult
from lightfed.seeding import make_generator
from lightfed.simtime.engine import Job, RoundClock
from lightfed.simtime.traces import Trace

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer


class SyncRounds(RoundClock):
    """Synchronous rounds on a virtual clock (``trainer.clock: {class_path: lightfed.simtime.SyncRounds}``).

    Args:
        trace: The population's devices.
        deadline: Seconds a round may last (``None``: wait for the ``m`` fastest of the selected).
        over_selection: Select this many times ``m`` clients (>= 1; 1.3 is Bonawitz et al.'s).
        stragglers: ``"drop"`` or ``"partial"`` (keep the steps done by the deadline; needs ``deadline``).
        idle_seconds: When nobody is online, the server waits this long before trying again.
        max_participations: The most rounds any client may be selected for (``None``: unlimited); set from
            ``privacy.init_args.max_participations`` under :class:`~lightfed.simtime.DPCappedParticipation`.
    """

    caps_participations = True

    def __init__(
        self,
        trace: Trace | None = None,
        deadline: float | None = None,
        over_selection: float = 1.0,
        stragglers: Literal["drop", "partial"] = "drop",
        idle_seconds: float = 60.0,
        max_participations: int | None = None,
    ) -> None:
        super().__init__(trace)
        if max_participations is not None:
            key = "trainer.clock.init_args.max_participations"
            self.max_participations = check_int(max_participations, key, 1)
        if deadline is not None:
            check_positive(deadline, "trainer.clock.init_args.deadline")
        require(over_selection >= 1.0,
                f"trainer.clock.init_args.over_selection must be >= 1, got {over_selection}.")
        require(stragglers in ("drop", "partial"),
                f"trainer.clock.init_args.stragglers must be 'drop' or 'partial', got {stragglers!r}.")
        require(stragglers == "drop" or deadline is not None,
                "trainer.clock.init_args.stragglers: partial keeps the work done by the deadline; set "
                "deadline too.")
        self.deadline = deadline
        self.over_selection = float(over_selection)
        self.stragglers = stragglers
        self.idle_seconds = check_positive(idle_seconds, "trainer.clock.init_args.idle_seconds")
        self.cohort_size = 0

    def setup(self, trainer: FederatedTrainer) -> None:
        super().setup(trainer)
        self.cohort_size = max(1, int(round(trainer.sampler.expected_cohort(trainer.num_clients))))

    def select(self, round_idx: int, t0: float) -> list[int]:
        """Step 1: ``ceil(over_selection * m)`` of the clients online at ``t0``, uniformly (sorted ids)."""
        assert self.backend is not None
        n = self.backend.num_clients
        online = [c for c in range(n) if self.under_cap(c) and self.trace.profile(c).available(t0)]
        want = min(len(online), math.ceil(self.over_selection * self.cohort_size))
        gen = make_generator(self.backend.seed, "simtime/select", round_idx)
        pick = sorted(online[i] for i in torch.randperm(len(online), generator=gen)[:want].tolist())
        self.participations.update(pick)  # selected = may contribute: counted against the cap
        return pick

    def plan(self, round_idx: int, t0: float) -> tuple[list[tuple[float, int, int | None]], dict[str, float]]:
        """Steps 2-5: ``[(finish, client, steps or None: all)]`` of the kept clients, and the counts."""
        assert self.backend is not None
        selected = self.select(round_idx, t0)
        if not selected:
            self.check_not_exhausted(self.backend.num_clients)
        end_by = math.inf if self.deadline is None else t0 + self.deadline
        done: list[tuple[float, int, int | None]] = []
        late: list[tuple[float, int, int | None]] = []
        offline = 0
        for cid in selected:
            steps = self.backend.planned_steps(cid)
            visit = self.backend.visit_time(cid, steps)
            finish = t0 + visit.total
            until = self.trace.profile(cid).online_until(t0)
            if finish <= end_by:
                if finish <= until:
                    done.append((finish, cid, None))
                else:
                    offline += 1
                continue
            if self.stragglers == "partial":
                per_step = visit.compute / steps if steps else math.inf
                room = end_by - t0 - visit.download - visit.upload
                fit = math.floor(room / per_step) if per_step > 0 else 0
                if fit >= 1 and end_by <= until:
                    late.append((end_by, cid, min(fit, steps)))
                    continue
            late.append((math.inf, cid, 0))
        done.sort()
        kept = done[: self.cohort_size]
        partial = [x for x in late if x[2]][: self.cohort_size - len(kept)]
        kept += partial
        if len(done) >= self.cohort_size:
            end = done[self.cohort_size - 1][0]
        elif self.deadline is not None:
            end = end_by
        else:
            end = kept[-1][0] if kept else t0 + self.idle_seconds
        counts = {
            "time/selected": float(len(selected)),
            "time/kept": float(len(kept)),
            "time/partial": float(len(partial)),
            "time/stragglers": float(len(done) - len(done[: self.cohort_size]) + len(late) - len(partial)),
            "time/offline_dropouts": float(offline),
        }
        return kept, {**counts, "_end": end}

    def run_round(self, trainer: FederatedTrainer | None, round_idx: int) -> RoundResult:
        assert self.backend is not None
        t0 = self.clock.now
        kept, counts = self.plan(round_idx, t0)
        end = counts.pop("_end")
        params = self.backend.global_params
        by_id = sorted(kept, key=lambda x: x[1])
        cohort = [cid for _, cid, _ in by_id]
        updates = self.train_jobs(round_idx, cohort, [Job(cid, round_idx, params, steps) for _, cid, steps in by_id])
        self.clock.advance(end)  # the server aggregates (and secure aggregation runs) at the round's end
        result = self.backend.flush(round_idx, cohort, updates)
        result.metrics.update(counts)
        result.metrics["time/virtual_seconds"] = self.clock.now
        result.metrics["time/round_seconds"] = self.clock.now - t0
        return result

    def config(self) -> dict[str, Any]:
        key = "trainer.clock.init_args."
        return {
            **super().config(), key + "deadline": self.deadline, key + "over_selection": self.over_selection,
            key + "stragglers": self.stragglers, key + "idle_seconds": self.idle_seconds,
            "trainer.clients_per_round": self.cohort_size,
        }


__all__ = ["SyncRounds"]
