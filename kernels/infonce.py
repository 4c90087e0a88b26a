"""Triton kernels of InfoNCE / NT-Xent: tiled logits, fp32 max-shifted log-sum-exp, tiles recomputed in
the backward; the (2N, 2N) logit matrix never exists in memory.

Notation. Two sources of N rows each, x^(0) and x^(1) (z1, z2 for NT-Xent; q, k cross-view), of which the
first d columns are used (a column slice is read in place through the row stride). Row k of source s has
global index k + s N.
    r_k   = 1 / max(|x_k|, eps)  (eps = 1e-12, F.normalize)   or 1 when normalize = False
    z_k   = r_k x_k                                           (D-vectors, never stored)
    c_kj  = <z_k, z_j> = <x_k, x_j> r_k r_j                   (cosines; raw dots when normalize = False)
    S     = c / T,  base-2 logits  s2 = S log2(e)             (exp2 / log2 throughout, one multiply)

NT-Xent (SimCLR). Z = [z1; z2] (M x d, M = 2N, never concatenated: each tile reads one source),
S = Z Z^T / T (M x M), S_kk = -inf, p(k) = (k + N) mod M:
    lse_k = logsumexp_j S_kj,   L = (1/M) sum_k (lse_k - S_k,p(k)).
  Gradient. P_kj = exp(S_kj - lse_k) (0 on the diagonal), Y_kj = [j == p(k)], dL/dS = g (P - Y) / M with
  g the upstream gradient, and since S = Z Z^T / T and S^T = S:
    G = dL/dZ = (dL/dS + dL/dS^T) Z / T = g / (M T) [ A Z - 2 Z_p ],   A_kj = P_kj + P_jk     (M x d)
  where P_jk = exp(S_kj - lse_j): ONE recomputed logit tile gives both the row term (lse of its rows)
  and the column term (lse of its columns) of A.
Cross-view InfoNCE. S = Q K^T / T (N x N), row lse r_i, column lse c_j, (a, b) = (1, 0) one-way or
(1/2, 1/2) symmetric:
    L = a/N sum_i (r_i - S_ii) + b/N sum_j (c_j - S_jj),
    dL/dS = g [ a/N (P^row - I) + b/N (P^col - I) ],  P^row_ij = exp(S_ij - r_i), P^col_ij = exp(S_ij - c_j)
    dQ = dL/dS K / T = g / (N T) [ (a P^row + b P^col) K - (a + b) K ]         (N x d)
    dK = dL/dS^T Q / T: the same expression with (q, k), (r, c) and (a, b) swapped.
  Both losses are one backward form, for the rows k of one side against the columns j of the other:
    G_k = coef [ sum_j (W_ROW e^{S_kj - lse_k} + W_COL e^{S_kj - lse_j}) z_j - (W_ROW + W_COL) z_p(k) ]
  coef = g / (L T) (L = M or N), (W_ROW, W_COL) = (1, 1) NT-Xent, (a, b) for dQ, (b, a) for dK.
Normalization backward (F.normalize): dx_k = (G_k - z_k <z_k, G_k>) r_k if |x_k| > eps, else G_k / eps;
  dx = G when normalize = False. Columns d..D of dx are zero.
  <z_k, G_k> needs no pass over d: <z_k, G_k> = coef [ sum_j A_kj c_kj - (W_ROW + W_COL) c_k,p(k) ],
  accumulated from the cosines of the tiles the program recomputes anyway. Hence a program that owns
  only a D-chunk of G_k still finishes dx_k itself (no second pass over d).
Temperature: gz = sum_k <z_k, G_k> (over both views for NT-Xent, over the queries cross-view) is returned;
  ssl_fast.ops.infonce turns it into dL/dT (the logits are bilinear in z).

Kernels (statistics fp32, masks -inf, block offsets int64 scalars folded into the base pointers, in-tile
offsets int32; inv_temp and the upstream gradient are loaded in the kernels: no host sync anywhere):
  _prep_kernel      grid (cdiv(N, 16),): |x_k| of both sources and the positive cosine c_k,p(k) = <z_k, z'_k>,
                    one pass over the 2 N d inputs (the fused normalization pre-pass; r_k is recomputed from
                    |x_k| wherever needed, z is never stored).
  _fwd_kernel       one logit tile B x B per program (a GEMM grid): S tile over d in BLOCK_K steps (tensor
                    cores), scaled by r_i r_j / T, then the base-2 LSE of each row of the tile and, when asked,
                    of each column, stored as partial LSEs part[slot, k] (fp32).
                    NT-Xent: only the nb (nb + 1) / 2 tiles I <= J of the upper triangle (nb = 2 cdiv(N, B)
                    blocks, a block never straddles z1 / z2): the rows of tile (I, J) give part[J, rows of I]
                    and, S being symmetric, its columns give part[I, rows of J]. Every (slot, row) entry is
                    written exactly once, so no atomics, no memset, deterministic results.
                    Cross-view: the full cdiv(N, B)^2 grid; column partials only when symmetric.
                    Used while its nslots (2 cdiv(N, B) NT-Xent, cdiv(N, B) cross-view) <= SLOT_CAP = max(64, d).
  _fwd_grouped_kernel  (above SLOT_CAP) grid (row blocks, G): program (I, g) sweeps a contiguous group of
                    column blocks in a loop (same K loop, masks and logits as _fwd_kernel), keeps a running fp32
                    (max, sum) per row and writes ONE partial part[g, row]: rows only. NT-Xent: one launch over
                    the full M x M (diagonal masked). Cross-view: Q K^T rows into part[:, :N]; symmetric adds a
                    launch with q and k swapped, whose rows are the column statistics (part[:, N:2N]).
                    G = cdiv(2 SMs, row blocks) clamped to [1, SLOT_CAP] (~2 waves), no empty group.
  _finalize_kernel  grid (cdiv(rows, 128),): lse_k = logsumexp over the nslots (or G) of part[:, k], the per-row loss
                    terms, one partial sum per program;  _sum_kernel (one program) adds the partials in a
                    fixed order: the loss is computed and reduced on the device.
  _bwd_kernel       grid (row blocks, D-chunks, column pieces): program (I, c, s) owns rows I and the D-chunk c
                    of G. It sweeps the column blocks J of its piece: recomputes S_IJ over the full d, forms
                    A = W_ROW exp2(s2 - lse2_I) + W_COL exp2(s2 - lse2_J) (two exps of one tile; diagonal and
                    padding masked with -inf), accumulates acc += A diag(r_J) X_J[:, c] on tensor cores (fp32
                    accumulator BLOCK_M x BLOCK_D in registers) and sum_j A c; then subtracts the positive,
                    applies the normalization backward and writes dx[:, c] in the input dtype.
                    NT-Xent: one launch over the 2 cdiv(N, BLOCK_M) row blocks. Cross-view: two launches
                    (dQ; dK with the roles swapped).
                    Column pieces: 1 (the program finishes dx itself) unless rows x D-chunks give under two
                    waves; then each piece stores its fp32 partial acc / sum_j A c in a workspace and
                    _bwd_epilogue_kernel adds them in a fixed order and finishes dx (deterministic).

Cost model (MACs; M = 2N rows for NT-Xent, n = N cross-view; B_M = BLOCK_M; bytes for 16-bit inputs):
  forward   per-tile: NT-Xent 0.5 M^2 d (half the tiles: symmetry), M^2 exps; cross-view N^2 d, N^2 exps
            (2 N^2 symmetric). Grouped (rows only, no symmetry): NT-Xent M^2 d, cross-view N^2 d (2 N^2 d
            symmetric: two launches); the same exps. L2 reads 2 B d bytes per B^2 d MACs (B = 128: 1/64
            byte per MAC) in both. Extra memory O(N d): part is nslots x 2N fp32 with nslots <= SLOT_CAP =
            max(64, d), i.e. <= 8 N max(64, d) bytes (per-tile at M = 16384, B = 128, d = 128: 128 slots,
            8 MiB; grouped at M = 65536: G = 1, 256 KiB, where per-tile would need 128 MiB), + O(N) stats.
            Eager torch: M^2 d and the M x M logits in memory (and 2 M^2 d with the backward's GEMMs).
  backward  per launch, nc = cdiv(d, BLOCK_D) D-chunks: (nc + 1) n^2 d = nc recomputes of S + the gradient
            GEMM; exps (1 or 2) n^2 nc. NT-Xent: one launch over M rows; cross-view: two over N rows.
    d <= 128, bf16/fp16: nc = 1, 2 n^2 d. X_I resident on chip (128 x d), each X_J tile (64 x d) loaded once
            and used by both GEMMs: 1/128 byte of L2 traffic per MAC. SimCLR (128), MoCo / BYOL heads.
    d > 128, bf16/fp16: the 128 x d fp32 accumulator no longer fits in registers (at d = 2048 it would be 1 MiB),
            so the OUTPUT is split in D-chunks of 256 (grid axis 1) and every chunk program recomputes S over
            the full d with a K loop (64-wide steps): (1 + cdiv(d, 256)) n^2 d = 2 n^2 d at d = 256, 3 at 512,
            4 at 768, 9 at 2048, with X_I and X_J re-read from L2 at every step (3/64 byte per MAC: L2-bound
            rather than tensor-bound on H100). No workspace and no atomics in exchange.
    fp32:   IEEE fp32 dots run on FMA units (no tensor cores) unless TF32 is allowed (see dtypes); 64 x 32
            tiles, D-chunks of 128: (1 + cdiv(d, 128)) n^2 d.
  Parallelism: the backward has (rows / B_M) x nc programs before splitting the column sweep; it is split
  into up to 2 x SMs / programs pieces (workspace pieces x rows x d x 4 bytes, <= ~17 MiB at d = 128 on H100).
Not done, on purpose:
  * Symmetric backward for NT-Xent (tile (I, J) also serving rows J: 1.5 M^2 d instead of 2 M^2 d and half
    the exps) needs either atomics on a fp32 M x d workspace (B d atomic adds per tile for 3 B^2 d MACs:
    L2-atomic-bound on H100, and non-deterministic) or the CPU kernel's round schedule (nb launches of under
    one wave each). At d <= 128 the saving is 25% of the MACs, not worth either; in the forward the per-tile
    partial LSEs make symmetry free, so it is used there.
  * For d >= 512 at large n, materializing A in row strips (a workspace of R x M) followed by a plain GEMM
    would bring the backward to ~2 n^2 d + 4 R M bytes; the recompute design is 1.5x (d = 512) to 4.5x
    (d = 2048) more MACs than that.
Precision: statistics, logits and accumulators are fp32; P = exp2(s2 - lse2) comes from a stored LSE, so its
  relative error is ~ulp(|S|) (as in flash attention) where eager's max-shifted softmax is exact at the row
  maximum: with huge raw logits (normalize = False, |S| in the hundreds) fp32 gradients are up to ~10x (the
  temperature gradient ~100x) further from float64 than eager fp32, still ~1e-6 relative. bf16 / fp16 are
  closer to float64 than eager in the same dtype (fp32 statistics; P rounded to the input dtype for the
  gradient GEMM, as eager rounds its softmax).
dtypes: float32, bfloat16, float16 (float64 raises TypeError: use backend="cpp" or "torch"). bf16/fp16 go to
  tensor cores with fp32 accumulation; float32 uses IEEE fp32 dots unless torch's
  float32_matmul_precision is "high" / "medium" (then TF32, like eager matmul under the same setting).
Interpreter (TRITON_INTERPRET=1): same block sizes as on the GPU; bf16 dot operands are upcast to fp32 there
  only (the interpreter's tl.dot returns garbage on bf16; measured with triton 3.8), so on a GPU bf16 goes
  straight to tensor cores.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .infonce_common import _DTYPES, _device_ctx, _dot_tile, _flags, _interpreting, _mma, _pow2, _rinv
from .tuning import override as _override  # the tile sweep's per-launch overrides (bench/tune.py)


# ----------------------------------------------------------------------------------------------------
# pre-pass: norms and positive cosines


@triton.jit
def _prep_kernel(
    a_ptr, b_ptr, nrm_ptr, cos_ptr,
    stride_a, stride_b,
    N, d,
    NORMALIZE: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """nrm[k] = |a_k|, nrm[N + k] = |b_k| (first d columns), cos[k] = <a_k, b_k> r_a r_b (fp32)."""
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    rmask = rows < N
    saa = tl.zeros([BLOCK_R], dtype=tl.float32)
    sbb = tl.zeros([BLOCK_R], dtype=tl.float32)
    sab = tl.zeros([BLOCK_R], dtype=tl.float32)
    for k0 in range(0, d, BLOCK_D):
        cols = k0 + tl.arange(0, BLOCK_D)
        m = rmask[:, None] & (cols < d)[None, :]
        a = tl.load(a_ptr + rows[:, None] * stride_a + cols[None, :], mask=m, other=0.0).to(tl.float32)
        b = tl.load(b_ptr + rows[:, None] * stride_b + cols[None, :], mask=m, other=0.0).to(tl.float32)
        saa += tl.sum(a * a, axis=1)
        sbb += tl.sum(b * b, axis=1)
        sab += tl.sum(a * b, axis=1)
    na = tl.sqrt(saa)
    nb = tl.sqrt(sbb)
    tl.store(nrm_ptr + rows, na, mask=rmask)
    tl.store(nrm_ptr + N + rows, nb, mask=rmask)
    tl.store(cos_ptr + rows, sab * _rinv(na, NORMALIZE) * _rinv(nb, NORMALIZE), mask=rmask)


# ----------------------------------------------------------------------------------------------------
# forward: one logit tile per program -> partial LSEs


@triton.jit
def _fwd_kernel(
    x0_ptr, x1_ptr, nrm_ptr, inv_temp_ptr, part_ptr,
    stride_x0, stride_x1, stride_part,
    N, d, nb1,
    NTXENT: tl.constexpr, COL_STATS: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Tile (I, J) of global row blocks (block b < nb1 in source 0, else source 1):
    part[slot J, rows of I] = base-2 LSE of each tile row; with COL_STATS part[I, rows of J] = base-2 LSE of
    each tile column. NT-Xent: upper-triangle tiles I <= J, diagonal masked. Cross-view: I < nb1 <= J.
    Block offsets are int64 scalars folded into the base pointers; in-tile offsets are int32."""
    t = tl.program_id(0).to(tl.int64)
    if NTXENT:
        # t -> (a, b), b <= a, t = a (a + 1) / 2 + b; fp32 sqrt is off by at most one, corrected.
        a = ((tl.sqrt((8 * t + 1).to(tl.float32)) - 1.0) * 0.5).to(tl.int64)
        a = tl.where(a * (a + 1) // 2 > t, a - 1, a)
        a = tl.where((a + 1) * (a + 2) // 2 <= t, a + 1, a)
        bi = t - a * (a + 1) // 2
        bj = a
        slot_r = bj
    else:
        bi = t // nb1
        bj = nb1 + t % nb1
        slot_r = bj - nb1
    seg_i = bi // nb1
    seg_j = bj // nb1
    row0 = (bi - seg_i * nb1) * BLOCK  # first local row of the tile (int64)
    col0 = (bj - seg_j * nb1) * BLOCK
    ar = tl.arange(0, BLOCK)
    rmask = ar < (N - row0).to(tl.int32)
    cmask = ar < (N - col0).to(tl.int32)
    stride_i = tl.where(seg_i == 0, stride_x0, stride_x1)
    stride_j = tl.where(seg_j == 0, stride_x0, stride_x1)
    xi_ptr = tl.where(seg_i == 0, x0_ptr, x1_ptr) + row0 * stride_i
    xj_ptr = tl.where(seg_j == 0, x0_ptr, x1_ptr) + col0 * stride_j

    acc = _dot_tile(xi_ptr, xj_ptr, stride_i, stride_j, ar, ar, rmask, cmask, d,
                    tl.zeros([BLOCK, BLOCK], dtype=tl.float32), BLOCK_K, UPCAST, IEEE)

    scale2 = tl.load(inv_temp_ptr).to(tl.float32) * 1.4426950408889634
    ri = _rinv(tl.load(nrm_ptr + seg_i * N + row0 + ar, mask=rmask, other=1.0), NORMALIZE)
    rj = _rinv(tl.load(nrm_ptr + seg_j * N + col0 + ar, mask=cmask, other=1.0), NORMALIZE)
    s2 = (acc * ri[:, None] * rj[None, :]) * scale2  # the backward's rounding order: same logits, same dot
    valid = rmask[:, None] & cmask[None, :]
    if NTXENT:
        valid = valid & ((bi * BLOCK + ar)[:, None] != (bj * BLOCK + ar)[None, :])  # block-shaped, no scalar
    s2 = tl.where(valid, s2, float("-inf"))

    # rows: a row whose every entry is masked (a 1-row diagonal tile) gets -inf, never NaN
    m = tl.max(s2, axis=1)
    m = tl.where(m == float("-inf"), 0.0, m)
    l = tl.sum(tl.exp2(s2 - m[:, None]), axis=1)  # >= 1 unless the row is empty (its max gives exp2(0))
    lse_r = tl.where(l > 0.0, m + tl.log2(tl.maximum(l, 1.0)), float("-inf"))
    tl.store(part_ptr + slot_r * stride_part + seg_i * N + row0 + ar, lse_r, mask=rmask)
    if COL_STATS:
        mc = tl.max(s2, axis=0)
        mc = tl.where(mc == float("-inf"), 0.0, mc)
        lc = tl.sum(tl.exp2(s2 - mc[None, :]), axis=0)
        lse_c = tl.where(lc > 0.0, mc + tl.log2(tl.maximum(lc, 1.0)), float("-inf"))
        # the diagonal tile of NT-Xent is symmetric: its rows already gave these statistics. A branch, not
        # a mask: a scalar condition combined with a block mask is an int32 mask to triton 3.9's interpreter.
        if bi != bj:
            tl.store(part_ptr + bi * stride_part + seg_j * N + col0 + ar, lse_c, mask=cmask)


@triton.jit
def _fwd_grouped_kernel(
    r0_ptr, r1_ptr, c0_ptr, c1_ptr, nrm_ptr, inv_temp_ptr, part_ptr,
    stride_r0, stride_r1, stride_c0, stride_c1, stride_part,
    N, d, row_base, col_base, jpg,
    NSEG: tl.constexpr, SELF_MASK: tl.constexpr, NORMALIZE: tl.constexpr,
    BLOCK: tl.constexpr, BLOCK_K: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (I, g): rows of block I (row source I // cdiv(N, BLOCK) of NSEG) against the column blocks
    [g jpg, (g + 1) jpg) of the NSEG cdiv(N, BLOCK) column blocks (column sources c0, c1), swept in a loop
    with a running fp32 (max, sum) per row: part[g, row_base + s N + k] = base-2 LSE of row k over the
    group. Norms of row source s at nrm[row_base + s N + k], of column source t at nrm[col_base + t N + j].
    SELF_MASK (NT-Xent, rows = columns): the diagonal is -inf. Rows only: no column statistics."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_g = tl.program_id(1).to(tl.int64)
    nb = tl.cdiv(N, BLOCK)
    seg = pid_m // nb
    row0 = (pid_m - seg * nb) * BLOCK  # int64, folded into the base pointer
    ar = tl.arange(0, BLOCK)
    rmask = ar < (N - row0).to(tl.int32)
    stride_r = tl.where(seg == 0, stride_r0, stride_r1)
    xr_ptr = tl.where(seg == 0, r0_ptr, r1_ptr) + row0 * stride_r
    rstat = row_base + seg * N + row0

    scale2 = tl.load(inv_temp_ptr).to(tl.float32) * 1.4426950408889634
    ri = _rinv(tl.load(nrm_ptr + rstat + ar, mask=rmask, other=1.0), NORMALIZE)
    m_i = tl.full([BLOCK], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK], dtype=tl.float32)
    for jb in range(pid_g * jpg, tl.minimum(pid_g * jpg + jpg, NSEG * nb)):
        cseg = jb // nb
        col0 = (jb - cseg * nb) * BLOCK  # int64
        cmask = ar < (N - col0).to(tl.int32)
        stride_c = tl.where(cseg == 0, stride_c0, stride_c1)
        xc_ptr = tl.where(cseg == 0, c0_ptr, c1_ptr) + col0 * stride_c
        acc = _dot_tile(xr_ptr, xc_ptr, stride_r, stride_c, ar, ar, rmask, cmask, d,
                        tl.zeros([BLOCK, BLOCK], dtype=tl.float32), BLOCK_K, UPCAST, IEEE)
        rj = _rinv(tl.load(nrm_ptr + col_base + cseg * N + col0 + ar, mask=cmask, other=1.0), NORMALIZE)
        s2 = (acc * ri[:, None] * rj[None, :]) * scale2  # the same rounding order as _fwd_kernel / backward
        valid = rmask[:, None] & cmask[None, :]
        if SELF_MASK:
            valid = valid & ((pid_m * BLOCK + ar)[:, None] != (jb * BLOCK + ar)[None, :])
        s2 = tl.where(valid, s2, float("-inf"))
        # online base-2 LSE; an all -inf row so far keeps (m, l) = (-inf, 0), never NaN
        m_new = tl.maximum(m_i, tl.max(s2, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l_i = l_i * tl.exp2(m_i - m_safe) + tl.sum(tl.exp2(s2 - m_safe[:, None]), axis=1)
        m_i = m_new
    lse = tl.where(l_i > 0.0, m_i + tl.log2(tl.maximum(l_i, 1.0)), float("-inf"))  # l >= 1 when finite
    tl.store(part_ptr + pid_g * stride_part + rstat + ar, lse, mask=rmask)


@triton.jit
def _finalize_kernel(
    part_ptr, cos_ptr, inv_temp_ptr, lse_ptr, loss_part_ptr,
    stride_part, nslots, N, L, w0, w1,
    BLOCK_R: tl.constexpr, BLOCK_S: tl.constexpr,
):
    """lse[k] = ln 2 * log2sumexp2_s part[s, k] for k < L; loss_part[pid] = sum_k w(k) (lse_k - S_k,p(k)) with
    w = w0 for k < N (source 0 rows), w1 for N <= k < 2N (source 1 rows / columns)."""
    pid = tl.program_id(0).to(tl.int64)
    k = pid * BLOCK_R + tl.arange(0, BLOCK_R)
    kmask = k < L
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_R], dtype=tl.float32)
    for s0 in range(0, nslots, BLOCK_S):
        s = s0 + tl.arange(0, BLOCK_S)
        v = tl.load(part_ptr + s[:, None].to(tl.int64) * stride_part + k[None, :],
                    mask=(s < nslots)[:, None] & kmask[None, :], other=float("-inf"))
        mn = tl.maximum(m, tl.max(v, axis=0))
        mn_safe = tl.where(mn == float("-inf"), 0.0, mn)
        l = l * tl.exp2(m - mn_safe) + tl.sum(tl.exp2(v - mn_safe[None, :]), axis=0)
        m = mn
    lse = tl.where(l > 0.0, m + tl.log2(tl.maximum(l, 1e-30)), float("-inf")) * 0.6931471805599453
    tl.store(lse_ptr + k, lse, mask=kmask)
    inv_temp = tl.load(inv_temp_ptr).to(tl.float32)
    kk = tl.where(k < N, k, k - N)
    pos = tl.load(cos_ptr + kk, mask=kmask, other=0.0) * inv_temp
    w = tl.where(k < N, w0, w1)
    term = tl.where(kmask, w * (lse - pos), 0.0)
    tl.store(loss_part_ptr + pid, tl.sum(term, axis=0))


@triton.jit
def _sum_kernel(x_ptr, out_ptr, n, BLOCK: tl.constexpr):
    """out = sum(x[:n]) by one program, in a fixed order (deterministic)."""
    acc = tl.zeros([BLOCK], dtype=tl.float32)
    for i0 in range(0, n, BLOCK):
        i = i0 + tl.arange(0, BLOCK)
        acc += tl.load(x_ptr + i, mask=i < n, other=0.0)
    tl.store(out_ptr, tl.sum(acc, axis=0))


# ----------------------------------------------------------------------------------------------------
# backward: program (row block, D-chunk), recomputed tiles


@triton.jit
def _bwd_finish(
    acc, rowdot, am, rmask, dcols, dmask, row0, seg, pid_m, pid_d,
    r0_ptr, r1_ptr, c0_ptr, c1_ptr, o0_ptr, o1_ptr,
    nrm_ptr, cos_ptr, inv_temp_ptr, grad_ptr, gz_part_ptr,
    stride_r0, stride_r1, stride_c0, stride_c1, stride_o0, stride_o1,
    N, row_base, col_base, inv_count,
    NSEG: tl.constexpr, W_ROW: tl.constexpr, W_COL: tl.constexpr, NORMALIZE: tl.constexpr,
    WRITE_GZ: tl.constexpr,
):
    """From acc = sum_j A_kj r_j x_j[chunk] and rowdot = sum_j A_kj c_kj of rows row0 + am of row source seg:
    G = coef (acc - (W_ROW + W_COL) z_p), <z, G>, the normalization backward, dx stored in the input dtype,
    and sum_k <z_k, G_k> of the block into gz_part[pid_m] (by the chunk-0 program)."""
    pseg = (seg + 1) % NSEG  # the positive of row k of row source s: row k of column source (s + 1) % NSEG
    stride_p = tl.where(pseg == 0, stride_c0, stride_c1)
    xp_ptr = tl.where(pseg == 0, c0_ptr, c1_ptr) + row0 * stride_p
    rinv_p = _rinv(tl.load(nrm_ptr + col_base + pseg * N + row0 + am, mask=rmask, other=1.0), NORMALIZE)
    m2 = rmask[:, None] & dmask[None, :]
    xp = tl.load(xp_ptr + am[:, None] * stride_p + dcols[None, :], mask=m2, other=0.0)
    cpos = tl.load(cos_ptr + row0 + am, mask=rmask, other=0.0)
    coef = tl.load(grad_ptr).to(tl.float32) * tl.load(inv_temp_ptr).to(tl.float32) * inv_count
    wpos = W_ROW + W_COL
    g = coef * (acc - wpos * (xp.to(tl.float32) * rinv_p[:, None]))
    gdot = coef * (rowdot - wpos * cpos)  # <z_k, G_k>
    if NORMALIZE:
        stride_r = tl.where(seg == 0, stride_r0, stride_r1)
        xr_ptr = tl.where(seg == 0, r0_ptr, r1_ptr) + row0 * stride_r
        nr = tl.load(nrm_ptr + row_base + seg * N + row0 + am, mask=rmask, other=1.0)
        rinv_r = _rinv(nr, NORMALIZE)
        zr = tl.load(xr_ptr + am[:, None] * stride_r + dcols[None, :], mask=m2, other=0.0).to(tl.float32)
        zr = zr * rinv_r[:, None]
        dx = tl.where((nr > 1e-12)[:, None], (g - zr * gdot[:, None]) * rinv_r[:, None], g * rinv_r[:, None])
    else:
        dx = g
    stride_o = tl.where(seg == 0, stride_o0, stride_o1)
    o_ptr = tl.where(seg == 0, o0_ptr, o1_ptr) + row0 * stride_o
    tl.store(o_ptr + am[:, None] * stride_o + dcols[None, :], dx.to(o0_ptr.dtype.element_ty), mask=m2)
    if WRITE_GZ:
        if pid_d == 0:  # a branch, not a scalar mask (see _fwd_kernel)
            tl.store(gz_part_ptr + pid_m, tl.sum(tl.where(rmask, gdot, 0.0), axis=0))


@triton.jit
def _bwd_kernel(
    r0_ptr, r1_ptr, c0_ptr, c1_ptr, o0_ptr, o1_ptr,
    nrm_ptr, lse_ptr, cos_ptr, inv_temp_ptr, grad_ptr, gz_part_ptr, ws_ptr, wsd_ptr,
    stride_r0, stride_r1, stride_c0, stride_c1, stride_o0, stride_o1,
    N, d, row_base, col_base, inv_count, jps, ws_stride,
    NSEG: tl.constexpr, SELF_MASK: tl.constexpr, W_ROW: tl.constexpr, W_COL: tl.constexpr,
    NORMALIZE: tl.constexpr, FOLD_RINV: tl.constexpr, WRITE_GZ: tl.constexpr, SPLIT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, BLOCK_D: tl.constexpr,
    SINGLE: tl.constexpr, UPCAST: tl.constexpr, IEEE: tl.constexpr,
):
    """Program (pid0, pid1, pid2): rows of block pid0 (row source pid0 // cdiv(N, BLOCK_M) of NSEG), the
    D-chunk [pid1 BLOCK_D, (pid1 + 1) BLOCK_D), column blocks [pid2 jps, (pid2 + 1) jps) of the
    NSEG cdiv(N, BLOCK_N) column blocks (column sources c0, c1). Norms / LSEs of row source s at
    nrm[row_base + s N + k], of column source t at nrm[col_base + t N + j] (the same layout in lse).
    SPLIT: the partial acc / rowdot go to ws[pid2, s N + k, :d] / wsd[pid2, s N + k] (ws_stride = NSEG N d)
    for _bwd_epilogue_kernel;
    otherwise the program finishes dx itself. SINGLE: d <= BLOCK_K = BLOCK_D, one K step, X_I loaded once
    per program and each X_J tile once, used by both GEMMs."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    pid_s = tl.program_id(2)
    nbm = tl.cdiv(N, BLOCK_M)
    nbn = tl.cdiv(N, BLOCK_N)
    seg = pid_m // nbm
    row0 = (pid_m - seg * nbm) * BLOCK_M  # int64, folded into the base pointers
    am = tl.arange(0, BLOCK_M)
    an = tl.arange(0, BLOCK_N)
    rmask = am < (N - row0).to(tl.int32)
    stride_r = tl.where(seg == 0, stride_r0, stride_r1)
    xr_ptr = tl.where(seg == 0, r0_ptr, r1_ptr) + row0 * stride_r
    rstat = row_base + seg * N + row0  # offset of the rows' norms / LSEs
    dt = c0_ptr.dtype.element_ty

    scale2 = tl.load(inv_temp_ptr).to(tl.float32) * 1.4426950408889634
    rinv_r = _rinv(tl.load(nrm_ptr + rstat + am, mask=rmask, other=1.0), NORMALIZE)
    if W_ROW != 0.0:
        lse_r2 = tl.load(lse_ptr + rstat + am, mask=rmask, other=0.0) * 1.4426950408889634
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    if SINGLE:
        xr = tl.load(xr_ptr + am[:, None] * stride_r + dcols[None, :], mask=rmask[:, None] & dmask[None, :],
                     other=0.0)

    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rowdot = tl.zeros([BLOCK_M], dtype=tl.float32)  # sum_j A_kj c_kj
    for jb in range(pid_s * jps, tl.minimum(pid_s * jps + jps, NSEG * nbn)):
        cseg = jb // nbn
        col0 = (jb - cseg * nbn).to(tl.int64) * BLOCK_N
        cmask = an < (N - col0).to(tl.int32)
        stride_c = tl.where(cseg == 0, stride_c0, stride_c1)
        xc_ptr = tl.where(cseg == 0, c0_ptr, c1_ptr) + col0 * stride_c
        cstat = col_base + cseg * N + col0
        if SINGLE:
            xc = tl.load(xc_ptr + an[:, None] * stride_c + dcols[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0)
            dot = _mma(xr, tl.trans(xc), tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), UPCAST, IEEE)
        else:
            dot = _dot_tile(xr_ptr, xc_ptr, stride_r, stride_c, am, an, rmask, cmask, d,
                            tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32), BLOCK_K, UPCAST, IEEE)
        rinv_c = _rinv(tl.load(nrm_ptr + cstat + an, mask=cmask, other=1.0), NORMALIZE)
        cosv = dot * rinv_r[:, None] * rinv_c[None, :]
        valid = rmask[:, None] & cmask[None, :]
        if SELF_MASK:  # the diagonal: same source and local row == local column
            delta = tl.where(cseg == seg, col0 - row0, BLOCK_M).to(tl.int32)
            valid = valid & ((am[:, None] - an[None, :]) != delta)
        s2 = tl.where(valid, cosv * scale2, float("-inf"))
        if W_ROW != 0.0:
            p = W_ROW * tl.exp2(s2 - lse_r2[:, None])
            if W_COL != 0.0:
                lse_c2 = tl.load(lse_ptr + cstat + an, mask=cmask, other=0.0) * 1.4426950408889634
                p += W_COL * tl.exp2(s2 - lse_c2[None, :])
        else:
            lse_c2 = tl.load(lse_ptr + cstat + an, mask=cmask, other=0.0) * 1.4426950408889634
            p = W_COL * tl.exp2(s2 - lse_c2[None, :])
        rowdot += tl.sum(p * cosv, axis=1)
        if SINGLE:
            xg = xc
        else:
            xg = tl.load(xc_ptr + an[:, None] * stride_c + dcols[None, :], mask=cmask[:, None] & dmask[None, :],
                         other=0.0)
        if NORMALIZE:
            if FOLD_RINV:  # A diag(r_J) X_J: the scale goes on the B x B tile (bf16 / fp32 range holds 2 / eps)
                acc = _mma((p * rinv_c[None, :]).to(dt), xg, acc, UPCAST, IEEE)
            else:  # fp16: scale X_J (|z| <= 1) instead, 1 / eps would overflow
                zg = (xg.to(tl.float32) * rinv_c[:, None]).to(dt)
                acc = _mma(p.to(dt), zg, acc, UPCAST, IEEE)
        else:
            acc = _mma(p.to(dt), xg, acc, UPCAST, IEEE)

    if SPLIT:
        wrow = seg * N + row0  # first workspace row of this block (int64)
        wbase = ws_ptr + pid_s.to(tl.int64) * ws_stride + wrow * d
        tl.store(wbase + am[:, None] * d + dcols[None, :], acc, mask=rmask[:, None] & dmask[None, :])
        if pid_d == 0:  # a branch, not a scalar in the mask (see _fwd_kernel)
            tl.store(wsd_ptr + pid_s.to(tl.int64) * (ws_stride // d) + wrow + am, rowdot, mask=rmask)
    else:
        _bwd_finish(acc, rowdot, am, rmask, dcols, dmask, row0, seg, pid_m, pid_d,
                    r0_ptr, r1_ptr, c0_ptr, c1_ptr, o0_ptr, o1_ptr,
                    nrm_ptr, cos_ptr, inv_temp_ptr, grad_ptr, gz_part_ptr,
                    stride_r0, stride_r1, stride_c0, stride_c1, stride_o0, stride_o1,
                    N, row_base, col_base, inv_count, NSEG, W_ROW, W_COL, NORMALIZE, WRITE_GZ)


@triton.jit
def _bwd_epilogue_kernel(
    r0_ptr, r1_ptr, c0_ptr, c1_ptr, o0_ptr, o1_ptr,
    nrm_ptr, cos_ptr, inv_temp_ptr, grad_ptr, gz_part_ptr, ws_ptr, wsd_ptr,
    stride_r0, stride_r1, stride_c0, stride_c1, stride_o0, stride_o1,
    N, d, row_base, col_base, inv_count, nsplit, ws_stride,
    NSEG: tl.constexpr, W_ROW: tl.constexpr, W_COL: tl.constexpr, NORMALIZE: tl.constexpr,
    WRITE_GZ: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Sums the nsplit partials of _bwd_kernel (SPLIT) in a fixed order, then finishes dx like it."""
    pid_m = tl.program_id(0).to(tl.int64)
    pid_d = tl.program_id(1)
    nbm = tl.cdiv(N, BLOCK_M)
    seg = pid_m // nbm
    row0 = (pid_m - seg * nbm) * BLOCK_M
    am = tl.arange(0, BLOCK_M)
    rmask = am < (N - row0).to(tl.int32)
    dcols = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    dmask = dcols < d
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    rowdot = tl.zeros([BLOCK_M], dtype=tl.float32)
    wrow = seg * N + row0  # int64
    off = wrow * d  # int64 offsets, advanced by one split per step
    offd = wrow
    for _ in range(0, nsplit):
        acc += tl.load(ws_ptr + off + am[:, None] * d + dcols[None, :], mask=rmask[:, None] & dmask[None, :],
                       other=0.0)
        rowdot += tl.load(wsd_ptr + offd + am, mask=rmask, other=0.0)
        off += ws_stride
        offd += ws_stride // d
    _bwd_finish(acc, rowdot, am, rmask, dcols, dmask, row0, seg, pid_m, pid_d,
                r0_ptr, r1_ptr, c0_ptr, c1_ptr, o0_ptr, o1_ptr,
                nrm_ptr, cos_ptr, inv_temp_ptr, grad_ptr, gz_part_ptr,
                stride_r0, stride_r1, stride_c0, stride_c1, stride_o0, stride_o1,
                N, row_base, col_base, inv_count, NSEG, W_ROW, W_COL, NORMALIZE, WRITE_GZ)


# ----------------------------------------------------------------------------------------------------
# launch heuristics
#
# Block sizes come from this table, not from autotuning: the forward's partial buffer and the backward's
# grid depend on them, and the interpreter runs the very sizes the GPU does. Checked for H100 (sm_90) by
# compiling with triton 3.8 without a GPU (triton.compile + cuobjdump --dump-resource-usage): tensor-core
# (wgmma) dots for bf16 / fp16 (and fp32 under TF32), pipelined K loops (cp.async, num_stages buffers),
# shared memory <= 96 KiB, no register spills for bf16 (fp16 NT-Xent d <= 128: 8 bytes; fp32-IEEE: FMA
# dots, <= 16 bytes). NOT timed. These hold when d and the row strides are multiples of 16 elements (triton
# then specializes them as 16-divisible): otherwise the loads are not vectorized, the forward's K loop is
# not multi-buffered and the backward spills ~64 bytes (correct, slower; e.g. d = 300).
#
#   forward tile (B x B, K-step BLOCK_K)   16-bit                                 fp32
#     (both forward kernels; _fwd_plan picks per-tile while its slots <= max(64, d), else grouped)
#     rows (M or N) >= 4096                B 128, K 64, 8 warps, 3 stages  (128 regs)   B 64, K 32, 4 warps
#     smaller (4x more tiles)              B 64,  K 64, 4 warps, 3 stages  (70 regs)    B 64, K 32, 4 warps
#   backward (BLOCK_M x BLOCK_N, K-step, D-chunk)
#     16-bit, d <= 128                     128 x 64, K = D-chunk = d' (pow2 >= 16), X_I resident, 8 warps
#     16-bit, d > 128                      64 x 64, K 64, D-chunk 256, 8 warps
#     fp32                                 64 x 32, K 32, D-chunk min(d', 128), 8 warps
#   Why not 64 x 64 resident for 16-bit d <= 256: with 8 warps triton lays the 64-row S tile out as
#   warpsPerCTA [8, 1] and both warpgroups compute the same S (2x the S MACs), and a 64 x 256 fp32
#   accumulator spills; 128-row blocks at d <= 128 have neither problem.
#   Backward split over column blocks (grid axis 2): when (row blocks x D-chunks) is under 2 waves
#   (2 x SMs programs), each row block's column sweep is cut in S pieces whose fp32 partials go to a
#   workspace (S x rows x d x 4 bytes, at most ~2 SMs x BLOCK_M x d x 4 = 17 MiB on H100 at d = 128),
#   summed in a fixed order by _bwd_epilogue_kernel. S = 1 (no workspace) for large problems.

_SM_TARGET = 132  # programs per wave when there is no CUDA device to ask (the interpreter): an H100
_SLOT_CAP_OVERRIDE = None  # tests only: an int replaces max(64, d) in _slot_cap (forces the grouped forward)


def _fwd_config(rows: int, d: int, dtype: torch.dtype) -> dict:
    """Tile of both forward kernels. The buffer rule (per-tile vs grouped, slots <= max(64, d)) is in
    _fwd_plan."""
    dp = _pow2(d)
    if dtype == torch.float32:
        cfg = dict(BLOCK=64, BLOCK_K=min(dp, 32), num_warps=4, num_stages=2)
    elif rows >= 4096:
        cfg = dict(BLOCK=128, BLOCK_K=min(dp, 64), num_warps=8, num_stages=3)
    else:
        cfg = dict(BLOCK=64, BLOCK_K=min(dp, 64), num_warps=4, num_stages=3)
    return _override("infonce_fwd", cfg)


def _bwd_config(d: int, dtype: torch.dtype) -> dict:
    dp = _pow2(d)
    if dtype == torch.float32:
        cfg = dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=32, BLOCK_D=min(dp, 128), SINGLE=False, num_warps=8,
                   num_stages=2)
    elif dp <= 128:
        cfg = dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=dp, BLOCK_D=dp, SINGLE=True, num_warps=8, num_stages=2)
    else:
        cfg = dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, BLOCK_D=256, SINGLE=False, num_warps=8, num_stages=2)
    return _override("infonce_bwd", cfg)


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return _SM_TARGET


