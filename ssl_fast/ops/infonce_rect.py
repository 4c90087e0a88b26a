"""Rectangular InfoNCE: local anchors against (gathered) candidates. The op behind distributed NT-Xent /
InfoNCE (``process_group=``), queues of negatives (``negatives=``) and the lightly-compatible memory bank.

Op (every backend, see ``csrc/cpu/infonce_rect.cpp`` and ``kernels/infonce_rect.py``):
rows A (R x d), candidates C (Cn x d), per row a positive column p(i) (or -1) and an excluded column e(i)
(the anchor itself, or -1); with S = norm(A) norm(C)^T / T and S_i,e(i) = -inf the op returns the per-row
terms t_i = logsumexp_j S_ij - S_i,p(i). Its backward takes per-row weights w_i = dL/dt_i and returns
dL/dA, dL/dC (the first ``grad_cols`` candidates; appended negatives get none) and
gz = sum_ij dL/dS_ij S_ij = -T dL/dT (the temperature gradient; see ``ssl_fast.ops.infonce``).

Backend contract (``_FWD`` / ``_BWD`` below):
    fwd(rows, cands, pos, excl, inv_temp, normalize) -> (terms (R), lse (R), saved list)
    bwd(w, rows, cands, saved, lse, pos, excl, inv_temp, normalize, grad_cols) -> (dA (R, d), dC (grad_cols, d), gz)
terms / lse / dA / dC / gz in the accumulation dtype (float64 for float64 inputs, float32 otherwise).

Distributed layout. Every rank owns L rows ``own`` (NT-Xent: [z1; z2], 2N; one-way InfoNCE: the keys, N;
symmetric: [q; k], 2N). ONE ``all_gather_into_tensor`` makes G = [own_0; own_1; ...] (world L x d, rank-major);
each "problem" (rows r0:r1 of the local rows against the columns c0:c1 of every rank's block, + the negatives)
is one op call; the backward accumulates dL/dG (world L x d, fp32) and ONE ``reduce_scatter`` returns each
rank's block to its owner. Positives are indexed by the global rank offset: local row i of rank r has its
positive at column r * L' + i' of its problem's candidates.

Convention (``local_loss=False``, the default): the value on every rank is the loss of the concatenated global
batch (a scalar ``all_reduce``), and each rank's gradients are ``world_size`` times the single-process
gradient w.r.t. its own inputs, so that after DDP's gradient averaging every parameter receives exactly the
single-process gradient of the global batch. ``local_loss=True`` (open_clip's ``local_loss``, lightly's
``gather_distributed``): the value is the mean over this rank's anchors only (no all_reduce; it differs
between ranks and its average over ranks is the global loss); the gradients are the same as above.
"""

from __future__ import annotations

import os
from typing import NamedTuple, Optional, Sequence

import torch

from .. import _ext
from .. import distributed as _dist
from . import _backend, _library
from .infonce import _acc_dtype, _check_feature_dim, _check_pair, _check_temperature

NORM_EPS = 1e-12


class Problem(NamedTuple):
    """Rows r0:r1 of the local rows against columns c0:c1 of every rank's block of G (+ the negatives)."""

    r0: int
    r1: int
    c0: int
    c1: int
    with_negatives: bool
    pos: torch.Tensor  # (r1 - r0,) int64, index into this problem's candidates
    excl: torch.Tensor  # (r1 - r0,) int64, -1 = none


# ----------------------------------------------------------------------------------------------------
# torch backend (materializes R x Cn; the reference path and the fallback)


def _norm_rows(x: torch.Tensor, normalize: bool):
    nrm = torch.linalg.vector_norm(x, dim=1)
    return (x / nrm.clamp_min(NORM_EPS)[:, None] if normalize else x), nrm


def _norm_bwd(g: torch.Tensor, z: torch.Tensor, nrm: torch.Tensor, normalize: bool) -> torch.Tensor:
    """F.normalize's backward: (g - z <z, g>) / |x| where |x| > eps, else g / eps."""
    if not normalize:
        return g
    dot = (g * z).sum(1, keepdim=True)
    return torch.where((nrm > NORM_EPS)[:, None], (g - z * dot) / nrm.clamp_min(NORM_EPS)[:, None], g / NORM_EPS)


