"""Optimizers and the learning-rate schedule.

- Parameter groups: weights (decayed, LARS-adapted) and biases / normalization parameters (every 0- or
  1-dimensional tensor: no weight decay, no LARS adaptation), as in SimCLR / BYOL / SwAV.
- LARS (You et al. 2017) as used by SimCLR/BYOL: g <- g + wd * w; g <- g * eta * ||w|| / ||g|| (1 where a
  norm is 0); SGD momentum on the result. Written with ``torch._foreach`` ops: one launch per step per
  group, no per-parameter Python loop over tensors' values.
- Schedule: linear warmup to the peak lr, then cosine to ``min_lr_ratio`` x peak (a LambdaLR factor).
  Groups marked ``fix_lr`` (SimSiam's predictor with ``--fix-pred-lr``, as the official ``--fix-pred-lr``)
  keep the peak lr: ``lr_lambdas`` gives them the ``Constant`` factor 1.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, List

import torch
from torch import nn

from .. import optim as fused


def param_groups(model: nn.Module, weight_decay: float, exclude_bias_norm: bool = True,
                 fixed_lr: Iterable[torch.Tensor] = ()) -> List[dict]:
    """[{weights, weight_decay, lars=True}, {biases and norm params, weight_decay 0, lars=False}] (trainable only).

    The parameters in ``fixed_lr`` (e.g. a predictor's) go to two more groups of the same kinds, last, marked
    ``fix_lr=True`` (the schedule leaves their lr at the peak value: see ``lr_lambdas``).
    """
    fixed = {id(p) for p in fixed_lr}
    decay, no_decay, f_decay, f_no_decay = [], [], [], []
    for _, p in model.named_parameters():
        if not p.requires_grad:
            continue
        bias_norm = exclude_bias_norm and p.ndim <= 1
        if id(p) in fixed:
            (f_no_decay if bias_norm else f_decay).append(p)
        else:
            (no_decay if bias_norm else decay).append(p)
    groups = [{"params": decay, "weight_decay": weight_decay, "lars": True}]
    if no_decay:
        groups.append({"params": no_decay, "weight_decay": 0.0, "lars": False})
    if f_decay:
        groups.append({"params": f_decay, "weight_decay": weight_decay, "lars": True, "fix_lr": True})
    if f_no_decay:
        groups.append({"params": f_no_decay, "weight_decay": 0.0, "lars": False, "fix_lr": True})
    return groups


class LARS(fused.LARS):
    """LARS with momentum; groups with ``lars=False`` (biases, norms) are plain SGD with momentum. The unfused
    optimizer: ``ssl_fast.optim.LARS`` (the math, the state) with the torch backend (torch's ``_foreach`` ops,
    the trust ratio from ``_foreach_norm``) and no EMA attachment.

    Args:
        params: parameters or groups (a group may set ``lars``).
        lr, momentum, weight_decay: as SGD.
        eta: trust coefficient.

    Example:
        >>> opt = LARS(param_groups(model, 1e-6), lr=4.8, momentum=0.9)
    """

    def __init__(self, params: Iterable, lr: float, momentum: float = 0.9, weight_decay: float = 0.0,
                 eta: float = 0.001):
        super().__init__(params, lr=lr, momentum=momentum, weight_decay=weight_decay, eta=eta, backend="torch")


def build_optimizer(name: str, model: nn.Module, lr: float, weight_decay: float, momentum: float = 0.9,
                    eta: float = 0.001, exclude_bias_norm: bool = True,
                    fixed_lr: Iterable[torch.Tensor] = (), ema=None) -> torch.optim.Optimizer:
    """``sgd`` | ``lars`` | ``adamw`` over ``param_groups(model, weight_decay, exclude_bias_norm, fixed_lr)``.

    ``ema``: an ``ssl_fast.nn.EMA`` teacher of (part of) ``model``: the optimizer is then ``ssl_fast.optim``'s
    (the same math), whose step also updates the teacher in the same pass (``step(ema_step=k)``)."""
    if name not in ("sgd", "lars", "adamw"):
        raise ValueError(f"optimizer must be sgd | lars | adamw, got {name!r}")
    groups = param_groups(model, weight_decay, exclude_bias_norm, fixed_lr)
    if ema is not None:
        if name == "lars":
            return fused.LARS(groups, lr=lr, momentum=momentum, eta=eta, ema=ema)
        for g in groups:
            g.pop("lars")
        if name == "sgd":
            return fused.SGD(groups, lr=lr, momentum=momentum, ema=ema)
        # foreach's sqrt (MKL's on x86): bitwise the unfused path below (--no-fused-ema-step)
        return fused.AdamW(groups, lr=lr, ema=ema, ieee_sqrt=False)
    if name == "lars":
        return LARS(groups, lr=lr, momentum=momentum, eta=eta)
    for g in groups:
        g.pop("lars")
    if name == "sgd":
        return torch.optim.SGD(groups, lr=lr, momentum=momentum, foreach=True)
    return torch.optim.AdamW(groups, lr=lr, foreach=True)


class WarmupCosine:
    """LambdaLR factor: linear warmup over ``warmup`` steps, then cosine from 1 to ``floor`` at ``total`` steps."""

    def __init__(self, total: int, warmup: int = 0, floor: float = 0.0):
        self.total, self.warmup, self.floor = max(1, int(total)), max(0, int(warmup)), float(floor)

    def __call__(self, step: int) -> float:
        if step < self.warmup:
            return (step + 1) / self.warmup
        t = min(1.0, (step - self.warmup) / max(1, self.total - self.warmup))
        return self.floor + (1 - self.floor) * 0.5 * (1 + math.cos(math.pi * t))


class Constant:
    """LambdaLR factor 1 at every step (a ``fix_lr`` group keeps its initial lr)."""

    def __call__(self, step: int) -> float:
        return 1.0


def lr_lambdas(optimizer: torch.optim.Optimizer, schedule: Callable[[int], float]) -> List[Callable[[int], float]]:
    """One LambdaLR factor per group: ``schedule``, or ``Constant`` for the groups marked ``fix_lr``."""
    return [Constant() if g.get("fix_lr") else schedule for g in optimizer.param_groups]


def scaled_lr(lr: float, batch_size: int, rule: str = "linear") -> float:
    """Peak lr for a global batch: lr x B/256 (linear), lr x sqrt(B/256) (sqrt) or lr (none)."""
    if rule == "linear":
        return lr * batch_size / 256
    if rule == "sqrt":
        return lr * math.sqrt(batch_size / 256)
    return lr