def _bwd_splits(programs: int, col_blocks: int, device: torch.device) -> int:
    """Pieces of the column sweep: enough programs for ~2 waves, at least one column block each."""
    want = triton.cdiv(2 * _sm_count(device), programs)
    return max(1, min(want, col_blocks))


_PREP = dict(BLOCK_R=16, num_warps=4)
_FIN = dict(BLOCK_R=128, BLOCK_S=16, num_warps=4)
_SUM = dict(BLOCK=1024, num_warps=4)


def _check(a: torch.Tensor, b: torch.Tensor, name_a: str, name_b: str, d: int) -> None:
    for x, name in ((a, name_a), (b, name_b)):
        if not isinstance(x, torch.Tensor) or x.dim() != 2:
            raise ValueError(f"{name} must be a 2-D tensor (N, D)")
        if x.dtype not in _DTYPES:
            raise TypeError(f"{name}: the triton backend supports float32, bfloat16 and float16, got {x.dtype} "
                            f"(use backend='cpp' or 'torch' for float64)")
        if x.shape[1] > 1 and x.stride(1) != 1:
            raise ValueError(f"{name} must have unit stride along D, got strides {tuple(x.stride())}")
        if x.device.type != "cuda" and not (x.device.type == "cpu" and _interpreting()):
            raise RuntimeError(f"{name}: the triton backend needs CUDA tensors (or CPU tensors with "
                               f"TRITON_INTERPRET=1), got {x.device}")
    if a.shape != b.shape or a.dtype != b.dtype or a.device != b.device:
        raise ValueError(f"{name_a} and {name_b} must have the same shape, dtype and device")
    if a.shape[0] < 1 or not 1 <= d <= a.shape[1]:
        raise ValueError(f"need N >= 1 and 1 <= d <= D, got N = {a.shape[0]}, d = {d}, D = {a.shape[1]}")


