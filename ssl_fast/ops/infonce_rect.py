"""Rectangular InfoNCE: local anchors against (gathered) candidates. The op behind distributed NT-Xent /
InfoNCE (``process_group=``), queues of negatives (``negatives=``) and the lightly-compatible memory bank.

Op (every backend, see ``csrc/cpu/infonce_rect.cpp`` and ``kernels/infonce_rect.py``):
rows A (R x d), candidates C (Cn x d), per row a positive column p(i) (or -1) and an excluded column e(i)
(the anchor itself, or -1); with S = norm(A) norm(C)^T / T and S_i,e(i) = -inf the op returns the per-row
terms t_i = logsumexp_j S_ij - S_i,p(i). Its backward takes per-row weights w_i = dL/dt_i and returns
dL/dA, dL/dC (the first ``grad_cols`` candidates; appended negatives get none) and
gz = sum_ij dL/dS_ij S_ij = -T dL/dT (the temperature gradient; see ``ssl_fast.ops.infonce``).

Backend contract (``TABLE`` below; the dispatcher ops ``torch.ops.ssl_fast.infonce_rect_{fwd,bwd}_{cpp,triton}``):
    fwd(rows, cands, pos, excl, inv_temp, normalize[, with_grad]) -> [terms (R), lse (R; cpp: 2R, (max, log-sum)), *saved]
    bwd(w, *state, lse, pos, excl, inv_temp, normalize, grad_cols) -> [dA (R, d), dC (grad_cols, d), gz]
with state = saved for cpp (normalized copies of rows and candidates, their norms, and, when the forward ran
with_grad, U = softmax(S) C (R x d) from which dA needs no recompute: the inputs are not kept) and
state = (rows, cands, *saved) for triton (the row and candidate scales +-1 / max(|x|, eps), negative when
|x| <= eps; the kernels re-read the inputs). terms / lse / dA / dC / gz are in the accumulation dtype
(float64 for float64 inputs, float32 otherwise). The ``torch``
backend is the reference's autograd (``ssl_fast.reference.infonce_rect_reference`` on the same candidates,
gathered with ``ssl_fast.distributed.all_gather_with_grad``): no second hand-written backward.

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

from typing import NamedTuple, Optional, Sequence

import torch

from .. import distributed as _dist
from .. import reference
from . import _backend, _library
from .infonce import _acc_dtype, _check_feature_dim, _check_pair, _check_temperature


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
# argument checks


def _check_candidates(candidates, rows: torch.Tensor) -> None:
    if not isinstance(candidates, torch.Tensor):
        raise TypeError(f"candidates must be a torch.Tensor, got {type(candidates).__name__}")
    if candidates.dim() != 2 or candidates.shape[1] != rows.shape[1]:
        raise ValueError(f"candidates must have shape (Cn, D) with D = {rows.shape[1]} (the width of rows), got "
                         f"{tuple(candidates.shape)}")
    if candidates.shape[0] == 0:
        raise ValueError("candidates is empty (Cn = 0)")
    if candidates.dtype != rows.dtype:
        raise TypeError(f"candidates must have the dtype of rows ({rows.dtype}), got {candidates.dtype}")
    if candidates.device != rows.device:
        raise ValueError(f"candidates must be on the device of rows ({rows.device}), got {candidates.device}")


def _check_index(t, name: str, rows: torch.Tensor, cols: int) -> torch.Tensor:
    r = rows.shape[0]
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be an int64 tensor of shape ({r},), got {type(t).__name__}")
    if t.dtype != torch.int64:
        raise TypeError(f"{name} must be an int64 tensor, got {t.dtype}")
    if tuple(t.shape) != (r,):
        raise ValueError(f"{name} must have shape ({r},) (one entry per row), got {tuple(t.shape)}")
    if t.device != rows.device:
        raise ValueError(f"{name} must be on the device of rows ({rows.device}), got {t.device}")
    # A device tensor's values are not checked (a host sync), nor are any under torch.compile (a graph break).
    if t.device.type == "cpu" and r and not torch.compiler.is_compiling():
        lo, hi = int(t.min()), int(t.max())
        if lo < -1 or hi >= cols:
            raise ValueError(f"{name} must hold column indices in [-1, {cols}) (-1: none), got values in [{lo}, {hi}]")
    return t


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


# ----------------------------------------------------------------------------------------------------
# fake implementations


def _fake_fwd_cpp(rows, cands, negatives, pos, excl, inv_temp, normalize, with_grad, block):  # terms, lse, *saved
    acc = _acc_dtype(rows)
    (r, d), cn = rows.shape, cands.shape[0] + (0 if negatives is None else negatives.shape[0])
    new = lambda *shape: rows.new_empty(shape, dtype=acc)  # noqa: E731
    # lse: (max, log-sum) of each row, the R maxima then the R log-sums (csrc/cpu/infonce_rect.cpp)
    return [new(r), new(2 * r), new(r, d), new(cn, d), new(r), new(cn), new(r if with_grad else 0, d)]


def _fake_bwd_cpp(w, rows_n, cands_n, row_norms, cand_norms, u, lse, pos, excl, inv_temp, normalize, grad_cols,
                  block):
    return [rows_n.new_empty(rows_n.shape), rows_n.new_empty((grad_cols, rows_n.shape[1])), rows_n.new_empty(())]


def _fake_fwd_triton(rows, cands, pos, excl, inv_temp, normalize):  # terms, lse, row scales, candidate scales
    r, cn = rows.shape[0], cands.shape[0]
    f = lambda *s: rows.new_empty(s, dtype=torch.float32)  # noqa: E731
    return [f(r), f(r), f(r), f(cn)]


def _fake_bwd_triton(w, rows, cands, row_scales, cand_scales, lse, pos, excl, inv_temp, normalize, grad_cols):
    f = lambda *s: rows.new_empty(s, dtype=torch.float32)  # noqa: E731
    return [f(*rows.shape), f(grad_cols, rows.shape[1]), f()]


# ----------------------------------------------------------------------------------------------------
# backends: csrc/cpu/infonce_rect.cpp (cpp; the tile size appended by cpp_op) and kernels/infonce_rect.py
# (triton); the torch path is the reference's autograd (_torch_terms)

TABLE = _backend.BackendTable(
    "infonce_rect",
    cpp=dict(fwd=_library.cpp_op("infonce_rect_fwd_cpp", _fake_fwd_cpp, block=True),
             bwd=_library.cpp_op("infonce_rect_bwd_cpp", _fake_bwd_cpp, block=True)),
    triton=dict(
        fwd=_library.triton_op(
            "infonce_rect_fwd_triton(Tensor rows, Tensor cands, Tensor pos, Tensor excl, Tensor inv_temp, "
            "bool normalize) -> Tensor[]", _fake_fwd_triton, "infonce_rect.rect_forward"),
        bwd=_library.triton_op(
            "infonce_rect_bwd_triton(Tensor w, Tensor rows, Tensor cands, Tensor row_scales, Tensor cand_scales, "
            "Tensor lse, Tensor pos, Tensor excl, Tensor inv_temp, bool normalize, int grad_cols) -> Tensor[]",
            _fake_bwd_triton, "infonce_rect.rect_backward")),
)


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


def _as_rows(x: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    # what the C++ op reads: the rows' dtype, unit stride along D (any row stride)
    x = x.to(dtype)
    return x if x.stride(-1) == 1 or x.shape[-1] == 1 else x.contiguous()


def _torch_terms(rows, own, negatives, temperature, problems: Sequence[Problem], group, normalize: bool):
    """The torch backend: the reference on each problem's candidates, in the accumulation dtype; autograd (through
    the gather's reduce-scatter) gives every gradient, the negatives (detached) get none."""
    acc = _acc_dtype(rows)
    rows = rows.to(acc)
    own = rows if own is None else own.to(acc)
    world, _ = _dist.world_and_rank(group)
    g = _dist.all_gather_with_grad(own, group) if group is not None else own
    temp = temperature.to(acc)
    terms = [reference.infonce_rect_reference(rows[p.r0:p.r1], _candidates(g, world, own.shape[0], p.c0, p.c1,
                                                                            negatives if p.with_negatives else None),
                                              p.pos, p.excl, temp, normalize=normalize) for p in problems]
    return terms[0] if len(terms) == 1 else torch.cat(terms)


