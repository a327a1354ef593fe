"""Time in federated training: a virtual clock, device traces, deadlines, buffered asynchronous aggregation.

``trainer.clock`` picks the policy (docs/time.md):

* :class:`SyncRounds` -- synchronous rounds on the clock: wait for all, or a deadline with over-selection and
  dropped or partial stragglers;
* :class:`BufferedAsync` -- FedBuff / FedAsync: ``concurrency`` clients in flight, a flush every
  ``trainer.clients_per_round`` arrivals (strategies ``FedBuff`` and ``FedAsync`` weight by staleness);

with a :class:`SyntheticTrace` (default) or a :class:`FedScaleTrace`; :class:`DPCappedParticipation` is the
client-level DP that stays sound without rounds, :class:`TraceDropout` makes SecAgg+'s dropouts the trace's.
"""

from lightfed.simtime.buffered import BufferedAsync
from lightfed.simtime.clock import Event, VirtualClock
from lightfed.simtime.engine import Backend, RoundClock, TrainerBackend
from lightfed.simtime.plot import VirtualTimePlot
from lightfed.simtime.policies import SyncRounds
from lightfed.simtime.privacy import DPCappedParticipation
from lightfed.simtime.secagg import TraceDropout
from lightfed.simtime.staleness import STALENESS, staleness_of, staleness_weight
from lightfed.simtime.traces import DeviceProfile, FedScaleTrace, SyntheticTrace, Trace, VisitTime

__all__ = [
    "STALENESS", "Backend", "BufferedAsync", "DPCappedParticipation", "DeviceProfile", "Event",
    "FedScaleTrace", "RoundClock", "SyncRounds", "SyntheticTrace", "TraceDropout", "Trace", "TrainerBackend",
    "VirtualClock",
    "VirtualTimePlot", "VisitTime", "staleness_of", "staleness_weight",
]
