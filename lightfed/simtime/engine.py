"""The timed engine's contract: a ``trainer.clock`` decides who trains when; a backend trains and serves.

A :class:`RoundClock` replaces the trainer's "sample, train everyone, aggregate" round by a policy in
virtual time (:mod:`lightfed.simtime.policies`: deadlines, over-selection, stragglers;
:mod:`lightfed.simtime.buffered`: FedBuff / FedAsync). One trainer round is one server call: a
synchronous round, or one buffer flush. Everything else of the trainer stays as it is: evaluation,
callbacks, logging, checkpoints.

The clock talks to the rest through a :class:`Backend` (pfl-research's seam between algorithm and
simulation): how long a visit takes, train one client from given weights, and run the server over a set of
updates. :class:`TrainerBackend` is the trainer's; tests use a few-line backend with a hand-analysable update.

Several processes: the event order is a function of the trace, the seed and the configured sizes only,
never of training results, so every rank runs the same clock and reaches the same server calls. Each server
call's clients are :class:`Job` s; rank ``r`` of ``W`` trains the jobs at positions ``r, r + W, ...``
(:meth:`RoundClock.train_jobs`) and the server sums the shards with the exact, order-free all-reduce of
:func:`lightfed.distributed.merge_round`: the same bits as one process.

A clock is checkpointed whole (:meth:`RoundClock.state_dict`: virtual time, pending events, participation
counts, the policy's counters and the settings it was built with), so a resumed timed run continues the
same event order; a resume with other settings is refused naming the field.
"""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Protocol

from torch import Tensor

from lightfed.distributed import merge_round
from lightfed.messages import ClientUpdate, RoundResult
from lightfed.simtime.clock import VirtualClock
from lightfed.simtime.plot import VirtualTimePlot
from lightfed.simtime.privacy import check_timed_privacy
from lightfed.simtime.secagg import bind_trace_dropout
from lightfed.simtime.staleness import STALENESS
from lightfed.simtime.traces import SyntheticTrace, Trace, VisitTime

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer


class Backend(Protocol):
    """What a clock needs from the federated run (the trainer's, or a test's).

    Optional members, read with defaults when a backend lacks them: ``rank`` / ``world_size`` (0 / 1),
    ``start_round(round_idx, cohort)`` (announce a server call before its clients train) and
    ``payload(key)`` (what the server sends a client besides the model; ``{}``).
    """

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


@dataclass
class Job:
    """One client's training for a server call: who, which visit (seeds), from which model, how long.

    Attributes:
        client_id: The client.
        visit_idx: The index the client's randomness derives from (the round, or the async visit).
        params: The global model the client downloaded.
        steps: Local steps (``None``: the trainer's ``local_steps`` / epochs).
        payload: What the server sent with the model (``None``: the backend's current payload).
        staleness: Written into the update's ``metrics["staleness"]`` (``None``: not asynchronous).
    """

    client_id: int
    visit_idx: int
    params: Tensor
    steps: int | None = None
    payload: dict[str, Any] | None = None
    staleness: int | None = field(default=None)


