"""The optimizer step fused with the EMA (teacher) update: SGD, AdamW and LARS, one multi-tensor pass.

For one parameter group: one optimizer step of ``params`` (gradients ``grads``, optimizer state in place),
and for the first ``len(ema)`` parameters the EMA ``ema[i] <- lerp(ema[i], params[i], 1 - ema_momentum)``
of the updated value, in the same pass over memory. The math, op by op with its roundings, is derived in
``csrc/cpu/optim_ema.cpp``: in fp32 it is torch.optim's foreach math (SGD, AdamW) and
``ssl_fast.train.optim.LARS``'s, followed by ``torch._foreach_lerp_``, to the last bit for SGD and AdamW;
for bf16 parameters the kernels (``cpp``, ``triton``) take torch's ``fused=True`` math instead (fp32, one
rounding per stored value), the ``torch`` backend foreach's (a rounding after every op).

Backends (``ssl_fast.set_backend`` / ``backend=``), declared once in ``TABLE`` (a ``BackendTable`` with the
steps ``sgd``, ``adamw``, ``lars``, each backend's with the C++ op's signature), resolved, with the fallback and
its one-time warning, as every op's:

* ``cpp``: ``ssl_fast._C``'s ops ``ssl_fast::{sgd,adamw,lars}_ema_step_``: the CPU kernel
  (``csrc/cpu/optim_ema.cpp``: one ``at::parallel_for`` per dtype group) and, when built with CUDA, the CUDA
  multi-tensor kernel (``csrc/cuda/optim_ema.cu``). fp32 or bf16 parameters; the EMA fp32 or the
  parameters' dtype. ``auto`` picks it for CPU tensors of those dtypes.
* ``triton``: ``kernels/optim_ema.py`` (one launch per dtype group over a table of chunks).
* ``torch``: torch.optim's foreach sequence itself (``torch._foreach_*``), then ``ema_update_``'s torch
  backend (``torch._foreach_lerp_``): the reference the tests compare with, and the fallback for other
  dtypes (fp16, fp64) and devices.

The caller (``ssl_fast.optim``, through ``ssl_fast.functional``) owns the optimizer state: momentum buffers
are allocated before the first step (``fresh`` marks them: SGD's first step stores the gradient there, as
torch's ``clone``), AdamW's ``steps`` are the per-parameter step counts after this step's increment (floats,
as torch's foreach path reads them with ``.item()``).
"""

from __future__ import annotations

import math
import numbers
from typing import List, Optional, Sequence

import torch

from . import _backend, _library
from . import ema as _ema

# ----------------------------------------------------------------------------------------------------
# checks (the C++ ops check the same; these run for every backend, before anything is written)

KERNEL_DTYPES = (torch.float32, torch.bfloat16)
SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _as_list(x, name: str) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a list or tuple of tensors, got a single Tensor (wrap it in a list)")
    try:
        out = list(x)
    except TypeError:
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(x).__name__}") from None
    for i, t in enumerate(out):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name}[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return out


def _check_float(value, name: str, low: float = -math.inf, high: float = math.inf) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a float, got {type(value).__name__}")
    value = float(value)
    if not low <= value <= high:  # also rejects NaN
        raise ValueError(f"{name} must be in [{low}, {high}], got {value}")
    return value


def _check_lists(params, grads, states, ema) -> None:
    n = len(params)
    if len(grads) != n:
        raise ValueError(f"grads must have one tensor per parameter: got {len(grads)} for {n} params")
    if len(ema) > n:
        raise ValueError(f"ema must pair with the first params: got {len(ema)} ema tensors for {n} params")
    for name, lst in states:
        if lst and len(lst) != n:
            raise ValueError(f"{name} must have one tensor per parameter: got {len(lst)} for {n} params")
    dev = params[0].device if params else None
    for i, p in enumerate(params):
        if p.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"params[{i}] must be float32, bfloat16, float16 or float64, got {p.dtype}")
        if p.device != dev:
            raise ValueError(f"params[{i}] is on {p.device} but params[0] is on {dev} (one device per call)")
        others = [("grads", grads[i], True)] + [(nm, lst[i], True) for nm, lst in states if lst]
        if i < len(ema):
            others.append(("ema", ema[i], False))
        for nm, t, same_dtype in others:
            if t.layout != torch.strided:
                raise ValueError(f"{nm}[{i}] must be a dense (strided) tensor, got {t.layout} (sparse gradients "
                                 "are not supported)")
            if t.shape != p.shape:
                raise ValueError(f"{nm}[{i}] must have the shape of params[{i}], got {tuple(t.shape)} and "
                                 f"{tuple(p.shape)}")
            if t.device != dev:
                raise ValueError(f"{nm}[{i}] is on {t.device} but params[0] is on {dev} (one device per call)")
            if same_dtype and t.dtype != p.dtype:
                raise TypeError(f"{nm}[{i}] must have the dtype of params[{i}] ({p.dtype}), got {t.dtype}")
            if not same_dtype and t.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"ema[{i}] must be float32, bfloat16, float16 or float64, got {t.dtype}")


