"""The rectangular InfoNCE op (ssl_fast.ops.infonce_rect) and info_nce(negatives=...) in one process, on every
backend (cpp, torch, triton under the interpreter on CPU), against the float64 reference.

Tolerance rule (flash-attention's): error against float64 <= 2x eager torch's error in the same dtype
(the reference run in that dtype) + an atol floor relative to the largest reference value.
"""

import os

import pytest
import torch

import ssl_fast
from ssl_fast import reference as R
from ssl_fast.ops import _library
from ssl_fast.ops import infonce_rect as rect

from infonce_helpers import FLOORS, err

BACKENDS = ["torch"] + (["cpp"] if ssl_fast.HAS_EXT else [])
try:
    import triton  # noqa: F401

    if torch.cuda.is_available() or os.environ.get("TRITON_INTERPRET") == "1":
        BACKENDS.append("triton")
except ImportError:
    pass
DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _dev(backend):
    return DEVICE if backend == "triton" else "cpu"


def _indices(r, cn, gen, self_excl=True):
    pos = torch.randint(-1, cn, (r,), generator=gen)
    excl = torch.randint(-1, cn, (r,), generator=gen) if self_excl else torch.full((r,), -1)
    excl = torch.where(excl == pos, torch.full_like(excl, -1), excl)
    return pos, excl


def _run(fn, rows, cands, pos, excl, t, w, **kw):
    """terms and the gradients of sum(w * terms) w.r.t. rows, candidates and temperature."""
    out = fn(rows, cands, pos, excl, t, **kw)
    g = torch.autograd.grad((out * w.to(out.dtype)).sum(), [rows, cands, t])
    return out.detach(), [x.detach() for x in g]


def _definition(rows, cands, pos, excl, temperature, *, normalize=True):
    """The per-row terms from their definition, independent of ``reference.infonce_rect_reference`` (which IS
    the torch backend, so the torch backend is checked against this instead of against itself): the whole
    logit matrix, ``log_softmax`` at the positive, an explicit max-shifted log-sum-exp where there is none."""
    if normalize:
        rows = rows / rows.norm(dim=1, keepdim=True).clamp_min(1e-12)
        cands = cands / cands.norm(dim=1, keepdim=True).clamp_min(1e-12)
    s = (rows @ cands.t()) / temperature
    cols = torch.arange(s.shape[1], device=s.device)
    s = torch.where(cols[None, :] == excl[:, None], torch.full_like(s, float("-inf")), s)
    m = s.max(dim=1, keepdim=True).values
    lse = m.squeeze(1) + torch.log(torch.exp(s - m).sum(dim=1))
    at_pos = -torch.nn.functional.log_softmax(s, dim=1).gather(1, pos.clamp(min=0)[:, None]).squeeze(1)
    return torch.where(pos >= 0, at_pos, lse)


SHAPES = [(1, 1, 1), (5, 9, 3), (37, 70, 20), (66, 33, 130)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
def test_rect_vs_float64(backend, shape, dtype, normalize, monkeypatch):
    interpreted = backend == "triton" and DEVICE == "cpu"  # on a GPU every triton case runs, on CUDA tensors
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("triton: fp32/bf16/fp16")
    if interpreted and shape[2] > 64 and dtype != torch.float32:
        pytest.skip("one wide-d case is enough under the interpreter")
    if interpreted and dtype == torch.float16 and not normalize:
        pytest.skip("covered by bf16")
    monkeypatch.setattr(_library, "CPU_BLOCK", 8)  # several tiles per row / column block, ragged last tiles
    _check_vs_float64(backend, shape, dtype, normalize)


# The cpp op's own tiling (block 0): row blocks of up to 256 rows, 128-column chunks, the chunks of a row block
# split into ranges merged at the end. 1 row: one row block, 8 ranges of one chunk; 37 x 1000: 8 ranges, the last
# chunk ragged (1000 = 7 x 128 + 104); 300 x 700: two row blocks of 150, 6 ranges, d = 33.
CPP_SHAPES = [(1, 1000, 20), (37, 1000, 20), (300, 700, 33)]


@pytest.mark.skipif(not ssl_fast.HAS_EXT, reason="needs ssl_fast._C (cpp backend)")
@pytest.mark.parametrize("shape", CPP_SHAPES, ids=lambda s: "x".join(map(str, s)))
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16, torch.float64],
                         ids=["fp32", "bf16", "fp16", "fp64"])
