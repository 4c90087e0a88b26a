"""Triton kernels of Sinkhorn-Knopp (SwAV codes): log-domain scalings, fp32 max-shifted statistics, the
B x K matrix read n + 1 times for n sweeps and the codes written once; no host sync, no atomics.

Math (SwAV's distributed_sinkhorn; derivation in csrc/cpu/sinkhorn.cpp). Scores x (B x K), s = x / eps,
Q_kb = exp(s_bk + u_k + v_b - c) kept implicit through the prototype scalings u (K) and sample scalings v (B):
    u_1,k   = -LSE_b s_bk                                   (first prototype normalization, v = 0)
    v_t,b   = -LSE_k (s_bk + u_t,k)                         (sample normalization of sweep t)
    u_t+1,k = u_t,k - log c_k,  c_k = sum_b exp(s_bk + u_t,k + v_t,b)      (1/K <= c_k <= B: no shift needed)
    Q_bk    = exp(s_bk + u_n,k + v_n,b) = softmax_k(s_b + u_n)_k            (output, B x K)
The global total and the 1/K, 1/B factors of the reference are uniform and cancel in the next sample
normalization; its final "Q *= B" gives the unit sample sums of the softmax. Base-2 inside the kernels:
t = x * (log2(e) / eps), u2 = u log2(e), exp2 / max in base 2; m is returned in natural units.
No gradient: the codes are targets.

Kernels (one program owns a chunk of rows or a block of prototypes; partials per chunk, combined in chunk
order: deterministic; offsets int64; masked scores are -inf):
  _col_lse_kernel    grid (cdiv(K, BLOCK_K), chunks): online column max / sum of exp2 over the chunk's rows
                     -> pm, pz (chunks x K)                               [first sweep, pass 1]
  _col_combine_kernel grid (cdiv(K, BLOCK_K),): (m, z) over the chunks, max-shifted
  _row_pass_kernel   grid (chunks,): per block of rows, the row LSE over K (online over K tiles, or one
                     tile in registers when K <= MAX_SINGLE_K), then p_bk = exp2(t_bk + u2_k - lse_b)
                     summed over the rows into part[chunk, k]             [one pass per later sweep: the
                     sample sums of sweep t and the prototype sums of sweep t+1 share it]
  _sum_chunks_kernel grid (cdiv(K, BLOCK_K),): c_k = sum over chunks of part[:, k]
  _apply_kernel      grid (cdiv(B, BLOCK_B),): Q rows = softmax_k(s_b + u), written once (fp32)
Launches for n sweeps: 2 + 2 (n - 1) + 1; the python layer adds u <- u - log c (and the all-reduces of a
distributed run) between them.
"""

from __future__ import annotations

import contextlib
import os

import torch
import triton
import triton.language as tl

try:
    from .tuning import override as _override  # the tile sweep's per-launch overrides (bench/tune.py)
except ImportError:  # loaded by file path (scripts/check_triton_compile.py): the tables as written
    def _override(name, cfg):
        return cfg

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

TILE = 8192           # elements of a register tile (fp32: 32 KiB per program)
MAX_SINGLE_K = 4096   # K up to this: a whole row block in one tile (one read of the scores per pass)
MULTI_BLOCK_K = 512   # K above: tiles of MULTI_BLOCK_B x MULTI_BLOCK_K, two reads (LSE, then exps)
MULTI_BLOCK_B = 16
CHUNK_CAP = 512       # at most this many row chunks (partials: chunks x K fp32)


