"""Triton kernels of the rectangular InfoNCE op (ssl_fast.ops.infonce_rect): local anchors against (gathered)
candidates, the op behind distributed NT-Xent / InfoNCE, queues of negatives and the lightly memory bank.

Rows x (R x d) against candidates y (Cn x d) (row-strided, unit column stride), per row a positive column
p(i) (-1: none) and an excluded column e(i) (-1: none; the anchor itself in distributed NT-Xent).
  r_i = 1 / max(|x_i|, eps), a_i = r_i x_i, c_j = r_j y_j (1 and raw rows when normalize = False)
  S_ij = <a_i, c_j> / T,  s2 = S log2(e) (base-2 logits),  S_i,e(i) = -inf
  lse_i = logsumexp_j S_ij,   t_i = lse_i - S_i,p(i)   (t_i = lse_i when p(i) = -1)       -> terms (R)
Backward for per-row weights w_i = dL/dt_i:
  W_ij = w_i (P_ij - [j == p(i)]),  P_ij = 2^(s2_ij - lse2_i)  (0 at e(i) and beyond Cn)
  G^a_i = dL/da_i = (1/T) sum_j W_ij c_j,   G^c_j = dL/dc_j = (1/T) sum_i W_ij a_i
  <a_i, G^a_i> = sum_j W_ij S_ij from the recomputed logits (fp32; gz, and dx when d spans several
  D-chunks), or from G itself when one program holds the whole d (then it cancels exactly in dx).
  The gradient GEMMs take 16-bit operands on the tensor cores (fp32 accumulators): W diag(r) formed in fp32 and
  split in a high and a low 16-bit part (two MMAs, _mma_hilo: W to ~2^-17; one rounding to bf16, 2^-9, is not
  averaged away when a gradient sums over a few rows or candidates), Y or X as they are (fp16: W, and the
  normalized rows c = diag(r) Y, |c| <= 1, since r up to 1 / eps overflows fp16).
  dx_i = r_i (G^a_i - a_i <a_i, G^a_i>) if |x_i| > eps, else G^a_i / eps (F.normalize); dx = G^a raw.
  gz = sum_i <a_i, G^a_i> = -T dL/dT (temperature gradient).
The launchers pass +-r (negative when |x| <= eps) for rows and candidates (no division in the tiles) and,
like the NT-Xent forward, the forward shifts its exp2 by 1 / T when the rows are normalized and T >= 0.024
(_fixed_shift: one exp2 per logit, no maximum, linear partial sums).
Kernels (fp32 statistics and accumulators, -inf masks, int64 element offsets):
  _rect_fwd_kernel       grid (cdiv(R, BLOCK_M), S): program (I, s) sweeps the candidate piece s (cps columns,
                         S pieces so that the grid fills the GPU: MoCo's 256 rows x 65536 queue entries give
                         2 x 132 programs, two waves) with an online base-2 (max, sum) per row: one partial per (s, row)
                         and the positive's logit where the piece holds it.
  _rect_merge_kernel     grid (cdiv(R, 128),): the S partials of each row in a fixed order -> lse, terms.
  _rect_bwd_rows_kernel  grid (cdiv(R, BLOCK_M), D-chunks, S): the same pieces; recomputes the logit tile,
                         acc += W diag(r_J) Y_J[:, chunk]; S = 1: finishes dx (fp32 (R, d)) and, chunk 0, the
                         per-block partial of gz; S > 1: fp32 partials to a workspace, summed in a fixed order
                         by _rect_bwd_epilogue_kernel, which finishes dx.
  _rect_bwd_cols_kernel  grid (cdiv(grad_cols, BLOCK_N), D-chunks, S'): a program owns a column block and sweeps
                         a piece of the row blocks with the stored row LSEs (flash-attention's dK/dV): no atomics;
                         S' > 1 through the same workspace and epilogue.
  SINGLE (16-bit, d <= 128): the rows' (columns') tile is loaded once per program, one K step per tile.
Cost: forward R Cn d MACs, backward (2 + 2 chunks) R Cn d; extra memory O(S (R + Cn) d) for the pieces.
Tiles: _rect_config (through kernels/tuning.override, name infonce_rect); not timed on a GPU. The compiled code
per launch (MoCo's queue shape: CTAs, tensor-core MACs, registers) is in bench/results/static-sm90.md.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .infonce_common import (_DTYPES, _arch, _device_ctx, _dot_tile, _fixed_shift, _flags, _interpreting,
                             _merge_partials, _mma, _pow2, _scale, _sm_count, _tile_stats_fixed, _tile_stats_max)
from .tuning import override as _override  # the tile sweep's per-launch overrides (bench/tune.py)


@triton.jit
def _mma_hilo(a, b, acc, UPCAST: tl.constexpr, IEEE: tl.constexpr):
    """acc + a @ b for an fp32 a and b in the inputs' dtype: a split in a high and a low part of that dtype
    (two MMAs at the 16-bit rate: a to ~2^-17 relative, where one rounding to bf16 costs 2^-9, which a gradient
    summed over a few rows or candidates does not average away); fp32 b: one MMA (IEEE or TF32)."""
    if b.dtype == tl.float32:
        acc = _mma(a, b, acc, UPCAST, IEEE)
    else:
        hi = a.to(b.dtype)
        acc = _mma(hi, b, acc, UPCAST, IEEE)
        acc = _mma((a - hi.to(tl.float32)).to(b.dtype), b, acc, UPCAST, IEEE)
    return acc


@triton.jit
def _rect_fwd_kernel(
    x_ptr, y_ptr, xs_ptr, ys_ptr, pos_ptr, excl_ptr, inv_temp_ptr, part_ptr, spos_ptr,
    stride_x, stride_y,
    R, Cn, d, cps,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    SINGLE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """part[s, row] = base-2 LSE of the row over the candidates of piece s (a linear sum of 2^(s2 - scale2) with
    the fixed shift), spos[s, row] = the positive's base-2 logit when piece s holds it, else 0."""
    pid = tl.program_id(0)
    sid = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    kk = tl.arange(0, BLOCK_K)
    scale2 = tl.load(inv_temp_ptr).to(tl.float32) * 1.4426950408889634
    rs = _scale(tl.load(xs_ptr + rows, mask=rmask, other=1.0), NORMALIZE) * scale2
    p = tl.load(pos_ptr + rows, mask=rmask, other=-1)
    e = tl.load(excl_ptr + rows, mask=rmask, other=-1)
    if SINGLE:
        xr = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + kk[None, :],
                     mask=rmask[:, None] & (kk < d)[None, :], other=0.0)
    fixed = _fixed_shift(scale2, NORMALIZE)
    m = tl.where(fixed, scale2, float("-inf")) + tl.zeros([BLOCK_M], dtype=tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    spos = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_lo = sid * cps
    for j0 in range(c_lo, tl.minimum(c_lo + cps, Cn), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < Cn
        if SINGLE:
            yc = tl.load(y_ptr + cols[:, None].to(tl.int64) * stride_y + kk[None, :],
                         mask=cmask[:, None] & (kk < d)[None, :], other=0.0)
            acc = _mma(xr, tl.trans(yc), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, IEEE)
        else:
            acc = _dot_tile(x_ptr, y_ptr, stride_x, stride_y, rows.to(tl.int64), cols.to(tl.int64), rmask, cmask,
                            d, tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), BLOCK_K, UPCAST, IEEE)
        rj = _scale(tl.load(ys_ptr + cols, mask=cmask, other=1.0), NORMALIZE)
        s2 = acc * rs[:, None] * rj[None, :]
        spos += tl.sum(tl.where(cols[None, :] == p[:, None], s2, 0.0), axis=1)
        s2 = tl.where(cmask[None, :] & (cols[None, :] != e[:, None]), s2, float("-inf"))
        if fixed:
            m, l, _ = _tile_stats_fixed(s2, m, l, scale2, False)
        else:
            m, l, _ = _tile_stats_max(s2, m, l, False)
    if fixed:
        out = l
    else:
        out = tl.where(l > 0.0, m + tl.log2(tl.where(l > 0.0, l, 1.0)), float("-inf"))
    tl.store(part_ptr + sid.to(tl.int64) * R + rows, out, mask=rmask)
    tl.store(spos_ptr + sid.to(tl.int64) * R + rows, spos, mask=rmask)


@triton.jit
def _rect_merge_kernel(part_ptr, spos_ptr, pos_ptr, inv_temp_ptr, terms_ptr, lse_ptr, R, nsplit,
                       NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr):
    """lse_i (natural) from the nsplit partials of row i, in a fixed order; t_i = lse_i - S_i,p(i)."""
    pid = tl.program_id(0)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < R
    scale2 = tl.load(inv_temp_ptr).to(tl.float32) * 1.4426950408889634
    lse2 = _merge_partials(part_ptr, R, rows, rmask, nsplit, scale2, _fixed_shift(scale2, NORMALIZE), BLOCK_S)
    spos = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s0 in range(0, nsplit, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        spos += tl.sum(tl.load(spos_ptr + s[:, None].to(tl.int64) * R + rows[None, :],
                               mask=(s < nsplit)[:, None] & rmask[None, :], other=0.0), axis=0)
    p = tl.load(pos_ptr + rows, mask=rmask, other=-1)
    t2 = tl.where(p >= 0, lse2 - spos, lse2)
    tl.store(lse_ptr + rows, lse2 * 0.6931471805599453, mask=rmask)
    tl.store(terms_ptr + rows, t2 * 0.6931471805599453, mask=rmask)


@triton.jit
def _rect_finish(acc, dot, a_ptr, as_ptr, stride_a, idx, imask, dcols, dmask, it,
                 NORMALIZE: tl.constexpr, SINGLE: tl.constexpr):
    """(dx, <a, G>) of the rows idx from acc = sum_j W_ij r_j y_j[chunk] and dot = sum_j W_ij s2_ij:
    G = acc / T, <a_i, G_i> from G when it holds the whole d (SINGLE), else from the logits; the
    normalization backward with the signed scales (negative: |x| <= eps, the constant branch)."""
    g = acc * it
    sa = tl.load(as_ptr + idx, mask=imask, other=1.0)
    ra = _scale(sa, NORMALIZE)
    xa = tl.load(a_ptr + idx[:, None].to(tl.int64) * stride_a + dcols[None, :], mask=imask[:, None] & dmask[None, :],
                 other=0.0).to(tl.float32)
    gzn = dot * 0.6931471805599453  # <a_i, G_i> = sum_j W_ij S_ij from the logits (fp32)
    if SINGLE:  # the whole d in this chunk: <a_i, G_i> from G itself, so that it cancels exactly in dx
        dotn = tl.sum(xa * ra[:, None] * g, axis=1)
    else:
        dotn = gzn
    if NORMALIZE:
        dx = tl.where((sa > 0.0)[:, None], (g - xa * ra[:, None] * dotn[:, None]) * ra[:, None], g * ra[:, None])
    else:
        dx = g
    return dx, gzn


@triton.jit
def _rect_bwd_rows_kernel(
    x_ptr, y_ptr, xs_ptr, ys_ptr, pos_ptr, excl_ptr, w_ptr, lse_ptr, inv_temp_ptr, dx_ptr, gz_ptr, ws_ptr, wsd_ptr,
    stride_x, stride_y,
    R, Cn, d, cps,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, SPLIT: tl.constexpr, FOLD_RINV: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    cid = tl.program_id(1)
    sid = tl.program_id(2)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M)
    rmask = rows < R
    dt = y_ptr.dtype.element_ty
    scale2 = tl.load(inv_temp_ptr).to(tl.float32) * 1.4426950408889634
    rs = _scale(tl.load(xs_ptr + rows, mask=rmask, other=1.0), NORMALIZE) * scale2
    p = tl.load(pos_ptr + rows, mask=rmask, other=-1)
    e = tl.load(excl_ptr + rows, mask=rmask, other=-1)
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
    dcols = cid * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    if SINGLE:
        xr = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + dcols[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dot = tl.zeros([BLOCK_M], dtype=tl.float32)
    c_lo = sid * cps
    for j0 in range(c_lo, tl.minimum(c_lo + cps, Cn), BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N)
        cmask = cols < Cn
        rj = _scale(tl.load(ys_ptr + cols, mask=cmask, other=1.0), NORMALIZE)
        yj = tl.load(y_ptr + cols[:, None].to(tl.int64) * stride_y + dcols[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
        if SINGLE:
            s = _mma(xr, tl.trans(yj), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, IEEE)
        else:
            s = _dot_tile(x_ptr, y_ptr, stride_x, stride_y, rows.to(tl.int64), cols.to(tl.int64), rmask, cmask, d,
                          tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), BLOCK_K, UPCAST, IEEE)
        s2 = s * rs[:, None] * rj[None, :]
        keep = rmask[:, None] & cmask[None, :] & (cols[None, :] != e[:, None])
        ispos = cols[None, :] == p[:, None]
        pr = tl.where(keep, tl.exp2(s2 - lse2[:, None]), 0.0)
        wm = tl.where(rmask[:, None] & cmask[None, :], w[:, None] * (pr - tl.where(ispos, 1.0, 0.0)), 0.0)
        dot += tl.sum(tl.where(keep | ispos, wm * s2, 0.0), axis=1)
        if FOLD_RINV:  # W diag(r_J) Y_J (bf16 / fp32: the range holds r <= 1 / eps)
            acc = _mma_hilo(wm * rj[None, :], yj, acc, UPCAST, IEEE)
        else:  # fp16: W (C_J = diag(r_J) Y_J, |c| <= 1)
            acc = _mma_hilo(wm, (yj.to(tl.float32) * rj[:, None]).to(dt), acc, UPCAST, IEEE)
    if SPLIT:
        wrow = sid.to(tl.int64) * R + rows
        tl.store(ws_ptr + wrow[:, None] * d + dcols[None, :], acc, mask=rmask[:, None] & dmask[None, :])
        if cid == 0:  # a branch, not a scalar in the mask (see kernels/infonce.py _fwd_kernel)
            tl.store(wsd_ptr + wrow, dot, mask=rmask)
    else:
        it = tl.load(inv_temp_ptr).to(tl.float32)
        dx, gzn = _rect_finish(acc, dot, x_ptr, xs_ptr, stride_x, rows, rmask, dcols, dmask, it, NORMALIZE, SINGLE)
        tl.store(dx_ptr + rows[:, None].to(tl.int64) * d + dcols[None, :], dx, mask=rmask[:, None] & dmask[None, :])
        if cid == 0:
            tl.store(gz_ptr + pid, tl.sum(tl.where(rmask, gzn, 0.0), axis=0))


@triton.jit
def _rect_bwd_cols_kernel(
    x_ptr, y_ptr, xs_ptr, ys_ptr, pos_ptr, excl_ptr, w_ptr, lse_ptr, inv_temp_ptr, dy_ptr, ws_ptr, wsd_ptr,
    stride_x, stride_y,
    R, grad_cols, d, rps,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, SPLIT: tl.constexpr, FOLD_RINV: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0)
    cid = tl.program_id(1)
    sid = tl.program_id(2)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N)
    cmask = cols < grad_cols
    dt = x_ptr.dtype.element_ty
    scale2 = tl.load(inv_temp_ptr).to(tl.float32) * 1.4426950408889634
    cs = _scale(tl.load(ys_ptr + cols, mask=cmask, other=1.0), NORMALIZE) * scale2
    dcols = cid * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    if SINGLE:
        yc = tl.load(y_ptr + cols[:, None].to(tl.int64) * stride_y + dcols[None, :],
                     mask=cmask[:, None] & dmask[None, :], other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    r_lo = sid * rps
    for i0 in range(r_lo, tl.minimum(r_lo + rps, R), BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M)
        rmask = rows < R
        ri = _scale(tl.load(xs_ptr + rows, mask=rmask, other=1.0), NORMALIZE)
        p = tl.load(pos_ptr + rows, mask=rmask, other=-1)
        e = tl.load(excl_ptr + rows, mask=rmask, other=-1)
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
        xi = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + dcols[None, :],
                     mask=rmask[:, None] & dmask[None, :], other=0.0)
        if SINGLE:
            s = _mma(yc, tl.trans(xi), tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), UPCAST, IEEE)
        else:
            s = _dot_tile(y_ptr, x_ptr, stride_y, stride_x, cols.to(tl.int64), rows.to(tl.int64), cmask, rmask, d,
                          tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32), BLOCK_K, UPCAST, IEEE)
        s2 = s * cs[:, None] * ri[None, :]
        both = cmask[:, None] & rmask[None, :]
        keep = both & (cols[:, None] != e[None, :])
        ispos = cols[:, None] == p[None, :]
        pr = tl.where(keep, tl.exp2(s2 - lse2[None, :]), 0.0)
        wt = tl.where(both, w[None, :] * (pr - tl.where(ispos, 1.0, 0.0)), 0.0)
        dot += tl.sum(tl.where(keep | ispos, wt * s2, 0.0), axis=1)
        if FOLD_RINV:
            acc = _mma_hilo(wt * ri[None, :], xi, acc, UPCAST, IEEE)
        else:
            acc = _mma_hilo(wt, (xi.to(tl.float32) * ri[:, None]).to(dt), acc, UPCAST, IEEE)
    if SPLIT:
        wrow = sid.to(tl.int64) * grad_cols + cols
        tl.store(ws_ptr + wrow[:, None] * d + dcols[None, :], acc, mask=cmask[:, None] & dmask[None, :])
        if cid == 0:
            tl.store(wsd_ptr + wrow, dot, mask=cmask)
    else:
        it = tl.load(inv_temp_ptr).to(tl.float32)
        dy, _ = _rect_finish(acc, dot, y_ptr, ys_ptr, stride_y, cols, cmask, dcols, dmask, it, NORMALIZE, SINGLE)
        tl.store(dy_ptr + cols[:, None].to(tl.int64) * d + dcols[None, :], dy, mask=cmask[:, None] & dmask[None, :])


@triton.jit
def _rect_bwd_epilogue_kernel(a_ptr, as_ptr, ws_ptr, wsd_ptr, inv_temp_ptr, out_ptr, gz_ptr, stride_a, n, d, nsplit,
                              NORMALIZE: tl.constexpr, WRITE_GZ: tl.constexpr, BLOCK: tl.constexpr,
                              BLOCK_D: tl.constexpr, SINGLE: tl.constexpr):
    """Sums the nsplit partials (ws: nsplit x n x d, wsd: nsplit x n) of the rows or columns kernel in a fixed
    order and finishes their gradient like them."""
    pid = tl.program_id(0)
    cid = tl.program_id(1)
    idx = pid * BLOCK + tl.arange(0, BLOCK)
    imask = idx < n
    dcols = cid * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    acc = tl.zeros([BLOCK, BLOCK_D], dtype=tl.float32)
    dot = tl.zeros([BLOCK], dtype=tl.float32)
    wrow = idx.to(tl.int64)  # row of piece s: s n + idx, advanced in int64
    for _ in range(0, nsplit):
        acc += tl.load(ws_ptr + wrow[:, None] * d + dcols[None, :], mask=imask[:, None] & dmask[None, :], other=0.0)
        dot += tl.load(wsd_ptr + wrow, mask=imask, other=0.0)
        wrow += n
    it = tl.load(inv_temp_ptr).to(tl.float32)
    dx, gzn = _rect_finish(acc, dot, a_ptr, as_ptr, stride_a, idx, imask, dcols, dmask, it, NORMALIZE, SINGLE)
    tl.store(out_ptr + idx[:, None].to(tl.int64) * d + dcols[None, :], dx, mask=imask[:, None] & dmask[None, :])
    if WRITE_GZ:
        if cid == 0:
            tl.store(gz_ptr + pid, tl.sum(tl.where(imask, gzn, 0.0), axis=0))


def _rect_config(d: int, dtype: torch.dtype, arch: int = 90) -> dict:
    """Tiles of the rectangular kernels (a first table, not timed on a GPU; through kernels/tuning.override, name
    infonce_rect). Forward: BLOCK_M x BLOCK_N tiles on num_warps warps. Backward: `own` is the block a program
    owns (rows in the rows kernel, candidates in the columns kernel), `sweep` the blocks it loops over, on
    bwd_warps warps; BLOCK_K the K step, BLOCK_D the D-chunk. 16-bit: 128-row tiles on 8 warps (one warpgroup
    per 64 rows: 64-row tiles on 8 warps make both warpgroups compute the same rows), the rows' (columns') tile
    resident when d <= 128 (SINGLE), 64-wide sweeps."""
    dp = _pow2(d)
    if dtype == torch.float32:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, num_warps=4, own=64, sweep=32, BLOCK_K=min(dp, 32), BLOCK_D=min(dp, 64),
                   SINGLE=False, bwd_warps=4)
    else:
        single = dp <= 128
        own, warps = (128, 8) if arch >= 90 else (64, 4)  # sm_80: mma.sync operands in registers, 64-row programs
        cfg = dict(BLOCK_M=128, BLOCK_N=64, num_warps=8, own=own, sweep=64 if single else 32,
                   BLOCK_K=dp if single else 64, BLOCK_D=dp if single else 128, SINGLE=single, bwd_warps=warps)
    return _override("infonce_rect", cfg)