def _check_scalar(t: torch.Tensor, name: str, like: torch.Tensor) -> None:
    if not isinstance(t, torch.Tensor) or t.numel() != 1 or t.device != like.device:
        raise ValueError(f"{name} must be a 1-element tensor on {like.device}")


# ----------------------------------------------------------------------------------------------------
# launchers


def _prep(a, b, normalize, d):
    n = a.shape[0]
    nrm = torch.empty(2 * n, dtype=torch.float32, device=a.device)
    cos = torch.empty(n, dtype=torch.float32, device=a.device)
    _prep_kernel[(triton.cdiv(n, _PREP["BLOCK_R"]),)](
        a, b, nrm, cos, a.stride(0), b.stride(0), n, d,
        NORMALIZE=normalize, BLOCK_R=_PREP["BLOCK_R"], BLOCK_D=min(_pow2(d), 128), num_warps=_PREP["num_warps"])
    return nrm, cos


def _finalize(part, nslots, cos, inv_temp, n, rows, w0, w1):
    dev = part.device
    # one-way cross-view (rows = n) leaves the column half unused: zeros, not garbage, in the saved tensor
    lse = (torch.empty if rows == 2 * n else torch.zeros)(2 * n, dtype=torch.float32, device=dev)
    grid = triton.cdiv(rows, _FIN["BLOCK_R"])
    loss_part = torch.empty(grid, dtype=torch.float32, device=dev)
    _finalize_kernel[(grid,)](part, cos, inv_temp, lse, loss_part, part.stride(0), nslots, n, rows, w0, w1,
                              BLOCK_R=_FIN["BLOCK_R"], BLOCK_S=_FIN["BLOCK_S"], num_warps=_FIN["num_warps"])
    return _sum(loss_part), lse


