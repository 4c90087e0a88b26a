"""Triton kernel of the multi-tensor EMA (teacher) update: the fallback of ``csrc/cuda/ema.cu``.

Math (as in ``csrc/cpu/ema.cpp``). For every pair (e, o) = (ema[i], online[i]) and element j, w = 1 - m:
    e_j <- m e_j + (1 - m) o_j  =  e_j + w (o_j - e_j)  =  o_j - m (o_j - e_j)
(torch.lerp's two-sided form: the first when w < 1/2, the second otherwise; exact at m = 1, m = 0 and
where o == e), both operands converted to ACC (fp32; fp64 for fp64 tensors), one rounding in ACC, one round-to-nearest-
even rounding to e's dtype on the store. No gradient (in-place update under no_grad).

Bandwidth bound: per element sizeof(E) + sizeof(O) bytes read and sizeof(E) written (12 B fp32, 6 B
bf16, 10 B fp32 EMA of bf16 weights) for 2 flops; the kernel streams memory, nothing else.

Design: ONE launch per (ema dtype, online dtype, 16-byte alignment) group over a table of chunks. Triton
cannot take a struct of pointers as a kernel argument (the CUDA kernel passes its table as a
__grid_constant__ parameter), so the launcher writes, for every chunk of CHUNK elements of every tensor,
one row (ema offset, online offset, length) of an int64 device tensor, the offsets counted in elements
from the group's first ema / online tensor, which are passed as the base pointers; program c loads row c
and streams its chunk in BLOCK-wide vectors: without a mask when the chunk is full (the usual case), with
a mask on a tensor's last chunk. No binary search, no per-tensor launch. Why offsets from a base pointer
and not the addresses themselves (``int.to(tl.pointer_type(...))``, as in Triton's grouped-GEMM
tutorial): a pointer made from a loaded integer has no known alignment and its loads stay scalar
(checked in PTX, sm_80 / sm_90, triton 3.8), while base + ``tl.multiple_of(offset, 16 B / element)``
keeps the base argument's 16-byte alignment and gives 16-byte vector loads and stores (ld.global.v4.b32).
The table costs 24 bytes per chunk (~40 KB for a ResNet-50 at CHUNK = 16384) and one host-to-device copy
when it is built; it is cached on the tuple (addresses, sizes, dtypes, device), which is all it depends
on, so a training loop that updates the same parameters builds it once and then launches with no copy
and no host sync (after that first call the update can be captured in a CUDA graph). Pointers of a
group marked aligned are all 16-byte aligned; misaligned views (odd storage offsets) form their own group
(E_VEC = O_VEC = 1, scalar accesses).

Layouts: a dense ema tensor (any stride permutation without gaps) is walked in storage order, with its
online partner in the same order (copied into ema's layout when its strides differ); an ema view with
gaps goes through a contiguous copy that is written back.
"""

from __future__ import annotations

import collections
import contextlib
import math
import os
from typing import Dict, List, Optional, Tuple

import torch
import triton
import triton.language as tl

try:
    from .tuning import override as _override  # the tile sweep's per-launch overrides (bench/tune.py)
except ImportError:  # loaded by file path (scripts/check_triton_compile.py): the tables as written
    def _override(name, cfg):
        return cfg


_INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
# Elements per program and per vector step: 16K-element chunks (64 KiB of fp32 per operand) keep the
# table small and give every program enough work; the interpreter runs each program in Python, so it
# uses small chunks to keep test shapes cheap.
CHUNK = 1024 if _INTERPRET else 16384
BLOCK = 512 if _INTERPRET else 2048
NUM_WARPS = 8


def _launch_config() -> dict:
    """CHUNK (elements per program, the table's rows), BLOCK (elements per vector step), num_warps."""
    return _override("ema", dict(CHUNK=CHUNK, BLOCK=BLOCK, num_warps=NUM_WARPS))


_TL_DTYPES = {torch.float32: tl.float32, torch.float64: tl.float64, torch.bfloat16: tl.bfloat16,
              torch.float16: tl.float16}