def _epi_block(n: int, chunks: int, device: torch.device) -> int:
    """Rows per program of the pieces' epilogue: 16, halved (down to 2) while the grid is under one wave (it reads
    the whole workspace, pieces x n x d fp32: MoCo's 256 rows x 132 pieces at d = 128 are 17 MiB, which 16
    programs of 16 rows would read at a fraction of HBM bandwidth; 2 rows give 128 programs)."""
    b = 16
    while b > 2 and triton.cdiv(n, b) * chunks < _sm_count(device):
        b //= 2
    return b


_RECT_EPI_WARPS = 4


def _rect_inputs(rows, cands, d_check=True):
    for x, name in ((rows, "rows"), (cands, "cands")):
        if x.dim() != 2 or x.dtype not in _DTYPES:
            raise TypeError(f"{name}: the triton backend takes 2-D float32 / bfloat16 / float16 tensors")
        if x.device.type not in ("cuda", "meta") and not (x.device.type == "cpu" and _interpreting()):
            raise RuntimeError(f"{name}: the triton backend needs CUDA tensors (or TRITON_INTERPRET=1)")
    if rows.shape[1] != cands.shape[1] or rows.dtype != cands.dtype:
        raise ValueError("rows and cands must have the same width and dtype")
    fix = lambda t: t if t.stride(1) == 1 or t.shape[1] == 1 else t.contiguous()  # noqa: E731
    return fix(rows), fix(cands)


