"""Asynchronous training in virtual time: ``C`` clients in flight, a server flush every ``K`` arrivals.

The engine of FedBuff (Nguyen, Malik, Zhan, Yousefpour, Rabbat, Malek & Huba 2022, "Federated Learning
with Buffered Asynchronous Aggregation", Algorithm 1) and, with ``K = 1``, FedAsync (Xie et al. 2019):

1. at ``t = 0`` the server starts ``C`` visits (``concurrency``); a visit downloads the current global
   model (version ``v``) and trains from it;
2. a visit ends ``download + steps x step + upload`` later (the trace); a client whose online window closes
   first drops out (its slot is refilled then). Arrivals are processed in virtual-time order (ties: client
   id, then scheduling order);
3. an arriving update has staleness ``tau = version_now - v``; with ``max_staleness``, one with
   ``tau > max_staleness`` is discarded. Otherwise it joins the buffer (``update.metrics["staleness"]``);
4. when the buffer holds ``K`` updates, the server runs once over them (one call of the round server: the
   strategy weights each by ``s(tau)`` and steps, privacy clips and noises the flush's sum) and the
   version becomes ``v + 1``. That flush is one trainer round;
5. every ended visit frees its slot, which immediately starts a new visit (after the flush, so the new
   client downloads the new model). The new client is drawn uniformly from those online, not in flight,
   not in the buffer and under ``max_participations`` (rejection sampling from ``(seed, visit)``, so the
   cost per visit does not grow with the population).

A visit's client trains from the exact version it downloaded, at the flush that takes its update (the
update is a pure function of the client, the visit's index and that version's weights, so when it is
computed does not change it). In flight, a visit is only ``(client, version, visit index)``; the engine keeps
the weights of each version some visit in flight or in the buffer downloaded (memory: one model per distinct
version in flight, at most ``C``, flat in the number of clients). This is what makes the engine shardable
and resumable:

* several processes run the same clock (nothing of it depends on training results); the flush's ``K``
  visits train at positions ``rank::W`` and the round server all-reduces the sums (the same bits as one
  process);
* a checkpoint (written between flushes, when the buffer is empty) holds the pending events, the kept
  versions' weights and the counters: a resumed run trains the same visits from the same weights.

Strategies with per-client state are refused: a visit's state would be derived from a stale model and
committed flushes later, while visits of other versions commit theirs; SCAFFOLD's control variates and
Ditto's personal models assume the state and the model a client trains from belong to the same round.
"""

from __future__ import annotations

import random
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from torch import Tensor

from lightfed.checkpoint import to_device
from lightfed.checks import check_int, check_positive, require
from lightfed.messages import RoundResult
from lightfed.seeding import derive_seed
from lightfed.simtime.engine import Backend, Job, RoundClock
from lightfed.simtime.traces import Trace

if TYPE_CHECKING:
    from lightfed.trainer import FederatedTrainer

#: Rejection-sampling draws before a visit falls back to scanning the population.
_DRAWS = 64


@dataclass(frozen=True)
class Visit:
    """A client in flight: the version it downloaded and the visit's index (its randomness derives from it)."""

    client_id: int
    version: int
    index: int


@dataclass
class Snapshot:
    """A global version some visit in flight or in the buffer downloaded: its weights and payload."""

    params: Tensor
    payload: dict[str, Any] | None
    users: int = 0


