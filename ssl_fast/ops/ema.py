"""Multi-tensor EMA (teacher) update: argument checks, grouping and backend dispatch.

``ema[i] = m * ema[i] + (1 - m) * online[i]`` in place for lists of tensors, computed as the lerp
``ema + (1 - m) * (online - ema)`` with fp32 accumulation (fp64 for fp64 tensors).

Backends (``ssl_fast.set_backend`` / ``backend=``):

* ``cpp``: the compiled kernels of ``ssl_fast._C``, one op ``ssl_fast::ema_update_`` (schema in
  ``csrc/cpu/ema.cpp``): the CPU kernel (``csrc/cpu/ema.cpp``, one ``at::parallel_for`` per dtype group) and,
  when the extension was built with CUDA, the CUDA multi-tensor kernel (``csrc/cuda/ema.cu``, one launch per
  dtype group). ``auto`` picks it for CPU tensors and, when built, for CUDA tensors.
* ``triton``: ``kernels/ema.py`` (one launch per dtype group over a device table of pointers); ``auto``'s
  choice for CUDA tensors when the extension has no CUDA kernel.
* ``torch``: ``torch._foreach_lerp_`` per dtype group (the portable fallback).

Checks. For the ``cpp`` backend the C++ op checks every pair (shape, dtype, device) in one loop before it
writes anything, so a call costs no Python loop over the tensors beyond collecting their devices; the
other backends check in Python (:func:`check_pairs`, the same messages). Either way a call that fails
modifies nothing. A list spanning several devices is split by device here, after a full check.
"""

from __future__ import annotations

import numbers
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch

from . import _backend, _library

Momentum = Union[float, torch.Tensor]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_DTYPE_NAMES = "float32, bfloat16, float16 or float64"

# ----------------------------------------------------------------------------------------------------
# argument checks


def _as_list(x, name: str) -> List[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a list or tuple of tensors, got a single Tensor (wrap it in a list)")
    try:
        return list(x)
    except TypeError:
        raise TypeError(f"{name} must be a list or tuple of tensors, got {type(x).__name__}") from None


def _overlaps(t: torch.Tensor) -> bool:
    """Two elements of ``t`` share a memory location (torch's own check, exact where it is unsure)."""
    state = torch._debug_has_internal_overlap(t)  # 0: no, 1: yes, 2: too hard to tell
    if state != 2 or t.numel() < 2 or t.device.type == "meta":
        return state == 1
    offsets = torch.zeros((), dtype=torch.int64)
    for size, stride in zip(t.shape, t.stride()):
        offsets = (offsets.unsqueeze(-1) + torch.arange(size, dtype=torch.int64) * stride).reshape(-1)
    return offsets.unique().numel() < t.numel()


def check_momentum(momentum) -> Tuple[float, Optional[torch.Tensor]]:
    """(float value, None) or (nan placeholder, 0-dim tensor). A CPU tensor's value is checked; a device
    tensor's is not (that would be a host sync), nor is any under torch.compile."""
    if isinstance(momentum, torch.Tensor):
        if momentum.numel() != 1:
            raise ValueError(f"momentum must be a float or a 0-dim tensor, got a tensor of shape "
                             f"{tuple(momentum.shape)}")
        if not momentum.is_floating_point():
            raise TypeError(f"momentum must be a floating-point tensor, got {momentum.dtype}")
        if momentum.device.type == "meta":
            raise ValueError("momentum is a tensor on the meta device (it has no value)")
        if momentum.device.type == "cpu" and not torch.compiler.is_compiling():
            value = float(momentum)
            if not 0.0 <= value <= 1.0:
                raise ValueError(f"momentum must be in [0, 1], got {value}")
        return 0.0, momentum.detach().reshape(())
    if isinstance(momentum, bool) or not isinstance(momentum, numbers.Real):
        raise TypeError(f"momentum must be a float or a 0-dim tensor, got {type(momentum).__name__}")
    value = float(momentum)
    if not 0.0 <= value <= 1.0:  # also rejects NaN
        raise ValueError(f"momentum must be in [0, 1], got {value}")
    return value, None


def check_pairs(ema: Sequence, online: Sequence) -> None:
    """Every check of the C++ op, in Python (the messages name the list and the index)."""
    if len(ema) != len(online):
        raise ValueError(f"ema_tensors and online_tensors must have the same length, got {len(ema)} and "
                         f"{len(online)}")
    for i, (e, o) in enumerate(zip(ema, online)):
        if not isinstance(e, torch.Tensor):
            raise TypeError(f"ema_tensors[{i}] must be a torch.Tensor, got {type(e).__name__}")
        if not isinstance(o, torch.Tensor):
            raise TypeError(f"online_tensors[{i}] must be a torch.Tensor, got {type(o).__name__}")
        if e.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"ema_tensors[{i}] must be {_DTYPE_NAMES}, got {e.dtype}")
        if o.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"online_tensors[{i}] must be {_DTYPE_NAMES}, got {o.dtype}")
        if e.shape != o.shape:
            raise ValueError(f"ema_tensors[{i}] and online_tensors[{i}] must have the same shape, got "
                             f"{tuple(e.shape)} and {tuple(o.shape)}")
        if e.device != o.device:
            raise ValueError(f"ema_tensors[{i}] and online_tensors[{i}] must be on the same device, got "
                             f"{e.device} and {o.device}")


# ----------------------------------------------------------------------------------------------------
# momentum per backend, the torch update


