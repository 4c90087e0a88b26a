"""Checks of scalar hyperparameters shared by the layers (ops validate a call's arguments, nn modules their
constructor's): a clear ValueError naming the argument. Imports nothing of the package."""

from __future__ import annotations

import math
import numbers

import torch


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


def positive_with_reciprocal(value: float, name: str, acc: torch.dtype) -> float:
    """``value`` as a float, or ValueError unless it is finite, > 0, and 1 / value is a finite normal number of the
    accumulation dtype ``acc`` (the kernels scale by 1 / value there: beyond that range it is inf, a NaN result, or
    0). For float32: value in about [2.9e-39, 8.5e37]."""
    value = positive_float(value, name)
    info = torch.finfo(acc)
    if not info.tiny <= 1.0 / value <= info.max:
        raise ValueError(f"{name} must be in [{1.0 / info.max:.3g}, {1.0 / info.tiny:.3g}] for {acc} accumulation "
                         f"(1/{name} must be a finite normal {acc} number), got {value!r}")
    return value
