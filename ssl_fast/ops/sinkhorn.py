"""Sinkhorn-Knopp (SwAV's equal-partition codes): argument checks, backend dispatch, the distributed driver.

The math (derived in ``csrc/cpu/sinkhorn.cpp`` and ``kernels/sinkhorn.py``): with s = scores / eps and
prototype scalings u (K) kept in the log domain,

    u_1     = -LSE_b s_bk                                  col_lse(x, 1/eps)      -> (m, z), u_1 = -(m + log z)
    u_{t+1} = u_t - log c,  c_k = sum_b softmax_k(s_b + u_t)_k    row_pass(x, 1/eps, u) -> c
    Q       = softmax_k(s_b + u_n)                         apply(x, 1/eps, u)     -> Q (B, K)

which equals SwAV's ``distributed_sinkhorn`` (the global total, the 1/K and 1/B factors are uniform and
cancel in the next sample normalization; the final ``Q *= B`` restores unit sample sums). Every fused
backend (``cpp``: ``torch.ops.ssl_fast.sinkhorn_*_cpp``; ``triton``: ``torch.ops.ssl_fast.sinkhorn_*_triton``)
provides these three passes; the loop over sweeps and the collectives live here, once.

Distributed (``process_group`` given): the row sums are sums over every rank's samples, so between the
passes (m, z) are combined with an all-reduce MAX of m then SUM of z * exp(m - M) (first sweep), and each
later sweep all-reduces the K values c: ``iterations + 1`` all-reduces of K values in all, no host sync.
"""

from __future__ import annotations

import numbers
from typing import Optional, Tuple

import torch

from .. import _checks
from . import _backend, _library

SUPPORTED_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)


def _acc_dtype(x: torch.Tensor) -> torch.dtype:
    return torch.float64 if x.dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# argument checks