def _sum(x):
    out = torch.empty((), dtype=torch.float32, device=x.device)
    _sum_kernel[(1,)](x, out, x.numel(), BLOCK=_SUM["BLOCK"], num_warps=_SUM["num_warps"])
    return out


def _slot_cap(d: int) -> int:
    """Most partial-LSE slots per row: max(64, d), so part (slots x 2N fp32) stays O(N d)."""
    return _SLOT_CAP_OVERRIDE if _SLOT_CAP_OVERRIDE is not None else max(64, d)


def _fwd_plan(n: int, d: int, dtype: torch.dtype, ntxent: bool, device: torch.device) -> dict:
    """The forward's launch plan, pure Python (no allocation): cfg (_fwd_config), nb1 = cdiv(N, BLOCK),
    grouped (bool), nslots (rows of part), jpg (column blocks per group, grouped only).
    Per-tile (symmetric) forward when its nslots = (2 if NT-Xent else 1) nb1 <= _slot_cap(d); otherwise
    grouped, G = cdiv(2 SMs, row blocks) clamped to [1, cap], then G = cdiv(col blocks, cdiv(col blocks, G))
    so that no group is empty."""
    cfg = _fwd_config(2 * n if ntxent else n, d, dtype)
    nb1 = triton.cdiv(n, cfg["BLOCK"])
    blocks = (2 if ntxent else 1) * nb1  # row blocks = column blocks = per-tile slots
    cap = _slot_cap(d)
    if blocks <= cap:
        return dict(cfg=cfg, nb1=nb1, grouped=False, nslots=blocks, jpg=None)
    g = max(1, min(cap, blocks, triton.cdiv(2 * _sm_count(device), blocks)))
    jpg = triton.cdiv(blocks, g)
    return dict(cfg=cfg, nb1=nb1, grouped=True, nslots=triton.cdiv(blocks, jpg), jpg=jpg)


