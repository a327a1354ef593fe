"""The timed engine's contract: a ``trainer.clock`` decides who trains when; a backend trains and serves.

A :class:`RoundClock` replaces the trainer's "sample, train everyone, aggregate" round by a policy in
virtual time (:mod:`lightfed.simtime.policies`: deadlines, over-selection, stragglers;
:mod:`lightfed.simtime.buffered`: FedBuff / FedAsync). One trainer round is one server call: a
synchronous round, or one buffer flush. Everything else of the trainer stays as it is: evaluation,
callbacks, logging, checkpoints of the model and strategy.

The clock talks to the rest through a :class:`Backend` (pfl-research's seam between algorithm and
simulation): how long a visit takes, train one client from given weights, and run the server over a set of
updates. :class:`TrainerBackend` is the trainer's; tests use a few-line backend with a hand-analysable update.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from lightfed.messages import ClientUpdate, RoundResult
from lightfed.simtime.clock import VirtualClock
from lightfed.simtime.plot import VirtualTimePlot
from lightfed.simtime.privacy import check_timed_privacy
from lightfed.simtime.secagg import bind_trace_dropout
from lightfed.simtime.traces import SyntheticTrace, Trace, VisitTime

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer


class Backend(Protocol):
    """What a clock needs from the federated run (the trainer's, or a test's)."""

    num_clients: int
    seed: int

    @property
    def global_params(self) -> Tensor: ...
    def planned_steps(self, client_id: int) -> int: ...
    def visit_time(self, client_id: int, steps: int) -> VisitTime: ...
    def train(
        self, client_id: int, visit_idx: int, global_params: Tensor, steps: int | None
    ) -> ClientUpdate: ...
    def flush(self, round_idx: int, cohort: list[int], updates: list[ClientUpdate]) -> RoundResult: ...


class TrainerBackend:
    """The :class:`Backend` of a :class:`~lightfed.trainer.FederatedTrainer` (after its set-up).

    Clients train one at a time with the trainer's :class:`~lightfed.client.LocalTrainer` (the privacy
    mechanism's wrapper included), so ``trainer.executor`` is not used by a timed run.
    """

    def __init__(self, trainer: FederatedTrainer, trace: Trace) -> None:
        assert trainer.spec is not None and trainer.datamodule is not None
        self.trainer = trainer
        self.trace = trace
        self.num_clients = int(trainer.num_clients)
        self.seed = int(trainer.seed)
        self.samples_per_step = trainer.batch_size * int(trainer.loop_flags["accumulate_grad_batches"])
        self.bytes_up = int(trainer.spec.num_bytes)

    @property
    def global_params(self) -> Tensor:
        assert self.trainer.global_params is not None
        return self.trainer.global_params

    def planned_steps(self, client_id: int) -> int:
        return int(self.trainer.local.visit_steps(self.trainer.datamodule.client_train(client_id)))

    def visit_time(self, client_id: int, steps: int) -> VisitTime:
        payload = self.trainer.strategy.client_payload(0)
        extra = sum(v.numel() * v.element_size() for v in payload.values() if isinstance(v, Tensor))
        return self.trace.profile(client_id).seconds(
            samples=steps * self.samples_per_step, bytes_down=self.bytes_up + extra, bytes_up=self.bytes_up,
            compute_factor=self.trace.compute_factor,
        )

    def train(self, client_id: int, visit_idx: int, global_params: Tensor, steps: int | None) -> ClientUpdate:
        trainer = self.trainer
        data = trainer.datamodule.client_train(client_id)
        with _local_steps(trainer.local, steps):
            return trainer.local.fit_client(
                client_id, visit_idx, data, global_params, {}, trainer.server.payload(visit_idx)
            )

    def flush(self, round_idx: int, cohort: list[int], updates: list[ClientUpdate]) -> RoundResult:
        outcome = self.trainer.server.run(round_idx, cohort, updates, self.global_params)
        self.trainer.global_params = outcome.global_params
        return outcome.result


@contextlib.contextmanager
def _local_steps(local: Any, steps: int | None) -> Iterator[None]:
    """Run a visit with exactly ``steps`` local steps (partial work); restore the trainer's setting after."""
    if steps is None:
        yield
        return
    saved = local.local_steps
    local.local_steps = int(steps)
    try:
        yield
    finally:
        local.local_steps = saved