class _RectFn(torch.autograd.Function):
    """The fused backends (cpp, triton): one op call per problem, the candidates' gradients reduce-scattered."""

    @staticmethod
    def forward(ctx, rows, own, negatives, temperature, problems: Sequence[Problem], group, normalize: bool,
                backend: str, with_grad: bool):
        acc = _acc_dtype(rows)
        inv_temp = (1.0 / temperature.detach().to(acc)).reshape(())
        world, _ = _dist.world_and_rank(group)
        ctx.own_is_rows = own is None  # NT-Xent / symmetric: the rows are the candidates (one input: dynamo
        own = rows if own is None else own  # rejects the same tensor passed twice to a Function)
        g = _dist.all_gather(own, group) if group is not None else own
        block = own.shape[0]
        fwd = TABLE[backend]["fwd"]
        terms, flat, layout = [], [], []
        for p in problems:
            r = rows[p.r0:p.r1]
            if backend == "cpp":
                # the negatives go in as a second candidate tensor (the op loads both into its normalized copy;
                # no concatenated copy here), and a forward that will be differentiated also saves
                # U = softmax(S) C (the rows' gradient, no recompute)
                cands = _as_rows(_candidates(g, world, block, p.c0, p.c1, None), r.dtype)
                negs = _as_rows(negatives, r.dtype) if p.with_negatives and negatives is not None else None
                if negs is not None and cands.shape[0] == 0:  # no column of any block: the negatives alone
                    cands, negs = negs, None
                t, lse, *saved = fwd(r, cands, negs, p.pos, p.excl, inv_temp, normalize, with_grad)
            else:
                cands = _candidates(g, world, block, p.c0, p.c1, negatives if p.with_negatives else None)
                t, lse, *saved = fwd(r, cands, p.pos, p.excl, inv_temp, normalize)
            terms.append(t)
            # what the backward op takes first: the cpp op saved normalized copies (the inputs are not needed)
            # and U, the triton kernels re-read the inputs
            state = saved if backend == "cpp" else [r, cands, *saved]
            flat += [lse, *state]
            layout.append(1 + len(state))
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
        bwd = TABLE[backend]["bwd"]
        i = off = 0
        for p, n in zip(ctx.problems, ctx.layout):
            lse, *state = flat[i:i + n]
            i += n
            w = gterms[off:off + (p.r1 - p.r0)]
            off += p.r1 - p.r0
            da, dc, gzp = bwd(w, *state, lse, p.pos, p.excl, inv_temp, normalize, world * (p.c1 - p.c0))
            drows[p.r0:p.r1] += da
            dg[:, p.c0:p.c1] += dc.view(world, p.c1 - p.c0, d)
            gz = gz + gzp
        dg = dg.view(world * block, d)
        down = _dist.reduce_scatter(dg, ctx.group) if ctx.group is not None else dg
        dtemp = (-gz * inv_temp).to(temp_dtype) if ctx.needs_input_grad[3] else None
        if ctx.own_is_rows:
            return (drows.add_(down.view(drows.shape)).to(rows_dtype), None, None, dtemp, None, None, None, None,
                    None)
        return (drows.to(rows_dtype) if ctx.needs_input_grad[0] else None,
                down.to(own_dtype).view(own_shape) if ctx.needs_input_grad[1] else None,
                None, dtemp, None, None, None, None, None)


