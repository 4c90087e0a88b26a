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
  The gradient GEMMs take W in fp32 and the rows / candidates upcast to fp32 (TF32 on tensor cores unless
  IEEE): rounding W to bf16 (as the NT-Xent kernels round P) costs ~2^-9 relative per gradient element,
  which the rectangular op's few-column cases (a queue-only row, tiny local batches) do not average away.
  dx_i = r_i (G^a_i - a_i <a_i, G^a_i>) if |x_i| > eps, else G^a_i / eps (F.normalize); dx = G^a raw.
  gz = sum_i <a_i, G^a_i> = -T dL/dT (temperature gradient).
Kernels (fp32 statistics and accumulators, -inf masks, int64 row offsets):
  _rect_fwd_kernel       grid (cdiv(R, BLOCK_M),): a program owns a row block and sweeps every column block
                         with an online base-2 (max, sum); writes lse (natural log) and t.
  _rect_bwd_rows_kernel  grid (cdiv(R, BLOCK_M), D-chunks): sweeps the column blocks, recomputes the logit
                         tile over the full d, acc += W diag(r_J) Y_J[:, chunk]; finishes dx (fp32 (R, d))
                         and, chunk 0, the per-block partial of gz.
  _rect_bwd_cols_kernel  grid (cdiv(grad_cols, BLOCK_N), D-chunks): a program owns a column block and sweeps
                         the row blocks with the stored row LSEs (flash-attention's dK/dV): no atomics.
Cost: forward R Cn d MACs, backward (2 + 2 chunks) R Cn d; extra memory O(R + Cn) beyond the outputs.
Not done: splitting the forward's column sweep (few row blocks, many candidates: a distributed rank's
2N_local rows against 2N_global columns) into partial LSEs for more parallelism; not tuned on a GPU.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .infonce_common import _DTYPES, _device_ctx, _dot_tile, _flags, _interpreting, _mma, _pow2, _rinv
from .tuning import override as _override  # the tile sweep's per-launch overrides (bench/tune.py)


@triton.jit
def _rect_fwd_kernel(
    x_ptr, y_ptr, xn_ptr, yn_ptr, pos_ptr, excl_ptr, inv_temp_ptr, terms_ptr, lse_ptr,
    stride_x, stride_y,
    R, Cn, d,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < R
    ri = _rinv(tl.load(xn_ptr + rows, mask=rmask, other=1.0), NORMALIZE)
    p = tl.load(pos_ptr + rows, mask=rmask, other=-1)
    e = tl.load(excl_ptr + rows, mask=rmask, other=-1)
    scale = tl.load(inv_temp_ptr).to(tl.float32) * 1.4426950408889634
    m = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_M], dtype=tl.float32)
    spos = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, Cn, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < Cn
        rj = _rinv(tl.load(yn_ptr + cols, mask=cmask, other=1.0), NORMALIZE)
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        acc = _dot_tile(x_ptr, y_ptr, stride_x, stride_y, rows, cols, rmask, cmask, d, acc, BLOCK_K, UPCAST, IEEE)
        s2 = acc * ri[:, None] * rj[None, :] * scale
        spos += tl.sum(tl.where(cols[None, :] == p[:, None], s2, 0.0), axis=1)
        s2 = tl.where(cmask[None, :] & (cols[None, :] != e[:, None]), s2, float("-inf"))
        mnew = tl.maximum(m, tl.max(s2, axis=1))
        msafe = tl.where(mnew == float("-inf"), 0.0, mnew)
        l = l * tl.exp2(m - msafe) + tl.sum(tl.exp2(s2 - msafe[:, None]), axis=1)
        m = mnew
    lse2 = m + tl.log2(l)
    t2 = tl.where(p >= 0, lse2 - spos, lse2)
    tl.store(lse_ptr + rows, lse2 * 0.6931471805599453, mask=rmask)
    tl.store(terms_ptr + rows, t2 * 0.6931471805599453, mask=rmask)


