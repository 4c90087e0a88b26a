"""Triton kernels of the optimizer step fused with the EMA teacher update (SGD, AdamW, LARS).

Math: as ``csrc/cpu/optim_ema.cpp`` derives it, op by op (torch.optim's foreach sequence with its roundings,
then the lerp of the teacher toward the new parameter), in fp32; for bf16 parameters the same fp32 math with a
rounding to bf16 only where a value is stored (torch's fused=True semantics). Exactness on the GPU: ``tl.fma``
where torch fuses, ``div_rn`` / ``sqrt_rn`` (``/`` and ``tl.sqrt`` are approximate in Triton) and launches
with ``enable_fp_fusion=False`` (no contraction of a * b + c behind our back). The sqrt is the correctly
rounded one (torch's CUDA kernels and ``fused=True``); torch's CPU foreach path uses MKL's, so on CPU tensors
this backend matches the ``cpp`` backend with ``ieee_sqrt=True``. Under ``TRITON_INTERPRET=1`` (numpy): fma is
emulated in fp64 (numpy's fma-less ``x * y + z`` would round twice) and bf16 stores round to nearest even by
hand (the interpreter's cast truncates), so the interpreter agrees with the C++ kernel to the last bit except,
rarely, where the fp64 emulation double-rounds.

Bandwidth bound (bytes per element in ``csrc/cpu/optim_ema.cpp``): one launch per (parameter dtype, EMA
dtype, alignment) group over a table of chunks (as ``kernels/ema.py``): row c = the chunk's element offsets
in each list (from the group's first tensor of that list, passed as the base pointers, so 16-byte
alignment hints survive), its length and its tensor's index (per-tensor scalars: SGD's first-step flag,
AdamW's step size and bias correction, LARS's trust ratio). LARS takes two more launches first: per-chunk
sums of squares of p and g + wd p (fp32 tiles, fp64 partials), then one program per tensor adds its chunks'
partials in order and writes the trust ratio: deterministic, independent of the launch configuration.
"""

from __future__ import annotations

import collections
import os
from typing import Dict, List, Optional

import torch
import triton
import triton.language as tl

from .ema import _device_ctx, _is_flat, _rne_bf16

_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
CHUNK = 1024 if _INTERPRET else 8192
BLOCK = 512 if _INTERPRET else 1024
NUM_WARPS = 8

SGD, ADAMW, LARS = 0, 1, 2


@triton.jit
def _fma(x, y, z, EMULATE: tl.constexpr):
    if EMULATE:  # the interpreter's fma is numpy's x * y + z (two roundings): one rounding, via fp64
        zero = tl.zeros_like(z)  # z is a block at every call site; x or y may be a scalar argument
        return ((zero + x).to(tl.float64) * (zero + y).to(tl.float64) + z.to(tl.float64)).to(tl.float32)
    else:
        return tl.fma(x, y, z)


@triton.jit
def _round(x, BF16: tl.constexpr, RNE: tl.constexpr):
    """The rounding of an intermediate result for parameters of the given dtype: none (the identity) for
    fp32 and bf16 alike: the math runs in fp32 and bf16 results round only where they are stored (_store),
    as torch's fused=True kernels and the C++ kernel (``Round<T>`` in ``csrc/cpu/optim_ema.h``)."""
    return x


@triton.jit
def _stored(x, BF16: tl.constexpr, RNE: tl.constexpr):
    """The fp32 value of x once stored in the parameters' dtype (bf16: round to nearest even): the new
    parameter the EMA follows."""
    if BF16:
        if RNE:
            return _rne_bf16(x).to(tl.float32)
        else:
            return x.to(tl.bfloat16).to(tl.float32)
    else:
        return x


@triton.jit
def _store(ptrs, x, mask, BF16: tl.constexpr, RNE: tl.constexpr):
    if BF16:
        if RNE:
            tl.store(ptrs, _rne_bf16(x), mask=mask)
        else:
            tl.store(ptrs, x.to(tl.bfloat16), mask=mask)
    else:
        tl.store(ptrs, x, mask=mask)