def _forward(a, b, inv_temp, normalize, d, ntxent, col_stats):
    n = a.shape[0]
    nrm, cos = _prep(a, b, normalize, d)
    plan = _fwd_plan(n, d, a.dtype, ntxent, a.device)
    cfg, nb1, nslots = plan["cfg"], plan["nb1"], plan["nslots"]
    part = torch.empty((nslots, 2 * n), dtype=torch.float32, device=a.device)
    if not plan["grouped"]:
        tiles = nslots * (nslots + 1) // 2 if ntxent else nb1 * nb1
        _fwd_kernel[(tiles,)](
            a, b, nrm, inv_temp, part, a.stride(0), b.stride(0), part.stride(0), n, d, nb1,
            NTXENT=ntxent, COL_STATS=col_stats, NORMALIZE=normalize, **_flags(a), **cfg)
        return nrm, cos, part, nslots
    # grouped, rows only: NT-Xent one launch over the 2 nb1 row blocks of [z1; z2] (full M x M, diagonal
    # masked); cross-view rows of q against k (part[:, :N]) and, symmetric, rows of k against q = the
    # column statistics (part[:, N:2N], norms of k at N), as the per-tile kernel lays them out.
    if ntxent:
        launches = [((a, b), (a, b), 0, 0)]
    else:
        launches = [((a,), (b,), 0, n)] + ([((b,), (a,), n, 0)] if col_stats else [])
    for rows, cols, row_base, col_base in launches:
        nseg = len(rows)
        r1, c1 = rows[-1], cols[-1]
        _fwd_grouped_kernel[(nseg * nb1, nslots)](
            rows[0], r1, cols[0], c1, nrm, inv_temp, part,
            rows[0].stride(0), r1.stride(0), cols[0].stride(0), c1.stride(0), part.stride(0),
            n, d, row_base, col_base, plan["jpg"],
            NSEG=nseg, SELF_MASK=ntxent, NORMALIZE=normalize, **_flags(a), **cfg)
    return nrm, cos, part, nslots


