"""Sinkhorn-Knopp (SwAV codes) and the SwAV loss: every backend against the float64 references.

References (``ssl_fast.reference``): ``sinkhorn_knopp_reference`` is SwAV's algorithm as written (overflows),
``sinkhorn_knopp_log_reference`` the same normalizations in the log domain (finite for any scores).
Backends: ``cpp`` (the C++ extension), ``torch``, ``triton`` (on CUDA, or in the Triton interpreter on CPU
at small shapes). Tolerance rule: error against float64 <= 2x the error of eager torch (the reference run
in the inputs' dtype) + an absolute floor.
"""

import os

import pytest
import torch

import ssl_fast
from ssl_fast import HAS_EXT, reference
from ssl_fast.ops import sinkhorn as ops

HAS_CUDA = torch.cuda.is_available()
try:
    import triton  # noqa: F401
    HAS_TRITON = HAS_CUDA or os.environ.get("TRITON_INTERPRET") == "1"
except ImportError:  # pragma: no cover
    HAS_TRITON = False

TRITON_DEV = "cuda" if HAS_CUDA else "cpu"
needs_ext = pytest.mark.skipif(not HAS_EXT, reason="the C++ extension ssl_fast._C is not built")
needs_triton = pytest.mark.skipif(not HAS_TRITON, reason="triton (CUDA or TRITON_INTERPRET=1) unavailable")
BACKENDS = [pytest.param("cpp", marks=needs_ext), "torch", pytest.param("triton", marks=needs_triton)]
FLOORS = {torch.float32: 1e-5, torch.bfloat16: 1e-3, torch.float16: 5e-4, torch.float64: 1e-12}


def _dev(backend):
    return TRITON_DEV if backend == "triton" else "cpu"


def _run(scores, backend, eps=0.05, iters=3, **kw):
    return ops.sinkhorn_knopp(scores, eps, iters, backend=backend, **kw)


def _cosines(b, k, d=16, dtype=torch.float64):
    z = torch.nn.functional.normalize(torch.randn(b, d, dtype=torch.float64), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, d, dtype=torch.float64), dim=1)
    return (z @ c.t()).to(dtype)


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------------
# values


SHAPES = [(1, 1, 0.05, 3), (7, 1, 0.05, 3), (1, 9, 0.05, 2), (37, 13, 0.05, 3), (70, 300, 0.1, 1),
          (130, 17, 0.02, 5), (65, 64, 0.05, 3)]


@pytest.mark.parametrize("backend", ["cpp", "torch"])
@pytest.mark.parametrize("b,k,eps,iters", SHAPES)
def test_float64_equals_swav_reference(backend, b, k, eps, iters):
    if backend == "cpp" and not HAS_EXT:
        pytest.skip("no extension")
    x = _cosines(b, k)
    ref = reference.sinkhorn_knopp_reference(x, eps, iters)
    out = _run(x, backend, eps, iters)
    assert out.dtype == torch.float64 and out.shape == (b, k)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # the log-domain reference is the same algorithm
    torch.testing.assert_close(reference.sinkhorn_knopp_log_reference(x, eps, iters), ref, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("b,k,eps,iters", [(37, 13, 0.05, 3), (70, 300, 0.1, 1), (130, 17, 0.02, 5), (1, 1, 0.05, 3)])
def test_low_precision_tolerance_rule(backend, dtype, b, k, eps, iters):
    dev = _dev(backend)
    x = _cosines(b, k, dtype=dtype).to(dev)
    ref = reference.sinkhorn_knopp_reference(x.double(), eps, iters)  # float64 on the rounded inputs
    eager = reference.sinkhorn_knopp_reference(x, eps, iters)
    if not torch.isfinite(eager).all():  # fp16 eager overflows (exp(s) > 65504): eager fp32 is the yardstick
        eager = reference.sinkhorn_knopp_reference(x.float(), eps, iters)
    out = _run(x, backend, eps, iters)
    assert out.dtype == torch.float32 and out.shape == (b, k) and not out.requires_grad
    assert torch.isfinite(out).all()
    bound = 2 * _err(eager, ref) + FLOORS[dtype] * ref.abs().max().item()
    assert _err(out, ref) <= bound, (_err(out, ref), _err(eager, ref))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["column_slice", "row_slice", "transposed"])