@triton.jit
def _step_kernel(tab_ptr, scal_ptr, p_base, g_base, s1_base, s2_base, e_base, m_ptr, w_arg, omw_arg,
                 c0, c1, c2, c3, c4, c5,
                 KIND: tl.constexpr, HAS_E: tl.constexpr, HAS_WD: tl.constexpr, FLAG: tl.constexpr,
                 FLAG2: tl.constexpr, M_FROM_PTR: tl.constexpr, P_BF16: tl.constexpr, E_BF16: tl.constexpr,
                 VEC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    """Program c: chunk c of the table. Row (int64 x 7): p, g, s1, s2, e offsets, length, tensor index.

    Constants c0..c5 (fp32, rounded as torch rounds them for the parameters' dtype) and flags per KIND:
      SGD:   wd, mom_mul, 1 - dampening, mom_alpha, -lr;  FLAG = momentum != 0, FLAG2 = nesterov;
             scal[t, 0] != 0: a fresh buffer (first step).
      ADAMW: 1 - lr wd, w1, 1 - w1, beta2, 1 - beta2, eps;  FLAG = |w1| < 1/2; scal[t] = (step size, bc2 sqrt).
      LARS:  wd, mom_mul, -lr;  FLAG = adapt; scal[t, 0] = trust ratio.
    """
    row = tab_ptr + tl.program_id(0).to(tl.int64) * 7
    p_ptr = p_base + tl.multiple_of(tl.load(row), VEC)
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VEC)
    s1_ptr = s1_base + tl.multiple_of(tl.load(row + 2), VEC)
    s2_ptr = s2_base + tl.multiple_of(tl.load(row + 3), VEC)
    e_ptr = e_base + tl.multiple_of(tl.load(row + 4), VEC)
    n = tl.load(row + 5)
    t = tl.load(row + 6)
    sc0 = tl.load(scal_ptr + t * 2)
    sc1 = tl.load(scal_ptr + t * 2 + 1)
    if M_FROM_PTR:
        w = 1.0 - tl.load(m_ptr).to(tl.float32)
        omw = 1.0 - w
    else:
        w = w_arg
        omw = omw_arg
    offs = tl.arange(0, BLOCK)
    for start in tl.static_range(0, CHUNK, BLOCK):
        idx = start + offs
        mask = idx < n
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if KIND == 0:  # SGD
            if HAS_WD:
                g = _round(_fma(p, c0, g, EMULATE), P_BF16, EMULATE)
            if FLAG:
                b = tl.load(s1_ptr + idx, mask=mask, other=0.0).to(tl.float32)
                b = _round(_fma(g, c2, _round(b * c1, P_BF16, EMULATE), EMULATE), P_BF16, EMULATE)
                b = tl.where(sc0 != 0.0, g, b)
                _store(s1_ptr + idx, b, mask, P_BF16, EMULATE)
                if FLAG2:
                    g = _round(_fma(b, c3, g, EMULATE), P_BF16, EMULATE)
                else:
                    g = b
            p = _stored(_fma(g, c4, p, EMULATE), P_BF16, EMULATE)
        elif KIND == 1:  # AdamW
            m = tl.load(s1_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            v = tl.load(s2_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_WD:
                p = _round(p * c0, P_BF16, EMULATE)
            d = g - m
            if FLAG:
                m = _fma(tl.zeros_like(d) + c1, d, m, EMULATE)
            else:
                m = _fma(tl.zeros_like(d) - c2, d, g, EMULATE)
            m = _round(m, P_BF16, EMULATE)
            v = _round(v * c3, P_BF16, EMULATE)
            v = _round(_fma(c4 * g, g, v, EMULATE), P_BF16, EMULATE)
            _store(s1_ptr + idx, m, mask, P_BF16, EMULATE)
            _store(s2_ptr + idx, v, mask, P_BF16, EMULATE)
            s = _round(tl.sqrt_rn(v), P_BF16, EMULATE)
            den = _round(_round(tl.div_rn(s, tl.zeros_like(s) + sc1), P_BF16, EMULATE) + c5, P_BF16, EMULATE)
            p = _stored(p + tl.div_rn(sc0 * m, den), P_BF16, EMULATE)
        else:  # LARS
            b = tl.load(s1_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            if HAS_WD:
                g = _round(_fma(p, c0, g, EMULATE), P_BF16, EMULATE)
            if FLAG:
                g = _round(g * sc0, P_BF16, EMULATE)
            b = _round(_round(b * c1, P_BF16, EMULATE) + g, P_BF16, EMULATE)
            _store(s1_ptr + idx, b, mask, P_BF16, EMULATE)
            p = _stored(_fma(b, c2, p, EMULATE), P_BF16, EMULATE)
        _store(p_ptr + idx, p, mask, P_BF16, EMULATE)
        if HAS_E:
            e = tl.load(e_ptr + idx, mask=mask, other=0.0).to(tl.float32)
            d = p - e
            small = tl.abs(w) < 0.5
            ww = tl.where(small, w, -omw) + tl.zeros_like(d)
            e = _fma(ww, d, tl.where(small, e, p), EMULATE)
            _store(e_ptr + idx, e, mask, E_BF16, EMULATE)


@triton.jit
def _sumsq_kernel(tab_ptr, part_ptr, p_base, g_base, wd, HAS_WD: tl.constexpr, P_BF16: tl.constexpr,
                  VEC: tl.constexpr, CHUNK: tl.constexpr, BLOCK: tl.constexpr, EMULATE: tl.constexpr):
    """LARS: partial sums of squares of p and of g + wd p over chunk c -> part[c, 0:2] (fp64)."""
    c = tl.program_id(0).to(tl.int64)
    row = tab_ptr + c * 7
    p_ptr = p_base + tl.multiple_of(tl.load(row), VEC)
    g_ptr = g_base + tl.multiple_of(tl.load(row + 1), VEC)
    n = tl.load(row + 5)
    offs = tl.arange(0, BLOCK)
    sw = tl.zeros([BLOCK], dtype=tl.float64)
    sg = tl.zeros([BLOCK], dtype=tl.float64)
    for start in tl.static_range(0, CHUNK, BLOCK):
        idx = start + offs
        mask = idx < n
        p = tl.load(p_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        g = tl.load(g_ptr + idx, mask=mask, other=0.0).to(tl.float32)
        if HAS_WD:
            g = _round(_fma(p, wd, g, EMULATE), P_BF16, EMULATE)
        p64 = p.to(tl.float64)
        g64 = g.to(tl.float64)
        sw += p64 * p64
        sg += g64 * g64
    tl.store(part_ptr + c * 2, tl.sum(sw, axis=0))
    tl.store(part_ptr + c * 2 + 1, tl.sum(sg, axis=0))


@triton.jit
def _trust_kernel(first_ptr, part_ptr, scal_ptr, eta, P_BF16: tl.constexpr, EMULATE: tl.constexpr):
    """LARS: tensor t's trust ratio from its chunks' partials, added in chunk order -> scal[t, 0]."""
    t = tl.program_id(0).to(tl.int64)
    lo = tl.load(first_ptr + t)
    hi = tl.load(first_ptr + t + 1)
    sw = tl.zeros([1], dtype=tl.float64)
    sg = tl.zeros([1], dtype=tl.float64)
    for c in range(lo, hi):
        sw += tl.load(part_ptr + c * 2 + tl.arange(0, 1))
        sg += tl.load(part_ptr + c * 2 + 1 + tl.arange(0, 1))
    wn = _round(tl.sqrt(sw).to(tl.float32), P_BF16, EMULATE)  # fp64 sqrt: correctly rounded (sqrt.rn.f64)
    gn = _round(tl.sqrt(sg).to(tl.float32), P_BF16, EMULATE)
    tr = _round(tl.div_rn(_round(eta * wn, P_BF16, EMULATE), gn), P_BF16, EMULATE)
    tr = tl.where((wn > 0.0) & (gn > 0.0), tr, 1.0)
    tl.store(scal_ptr + t * 2 + tl.arange(0, 1), tr)


# ----------------------------------------------------------------------------------------------------
# launcher


def _f32(x: float) -> float:
    return torch.tensor(x, dtype=torch.float32).item()


def _alpha(x: float, pdt: torch.dtype) -> float:
    """A scalar of the math: fp32 for every parameter dtype ``pdt`` (as ``alpha_of`` in the C++ kernel)."""
    return _f32(x)


def _work(t: torch.Tensor, ref: torch.Tensor, backs: list, writable: bool) -> torch.Tensor:
    if (t.is_contiguous() and ref.is_contiguous()) or (t.stride() == ref.stride() and _is_flat(t)):
        return t
    c = torch.empty_strided(ref.shape, ref.stride(), dtype=t.dtype, device=t.device)
    c.copy_(t)
    if writable:
        backs.append((t, c))
    return c


_TABLES: "collections.OrderedDict[tuple, tuple]" = collections.OrderedDict()
_TABLES_MAX = 16


def _table(items: List[tuple], device: torch.device):
    """(int64 [chunks, 7] table, int64 [tensors + 1] first chunk of each tensor), cached on the addresses."""
    key = (device, tuple((tuple(x.data_ptr() if x is not None else 0 for x in it[:5]), it[0].numel(), it[5])
                         for it in items))
    hit = _TABLES.get(key)
    if hit is not None:
        _TABLES.move_to_end(key)
        return hit
    bases = []
    for k in range(5):
        first = next((it[k] for it in items if it[k] is not None), None)
        bases.append((first.data_ptr(), first.element_size()) if first is not None else (0, 1))
    rows, first_chunk = [], [0]
    for j, it in enumerate(items):
        n = it[0].numel()
        offs = [0 if it[k] is None else (it[k].data_ptr() - bases[k][0]) // bases[k][1] for k in range(5)]
        for start in range(0, n, CHUNK):
            rows.append(tuple(o + start for o in offs) + (min(CHUNK, n - start), j))
        first_chunk.append(len(rows))
    host = torch.tensor(rows, dtype=torch.int64)
    first = torch.tensor(first_chunk, dtype=torch.int64)
    if device.type == "cuda":
        host, first = host.pin_memory().to(device, non_blocking=True), first.pin_memory().to(device, non_blocking=True)
    out = (host, first)
    _TABLES[key] = out
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return out


def _run(kind: int, params, grads, s1, s2, ema, per_tensor: Optional[List[tuple]], consts, flags, momentum,
         momentum_tensor, lars_wd=0.0, lars_eta=0.0) -> None:
    """Group the tensors by (param dtype, ema dtype or None, aligned), build the chunk table, launch."""
    if not params:
        return
    device = params[0].device
    groups: Dict[tuple, list] = {}
    backs: list = []
    for i, p in enumerate(params):
        if p.numel() == 0:
            continue
        pw = p if _is_flat(p) else p.contiguous()
        if pw is not p:
            backs.append((p, pw))
        gw = _work(grads[i], pw, backs, False)
        b1 = _work(s1[i], pw, backs, True) if s1 else None
        b2 = _work(s2[i], pw, backs, True) if s2 else None
        ew = _work(ema[i], pw, backs, True) if i < len(ema) else None
        ts = [x for x in (pw, gw, b1, b2, ew) if x is not None]
        aligned = all(x.data_ptr() % 16 == 0 for x in ts)
        key = (p.dtype, None if ew is None else ew.dtype, aligned)
        groups.setdefault(key, []).append((pw, gw, b1, b2, ew, i))
    w = _f32(1.0 - momentum)
    omw = _f32(1.0 - w)
    with _device_ctx(params[0]):
        for (pdt, edt, aligned), items in groups.items():
            tab, first = _table(items, device)
            scal = torch.zeros(len(items), 2, dtype=torch.float32)
            if per_tensor is not None:
                scal.copy_(torch.tensor([per_tensor[it[5]] for it in items], dtype=torch.float32))
            scal = scal.to(device)
            vec = 16 // max(x.element_size() for x in items[0][:5] if x is not None) if aligned else 1
            bf16 = pdt == torch.bfloat16
            c = consts(pdt)
            if kind == LARS and flags[0]:  # trust ratios first
                part = torch.empty(tab.shape[0], 2, dtype=torch.float64, device=device)
                _sumsq_kernel[(tab.shape[0],)](tab, part, items[0][0], items[0][1], _alpha(lars_wd, pdt),
                                               HAS_WD=lars_wd != 0, P_BF16=bf16, VEC=vec, CHUNK=CHUNK, BLOCK=BLOCK,
                                               EMULATE=_INTERPRET, num_warps=NUM_WARPS, enable_fp_fusion=False)
                _trust_kernel[(len(items),)](first, part, scal, _f32(lars_eta), P_BF16=bf16, EMULATE=_INTERPRET,
                                             num_warps=1, enable_fp_fusion=False)
            p0, g0, b10, b20, e0 = items[0][:5]
            if momentum_tensor is not None:
                m_t, from_ptr = momentum_tensor.reshape(()).to(device=device, dtype=torch.float32), True
            else:
                m_t, from_ptr = scal, False
            _step_kernel[(tab.shape[0],)](
                tab, scal, p0, g0, b10 if b10 is not None else p0, b20 if b20 is not None else p0,
                e0 if e0 is not None else p0, m_t, w, omw, *c, KIND=kind, HAS_E=edt is not None,
                HAS_WD=flags[1], FLAG=flags[0], FLAG2=flags[2], M_FROM_PTR=from_ptr, P_BF16=bf16,
                E_BF16=edt == torch.bfloat16, VEC=vec, CHUNK=CHUNK, BLOCK=BLOCK, EMULATE=_INTERPRET,
                num_warps=NUM_WARPS, enable_fp_fusion=False)
    for user, work in backs:
        user.copy_(work)


def sgd_ema_step_(params, grads, bufs, ema, fresh, lr, momentum, dampening, weight_decay, nesterov, ema_momentum,
                  ema_momentum_tensor) -> None:
    """The Triton impl of ssl_fast::sgd_ema_step_triton_ (arguments checked by ssl_fast.ops.optim_ema)."""
    def consts(pdt):
        return (_alpha(weight_decay, pdt), _alpha(momentum, pdt), _alpha(1.0 - dampening, pdt), _alpha(momentum, pdt),
                _alpha(-lr, pdt), 0.0)

    per = [(float(bool(f)), 0.0) for f in fresh] if len(fresh) else None
    _run(SGD, params, grads, bufs if momentum != 0 else [], [], ema, per, consts,
         (momentum != 0, weight_decay != 0, bool(nesterov)), ema_momentum, ema_momentum_tensor)


def adamw_ema_step_(params, grads, exp_avgs, exp_avg_sqs, ema, steps, lr, beta1, beta2, eps, weight_decay, ieee_sqrt,
                    ema_momentum, ema_momentum_tensor) -> None:
    """The Triton impl of ssl_fast::adamw_ema_step_triton_ (the sqrt is always the correctly rounded one)."""
    w1 = _f32(1.0 - beta1)

    def consts(pdt):
        return (_alpha(1.0 - lr * weight_decay, pdt), w1, _f32(1.0 - w1), _alpha(beta2, pdt), _f32(1.0 - beta2),
                _f32(eps))

    per = [((lr / (1 - beta1 ** s)) * -1, (1 - beta2 ** s) ** 0.5) for s in steps]
    _run(ADAMW, params, grads, exp_avgs, exp_avg_sqs, ema, per, consts, (abs(w1) < 0.5, weight_decay != 0, False),
         ema_momentum, ema_momentum_tensor)


def lars_ema_step_(params, grads, bufs, ema, lr, momentum, weight_decay, eta, adapt, ema_momentum,
                   ema_momentum_tensor) -> None:
    """The Triton impl of ssl_fast::lars_ema_step_triton_."""
    def consts(pdt):
        return (_alpha(weight_decay, pdt), _alpha(momentum, pdt), _alpha(-lr, pdt), 0.0, 0.0, 0.0)

    _run(LARS, params, grads, bufs, [], ema, None, consts, (bool(adapt), weight_decay != 0, False), ema_momentum,
         ema_momentum_tensor, lars_wd=weight_decay, lars_eta=eta)