class BufferedAsync(RoundClock):
    """FedBuff's and FedAsync's engine (``trainer.clock: {class_path: lightfed.simtime.BufferedAsync}``).

    The buffer size ``K`` is ``trainer.clients_per_round`` (clients per server step, as in a synchronous
    run); ``trainer.rounds`` counts flushes.

    Args:
        trace: The population's devices.
        concurrency: ``C``, visits in flight at any time.
        max_staleness: Discard arrivals staler than this (``None``: keep all).
        max_participations: The most visits any one client may start (``None``: unlimited). Client-level DP
            needs it: the accountant composes one Gaussian per possible participation.
        idle_seconds: When no client can start a visit, the slot tries again this much later.
    """

    caps_participations = True

    def __init__(
        self,
        trace: Trace | None = None,
        concurrency: int = 100,
        max_staleness: int | None = None,
        max_participations: int | None = None,
        idle_seconds: float = 60.0,
    ) -> None:
        super().__init__(trace)
        self.concurrency = check_int(concurrency, "trainer.clock.init_args.concurrency", 1)
        key = "trainer.clock.init_args."
        self.max_staleness = (
            None if max_staleness is None else check_int(max_staleness, key + "max_staleness", 0)
        )
        if max_participations is not None:
            self.max_participations = check_int(max_participations, key + "max_participations", 1)
        self.idle_seconds = check_positive(idle_seconds, "trainer.clock.init_args.idle_seconds")
        self.buffer_size = 1
        self.version = 0
        self.visits = 0
        self.in_flight: set[int] = set()
        self.buffer: list[tuple[Visit, int]] = []
        self.snapshots: dict[int, Snapshot] = {}
        self.counts = Counter[str]()
        self.started = False
        self.last_flush = 0.0

    def setup(self, trainer: FederatedTrainer) -> None:
        require(
            not trainer.strategy.uses_client_state,
            f"trainer.clock: BufferedAsync cannot run strategy {type(trainer.strategy).__name__}, which keeps "
            f"per-client state: a visit would derive its state from a stale model and commit it flushes later "
            f"(the state and the model it trains from must belong to the same round). Use SyncRounds, or a "
            f"stateless strategy (FedBuff, FedAsync).",
        )
        require(
            trainer.sampler.kind == "uniform",
            f"trainer.clock: BufferedAsync takes its buffer size K from trainer.clients_per_round; "
            f"trainer.sampler {type(trainer.sampler).__name__} does not give a fixed K. Remove "
            f"trainer.sampler.",
        )
        self.buffer_size = max(1, int(round(trainer.sampler.expected_cohort(trainer.num_clients))))
        super().setup(trainer)
        require(
            self.concurrency + self.buffer_size <= trainer.num_clients,
            f"trainer.clock.init_args.concurrency={self.concurrency} plus the buffer K={self.buffer_size} "
            f"exceeds the {trainer.num_clients} clients: a slot could never be filled. Lower the "
            f"concurrency.",
        )

    def start(self, backend: Backend, buffer_size: int) -> None:
        """Use ``backend`` with a buffer of ``buffer_size`` (what :meth:`setup` does for a trainer)."""
        self.attach(backend)
        self.buffer_size = buffer_size

    # ------------------------------------------------------------------ the event loop
    def run_round(self, trainer: FederatedTrainer | None, round_idx: int) -> RoundResult:
        assert self.backend is not None
        if not self.started:
            self.started = True
            for _ in range(self.concurrency):
                self._start_visit()
        while len(self.clock):
            event = self.clock.pop()
            self.counts["events"] += 1
            result = None
            if event.kind == "arrive":
                visit: Visit = event.payload
                self.in_flight.discard(visit.client_id)
                tau = self.version - visit.version
                if self.max_staleness is not None and tau > self.max_staleness:
                    self.counts["stale_discarded"] += 1
                    self._release(visit.version)
                else:
                    self.buffer.append((visit, tau))
                    if len(self.buffer) >= self.buffer_size:
                        result = self._flush(round_idx)
            elif event.kind == "offline":
                self.in_flight.discard(event.client_id)
                self.counts["offline_dropouts"] += 1
            self._start_visit()  # the freed slot (or an idle slot's retry) starts a new visit now
            if result is not None:
                return result
        raise RuntimeError("the asynchronous engine ran out of events (no slot can ever start a visit).")

    def _flush(self, round_idx: int) -> RoundResult:
        """Train the buffer's visits (this rank's positions) from the versions they downloaded; one server call."""
        assert self.backend is not None
        buffer, self.buffer = self.buffer, []
        taus = [t for _, t in buffer]
        jobs = []
        for visit, tau in buffer:
            snap = self.snapshots[visit.version]
            jobs.append(Job(visit.client_id, visit.index, snap.params, None, snap.payload, tau))
        cohort = sorted(v.client_id for v, _ in buffer)
        updates = self.train_jobs(round_idx, cohort, jobs)
        for visit, _ in buffer:
            self._release(visit.version)
        result = self.backend.flush(round_idx, cohort, updates)
        self.version += 1
        now = self.clock.now
        result.metrics.update({
            "time/virtual_seconds": now,
            "time/round_seconds": now - self.last_flush,
            "time/staleness_mean": sum(taus) / len(taus),
            "time/staleness_max": float(max(taus)),
            "time/in_flight": float(len(self.in_flight)),
            "time/visits": float(self.visits),
            "time/versions_held": float(len(self.snapshots)),
            **{f"time/{k}": float(v) for k, v in sorted(self.counts.items())},
        })
        self.last_flush = now
        return result

    def _hold(self, version: int) -> None:
        """A visit downloads the current version: keep its weights (and payload) until the visit is done."""
        assert self.backend is not None
        snap = self.snapshots.get(version)
        if snap is None:
            payload_of = getattr(self.backend, "payload", None)  # optional: a backend without one sends none
            payload = None
            if payload_of is not None:
                payload = {k: v.clone() if isinstance(v, Tensor) else v for k, v in payload_of(version).items()}
            snap = self.snapshots[version] = Snapshot(self.backend.global_params, payload)
        snap.users += 1

    def _release(self, version: int) -> None:
        snap = self.snapshots[version]
        snap.users -= 1
        if snap.users == 0:
            del self.snapshots[version]

    def _start_visit(self) -> None:
        """Fill one slot at the current time: start a client's visit now, or retry later if nobody can come."""
        assert self.backend is not None
        now = self.clock.now
        cid = self.choose(now)
        if cid is None:
            if not self.in_flight:
                self.check_not_exhausted(self.backend.num_clients)
            self.clock.schedule(now + self.idle_seconds, -1, "retry")
            self.counts["idle_slots"] += 1
            return
        self.visits += 1
        self.in_flight.add(cid)
        self.participations[cid] += 1
        steps = self.backend.planned_steps(cid)
        end = now + self.backend.visit_time(cid, steps).total
        until = self.trace.profile(cid).online_until(now)
        if end > until:  # goes offline mid-visit: the work is lost (no need to compute it)
            self.clock.schedule(until, cid, "offline")
            return
        self._hold(self.version)
        self.clock.schedule(end, cid, "arrive", Visit(cid, self.version, self.visits - 1))

    def _eligible(self, cid: int, now: float, buffered: set[int]) -> bool:
        if cid in self.in_flight or cid in buffered:
            return False
        if not self.under_cap(cid):
            return False
        return self.trace.profile(cid).available(now)

    def choose(self, now: float) -> int | None:
        """The client that starts the next visit at ``now`` (``None``: nobody can); the module's step 5.

        The seam for other selection rules (and for tests with a scripted schedule).
        """
        assert self.backend is not None
        n = self.backend.num_clients
        seed = derive_seed(self.backend.seed, "simtime/visit", self.visits, self.counts["idle_slots"])
        rng = random.Random(seed)
        buffered = {v.client_id for v, _ in self.buffer}
        for _ in range(_DRAWS):
            cid = rng.randrange(n)
            if self._eligible(cid, now, buffered):
                return cid
        rest = [c for c in range(n) if self._eligible(c, now, buffered)]
        return rest[rng.randrange(len(rest))] if rest else None

    # ------------------------------------------------------------------ checkpoints
    def config(self) -> dict[str, Any]:
        key = "trainer.clock.init_args."
        return {
            **super().config(), key + "concurrency": self.concurrency, key + "max_staleness": self.max_staleness,
            key + "idle_seconds": self.idle_seconds, "trainer.clients_per_round": self.buffer_size,
        }

    def state_dict(self) -> dict[str, Any]:
        """The base's state, the pending visits' versions (weights, payload), the buffer and the counters."""
        return {
            **super().state_dict(),
            "version": self.version, "visits": self.visits, "started": self.started,
            "last_flush": self.last_flush, "in_flight": sorted(self.in_flight),
            "counts": dict(sorted(self.counts.items())),
            "buffer": [[v.client_id, v.version, v.index, tau] for v, tau in self.buffer],
            "snapshots": {  # the current version's weights are the checkpoint's global model: not twice
                int(v): {"params": None if v == self.version else s.params, "payload": s.payload, "users": s.users}
                for v, s in sorted(self.snapshots.items())
            },
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Restore :meth:`state_dict`, after the global model (the current version's weights) is restored."""
        assert self.backend is not None
        super().load_state_dict(state)
        current = self.backend.global_params
        device = current.device
        self.version, self.visits = int(state["version"]), int(state["visits"])
        self.started, self.last_flush = bool(state["started"]), float(state["last_flush"])
        self.in_flight = {int(c) for c in state["in_flight"]}
        self.counts = Counter({str(k): int(n) for k, n in state["counts"].items()})
        self.buffer = [(Visit(int(c), int(v), int(i)), int(t)) for c, v, i, t in state["buffer"]]
        self.snapshots = {
            int(v): Snapshot(current if s["params"] is None else s["params"].to(device),
                             None if s["payload"] is None else to_device(s["payload"], device), int(s["users"]))
            for v, s in state["snapshots"].items()
        }

    def decode_payload(self, payload: Any) -> Any:
        return None if payload is None else Visit(*(int(x) for x in payload))

    def encode_payload(self, payload: Any) -> Any:
        return None if payload is None else [payload.client_id, payload.version, payload.index]


__all__ = ["BufferedAsync", "Visit"]
