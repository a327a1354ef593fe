"""Staleness: how many global versions old the model was that a client trained from, and what it weighs.

The asynchronous engine (:class:`~lightfed.simtime.engine.BufferedAsync`) writes each arriving update's
staleness ``tau = version_now - version_downloaded`` into ``update.metrics[STALENESS]`` (so it is also
logged as ``client/staleness_mean``); an asynchronous strategy reads it with :func:`staleness_of` in
``client_weight``. ``tau`` is a function of the trace and the seed only, never of a client's data, so a
weight derived from it is public (see docs/time.md, "Privacy without rounds").

The weight functions ``s(tau)`` (Xie, Koyejo & Gupta 2019, "Asynchronous Federated Optimization", Sec. 5.2):

* ``constant``: ``s(tau) = 1``;
* ``polynomial``: ``s(tau) = (1 + tau)^(-a)`` (FedBuff's ``1 / sqrt(1 + tau)`` is ``a = 1/2``);
* ``hinge``: ``s(tau) = 1`` for ``tau <= b``, else ``1 / (a (tau - b) + 1)``.
"""

from __future__ import annotations

from typing import Literal

from lightfed.checks import require
from lightfed.messages import ClientUpdate

#: The key of ``ClientUpdate.metrics`` that carries the update's staleness.
STALENESS = "staleness"

StalenessKind = Literal["constant", "polynomial", "hinge"]


def staleness_of(update: ClientUpdate) -> int:
    """The update's staleness (0 when it did not come through the asynchronous engine)."""
    return int(update.metrics.get(STALENESS, 0))


def staleness_weight(tau: int, kind: StalenessKind = "polynomial", a: float = 0.5, b: int = 0) -> float:
    """``s(tau)`` of the module docstring; always in ``(0, 1]``."""
    if kind == "constant":
        return 1.0
    if kind == "polynomial":
        return float((1.0 + tau) ** (-a))
    if kind == "hinge":
        return 1.0 if tau <= b else 1.0 / (a * (tau - b) + 1.0)
    raise ValueError(f"staleness kind must be 'constant', 'polynomial' or 'hinge', got {kind!r}.")


def check_staleness(kind: str, a: float, b: int, owner: str) -> None:
    """Refuse a staleness function that is not one of the three, or whose parameters leave ``(0, 1]``."""
    require(kind in ("constant", "polynomial", "hinge"),
            f"{owner}: strategy.init_args.staleness must be 'constant', 'polynomial' or 'hinge', "
            f"got {kind!r}.")
    require(a >= 0, f"{owner}: strategy.init_args.staleness_a must be >= 0, got {a}.")
    require(b >= 0, f"{owner}: strategy.init_args.staleness_b must be >= 0, got {b}.")


__all__ = ["STALENESS", "StalenessKind", "check_staleness", "staleness_of", "staleness_weight"]
