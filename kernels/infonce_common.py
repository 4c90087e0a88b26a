"""Pieces shared by the InfoNCE Triton kernels (kernels/infonce.py: NT-Xent and cross-view InfoNCE;
kernels/infonce_rect.py: the rectangular op): the dot helpers and the row-statistics helpers used inside the
kernels (the fixed exp2 shift and the max-shifted online LSE), the supported dtypes, the interpreter flags, the
device context, compute capability and SM count of the launchers (the Python counterpart of
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
        xa = tl.load(a_ptr + ra[:, None].to(tl.int64) * stride_a + kk[None, :],
                     mask=amask[:, None] & km[None, :], other=0.0)
        xb = tl.load(b_ptr + rb[:, None].to(tl.int64) * stride_b + kk[None, :],
                     mask=bmask[:, None] & km[None, :], other=0.0)
        acc = _mma(xa, tl.trans(xb), acc, UPCAST, IEEE)
    return acc


@triton.jit
def _scale(srinv, NORMALIZE: tl.constexpr):
    """The row scale r = 1 / max(|x|, eps) from the pre-pass's signed value srinv = +-r (negative when |x| <= eps:
    F.normalize's constant branch), or 1 when rows are used raw. No division in the tiles."""
    if NORMALIZE:
        r = tl.abs(srinv)
    else:
        r = tl.full(srinv.shape, 1.0, tl.float32)
    return r


@triton.jit
def _fixed_shift(scale2, NORMALIZE: tl.constexpr):
    """Whether the forward uses the fixed shift: rows normalized (|logit| <= 1 / T) and scale2 = log2(e) / T <= 60
    (T >= 0.024), so that every 2^(s2 - scale2) lies in [2^-120, ~1]. Then the partial buffer holds LINEAR sums
    of 2^(s2 - scale2) (no max, no log2 per tile, one exp2 per logit for a row and a column), otherwise base-2
    LSEs. The forward kernels and the finalize decide alike from the same inv_temp (on the device: no sync)."""
    if NORMALIZE:
        out = scale2 <= 60.0
    else:
        out = scale2 < float("-inf")  # False (also for NaN), as a tensor
    return out


@triton.jit
def _tile_stats_fixed(s2, m_i, l_i, scale2, COL_STATS: tl.constexpr):
    """Row sums l += sum_j 2^(s2 - scale2) of a logit tile s2 (base 2, -inf where masked; m stays scale2) and,
    with COL_STATS, the column sums: LINEAR partials (no log2 per tile), each exp2 in [2^-2 scale2, ~1] when
    |s2| <= scale2."""
    e = tl.exp2(s2 - scale2)  # one exp2 for the row and the column
    l_i += tl.sum(e, axis=1)
    if COL_STATS:
        col = tl.sum(e, axis=0)
    else:
        col = 0.0
    return m_i, l_i, col


@triton.jit
def _tile_stats_max(s2, m_i, l_i, COL_STATS: tl.constexpr):
    """As _tile_stats_fixed with max shifts: online over the tiles for the rows (a row masked so far keeps
    (m, l) = (-inf, 0), never NaN), the tile's own maxima for the columns."""
    m_new = tl.maximum(m_i, tl.max(s2, axis=1))
    m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
    l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), axis=1)
    if COL_STATS:
        mc = tl.max(s2, axis=0)
        mc = tl.where(mc == float("-inf"), 0.0, mc)
        lc = tl.sum(tl.exp2(s2 - mc[None, :]), axis=0)
        lse_c = tl.where(lc > 0.0, mc + tl.log2(tl.maximum(lc, 1.0)), float("-inf"))
    else:
        lse_c = 0.0
    return m_new, l_i, lse_c



@triton.jit
def _merge_partials(part_ptr, stride_part, cols, cmask, nslots, scale2, fixed, BLOCK_S: tl.constexpr):
    """Base-2 LSE per column k of the nslots partials part[s, k] (row stride stride_part), added in a fixed
    order: base-2 LSEs merged with max shifts, or, with the forward's fixed shift, linear sums of 2^(s2 - scale2)
    (-inf: an empty slot). -inf where every partial is empty."""
    m = tl.full(cols.shape, float("-inf"), tl.float32)
    l = tl.zeros(cols.shape, dtype=tl.float32)
    for s0 in range(0, nslots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        v = tl.load(part_ptr + s[:, None].to(tl.int64) * stride_part + cols[None, :],
                    mask=(s < nslots)[:, None] & cmask[None, :], other=float("-inf"))
        if fixed:
            l += tl.sum(tl.where(v == float("-inf"), 0.0, v), axis=0)
        else:
            mn = tl.maximum(m, tl.max(v, axis=0))
            mn_safe = tl.where(mn == float("-inf"), 0.0, mn)
            l = l * tl.exp2(m - mn_safe) + tl.sum(tl.exp2(v - mn_safe[None, :]), axis=0)
            m = mn
    if fixed:
        m = tl.zeros(cols.shape, dtype=tl.float32) + scale2
    return tl.where(l > 0.0, m + tl.log2(tl.where(l > 0.0, l, 1.0)), float("-inf"))

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


_SM_TARGET = 132  # programs per wave when there is no CUDA device to ask (the interpreter): an H100
_ARCH_OVERRIDE = None  # the ahead-of-time scripts: the compute capability the launches are recorded for


def _arch(device: torch.device) -> int:
    """Compute capability as 10 major + minor (90 without a CUDA device: the interpreter, or _ARCH_OVERRIDE
    when the ahead-of-time scripts record the launches for another target)."""
    if device.type == "cuda":
        major, minor = torch.cuda.get_device_capability(device)
        return 10 * major + minor
    return _ARCH_OVERRIDE or 90


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_TARGET