def _torch_logits(rows, cands, excl, inv_temp, normalize):
    acc = inv_temp.dtype
    a, an = _norm_rows(rows.to(acc), normalize)
    c, cn = _norm_rows(cands.to(acc), normalize)
    s = (a @ c.t()) * inv_temp
    cols = torch.arange(c.shape[0], device=s.device)
    s = s.masked_fill(cols[None, :] == excl[:, None], float("-inf"))
    return s, a, an, c, cn


def _torch_fwd(rows, cands, pos, excl, inv_temp, normalize):
    s, *_ = _torch_logits(rows, cands, excl, inv_temp, normalize)
    lse = torch.logsumexp(s, dim=1)
    spos = s.gather(1, pos.clamp(min=0)[:, None]).squeeze(1)
    terms = lse - torch.where(pos >= 0, spos, torch.zeros_like(spos))
    return terms, lse, []


def _torch_bwd(w, rows, cands, saved, lse, pos, excl, inv_temp, normalize, grad_cols):
    s, a, an, c, cn = _torch_logits(rows, cands, excl, inv_temp, normalize)
    p = torch.exp(s - lse[:, None])
    y = torch.zeros_like(p).scatter_(1, pos.clamp(min=0)[:, None], (pos >= 0)[:, None].to(p.dtype))
    wm = w.to(p.dtype)[:, None] * (p - y)
    ga = (wm @ c) * inv_temp
    gc = (wm[:, :grad_cols].t() @ a) * inv_temp
    gz = (ga * a).sum()
    return _norm_bwd(ga, a, an, normalize), _norm_bwd(gc, c[:grad_cols], cn[:grad_cols], normalize), gz


# ----------------------------------------------------------------------------------------------------
# cpp backend (csrc/cpu/infonce_rect.cpp: ssl_fast::infonce_rect_fwd_cpp / infonce_rect_bwd_cpp)


def _cpp_fwd_fake(rows, cands, pos, excl, inv_temp, normalize, block):
    acc = _acc_dtype(rows)
    (r, d), cn = rows.shape, cands.shape[0]
    new = lambda *shape: rows.new_empty(shape, dtype=acc)  # noqa: E731
    return [new(r), new(r), new(r, d), new(cn, d), new(r), new(cn)]


def _cpp_bwd_fake(w, rows_n, cands_n, row_norms, cand_norms, lse, pos, excl, inv_temp, normalize, grad_cols, block):
    return [rows_n.new_empty(rows_n.shape), rows_n.new_empty((grad_cols, rows_n.shape[1])), rows_n.new_empty(())]


def _cpp_op(name, fake):
    # None when ssl_fast._C is missing or predates the op (then the cpp backend falls back, see _resolve)
    if not _ext.HAS_EXT or not hasattr(torch.ops.ssl_fast, name):
        return None
    return _library.fake_for(name, fake)


_CPP_FWD = _cpp_op("infonce_rect_fwd_cpp", _cpp_fwd_fake)
_CPP_BWD = _cpp_op("infonce_rect_bwd_cpp", _cpp_bwd_fake)
CPU_BLOCK = int(os.environ.get("SSL_FAST_CPU_BLOCK", "0"))  # cpp tile rows; 0: the kernel picks (pick_block)


def _cpp_fwd(rows, cands, pos, excl, inv_temp, normalize):
    terms, lse, *saved = _CPP_FWD(rows, cands, pos, excl, inv_temp, normalize, CPU_BLOCK)
    return terms, lse, saved


def _cpp_bwd(w, rows, cands, saved, lse, pos, excl, inv_temp, normalize, grad_cols):
    an, cn, anorm, cnorm = saved
    da, dc, gz = _CPP_BWD(w, an, cn, anorm, cnorm, lse, pos, excl, inv_temp, normalize, grad_cols, CPU_BLOCK)
    return da, dc, gz


# ----------------------------------------------------------------------------------------------------
# triton backend (kernels/infonce_rect.py); the impls import the kernels on first use


def _kernels():
    from ssl_fast.kernels import infonce_rect as kernels

    return kernels


def _triton_fwd_fake(rows, cands, pos, excl, inv_temp, normalize):
    r, cn = rows.shape[0], cands.shape[0]
    f = lambda *s: rows.new_empty(s, dtype=torch.float32)  # noqa: E731
    return [f(r), f(r), f(r), f(cn)]


