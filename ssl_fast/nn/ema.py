"""An EMA teacher (BYOL, MoCo, DINO): the copy of a model that follows it by exponential moving average.

The update is ``ssl_fast.functional.ema_update_`` (one fused multi-tensor call per dtype group); this
module holds the teacher, the momentum schedule, the buffer policy and the step counter.
"""

from __future__ import annotations

import copy
import math
import numbers
from typing import Any, Dict, List, Optional

import torch
from torch import nn

from .. import functional as sf

SCHEDULES = ("cosine", "constant")
BUFFER_MODES = ("copy", "average")


def unwrap_model(model: nn.Module) -> nn.Module:
    """The module under DistributedDataParallel / DataParallel wrappers and ``torch.compile``'s
    OptimizedModule (whose parameters are the wrapped module's own)."""
    while True:
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            model = model.module
        elif hasattr(model, "_orig_mod") and isinstance(getattr(model, "_orig_mod"), nn.Module):
            model = model._orig_mod
        else:
            return model


def _check_momentum(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not 0.0 <= value <= 1.0:
        raise ValueError(f"{name} must be in [0, 1], got {value}")
    return value


def _check_int(value, name: str, minimum: int) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise TypeError(f"{name} must be an int, got {type(value).__name__}")
    if value < minimum:
        raise ValueError(f"{name} must be >= {minimum}, got {value}")
    return int(value)


class EMA(nn.Module):
    """A teacher that tracks ``model`` by exponential moving average of its parameters.

    BYOL's schedule (``schedule="cosine"``): at step k of K,
    ``tau_k = final - (final - momentum) * (cos(pi k / K) + 1) / 2``, which with ``final_momentum=1`` is the
    paper's ``1 - (1 - tau_base) (cos(pi k / K) + 1) / 2``: ``momentum`` at k = 0, rising to
    ``final_momentum`` at k = K (k is clamped to [0, K]). ``schedule="constant"`` always uses ``momentum``.

    Args:
        model: the student (online network). A DistributedDataParallel / DataParallel / torch.compile
            wrapper is unwrapped: the teacher is a deep copy of the underlying module, and updates read its
            parameters (identical on every rank after DDP's all-reduced step, so every rank's teacher agrees).
        momentum: tau_base in [0, 1] (0.996 in BYOL, 0.99 / 0.999 in MoCo).
        schedule: ``"cosine"`` (BYOL) or ``"constant"``.
        final_momentum: the cosine schedule's end value in [0, 1].
        buffers: ``"copy"`` (the teacher's buffers, e.g. BatchNorm running statistics, are copied from the
            student at every update) or ``"average"`` (floating buffers get the same EMA as the parameters;
            integer buffers such as ``num_batches_tracked`` are copied).
        total_steps: K for the cosine schedule, when known up front (``update`` may also pass it).

    The teacher's parameters do not require grad; the teacher follows this module's train / eval mode
    (``EMA.train()`` puts it in train mode, as lightly's BYOL examples run the momentum network).

    ``state_dict`` holds the teacher's parameters and buffers (``teacher.*``) and the step counter;
    ``load_state_dict`` restores both.

    Example:
        >>> ema = ssl_fast.nn.EMA(student, momentum=0.996, total_steps=epochs * len(loader))
        >>> for x0, x1 in loader:
        ...     loss = ...; loss.backward(); opt.step(); opt.zero_grad()
        ...     ema.update()                       # step counted internally
        ...     with torch.no_grad():
        ...         z = ema(x0)                        # runs the teacher
    """

    def __init__(self, model: nn.Module, momentum: float = 0.996, schedule: str = "cosine",
                 final_momentum: float = 1.0, buffers: str = "copy", *, total_steps: Optional[int] = None):
        super().__init__()
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if schedule not in SCHEDULES:
            raise ValueError(f"schedule must be one of {SCHEDULES}, got {schedule!r}")
        if buffers not in BUFFER_MODES:
            raise ValueError(f"buffers must be one of {BUFFER_MODES}, got {buffers!r}")
        self.momentum = _check_momentum(momentum, "momentum")
        self.final_momentum = _check_momentum(final_momentum, "final_momentum")
        self.schedule = schedule
        self.buffers_mode = buffers
        self.total_steps = None if total_steps is None else _check_int(total_steps, "total_steps", 1)
        student = unwrap_model(model)
        # Not a submodule: the student's parameters must not appear in this module's parameters() or
        # state_dict (an optimizer over ema.parameters() would be empty; checkpoints hold the teacher only).
        object.__setattr__(self, "_student", student)
        self.teacher = copy.deepcopy(student)
        self.teacher.requires_grad_(False)
        self.step = 0               # updates done (the k of the schedule when update() gets no step)
        self.last_momentum: Optional[float] = None

    @property
    def student(self) -> nn.Module:
        return self._student

    # -- schedule ------------------------------------------------------------------------------------

    def momentum_at(self, step: int, total_steps: Optional[int] = None) -> float:
        """The momentum at ``step`` of ``total_steps`` (default: the constructor's ``total_steps``)."""
        step = _check_int(step, "step", 0)
        if self.schedule == "constant":
            return self.momentum
        total = self.total_steps if total_steps is None else _check_int(total_steps, "total_steps", 1)
        if total is None:
            raise ValueError("schedule='cosine' needs total_steps (pass it to EMA(...) or to update()/momentum_at()),"
                             " or use schedule='constant'")
        k = min(step, total)
        return self.final_momentum - (self.final_momentum - self.momentum) * (math.cos(math.pi * k / total) + 1) / 2

    # -- update --------------------------------------------------------------------------------------

    def _pairs(self, params: bool = True):
        if params:
            return list(self.teacher.parameters()), list(self._student.parameters())
        return list(self.teacher.buffers()), list(self._student.buffers())

    @torch.no_grad()
    def update(self, step: Optional[int] = None, total_steps: Optional[int] = None, *,
               parameters: bool = True) -> float:
        """One EMA step of the teacher toward the student; returns the momentum used.

        Args:
            step: k of the schedule (default: the internal counter, the number of updates done so far).
            total_steps: K of the cosine schedule (default: the constructor's).
            parameters: False when the parameters' EMA was already done by an optimizer of
                ``ssl_fast.optim`` (fused with its step): only the buffers and the step counter are updated.
        """
        k = self.step if step is None else _check_int(step, "step", 0)
        m = self.momentum_at(k, total_steps)
        tp, sp = self._pairs(params=True)
        if len(tp) != len(sp):
            raise ValueError(f"the teacher has {len(tp)} parameters and the student {len(sp)}: the student's "
                             "structure changed after EMA was built")
        tb, sb = self._pairs(params=False)
        if len(tb) != len(sb):
            raise ValueError(f"the teacher has {len(tb)} buffers and the student {len(sb)}")
        if parameters:
            sf.ema_update_(tp, sp, m)
        if tb:
            if self.buffers_mode == "average":
                fl = [(t, s) for t, s in zip(tb, sb) if t.is_floating_point()]
                other = [(t, s) for t, s in zip(tb, sb) if not t.is_floating_point()]
                if fl:
                    sf.ema_update_([t for t, _ in fl], [s for _, s in fl], m)
            else:
                other = list(zip(tb, sb))
            if other:
                torch._foreach_copy_([t for t, _ in other], [s for _, s in other])
        self.step = k + 1
        self.last_momentum = m
        return m

    def forward(self, *args, **kwargs):
        """Runs the teacher (wrap the call in ``torch.no_grad()`` when no gradient is needed)."""
        return self.teacher(*args, **kwargs)

    # -- state ---------------------------------------------------------------------------------------

    def get_extra_state(self) -> Dict[str, Any]:
        return {"step": self.step}

    def set_extra_state(self, state: Dict[str, Any]) -> None:
        self.step = int(state.get("step", 0))

    def extra_repr(self) -> str:
        return (f"momentum={self.momentum}, schedule={self.schedule!r}, final_momentum={self.final_momentum}, "
                f"buffers={self.buffers_mode!r}, total_steps={self.total_steps}, step={self.step}")


__all__: List[str] = ["EMA", "unwrap_model"]
