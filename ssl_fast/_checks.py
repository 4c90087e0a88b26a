"""Checks of scalar hyperparameters shared by the layers (ops validate a call's arguments, nn modules their
constructor's): a clear ValueError naming the argument. Imports nothing of the package."""

from __future__ import annotations

import math
import numbers


def positive_float(value, name: str) -> float:
    """``value`` as a float, or ValueError unless it is a finite real number > 0."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not (math.isfinite(value) and value > 0):
        raise ValueError(f"{name} must be finite and > 0, got {value!r}")
    return float(value)


def int_at_least(value, name: str, minimum: int) -> int:
    """``value`` as an int, or ValueError unless it is an integer >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return int(value)