@triton.jit
def _rne_bf16(x):
    """fp32 -> bf16 rounded to nearest even, in integer ops (NaN -> quiet NaN). Used only under the
    interpreter, whose ``.to(tl.bfloat16)`` truncates (on a GPU the conversion is cvt.rn, nearest even)."""
    b = x.to(tl.uint32, bitcast=True)
    r = (b + 0x7FFF + ((b >> 16) & 1)) >> 16
    r = tl.where((b & 0x7FFFFFFF) > 0x7F800000, 0x7FC0, r)
    return r.to(tl.uint16).to(tl.bfloat16, bitcast=True)


@triton.jit
def _lerp_store(e_ptrs, e, o, w, m, mask, RNE_BF16: tl.constexpr):
    # torch.lerp's two-sided form: exact at m = 1, m = 0 and where o == e (w is uniform: one side is used)
    d = o - e
    r = tl.where(w < 0.5, e + w * d, o - m * d)
    if RNE_BF16:
        tl.store(e_ptrs, _rne_bf16(r.to(tl.float32)), mask=mask)
    else:
        tl.store(e_ptrs, r.to(e_ptrs.dtype.element_ty), mask=mask)


@triton.jit
def _ema_kernel(tab_ptr, e_base, o_base, m_ptr, m_arg, w_arg, CHUNK: tl.constexpr, BLOCK: tl.constexpr,
                ACC: tl.constexpr, M_FROM_PTR: tl.constexpr, E_VEC: tl.constexpr, O_VEC: tl.constexpr,
                RNE_BF16: tl.constexpr):
    """Program c updates chunk c. Row c of tab (int64 [n_chunks, 3]) = (ema offset, online offset, length):
    the chunk's ema elements start at e_base + ema offset (offsets in elements from the group's first
    tensor, so the compiler keeps e_base's 16-byte alignment when E_VEC / O_VEC > 1 promise that every
    offset is a multiple of that many elements)."""
    row = tab_ptr + tl.program_id(0).to(tl.int64) * 3
    e_off = tl.multiple_of(tl.load(row), E_VEC)
    o_off = tl.multiple_of(tl.load(row + 1), O_VEC)
    n = tl.load(row + 2)
    e_ptr = e_base + e_off
    o_ptr = o_base + o_off
    if M_FROM_PTR:
        m = tl.load(m_ptr).to(ACC)
        w = 1.0 - m
    else:  # fp32 scalar arguments (ACC is fp32 here: an fp64 momentum always comes through m_ptr)
        m = m_arg
        w = w_arg
    offs = tl.arange(0, BLOCK)
    if n == CHUNK:  # a full chunk: no mask, so the accesses vectorize
        for start in tl.static_range(0, CHUNK, BLOCK):
            e = tl.load(e_ptr + start + offs).to(ACC)
            o = tl.load(o_ptr + start + offs).to(ACC)
            _lerp_store(e_ptr + start + offs, e, o, w, m, None, RNE_BF16)
    else:
        for start in tl.static_range(0, CHUNK, BLOCK):
            idx = start + offs
            mask = idx < n
            e = tl.load(e_ptr + idx, mask=mask, other=0.0).to(ACC)
            o = tl.load(o_ptr + idx, mask=mask, other=0.0).to(ACC)
            _lerp_store(e_ptr + idx, e, o, w, m, mask, RNE_BF16)


# ----------------------------------------------------------------------------------------------------
# launcher


def _is_flat(t: torch.Tensor) -> bool:
    """The elements fill one span of memory (a dense layout, any order of the strides)."""
    if t.is_contiguous():
        return True
    expected = 1
    for stride, size in sorted((s, n) for s, n in zip(t.stride(), t.shape) if n != 1):
        if stride != expected:
            return False
        expected *= size
    return True


def _work_pair(e: torch.Tensor, o: torch.Tensor):
    """(ema to update, online in the same element order, copy back?)"""
    ew, back = (e, False) if _is_flat(e) else (e.contiguous(), True)
    if (o.is_contiguous() and ew.is_contiguous()) or (o.stride() == ew.stride() and _is_flat(o)):
        ow = o
    else:
        ow = torch.empty_strided(ew.shape, ew.stride(), dtype=o.dtype, device=o.device)
        ow.copy_(o)
    return ew, ow, back