@triton.jit
def _col_lse_kernel(x_ptr, pm_ptr, pz_ptr, stride_x, B, K, rows_per_chunk, c2,
                    BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    pid_c = tl.program_id(1).to(tl.int64)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    r_start = pid_c * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, B)
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK_K], tl.float32)
    for r0 in range(r_start, r_end, BLOCK_B):
        rows = r0 + tl.arange(0, BLOCK_B)
        rmask = rows < r_end
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
        t = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32) * c2
        m_new = tl.maximum(m, tl.max(t, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp2(m - m_safe) + tl.sum(tl.exp2(t - m_safe[None, :]), axis=0)
        m = m_new
    tl.store(pm_ptr + pid_c * K + cols, m, mask=cmask)
    tl.store(pz_ptr + pid_c * K + cols, z, mask=cmask)


@triton.jit
def _col_combine_kernel(pm_ptr, pz_ptr, m_ptr, z_ptr, NC, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    m = tl.full([BLOCK_K], float("-inf"), tl.float32)
    z = tl.zeros([BLOCK_K], tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        msk = (cs < NC)[:, None] & cmask[None, :]
        offs = cs[:, None].to(tl.int64) * K + cols[None, :]
        pm = tl.load(pm_ptr + offs, mask=msk, other=float("-inf"))
        pz = tl.load(pz_ptr + offs, mask=msk, other=0.0)
        m_new = tl.maximum(m, tl.max(pm, axis=0))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        z = z * tl.exp2(m - m_safe) + tl.sum(pz * tl.exp2(pm - m_safe[None, :]), axis=0)
        m = m_new
    tl.store(m_ptr + cols, m * 0.6931471805599453, mask=cmask)
    tl.store(z_ptr + cols, z, mask=cmask)


@triton.jit
def _row_stats(x_ptr, u_ptr, rows, rmask, stride_x, K, c2, BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    """Base-2 (max, sum of exp2) of t_bk + u2_k over all K for a block of rows, online over K tiles."""
    mx = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_B], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        cmask = cols < K
        u2 = tl.load(u_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
        t = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32) * c2 + u2[None, :]
        m_new = tl.maximum(mx, tl.max(t, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(mx - m_safe) + tl.sum(tl.exp2(t - m_safe[:, None]), axis=1)
        mx = m_new
    return tl.where(mx == float("-inf"), 0.0, mx), l


@triton.jit
def _row_pass_kernel(x_ptr, u_ptr, part_ptr, stride_x, B, K, rows_per_chunk, c2,
                     BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    r_start = pid * rows_per_chunk
    r_end = tl.minimum(r_start + rows_per_chunk, B)
    if SINGLE:  # K <= BLOCK_K: each row block is one register tile, the column sums stay in registers
        cols = tl.arange(0, BLOCK_K)
        cmask = cols < K
        u2 = tl.load(u_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
        acc = tl.zeros([BLOCK_K], tl.float32)
        for r0 in range(r_start, r_end, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            rmask = rows < r_end
            ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
            t = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32) * c2
            t = t + u2[None, :]
            mx = tl.max(t, axis=1)
            mx = tl.where(mx == float("-inf"), 0.0, mx)
            e = tl.exp2(t - mx[:, None])
            l = tl.sum(e, axis=1)
            inv = 1.0 / tl.where(l > 0, l, 1.0)
            acc += tl.sum(e * inv[:, None], axis=0)
        tl.store(part_ptr + pid * K + cols, acc, mask=cmask)
    else:  # row LSE online over K tiles, then a second sweep of the tiles adds p into part (zeroed)
        for r0 in range(r_start, r_end, BLOCK_B):
            rows = r0 + tl.arange(0, BLOCK_B)
            rmask = rows < r_end
            mx, l = _row_stats(x_ptr, u_ptr, rows, rmask, stride_x, K, c2, BLOCK_B, BLOCK_K)
            inv = 1.0 / tl.where(l > 0, l, 1.0)
            for k0 in range(0, K, BLOCK_K):
                cols = k0 + tl.arange(0, BLOCK_K)
                cmask = cols < K
                u2 = tl.load(u_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
                ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
                t = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32) * c2
                p = tl.exp2(t + u2[None, :] - mx[:, None]) * inv[:, None]
                pp = part_ptr + pid * K + cols
                tl.store(pp, tl.load(pp, mask=cmask, other=0.0) + tl.sum(p, axis=0), mask=cmask)


@triton.jit
def _sum_chunks_kernel(part_ptr, out_ptr, NC, K, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_k = tl.program_id(0)
    cols = pid_k * BLOCK_K + tl.arange(0, BLOCK_K)
    cmask = cols < K
    acc = tl.zeros([BLOCK_K], tl.float32)
    for c0 in range(0, NC, BLOCK_C):
        cs = c0 + tl.arange(0, BLOCK_C)
        offs = cs[:, None].to(tl.int64) * K + cols[None, :]
        acc += tl.sum(tl.load(part_ptr + offs, mask=(cs < NC)[:, None] & cmask[None, :], other=0.0), axis=0)
    tl.store(out_ptr + cols, acc, mask=cmask)


@triton.jit
def _apply_kernel(x_ptr, u_ptr, q_ptr, stride_x, stride_q, B, K, c2,
                  BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr, SINGLE: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    if SINGLE:
        cols = tl.arange(0, BLOCK_K)
        cmask = cols < K
        u2 = tl.load(u_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
        ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
        t = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32) * c2
        t = t + u2[None, :]
        mx = tl.max(t, axis=1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        e = tl.exp2(t - mx[:, None])
        l = tl.sum(e, axis=1)
        inv = 1.0 / tl.where(l > 0, l, 1.0)
        qp = q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :]
        tl.store(qp, e * inv[:, None], mask=rmask[:, None] & cmask[None, :])
    else:
        mx, l = _row_stats(x_ptr, u_ptr, rows, rmask, stride_x, K, c2, BLOCK_B, BLOCK_K)
        inv = 1.0 / tl.where(l > 0, l, 1.0)
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            cmask = cols < K
            u2 = tl.load(u_ptr + cols, mask=cmask, other=0.0) * 1.4426950408889634
            ptrs = x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :]
            t = tl.load(ptrs, mask=rmask[:, None] & cmask[None, :], other=float("-inf")).to(tl.float32) * c2
            qp = q_ptr + rows[:, None].to(tl.int64) * stride_q + cols[None, :]
            tl.store(qp, tl.exp2(t + u2[None, :] - mx[:, None]) * inv[:, None],
                     mask=rmask[:, None] & cmask[None, :])


# ----------------------------------------------------------------------------------------------------
# launchers


def _pow2(n: int) -> int:
    return 1 << max(0, (int(n) - 1).bit_length())


def _config(K: int) -> dict:
    """Block sizes: K <= MAX_SINGLE_K -> one tile per row block (BLOCK_B * pow2(K) <= TILE elements);
    larger K -> MULTI_BLOCK_B x MULTI_BLOCK_K tiles looped over K."""
    if K <= MAX_SINGLE_K:
        bk = _pow2(K)
        cfg = dict(BLOCK_B=max(1, min(64, TILE // bk)), BLOCK_K=bk, SINGLE=True, num_warps=8 if bk >= 2048 else 4)
    else:
        cfg = dict(BLOCK_B=MULTI_BLOCK_B, BLOCK_K=MULTI_BLOCK_K, SINGLE=False, num_warps=8)
    return _override("sinkhorn", cfg)


def _chunks(B: int, block_b: int):
    """(rows per chunk (a multiple of block_b), number of chunks <= CHUNK_CAP); depends on B only."""
    blocks = triton.cdiv(B, block_b)
    per = block_b * triton.cdiv(blocks, min(blocks, CHUNK_CAP))
    return per, triton.cdiv(B, per)


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def _check(x: torch.Tensor, u=None) -> None:
    if x.device.type == "cpu" and os.environ.get("TRITON_INTERPRET", "0") != "1":
        raise RuntimeError("triton sinkhorn on CPU tensors needs TRITON_INTERPRET=1")
    if x.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"triton sinkhorn takes float32 / bfloat16 / float16 scores, got {x.dtype}")
    if x.dim() != 2 or x.shape[0] < 1 or x.shape[1] < 1:
        raise ValueError(f"scores must have shape (B, K) with B, K >= 1, got {tuple(x.shape)}")
    if x.stride(1) != 1 and x.shape[1] != 1:
        raise ValueError("scores must have unit stride along K")
    if u is not None and (u.dtype != torch.float32 or u.shape != (x.shape[1],) or not u.is_contiguous()
                          or u.device != x.device):
        raise ValueError("u must be a contiguous float32 vector of K values on the scores' device")


def col_lse(x: torch.Tensor, inv_eps: float):
    """(m, z): m_k = max_b x_bk / eps, z_k = sum_b exp(x_bk / eps - m_k); fp32, K each."""
    _check(x)
    B, K = x.shape
    bk = min(_pow2(K), 256)
    bb = max(1, min(64, TILE // bk))
    per, nc = _chunks(B, bb)
    c2 = float(inv_eps) * LOG2E
    pm = torch.empty((nc, K), device=x.device, dtype=torch.float32)
    pz = torch.empty((nc, K), device=x.device, dtype=torch.float32)
    m = torch.empty((K,), device=x.device, dtype=torch.float32)
    z = torch.empty((K,), device=x.device, dtype=torch.float32)
    with _device_ctx(x):
        _col_lse_kernel[(triton.cdiv(K, bk), nc)](x, pm, pz, x.stride(0), B, K, per, c2,
                                                  BLOCK_B=bb, BLOCK_K=bk, num_warps=4)
        _col_combine_kernel[(triton.cdiv(K, bk),)](pm, pz, m, z, nc, K, BLOCK_C=16, BLOCK_K=bk, num_warps=4)
    return m, z


def row_pass(x: torch.Tensor, inv_eps: float, u: torch.Tensor) -> torch.Tensor:
    """c_k = sum_b softmax_k(x_b / eps + u)_k, fp32 (K,)."""
    _check(x, u)
    B, K = x.shape
    cfg = _config(K)
    per, nc = _chunks(B, cfg["BLOCK_B"])
    part = (torch.empty if cfg["SINGLE"] else torch.zeros)((nc, K), device=x.device, dtype=torch.float32)
    out = torch.empty((K,), device=x.device, dtype=torch.float32)
    bk = min(_pow2(K), 256)
    with _device_ctx(x):
        _row_pass_kernel[(nc,)](x, u, part, x.stride(0), B, K, per, float(inv_eps) * LOG2E, **cfg)
        _sum_chunks_kernel[(triton.cdiv(K, bk),)](part, out, nc, K, BLOCK_C=16, BLOCK_K=bk, num_warps=4)
    return out


def apply(x: torch.Tensor, inv_eps: float, u: torch.Tensor) -> torch.Tensor:
    """Q = softmax over K of (x / eps + u), fp32 (B, K)."""
    _check(x, u)
    B, K = x.shape
    cfg = _config(K)
    q = torch.empty((B, K), device=x.device, dtype=torch.float32)
    with _device_ctx(x):
        _apply_kernel[(triton.cdiv(B, cfg["BLOCK_B"]),)](x, u, q, x.stride(0), q.stride(0), B, K,
                                                         float(inv_eps) * LOG2E, **cfg)
    return q


__all__ = ["col_lse", "row_pass", "apply"]