def _terms(rows, own, negatives, temperature, problems: Sequence[Problem], group, normalize: bool, backend: str):
    if backend == "torch":
        return _torch_terms(rows, own, negatives, temperature, problems, group, normalize)
    # ctx.needs_input_grad inside forward does not see torch.no_grad(): decide here
    with_grad = torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (rows, own, temperature))
    return _RectFn.apply(rows, own, negatives, temperature, problems, group, normalize, backend, with_grad)


# ----------------------------------------------------------------------------------------------------
# entry points (re-exported by ssl_fast.functional)


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
    name = TABLE.resolve(z1.device, backend, z1.dtype)
    n = z1.shape[0]
    m = 2 * n
    x = torch.cat([z1[:, :d], z2[:, :d]])
    i = _arange(m, z1.device)
    excl = i + rank * m
    pos = (i + n) % m + rank * m
    terms = _terms(x, None, None, temp, [Problem(0, m, 0, m, False, pos, excl)], group, bool(normalize), name)
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
    name = TABLE.resolve(query.device, backend, query.dtype)
    n = query.shape[0]
    pos = _arange(n, query.device, rank * n)
    excl = torch.full((n,), -1, dtype=torch.int64, device=query.device)
    has_neg = neg is not None
    if not symmetric:
        rows, own = query[:, :d], key[:, :d]
        if rows.stride(-1) != 1:
            rows = rows.contiguous()
        terms = _terms(rows, own, neg, temp, [Problem(0, n, 0, n, has_neg, pos, excl)], group, bool(normalize), name)
        return _finish(terms, n, world, group, local_loss)
    x = torch.cat([query[:, :d], key[:, :d]])
    problems = [Problem(0, n, n, 2 * n, has_neg, pos, excl), Problem(n, 2 * n, 0, n, False, pos, excl)]
    terms = _terms(x, None, neg, temp, problems, group, bool(normalize), name)
    return _finish(terms, n, world, group, local_loss, weight=0.5)