def test_rect_cpp_default_tiling_vs_float64(shape, dtype, monkeypatch):
    monkeypatch.setattr(_library, "CPU_BLOCK", 0)
    _check_vs_float64("cpp", shape, dtype, True)


def _check_vs_float64(backend, shape, dtype, normalize):
    r, cn, d = shape
    gen = torch.Generator().manual_seed(r * 1000 + cn)
    dev = _dev(backend)
    base_r = torch.randn(r, d + 3, generator=gen, dtype=torch.float64)
    base_c = torch.randn(cn, d, generator=gen, dtype=torch.float64)
    pos, excl = (t.to(dev) for t in _indices(r, cn, gen))
    w = torch.randn(r, generator=gen, dtype=torch.float64).to(dev)
    temp = 0.5 if normalize else 4.0
    # float64 reference and eager in the dtype, on the same rounded values
    rows_q = base_r.to(dtype)
    cands_q = base_c.to(dtype)

    def leaves(dt, strided):
        x = rows_q.to(dev, dt)
        x = (x[:, 2:2 + d] if strided else x[:, 2:2 + d].contiguous()).detach().requires_grad_()
        return x, cands_q.to(dev, dt).detach().requires_grad_()

    expected = _definition if backend == "torch" else R.infonce_rect_reference
    r64, c64 = leaves(torch.float64, False)
    t64 = torch.tensor(temp, dtype=torch.float64, device=dev, requires_grad=True)
    ref, gref = _run(lambda *a: expected(*a, normalize=normalize), r64, c64, pos, excl, t64, w)
    if dtype == torch.float64:
        eager, geager = ref, [torch.zeros_like(g) for g in gref]
    else:
        re_, ce_ = leaves(dtype, False)
        te = torch.tensor(temp, dtype=dtype, device=dev, requires_grad=True)
        eager, geager = _run(lambda *a: expected(*a, normalize=normalize), re_, ce_, pos, excl, te, w)
    # ours: strided rows (a column slice), learnable fp32 temperature
    ro, co = leaves(dtype, True)
    to = torch.tensor(temp, dtype=torch.float64 if dtype == torch.float64 else torch.float32, device=dev,
                      requires_grad=True)
    out, gout = _run(lambda *a: rect.infonce_rect(*a, normalize=normalize, backend=backend), ro, co, pos, excl, to, w)
    assert out.dtype == (torch.float64 if dtype == torch.float64 else torch.float32) and out.shape == (r,)
    assert gout[0].dtype == dtype and gout[0].shape == ro.shape
    floor = FLOORS.get(dtype, 1e-12)
    scale = max(1.0, ref.abs().max().item())
    assert torch.isfinite(out).all()
    assert err(out, ref) <= 2 * err(eager, ref) + floor * scale, (err(out, ref), err(eager, ref))
    for name, g, e, rf in zip(["drows", "dcands", "dtemp"], gout, geager, gref):
        assert torch.isfinite(g).all(), name
        gs = rf.abs().max().item() or 1.0
        assert err(g, rf) <= 2 * err(e, rf) + floor * gs, (name, err(g, rf), err(e, rf))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("symmetric", [False, True], ids=["oneway", "sym"])
def test_info_nce_negatives(backend, symmetric):
    dev = _dev(backend)
    q, k = torch.randn(7, 12, dtype=torch.float64), torch.randn(7, 12, dtype=torch.float64)
    neg = torch.randn(10, 12, dtype=torch.float64)
    dt = torch.float32 if backend == "triton" else torch.float64
    tol = 1e-5 if dt == torch.float32 else 1e-10
    qq, kk = (x.to(dev, dt).requires_grad_() for x in (q, k))
    t = torch.tensor(0.2, dtype=dt, device=dev, requires_grad=True)
    with ssl_fast.set_backend(backend):
        loss = ssl_fast.info_nce(qq, kk, t, symmetric=symmetric, feature_dim=9, negatives=neg.to(dev, dt))
    g = torch.autograd.grad(loss, [qq, kk, t])
    q64, k64 = q.clone().requires_grad_(), k.clone().requires_grad_()
    t64 = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    ref = R.info_nce_negatives_reference(q64, k64, neg, t64, symmetric=symmetric, feature_dim=9)
    gr = torch.autograd.grad(ref, [q64, k64, t64])
    assert err(loss, ref) <= tol * max(1, abs(ref.item()))
    for a, b in zip(g, gr):
        assert err(a, b) <= tol * max(1.0, b.abs().max().item())
    # a (M, feature_dim) queue is the same queue
    with ssl_fast.set_backend(backend):
        loss2 = ssl_fast.info_nce(qq, kk, t, symmetric=symmetric, feature_dim=9, negatives=neg[:, :9].to(dev, dt))
    assert err(loss2, loss) <= tol