class RoundClock:
    """Base class of ``trainer.clock`` plugins: one :meth:`run_round` is one call of the round server.

    Args:
        trace: The population's devices (default: :class:`~lightfed.simtime.traces.SyntheticTrace`).
    """

    #: Whether the clock never lets a client take part more than ``max_participations`` times (DP needs it).
    caps_participations: bool = False

    def __init__(self, trace: Trace | None = None) -> None:
        self.trace = trace if trace is not None else SyntheticTrace()
        self.max_participations: int | None = None
        self.participations: Counter[int] = Counter()
        self.clock = VirtualClock()
        self.backend: Backend | None = None

    def setup(self, trainer: FederatedTrainer) -> None:
        """Check the run can be timed, build the trainer's backend, bind trace dropouts and the time plot."""
        if trainer.strategy.uses_client_state:
            raise ValueError(
                f"trainer.clock: strategy {type(trainer.strategy).__name__} keeps per-client state, which a "
                f"timed run does not carry between visits yet; use a stateless strategy (FedBuff, ...)."
            )
        if trainer.fabric.world_size > 1:
            raise ValueError(
                "trainer.clock runs in one process (the event order is global); use trainer.devices=1."
            )
        self._take_cap(trainer.privacy)
        check_timed_privacy(trainer.privacy, trainer.local_steps, self)
        self.attach(TrainerBackend(trainer, self.trace))
        bind_trace_dropout(trainer.secure_aggregation, self)
        if not any(isinstance(cb, VirtualTimePlot) for cb in trainer.callbacks):
            plot = VirtualTimePlot()
            trainer.add_callbacks([plot])
            plot.setup(trainer)

    def _take_cap(self, privacy: Any) -> None:
        """Enforce the privacy accountant's participation cap (refuse a different cap set on the clock)."""
        cap = getattr(privacy, "max_participations", None)
        if cap is None:
            return
        if self.max_participations is not None and self.max_participations != cap:
            raise ValueError(
                f"trainer.clock.init_args.max_participations={self.max_participations} but the privacy "
                f"accountant composes privacy.init_args.max_participations={cap}; set one of them (the "
                f"clock enforces the accountant's cap)."
            )
        self.max_participations = int(cap)

    def under_cap(self, client_id: int) -> bool:
        """Whether ``client_id`` may take part once more."""
        return self.max_participations is None or self.participations[client_id] < self.max_participations

    def check_fresh(self, round_idx: int) -> None:
        """Refuse to continue a resumed run: the checkpoint does not hold the clock (time, visits)."""
        fresh = self.clock.events_processed == 0 and self.clock.now == 0.0 and not self.participations
        if round_idx > 0 and fresh:
            raise ValueError(
                f"trainer.clock cannot resume at round {round_idx}: the checkpoint holds the model and "
                f"strategy but not the virtual clock (its time, the visits in flight, the participation "
                f"counts). Start the timed run from round 0."
            )

    def check_not_exhausted(self, num_clients: int) -> None:
        """Stop with a clear error once every client has used its participations (nothing can follow)."""
        cap = self.max_participations
        counts = self.participations
        if cap is not None and len(counts) == num_clients and min(counts.values()) >= cap:
            raise RuntimeError(
                f"every one of the {num_clients} clients has taken part max_participations={cap} times: no "
                f"further round or flush can run. Lower trainer.rounds, or raise the cap."
            )

    def attach(self, backend: Backend) -> None:
        """Use ``backend`` (the trainer's, or a test's)."""
        self.backend = backend

    def run_round(self, trainer: FederatedTrainer | None, round_idx: int) -> RoundResult:
        """Advance virtual time to the next server call; return its result (``time/*`` metrics included)."""
        raise NotImplementedError

    def online_at(self, client_id: int, t: float) -> bool:
        """Whether ``client_id`` is online at virtual time ``t`` (secure aggregation's dropouts read it)."""
        return self.trace.profile(client_id).available(t)

    def state_dict(self) -> dict[str, Any]:
        return {"clock": self.clock.state_dict()}


__all__ = ["Backend", "RoundClock", "TrainerBackend"]