def _triton_bwd_fake(w, rows, cands, row_norms, cand_norms, lse, pos, excl, inv_temp, normalize, grad_cols):
    f = lambda *s: rows.new_empty(s, dtype=torch.float32)  # noqa: E731
    return [f(*rows.shape), f(grad_cols, rows.shape[1]), f()]


_TRITON_FWD = _library.define(
    "infonce_rect_fwd_triton(Tensor rows, Tensor cands, Tensor pos, Tensor excl, Tensor inv_temp, bool normalize) "
    "-> Tensor[]", _triton_fwd_fake,
    cpu=lambda *a: _kernels().rect_forward(*a), cuda=lambda *a: _kernels().rect_forward(*a))
_TRITON_BWD = _library.define(
    "infonce_rect_bwd_triton(Tensor w, Tensor rows, Tensor cands, Tensor row_norms, Tensor cand_norms, Tensor lse, "
    "Tensor pos, Tensor excl, Tensor inv_temp, bool normalize, int grad_cols) -> Tensor[]", _triton_bwd_fake,
    cpu=lambda *a: _kernels().rect_backward(*a), cuda=lambda *a: _kernels().rect_backward(*a))


def _triton_fwd(rows, cands, pos, excl, inv_temp, normalize):
    terms, lse, rnorm, cnorm = _TRITON_FWD(rows, cands, pos, excl, inv_temp, normalize)
    return terms, lse, [rnorm, cnorm]


def _triton_bwd(w, rows, cands, saved, lse, pos, excl, inv_temp, normalize, grad_cols):
    rnorm, cnorm = saved
    da, dc, gz = _TRITON_BWD(w, rows, cands, rnorm, cnorm, lse, pos, excl, inv_temp, normalize, grad_cols)
    return da, dc, gz


_FWD = {"torch": _torch_fwd, "cpp": _cpp_fwd, "triton": _triton_fwd}
_BWD = {"torch": _torch_bwd, "cpp": _cpp_bwd, "triton": _triton_bwd}


# ----------------------------------------------------------------------------------------------------
# autograd: gather -> problems -> per-row terms; backward: problems -> one reduce-scatter


def _candidates(g: torch.Tensor, world: int, block: int, c0: int, c1: int, negatives):
    if c0 == 0 and c1 == block:
        base = g
    else:
        base = g.view(world, block, g.shape[1])[:, c0:c1].reshape(-1, g.shape[1])
    if negatives is not None:
        base = torch.cat([base, negatives.to(base.dtype)])
    return base