def _check(scores, epsilon, iterations) -> Tuple[float, int]:
    if not isinstance(scores, torch.Tensor):
        raise TypeError(f"scores must be a torch.Tensor, got {type(scores).__name__}")
    if scores.dim() != 2:
        raise ValueError(f"scores must have shape (B, K), got a tensor of rank {scores.dim()} with shape "
                         f"{tuple(scores.shape)}")
    if scores.dtype not in SUPPORTED_DTYPES:
        raise TypeError(f"scores must be float32, bfloat16, float16 or float64, got {scores.dtype}")
    if scores.shape[0] == 0:
        raise ValueError("scores is an empty batch (B = 0)")
    if scores.shape[1] == 0:
        raise ValueError("scores has no prototypes (K = 0)")
    if isinstance(epsilon, torch.Tensor) and epsilon.numel() == 1 and epsilon.device.type == "cpu":
        if not epsilon.is_floating_point():  # as a bool / complex float would be
            raise TypeError(f"epsilon must be a float or a floating-point CPU tensor, got a {epsilon.dtype} tensor")
        epsilon = float(epsilon)
    if isinstance(epsilon, bool) or not isinstance(epsilon, numbers.Real):
        raise TypeError(f"epsilon must be a float, got {type(epsilon).__name__}")
    epsilon = _checks.positive_with_reciprocal(float(epsilon), "epsilon", _acc_dtype(scores))
    if isinstance(iterations, bool) or not isinstance(iterations, numbers.Integral):
        raise TypeError(f"iterations must be an int, got {type(iterations).__name__}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    return 1.0 / epsilon, int(iterations)


def _fix_last_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride; only a non-unit stride along K forces a copy.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


# ----------------------------------------------------------------------------------------------------
# fake implementations and the torch passes


def _fake_col_lse(scores, inv_eps):
    k = scores.shape[1]
    acc = _acc_dtype(scores)
    return scores.new_empty((k,), dtype=acc), scores.new_empty((k,), dtype=acc)


def _fake_row_pass(scores, inv_eps, u):
    return scores.new_empty((scores.shape[1],), dtype=_acc_dtype(scores))


def _fake_apply(scores, inv_eps, u):
    return scores.new_empty(scores.shape, dtype=_acc_dtype(scores))


# torch: the same three passes materializing s = scores / eps (the ``torch`` backend)
def _torch_col_lse(scores, inv_eps):
    s = scores.to(_acc_dtype(scores)) * inv_eps
    m = s.amax(dim=0)
    return m, torch.exp(s - m).sum(dim=0)


def _torch_row_pass(scores, inv_eps, u):
    return torch.softmax(scores.to(_acc_dtype(scores)) * inv_eps + u, dim=1).sum(dim=0)


def _torch_apply(scores, inv_eps, u):
    return torch.softmax(scores.to(_acc_dtype(scores)) * inv_eps + u, dim=1)


# ----------------------------------------------------------------------------------------------------
# backends: the dispatcher ops of csrc/cpu/sinkhorn.cpp (cpp) and kernels/sinkhorn.py (triton), and the torch
# passes above; every backend provides col_lse, row_pass and apply

TABLE = _backend.BackendTable(
    "sinkhorn_knopp",
    cpp=dict(col_lse=_library.cpp_op("sinkhorn_col_lse_cpp", _fake_col_lse),
             row_pass=_library.cpp_op("sinkhorn_row_pass_cpp", _fake_row_pass),
             apply=_library.cpp_op("sinkhorn_apply_cpp", _fake_apply)),
    triton=dict(col_lse=_library.triton_op("sinkhorn_col_lse_triton(Tensor scores, float inv_eps) -> (Tensor, Tensor)",
                                           _fake_col_lse, "sinkhorn.col_lse"),
                row_pass=_library.triton_op("sinkhorn_row_pass_triton(Tensor scores, float inv_eps, Tensor u) -> Tensor",
                                            _fake_row_pass, "sinkhorn.row_pass"),
                apply=_library.triton_op("sinkhorn_apply_triton(Tensor scores, float inv_eps, Tensor u) -> Tensor",
                                         _fake_apply, "sinkhorn.apply")),
    torch=dict(col_lse=_torch_col_lse, row_pass=_torch_row_pass, apply=_torch_apply),
)


def _scalings(passes, x: torch.Tensor, inv_eps: float, iterations: int, group) -> torch.Tensor:
    """The loop over sweeps with ``passes`` (one backend's steps) and, with ``group``, the collectives: the
    prototype scalings u (K) of the last sweep; the codes are ``apply(x, inv_eps, u)``."""
    col_lse, row_pass = passes["col_lse"], passes["row_pass"]
    m, z = col_lse(x, inv_eps)
    if group is not None:
        import torch.distributed as dist

        gm = m.clone()
        dist.all_reduce(gm, op=dist.ReduceOp.MAX, group=group)
        z = z * torch.exp(m - gm)
        dist.all_reduce(z, op=dist.ReduceOp.SUM, group=group)
        m = gm
    # in place on the passes' own outputs: no K-vector temporaries per sweep
    u = z.log_().add_(m).neg_()
    tiny = torch.finfo(u.dtype).tiny
    for _ in range(iterations - 1):
        c = row_pass(x, inv_eps, u)
        if group is not None:
            dist.all_reduce(c, op=dist.ReduceOp.SUM, group=group)
        # c_k >= 1/K in exact arithmetic; when |scores| / epsilon is so large (> ~1e9 in fp32) that the rounding of
        # s = scores / eps exceeds the exp range, a column's mass can underflow to 0: log 0 = -inf would make every
        # code NaN. Clamped, the codes stay finite (and as close to a hard assignment as the rounding allows).
        u = u.sub_(c.clamp_min_(tiny).log_())
    return u


# ----------------------------------------------------------------------------------------------------
# public entry point (re-exported by ssl_fast.functional)


def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    process_group=None,
    check_finite: bool = False,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp codes (see ``ssl_fast.functional.sinkhorn_knopp``)."""
    inv_eps, iterations = _check(scores, epsilon, iterations)
    if check_finite and not bool(torch.isfinite(scores).all()):  # a host sync, only when asked for
        raise ValueError("scores contains NaN or Inf")
    name = TABLE.resolve(scores.device, backend, scores.dtype)
    x = _fix_last_stride(scores.detach())
    with torch.no_grad():
        return TABLE[name]["apply"](x, inv_eps, _scalings(TABLE[name], x, inv_eps, iterations, process_group))


def sinkhorn_scalings(scores: torch.Tensor, inv_eps: float, iterations: int, *, process_group=None,
                      backend: Optional[str] = None) -> torch.Tensor:
    """The prototype scalings u (K; float32, float64 for float64 scores) of ``iterations`` sweeps on ``scores``
    (checked by the caller): the codes of any row b of scores are softmax_k(scores_b * inv_eps + u), which a fused
    consumer (the SwAV loss) forms where it uses them instead of reading a B x K matrix."""
    name = TABLE.resolve(scores.device, backend, scores.dtype)
    with torch.no_grad():
        return _scalings(TABLE[name], _fix_last_stride(scores.detach()), inv_eps, iterations, process_group)
