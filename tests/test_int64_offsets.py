"""Int64 offsets of the Triton kernels at sizes a CPU test cannot allocate: views whose row stride puts an
element beyond 2^31 elements from the tile's first row (as_strided into a storage that is mostly never
touched: Linux backs an untouched allocation with no memory), and two EMA tensors 2^31 elements apart in one
storage. The kernels run in the interpreter (TRITON_INTERPRET=1) in a subprocess, so that a 32-bit offset
that wraps (a read far outside the storage: a segfault) fails this test instead of the session; each result
must equal the same kernel on a contiguous copy of the same values, bit for bit (same tiles, same order).

What the rest of the review found to hold without a run (2N = 4,194,304 at D = 128; Sinkhorn B x K > 2^31):
element offsets row x stride are int64 in every kernel (program ids and row indices stay int32, < 2^31 rows
checked by the launchers), in-tile row offsets are widened before the stride multiplies them (this test), the
partial / workspace buffers index their slot rows in int64, and the Sinkhorn kernels multiply int64 rows by
the row stride of the scores and of the codes (B x K elements of output: scores (4, 2^30 + 8) strided here).
"""

import os
import subprocess
import sys

import pytest

pytest.importorskip("triton")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r'''
import os, sys
os.environ["TRITON_INTERPRET"] = "1"
import torch
which = sys.argv[1]
torch.manual_seed(0)

def strided(n, d, dtype, lo_row):
    """(n, d) rows with a row stride S such that row lo_row sits 2^31 elements past row 0; the values are set."""
    s = (1 << 31) // lo_row + 16
    try:
        base = torch.empty((n - 1) * s + d, dtype=dtype)
    except RuntimeError as exc:
        print("SKIP", exc)
        sys.exit(0)
    x = base.as_strided((n, d), (s, 1))
    x.copy_(torch.randn(n, d).to(dtype))
    return x

def same(a, b, what):
    assert torch.equal(a, b), (what, (a.float() - b.float()).abs().max().item())

if which == "infonce":
    from ssl_fast.kernels import infonce as K
    from ssl_fast.kernels import infonce_rect as KR
    n, d, it, g = 64, 16, torch.tensor(10.0), torch.tensor(1.0)
    for dtype in (torch.float32, torch.bfloat16):
        z1 = strided(n, d, dtype, 40)  # tile rows 40..63 reach past 2^31 elements
        z2 = torch.randn(n, d).to(dtype)
        c1 = z1.contiguous()
        out = K.ntxent_forward(z1, z2, it, True, d)
        ref = K.ntxent_forward(c1, z2, it, True, d)
        for a, b in zip(out, ref):
            same(a, b, "ntxent fwd")
        for a, b in zip(K.ntxent_backward(g, z1, z2, *out[1:], it, True, d),
                        K.ntxent_backward(g, c1, z2, *out[1:], it, True, d)):
            same(a, b, "ntxent bwd")
        out = K.info_nce_forward(z2, z1, it, True, True, d)  # the strided tensor as the keys (columns)
        ref = K.info_nce_forward(z2, c1, it, True, True, d)
        for a, b in zip(out, ref):
            same(a, b, "info_nce fwd")
        for a, b in zip(K.info_nce_backward(g, z2, z1, *out[1:], it, True, True, d),
                        K.info_nce_backward(g, z2, c1, *out[1:], it, True, True, d)):
            same(a, b, "info_nce bwd")
        rows, cands = strided(n, d, dtype, 40), torch.randn(70, d).to(dtype)
        pos, excl = torch.arange(n) % 70, torch.full((n,), -1)
        out = KR.rect_forward(rows, cands, pos, excl, it, True)
        ref = KR.rect_forward(rows.contiguous(), cands, pos, excl, it, True)
        for a, b in zip(out, ref):
            same(a, b, "rect fwd")
        w = torch.randn(n)
        for a, b in zip(KR.rect_backward(w, rows, cands, *out[2:], out[1], pos, excl, it, True, 70),
                        KR.rect_backward(w, rows.contiguous(), cands, *out[2:], out[1], pos, excl, it, True, 70)):
            same(a, b, "rect bwd")
elif which == "sinkhorn":
    from ssl_fast.kernels import sinkhorn as K
    for k in (8, 5000):  # one tile per row block / K tiles looped
        x = strided(4, k, torch.float32, 2)  # rows 2, 3 beyond 2^31 elements: B x K-sized offsets
        c = x.contiguous()
        u = torch.randn(k)
        for a, b in zip(K.col_lse(x, 20.0), K.col_lse(c, 20.0)):
            same(a, b, "col_lse")
        same(K.row_pass(x, 20.0, u), K.row_pass(c, 20.0, u), "row_pass")
        same(K.apply(x, 20.0, u), K.apply(c, 20.0, u), "apply")
elif which == "ema":
    from ssl_fast.kernels import ema as K
    try:
        base = torch.empty((1 << 31) + 4096, dtype=torch.bfloat16)
    except RuntimeError as exc:
        print("SKIP", exc)
        sys.exit(0)
    e = [base[:1000], base[(1 << 31):(1 << 31) + 3000]]  # 2^31 elements apart: the chunk table's offsets
    for t in e:
        t.copy_(torch.randn(t.numel()))
    o = [torch.randn(t.numel()).to(torch.bfloat16) for t in e]
    want = [t.float().lerp(p.float(), 0.25) for t, p in zip(e, o)]
    K.ema_update_(e, o, 0.75, None)
    for t, r in zip(e, want):
        torch.testing.assert_close(t.float(), r, rtol=1e-2, atol=1e-2)
print("DONE", which)
'''


@pytest.mark.parametrize("which", ["infonce", "sinkhorn", "ema"])
def test_offsets_beyond_int32(which):
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=ROOT)
    proc = subprocess.run([sys.executable, "-c", _SCRIPT, which], cwd=ROOT, env=env, capture_output=True,
                          text=True, timeout=900)
    if "SKIP" in proc.stdout:
        pytest.skip(proc.stdout.strip().splitlines()[-1])
    assert proc.returncode == 0 and f"DONE {which}" in proc.stdout, \
        f"rc {proc.returncode}\n{proc.stdout[-2000:]}\n{proc.stderr[-3000:]}"
