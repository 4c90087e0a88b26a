"""Optimizers whose step also moves an EMA teacher, in one pass over memory: SGD, AdamW, LARS.

Drop-ins for ``torch.optim.SGD``, ``torch.optim.AdamW`` and ``ssl_fast.train.optim.LARS``: the same math to
the last bit in fp32 for SGD and AdamW (AdamW: ``fused=True``'s by default, ``foreach=True``'s with
``ieee_sqrt=False``; ``csrc/cpu/optim_ema.cpp`` derives it; LARS's trust ratio uses
deterministic fp64 norms, so it agrees to a few ulps), the same ``state_dict`` (state keys
``momentum_buffer`` / ``step``, ``exp_avg``, ``exp_avg_sq``; torch's group keys), so a checkpoint moves
between them both ways. What they add: an EMA attachment. With ``ema=`` (an ``ssl_fast.nn.EMA`` or a list of
``(online, teacher)`` tensor pairs), ``step()`` also does ``teacher <- m * teacher + (1 - m) * online`` for
every pair, from the online parameter's new value, inside the same fused multi-tensor pass as the
optimizer's update (``ssl_fast.ops.optim_ema``): each parameter is read once instead of once by the
optimizer and again by the EMA. Online parameters without a teacher (BYOL's predictor) get the optimizer
step only; a teacher whose online parameter has no gradient this step (or is in no group) still gets its
EMA (one ``ema_update_`` call), as an unfused ``opt.step(); ema.update()`` would do.

Momentum of the EMA: with an ``ssl_fast.nn.EMA``, its schedule at its step counter (or at ``ema_step`` /
``ema_total_steps`` given to ``step``), and the EMA's buffers (BatchNorm statistics) and counter are updated
after the pass (``EMA.update(..., parameters=False)``), so ``opt.step()`` replaces ``opt.step(); ema.update()``.
With tensor pairs, ``ema_momentum`` (a float or a 0-dim tensor; settable between steps).

Mixed precision. With ``torch.amp.GradScaler``, ``scaler.step(opt)`` unscales the gradients and calls
``opt.step()`` only when they are finite: a skipped step skips the EMA too (the teacher averages the
student's iterates; a skipped step makes no new iterate). An unfused loop that calls ``ema.update()``
after every ``scaler.step`` moves the teacher toward the unchanged student on a skipped step; with fp32 or
bf16 training (no scaler) the two agree.

Not supported (ValueError): ``maximize``, AdamW's ``amsgrad``, ``capturable``, ``differentiable``, sparse
gradients.

Example:
    >>> teacher = ssl_fast.nn.EMA(student, momentum=0.996, total_steps=steps)
    >>> opt = ssl_fast.optim.SGD(student.parameters(), lr=0.05, momentum=0.9, weight_decay=1e-4, ema=teacher)
    >>> loss.backward(); opt.step(); opt.zero_grad()      # optimizer step + teacher update, one pass
"""

from __future__ import annotations

import numbers
from typing import Any, Dict, Iterable, List, Optional, Tuple

import torch

from . import functional as sf

__all__ = ["SGD", "AdamW", "LARS"]


def _scalar_dtype() -> torch.dtype:
    """The dtype torch.optim gives ``state['step']`` (float64 only under a float64 default dtype)."""
    return torch.float64 if torch.get_default_dtype() == torch.float64 else torch.float32