def _backward_launch(grad, rows, cols, outs, nrm, lse, cos, inv_temp, gz_part, n, d, row_base, col_base,
                     inv_count, self_mask, w_row, w_col, normalize):
    """One _bwd_kernel launch (+ _bwd_epilogue_kernel when the column sweep is split)."""
    cfg = _bwd_config(d, rows[0].dtype)
    nseg = len(rows)
    r1, c1, o1 = rows[-1], cols[-1], outs[-1]
    row_blocks = nseg * triton.cdiv(n, cfg["BLOCK_M"])
    chunks = triton.cdiv(d, cfg["BLOCK_D"])
    col_blocks = nseg * triton.cdiv(n, cfg["BLOCK_N"])
    splits = _bwd_splits(row_blocks * chunks, col_blocks, rows[0].device)
    jps = triton.cdiv(col_blocks, splits)
    splits = triton.cdiv(col_blocks, jps)  # no empty piece
    dummy = nrm
    gz = gz_part if gz_part is not None else dummy
    if splits > 1:
        ws = torch.empty((splits, nseg * n, d), dtype=torch.float32, device=nrm.device)
        wsd = torch.empty((splits, nseg * n), dtype=torch.float32, device=nrm.device)
    else:
        ws = wsd = dummy
    ptrs = (rows[0], r1, cols[0], c1, outs[0], o1)
    strides = (rows[0].stride(0), r1.stride(0), cols[0].stride(0), c1.stride(0), outs[0].stride(0), o1.stride(0))
    common = dict(NSEG=nseg, W_ROW=float(w_row), W_COL=float(w_col), NORMALIZE=normalize,
                  WRITE_GZ=gz_part is not None)
    _bwd_kernel[(row_blocks, chunks, splits)](
        *ptrs, nrm, lse, cos, inv_temp, grad, gz, ws, wsd, *strides,
        n, d, row_base, col_base, inv_count, jps, nseg * n * d,
        SELF_MASK=self_mask, FOLD_RINV=rows[0].dtype != torch.float16, SPLIT=splits > 1, **common,
        **_flags(rows[0]), **cfg)
    if splits > 1:
        _bwd_epilogue_kernel[(row_blocks, chunks)](
            *ptrs, nrm, cos, inv_temp, grad, gz, ws, wsd, *strides,
            n, d, row_base, col_base, inv_count, splits, nseg * n * d,
            BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=8, **common)


