"""Shared plumbing of the lab experiments: results, thread settings, output folders."""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List

import torch

DEFAULT_OUT = "lab_runs"


@dataclass
class LabResult:
    """What an experiment returns.

    Attributes:
        name: the experiment's name (``ssl-fast lab NAME``).
        finding: the published finding under test, one sentence.
        verdict: one line computed from the numbers (which thresholds decided it is in the report).
        passed: whether the measured numbers reproduce the finding.
        numbers: the measured numbers the verdict rests on.
        report: path of the markdown report.
        seconds: wall time.
    """

    name: str
    finding: str
    verdict: str
    passed: bool
    numbers: Dict[str, Any] = field(default_factory=dict)
    report: str = ""
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)


@contextlib.contextmanager
def threads(n: int):
    """Run with ``torch.set_num_threads(n)`` (restored afterwards). The lab's models are tiny: one thread
    is fastest, and much faster than two on a machine whose cores are busy."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def out_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def f(v: float, digits: int = 3) -> str:
    """Short number formatting for verdict lines."""
    if v != v:
        return "nan"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.{digits}g}"


def ema_(target, online, momentum: float) -> None:
    """``target = momentum * target + (1 - momentum) * online`` for two lists of tensors: ssl_fast's fused
    ``ema_update_`` where the package has it, else one ``torch._foreach_lerp_``."""
    import ssl_fast

    target, online = list(target), list(online)
    fn = getattr(ssl_fast, "ema_update_", None)
    with torch.no_grad():
        if fn is not None:
            fn(target, online, momentum)
        else:
            torch._foreach_lerp_(target, online, 1.0 - momentum)