def _nonneg(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    if not value >= 0.0:
        raise ValueError(f"Invalid {name}: {value} (must be >= 0)")
    return float(value)


def _check_momentum(m) -> None:
    """The EMA op's own check of a momentum (ValueError / TypeError naming it): a call on empty lists checks
    its arguments and writes nothing."""
    sf.ema_update_([], [], m)


class _FusedEMAOptimizer(torch.optim.Optimizer):
    """Shared by SGD, AdamW and LARS: the EMA attachment, the step loop, the unsupported-option checks."""

    def __init__(self, params, defaults: Dict[str, Any], ema, ema_momentum, backend: Optional[str]):
        super().__init__(params, defaults)
        if backend is not None and (not isinstance(backend, str) or backend.lower() not in sf.BACKENDS):
            raise ValueError(f"backend must be one of {sf.BACKENDS}, got {backend!r}")
        self.backend = backend
        self._ema_module = None
        self._pairs: List[Tuple[torch.Tensor, torch.Tensor]] = []
        self._partner: Dict[int, torch.Tensor] = {}
        self.ema_momentum = None
        if ema is not None:
            self.attach_ema(ema, ema_momentum)
        elif ema_momentum is not None:
            raise ValueError("ema_momentum needs ema= (the teacher to update)")

    # -- the EMA attachment ---------------------------------------------------------------------------

    def attach_ema(self, ema, ema_momentum=None) -> None:
        """Attach the teacher: an ``ssl_fast.nn.EMA`` (momentum from its schedule) or ``(online, teacher)``
        tensor pairs with ``ema_momentum`` (float in [0, 1] or a 0-dim tensor)."""
        from .nn.ema import EMA

        if isinstance(ema, EMA):
            if ema_momentum is not None:
                raise ValueError("ema_momentum must be None when ema is an ssl_fast.nn.EMA (its schedule gives it)")
            online = list(ema.student.parameters())
            teacher = list(ema.teacher.parameters())
            if len(online) != len(teacher):
                raise ValueError(f"ema: the teacher has {len(teacher)} parameters and the student {len(online)}")
            pairs = list(zip(online, teacher))
            self._ema_module = ema
        else:
            if isinstance(ema, torch.Tensor) or not isinstance(ema, Iterable):
                raise TypeError(f"ema must be an ssl_fast.nn.EMA or a list of (online, teacher) tensor pairs, got "
                                f"{type(ema).__name__}")
            pairs = []
            for i, pair in enumerate(ema):
                if not (isinstance(pair, (tuple, list)) and len(pair) == 2
                        and all(isinstance(t, torch.Tensor) for t in pair)):
                    raise TypeError(f"ema[{i}] must be an (online, teacher) pair of tensors")
                o, t = pair
                if o.shape != t.shape:
                    raise ValueError(f"ema[{i}]: online and teacher shapes differ: {tuple(o.shape)} and "
                                     f"{tuple(t.shape)}")
                pairs.append((o, t))
            if ema_momentum is None:
                raise ValueError("ema_momentum is required with (online, teacher) pairs")
            _check_momentum(ema_momentum)
            self._ema_module = None
        seen = set()
        for i, (o, t) in enumerate(pairs):
            if id(o) in seen:
                raise ValueError(f"ema: the online tensor of pair {i} appears twice")
            seen.add(id(o))
        self._pairs = pairs
        self._partner = {id(o): t for o, t in pairs}
        self.ema_momentum = ema_momentum

    @property
    def ema(self):
        """The attached ``ssl_fast.nn.EMA``, or the list of (online, teacher) pairs, or None."""
        return self._ema_module if self._ema_module is not None else (self._pairs or None)

    def _momentum_now(self, ema_step: Optional[int], ema_total_steps: Optional[int]):
        if not self._pairs:
            if ema_step is not None or ema_total_steps is not None:
                raise ValueError("ema_step / ema_total_steps given but no EMA is attached")
            return None, None
        if self._ema_module is not None:
            k = self._ema_module.step if ema_step is None else ema_step
            return self._ema_module.momentum_at(k, ema_total_steps), k
        if ema_step is not None or ema_total_steps is not None:
            raise ValueError("ema_step / ema_total_steps need ema= an ssl_fast.nn.EMA (a schedule)")
        _check_momentum(self.ema_momentum)
        return self.ema_momentum, None

    # -- the step ------------------------------------------------------------------------------------

    def _check_group(self, group) -> None:
        if group.get("maximize", False):
            raise ValueError(f"{type(self).__name__}: maximize=True is not supported")
        if group.get("differentiable", False):
            raise ValueError(f"{type(self).__name__}: differentiable=True is not supported")

    def _group_step(self, group, params: List[torch.Tensor], ema: List[torch.Tensor], m) -> None:
        raise NotImplementedError  # pragma: no cover

    @torch.no_grad()
    def step(self, closure=None, *, ema_step: Optional[int] = None, ema_total_steps: Optional[int] = None):
        """One optimizer step of every group, fused with the EMA of the attached teacher.

        Args:
            closure: re-evaluates the model and returns the loss (as torch.optim).
            ema_step, ema_total_steps: with an ``ssl_fast.nn.EMA``: the k and K of its schedule for this
                update (default: its own counter and total).
        """
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        m, k = self._momentum_now(ema_step, ema_total_steps)
        done = set()
        for group in self.param_groups:
            self._check_group(group)
            with_e, without, ema = [], [], []
            for p in group["params"]:
                if p.grad is None:
                    continue
                if p.grad.is_sparse:
                    raise ValueError(f"{type(self).__name__} does not support sparse gradients")
                t = self._partner.get(id(p)) if m is not None else None
                if t is not None:
                    with_e.append(p)
                    ema.append(t)
                    done.add(id(p))
                else:
                    without.append(p)
            if with_e or without:
                self._group_step(group, with_e + without, ema, 1.0 if m is None else m)
        if m is not None:
            rest = [(o, t) for o, t in self._pairs if id(o) not in done]
            if rest:
                sf.ema_update_([t for _, t in rest], [o.detach() for o, _ in rest], m, backend=self.backend)
            if self._ema_module is not None:
                self._ema_module.update(step=k, total_steps=ema_total_steps, parameters=False)
        return loss


class SGD(_FusedEMAOptimizer):
    """``torch.optim.SGD`` (momentum, dampening, Nesterov, weight decay) fused with an EMA teacher update.

    Args:
        params: parameters or parameter groups, as torch.optim.
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        ema: an ``ssl_fast.nn.EMA`` or a list of (online, teacher) tensor pairs (see the module docstring).
        ema_momentum: the EMA momentum with tensor pairs (float in [0, 1] or a 0-dim tensor).
        backend: ``ssl_fast`` backend for the fused op (default: the one in force).

    Example:
        >>> opt = ssl_fast.optim.SGD(model.parameters(), lr=0.03, momentum=0.9, ema=[(w, w_ema)], ema_momentum=0.99)
    """

    def __init__(self, params, lr: float = 1e-3, momentum: float = 0.0, dampening: float = 0.0,
                 weight_decay: float = 0.0, nesterov: bool = False, *, maximize: bool = False, ema=None,
                 ema_momentum=None, backend: Optional[str] = None):
        lr = _nonneg(lr, "learning rate")
        momentum = _nonneg(momentum, "momentum value")
        weight_decay = _nonneg(weight_decay, "weight_decay value")
        if nesterov and (momentum <= 0 or dampening != 0):
            raise ValueError("Nesterov momentum requires a momentum and zero dampening")
        if maximize:
            raise ValueError("SGD: maximize=True is not supported")
        defaults = dict(lr=lr, momentum=momentum, dampening=float(dampening), weight_decay=weight_decay,
                        nesterov=bool(nesterov), maximize=False, foreach=None, differentiable=False, fused=None)
        super().__init__(params, defaults, ema, ema_momentum, backend)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("nesterov", False)
            group.setdefault("dampening", 0.0)
            group.setdefault("maximize", False)

    def _group_step(self, group, params, ema, m) -> None:
        momentum = group["momentum"]
        bufs, fresh = [], []
        if momentum != 0:
            for p in params:
                st = self.state[p]
                buf = st.get("momentum_buffer")
                if buf is None:
                    buf = st["momentum_buffer"] = torch.empty_like(p, memory_format=torch.preserve_format)
                    fresh.append(True)
                else:
                    fresh.append(False)
                bufs.append(buf)
        sf.sgd_ema_step_(params, [p.grad for p in params], bufs, ema, fresh, lr=group["lr"], momentum=momentum,
                           dampening=group["dampening"], weight_decay=group["weight_decay"],
                           nesterov=group["nesterov"], ema_momentum=m, backend=self.backend)


class AdamW(_FusedEMAOptimizer):
    """``torch.optim.AdamW`` (decoupled weight decay, no amsgrad) fused with an EMA teacher update.

    Args:
        params: parameters or parameter groups.
        lr, betas, eps, weight_decay: as ``torch.optim.AdamW``.
        ieee_sqrt: the correctly rounded sqrt of the second moment (default), as torch's ``fused=True`` and CUDA
            kernels: ``torch.optim.AdamW(fused=True)``'s math (bitwise in its vector loop; its scalar tail, the
            last n mod 16 elements of a tensor, may round an ulp apart in rare elements). ``False``: the sqrt
            torch's CPU foreach path takes (MKL's vector sqrt on x86 builds, within an ulp of the other):
            bitwise equal to ``foreach=True`` (the CPU default), about 2x slower on the CPU (one MKL call per
            8 KiB block); the trainers take it, so that --no-fused-ema-step gives the same bits.
        ema, ema_momentum, backend: as :class:`SGD`.
    """

    def __init__(self, params, lr: float = 1e-3, betas: Tuple[float, float] = (0.9, 0.999), eps: float = 1e-8,
                 weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 ieee_sqrt: bool = True, ema=None, ema_momentum=None, backend: Optional[str] = None):
        lr = _nonneg(lr, "learning rate")
        eps = _nonneg(eps, "epsilon value")
        weight_decay = _nonneg(weight_decay, "weight_decay value")
        if not (isinstance(betas, (tuple, list)) and len(betas) == 2):
            raise TypeError(f"betas must be a pair of floats, got {betas!r}")
        for i, b in enumerate(betas):
            if isinstance(b, torch.Tensor) or not 0.0 <= float(b) < 1.0:
                raise ValueError(f"Invalid beta parameter at index {i}: {b} (a float in [0, 1))")
        if amsgrad:
            raise ValueError("AdamW: amsgrad=True is not supported")
        if maximize:
            raise ValueError("AdamW: maximize=True is not supported")
        defaults = dict(lr=lr, betas=(float(betas[0]), float(betas[1])), eps=eps, weight_decay=weight_decay,
                        amsgrad=False, maximize=False, foreach=None, capturable=False, differentiable=False,
                        fused=None, decoupled_weight_decay=True)
        super().__init__(params, defaults, ema, ema_momentum, backend)
        self.ieee_sqrt = bool(ieee_sqrt)

    def __setstate__(self, state):
        super().__setstate__(state)
        for group in self.param_groups:
            group.setdefault("amsgrad", False)
            group.setdefault("maximize", False)
            group.setdefault("capturable", False)
            group["decoupled_weight_decay"] = True

    def _check_group(self, group) -> None:
        super()._check_group(group)
        if group.get("amsgrad", False):
            raise ValueError("AdamW: amsgrad=True is not supported")
        if group.get("capturable", False):
            raise ValueError("AdamW: capturable=True is not supported")

    def _group_step(self, group, params, ema, m) -> None:
        exp_avgs, exp_avg_sqs, steps = [], [], []
        for p in params:
            st = self.state[p]
            if len(st) == 0:
                st["step"] = torch.tensor(0.0, dtype=_scalar_dtype())
                st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            exp_avgs.append(st["exp_avg"])
            exp_avg_sqs.append(st["exp_avg_sq"])
            steps.append(st["step"])
        torch._foreach_add_(steps, 1.0)  # torch.optim's increment of the CPU step tensors
        beta1, beta2 = group["betas"]
        sf.adamw_ema_step_(params, [p.grad for p in params], exp_avgs, exp_avg_sqs, ema,
                             [float(s) for s in steps], lr=group["lr"], beta1=beta1, beta2=beta2, eps=group["eps"],
                             weight_decay=group["weight_decay"], ieee_sqrt=self.ieee_sqrt, ema_momentum=m,
                             backend=self.backend)


class LARS(_FusedEMAOptimizer):
    """LARS with momentum (``ssl_fast.train.optim.LARS``) fused with an EMA teacher update.

    Groups with ``lars=False`` (biases, norms: ``ssl_fast.train.param_groups``) are SGD with momentum.
    The trust ratio eta ||w|| / ||g + wd w|| comes from a first pass computing every tensor's two norms with
    fp64 sums over fixed blocks (the same result at any thread count); ``LARS`` in ``ssl_fast.train`` uses
    ``torch._foreach_norm`` (fp32): the two agree to a few ulps of the trust ratio.

    Args:
        params: parameters or groups (a group may set ``lars``).
        lr, momentum, weight_decay, eta: as ``ssl_fast.train.optim.LARS``.
        ema, ema_momentum, backend: as :class:`SGD`.
    """

    def __init__(self, params, lr: float, momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001,
                 *, ema=None, ema_momentum=None, backend: Optional[str] = None):
        if not lr > 0:
            raise ValueError(f"lr must be > 0, got {lr}")
        defaults = dict(lr=float(lr), momentum=_nonneg(momentum, "momentum value"),
                        weight_decay=_nonneg(weight_decay, "weight_decay value"), eta=_nonneg(eta, "eta"), lars=True)
        super().__init__(params, defaults, ema, ema_momentum, backend)

    def _group_step(self, group, params, ema, m) -> None:
        bufs = []
        for p in params:
            st = self.state[p]
            if "momentum_buffer" not in st:
                st["momentum_buffer"] = torch.zeros_like(p)
            bufs.append(st["momentum_buffer"])
        sf.lars_ema_step_(params, [p.grad for p in params], bufs, ema, lr=group["lr"], momentum=group["momentum"],
                            weight_decay=group["weight_decay"], eta=group["eta"], adapt=bool(group["lars"]),
                            ema_momentum=m, backend=self.backend)