def _kernel_dtypes(params, ema) -> bool:
    """The compiled / Triton kernels take fp32 or bf16 parameters with an fp32 EMA or one of their dtype."""
    if any(p.dtype not in KERNEL_DTYPES for p in params):
        return False
    return all(e.dtype == torch.float32 or e.dtype == p.dtype for e, p in zip(ema, params))


def _resolve(device: torch.device, requested: Optional[str], kernel_ok: bool) -> str:
    """The table's resolution; ``auto`` sends what the kernels do not take (fp16 / fp64 parameters, an EMA of
    another dtype) to the torch backend, an explicit backend gets it (and its op raises)."""
    if not kernel_ok and (_backend._check_name(requested) if requested else _backend.get_backend()) == "auto":
        return "torch"
    return TABLE.resolve(device, requested)


def _prepare(params, grads, states, ema, ema_momentum, backend):
    params = _as_list(params, "params")
    grads = _as_list(grads, "grads")
    states = [(name, _as_list(lst, name)) for name, lst in states]
    ema = _as_list(ema, "ema")
    value, mt = _ema.check_momentum(ema_momentum)
    _check_lists(params, grads, states, ema)
    if not params:
        return None
    device = params[0].device
    name = _resolve(device, backend, _kernel_dtypes(params, ema))
    if mt is not None:
        value, mt = _ema._momentum_for(device, value, mt, name)
    return params, grads, [lst for _, lst in states], ema, value, mt, name


def _ema_after(params, ema, value, mt) -> None:
    if ema:
        _ema._run(ema, params[: len(ema)], value, mt, params[0].device, "torch")


# ----------------------------------------------------------------------------------------------------
# the torch backend: torch.optim's foreach sequences (torch/optim/sgd.py, adam.py), LARS's, then the lerp


def _foreach_sgd(params, grads, bufs, fresh, lr, momentum, dampening, weight_decay, nesterov) -> None:
    if weight_decay != 0:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if momentum != 0:
        old = [b for b, f in zip(bufs, fresh) if not f]
        old_g = [g for g, f in zip(grads, fresh) if not f]
        if old:
            torch._foreach_mul_(old, momentum)
            torch._foreach_add_(old, old_g, alpha=1 - dampening)
        for b, g, f in zip(bufs, grads, fresh):
            if f:
                b.copy_(g)  # torch: buf = clone(grad)
        if nesterov:
            grads = torch._foreach_add(grads, bufs, alpha=momentum)
        else:
            grads = bufs
    torch._foreach_add_(params, grads, alpha=-lr)


def _foreach_adamw(params, grads, exp_avgs, exp_avg_sqs, steps, lr, beta1, beta2, eps, weight_decay,
                   ieee_sqrt: bool = False) -> None:
    if weight_decay != 0:
        torch._foreach_mul_(params, 1 - lr * weight_decay)
    torch._foreach_lerp_(exp_avgs, grads, 1 - beta1)
    torch._foreach_mul_(exp_avg_sqs, beta2)
    torch._foreach_addcmul_(exp_avg_sqs, grads, grads, 1 - beta2)
    step_size = [(lr / (1 - beta1 ** s)) * -1 for s in steps]
    bias_correction2_sqrt = [(1 - beta2 ** s) ** 0.5 for s in steps]
    if ieee_sqrt and params[0].device.type == "cpu":  # correctly rounded (torch's fp32 CPU sqrt is MKL's)
        denom = [v.double().sqrt().float() if v.dtype == torch.float32 else v.sqrt() for v in exp_avg_sqs]
    else:
        denom = torch._foreach_sqrt(exp_avg_sqs)
    torch._foreach_div_(denom, bias_correction2_sqrt)
    torch._foreach_add_(denom, eps)
    torch._foreach_addcdiv_(params, exp_avgs, denom, step_size)