def test_strided_scores(backend, layout):
    dev = _dev(backend)
    base = _cosines(41, 37, dtype=torch.float32).to(dev)
    if layout == "column_slice":
        x = base[:, 3:30]  # row stride 37, read in place
    elif layout == "row_slice":
        x = base[::2]
    else:
        x = base.t()  # stride along K != 1: copied
    ref = reference.sinkhorn_knopp_reference(x.double(), 0.05, 3)
    torch.testing.assert_close(_run(x, backend).double(), ref, rtol=2e-5, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("case", ["cosine_eps_0.01", "scores_50_eps_0.05", "bf16_scores_50"])
def test_extreme_inputs_stay_finite(backend, case):
    """Where the reference overflows (exp(s) with s up to 100 or 1000), the log domain stays exact."""
    dev = _dev(backend)
    if case == "cosine_eps_0.01":
        x, eps = _cosines(60, 23, dtype=torch.float32), 0.01
        x[torch.arange(5), torch.arange(5)] = 1.0  # samples sitting on their prototypes: exp(100) = inf in fp32
    else:
        x, eps = (50 * torch.rand(60, 23, dtype=torch.float64) * 2 - 50).float(), 0.05
        if case.startswith("bf16"):
            x = x.bfloat16()
    x = x.to(dev)
    eager = reference.sinkhorn_knopp_reference(x, eps, 3)
    assert not torch.isfinite(eager).all()  # the premise: SwAV's code overflows here
    ref = reference.sinkhorn_knopp_log_reference(x.double(), eps, 3)
    assert torch.isfinite(ref).all()
    out = _run(x, backend, eps, 3)
    assert torch.isfinite(out).all()
    # |s| up to 1000: fp32 scores carry ~1e-4 of absolute error in the exponent
    torch.testing.assert_close(out.double(), ref, rtol=2e-3, atol=2e-4)
    torch.testing.assert_close(out.sum(1), torch.ones(60, dtype=out.dtype, device=dev), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("backend", BACKENDS)
def test_marginals_and_convergence(backend):
    dev = _dev(backend)
    b, k = 48, 12
    x = _cosines(b, k, dtype=torch.float32).to(dev)
    errs = []
    for iters in (1, 3, 10, 100):
        q = _run(x, backend, 0.1, iters)
        torch.testing.assert_close(q.sum(1), torch.ones(b, device=dev), rtol=1e-5, atol=1e-5)  # unit sample sums
        errs.append(((q.sum(0) - b / k).abs().max() / (b / k)).item())
    assert errs[0] > 1e-2  # far from the equal partition after one sweep ...
    assert errs[1] < errs[0] and errs[2] < errs[1]
    assert errs[3] < 1e-4  # ... and it converges to prototype masses B / K


@needs_triton
@pytest.mark.parametrize("b,k", [(37, 13), (70, 150), (5, 1)])
def test_triton_multi_tile_and_chunks(monkeypatch, b, k):
    """The K-looped kernels (K > MAX_SINGLE_K) and several row chunks, forced at small shapes."""
    from ssl_fast.kernels import sinkhorn as kern
    monkeypatch.setattr(kern, "MAX_SINGLE_K", 8)
    monkeypatch.setattr(kern, "MULTI_BLOCK_K", 16)
    monkeypatch.setattr(kern, "MULTI_BLOCK_B", 4)
    monkeypatch.setattr(kern, "CHUNK_CAP", 3)
    x = _cosines(b, k, dtype=torch.float32).to(TRITON_DEV)
    ref = reference.sinkhorn_knopp_reference(x.double(), 0.05, 3)
    torch.testing.assert_close(_run(x, "triton").double(), ref, rtol=2e-5, atol=1e-6)


def test_no_gradient_flows():
    x = _cosines(9, 5, dtype=torch.float32).requires_grad_()
    q = ssl_fast.sinkhorn_knopp(x)
    assert not q.requires_grad and q.grad_fn is None


def test_public_exports():
    assert ssl_fast.sinkhorn_knopp is ssl_fast.functional.sinkhorn_knopp
    assert ssl_fast.nn.SwaVLoss is not None and ssl_fast.nn.SwaVPrototypes is not None


def test_first_call_fresh_process():
    """The first call imports nothing heavy (no sympy / torch._dynamo: ops are plain library definitions)."""
    import subprocess
    import sys

    code = ("import sys, torch, ssl_fast\n"
            "before = set(sys.modules)\n"
            "q = ssl_fast.sinkhorn_knopp(torch.randn(8, 4))\n"
            "q = ssl_fast.nn.SwaVLoss()([torch.randn(8, 4)] * 2, [])\n"
            "new = set(sys.modules) - before\n"
            "bad = sorted(m for m in new if m.startswith(('sympy', 'torch._dynamo', 'torch._inductor')))\n"
            "print('BAD', bad)\n")
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "BAD []" in out.stdout, out.stdout


# ----------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("args,kw,exc,word", [
    ((torch.randn(3),), {}, ValueError, "scores"),
    ((torch.randn(2, 3, 4),), {}, ValueError, "scores"),
    ((torch.randn(0, 4),), {}, ValueError, "empty batch"),
    ((torch.randn(4, 0),), {}, ValueError, "prototypes"),
    ((torch.randn(4, 3), 0.0), {}, ValueError, "epsilon"),
    ((torch.randn(4, 3), -0.1), {}, ValueError, "epsilon"),
    ((torch.randn(4, 3), float("nan")), {}, ValueError, "epsilon"),
    ((torch.randn(4, 3), 0.05, 0), {}, ValueError, "iterations"),
    ((torch.randn(4, 3), 0.05, 2.5), {}, TypeError, "iterations"),
    ((torch.randint(0, 3, (4, 3)),), {}, TypeError, "scores"),
    (([[1.0]],), {}, TypeError, "scores"),
])
def test_bad_input(args, kw, exc, word):
    with pytest.raises(exc, match=word):
        ssl_fast.sinkhorn_knopp(*args, **kw)