def test_info_nce_negatives_bad_input():
    q, k = torch.randn(4, 8), torch.randn(4, 8)
    with pytest.raises(ValueError, match="negatives"):
        ssl_fast.info_nce(q, k, negatives=torch.randn(5, 7))
    with pytest.raises(ValueError, match="negatives"):
        ssl_fast.info_nce(q, k, negatives=torch.randn(5, 8, dtype=torch.float64))
    with pytest.raises(ValueError, match="negatives"):
        ssl_fast.info_nce(q, k, negatives=torch.randn(5, 8, device="meta"))
    with pytest.raises(ValueError, match="negatives"):
        ssl_fast.info_nce(q, k, negatives=torch.randn(5))
    with pytest.raises(TypeError, match="negatives"):
        ssl_fast.info_nce(q, k, negatives=[[0.0] * 8])
    with pytest.raises(ValueError, match="process_group"):
        ssl_fast.ntxent(q, k, process_group="everyone")


def test_process_group_single_process_falls_back():
    """process_group=True without an initialized group is the single-process loss."""
    z1, z2 = torch.randn(5, 8), torch.randn(5, 8)
    assert err(ssl_fast.ntxent(z1, z2, process_group=True), ssl_fast.ntxent(z1, z2)) == 0


@pytest.mark.skipif(not ssl_fast.HAS_EXT, reason="needs ssl_fast._C")
def test_opcheck_cpp():
    fwd, bwd = torch.ops.ssl_fast.infonce_rect_fwd_cpp.default, torch.ops.ssl_fast.infonce_rect_bwd_cpp.default
    rows, cands = torch.randn(5, 4), torch.randn(9, 4)
    pos, excl = torch.tensor([0, 1, -1, 3, 8]), torch.tensor([2, -1, 4, 0, 1])
    it = torch.tensor(2.0)
    for with_grad in (False, True):
        torch.library.opcheck(fwd, (rows, cands, None, pos, excl, it, True, with_grad, 0))
        torch.library.opcheck(fwd, (rows, cands[:6], cands[6:], pos, excl, it, True, with_grad, 0))
    terms, lse, an, cn, anorm, cnorm, u = fwd(rows, cands, None, pos, excl, it, True, True, 0)
    assert u.shape == (5, 4)
    torch.library.opcheck(bwd, (torch.randn(5), an, cn, anorm, cnorm, u, lse, pos, excl, it, True, 7, 0))