def lars_foreach_(params, grads, bufs, lr, momentum, weight_decay, eta, adapt) -> None:
    """LARS with momentum (``ssl_fast.train.optim.LARS``'s math) with torch._foreach ops; ``bufs`` start at 0."""
    if weight_decay:
        grads = torch._foreach_add(grads, params, alpha=weight_decay)
    if adapt:
        w_norm = torch.stack(torch._foreach_norm(params))
        g_norm = torch.stack(torch._foreach_norm(grads))
        trust = torch.where((w_norm > 0) & (g_norm > 0), eta * w_norm / g_norm, torch.ones_like(w_norm))
        grads = torch._foreach_mul(grads, list(trust.unbind(0)))
    torch._foreach_mul_(bufs, momentum)
    torch._foreach_add_(bufs, grads)
    torch._foreach_add_(params, bufs, alpha=-lr)


# ----------------------------------------------------------------------------------------------------
# the torch steps with the ops' signatures, and the backends: the C++ ops ssl_fast::{sgd,adamw,lars}_ema_step_
# (schemas in csrc/cpu/optim_ema.cpp; their CUDA kernels, csrc/cuda/optim_ema.cu, when the extension was built
# with them), the Triton ops around kernels/optim_ema.py, and torch.optim's foreach sequences + the lerp


def _torch_sgd(params, grads, bufs, ema, fresh, lr, momentum, dampening, weight_decay, nesterov, value, mt) -> None:
    _foreach_sgd(params, grads, bufs, [bool(f) for f in fresh], lr, momentum, dampening, weight_decay, nesterov)
    _ema_after(params, ema, value, mt)


def _torch_adamw(params, grads, m, v, ema, steps, lr, beta1, beta2, eps, weight_decay, ieee_sqrt, value, mt) -> None:
    _foreach_adamw(params, grads, m, v, steps, lr, beta1, beta2, eps, weight_decay, ieee_sqrt)
    _ema_after(params, ema, value, mt)


def _torch_lars(params, grads, bufs, ema, lr, momentum, weight_decay, eta, adapt, value, mt) -> None:
    lars_foreach_(params, grads, bufs, lr, momentum, weight_decay, eta, adapt)
    _ema_after(params, ema, value, mt)


def _fake(*args, **kwargs):
    return None


_SCHEMA_SGD = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] ema, int[] fresh, "
               "float lr, float momentum, float dampening, float weight_decay, bool nesterov, float ema_momentum, "
               "Tensor? ema_momentum_tensor) -> ()")
_SCHEMA_ADAMW = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, "
                 "Tensor(d!)[] ema, float[] steps, float lr, float beta1, float beta2, float eps, float weight_decay, "
                 "bool ieee_sqrt, float ema_momentum, Tensor? ema_momentum_tensor) -> ()")
_SCHEMA_LARS = ("(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] momentum_buffers, Tensor(c!)[] ema, float lr, "
                "float momentum, float weight_decay, float eta, bool adapt, float ema_momentum, "
                "Tensor? ema_momentum_tensor) -> ()")

_CPP_SGD = _library.cpp_op("sgd_ema_step_", _fake)
#: The C++ ops have CUDA kernels only when the extension was built with csrc/cuda/optim_ema.cu.
HAS_CUDA_KERNEL = _CPP_SGD is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "ssl_fast::sgd_ema_step_", "CUDA")

TABLE = _backend.BackendTable(
    "optim_ema_step_",
    cpp=dict(sgd=_CPP_SGD, adamw=_library.cpp_op("adamw_ema_step_", _fake),
             lars=_library.cpp_op("lars_ema_step_", _fake)),
    triton=dict(sgd=_library.triton_op("sgd_ema_step_triton_" + _SCHEMA_SGD, _fake, "optim_ema.sgd_ema_step_"),
                adamw=_library.triton_op("adamw_ema_step_triton_" + _SCHEMA_ADAMW, _fake, "optim_ema.adamw_ema_step_"),
                lars=_library.triton_op("lars_ema_step_triton_" + _SCHEMA_LARS, _fake, "optim_ema.lars_ema_step_")),
    torch=dict(sgd=_torch_sgd, adamw=_torch_adamw, lars=_torch_lars),
    cpp_on_cuda=HAS_CUDA_KERNEL,
)


# ----------------------------------------------------------------------------------------------------
# public entry points (used by ssl_fast.optim)