def test_check_finite():
    x = torch.randn(4, 3)
    x[1, 2] = float("nan")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ssl_fast.sinkhorn_knopp(x, check_finite=True)
    x[1, 2] = float("inf")
    with pytest.raises(ValueError, match="NaN or Inf"):
        ssl_fast.sinkhorn_knopp(x, check_finite=True)
    ssl_fast.sinkhorn_knopp(torch.randn(4, 3), check_finite=True)  # finite: no error


# ----------------------------------------------------------------------------------------------------
# torch.compile and opcheck


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_ext), "torch"])
def test_torch_compile_fullgraph(backend):
    def f(x):
        with ssl_fast.set_backend(backend):
            return ssl_fast.sinkhorn_knopp(x * 1.0, 0.05, 3) * 2.0

    torch._dynamo.reset()
    x = _cosines(33, 10, dtype=torch.float32)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(x), f(x))


@needs_ext
def test_torch_compile_fullgraph_swav_loss():
    crit = ssl_fast.nn.SwaVLoss()
    hi = [torch.randn(8, 6, requires_grad=True) for _ in range(2)]
    lo = [torch.randn(8, 6, requires_grad=True) for _ in range(2)]
    torch._dynamo.reset()
    compiled = torch.compile(lambda h, low: crit(h, low), fullgraph=True, backend="aot_eager")
    torch.testing.assert_close(compiled(hi, lo), crit(hi, lo))


def _opcheck_args(dtype, dev):
    x = _cosines(19, 7, dtype=dtype).to(dev)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    u = (0.3 * torch.randn(7, dtype=torch.float64)).to(dev, acc)
    return x, u