def _momentum_for(device: torch.device, value: float, mt: Optional[torch.Tensor], backend: str):
    """The (float, tensor) pair a backend gets: the tensor on ``device`` (fp32 for the GPU kernels), or a
    CPU tensor's value as a float when the tensors are on a GPU (reading a CPU scalar costs no GPU sync)."""
    if mt is None:
        return value, None
    if mt.device != device:
        if mt.device.type == "cpu" and not torch.compiler.is_compiling():
            return float(mt), None
        mt = mt.to(device)
    if device.type == "cuda" and backend in ("cpp", "triton") and mt.dtype != torch.float32:
        mt = mt.float()
    return value, mt


def _torch_update(ema: List[torch.Tensor], online: List[torch.Tensor], value: float,
                  mt: Optional[torch.Tensor]) -> None:
    groups: Dict[tuple, Tuple[list, list]] = {}
    for e, o in zip(ema, online):
        g = groups.setdefault((e.dtype, o.dtype), ([], []))
        g[0].append(e)
        g[1].append(o)
    for (edt, odt), (es, os_) in groups.items():
        if odt != edt:
            os_ = [o.to(edt) for o in os_]
        if mt is None:
            torch._foreach_lerp_(es, os_, 1.0 - value)
        else:  # a 0-dim weight tensor per pair: no .item(), no host sync
            w = (1.0 - mt).to(edt)
            torch._foreach_lerp_(es, os_, [w] * len(es))


def _fake_ema_update(ema, online, momentum, momentum_tensor):
    return None


# ----------------------------------------------------------------------------------------------------
# backends: the C++ op ssl_fast::ema_update_ (schema in csrc/cpu/ema.cpp; its CUDA kernel, csrc/cuda/ema.cu, when
# the extension was built with it), the Triton op around kernels/ema.py, and torch's _foreach_lerp_

_CPP_OP = _library.cpp_op("ema_update_", _fake_ema_update)
#: The C++ op has a CUDA kernel only when the extension was built with csrc/cuda/ema.cu.
HAS_CUDA_KERNEL = _CPP_OP is not None and torch._C._dispatch_has_kernel_for_dispatch_key(
    "ssl_fast::ema_update_", "CUDA")

TABLE = _backend.BackendTable(
    "ema_update_",
    cpp=dict(update=_CPP_OP),
    triton=dict(update=_library.triton_op(
        "ema_update_triton_(Tensor(a!)[] ema, Tensor[] online, float momentum, Tensor? momentum_tensor) -> ()",
        _fake_ema_update, "ema.ema_update_")),
    torch=dict(update=_torch_update),
    cpp_on_cuda=HAS_CUDA_KERNEL, triton_fp64=True,
)


def _run(ema, online, value, mt, device, backend_name: str) -> None:
    if mt is not None:
        value, mt = _momentum_for(device, value, mt, backend_name)
    if torch.is_grad_enabled():  # an in-place update of tensors that may require grad (model parameters)
        with torch.no_grad():
            return _run(ema, online, value, mt, device, backend_name)
    TABLE[backend_name]["update"](ema, online, value, mt)


# ----------------------------------------------------------------------------------------------------
# public entry point (re-exported by ssl_fast.functional)


def ema_update_(ema_tensors, online_tensors, momentum: Momentum, *, backend: Optional[str] = None) -> None:
    """In place ``ema = momentum * ema + (1 - momentum) * online`` over lists (see
    ``ssl_fast.functional.ema_update_``). ``backend`` overrides the one in force for this call."""
    ema = _as_list(ema_tensors, "ema_tensors")
    online = _as_list(online_tensors, "online_tensors")
    if len(ema) != len(online):
        raise ValueError(f"ema_tensors and online_tensors must have the same length, got {len(ema)} and "
                         f"{len(online)}")
    value, mt = check_momentum(momentum)
    if not ema:
        return None
    try:
        devices = {t.device for t in ema}
        devices.update(t.device for t in online)
        strided = [i for i, t in enumerate(ema) if not t.is_contiguous()]
    except AttributeError:
        check_pairs(ema, online)  # raises the TypeError naming the element
        raise
    for i in strided:  # an expanded or overlapping view: several elements share one memory location
        if _overlaps(ema[i]):
            raise ValueError(f"ema_tensors[{i}] has elements that share memory (an expanded or overlapping view, "
                             f"strides {ema[i].stride()}): it cannot be updated in place; pass a tensor that owns "
                             "its elements")
    if len(devices) == 1:
        device = next(iter(devices))
        name = TABLE.resolve(device, backend)
        if name != "cpp":  # the C++ op checks its arguments itself
            check_pairs(ema, online)
        _run(ema, online, value, mt, device, name)
        return None
    # several devices: check everything first (nothing is written when a check fails), then one call each
    check_pairs(ema, online)
    by_device: Dict[torch.device, Tuple[list, list]] = {}
    for e, o in zip(ema, online):
        g = by_device.setdefault(e.device, ([], []))
        g[0].append(e)
        g[1].append(o)
    plan = [(dev, TABLE.resolve(dev, backend), es, os_) for dev, (es, os_) in by_device.items()]
    for dev, name, es, os_ in plan:
        _run(es, os_, value, mt, dev, name)
    return None


def update_momentum(model: torch.nn.Module, model_ema: torch.nn.Module, m: Momentum) -> None:
    """lightly's ``update_momentum``: ``model_ema``'s parameters (not buffers) <- EMA toward ``model``'s."""
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(model_ema, torch.nn.Module):
        raise TypeError(f"model_ema must be a torch.nn.Module, got {type(model_ema).__name__}")
    ema_update_(list(model_ema.parameters()), list(model.parameters()), m)