def _signed_rinv(x: torch.Tensor) -> torch.Tensor:
    """+-1 / max(|x_i|, eps) per row, fp32, negative when |x_i| <= eps (F.normalize's constant branch)."""
    n = torch.linalg.vector_norm(x, dim=1, dtype=torch.float32)
    r = 1.0 / n.clamp_min(1e-12)
    return torch.where(n > 1e-12, r, -r)


def _pieces(blocks: int, span_blocks: int, device: torch.device, waves: int = 1) -> tuple:
    """(pieces S, blocks per piece) of a sweep over span_blocks blocks so that blocks x S makes about `waves`
    waves of programs (MoCo, 256 rows against 65792 candidates: 258 programs in the forward (2 waves: its
    partials are one float per row), 132 in the backward (1 wave: its partials are rows x d floats))."""
    want = max(1, min(span_blocks, triton.cdiv(waves * _sm_count(device), max(blocks, 1))))
    return want, triton.cdiv(span_blocks, want)  # exactly `want` pieces (the last ones may be empty)


def rect_forward(rows, cands, pos, excl, inv_temp, normalize):
    """[terms (R), lse (R), row scales (R), candidate scales (Cn)], fp32 (scales: +-1 / max(|x|, eps))."""
    rows, cands = _rect_inputs(rows, cands)
    r, d = rows.shape
    cn = cands.shape[0]
    cfg = _rect_config(d, rows.dtype)
    bm, bn = cfg["BLOCK_M"], cfg["BLOCK_N"]
    if r >= 2 ** 31 or cn >= 2 ** 31:
        raise ValueError("rows and cands must have fewer than 2^31 rows")
    with _device_ctx(rows):
        xs, ys = _signed_rinv(rows), _signed_rinv(cands)
        terms = torch.empty(r, dtype=torch.float32, device=rows.device)
        lse = torch.empty(r, dtype=torch.float32, device=rows.device)
        nsplit, per = _pieces(triton.cdiv(r, bm), triton.cdiv(cn, bn), rows.device, waves=2)
        part = torch.empty((nsplit, r), dtype=torch.float32, device=rows.device)
        spos = torch.empty((nsplit, r), dtype=torch.float32, device=rows.device)
        _rect_fwd_kernel[(triton.cdiv(r, bm), nsplit)](
            rows, cands, xs, ys, pos, excl, inv_temp, part, spos, rows.stride(0), cands.stride(0), r, cn, d, per * bn,
            NORMALIZE=bool(normalize), BLOCK_M=bm, BLOCK_N=bn, BLOCK_K=cfg["BLOCK_K"], SINGLE=cfg["SINGLE"],
            num_warps=cfg["num_warps"], **_flags(rows))
        _rect_merge_kernel[(triton.cdiv(r, 128),)](part, spos, pos, inv_temp, terms, lse, r, nsplit,
                                                   NORMALIZE=bool(normalize), BLOCK_R=128, BLOCK_S=16, num_warps=4)
    return [terms, lse, xs, ys]


