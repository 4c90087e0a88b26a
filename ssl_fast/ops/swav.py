"""SwAV's swapped-prediction loss on fused Sinkhorn-Knopp codes: argument checks, backend dispatch, autograd.

For each high-resolution crop i, codes q_i = sinkhorn_knopp(scores_i [; queue_i]) (the queue rows are used for
the codes and then dropped; no gradient: targets, as in SwAV); every other crop v predicts them:

    L = 1/n_high sum_i 1/(n_crops - 1) sum_{v != i} CE(q_i, softmax(scores_v / T)),
    CE(q, p) = -mean_b sum_k q_bk log p_bk,

grouped by crop as sum_v CE(T_v, p_v) with the targets T_v = sum_{i != v} q_i. The Sinkhorn sweeps come from
:mod:`ssl_fast.ops.sinkhorn` (fused, log domain): they give the prototype scalings u_i (K), and the codes are
q_i = softmax_k(scores_i / eps + u_i) row by row (Sinkhorn's output pass). The swapped prediction is one op with
one contract (derivation in ``csrc/cpu/swav.cpp``):

    swap(scores: V tensors (B, K), u: S tensors (K), 1/eps, 1/T, compute_grad) -> [loss, dL/dscores_v ...]

``cpp`` (``csrc/cpu/swav.cpp``) forms each code row where it uses it (the B x K codes are never stored) and reads
each crop's scores once and writes its gradient once, in the forward (the loss is terminal: the backward only
scales the gradients by the upstream gradient, and skips that when it is exactly 1 on the CPU); ``triton``
writes the codes with Sinkhorn's output pass, then ``kernels/swav.py`` reads them; ``torch`` is the same math
in eager ops under autograd (one log_softmax per crop).
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _checks
from .. import distributed as _dist
from . import _backend, _library
from .sinkhorn import SUPPORTED_DTYPES, TABLE as _SINKHORN, sinkhorn_scalings


def _check_crops(high, low, queue_outputs) -> None:
    if len(high) == 0:
        raise ValueError("high_resolution_outputs must hold at least one tensor")
    for name, crops in (("high_resolution_outputs", high), ("low_resolution_outputs", low),
                        ("queue_outputs", queue_outputs or [])):
        for c in crops:
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"{name}: every crop must be a torch.Tensor, got {type(c).__name__}")
            if c.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name}: every crop must be float32, bfloat16, float16 or float64, got {c.dtype}")
    if len(high) + len(low) < 2:
        raise ValueError("the swapped prediction needs at least two crops (high_resolution_outputs + "
                         "low_resolution_outputs)")
    if queue_outputs is not None and len(queue_outputs) < len(high):
        raise ValueError(f"queue_outputs must hold one tensor per high-resolution crop ({len(high)}), got "
                         f"{len(queue_outputs)}")
    shape = tuple(high[0].shape)
    if len(shape) != 2 or 0 in shape:
        raise ValueError(f"high_resolution_outputs: every crop must have shape (B, K) with B, K >= 1, got {shape}")
    for name, crops in (("high_resolution_outputs", high), ("low_resolution_outputs", low)):
        for c in crops:
            if c.dim() != 2 or tuple(c.shape) != shape:
                raise ValueError(f"{name}: every crop must have shape (B, K) = {shape}, got {tuple(c.shape)}")
    crops = high + low
    if len({c.device for c in crops}) > 1:
        raise ValueError("high_resolution_outputs / low_resolution_outputs: every crop must be on the same device, "
                         f"got {sorted({str(c.device) for c in crops})}")
    dtypes = {c.dtype for c in crops}
    if len(dtypes) > 1:
        raise TypeError("high_resolution_outputs / low_resolution_outputs: every crop must have the same dtype, got "
                        f"{sorted(map(str, dtypes))}")
    for c in queue_outputs or []:
        if c.dim() != 2 or c.shape[1] != shape[1]:
            raise ValueError(f"queue_outputs: every queue must have shape (Bq, K) with K = {shape[1]}, got "
                             f"{tuple(c.shape)}")
        if c.device != high[0].device:
            raise ValueError(f"queue_outputs must be on the device of the crops ({high[0].device}), got {c.device}")


def swav_loss(high_resolution_outputs: Sequence[torch.Tensor], low_resolution_outputs: Sequence[torch.Tensor] = (),
              queue_outputs: Optional[Sequence[torch.Tensor]] = None, *, temperature: float = 0.1,
              sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05, process_group=None,
              backend: Optional[str] = None) -> torch.Tensor:
    """SwAV's swapped-prediction loss (see ``ssl_fast.functional.swav_loss``)."""
    high: List[torch.Tensor] = list(high_resolution_outputs)
    low: List[torch.Tensor] = list(low_resolution_outputs)
    _check_crops(high, low, queue_outputs)
    acc = torch.float64 if high[0].dtype == torch.float64 else torch.float32
    temperature = _checks.positive_with_reciprocal(temperature, "temperature", acc)
    iterations = _checks.int_at_least(sinkhorn_iterations, "sinkhorn_iterations", 1)
    epsilon = _checks.positive_with_reciprocal(sinkhorn_epsilon, "sinkhorn_epsilon", acc)
    group = _dist.resolve_group(process_group)

    # Sinkhorn's prototype scalings u_i of every high-resolution crop (no gradient); its codes are
    # softmax_k(scores_i / eps + u_i), formed by the swapped prediction where it uses them
    us = []
    for i, h in enumerate(high):
        scores = h.detach()
        if queue_outputs is not None:
            scores = torch.cat((scores, queue_outputs[i].detach().to(scores.dtype)))
        us.append(sinkhorn_scalings(scores, 1.0 / epsilon, iterations, process_group=group))
    crops = high + low
    name = TABLE.resolve(crops[0].device, backend, crops[0].dtype)
    if name == "torch":
        apply = _SINKHORN["torch"]["apply"]
        return _torch_swap(crops, [apply(h.detach(), 1.0 / epsilon, u) for h, u in zip(high, us)], temperature)
    crops = [_fix_last_stride(c) for c in crops]
    return _SwapFn.apply(name, 1.0 / epsilon, 1.0 / temperature, len(us), *crops, *us)


