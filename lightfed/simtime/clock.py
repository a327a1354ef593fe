"""The virtual clock: time advances from event to event on a heap, never by sleeping.

An event is ``(time, client_id, seq, kind, payload)``. The heap orders by time, then client id, then the
sequence number the clock assigned when the event was scheduled, so two events at the same virtual time
always come out in the same order: the same seed and the same trace give the same event order, bit for
bit, however fast the host is. The payload never takes part in the comparison.
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass(order=True)
class Event:
    """One scheduled event; ordered by ``(time, client_id, seq)`` only."""

    time: float
    client_id: int
    seq: int
    kind: str = field(compare=False)
    payload: Any = field(default=None, compare=False)


class VirtualClock:
    """A discrete-event clock: :meth:`schedule` events, :meth:`pop` the next one (which sets :attr:`now`)."""

    def __init__(self) -> None:
        self.now = 0.0
        self.seq = 0
        self.events_processed = 0
        self._heap: list[Event] = []

    def schedule(self, time: float, client_id: int, kind: str, payload: Any = None) -> Event:
        """Schedule ``kind`` for ``client_id`` at virtual ``time`` (never before :attr:`now`)."""
        if not math.isfinite(time) or time < self.now:
            raise ValueError(f"cannot schedule {kind!r} for client {client_id} at t={time} (now {self.now}).")
        event = Event(float(time), int(client_id), self.seq, kind, payload)
        self.seq += 1
        heapq.heappush(self._heap, event)
        return event

    def pop(self) -> Event:
        """The next event; the clock moves to its time."""
        event = heapq.heappop(self._heap)
        self.now = event.time
        self.events_processed += 1
        return event

    def advance(self, time: float) -> None:
        """Move the clock forward to ``time`` (a synchronous round's end)."""
        if time < self.now:
            raise ValueError(f"the virtual clock cannot go back from {self.now} to {time}.")
        self.now = float(time)

    def __len__(self) -> int:
        return len(self._heap)

    def state_dict(self, payload: Callable[[Any], Any] = lambda p: p) -> dict[str, Any]:
        """Time, counters and every pending event in heap order (``payload`` makes a payload checkpointable)."""
        events = [[e.time, e.client_id, e.seq, e.kind, payload(e.payload)] for e in sorted(self._heap)]
        return {"now": self.now, "seq": self.seq, "events_processed": self.events_processed, "events": events}

    def load_state_dict(self, state: dict[str, Any], payload: Callable[[Any], Any] = lambda p: p) -> None:
        """Restore :meth:`state_dict` (``payload`` rebuilds a payload); the same events pop in the same order."""
        self.now, self.seq = float(state["now"]), int(state["seq"])
        self.events_processed = int(state["events_processed"])
        self._heap = [Event(float(t), int(c), int(s), str(k), payload(p)) for t, c, s, k, p in state["events"]]
        heapq.heapify(self._heap)


__all__ = ["Event", "VirtualClock"]