@needs_ext
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64], ids=["fp32", "bf16", "fp64"])
def test_opcheck_cpp(dtype):
    x, u = _opcheck_args(dtype, "cpu")
    torch.library.opcheck(torch.ops.ssl_fast.sinkhorn_col_lse_cpp.default, (x, 20.0))
    torch.library.opcheck(torch.ops.ssl_fast.sinkhorn_row_pass_cpp.default, (x, 20.0, u))
    torch.library.opcheck(torch.ops.ssl_fast.sinkhorn_apply_cpp.default, (x, 20.0, u))


@needs_triton
def test_opcheck_triton():
    x, u = _opcheck_args(torch.float32, TRITON_DEV)
    torch.library.opcheck(torch.ops.ssl_fast.sinkhorn_col_lse_triton.default, (x, 20.0))
    torch.library.opcheck(torch.ops.ssl_fast.sinkhorn_row_pass_triton.default, (x, 20.0, u))
    torch.library.opcheck(torch.ops.ssl_fast.sinkhorn_apply_triton.default, (x, 20.0, u))


@needs_ext
def test_passes_match_torch_passes():
    """Each cpp pass on its own against the torch pass (the contract of ops/sinkhorn.py)."""
    x, u = _opcheck_args(torch.float32, "cpu")
    cpp, ref = ops.TABLE["cpp"], ops.TABLE["torch"]
    for step in ("col_lse", "row_pass", "apply"):
        args = (x, 20.0) if step == "col_lse" else (x, 20.0, u)
        ra, rb = cpp[step](*args), ref[step](*args)
        for p, q in zip(ra if isinstance(ra, tuple) else (ra,), rb if isinstance(rb, tuple) else (rb,)):
            torch.testing.assert_close(p, q, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# distributed: 2 gloo processes with different scores == one process on the concatenated scores


def _dist_checks(rank, world, backends, check_lightly):
    """Runs on every rank (tests/dist_helpers.py): per-rank batches of different sizes."""
    import torch.distributed as dist

    g = torch.Generator().manual_seed(1234)
    sizes = [13, 29]  # different per-rank batch sizes
    full = torch.randn(sum(sizes), 11, generator=g, dtype=torch.float64) * 0.5
    lo = sum(sizes[:rank])
    mine = full[lo:lo + sizes[rank]]
    for backend in backends:
        for dtype in (torch.float64, torch.float32):
            for eps in (0.05, 0.01):
                single = ops.sinkhorn_knopp(full.to(dtype), eps, 3, backend=backend)[lo:lo + sizes[rank]]
                dist_q = ops.sinkhorn_knopp(mine.to(dtype), eps, 3, backend=backend,
                                            process_group=dist.group.WORLD)
                tol = 1e-10 if dtype == torch.float64 else 2e-5
                torch.testing.assert_close(dist_q, single, rtol=tol, atol=tol)
                if dtype == torch.float64 and eps == 0.05:
                    ref = reference.sinkhorn_knopp_reference(full, eps, 3)[lo:lo + sizes[rank]]
                    torch.testing.assert_close(dist_q, ref, rtol=1e-10, atol=1e-12)
    if check_lightly:  # SwaVLoss(sinkhorn_gather_distributed=True) vs lightly's, equal per-rank batches
        from lightly.loss import SwaVLoss as LSwaV
        g2 = torch.Generator().manual_seed(99 + rank)
        crops = [torch.randn(8, 10, generator=g2, dtype=torch.float64) for _ in range(4)]
        a = [c.clone().requires_grad_() for c in crops]
        b = [c.clone().requires_grad_() for c in crops]
        ours = ssl_fast.nn.SwaVLoss(sinkhorn_gather_distributed=True)(a[:2], a[2:])
        theirs = LSwaV(sinkhorn_gather_distributed=True)(b[:2], b[2:])
        torch.testing.assert_close(ours.reshape(1), theirs, rtol=1e-10, atol=1e-12)
        ours.backward()
        theirs.backward()
        for p, q in zip(a, b):
            torch.testing.assert_close(p.grad, q.grad, rtol=1e-10, atol=1e-12)


def test_distributed_two_gloo_processes():
    import torch.distributed as dist

    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    try:
        import lightly.loss  # noqa: F401
        check_lightly = True
    except ImportError:
        check_lightly = False
    backends = ["torch"] + (["cpp"] if HAS_EXT else [])
    from dist_helpers import spawn

    spawn(_dist_checks, 2, backends, check_lightly)


# ----------------------------------------------------------------------------------------------------
# SwaVLoss / SwaVPrototypes against lightly


def _crops(n_high, n_low, b, k, dtype=torch.float64):
    return ([torch.randn(b, k, dtype=dtype) * 0.5 for _ in range(n_high)],
            [torch.randn(b, k, dtype=dtype) * 0.5 for _ in range(n_low)])


def _loss_and_grads(crit, high, low, queue=None):
    h = [x.clone().requires_grad_() for x in high]
    lo = [x.clone().requires_grad_() for x in low]
    loss = crit(h, lo, queue) if queue is not None else crit(h, lo)
    loss.sum().backward()
    return loss.detach().reshape(()), [x.grad for x in h + lo]


@pytest.mark.parametrize("backend", [pytest.param("cpp", marks=needs_ext), "torch"])
@pytest.mark.parametrize("n_high,n_low,queue", [(2, 0, False), (2, 0, True), (2, 6, False), (2, 6, True),
                                                 (3, 1, False)])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_swav_loss_matches_lightly(backend, n_high, n_low, queue, dtype):
    lightly_loss = pytest.importorskip("lightly.loss")
    high, low = _crops(n_high, n_low, 16, 20, dtype)
    q = [torch.randn(24, 20, dtype=dtype) for _ in range(n_high)] if queue else None
    kw = dict(temperature=0.2, sinkhorn_iterations=4, sinkhorn_epsilon=0.05)
    with ssl_fast.set_backend(backend):
        ours, g_ours = _loss_and_grads(ssl_fast.nn.SwaVLoss(**kw), high, low, q)
    theirs, g_theirs = _loss_and_grads(lightly_loss.SwaVLoss(**kw), high, low, q)
    tol = dict(rtol=1e-10, atol=1e-12) if dtype == torch.float64 else dict(rtol=2e-5, atol=1e-6)
    assert ours.dtype == dtype
    torch.testing.assert_close(ours, theirs, **tol)
    for a, b in zip(g_ours, g_theirs):
        torch.testing.assert_close(a, b, **tol)


def test_swav_loss_bad_input():
    crit = ssl_fast.nn.SwaVLoss()
    with pytest.raises(ValueError, match="high_resolution_outputs"):
        crit([], [torch.randn(4, 3)])
    with pytest.raises(ValueError, match="two crops"):
        crit([torch.randn(4, 3)], [])
    with pytest.raises(ValueError, match="queue_outputs"):
        crit([torch.randn(4, 3)] * 2, [], [torch.randn(5, 3)])
    with pytest.raises(ValueError, match="shape"):
        crit([torch.randn(4, 3), torch.randn(5, 3)], [])
    for kw, word in [({"temperature": 0}, "temperature"), ({"sinkhorn_epsilon": -1.0}, "sinkhorn_epsilon"),
                     ({"sinkhorn_iterations": 0}, "sinkhorn_iterations")]:
        with pytest.raises(ValueError, match=word):
            ssl_fast.nn.SwaVLoss(**kw)


@pytest.mark.parametrize("n_prototypes", [30, [30, 12]])
def test_swav_prototypes_match_lightly(n_prototypes):
    heads = pytest.importorskip("lightly.models.modules")
    ours = ssl_fast.nn.SwaVPrototypes(16, n_prototypes)
    theirs = heads.SwaVPrototypes(16, n_prototypes)
    theirs.load_state_dict(ours.state_dict())  # same layout
    x = torch.randn(5, 16)
    ours.eval()
    a, b = ours(x), theirs(x)
    for p, q in zip(a if isinstance(a, list) else [a], b if isinstance(b, list) else [b]):
        torch.testing.assert_close(p, q)
    ours.normalize()
    theirs.normalize()
    for p, q in zip(ours.parameters(), theirs.parameters()):
        torch.testing.assert_close(p, q)


def test_swav_prototypes_normalize_each_step_and_freeze():
    protos = ssl_fast.nn.SwaVPrototypes(8, 6, n_steps_frozen_prototypes=2)
    with pytest.raises(ValueError, match="step"):
        protos(torch.randn(3, 8))
    w = protos.heads[0].weight
    with torch.no_grad():
        w.mul_(3.0)
    protos.train()
    out0 = protos(torch.randn(3, 8), step=0)
    torch.testing.assert_close(w.norm(dim=1), torch.ones(6))  # normalized at the step's first call
    assert not w.requires_grad and not out0.requires_grad  # frozen for steps < 2
    # several forwards of one step (one per crop), then backward: W untouched between them
    protos(torch.randn(3, 8), step=2)
    with torch.no_grad():
        w.mul_(2.0)  # as an optimizer step would change W
    s1 = protos(torch.randn(3, 8), step=3)  # new step: normalized again
    s2 = protos(torch.randn(3, 8), step=3)
    (s1.sum() + s2.sum()).backward()
    assert w.requires_grad and w.grad is not None
    torch.testing.assert_close(w.norm(dim=1), torch.ones(6))


# ----------------------------------------------------------------------------------------------------
# ahead-of-time compile of every Triton launch variant for sm_90 (no GPU needed)

_AOT = r'''
import os, sys
os.environ.pop("TRITON_INTERPRET", None)
sys.path.insert(0, os.path.join(sys.argv[1], "scripts"))
import check_triton_compile as C
import torch
from ssl_fast.kernels import sinkhorn as K
try:
    api = C._triton_api()
    C._probe(api, 90)
except C.Unsupported as e:
    print("UNSUPPORTED", e)
    sys.exit(0)
names = [n for n in dir(K) if n.endswith("_kernel")]
recs = []
class R:
    def __init__(s, n): s.n = n
    def __getitem__(s, grid):
        return lambda *a, **kw: recs.append((s.n, a, kw))
saved = {n: getattr(K, n) for n in names + ["_check"]}
for n in names:
    setattr(K, n, R(n))
K._check = lambda *a, **k: None
for dt in (torch.bfloat16, torch.float32):
    for B, Kp in ((4096, 3000), (65536, 65536), (100, 1)):
        x = torch.empty((B, Kp), dtype=dt, device="meta")
        u = torch.empty((Kp,), device="meta")
        K.col_lse(x, 20.0); K.row_pass(x, 20.0, u); K.apply(x, 20.0, u)
for n, v in saved.items():
    setattr(K, n, v)
seen, launched = set(), set()
for n, a, kw in recs:
    spec = C._specialize(api, getattr(K, n), 90, a, kw)
    if (n, str(spec)) in seen:
        continue
    seen.add((n, str(spec)))
    launched.add(n)
    out = C._compile(api, getattr(K, n), 90, *spec)
    res = C._resources(out.asm["cubin"])
    print("OK", n, kw, res)
    assert res is None or res["local"] == 0, ("spills", n, kw, res)
assert launched == set(names), set(names) - launched
print("DONE", len(seen))
'''


@pytest.mark.skipif(HAS_CUDA, reason="the GPU tier runs the kernels themselves")
def test_triton_aot_compile_sm90():
    pytest.importorskip("triton")
    import subprocess
    import sys

    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ)
    env.pop("TRITON_INTERPRET", None)
    out = subprocess.run([sys.executable, "-c", _AOT, root], capture_output=True, text=True, timeout=600, env=env)
    if "UNSUPPORTED" in out.stdout:
        pytest.skip(out.stdout.strip())
    assert out.returncode == 0 and "DONE" in out.stdout, out.stdout[-3000:] + out.stderr[-3000:]
