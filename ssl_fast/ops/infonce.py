"""InfoNCE / NT-Xent: argument checks, backend dispatch and autograd.

Every fused backend (``cpp`` in ``csrc/cpu/infonce.cpp``, ``triton`` in ``kernels/infonce.py``) is a set of
dispatcher ops ``torch.ops.ssl_fast.<op>_<backend>`` with one contract, so the autograd code below is shared:

    ntxent_fwd(z1, z2, inv_temp, normalize, d)                          -> [loss, *saved]
    ntxent_bwd(grad, z1, z2, *saved, inv_temp, normalize, d)            -> [dz1, dz2, gz]
    info_nce_fwd(q, k, inv_temp, normalize, symmetric, d)               -> [loss, *saved]
    info_nce_bwd(grad, q, k, *saved, inv_temp, normalize, symmetric, d) -> [dq, dk, gz]

(the cpp ops take the tile size ``block`` last). ``inv_temp`` is a 0-dim tensor (1/T) on the inputs'
device and ``loss`` a 0-dim tensor, both float64 for float64 inputs and float32 otherwise (the triton
backend takes fp32 / bf16 / fp16 only). ``saved`` are the tensors the backend wants back, ``grad`` the
0-dim upstream gradient (the triton backend never reads it on the host). ``dz*`` have the inputs' shapes
and dtypes (zero beyond column ``d``), and ``gz`` is the 0-dim sum over anchors of <dL/dz_hat, z_hat>
(gradient w.r.t. the normalized rows, dotted with them).

Temperature gradient. The logits are bilinear in the normalized rows: S = A B^T / T. Hence
sum_k <dL/da_k, a_k> = sum_ij dL/dS_ij S_ij = -T dL/dT, and for NT-Xent (A = B = Z) the left side counts
every logit twice. So dL/dT = -gz / (c T) with c = 2 for NT-Xent and c = 1 for cross-view InfoNCE: the
gradient of a learnable temperature costs one dot product per row, no extra pass over the logits.
"""

from __future__ import annotations

import numbers
from typing import Optional, Union

import torch

from .. import _checks, reference
from . import _backend, _library

Temperature = Union[float, torch.Tensor]

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


# ----------------------------------------------------------------------------------------------------
# argument checks


def _check_pair(a, b, name_a: str, name_b: str) -> None:
    for x, name in ((a, name_a), (b, name_b)):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
        if x.dim() != 2:
            raise ValueError(f"{name} must have shape (N, D), got a tensor of rank {x.dim()} "
                             f"with shape {tuple(x.shape)}")
        if x.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} must be float32, bfloat16, float16 or float64, got {x.dtype}")
        if x.shape[0] == 0:
            raise ValueError(f"{name} is an empty batch (N = 0)")
        if x.shape[1] == 0:
            raise ValueError(f"{name} has no features (D = 0)")
    if a.shape[0] != b.shape[0]:
        raise ValueError(f"{name_a} and {name_b} must have the same batch size N, got {a.shape[0]} and "
                         f"{b.shape[0]}")
    if a.shape[1] != b.shape[1]:
        raise ValueError(f"{name_a} and {name_b} must have the same feature size D, got {a.shape[1]} and "
                         f"{b.shape[1]}")
    if a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must be on the same device, got {a.device} and {b.device}")
    if a.dtype != b.dtype:
        raise TypeError(f"{name_a} and {name_b} must have the same dtype, got {a.dtype} and {b.dtype}")


def _check_feature_dim(feature_dim, d: int) -> int:
    if feature_dim is None:
        return d
    if isinstance(feature_dim, bool) or not isinstance(feature_dim, numbers.Integral):
        raise TypeError(f"feature_dim must be an int or None, got {type(feature_dim).__name__}")
    if not 1 <= feature_dim <= d:
        raise ValueError(f"feature_dim must be in [1, D] = [1, {d}], got {feature_dim}")
    return int(feature_dim)