class _RectFn(torch.autograd.Function):
    @staticmethod
    def forward(ctx, rows, own, negatives, temperature, problems: Sequence[Problem], group, normalize: bool,
                backend: str):
        acc = _acc_dtype(rows)
        inv_temp = (1.0 / temperature.detach().to(acc)).reshape(())
        world, _ = _dist.world_and_rank(group)
        ctx.own_is_rows = own is None  # NT-Xent / symmetric: the rows are the candidates (one input: dynamo
        own = rows if own is None else own  # rejects the same tensor passed twice to a Function)
        g = _dist.all_gather(own, group) if group is not None else own
        block = own.shape[0]
        fwd = _FWD[backend]
        terms, flat, layout = [], [], []
        for p in problems:
            cands = _candidates(g, world, block, p.c0, p.c1, negatives if p.with_negatives else None)
            r = rows[p.r0:p.r1]
            t, lse, saved = fwd(r, cands, p.pos, p.excl, inv_temp, normalize)
            terms.append(t)
            if backend == "cpp":  # its saved tensors hold the normalized copies: the inputs are not needed
                r, cands = r.new_empty(0), cands.new_empty(0)
            flat += [r, cands, lse, *saved]
            layout.append(3 + len(saved))
        ctx.save_for_backward(inv_temp, *flat)
        ctx.layout, ctx.problems, ctx.group, ctx.world = layout, problems, group, world
        ctx.cfg = (normalize, backend, block, own.shape, own.dtype, rows.shape, rows.dtype, temperature.dtype)
        return terms[0] if len(terms) == 1 else torch.cat(terms)

    @staticmethod
    def backward(ctx, gterms):
        inv_temp, *flat = ctx.saved_tensors
        normalize, backend, block, own_shape, own_dtype, rows_shape, rows_dtype, temp_dtype = ctx.cfg
        acc, world = inv_temp.dtype, ctx.world
        d = rows_shape[1]
        gterms = gterms.to(acc).contiguous()
        drows = torch.zeros((rows_shape[0], d), dtype=acc, device=gterms.device)
        dg = torch.zeros((world, block, d), dtype=acc, device=gterms.device)
        gz = torch.zeros((), dtype=acc, device=gterms.device)
        bwd = _BWD[backend]
        i = off = 0
        for p, n in zip(ctx.problems, ctx.layout):
            r, cands, lse, *saved = flat[i:i + n]
            i += n
            w = gterms[off:off + (p.r1 - p.r0)]
            off += p.r1 - p.r0
            da, dc, gzp = bwd(w, r, cands, saved, lse, p.pos, p.excl, inv_temp, normalize, world * (p.c1 - p.c0))
            drows[p.r0:p.r1] += da
            dg[:, p.c0:p.c1] += dc.view(world, p.c1 - p.c0, d)
            gz = gz + gzp
        dg = dg.view(world * block, d)
        down = _dist.reduce_scatter(dg, ctx.group) if ctx.group is not None else dg
        dtemp = (-gz * inv_temp).to(temp_dtype) if ctx.needs_input_grad[3] else None
        if ctx.own_is_rows:
            return (drows.add_(down.view(drows.shape)).to(rows_dtype), None, None, dtemp, None, None, None, None)
        return (drows.to(rows_dtype) if ctx.needs_input_grad[0] else None,
                down.to(own_dtype).view(own_shape) if ctx.needs_input_grad[1] else None,
                None, dtemp, None, None, None, None)


# ----------------------------------------------------------------------------------------------------
# entry points (called by ssl_fast.functional and the nn modules)


def _resolve(x: torch.Tensor, backend: Optional[str]) -> str:
    name = _backend.resolve(x.device, requested=backend and _backend._check_name(backend), dtype=x.dtype)
    if name == "cpp" and _CPP_FWD is None:
        if backend == "cpp":
            raise RuntimeError("backend 'cpp': ssl_fast._C has no infonce_rect op (rebuild the extension)")
        return "torch"
    return name


def _check_negatives(negatives, like: torch.Tensor, d: int) -> Optional[torch.Tensor]:
    if negatives is None:
        return None
    if not isinstance(negatives, torch.Tensor):
        raise TypeError(f"negatives must be a torch.Tensor of shape (M, D) or None, got {type(negatives).__name__}")
    width = like.shape[1]
    if negatives.dim() != 2 or negatives.shape[1] not in (width, d):
        raise ValueError(f"negatives must have shape (M, D) with D = {width} (the width of query/key"
                         + (f", or feature_dim = {d}" if d != width else "") + f"), got {tuple(negatives.shape)}")
    if negatives.dtype != like.dtype:
        raise ValueError(f"negatives must have the dtype of query/key ({like.dtype}), got {negatives.dtype}")
    if negatives.device != like.device:
        raise ValueError(f"negatives must be on the device of query/key ({like.device}), got {negatives.device}")
    if negatives.shape[0] == 0:
        return None
    neg = negatives.detach()[:, :d]
    return neg if neg.stride(-1) == 1 else neg.contiguous()


def _arange(n: int, device, offset: int = 0) -> torch.Tensor:
    return torch.arange(offset, offset + n, dtype=torch.int64, device=device)


def _finish(terms: torch.Tensor, count: int, world: int, group, local_loss: bool, weight: float = 1.0):
    if local_loss or group is None:
        return terms.sum() * (weight / count)
    return _dist.all_reduce_sum(terms.sum() * (weight / (world * count)), group)


