"""Pieces shared by the InfoNCE Triton kernels (kernels/infonce.py: NT-Xent and cross-view InfoNCE;
kernels/infonce_rect.py: the rectangular op): the dot helpers used inside every kernel, the supported dtypes,
the interpreter flags and the device context of the launchers (the Python counterpart of
csrc/cpu/infonce_common.h).
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

# Constants inside the kernels: log2(e) = 1.4426950408889634 (exp(x) = exp2(x log2 e)), ln(2) =
# 0.6931471805599453 (lse = lse2 ln 2), eps = 1e-12 (F.normalize: a zero row maps to zero, never NaN).
_DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# ----------------------------------------------------------------------------------------------------
# helpers inside kernels


@triton.jit
def _mma(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b with fp32 accumulation. UPCAST (interpreter + bf16 only) works around the interpreter's
    bf16 tl.dot; IEEE asks for exact fp32 products (fp32 inputs, TF32 not allowed)."""
    if UPCAST:
        a = a.to(tl.float32)
        b = b.to(tl.float32)
    if IEEE:
        acc = tl.dot(a, b, acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _dot_tile(a_ptr, b_ptr, stride_a, stride_b, ra, rb, amask, bmask, d, acc,
              BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + A B^T over the first d columns: rows ra of a_ptr (row stride stride_a) against rows rb of b_ptr,
    in BLOCK_K steps (the logit tile of every kernel here)."""
    for k0 in range(0, d, BLOCK_K):
        kk = k0 + tl.arange(0, BLOCK_K)
        km = kk < d
        xa = tl.load(a_ptr + ra[:, None] * stride_a + kk[None, :], mask=amask[:, None] & km[None, :], other=0.0)
        xb = tl.load(b_ptr + rb[:, None] * stride_b + kk[None, :], mask=bmask[:, None] & km[None, :], other=0.0)
        acc = _mma(xa, tl.trans(xb), acc, UPCAST, IEEE)
    return acc


@triton.jit
def _rinv(nrm, NORMALIZE: tl.constexpr):
    """1 / max(|x|, eps) (F.normalize), or 1 when rows are used raw."""
    if NORMALIZE:
        r = 1.0 / tl.maximum(nrm, 1e-12)
    else:
        r = tl.full(nrm.shape, 1.0, tl.float32)
    return r


# ----------------------------------------------------------------------------------------------------
# launcher helpers


def _pow2(d: int) -> int:
    return max(16, triton.next_power_of_2(d))


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def _flags(x: torch.Tensor) -> dict:
    """UPCAST: bf16 dot operands to fp32 under the interpreter only. IEEE: fp32 without TF32."""
    return dict(UPCAST=_interpreting() and x.dtype == torch.bfloat16,
                IEEE=x.dtype == torch.float32 and torch.get_float32_matmul_precision() == "highest")


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()
