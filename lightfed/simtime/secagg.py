"""Secure aggregation in virtual time: each server call (round or flush) is one SecAgg+ cohort.

A FedBuff flush runs SecAgg+ (:mod:`lightfed.secagg`) over the flush's ``K`` clients, unchanged: the clients
whose updates are buffered hold them (masked input not yet sent) until the flush, then run the four stages
together. That is the existing protocol over a cohort, so its guarantee is the existing one: the server learns
only the sum of the survivors' inputs. The price is that a buffered client must still be online at the flush.

:class:`TraceDropout` makes the trace decide who drops, instead of a coin: a client offline at the flush's
virtual time never advertises its keys (its update is lost); one whose window closes within
``protocol_seconds`` after the flush sends its masked input and is gone before unmasking (its input counts,
its self mask is reconstructed from its neighbours' shares). Configure it as
``secure_aggregation.init_args.dropout``; a ``trainer.clock`` binds it.

What is missing (docs/time.md, "Secure aggregation with a buffer"): buffered secure aggregation (BASecAgg,
So, Nolet, Yang, Li, Mohassel, Ghosh & Avestimehr 2021, arXiv 2110.02177), in which a client uploads its
masked update on arrival and leaves, its masks secret-shared with Lagrange coding so that they can be removed
from a sum of updates that arrived at different versions, without the client and without a trusted buffer.
lightfed has neither that masking scheme nor its staleness-aware unmasking: a buffered client that goes
offline before the flush loses its update.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightfed.checks import check_positive
from lightfed.secagg.dropout import DropoutModel

if TYPE_CHECKING:
    from lightfed.simtime.engine import RoundClock


class TraceDropout(DropoutModel):
    """SecAgg+ dropouts from the device trace at the virtual time of each server call.

    Args:
        protocol_seconds: Virtual seconds the four protocol stages take after the flush.
    """

    def __init__(self, protocol_seconds: float = 5.0) -> None:
        key = "secure_aggregation.init_args.dropout.init_args.protocol_seconds"
        self.protocol_seconds = check_positive(protocol_seconds, key)
        self.clock: RoundClock | None = None

    def bind(self, clock: RoundClock) -> None:
        """Read availability and the current virtual time from ``clock``."""
        self.clock = clock

    def drops(self, seed: int, round_idx: int, client_id: int, stage: str) -> bool:
        if self.clock is None:
            raise ValueError(
                "secure_aggregation.init_args.dropout: TraceDropout reads the device trace of a timed run; "
                "configure trainer.clock (lightfed.simtime.SyncRounds or BufferedAsync)."
            )
        now = self.clock.clock.now
        if stage == "advertise_keys":
            return not self.clock.online_at(client_id, now)
        if stage == "unmasking":
            return not self.clock.online_at(client_id, now + self.protocol_seconds)
        return False


def bind_trace_dropout(secure_aggregation: Any, clock: RoundClock) -> None:
    """Bind a :class:`TraceDropout` configured on ``secure_aggregation`` (if any) to ``clock``."""
    dropout = getattr(secure_aggregation, "dropout", None)
    if isinstance(dropout, TraceDropout):
        dropout.bind(clock)


__all__ = ["TraceDropout", "bind_trace_dropout"]