def ntxent_global(z1, z2, temperature=0.5, *, normalize=True, feature_dim=None, process_group=None,
                  local_loss=False, backend=None):
    """NT-Xent of the global batch across ``process_group`` (see the module docstring for the convention)."""
    _check_pair(z1, z2, "z1", "z2")
    d = _check_feature_dim(feature_dim, z1.shape[1])
    temp = _check_temperature(temperature, z1)
    group = _dist.resolve_group(process_group)
    _dist.check_equal_batch(group, z1, "z1")
    world, rank = _dist.world_and_rank(group)
    name = _resolve(z1, backend)
    n = z1.shape[0]
    m = 2 * n
    x = torch.cat([z1[:, :d], z2[:, :d]])
    i = _arange(m, z1.device)
    excl = i + rank * m
    pos = (i + n) % m + rank * m
    terms = _RectFn.apply(x, None, None, temp, [Problem(0, m, 0, m, False, pos, excl)], group, bool(normalize),
                          name)
    return _finish(terms, m, world, group, local_loss)


def info_nce_global(query, key, temperature=0.1, *, normalize=True, symmetric=False, feature_dim=None,
                    negatives=None, process_group=None, local_loss=False, backend=None):
    """Cross-view InfoNCE of the global batch across ``process_group``, with optional extra negatives."""
    _check_pair(query, key, "query", "key")
    d = _check_feature_dim(feature_dim, query.shape[1])
    temp = _check_temperature(temperature, query)
    neg = _check_negatives(negatives, query, d)
    group = _dist.resolve_group(process_group)
    _dist.check_equal_batch(group, query, "query")
    world, rank = _dist.world_and_rank(group)
    name = _resolve(query, backend)
    n = query.shape[0]
    pos = _arange(n, query.device, rank * n)
    excl = torch.full((n,), -1, dtype=torch.int64, device=query.device)
    has_neg = neg is not None
    if not symmetric:
        rows, own = query[:, :d], key[:, :d]
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        terms = _RectFn.apply(rows, own, neg, temp, [Problem(0, n, 0, n, has_neg, pos, excl)], group,
                              bool(normalize), name)
        return _finish(terms, n, world, group, local_loss)
    x = torch.cat([query[:, :d], key[:, :d]])
    problems = [Problem(0, n, n, 2 * n, has_neg, pos, excl), Problem(n, 2 * n, 0, n, False, pos, excl)]
    terms = _RectFn.apply(x, None, neg, temp, problems, group, bool(normalize), name)
    return _finish(terms, n, world, group, local_loss, weight=0.5)


def infonce_rect(rows, candidates, pos, excl=None, temperature=0.1, *, normalize=True, grad_candidates=True,
                 backend=None):
    """Per-row terms t_i = logsumexp_{j != excl[i]} S_ij - S_i,pos[i] (pos[i] = -1: no positive term) of
    S = norm(rows) norm(candidates)^T / T, fused (the R x Cn logits are never stored).

    Args:
        rows: (R, D); candidates: (Cn, D), same dtype and device.
        pos, excl: (R,) int64 column indices in [-1, Cn); ``excl=None`` excludes nothing.
        temperature: float or 0-dim tensor (learnable).
        grad_candidates: False treats the candidates as constants (a queue).

    Returns:
        (R,) float32 (float64 for float64 inputs), differentiable w.r.t. rows, candidates and temperature.
    """
    _check_pair(rows, rows, "rows", "rows")
    if not isinstance(candidates, torch.Tensor) or candidates.dim() != 2 or candidates.shape[1] != rows.shape[1]:
        raise ValueError(f"candidates must have shape (Cn, {rows.shape[1]})")
    if candidates.dtype != rows.dtype or candidates.device != rows.device:
        raise ValueError("candidates must have the dtype and device of rows")
    temp = _check_temperature(temperature, rows)
    r = rows.shape[0]
    if excl is None:
        excl = torch.full((r,), -1, dtype=torch.int64, device=rows.device)
    for t, nm in ((pos, "pos"), (excl, "excl")):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.shape != (r,):
            raise ValueError(f"{nm} must be an int64 tensor of shape ({r},)")
    name = _resolve(rows, backend)
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    if not grad_candidates:
        # no own candidates (an empty block): the candidates ride as negatives, without gradient
        own = rows.new_empty((0, rows.shape[1]))
        return _RectFn.apply(rows, own, candidates.detach(), temp, [Problem(0, r, 0, 0, True, pos, excl)], None,
                             bool(normalize), name)
    return _RectFn.apply(rows, candidates, None, temp, [Problem(0, r, 0, candidates.shape[0], False, pos, excl)],
                         None, bool(normalize), name)


__all__ = ["ntxent_global", "info_nce_global", "infonce_rect", "Problem"]
