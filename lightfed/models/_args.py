"""Argument checks shared by the shipped models: refuse a bad value at construction, naming the config key.

A model's arguments arrive as ``model.init_args.<field>`` in a config; the messages name that key, what was
given, what is allowed and a value that works, so a run fails before any client trains.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from numbers import Integral, Real

__all__ = ["check_fraction", "check_optimizer", "check_positive_int"]


def _key(field: str) -> str:
    return f"model.init_args.{field}"


def check_optimizer(lr: float, momentum: float, weight_decay: float, example_lr: float) -> None:
    """``lr`` finite and > 0, ``momentum`` in [0, 1), ``weight_decay`` finite and >= 0.

    Args:
        lr, momentum, weight_decay: The model's optimizer arguments.
        example_lr: A learning rate that works for this model (its default), quoted in the fix.

    Raises:
        ValueError: naming ``model.init_args.<field>``, the value and the fix.
    """
    if not (isinstance(lr, Real) and math.isfinite(lr) and lr > 0):
        why = "; a learning rate of 0 trains nothing" if lr == 0 else ""
        raise ValueError(f"{_key('lr')} must be > 0 and finite, got {lr}{why}. Set e.g. `{_key('lr')}: {example_lr}`.")
    if not (isinstance(momentum, Real) and 0 <= momentum < 1):
        raise ValueError(
            f"{_key('momentum')} must be in [0, 1), got {momentum}; use 0 for plain SGD or e.g. 0.9."
        )
    if not (isinstance(weight_decay, Real) and math.isfinite(weight_decay) and weight_decay >= 0):
        raise ValueError(
            f"{_key('weight_decay')} must be >= 0 and finite, got {weight_decay}; use 0 for none or e.g. 1e-4."
        )


def check_positive_int(value: int | Sequence[int], field: str, minimum: int = 1, why: str = "") -> None:
    """``value`` (or each of a list of values) is an int >= ``minimum``.

    Raises:
        ValueError: naming ``model.init_args.<field>`` and the value.
    """
    values = list(value) if isinstance(value, (list, tuple)) else [value]
    if not all(isinstance(v, Integral) and not isinstance(v, bool) and v >= minimum for v in values):
        what = "a list of ints" if isinstance(value, (list, tuple)) else "an int"
        raise ValueError(f"{_key(field)} must be {what} >= {minimum}{why}, got {value!r}.")


def check_fraction(value: float, field: str) -> None:
    """``value`` in [0, 1) (a dropout probability).

    Raises:
        ValueError: naming ``model.init_args.<field>`` and the value.
    """
    if not (isinstance(value, Real) and 0 <= value < 1):
        raise ValueError(f"{_key(field)} must be in [0, 1), got {value}; use 0 for none or e.g. 0.1.")
