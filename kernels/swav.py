"""Triton kernel of SwAV's swapped prediction: the loss and its gradient in one pass over each crop's scores.

Math (derivation in csrc/cpu/swav.cpp). Crops v = 0..V-1 with scores P_v (B x K), codes Q_s (B x K) of the
first S crops (Sinkhorn output, no gradient), targets T_vb = sum_{s != v} Q_sb = total_b - [v < S] Q_vb:
    L = c sum_v sum_b [ n_vb lse_vb - <T_vb, P_vb> / T ],  c = 1 / (S (V - 1) B),
    lse_vb = logsumexp_k P_vbk / T,  n_vb = sum_k T_vbk,
    dL/dP_vbk = c / T (n_vb softmax(P_vb / T)_k - T_vbk).
The loss is terminal, so the gradient is computed here, in the forward, and the backward only scales it by
the upstream gradient. Base 2 inside: t = P (log2(e) / T), exp2 and the max in base 2, lse = ln 2 * lse2.

Kernel (one launch per crop; grid (cdiv(B, BLOCK_B),), a program owns BLOCK_B rows): pass 1 over the K tiles
keeps the online (max, sum of exp2) per row and accumulates <T, P / T> and n; pass 2 re-reads the tiles (from
L2) and writes the gradient. Per-row loss terms go to row_loss[b]; the python layer sums them (a fixed-order
reduction: deterministic). fp32 statistics; scores fp32 / bf16 / fp16, gradients in the scores' dtype; int64
offsets; masked scores are -inf and masked targets 0.
"""

from __future__ import annotations

import triton
import triton.language as tl

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453

BLOCK_K = 1024  # K tile (fp32: 4 KiB per row)
BLOCK_B = 4     # rows per program


@triton.jit
def _swav_crop_kernel(p_ptr, total_ptr, own_ptr, g_ptr, row_loss_ptr,
                      stride_p, stride_t, stride_o, stride_g,
                      B, K, inv_temp, gscale,
                      HAS_OWN: tl.constexpr, COMPUTE_GRAD: tl.constexpr,
                      BLOCK_B: tl.constexpr, BLOCK_K: tl.constexpr):
    pid = tl.program_id(0).to(tl.int64)
    rows = pid * BLOCK_B + tl.arange(0, BLOCK_B)
    rmask = rows < B
    rows64 = rows.to(tl.int64)
    c2 = inv_temp * 1.4426950408889634
    mx = tl.full([BLOCK_B], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_B], tl.float32)
    # <T, P> and n summed elementwise over the K tiles, reduced once after the loop (a per-tile tl.sum of a
    # loaded tile here crashed triton 3.8's TritonGPUOptimizeThreadLocality pass for sm_90 when HAS_OWN=False)
    dot2 = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    n2 = tl.zeros([BLOCK_B, BLOCK_K], tl.float32)
    for k0 in range(0, K, BLOCK_K):
        cols = k0 + tl.arange(0, BLOCK_K)
        msk = rmask[:, None] & (cols < K)[None, :]
        p = tl.load(p_ptr + rows64[:, None] * stride_p + cols[None, :], mask=msk, other=0.0).to(tl.float32)
        t = tl.load(total_ptr + rows64[:, None] * stride_t + cols[None, :], mask=msk, other=0.0)
        if HAS_OWN:
            t -= tl.load(own_ptr + rows64[:, None] * stride_o + cols[None, :], mask=msk, other=0.0)
        x2 = tl.where(msk, p * c2, float("-inf"))
        m_new = tl.maximum(mx, tl.max(x2, axis=1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        l = l * tl.exp2(mx - m_safe) + tl.sum(tl.exp2(x2 - m_safe[:, None]), axis=1)
        mx = m_new
        dot2 += t * p
        n2 += t
    dot = tl.sum(dot2, axis=1)
    n = tl.sum(n2, axis=1)
    lse2 = tl.where(rmask, mx + tl.log2(tl.where(rmask, l, 1.0)), 0.0)
    row_loss = n * (lse2 * 0.6931471805599453) - dot * inv_temp
    tl.store(row_loss_ptr + rows64, row_loss, mask=rmask)
    if COMPUTE_GRAD:
        a = gscale * n  # c / T * n_vb
        for k0 in range(0, K, BLOCK_K):
            cols = k0 + tl.arange(0, BLOCK_K)
            msk = rmask[:, None] & (cols < K)[None, :]
            p = tl.load(p_ptr + rows64[:, None] * stride_p + cols[None, :], mask=msk, other=0.0).to(tl.float32)
            t = tl.load(total_ptr + rows64[:, None] * stride_t + cols[None, :], mask=msk, other=0.0)
            if HAS_OWN:
                t -= tl.load(own_ptr + rows64[:, None] * stride_o + cols[None, :], mask=msk, other=0.0)
            g = a[:, None] * tl.exp2(p * c2 - lse2[:, None]) - gscale * t
            tl.store(g_ptr + rows64[:, None] * stride_g + cols[None, :], g.to(g_ptr.dtype.element_ty), mask=msk)


def swav_loss(scores, codes, inv_temp: float, compute_grad: bool):
    """scores: V >= 2 tensors (B, K) on one CUDA device (or CPU under TRITON_INTERPRET), unit stride along K;
    codes: S tensors (B, K) fp32 (the codes of scores[0..S-1]). -> [loss (0-dim fp32), grads (V, B x K) when
    compute_grad]. ssl_fast/ops/swav.py writes the codes with Sinkhorn's output pass first (the C++ op forms
    them from the Sinkhorn scalings instead)."""
    import torch

    V, S = len(scores), len(codes)
    B, K = scores[0].shape
    total = codes[0].float() if S == 1 else torch.stack(codes).sum(0)
    total = total.contiguous()
    row_loss = torch.empty((V, B), dtype=torch.float32, device=scores[0].device)
    c = 1.0 / (S * (V - 1) * B)
    gscale = c * inv_temp
    grads = []
    grid = (triton.cdiv(B, BLOCK_B),)
    for v, p in enumerate(scores):
        g = torch.empty((B, K), dtype=p.dtype, device=p.device) if compute_grad else p
        own = codes[v] if v < S else total
        _swav_crop_kernel[grid](p, total, own, g, row_loss[v], p.stride(0), total.stride(0), own.stride(0),
                                g.stride(0), B, K, float(inv_temp), float(gscale), HAS_OWN=v < S,
                                COMPUTE_GRAD=compute_grad, BLOCK_B=BLOCK_B, BLOCK_K=BLOCK_K)
        if compute_grad:
            grads.append(g)
    loss = row_loss.sum() * c
    return [loss] + grads