def rect_backward(w, rows, cands, row_scales, cand_scales, lse, pos, excl, inv_temp, normalize, grad_cols):
    """[dx (R, d), dy (grad_cols, d), gz (0-dim)], fp32 (normalization backward applied)."""
    rows, cands = _rect_inputs(rows, cands)
    r, d = rows.shape
    cn = cands.shape[0]
    cfg = _rect_config(d, rows.dtype, _arch(rows.device))
    own, sweep, bd = cfg["own"], cfg["sweep"], cfg["BLOCK_D"]
    common = dict(NORMALIZE=bool(normalize), BLOCK_K=cfg["BLOCK_K"], BLOCK_D=bd, SINGLE=cfg["SINGLE"],
                  FOLD_RINV=rows.dtype != torch.float16, num_warps=cfg["bwd_warps"], **_flags(rows))
    chunks = triton.cdiv(d, bd)
    single = chunks == 1  # <a, G> from G itself (the whole d in one program)
    w = w.to(torch.float32).contiguous()
    dev = rows.device
    with _device_ctx(rows):
        dx = torch.empty((r, d), dtype=torch.float32, device=dev)
        dy = torch.empty((grad_cols, d), dtype=torch.float32, device=dev)
        nrb = triton.cdiv(r, own)
        gz_part = torch.empty(nrb, dtype=torch.float32, device=dev)
        nsplit, per = _pieces(nrb * chunks, triton.cdiv(cn, sweep), dev)
        ws = torch.empty((nsplit, r, d) if nsplit > 1 else (1,), dtype=torch.float32, device=dev)
        wsd = torch.empty((nsplit, r) if nsplit > 1 else (1,), dtype=torch.float32, device=dev)
        _rect_bwd_rows_kernel[(nrb, chunks, nsplit)](
            rows, cands, row_scales, cand_scales, pos, excl, w, lse, inv_temp, dx, gz_part, ws, wsd,
            rows.stride(0), cands.stride(0), r, cn, d, per * sweep, SPLIT=nsplit > 1, BLOCK_M=own, BLOCK_N=sweep,
            **common)
        if nsplit > 1:  # gz partials per epilogue program (a finer grid than the rows kernel's)
            eb = _epi_block(r, chunks, dev)
            gz_part = torch.empty(triton.cdiv(r, eb), dtype=torch.float32, device=dev)
            _rect_bwd_epilogue_kernel[(triton.cdiv(r, eb), chunks)](
                rows, row_scales, ws, wsd, inv_temp, dx, gz_part, rows.stride(0), r, d, nsplit,
                NORMALIZE=bool(normalize), WRITE_GZ=True, BLOCK=eb, BLOCK_D=bd, SINGLE=single,
                num_warps=_RECT_EPI_WARPS)
        if grad_cols > 0:
            ncb = triton.cdiv(grad_cols, own)
            csplit, cper = _pieces(ncb * chunks, triton.cdiv(r, sweep), dev)
            cws = torch.empty((csplit, grad_cols, d) if csplit > 1 else (1,), dtype=torch.float32, device=dev)
            cwsd = torch.empty((csplit, grad_cols) if csplit > 1 else (1,), dtype=torch.float32, device=dev)
            _rect_bwd_cols_kernel[(ncb, chunks, csplit)](
                rows, cands, row_scales, cand_scales, pos, excl, w, lse, inv_temp, dy, cws, cwsd,
                rows.stride(0), cands.stride(0), r, grad_cols, d, cper * sweep, SPLIT=csplit > 1, BLOCK_M=sweep,
                BLOCK_N=own, **common)
            if csplit > 1:
                eb = _epi_block(grad_cols, chunks, dev)
                _rect_bwd_epilogue_kernel[(triton.cdiv(grad_cols, eb), chunks)](
                    cands, cand_scales, cws, cwsd, inv_temp, dy, gz_part, cands.stride(0), grad_cols, d, csplit,
                    NORMALIZE=bool(normalize), WRITE_GZ=False, BLOCK=eb, BLOCK_D=bd, SINGLE=single,
                    num_warps=_RECT_EPI_WARPS)
        gz = gz_part.sum()
    return [dx, dy, gz]