def _check_temperature(temperature, like: torch.Tensor) -> torch.Tensor:
    """The temperature as a 0-dim tensor on the device of ``like`` (keeping its autograd history)."""
    if isinstance(temperature, torch.Tensor):
        if temperature.numel() != 1:
            raise ValueError(f"temperature must be a scalar, got a tensor of shape {tuple(temperature.shape)}")
        if not temperature.is_floating_point():
            raise TypeError(f"temperature must be a floating-point tensor, got {temperature.dtype}")
        if temperature.device != like.device and temperature.device.type != "cpu":
            raise ValueError(f"temperature must be on the device of the inputs ({like.device}) or on the CPU, got "
                             f"{temperature.device}")
        # A device tensor's value is not checked (a host sync), nor is any under torch.compile (a graph break).
        if temperature.device.type == "cpu" and not torch.compiler.is_compiling():
            _checks.positive_with_reciprocal(float(temperature.detach()), "temperature", _acc_dtype(like))
        return temperature.reshape(()).to(like.device)
    if isinstance(temperature, bool) or not isinstance(temperature, numbers.Real):
        raise TypeError(f"temperature must be a float or a 0-dim tensor, got {type(temperature).__name__}")
    value = _checks.positive_with_reciprocal(float(temperature), "temperature", _acc_dtype(like))
    # a fill kernel, not a host-to-device copy: no synchronization on CUDA
    exact = like.device.type == "cpu" or like.dtype == torch.float64
    return torch.full((), value, dtype=torch.float64 if exact else torch.float32, device=like.device)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    """Statistics, loss and temperature math: float64 for float64 inputs, float32 otherwise."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _fix_last_stride(x: torch.Tensor) -> torch.Tensor:
    # Kernels take row strides; only a non-unit column stride forces a copy.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


# ----------------------------------------------------------------------------------------------------
# fake implementations (shapes and dtypes of each dispatcher op's outputs)


def _fake_loss(a):
    return a.new_empty((), dtype=_acc_dtype(a))


def _fake_grads(g, a, b, *rest):
    return [a.new_empty(a.shape), b.new_empty(b.shape), a.new_empty((), dtype=_acc_dtype(a))]


def _fake_triton_saved(a):  # (lse (2N), norms (2N), positive cosines (N)), fp32
    n = a.shape[0]
    return [a.new_empty(2 * n, dtype=torch.float32), a.new_empty(2 * n, dtype=torch.float32),
            a.new_empty(n, dtype=torch.float32)]


def _fake_ntxent_fwd_cpp(z1, z2, inv_temp, normalize, d, block):  # (lse: maxima then log-sums, normalized rows, norms)
    n, acc = z1.shape[0], _acc_dtype(z1)
    return [_fake_loss(z1), z1.new_empty(4 * n, dtype=acc), z1.new_empty((2 * n, d), dtype=acc),
            z1.new_empty(2 * n, dtype=acc)]


def _fake_info_nce_fwd_cpp(q, k, inv_temp, normalize, symmetric, d, block):  # (lse_r, lse_c, qn, kn, qnorm, knorm)
    n, acc = q.shape[0], _acc_dtype(q)
    return [_fake_loss(q), q.new_empty(2 * n, dtype=acc), q.new_empty(2 * n if symmetric else 0, dtype=acc),
            q.new_empty((n, d), dtype=acc), q.new_empty((n, d), dtype=acc), q.new_empty(n, dtype=acc),
            q.new_empty(n, dtype=acc)]


def _fake_ntxent_fwd_triton(z1, z2, inv_temp, normalize, d):
    return [_fake_loss(z1), *_fake_triton_saved(z1)]


def _fake_info_nce_fwd_triton(q, k, inv_temp, normalize, symmetric, d):
    return [_fake_loss(q), *_fake_triton_saved(q)]


# ----------------------------------------------------------------------------------------------------
# backends: the dispatcher ops of csrc/cpu/infonce.cpp (cpp; they take the tile size last, appended by
# cpp_op) and kernels/infonce.py (triton); the torch path is the reference's autograd (see the entry points)

TABLE = _backend.BackendTable(
    "infonce",
    cpp=dict(
        ntxent_fwd=_library.cpp_op("ntxent_fwd_cpp", _fake_ntxent_fwd_cpp, block=True),
        ntxent_bwd=_library.cpp_op("ntxent_bwd_cpp", _fake_grads, block=True),
        info_nce_fwd=_library.cpp_op("info_nce_fwd_cpp", _fake_info_nce_fwd_cpp, block=True),
        info_nce_bwd=_library.cpp_op("info_nce_bwd_cpp", _fake_grads, block=True),
    ),
    triton=dict(
        ntxent_fwd=_library.triton_op(
            "ntxent_fwd_triton(Tensor z1, Tensor z2, Tensor inv_temp, bool normalize, int d) -> Tensor[]",
            _fake_ntxent_fwd_triton, "infonce.ntxent_forward"),
        ntxent_bwd=_library.triton_op(
            "ntxent_bwd_triton(Tensor grad, Tensor z1, Tensor z2, Tensor lse, Tensor norms, Tensor cos, "
            "Tensor inv_temp, bool normalize, int d) -> Tensor[]", _fake_grads, "infonce.ntxent_backward"),
        info_nce_fwd=_library.triton_op(
            "info_nce_fwd_triton(Tensor q, Tensor k, Tensor inv_temp, bool normalize, bool symmetric, int d) "
            "-> Tensor[]", _fake_info_nce_fwd_triton, "infonce.info_nce_forward"),
        info_nce_bwd=_library.triton_op(
            "info_nce_bwd_triton(Tensor grad, Tensor q, Tensor k, Tensor lse, Tensor norms, Tensor cos, "
            "Tensor inv_temp, bool normalize, bool symmetric, int d) -> Tensor[]", _fake_grads,
            "infonce.info_nce_backward"),
    ),
)


# ----------------------------------------------------------------------------------------------------
# autograd (every fused backend: TABLE[backend] holds the steps)


class _NTXentFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, z1, z2, temperature, normalize: bool, d: int, backend: str):
        inv_temp = (1.0 / temperature.detach().to(_acc_dtype(z1))).reshape(())
        loss, *saved = TABLE[backend]["ntxent_fwd"](z1, z2, inv_temp, normalize, d)
        ctx.save_for_backward(z1, z2, inv_temp, *saved)
        ctx.cfg = (normalize, d, backend)
        ctx.temp_dtype = temperature.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        z1, z2, inv_temp, *saved = ctx.saved_tensors
        normalize, d, backend = ctx.cfg
        dz1, dz2, gz = TABLE[backend]["ntxent_bwd"](grad.to(inv_temp.dtype).reshape(()), z1, z2, *saved,
                                                       inv_temp, normalize, d)
        dtemp = None
        if ctx.needs_input_grad[2]:
            dtemp = (-0.5 * gz * inv_temp).to(ctx.temp_dtype)
        return (dz1 if ctx.needs_input_grad[0] else None, dz2 if ctx.needs_input_grad[1] else None,
                dtemp, None, None, None)


class _InfoNCEFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, temperature, normalize: bool, symmetric: bool, d: int, backend: str):
        inv_temp = (1.0 / temperature.detach().to(_acc_dtype(q))).reshape(())
        loss, *saved = TABLE[backend]["info_nce_fwd"](q, k, inv_temp, normalize, symmetric, d)
        ctx.save_for_backward(q, k, inv_temp, *saved)
        ctx.cfg = (normalize, symmetric, d, backend)
        ctx.temp_dtype = temperature.dtype
        return loss

    @staticmethod
    def backward(ctx, grad):
        q, k, inv_temp, *saved = ctx.saved_tensors
        normalize, symmetric, d, backend = ctx.cfg
        dq, dk, gz = TABLE[backend]["info_nce_bwd"](grad.to(inv_temp.dtype).reshape(()), q, k, *saved,
                                                       inv_temp, normalize, symmetric, d)
        dtemp = None
        if ctx.needs_input_grad[2]:
            dtemp = (-gz * inv_temp).to(ctx.temp_dtype)
        return (dq if ctx.needs_input_grad[0] else None, dk if ctx.needs_input_grad[1] else None,
                dtemp, None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# public entry points (re-exported by ssl_fast.functional)


def _single_pair(a: torch.Tensor, b: torch.Tensor, temp: torch.Tensor, d: int) -> torch.Tensor:
    """N = 1: every anchor's only candidate is its positive, so the loss is exactly 0 with zero gradients (NaN / Inf
    inputs still give NaN). The kernels' P - Y = exp(S - lse) - 1 is ~1 ulp instead of 0, which the normalization
    of a (near-)zero row amplifies by 1/eps = 1e12: this path returns the exact value."""
    acc = _acc_dtype(a)
    zero = (a[:, :d].sum() + b[:, :d].sum()).to(acc) * 0
    # times zero, not 0: a learnable temperature's gradient is NaN with the loss (it was 0 for NaN inputs)
    return zero + temp.to(acc) * zero if temp.requires_grad else zero


def ntxent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Temperature = 0.5,
    *,
    normalize: bool = True,
    feature_dim: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SimCLR NT-Xent loss over the 2N anchors of two views (see ``ssl_fast.functional.ntxent``)."""
    _check_pair(z1, z2, "z1", "z2")
    d = _check_feature_dim(feature_dim, z1.shape[1])
    temp = _check_temperature(temperature, z1)
    name = TABLE.resolve(z1.device, backend, z1.dtype)
    if z1.shape[0] == 1:
        return _single_pair(z1, z2, temp, d)
    if name == "torch":  # in the accumulation dtype: fp16 squared norms and logits overflow (a NaN loss)
        acc = _acc_dtype(z1)
        return reference.ntxent_reference(z1.to(acc), z2.to(acc), temp.to(acc), normalize=normalize,
                                          feature_dim=feature_dim)
    return _NTXentFn.apply(_fix_last_stride(z1), _fix_last_stride(z2), temp, bool(normalize), d, name)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: Temperature = 0.1,
    *,
    normalize: bool = True,
    symmetric: bool = False,
    feature_dim: Optional[int] = None,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Cross-view InfoNCE (see ``ssl_fast.functional.info_nce``)."""
    _check_pair(query, key, "query", "key")
    d = _check_feature_dim(feature_dim, query.shape[1])
    temp = _check_temperature(temperature, query)
    name = TABLE.resolve(query.device, backend, query.dtype)
    if query.shape[0] == 1:
        return _single_pair(query, key, temp, d)
    if name == "torch":  # in the accumulation dtype, as ntxent's
        acc = _acc_dtype(query)
        return reference.info_nce_reference(query.to(acc), key.to(acc), temp.to(acc), normalize=normalize,
                                            symmetric=symmetric, feature_dim=feature_dim)
    return _InfoNCEFn.apply(_fix_last_stride(query), _fix_last_stride(key), temp, bool(normalize),
                            bool(symmetric), d, name)