def _grad_buffers(x, d):
    n, D = x.shape
    alloc = torch.zeros if d < D else torch.empty  # columns d..D of the gradient are zero
    return alloc((n, D), dtype=x.dtype, device=x.device)


# ----------------------------------------------------------------------------------------------------
# the backend contract (see ssl_fast/ops/infonce.py)


def ntxent_forward(z1, z2, inv_temp, normalize, d):
    """[loss (0-dim fp32), lse (2N), norms (2N), positive cosines (N)], all fp32."""
    _check(z1, z2, "z1", "z2", d)
    _check_scalar(inv_temp, "inv_temp", z1)
    normalize = bool(normalize)
    n = z1.shape[0]
    with _device_ctx(z1):
        nrm, cos, part, nslots = _forward(z1, z2, inv_temp, normalize, d, ntxent=True, col_stats=True)
        w = 1.0 / (2 * n)
        loss, lse = _finalize(part, nslots, cos, inv_temp, n, 2 * n, w, w)
    return [loss, lse, nrm, cos]


def ntxent_backward(grad, z1, z2, lse, nrm, cos, inv_temp, normalize, d):
    """(dz1, dz2, gz): gradients in the inputs' dtype (zero beyond column d), gz = sum_k <z_k, dL/dz_k>."""
    _check(z1, z2, "z1", "z2", d)
    _check_scalar(grad, "grad", z1)
    n = z1.shape[0]
    with _device_ctx(z1):
        dz1, dz2 = _grad_buffers(z1, d), _grad_buffers(z2, d)
        nblocks = 2 * triton.cdiv(n, _bwd_config(d, z1.dtype)["BLOCK_M"])
        gz_part = torch.empty(nblocks, dtype=torch.float32, device=z1.device)
        _backward_launch(grad, (z1, z2), (z1, z2), (dz1, dz2), nrm, lse, cos, inv_temp, gz_part, n, d, 0, 0,
                         1.0 / (2 * n), True, 1.0, 1.0, bool(normalize))
        gz = _sum(gz_part)
    return [dz1, dz2, gz]