_TABLES: "collections.OrderedDict[tuple, torch.Tensor]" = collections.OrderedDict()
_TABLES_MAX = 16


def _table(pairs: List[Tuple[torch.Tensor, torch.Tensor]], device: torch.device, chunk: int) -> torch.Tensor:
    """int64 [n_chunks, 3] on ``device``: (ema offset, online offset, length) of every chunk of ``chunk``
    elements, offsets in elements from the first pair's tensors; cached on everything it depends on."""
    es, os_ = pairs[0][0].element_size(), pairs[0][1].element_size()
    spans = [(e.data_ptr(), o.data_ptr(), e.numel()) for e, o in pairs]
    key = (device, es, os_, chunk, tuple(spans))
    tab = _TABLES.get(key)
    if tab is not None:
        _TABLES.move_to_end(key)
        return tab
    e0, o0 = spans[0][0], spans[0][1]
    rows = []
    for ea, oa, n in spans:
        # addresses are multiples of the element size, so the differences are whole elements
        eo, oo = (ea - e0) // es, (oa - o0) // os_
        for start in range(0, n, chunk):
            rows.append((eo + start, oo + start, min(chunk, n - start)))
    host = torch.tensor(rows, dtype=torch.int64)
    # pinned + non_blocking: no host sync (the caching host allocator keeps the buffer until the copy ran)
    tab = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host.to(device)
    _TABLES[key] = tab
    if len(_TABLES) > _TABLES_MAX:
        _TABLES.popitem(last=False)
    return tab


def _device_ctx(x: torch.Tensor):
    return torch.cuda.device(x.device) if x.device.type == "cuda" else contextlib.nullcontext()


def ema_update_(ema: List[torch.Tensor], online: List[torch.Tensor], momentum: float,
                momentum_tensor: Optional[torch.Tensor]) -> None:
    """In place ema[i] <- momentum * ema[i] + (1 - momentum) * online[i] (arguments checked by the caller:
    same lengths, shapes, one device, floating dtypes); momentum_tensor (0-dim, on the device) wins when given."""
    if not ema:
        return
    device = ema[0].device
    groups: Dict[tuple, list] = {}
    backs = []
    for e, o in zip(ema, online):
        if e.numel() == 0:
            continue
        ew, ow, back = _work_pair(e, o)
        if back:
            backs.append((e, ew))
        aligned = ew.data_ptr() % 16 == 0 and ow.data_ptr() % 16 == 0
        groups.setdefault((ew.dtype, ow.dtype, aligned), []).append((ew, ow))
    cfg = _launch_config()
    with _device_ctx(ema[0]):
        for (edt, odt, aligned), pairs in groups.items():
            acc = torch.float64 if torch.float64 in (edt, odt) else torch.float32
            tab = _table(pairs, device, cfg["CHUNK"])
            if momentum_tensor is not None:
                m_t, from_ptr = momentum_tensor.reshape(()).to(device=device, dtype=acc), True
            elif acc == torch.float64:  # a float kernel argument is fp32: pass fp64 through memory
                m_t, from_ptr = torch.full((), momentum, dtype=acc, device=device), True
            else:
                m_t, from_ptr = tab, False
            e0, o0 = pairs[0]
            _ema_kernel[(tab.shape[0],)](
                tab, e0, o0, m_t, momentum, 1.0 - momentum, CHUNK=cfg["CHUNK"], BLOCK=cfg["BLOCK"],
                ACC=_TL_DTYPES[acc], M_FROM_PTR=from_ptr, E_VEC=16 // e0.element_size() if aligned else 1,
                O_VEC=16 // o0.element_size() if aligned else 1, RNE_BF16=_INTERPRET and edt == torch.bfloat16,
                num_warps=cfg["num_warps"])
    for e, ew in backs:
        e.copy_(ew)