# ----------------------------------------------------------------------------------------------------
# the swapped prediction: torch math, fakes, fused backends, autograd


def _torch_swap(crops: List[torch.Tensor], codes: List[torch.Tensor], temperature: float) -> torch.Tensor:
    """sum_v CE(T_v, p_v) in eager torch under autograd (the torch backend), in the accumulation dtype (fp32;
    fp64 for fp64 scores) as the fused backends."""
    b = crops[0].shape[0]
    acc = torch.float64 if crops[0].dtype == torch.float64 else torch.float32
    loss = None
    for v, z in enumerate(crops):
        # the other crops' codes (summed, never total - own: a non-finite code spoils only the crops predicting it)
        others = [q for s, q in enumerate(codes) if s != v]
        if not others:  # one high-resolution crop: its only code is its own, no term (not 0 * log p)
            continue
        target = others[0] if len(others) == 1 else torch.stack(others).sum(dim=0)
        logp = F.log_softmax(z.to(acc) / temperature, dim=1)
        term = -torch.sum(target * logp) / b
        loss = term if loss is None else loss + term
    return loss / ((len(crops) - 1) * len(codes))


def _fix_last_stride(x: torch.Tensor) -> torch.Tensor:
    # The kernels take a row stride; only a non-unit stride along K forces a copy.
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _fake_swap(scores, u, inv_eps, inv_temp, compute_grad):
    # the cpp op: fp16 scores get fp32 gradients (csrc/cpu/swav.cpp: a unit upstream gradient's can pass 65504)
    acc = torch.float64 if scores[0].dtype == torch.float64 else torch.float32
    gdt = torch.float32 if scores[0].dtype == torch.float16 else scores[0].dtype
    return [scores[0].new_empty((), dtype=acc)] + ([s.new_empty(s.shape, dtype=gdt) for s in scores]
                                                   if compute_grad else [])


def _fake_swap_codes(scores, codes, inv_temp, compute_grad):
    acc = torch.float64 if scores[0].dtype == torch.float64 else torch.float32
    return [scores[0].new_empty((), dtype=acc)] + ([s.new_empty(s.shape) for s in scores] if compute_grad else [])


_TRITON_SWAP = _library.triton_op(
    "swav_loss_triton(Tensor[] scores, Tensor[] codes, float inv_temp, bool compute_grad) -> Tensor[]",
    _fake_swap_codes, "swav.swav_loss")


def _triton_swap(scores, u, inv_eps, inv_temp, compute_grad):
    """The contract on CUDA: the codes by Sinkhorn's output pass, then the fused swapped prediction over them."""
    apply = _SINKHORN["triton"]["apply"]
    codes = [apply(scores[s], inv_eps, u[s]) for s in range(len(u))]
    return _TRITON_SWAP(scores, codes, inv_temp, compute_grad)


TABLE = _backend.BackendTable(
    "swav_loss",
    cpp=dict(swap=_library.cpp_op("swav_loss_cpp", _fake_swap)),
    triton=dict(swap=_triton_swap),
)


class _SwapFn(torch.autograd.Function):
    """The fused swapped prediction: the gradients come out of the forward; the backward scales them."""

    @staticmethod
    def forward(ctx, backend: str, inv_eps: float, inv_temp: float, n_codes: int, *tensors):
        crops, u = list(tensors[:len(tensors) - n_codes]), list(tensors[len(tensors) - n_codes:])
        need = ctx.needs_input_grad[4:4 + len(crops)]
        out = TABLE[backend]["swap"](crops, u, inv_eps, inv_temp, any(need))
        loss, grads = out[0], out[1:]
        ctx.save_for_backward(*grads)
        ctx.need = need
        ctx.dtype = crops[0].dtype  # the gradients' dtype (the cpp op returns fp32 ones for fp16 scores)
        return loss

    @staticmethod
    def backward(ctx, grad):
        grads = ctx.saved_tensors
        if grads and not (grad.device.type == "cpu" and not torch.compiler.is_compiling() and float(grad) == 1.0):
            grads = [g * grad for g in grads]
        grads = [g.to(ctx.dtype) for g in grads]  # one rounding to the scores' dtype, after the scaling
        out = [g if need else None for g, need in zip(grads, ctx.need)] if grads else [None] * len(ctx.need)
        n_codes = len(ctx.needs_input_grad) - 4 - len(ctx.need)
        return (None, None, None, None, *out, *([None] * n_codes))