def infonce_rect(rows, candidates, pos, excl=None, temperature=0.1, *, normalize=True, grad_candidates=True,
                 backend=None):
    """Per-row terms t_i = logsumexp_{j != excl[i]} S_ij - S_i,pos[i] (see ``ssl_fast.functional.infonce_rect``)."""
    _check_pair(rows, rows, "rows", "rows")
    _check_candidates(candidates, rows)
    cn = candidates.shape[0]
    _check_index(pos, "pos", rows, cn)
    if excl is None:
        excl = torch.full((rows.shape[0],), -1, dtype=torch.int64, device=rows.device)
    _check_index(excl, "excl", rows, cn)
    if pos.device.type == "cpu" and not torch.compiler.is_compiling() and bool(((pos == excl) & (pos >= 0)).any()):
        raise ValueError("pos and excl must differ where pos >= 0: a row's positive cannot be excluded from its "
                         "softmax")
    if not isinstance(grad_candidates, bool):
        raise TypeError(f"grad_candidates must be a bool, got {type(grad_candidates).__name__}")
    temp = _check_temperature(temperature, rows)
    name = TABLE.resolve(rows.device, backend, rows.dtype)
    r = rows.shape[0]
    rows = rows if rows.stride(-1) == 1 else rows.contiguous()
    candidates = candidates if candidates.stride(-1) == 1 else candidates.contiguous()  # the kernels read rows
    if not grad_candidates:
        # no own candidates (an empty block): the candidates ride as negatives, without gradient
        own = rows.new_empty((0, rows.shape[1]))
        return _terms(rows, own, candidates.detach(), temp, [Problem(0, r, 0, 0, True, pos, excl)], None,
                      bool(normalize), name)
    return _terms(rows, candidates, None, temp, [Problem(0, r, 0, cn, False, pos, excl)], None, bool(normalize), name)


__all__ = ["ntxent_global", "info_nce_global", "infonce_rect", "Problem"]