@pytest.mark.skipif(not ssl_fast.HAS_EXT, reason="needs ssl_fast._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cpp_negatives_as_second_tensor(dtype):
    """Negatives passed as a second tensor (a queue: no concatenated copy) give bit for bit the outputs of the
    concatenated candidates, including a row-strided queue view."""
    fwd = torch.ops.ssl_fast.infonce_rect_fwd_cpp.default
    gen = torch.Generator().manual_seed(3)
    rows, keys = torch.randn(7, 20, generator=gen).to(dtype), torch.randn(7, 20, generator=gen).to(dtype)
    queue = torch.randn(300, 24, generator=gen).to(dtype)[:, :20]  # row stride 24
    pos, excl = torch.arange(7), torch.full((7,), -1)
    it = torch.tensor(3.0)
    one = fwd(rows, torch.cat([keys, queue]), None, pos, excl, it, True, True, 0)
    two = fwd(rows, keys, queue, pos, excl, it, True, True, 0)
    assert len(one) == len(two)
    for a, b in zip(one, two):
        assert torch.equal(a, b)


@pytest.mark.skipif(not ssl_fast.HAS_EXT, reason="needs ssl_fast._C")
@pytest.mark.parametrize("block", [0, 8])
def test_cpp_forward_with_and_without_grad(block):
    """The forward that saves U (with_grad) and the LSE-only forward give the same terms and LSE bit for bit;
    U is the softmax-weighted mean of the candidates; the backward refuses a forward without U. Positive and
    excluded columns in other chunks / ranges than each other, a row whose only candidate is excluded
    (t = -inf, U = 0) and one without a positive."""
    fwd, bwd = torch.ops.ssl_fast.infonce_rect_fwd_cpp.default, torch.ops.ssl_fast.infonce_rect_bwd_cpp.default
    gen = torch.Generator().manual_seed(7)
    r, cn, d = 6, 1000, 12
    rows, cands = torch.randn(r, d, generator=gen, dtype=torch.float64), torch.randn(cn, d, generator=gen,
                                                                                     dtype=torch.float64)
    pos = torch.tensor([999, 0, -1, 500, 130, 3])
    excl = torch.tensor([0, 999, 640, -1, 129, 4])
    it = torch.tensor(5.0, dtype=torch.float64)
    for dt in (torch.float32, torch.float64):
        x, y = rows.to(dt), cands.to(dt)
        terms0, lse0, *saved0 = fwd(x, y, None, pos, excl, it.to(dt), True, False, block)
        terms1, lse1, *saved1 = fwd(x, y, None, pos, excl, it.to(dt), True, True, block)
        assert saved0[-1].shape == (0, d) and saved1[-1].shape == (r, d)
        assert torch.equal(terms0, terms1) and torch.equal(lse0, lse1)
        with pytest.raises(RuntimeError, match="with_grad=False"):
            bwd(torch.ones(r, dtype=dt), *saved0, lse0, pos, excl, it.to(dt), True, 5, block)
        an, cn_ = saved1[0].double(), saved1[1].double()
        s = (an @ cn_.t() * 5.0).masked_fill(torch.arange(cn)[None, :] == excl[:, None], float("-inf"))
        u_ref = torch.softmax(s, dim=1) @ cn_
        tol = 1e-12 if dt == torch.float64 else 1e-5
        lse_rows = lse1[:r] + lse1[r:]  # (max, log-sum): the R maxima, then the R log-sums
        assert err(saved1[-1], u_ref) <= tol and err(lse_rows, torch.logsumexp(s, dim=1)) <= tol * 10
    # one candidate, excluded: t = -inf and a zero U, no NaN
    x, y = torch.randn(1, 3), torch.randn(1, 3)
    terms, lse, *saved = fwd(x, y, None, torch.tensor([-1]), torch.tensor([0]), torch.tensor(1.0), True, True, block)
    assert terms.item() == float("-inf") and torch.equal(lse, torch.full((2,), float("-inf")))
    assert torch.equal(saved[-1], torch.zeros(1, 3))


@pytest.mark.skipif(not ssl_fast.HAS_EXT, reason="needs ssl_fast._C")
def test_cpp_grad_only_for_some_inputs(monkeypatch):
    """The forward saves U whenever any input needs a gradient: the temperature alone (gz needs dA), the
    candidates alone, the rows; and only then (no_grad, or no input requiring grad: the LSE-only forward); all
    against the float64 reference."""
    seen = []
    fwd = rect.TABLE["cpp"]["fwd"]

    def spy(*args):
        seen.append(args[7])  # with_grad
        return fwd(*args)

    monkeypatch.setitem(rect.TABLE["cpp"], "fwd", spy)
    gen = torch.Generator().manual_seed(8)
    rows, cands = torch.randn(9, 16, generator=gen, dtype=torch.float64), torch.randn(300, 16, generator=gen,
                                                                                     dtype=torch.float64)
    pos, excl = _indices(9, 300, gen)
    for need in ("temperature", "candidates", "rows"):
        x, y = rows.clone().requires_grad_(need == "rows"), cands.clone().requires_grad_(need == "candidates")
        t = torch.tensor(0.3, dtype=torch.float64, requires_grad=need == "temperature")
        leaf = {"rows": x, "candidates": y, "temperature": t}[need]
        out = rect.infonce_rect(x, y, pos, excl, t, backend="cpp")
        (g,) = torch.autograd.grad(out.sum(), [leaf])
        x2, y2 = rows.clone().requires_grad_(need == "rows"), cands.clone().requires_grad_(need == "candidates")
        t2 = torch.tensor(0.3, dtype=torch.float64, requires_grad=need == "temperature")
        ref = R.infonce_rect_reference(x2, y2, pos, excl, t2)
        (gr,) = torch.autograd.grad(ref.sum(), [{"rows": x2, "candidates": y2, "temperature": t2}[need]])
        assert err(out, ref) <= 1e-12 and err(g, gr) <= 1e-12 * max(1.0, gr.abs().max().item()), need
    assert seen == [True, True, True]
    with torch.no_grad():
        out = rect.infonce_rect(rows.clone().requires_grad_(), cands, pos, excl, 0.3, backend="cpp")
    assert err(out, R.infonce_rect_reference(rows, cands, pos, excl, 0.3)) <= 1e-12
    out2 = rect.infonce_rect(rows, cands, pos, excl, 0.3, backend="cpp")
    assert torch.equal(out, out2) and seen[3:] == [False, False]
    # grad_candidates=False: the candidates ride as negatives (grad_cols = 0)
    x = rows.clone().requires_grad_()
    out = rect.infonce_rect(x, cands, pos, excl, 0.3, grad_candidates=False, backend="cpp")
    (g,) = torch.autograd.grad(out.sum(), [x])
    x2 = rows.clone().requires_grad_()
    t64 = torch.tensor(0.3, dtype=torch.float64)
    (gr,) = torch.autograd.grad(R.infonce_rect_reference(x2, cands, pos, excl, t64).sum(), [x2])
    assert err(g, gr) <= 1e-12 * max(1.0, gr.abs().max().item())


@pytest.mark.skipif("triton" not in BACKENDS, reason="needs triton (CUDA or the interpreter)")
def test_opcheck_triton():
    fwd, bwd = torch.ops.ssl_fast.infonce_rect_fwd_triton.default, torch.ops.ssl_fast.infonce_rect_bwd_triton.default
    rows, cands = torch.randn(5, 4, device=DEVICE), torch.randn(9, 4, device=DEVICE)
    pos = torch.tensor([0, 1, -1, 3, 8], device=DEVICE)
    excl = torch.tensor([2, -1, 4, 0, 1], device=DEVICE)
    it = torch.tensor(2.0, device=DEVICE)
    torch.library.opcheck(fwd, (rows, cands, pos, excl, it, True))
    terms, lse, xn, yn = fwd(rows, cands, pos, excl, it, True)
    torch.library.opcheck(bwd, (torch.randn(5, device=DEVICE), rows, cands, xn, yn, lse, pos, excl, it, True, 7))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_compile_fullgraph(backend):
    q, k = torch.randn(6, 8, requires_grad=True), torch.randn(6, 8, requires_grad=True)
    neg = torch.randn(5, 8)

    def f(q, k, neg):
        return ssl_fast.info_nce(q, k, 0.2, negatives=neg, symmetric=True)

    with ssl_fast.set_backend(backend):
        eager = f(q, k, neg)
        ge = torch.autograd.grad(eager, [q, k])
        compiled = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, neg)
        gc = torch.autograd.grad(compiled, [q, k])
    assert err(compiled, eager) < 1e-6
    for a, b in zip(gc, ge):
        assert err(a, b) < 1e-6


@pytest.mark.skipif(not ssl_fast.HAS_EXT, reason="needs ssl_fast._C (cpp backend)")
def test_first_call_negatives_is_cheap():
    """A fresh process's first info_nce(negatives=...) imports nothing heavy (no sympy / dynamo)."""
    import json
    import subprocess
    import sys

    import test_first_call as tfc

    child = tfc.CHILD.replace("fn = getattr(ssl_fast, sys.argv[1])",
                              "fn = lambda a, b: ssl_fast.info_nce(a, b, negatives=2 * b.detach()[:16])")
    assert child != tfc.CHILD
    env = dict(os.environ, OMP_NUM_THREADS="2")
    env.pop("TRITON_INTERPRET", None)
    proc = subprocess.run([sys.executable, "-c", child, "x"], cwd=tfc.ROOT, env=env, capture_output=True,
                          text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout.strip().splitlines()[-1])
    assert r["heavy"] == [] and r["grad_ok"], r
    assert r["mib"] < 20.0, r