def info_nce_forward(q, k, inv_temp, normalize, symmetric, d):
    """[loss (0-dim fp32), lse (2N: rows, then columns when symmetric), norms (2N: q, then k), positive
    cosines (N)], all fp32."""
    _check(q, k, "query", "key", d)
    _check_scalar(inv_temp, "inv_temp", q)
    normalize, symmetric = bool(normalize), bool(symmetric)
    n = q.shape[0]
    with _device_ctx(q):
        nrm, cos, part, nslots = _forward(q, k, inv_temp, normalize, d, ntxent=False, col_stats=symmetric)
        wa = (0.5 if symmetric else 1.0) / n
        loss, lse = _finalize(part, nslots, cos, inv_temp, n, 2 * n if symmetric else n, wa, wa)
    return [loss, lse, nrm, cos]


def info_nce_backward(grad, q, k, lse, nrm, cos, inv_temp, normalize, symmetric, d):
    """(dq, dk, gz) with gz = sum_i <qhat_i, dL/dqhat_i> (the queries only: c = 1 in ops.infonce)."""
    _check(q, k, "query", "key", d)
    _check_scalar(grad, "grad", q)
    normalize, symmetric = bool(normalize), bool(symmetric)
    n = q.shape[0]
    a, b = (0.5, 0.5) if symmetric else (1.0, 0.0)
    with _device_ctx(q):
        dq, dk = _grad_buffers(q, d), _grad_buffers(k, d)
        gz_part = torch.empty(triton.cdiv(n, _bwd_config(d, q.dtype)["BLOCK_M"]), dtype=torch.float32,
                              device=q.device)
        # dQ: rows q (norms / lse at 0), columns k (at N); dK: rows k (at N), columns q (at 0), weights swapped
        _backward_launch(grad, (q,), (k,), (dq,), nrm, lse, cos, inv_temp, gz_part, n, d, 0, n, 1.0 / n, False,
                         a, b, normalize)
        _backward_launch(grad, (k,), (q,), (dk,), nrm, lse, cos, inv_temp, None, n, d, n, 0, 1.0 / n, False,
                         b, a, normalize)
        gz = _sum(gz_part)
    return [dq, dk, gz]