class TrainerBackend:
    """The :class:`Backend` of a :class:`~lightfed.trainer.FederatedTrainer` (after its set-up).

    Clients train one at a time with the trainer's :class:`~lightfed.client.LocalTrainer` (the privacy
    mechanism's wrapper included), so ``trainer.executor`` is not used by a timed run. With several
    processes, :meth:`flush` sums every rank's updates with :func:`lightfed.distributed.merge_round`.
    """

    def __init__(self, trainer: FederatedTrainer, trace: Trace) -> None:
        assert trainer.spec is not None and trainer.datamodule is not None
        self.trainer = trainer
        self.trace = trace
        self.num_clients = int(trainer.num_clients)
        self.seed = int(trainer.seed)
        self.rank, self.world_size = int(trainer.fabric.global_rank), int(trainer.fabric.world_size)
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

    def payload(self, key: int) -> dict[str, Any]:
        """The server's payload for a client that downloads now (round or version ``key``)."""
        return self.trainer.server.payload(key)

    def start_round(self, round_idx: int, cohort: list[int]) -> None:
        """The callbacks' ``on_round_start`` (a round, or a flush: before its clients train)."""
        for cb in self.trainer.all_callbacks:
            cb.on_round_start(self.trainer, round_idx, cohort)

    def train(
        self, client_id: int, visit_idx: int, global_params: Tensor, steps: int | None,
        payload: dict[str, Any] | None = None,
    ) -> ClientUpdate:
        trainer = self.trainer
        data = trainer.datamodule.client_train(client_id)
        sent = payload if payload is not None else trainer.server.payload(visit_idx)
        with _local_steps(trainer.local, steps):
            return trainer.local.fit_client(
                client_id, visit_idx, data, global_params, trainer.server.client_state(client_id), sent
            )

    def flush(self, round_idx: int, cohort: list[int], updates: list[ClientUpdate]) -> RoundResult:
        """The round server over this rank's updates (plus rank 0's callbacks' extra updates), all-reduced."""
        trainer = self.trainer
        extra: list[ClientUpdate] = []
        if self.rank == 0:
            for cb in trainer.callbacks:
                extra += list(cb.extra_updates(trainer, round_idx, cohort))
        reduce = None
        if self.world_size > 1:
            numel, device = self.global_params.numel(), self.global_params.device

            def reduce(shard: Any) -> Any:
                return merge_round(shard, numel, device)

        outcome = trainer.server.run(round_idx, cohort, updates, self.global_params, extra=extra, reduce=reduce)
        trainer.global_params = outcome.global_params
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
        self.privacy: Any = None

    def setup(self, trainer: FederatedTrainer) -> None:
        """Check the run can be timed, build the trainer's backend, bind trace dropouts and the time plot."""
        self._take_cap(trainer.privacy)
        check_timed_privacy(trainer.privacy, trainer.local_steps, self)
        self.privacy = trainer.privacy
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

    @property
    def rank(self) -> int:
        return int(getattr(self.backend, "rank", 0))

    @property
    def world_size(self) -> int:
        return int(getattr(self.backend, "world_size", 1))

    def train_jobs(self, round_idx: int, cohort: list[int], jobs: list[Job]) -> list[ClientUpdate]:
        """Announce the server call (``start_round``), then train this rank's jobs: positions ``rank::W``."""
        assert self.backend is not None
        start = getattr(self.backend, "start_round", None)
        if start is not None:
            start(round_idx, cohort)
        updates = []
        for job in jobs[self.rank :: self.world_size]:
            args = (job.client_id, job.visit_idx, job.params, job.steps)
            if job.payload is None:
                update = self.backend.train(*args)
            else:  # the payload of the version the client downloaded (asynchronous visits)
                update = self.backend.train(*args, payload=job.payload)  # type: ignore[call-arg]
            if job.staleness is not None:
                update.metrics[STALENESS] = float(job.staleness)
            updates.append(update)
        return updates

    def run_round(self, trainer: FederatedTrainer | None, round_idx: int) -> RoundResult:
        """Advance virtual time to the next server call; return its result (``time/*`` metrics included)."""
        raise NotImplementedError

    def online_at(self, client_id: int, t: float) -> bool:
        """Whether ``client_id`` is online at virtual time ``t`` (secure aggregation's dropouts read it)."""
        return self.trace.profile(client_id).available(t)

    # ------------------------------------------------------------------ checkpoints
    def config(self) -> dict[str, Any]:
        """The settings that shape the event order, keyed by their config field (a resume must match them)."""
        key = "trainer.clock.init_args."
        return {
            "trainer.clock.class_path": type(self).__name__,
            key + "max_participations": self.max_participations,
            **{key + ("trace.class_path" if k == "class" else "trace.init_args." + k): v
               for k, v in self.trace.config().items()},
        }

    def state_dict(self) -> dict[str, Any]:
        """Everything the clock needs to continue exactly: settings, virtual time, events, participations."""
        return {
            "config": self.config(),
            "clock": self.clock.state_dict(self.encode_payload),
            "participations": {int(c): int(n) for c, n in sorted(self.participations.items())},
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict` after :meth:`setup`.

        Raises:
            ValueError: in one line, naming the first setting that differs from the checkpoint's, or a
                privacy state that counts a client in more flushes than the clock ever started it.
        """
        mine = self.config()
        for key in sorted(mine.keys() | state["config"].keys()):
            if mine.get(key) != state["config"].get(key):
                raise ValueError(
                    f"the checkpoint's clock was built with {key}={state['config'].get(key)!r}, this run has "
                    f"{mine.get(key)!r}: the event order would differ. Resume with the checkpoint's {key}."
                )
        self.clock.load_state_dict(state["clock"], self.decode_payload)
        self.participations = Counter({int(c): int(n) for c, n in state["participations"].items()})
        counted = getattr(self.privacy, "participations", None) or {}
        over = sorted(c for c, n in counted.items() if n > self.participations[c])
        if over:
            raise ValueError(
                f"the checkpoint is inconsistent: its privacy state counts client {over[0]} in "
                f"{counted[over[0]]} flushes, but its clock started it {self.participations[over[0]]} times. "
                f"Resume from another checkpoint."
            )

    def encode_payload(self, payload: Any) -> Any:
        """An event's payload in checkpoint form (plain values: numbers, strings, lists, dicts, tensors)."""
        return payload

    def decode_payload(self, payload: Any) -> Any:
        """Rebuild an event's payload from :meth:`encode_payload`'s form."""
        return payload


__all__ = ["Backend", "Job", "RoundClock", "TrainerBackend"]