@triton.jit
def _rect_bwd_rows_kernel(
    x_ptr, y_ptr, xn_ptr, yn_ptr, pos_ptr, excl_ptr, w_ptr, lse_ptr, inv_temp_ptr, dx_ptr, gz_ptr,
    stride_x, stride_y,
    R, Cn, d,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cid = tl.program_id(1)
    rows = pid * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    rmask = rows < R
    nrm = tl.load(xn_ptr + rows, mask=rmask, other=1.0)
    ri = _rinv(nrm, NORMALIZE)
    p = tl.load(pos_ptr + rows, mask=rmask, other=-1)
    e = tl.load(excl_ptr + rows, mask=rmask, other=-1)
    w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
    lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
    it = tl.load(inv_temp_ptr).to(tl.float32)
    scale = it * 1.4426950408889634
    dcols = cid * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    dot = tl.zeros([BLOCK_M], dtype=tl.float32)
    for j0 in range(0, Cn, BLOCK_N):
        cols = j0 + tl.arange(0, BLOCK_N).to(tl.int64)
        cmask = cols < Cn
        rj = _rinv(tl.load(yn_ptr + cols, mask=cmask, other=1.0), NORMALIZE)
        s = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        s = _dot_tile(x_ptr, y_ptr, stride_x, stride_y, rows, cols, rmask, cmask, d, s, BLOCK_K, UPCAST, IEEE)
        s2 = s * ri[:, None] * rj[None, :] * scale
        keep = rmask[:, None] & cmask[None, :] & (cols[None, :] != e[:, None])
        pr = tl.where(keep, tl.exp2(s2 - lse2[:, None]), 0.0)
        wm = w[:, None] * (pr - tl.where(cols[None, :] == p[:, None], 1.0, 0.0))
        wm = tl.where(rmask[:, None] & cmask[None, :], wm, 0.0)
        dot += tl.sum(tl.where(keep | (cols[None, :] == p[:, None]), wm * s2, 0.0), axis=1)
        yj = tl.load(y_ptr + cols[:, None] * stride_y + dcols[None, :], mask=cmask[:, None] & dmask[None, :],
                     other=0.0)
        acc = _mma(wm * rj[None, :], yj.to(tl.float32), acc, False, IEEE)
    g = acc * it
    xa = tl.load(x_ptr + rows[:, None] * stride_x + dcols[None, :], mask=rmask[:, None] & dmask[None, :],
                 other=0.0).to(tl.float32)
    gzn = dot * 0.6931471805599453  # <a_i, G_i> = sum_j W_ij S_ij from the logits (fp32)
    if SINGLE:  # the whole d in this chunk: <a_i, G_i> from G itself, so that it cancels exactly in dx
        dotn = tl.sum(xa * ri[:, None] * g, axis=1)
    else:  # this program holds one D-chunk of G only
        dotn = gzn
    if NORMALIZE:
        a = xa * ri[:, None]
        dx = tl.where((nrm > 1e-12)[:, None], (g - a * dotn[:, None]) * ri[:, None], g * ri[:, None])
    else:
        dx = g
    tl.store(dx_ptr + rows[:, None] * d + dcols[None, :], dx, mask=rmask[:, None] & dmask[None, :])
    if cid == 0:
        tl.store(gz_ptr + pid, tl.sum(tl.where(rmask, gzn, 0.0), axis=0))


@triton.jit
def _rect_bwd_cols_kernel(
    x_ptr, y_ptr, xn_ptr, yn_ptr, pos_ptr, excl_ptr, w_ptr, lse_ptr, inv_temp_ptr, dy_ptr,
    stride_x, stride_y,
    R, grad_cols, d,
    NORMALIZE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    BLOCK_D: tl.constexpr, SINGLE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    pid = tl.program_id(0).to(tl.int64)
    cid = tl.program_id(1)
    cols = pid * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    cmask = cols < grad_cols
    nrm = tl.load(yn_ptr + cols, mask=cmask, other=1.0)
    rj = _rinv(nrm, NORMALIZE)
    it = tl.load(inv_temp_ptr).to(tl.float32)
    scale = it * 1.4426950408889634
    dcols = cid * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    acc = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dot = tl.zeros([BLOCK_N], dtype=tl.float32)
    for i0 in range(0, R, BLOCK_M):
        rows = i0 + tl.arange(0, BLOCK_M).to(tl.int64)
        rmask = rows < R
        ri = _rinv(tl.load(xn_ptr + rows, mask=rmask, other=1.0), NORMALIZE)
        p = tl.load(pos_ptr + rows, mask=rmask, other=-1)
        e = tl.load(excl_ptr + rows, mask=rmask, other=-1)
        w = tl.load(w_ptr + rows, mask=rmask, other=0.0).to(tl.float32)
        lse2 = tl.load(lse_ptr + rows, mask=rmask, other=0.0) * 1.4426950408889634
        s = tl.zeros([BLOCK_N, BLOCK_M], dtype=tl.float32)
        s = _dot_tile(y_ptr, x_ptr, stride_y, stride_x, cols, rows, cmask, rmask, d, s, BLOCK_K, UPCAST, IEEE)
        s2 = s * rj[:, None] * ri[None, :] * scale
        both = cmask[:, None] & rmask[None, :]
        keep = both & (cols[:, None] != e[None, :])
        pr = tl.where(keep, tl.exp2(s2 - lse2[None, :]), 0.0)
        ispos = cols[:, None] == p[None, :]
        wt = tl.where(both, w[None, :] * (pr - tl.where(ispos, 1.0, 0.0)), 0.0)
        dot += tl.sum(tl.where(keep | ispos, wt * s2, 0.0), axis=1)
        xi = tl.load(x_ptr + rows[:, None] * stride_x + dcols[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0)
        acc = _mma(wt * ri[None, :], xi.to(tl.float32), acc, False, IEEE)
    g = acc * it
    yc = tl.load(y_ptr + cols[:, None] * stride_y + dcols[None, :], mask=cmask[:, None] & dmask[None, :],
                 other=0.0).to(tl.float32)
    if SINGLE:
        dotn = tl.sum(yc * rj[:, None] * g, axis=1)
    else:
        dotn = dot * 0.6931471805599453
    if NORMALIZE:
        c = yc * rj[:, None]
        dy = tl.where((nrm > 1e-12)[:, None], (g - c * dotn[:, None]) * rj[:, None], g * rj[:, None])
    else:
        dy = g
    tl.store(dy_ptr + cols[:, None] * d + dcols[None, :], dy, mask=cmask[:, None] & dmask[None, :])


def _rect_config(d: int, dtype: torch.dtype) -> dict:
    """Tiles of the rectangular kernels (a first table, not tuned on a GPU yet)."""
    dp = _pow2(d)
    # backward: 8 warps (with 4, sm_90 needs 250-255 registers for the 64 x 128 fp32 accumulator and the
    # column kernel spills; measured with scripts/check_triton_compile.py)
    if dtype == torch.float32:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=min(dp, 32), BLOCK_D=min(dp, 64), num_warps=4, bwd_warps=8)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=min(dp, 64), BLOCK_D=min(dp, 128), num_warps=4, bwd_warps=8)
    return _override("infonce_rect", cfg)


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


def rect_forward(rows, cands, pos, excl, inv_temp, normalize):
    """[terms (R), lse (R), row norms (R), candidate norms (Cn)], fp32."""
    rows, cands = _rect_inputs(rows, cands)
    r, d = rows.shape
    cn = cands.shape[0]
    cfg = _rect_config(d, rows.dtype)
    with _device_ctx(rows):
        xn = torch.linalg.vector_norm(rows, dim=1, dtype=torch.float32)
        yn = torch.linalg.vector_norm(cands, dim=1, dtype=torch.float32)
        terms = torch.empty(r, dtype=torch.float32, device=rows.device)
        lse = torch.empty(r, dtype=torch.float32, device=rows.device)
        _rect_fwd_kernel[(triton.cdiv(r, cfg["BLOCK_M"]),)](
            rows, cands, xn, yn, pos, excl, inv_temp, terms, lse, rows.stride(0), cands.stride(0), r, cn, d,
            NORMALIZE=bool(normalize), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"], BLOCK_K=cfg["BLOCK_K"],
            num_warps=cfg["num_warps"], **_flags(rows))
    return [terms, lse, xn, yn]


def rect_backward(w, rows, cands, row_norms, cand_norms, lse, pos, excl, inv_temp, normalize, grad_cols):
    """[dx (R, d), dy (grad_cols, d), gz (0-dim)], fp32 (normalization backward applied)."""
    rows, cands = _rect_inputs(rows, cands)
    r, d = rows.shape
    cn = cands.shape[0]
    cfg = _rect_config(d, rows.dtype)
    common = dict(NORMALIZE=bool(normalize), BLOCK_M=cfg["BLOCK_M"], BLOCK_N=cfg["BLOCK_N"],
                  BLOCK_K=cfg["BLOCK_K"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["bwd_warps"], **_flags(rows))
    chunks = triton.cdiv(d, cfg["BLOCK_D"])
    common["SINGLE"] = chunks == 1
    w = w.to(torch.float32).contiguous()
    with _device_ctx(rows):
        dx = torch.empty((r, d), dtype=torch.float32, device=rows.device)
        dy = torch.empty((grad_cols, d), dtype=torch.float32, device=rows.device)
        nrb = triton.cdiv(r, cfg["BLOCK_M"])
        gz_part = torch.empty(nrb, dtype=torch.float32, device=rows.device)
        _rect_bwd_rows_kernel[(nrb, chunks)](
            rows, cands, row_norms, cand_norms, pos, excl, w, lse, inv_temp, dx, gz_part,
            rows.stride(0), cands.stride(0), r, cn, d, **common)
        if grad_cols > 0:
            _rect_bwd_cols_kernel[(triton.cdiv(grad_cols, cfg["BLOCK_N"]), chunks)](
                rows, cands, row_norms, cand_norms, pos, excl, w, lse, inv_temp, dy,
                rows.stride(0), cands.stride(0), r, grad_cols, d, **common)
        gz = gz_part.sum()
    return [dx, dy, gz]
