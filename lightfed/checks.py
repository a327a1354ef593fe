"""Argument checks, one set for the whole package and its plugins: refuse a bad value where it enters.

Every message names the config key (``trainer.rounds``, ``data.partitioner.alpha``,
``strategy.init_args.f``), what was given, and what is allowed, so a run fails before any client trains.
"""

from __future__ import annotations

import math
from numbers import Integral, Real

__all__ = ["check_int", "check_positive", "check_range", "require"]


def require(ok: bool, message: str) -> None:
    """Raise ``ValueError(message)`` unless ``ok``."""
    if not ok:
        raise ValueError(message)


def check_int(value: object, key: str, minimum: int) -> int:
    """``value`` as an ``int`` if it is an integer (not a bool) ``>= minimum``."""
    require(
        isinstance(value, Integral) and not isinstance(value, bool) and value >= minimum,
        f"{key} must be an int >= {minimum}, got {value!r}.",
    )
    return int(value)  # type: ignore[arg-type]


def check_positive(value: object, key: str) -> float:
    """``value`` as a ``float`` if it is a finite real ``> 0``."""
    require(isinstance(value, Real) and math.isfinite(value) and value > 0, f"{key} must be > 0, got {value}.")
    return float(value)  # type: ignore[arg-type]


def check_range(value: object, key: str, low: float, high: float, low_open: bool = False, high_open: bool = True) -> float:
    """``value`` as a ``float`` if it lies in the interval from ``low`` to ``high`` (ends open or closed)."""
    ok = isinstance(value, Real) and (low < value if low_open else low <= value) and (value < high if high_open else value <= high)
    require(ok, f"{key} must be in {'(' if low_open else '['}{low}, {high}{')' if high_open else ']'}, got {value}.")
    return float(value)  # type: ignore[arg-type]