def sgd_ema_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  momentum_buffers: Sequence[torch.Tensor], ema: Sequence[torch.Tensor], fresh: Sequence[bool] = (),
                  *, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                  nesterov: bool = False, ema_momentum=1.0, backend: Optional[str] = None) -> None:
    """One SGD step (torch.optim.SGD's math) of ``params`` and the EMA of the first ``len(ema)`` of them.

    ``momentum_buffers``: one per parameter when ``momentum != 0`` (empty otherwise); ``fresh[i]`` true for
    a buffer allocated for this first step (it receives the gradient, as torch's ``clone``)."""
    lr = _check_float(lr, "lr", 0.0)
    momentum = _check_float(momentum, "momentum", 0.0)
    dampening = _check_float(dampening, "dampening")
    weight_decay = _check_float(weight_decay, "weight_decay", 0.0)
    prep = _prepare(params, grads, [("momentum_buffers", momentum_buffers if momentum != 0 else ())], ema,
                    ema_momentum, backend)
    if prep is None:
        return
    params, grads, (bufs,), ema, value, mt, name = prep
    if momentum != 0 and len(bufs) != len(params):
        raise ValueError(f"momentum_buffers must have one tensor per parameter when momentum != 0: got "
                         f"{len(bufs)} for {len(params)} params")
    fresh = [bool(f) for f in fresh] if len(fresh) else [False] * len(params)
    if len(fresh) != len(params):
        raise ValueError(f"fresh must have one flag per parameter: got {len(fresh)} for {len(params)} params")
    with torch.no_grad():
        TABLE[name]["sgd"](params, grads, bufs, ema, [int(f) for f in fresh], lr, momentum, dampening, weight_decay,
                           bool(nesterov), value, mt)


def adamw_ema_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                    exp_avg_sqs: Sequence[torch.Tensor], ema: Sequence[torch.Tensor], steps: Sequence[float], *,
                    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                    weight_decay: float = 1e-2, ieee_sqrt: bool = True, ema_momentum=1.0,
                    backend: Optional[str] = None) -> None:
    """One AdamW step (torch.optim.AdamW's math) of ``params`` and the EMA of the first ``len(ema)`` of them.

    ``steps[i]``: parameter i's step count after this step (1 on the first step). ``ieee_sqrt`` (default): the
    correctly rounded sqrt of the second moment (torch's fused=True and CUDA kernels); False: the one torch's
    CPU foreach path takes (MKL's vector sqrt where torch has MKL: bitwise parity with foreach, slower)."""
    lr = _check_float(lr, "lr", 0.0)
    beta1 = _check_float(beta1, "beta1", 0.0, 1.0 - 1e-12)
    beta2 = _check_float(beta2, "beta2", 0.0, 1.0 - 1e-12)
    eps = _check_float(eps, "eps", 0.0)
    weight_decay = _check_float(weight_decay, "weight_decay", 0.0)
    prep = _prepare(params, grads, [("exp_avgs", exp_avgs), ("exp_avg_sqs", exp_avg_sqs)], ema, ema_momentum,
                    backend)
    if prep is None:
        return
    params, grads, (m, v), ema, value, mt, name = prep
    if len(m) != len(params) or len(v) != len(params):
        raise ValueError("exp_avgs and exp_avg_sqs must have one tensor per parameter")
    steps = [float(s) for s in steps]
    if len(steps) != len(params):
        raise ValueError(f"steps must have one value per parameter: got {len(steps)} for {len(params)} params")
    if any(not s >= 1 for s in steps):
        raise ValueError(f"steps must be >= 1 (the step count after this step), got {min(steps)}")
    with torch.no_grad():
        TABLE[name]["adamw"](params, grads, m, v, ema, steps, lr, beta1, beta2, eps, weight_decay, bool(ieee_sqrt),
                             value, mt)


def lars_ema_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   momentum_buffers: Sequence[torch.Tensor], ema: Sequence[torch.Tensor], *, lr: float,
                   momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001, adapt: bool = True,
                   ema_momentum=1.0, backend: Optional[str] = None) -> None:
    """One LARS step (``ssl_fast.train.optim.LARS``'s math; ``adapt=False``: SGD with momentum, for biases and
    norms) of ``params`` and the EMA of the first ``len(ema)`` of them. Buffers start at zero."""
    lr = _check_float(lr, "lr", 0.0)
    momentum = _check_float(momentum, "momentum", 0.0)
    weight_decay = _check_float(weight_decay, "weight_decay", 0.0)
    eta = _check_float(eta, "eta", 0.0)
    prep = _prepare(params, grads, [("momentum_buffers", momentum_buffers)], ema, ema_momentum, backend)
    if prep is None:
        return
    params, grads, (bufs,), ema, value, mt, name = prep
    if len(bufs) != len(params):
        raise ValueError(f"momentum_buffers must have one tensor per parameter: got {len(bufs)} for "
                         f"{len(params)} params")
    with torch.no_grad():
        TABLE[name]["lars"](params, grads, bufs, ema, lr, momentum, weight_decay, eta, bool(adapt), value, mt)
