"""The optimizer step fused with the EMA teacher update (ssl_fast.ops.optim_ema, ssl_fast.optim).

The claim under test is parity with torch: the fused step + EMA gives what ``torch.optim.SGD`` /
``torch.optim.AdamW`` (``foreach=True``, torch's CPU default) followed by ``torch._foreach_lerp_`` give,
to the last bit in fp32 (``csrc/cpu/optim_ema.cpp`` derives why), on lists of mixed shapes with tails
(1, 7, 33 and > 32K elements), for several steps. Where it is not bitwise, the test states the bound:

* bf16 parameters: the kernels compute in fp32 and round to bf16 only at the stores (torch's fused=True
  semantics), torch's foreach path after every op: the error against float64 is at most twice foreach's;
* LARS: the trust ratio comes from deterministic fp64 norms, ``ssl_fast.train.LARS`` from
  ``torch._foreach_norm`` (fp32): the updates agree to a relative 1e-5;
* AdamW ``ieee_sqrt=True`` (the default) / the triton backend: a correctly rounded sqrt instead of MKL's, as
  ``torch.optim.AdamW(fused=True)``; ``ieee_sqrt=False`` is the foreach-bitwise mode most tests below take.
"""

import copy
import math

import pytest
import torch
from torch import nn

import ssl_fast
import ssl_fast.optim as fopt
from ssl_fast.nn import EMA
from ssl_fast.ops import _backend
from ssl_fast.ops import optim_ema as ops
from ssl_fast.train.optim import LARS as TorchLARS

BACKENDS = ["torch"]
if ssl_fast.HAS_EXT:
    BACKENDS.append("cpp")
HAS_TRITON = _backend.triton_available() and (_backend.interpreter_enabled() or torch.cuda.is_available())
M = 0.996


def _bits(t):
    return t.view(torch.int16 if t.element_size() == 2 else torch.int32).long()


def _ulps(a, b):
    return (_bits(a) - _bits(b)).abs()


def _assert_bitwise(got, ref, what):
    for i, (a, b) in enumerate(zip(got, ref)):
        assert a.dtype == b.dtype and a.shape == b.shape, (what, i)
        d = _ulps(a, b)
        assert int(d.max()) == 0 if d.numel() else True, (what, i, tuple(a.shape), int((d != 0).sum()), int(d.max()))


def _shapes(big):
    return [(1,), (7,), (33,), (5, 3, 3, 3), (129, 65), (big,)]


def _make(shapes, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(s, generator=g).to(dtype) for s in shapes]


def _torch_run(kind, ps0, grads, steps, ema_dtype, n_ema, kw):
    """torch.optim (foreach) + torch._foreach_lerp_ on the first n_ema params: the reference."""
    params = [p.clone().requires_grad_() for p in ps0]
    opt = (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(params, foreach=True, **kw)
    ema = [p.detach().to(ema_dtype).clone() for p in ps0[:n_ema]]
    for s in range(steps):
        for p, g in zip(params, grads[s]):
            p.grad = g.clone()
        opt.step()
        torch._foreach_lerp_(ema, [p.detach().to(ema_dtype) for p in params[:n_ema]], 1.0 - M)
    return [p.detach() for p in params], ema, opt


def _ours_run(kind, ps0, grads, steps, ema_dtype, n_ema, kw, backend, ieee_sqrt=False):
    params = [p.clone().requires_grad_() for p in ps0]
    ema = [p.detach().to(ema_dtype).clone() for p in ps0[:n_ema]]
    cls = fopt.SGD if kind == "sgd" else fopt.AdamW
    extra = dict(ieee_sqrt=ieee_sqrt) if kind == "adamw" else {}
    opt = cls(params, ema=list(zip(params[:n_ema], ema)), ema_momentum=M, backend=backend, **kw, **extra)
    for s in range(steps):
        for p, g in zip(params, grads[s]):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params], ema, opt


def _states(opt, params, keys):
    out = []
    for p in params:
        st = opt.state[p]
        out += [st[k] for k in keys if k in st]
    return out


SGD_CASES = [dict(lr=0.03, momentum=0.9, weight_decay=1e-4), dict(lr=0.03, momentum=0.9, nesterov=True, weight_decay=1e-4),
             dict(lr=0.1, momentum=0.9, dampening=0.1), dict(lr=0.05), dict(lr=0.05, weight_decay=5e-4)]
ADAMW_CASES = [dict(lr=1e-3, weight_decay=0.05), dict(lr=3e-3, betas=(0.8, 0.99), eps=1e-6, weight_decay=0.0),
               dict(lr=1e-3, betas=(0.3, 0.999), weight_decay=0.1)]  # 1 - beta1 >= 1/2: torch.lerp's other side
CASES = [("sgd", kw) for kw in SGD_CASES] + [("adamw", kw) for kw in ADAMW_CASES]
CASE_IDS = [f"{k}-{i}" for i, (k, _) in enumerate(CASES)]


# ----------------------------------------------------------------------------------------------------
# parity with torch.optim + _foreach_lerp_


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_fp32_bitwise_torch_optim(kind, kw, backend):
    """fp32 params, fp32 EMA on 4 of 6 params, 3 steps: params, states and EMA to the last bit."""
    shapes = _shapes(70_001)
    ps0 = _make(shapes, torch.float32)
    grads = [_make(shapes, torch.float32, seed=s + 1) for s in range(3)]
    ref_p, ref_e, ref_opt = _torch_run(kind, ps0, grads, 3, torch.float32, 4, kw)
    got_p, got_e, got_opt = _ours_run(kind, ps0, grads, 3, torch.float32, 4, kw, backend)
    _assert_bitwise(got_p, ref_p, "params")
    _assert_bitwise(got_e, ref_e, "ema")
    keys = ["momentum_buffer", "exp_avg", "exp_avg_sq", "step"]
    ref_params = [p for g in ref_opt.param_groups for p in g["params"]]
    got_params = [p for g in got_opt.param_groups for p in g["params"]]
    _assert_bitwise(_states(got_opt, got_params, keys), _states(ref_opt, ref_params, keys), "state")


def _max_err(got, ref):
    """Per tensor: max |got - ref| (float64)."""
    return [(a.double() - b).abs().max().item() if a.numel() else 0.0 for a, b in zip(got, ref)]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs ssl_fast._C")
@pytest.mark.parametrize("kind,kw", CASES, ids=CASE_IDS)
def test_bf16_params_fp32_ema_within_twice_eager_error(kind, kw):
    """bf16 params (and grads and states), an fp32 EMA of them, 3 steps. The kernel computes in fp32 and
    rounds to bf16 only where it stores (torch's fused=True semantics), torch's foreach path after every op:
    against torch.optim + lerp run in float64 from the same bf16 values, the kernel's error (params and EMA)
    is at most twice the eager bf16 path's, plus a floor of the roundings that any bf16 step makes: half a bf16
    ulp of the tensor's scale per step (params; a 1-element tensor has no max over many elements to even
    out a lucky eager rounding) and (1 - m) of that for the EMA."""
    shapes = _shapes(70_001)
    ps0 = _make(shapes, torch.bfloat16)
    grads = [_make(shapes, torch.bfloat16, seed=s + 1) for s in range(3)]
    eager_p, eager_e, _ = _torch_run(kind, ps0, grads, 3, torch.float32, 6, kw)
    ref_p, ref_e, _ = _torch_run(kind, [p.double() for p in ps0], [[g.double() for g in gs] for gs in grads], 3,
                                 torch.float64, 6, kw)
    got_p, got_e, _ = _ours_run(kind, ps0, grads, 3, torch.float32, 6, kw, "cpp")
    assert all(a.dtype == torch.bfloat16 for a in got_p) and all(e.dtype == torch.float32 for e in got_e)
    scales = [b.abs().max().item() for b in ref_p]
    floor = 3 * 2 ** -8  # 3 steps, half an ulp (2^-8 of the scale's binade) each
    for what, got, eager, ref, floor in (("params", got_p, eager_p, ref_p, floor),
                                         ("ema", got_e, eager_e, ref_e, (1 - M) * floor)):
        for shape, e_got, e_eager, sc in zip(shapes, _max_err(got, ref), _max_err(eager, ref), scales):
            assert e_got <= 2 * e_eager + floor * sc, (what, shape, e_got, e_eager)


def _torch_fused_run(kind, ps0, grads, kw):
    """torch.optim.SGD / AdamW(fused=True) for len(grads) steps from ps0: the parameters after them."""
    params = [p.clone().requires_grad_() for p in ps0]
    opt = (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(params, fused=True, **kw)
    for step_grads in grads:
        for p, g in zip(params, step_grads):
            p.grad = g.clone()
        opt.step()
    return [p.detach() for p in params]


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs ssl_fast._C")
@pytest.mark.parametrize("kind,kw", [("sgd", SGD_CASES[0]), ("adamw", ADAMW_CASES[0])], ids=["sgd", "adamw"])
def test_bf16_params_match_torch_fused_true(kind, kw):
    """bf16 parameters: the kernel's semantics are torch.optim's fused=True ones (fp32 math and scalars, one
    rounding per stored value); AdamW with ieee_sqrt=True (fused=True's sqrt). What may differ is the
    contraction of a product into an FMA in the last fp32 bit before the rounding: the bf16 params agree
    within one bf16 ulp, and in almost every element exactly."""
    shapes = _shapes(70_001)
    ps0 = _make(shapes, torch.bfloat16)
    grads = [_make(shapes, torch.bfloat16, seed=s + 1) for s in range(3)]
    params = _torch_fused_run(kind, ps0, grads, kw)
    extra = {"ieee_sqrt": True} if kind == "adamw" else {}
    got, _, _ = _ours_run(kind, ps0, grads, 3, torch.float32, 0, kw, "cpp", **extra)
    diff = total = 0
    for a, b in zip(got, params):
        d = _ulps(a, b)
        assert int(d.max()) <= 1, tuple(a.shape)
        diff += int((d != 0).sum())
        total += d.numel()
    assert diff <= 1e-3 * total, (diff, total)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs ssl_fast._C")
def test_adamw_ieee_sqrt_within_an_ulp_of_foreach():
    """ieee_sqrt=True (the correctly rounded sqrt, torch's fused=True / CUDA choice) agrees with the cpp
    backend's default in m and v exactly, and in params to the rounding of one sqrt; the torch backend with
    ieee_sqrt takes the same sqrt: bitwise equal to the cpp kernel."""
    shapes = _shapes(70_001)
    ps0 = _make(shapes, torch.float32)
    grads = [_make(shapes, torch.float32, seed=s + 1) for s in range(3)]
    kw = dict(lr=1e-3, weight_decay=0.05)
    exact, _, o1 = _ours_run("adamw", ps0, grads, 3, torch.float32, 0, kw, "cpp", ieee_sqrt=False)
    ieee, _, o2 = _ours_run("adamw", ps0, grads, 3, torch.float32, 0, kw, "cpp", ieee_sqrt=True)
    ieee_t, _, _ = _ours_run("adamw", ps0, grads, 3, torch.float32, 0, kw, "torch", ieee_sqrt=True)
    _assert_bitwise(ieee, ieee_t, "ieee cpp vs ieee torch backend")
    for a, b in zip(exact, ieee):
        assert (a - b).abs().max().item() <= 2 * 2 ** -23 * b.abs().max().item()


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs ssl_fast._C")
def test_relation_to_torch_fused_true():
    """torch's fused=True CPU kernels: SGD's vector loop rounds as foreach, so as ours (its scalar tail, the last
    n mod 16 elements, contracts differently: <= 2 ulps of the weights' scale); AdamW differs from foreach only
    by its correctly rounded sqrt, so ieee_sqrt=True (the default) reproduces it bitwise here, tails included
    (in a trainer run one tail element of a 4-element bias differed by an ulp: its tail, like SGD's, may
    contract differently), and ieee_sqrt=False (foreach's MKL sqrt) stays within 2 ulps of the weights' scale."""
    shapes = _shapes(70_001)
    ps0 = _make(shapes, torch.float32)
    grads = [_make(shapes, torch.float32, seed=s + 1) for s in range(3)]
    for kind, kw, extra in (("sgd", dict(lr=0.03, momentum=0.9, weight_decay=1e-4), {}),
                            ("adamw", dict(lr=1e-3, weight_decay=0.05), {"ieee_sqrt": True}),
                            ("adamw", dict(lr=1e-3, weight_decay=0.05), {"ieee_sqrt": False})):
        ref = _torch_fused_run(kind, ps0, grads, kw)
        got, _, _ = _ours_run(kind, ps0, grads, 3, torch.float32, 0, kw, "cpp", **extra)
        for a, b in zip(got, ref):
            d = _ulps(a, b).flatten()
            body = (a.numel() // 16) * 16  # fused=True's vector loop; its scalar tail (< 16 elements) may differ
            if kind == "adamw" and extra["ieee_sqrt"]:
                assert int(d.max()) == 0, (tuple(a.shape), int((d != 0).sum()))
            elif kind == "sgd":
                assert int(d[:body].max()) == 0 if body else True, (tuple(a.shape), int((d[:body] != 0).sum()))
            assert (a - b).abs().max().item() <= 2 * 2 ** -23 * b.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_lars_matches_project_lars(dtype, backend):
    """ssl_fast.optim.LARS vs ssl_fast.train.LARS (+ lerp): the torch backend is the same code (bitwise); the
    fused kernel's trust ratio uses fp64 norms: the total update agrees to a relative 1e-5 (fp32), plus the
    last bit of the weight it lands on."""
    shapes = _shapes(70_001)
    ps0 = _make(shapes, dtype)
    grads = [[g * 1e-2 for g in _make(shapes, dtype, seed=s + 1)] for s in range(3)]

    def run(fused):
        params = [p.clone().requires_grad_() for p in ps0]
        ema = [p.detach().float().clone() for p in ps0]
        groups = [{"params": params[3:], "weight_decay": 1e-4, "lars": True},
                  {"params": params[:3], "weight_decay": 0.0, "lars": False}]
        if fused:
            opt = fopt.LARS(groups, lr=0.3, momentum=0.9, ema=list(zip(params, ema)), ema_momentum=M, backend=backend)
        else:
            opt = TorchLARS(groups, lr=0.3, momentum=0.9)
        for s in range(3):
            for p, g in zip(params, grads[s]):
                p.grad = g.clone()
            opt.step()
            if not fused:
                torch._foreach_lerp_(ema, [p.detach().float() for p in params], 1 - M)
        return [p.detach() for p in params], ema

    ref_p, ref_e = run(False)
    got_p, ema = run(True)
    if backend == "torch":
        _assert_bitwise(got_p, ref_p, "params")
        _assert_bitwise(ema, ref_e, "ema")
        return
    for a, b, p0 in zip(got_p, ref_p, ps0):
        upd = (b.float() - p0.float()).abs().max().item()
        scale = b.float().abs().max().item()
        tol = 1e-5 * upd + 2 ** -23 * scale if dtype == torch.float32 else 2 ** -7 * scale
        assert (a.float() - b.float()).abs().max().item() <= tol, tuple(a.shape)
    for a, b in zip(ema, ref_e):
        assert (a - b).abs().max().item() <= (1e-6 if dtype == torch.float32 else 1e-4)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs ssl_fast._C")
def test_lars_trust_ratio_within_ulps_of_foreach_norm():
    """The fused LARS's trust ratios (fp64 norms, thread-count free) against the float64 truth: <= 2 fp32 ulps
    (the roundings of the two norms, of eta ||w|| and of the quotient); torch._foreach_norm's fp32 ratios
    (the unfused LARS) are never closer to it, and far from it on long tensors with one dominant element."""
    g = torch.Generator().manual_seed(3)
    p = [torch.randn(n, generator=g) for n in (1, 7, 33, 4099, 70_001, 300_000)]
    gr = [torch.randn(x.shape, generator=g) * 1e-3 for x in p]
    for x in gr:
        x.view(-1)[0] = 1.0  # the update of element 0 is then exactly trust * 1
    eta = 1e-3
    truth = torch.stack([eta * x.double().norm() / y.double().norm() for x, y in zip(p, gr)])
    ref = eta * torch.stack(torch._foreach_norm(p)) / torch.stack(torch._foreach_norm(gr))
    bufs = [torch.zeros_like(x) for x in p]
    ops.lars_ema_step_([x.clone() for x in p], gr, bufs, [], lr=1.0, momentum=0.0, weight_decay=0.0, eta=eta,
                       backend="cpp")
    ours = torch.stack([b.view(-1)[0] for b in bufs])
    assert (_ulps(ours, truth.float()) <= 2).all(), (ours, truth)
    # torch's fp32 norm loses the small terms next to a large one (here ~400 ulps on 300K elements)
    assert (_ulps(ours, truth.float()) <= _ulps(ref, truth.float()) + 1).all(), (ours, ref, truth)


@pytest.mark.skipif(not HAS_TRITON, reason="needs triton (a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("kind", ["sgd", "adamw", "lars"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_triton_matches_cpp(kind, dtype):
    """The Triton kernels (the interpreter on CPU) against the C++ kernel (ieee sqrt for AdamW): the same ops;
    <= 1 ulp where the interpreter's fp64 fma emulation double-rounds, in practice bitwise."""
    if not ssl_fast.HAS_EXT or torch.cuda.is_available():
        pytest.skip("compares with the CPU kernel under the interpreter")
    shapes = [(1,), (7,), (33,), (5, 3, 3, 3), (1500,)]
    out = {}
    for backend in ("cpp", "triton"):
        ps = _make(shapes, dtype)
        ema = [p.float().clone() for p in ps[:4]]
        s1 = [torch.zeros_like(p) for p in ps]
        s2 = [torch.zeros_like(p) for p in ps]
        for step in range(1, 3):
            gs = _make(shapes, dtype, seed=10 + step)
            if kind == "sgd":
                ops.sgd_ema_step_(ps, gs, s1, ema, [step == 1] * len(ps), lr=0.03, momentum=0.9, weight_decay=1e-4,
                                  nesterov=True, ema_momentum=M, backend=backend)
            elif kind == "adamw":
                ops.adamw_ema_step_(ps, gs, s1, s2, ema, [step] * len(ps), lr=1e-3, weight_decay=0.05, ieee_sqrt=True,
                                    ema_momentum=M, backend=backend)
            else:
                ops.lars_ema_step_(ps, gs, s1, ema, lr=0.3, weight_decay=1e-4, ema_momentum=M, backend=backend)
        out[backend] = ps + ema + s1
    for a, b in zip(out["cpp"], out["triton"]):
        assert int(_ulps(a, b).max()) <= 1


# ----------------------------------------------------------------------------------------------------
# layouts, missing gradients, dtypes the kernels do not take


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_and_channels_last_params(backend):
    """A parameter with gaps (a column-sliced view), a channels-last one whose grad is contiguous and whose
    EMA is contiguous, a transposed one: bitwise torch (fp32), the views written through."""
    base = torch.randn(16, 40)
    conv = torch.randn(8, 3, 5, 5).contiguous(memory_format=torch.channels_last)
    tr = torch.randn(9, 6).t()
    ps0 = [base[:, ::2], conv, tr, torch.randn(33)]
    grads = [[torch.randn(p.shape) for p in ps0] for _ in range(2)]   # all contiguous
    kw = dict(lr=0.03, momentum=0.9, weight_decay=1e-4)
    ref_p, ref_e, _ = _torch_run("sgd", ps0, grads, 2, torch.float32, 4, kw)
    # ours on the views themselves (the base tensor must change through the view)
    base2 = base.clone()
    params = [base2[:, ::2], conv.clone(), tr.clone(), ps0[3].clone()]
    assert params[1].is_contiguous(memory_format=torch.channels_last) and not params[2].is_contiguous()
    ema = [p.clone().contiguous() for p in params]
    bufs = [torch.empty_like(p) for p in params]
    for s in range(2):
        ops.sgd_ema_step_(params, grads[s], bufs, ema, [s == 0] * 4, ema_momentum=M, backend=backend, **kw)
    _assert_bitwise([p.contiguous() for p in params], [p.contiguous() for p in ref_p], "params")
    _assert_bitwise(ema, [e.contiguous() for e in ref_e], "ema")
    assert torch.equal(base2[:, ::2], params[0]) and torch.equal(base2[:, 1::2], base[:, 1::2])


@pytest.mark.parametrize("backend", BACKENDS)
def test_grad_none_skipped_and_teacher_still_follows(backend):
    """A parameter without a gradient gets no optimizer step and no state, but its teacher still moves toward it
    (as opt.step(); ema.update() would); a parameter without a teacher (a predictor) gets the step only."""
    g = torch.Generator().manual_seed(0)
    ps0 = [torch.randn(s, generator=g) for s in ((4, 3), (3,), (5,), (2, 2))]
    params = [p.clone().requires_grad_() for p in ps0]
    ref = [p.clone().requires_grad_() for p in ps0]
    teachers = [p.clone() + 1 for p in ps0[:3]]
    ref_t = [t.clone() for t in teachers]
    opt = fopt.SGD(params, lr=0.1, momentum=0.9, ema=list(zip(params[:3], teachers)), ema_momentum=0.9, backend=backend)
    ref_opt = torch.optim.SGD(ref, lr=0.1, momentum=0.9, foreach=True)
    for step in range(2):
        for i, (p, r) in enumerate(zip(params, ref)):
            gr = None if i == 1 else torch.randn(p.shape, generator=g)
            p.grad = gr
            r.grad = None if gr is None else gr.clone()
        opt.step()
        ref_opt.step()
        torch._foreach_lerp_(ref_t, [r.detach() for r in ref[:3]], 1 - 0.9)
    assert "momentum_buffer" not in opt.state[params[1]]
    assert torch.equal(params[1].detach(), ps0[1])
    _assert_bitwise([p.detach() for p in params], [r.detach() for r in ref], "params")
    _assert_bitwise(teachers, ref_t, "teachers")
    assert not torch.equal(teachers[1], ps0[1] + 1)  # moved although its online param had no gradient


@pytest.mark.parametrize("dtype", [torch.float16, torch.float64])
def test_other_dtypes_use_torch_math(dtype):
    """fp16 / fp64 parameters: auto picks the torch backend (the kernels take fp32 / bf16): torch.optim's result."""
    shapes = [(7,), (33,), (300,)]
    ps0 = _make(shapes, dtype)
    grads = [_make(shapes, dtype, seed=s + 1) for s in range(2)]
    kw = dict(lr=0.03, momentum=0.9, weight_decay=1e-4)
    ref_p, ref_e, _ = _torch_run("sgd", ps0, grads, 2, dtype, 3, kw)
    got_p, got_e, _ = _ours_run("sgd", ps0, grads, 2, dtype, 3, kw, None)
    _assert_bitwise(got_p, ref_p, "params")
    _assert_bitwise(got_e, ref_e, "ema")


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs ssl_fast._C")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("kind", ["sgd", "adamw", "lars"])
def test_bitwise_independent_of_threads(kind, dtype):
    """Elementwise kernels, and LARS's norms summed over fixed blocks: the same bits at 1, 2 and 4 threads
    (bf16 parameters with an fp32 EMA too)."""
    shapes = [(7,), (300_001,), (70_000,), (33,)]
    results = []
    prev = torch.get_num_threads()
    try:
        for t in (1, 2, 4):
            torch.set_num_threads(t)
            ps = _make(shapes, dtype)
            ema = [p.float().clone() for p in ps]
            s1 = [torch.zeros_like(p) for p in ps]
            s2 = [torch.zeros_like(p) for p in ps]
            gs = _make(shapes, dtype, seed=5)
            if kind == "sgd":
                ops.sgd_ema_step_(ps, gs, s1, ema, lr=0.1, momentum=0.9, weight_decay=1e-4, ema_momentum=M,
                                  backend="cpp")
            elif kind == "adamw":
                ops.adamw_ema_step_(ps, gs, s1, s2, ema, [1.0] * 4, lr=1e-3, ema_momentum=M, backend="cpp")
            else:
                ops.lars_ema_step_(ps, gs, s1, ema, lr=0.3, weight_decay=1e-4, ema_momentum=M, backend="cpp")
            results.append(ps + ema + s1)
    finally:
        torch.set_num_threads(prev)
    for other in results[1:]:
        _assert_bitwise(other, results[0], "threads")


# ----------------------------------------------------------------------------------------------------
# bad input


@pytest.mark.parametrize("backend", BACKENDS)
def test_bad_input_names_the_argument(backend):
    p = [torch.randn(3), torch.randn(4)]
    g = [torch.randn(3), torch.randn(4)]
    b = [torch.zeros(3), torch.zeros(4)]
    step = dict(lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match=r"grads\[1\]"):
        ops.sgd_ema_step_(p, [g[0], torch.randn(5)], b, [], **step)
    with pytest.raises(TypeError, match=r"momentum_buffers\[0\]"):
        ops.sgd_ema_step_(p, g, [torch.zeros(3, dtype=torch.float64), b[1]], [], **step)
    with pytest.raises(ValueError, match=r"ema\[0\]"):
        ops.sgd_ema_step_(p, g, b, [torch.zeros(2)], **step)
    with pytest.raises(ValueError, match="ema must pair"):
        ops.sgd_ema_step_(p, g, b, [torch.zeros(3), torch.zeros(4), torch.zeros(1)], **step)
    with pytest.raises(ValueError, match="grads must have one tensor"):
        ops.sgd_ema_step_(p, g[:1], b, [], **step)
    with pytest.raises(TypeError, match="params must be a list"):
        ops.sgd_ema_step_(p[0], g, b, [], **step)
    with pytest.raises(ValueError, match="momentum must be in"):
        ops.sgd_ema_step_(p, g, b, [torch.zeros(3)], ema_momentum=1.5, lr=0.1, momentum=0.9, backend=backend)
    with pytest.raises(ValueError, match="lr must be in"):
        ops.sgd_ema_step_(p, g, b, [], lr=-1.0, backend=backend)
    with pytest.raises(ValueError, match="steps must be >= 1"):
        ops.adamw_ema_step_(p, g, b, [torch.zeros(3), torch.zeros(4)], [], [0, 0], lr=1e-3, backend=backend)
    with pytest.raises(ValueError, match=r"sparse"):
        ops.sgd_ema_step_(p[:1], [torch.randn(3).to_sparse()], b[:1], [], **step)
    before = [x.clone() for x in p]
    with pytest.raises((ValueError, TypeError)):  # a failing call writes nothing
        ops.sgd_ema_step_(p, [g[0], torch.randn(4, dtype=torch.float64)], b, [], **step)
    assert all(torch.equal(x, y) for x, y in zip(p, before))


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs ssl_fast._C")
def test_cpp_rejects_dtypes_it_does_not_take():
    p = [torch.randn(3, dtype=torch.float16)]
    with pytest.raises(TypeError, match=r"params\[0\]"):
        ops.sgd_ema_step_(p, [torch.randn(3, dtype=torch.float16)], [], [], lr=0.1, backend="cpp")
    with pytest.raises(TypeError, match=r"ema\[0\]"):
        ops.sgd_ema_step_([torch.randn(3)], [torch.randn(3)], [], [torch.zeros(3, dtype=torch.bfloat16)], lr=0.1,
                          backend="cpp")


def test_optimizer_rejects_unsupported_options():
    w = nn.Parameter(torch.randn(3))
    with pytest.raises(ValueError, match="maximize"):
        fopt.SGD([w], lr=0.1, maximize=True)
    with pytest.raises(ValueError, match="amsgrad"):
        fopt.AdamW([w], amsgrad=True)
    with pytest.raises(ValueError, match="Nesterov"):
        fopt.SGD([w], lr=0.1, nesterov=True)
    with pytest.raises(ValueError, match="learning rate"):
        fopt.SGD([w], lr=-0.1)
    with pytest.raises(ValueError, match="ema_momentum is required"):
        fopt.SGD([w], lr=0.1, ema=[(w, torch.zeros(3))])
    with pytest.raises(ValueError, match="needs ema="):
        fopt.SGD([w], lr=0.1, ema_momentum=0.9)
    with pytest.raises(TypeError, match=r"ema\[0\]"):
        fopt.SGD([w], lr=0.1, ema=[w], ema_momentum=0.9)
    with pytest.raises(ValueError, match=r"ema\[0\]: online and teacher shapes"):
        fopt.SGD([w], lr=0.1, ema=[(w, torch.zeros(2))], ema_momentum=0.9)
    opt = torch.optim.SGD([w], lr=0.1, maximize=True)
    ours = fopt.SGD([w], lr=0.1)
    ours.load_state_dict(opt.state_dict())
    w.grad = torch.randn(3)
    with pytest.raises(ValueError, match="maximize"):
        ours.step()


# ----------------------------------------------------------------------------------------------------
# state_dict, nn.EMA, GradScaler, trainers


@pytest.mark.parametrize("kind", ["sgd", "adamw"])
def test_state_dict_round_trip_with_torch(kind):
    """Two steps of torch's optimizer, its state loaded into ours, two more steps each: the same bits; and
    the other way round."""
    kw = dict(lr=0.05, momentum=0.9, weight_decay=1e-4) if kind == "sgd" else dict(lr=1e-3, weight_decay=0.05)
    g = torch.Generator().manual_seed(1)
    ps0 = [torch.randn(s, generator=g) for s in ((6, 5), (7,))]
    grads = [[torch.randn(p.shape, generator=g) for p in ps0] for _ in range(4)]
    tcls = torch.optim.SGD if kind == "sgd" else torch.optim.AdamW
    fcls = fopt.SGD if kind == "sgd" else fopt.AdamW

    def steps(opt, params, idx):
        for s in idx:
            for p, gr in zip(params, grads[s]):
                p.grad = gr.clone()
            opt.step()

    # AdamW with ieee_sqrt=False: foreach's sqrt (the default, fused=True's, may differ from foreach by an ulp)
    fkw = dict(ieee_sqrt=False) if kind == "adamw" else {}
    ref = [p.clone().requires_grad_() for p in ps0]
    ref_opt = tcls(ref, foreach=True, **kw)
    steps(ref_opt, ref, range(4))
    for first, second in ((tcls, fcls), (fcls, tcls)):
        params = [p.clone().requires_grad_() for p in ps0]
        a = first(params, **kw, **fkw) if first is fcls else first(params, foreach=True, **kw)
        steps(a, params, range(2))
        b = second(params, **kw, **fkw) if second is fcls else second(params, foreach=True, **kw)
        b.load_state_dict(copy.deepcopy(a.state_dict()))
        steps(b, params, range(2, 4))
        _assert_bitwise([p.detach() for p in params], [r.detach() for r in ref], f"{first.__name__}->{second.__name__}")
        if kind == "adamw":
            assert b.state[params[0]]["step"].item() == 4


class _Net(nn.Module):
    def __init__(self):
        super().__init__()
        self.body = nn.Sequential(nn.Linear(5, 8), nn.BatchNorm1d(8), nn.ReLU(), nn.Linear(8, 4))

    def forward(self, x):
        return self.body(x)


@pytest.mark.parametrize("kind", ["sgd", "adamw", "lars"])
def test_nn_ema_attachment_equals_step_then_update(kind):
    """ema=nn.EMA: opt.step() == torch's opt.step(); ema.update(): the teacher's parameters, its BatchNorm
    buffers (copied) and its step counter; a predictor outside the EMA gets the optimizer step only."""
    torch.manual_seed(0)
    student, head = _Net(), nn.Linear(4, 4)
    student2, head2 = copy.deepcopy(student), copy.deepcopy(head)
    ema = EMA(student, momentum=0.9, total_steps=10)
    ema2 = EMA(student2, momentum=0.9, total_steps=10)
    params = list(student.parameters()) + list(head.parameters())
    params2 = list(student2.parameters()) + list(head2.parameters())
    if kind == "sgd":
        opt = fopt.SGD(params, lr=0.1, momentum=0.9, ema=ema)
        ref = torch.optim.SGD(params2, lr=0.1, momentum=0.9, foreach=True)
    elif kind == "adamw":
        opt = fopt.AdamW(params, lr=1e-2, ema=ema, ieee_sqrt=False)  # foreach's sqrt: bitwise foreach
        ref = torch.optim.AdamW(params2, lr=1e-2, foreach=True)
    else:
        opt = fopt.LARS(params, lr=0.1, ema=ema, backend="torch")
        ref = TorchLARS(params2, lr=0.1)
    for step in range(3):
        x = torch.randn(16, 5)
        for s, h, o in ((student, head, opt), (student2, head2, ref)):
            o.zero_grad()
            h(s(x)).pow(2).mean().backward()
        opt.step()
        ref.step()
        ema2.update()
    assert ema.step == ema2.step == 3 and ema.last_momentum == ema2.last_momentum
    a, b = ema.teacher.state_dict(), ema2.teacher.state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]
    _assert_bitwise([p.detach() for p in params], [p.detach() for p in params2], "params")


def test_grad_scaler_skip_skips_the_ema():
    """GradScaler: an inf gradient makes scaler.step skip opt.step(), so the fused EMA (and nn.EMA's counter)
    does not move; a finite step then updates both."""
    torch.manual_seed(0)
    net = _Net()
    ema = EMA(net, momentum=0.9, total_steps=10)
    opt = fopt.SGD(net.parameters(), lr=0.1, momentum=0.9, ema=ema)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0 ** 8)
    before = copy.deepcopy(ema.teacher.state_dict())
    online = [p.detach().clone() for p in net.parameters()]
    scaler.scale(net(torch.randn(8, 5)).sum()).backward()
    next(net.parameters()).grad[0, 0] = float("inf")
    scaler.step(opt, ema_step=1, ema_total_steps=10)
    scaler.update()
    assert ema.step == 0
    assert all(torch.equal(a, b) for a, b in zip(online, net.parameters()))
    assert all(torch.equal(before[k], v) for k, v in ema.teacher.state_dict().items())
    opt.zero_grad()
    scaler.scale(net(torch.randn(8, 5)).sum()).backward()
    scaler.step(opt, ema_step=1, ema_total_steps=10)
    scaler.update()
    assert ema.step == 2 and ema.last_momentum == ema.momentum_at(1, 10)
    assert not all(torch.equal(before[k], v) for k, v in ema.teacher.state_dict().items() if v.is_floating_point())


def _tiny(method, run_dir, **kw):
    base = dict(method=method, data="digits", image_size=16, width=4, batch_size=32, proj_hidden_dim=32,
                proj_dim=16, pred_hidden_dim=16, queue_size=64 if method == "moco" else 0, max_steps=4,
                warmup_epochs=0, knn=False, progress=False, run_dir=str(run_dir), ckpt_every=100, log_every=1,
                threads=1, weight_decay=1e-4)
    base.update(kw)
    return base


@pytest.mark.skipif("cpp" not in BACKENDS, reason="the fused path's default backend is the C++ kernel")
@pytest.mark.parametrize("method,extra", [("byol", {}), ("moco", {}), ("moco", {"moco_version": "v3", "queue_size": 0})],
                         ids=["byol", "moco-v2", "moco-v3"])
@pytest.mark.parametrize("optimizer", ["sgd", "adamw", "lars"])
def test_trainer_flag_on_and_off_give_the_same_weights(method, extra, optimizer, tmp_path):
    """BYOL / MoCo, 4 fp32 steps: --fused-ema-step and --no-fused-ema-step give the same losses and, for sgd and
    adamw, the same bits in every tensor of the method (online, predictor, teacher, BatchNorm buffers, queue);
    lars: within 1e-5 of the largest weight (the trust ratio's norms)."""
    from ssl_fast.train import Trainer, make_config

    out = {}
    for fused in (True, False):
        tr = Trainer(make_config(_tiny(method, tmp_path / str(fused), optimizer=optimizer, fused_ema_step=fused,
                                       **extra)))
        tr.fit()
        assert (getattr(tr.optimizer, "ema", None) is not None) == fused  # the teacher rides in the step
        out[fused] = ({k: v for k, v in tr.method.state_dict().items() if torch.is_tensor(v)}, tr.losses())
    (a, la), (b, lb) = out[True], out[False]
    assert a.keys() == b.keys()
    if optimizer == "lars":
        scale = max(v.abs().max().item() for v in b.values() if v.is_floating_point() and v.numel())
        assert all((a[k].double() - b[k].double()).abs().max().item() <= 1e-5 * scale for k in a if a[k].numel())
        assert all(math.isclose(x, y, rel_tol=1e-5) for x, y in zip(la, lb))
    else:
        assert la == lb
        assert all(torch.equal(a[k], b[k]) for k in a), [k for k in a if not torch.equal(a[k], b[k])]


def test_fused_ops_have_fake_impls():
    """torch.compile traces through the ops (fake impls registered; the fused optimizer's op in a graph)."""
    if not ssl_fast.HAS_EXT:
        pytest.skip("needs ssl_fast._C")
    from torch._subclasses.fake_tensor import FakeTensorMode

    with FakeTensorMode():
        p, g, b, e = (torch.empty(5) for _ in range(4))
        torch.ops.ssl_fast.sgd_ema_step_([p], [g], [b], [e], [0], 0.1, 0.9, 0.0, 0.0, False, 0.9, None)
        torch.ops.ssl_fast.adamw_ema_step_([p], [g], [b], [b], [e], [1.0], 0.1, 0.9, 0.999, 1e-8, 0.0, False, 0.9,
                                           None)
        torch.ops.ssl_fast.lars_ema_step_([p], [g], [b], [e], 0.1, 0.9, 0.0, 1e-3, True, 0.9, None)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="needs ssl_fast._C")
def test_compiled_step_matches_eager():
    """The fused op inside torch.compile(fullgraph=True) (its fake impl traces; no graph break): same bits."""
    shapes = [(7,), (33, 3)]
    ps, gs = _make(shapes, torch.float32), _make(shapes, torch.float32, seed=1)
    pc, ec, bc = [p.clone() for p in ps], [p.clone() for p in ps], [torch.zeros_like(p) for p in ps]
    pe, ee, be = [p.clone() for p in ps], [p.clone() for p in ps], [torch.zeros_like(p) for p in ps]

    def step(params, bufs, ema, m):
        ops.sgd_ema_step_(params, gs, bufs, ema, lr=0.1, momentum=0.9, weight_decay=1e-4, ema_momentum=m)

    m = torch.tensor(0.99)
    torch._dynamo.reset()
    torch.compile(step, fullgraph=True)(pc, bc, ec, m)
    step(pe, be, ee, m)
    _assert_bitwise(pc + bc + ec, pe + be + ee, "compiled vs eager")
    assert not torch.equal(pc[0], ps[0])


# ----------------------------------------------------------------------------------------------------
# ssl_fast::stream_probe_ (csrc/cpu/stream_probe.cpp): the bench's memory ceiling of the fused step. Its
# time is only meaningful if it really reads and writes every stream: checked through its values.

needs_ext = pytest.mark.skipif(not ssl_fast.HAS_EXT, reason="ssl_fast._C not built")


def _probe_want(written, read, n):
    """float64 of the contract: w_j <- w_j / 2 + r_0 for j = 0 .. max(W - 2, 0), then (W >= 2) the last stream
    w_{W-1} <- w_{W-1} / 2 + w_0 as stored (bf16: truncated)."""
    W = len(written) // n
    out = [None] * len(written)
    for t in range(n):
        for j in range(max(W - 1, 1)):
            v = 0.5 * written[j * n + t].double() + read[t].double()
            if written[j * n + t].dtype == torch.bfloat16:  # stored truncated: the tail reads the stored value
                v = _truncate_bf16(v.float()).double()
            out[j * n + t] = v
        if W >= 2:
            out[(W - 1) * n + t] = 0.5 * written[(W - 1) * n + t].double() + out[t]
    return out


def _truncate_bf16(x):
    return (x.view(torch.int32) & -65536).view(torch.float32)


@needs_ext
@pytest.mark.parametrize("m_dt,e_dt", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                       (torch.bfloat16, torch.bfloat16), (torch.float32, torch.bfloat16)])
@pytest.mark.parametrize("W", [1, 2, 3, 4])
def test_stream_probe_reads_and_writes_every_stream(m_dt, e_dt, W):
    g = torch.Generator().manual_seed(3)
    sizes = [7, 0, 70001, 1, 33]  # an empty item, items split across threads (> 32K elements), tails
    n = len(sizes)
    read = [torch.randn(s, generator=g).to(m_dt) for s in sizes]
    # the streams of loop 1 in the parameters' dtype, the last one (the EMA's place) in e_dt when W >= 2
    dts = [m_dt] * (W - 1) + [e_dt] if W >= 2 else [m_dt]
    written = [torch.randn(s, generator=g).to(dt) for dt in dts for s in sizes]
    want = _probe_want(written, read, n)
    torch.ops.ssl_fast.stream_probe_(written, read, n, 256)
    for k, (got, w) in enumerate(zip(written, want)):
        if got.numel() == 0:
            continue
        # bf16 stores truncate (below 2^-7 relative), fp32 ones round (an FMA at most; the tail's w_0 may be
        # 1 ulp off when the compiler contracted loop 1)
        tol = 2.0 ** -7 if got.dtype == torch.bfloat16 else 1e-6
        err = float(((got.double() - w).abs() / w.abs().clamp_min(1.0)).max())
        assert err <= tol, (k, got.dtype, err)


@needs_ext
def test_stream_probe_read_only_pass_and_errors():
    x = [torch.randn(40000), torch.randn(5)]
    y = [t.clone() for t in x]
    torch.ops.ssl_fast.stream_probe_([], x + x, 2, 1024)  # W = 0 (the LARS norm pass): reads, writes nothing
    assert all(torch.equal(a, b) for a, b in zip(x, y))
    p = torch.ops.ssl_fast.stream_probe_
    with pytest.raises(ValueError, match="read must hold"):
        p([torch.zeros(3)], [], 1, 256)
    with pytest.raises(ValueError, match="read must hold"):  # R = 2 with written streams
        p([torch.zeros(3)], [torch.zeros(3)] * 2, 1, 256)
    with pytest.raises(ValueError, match="written must hold"):
        p([torch.zeros(3)] * 3, [torch.zeros(3)] * 2, 2, 256)
    with pytest.raises(ValueError, match="written must hold"):  # W = 5
        p([torch.zeros(3)] * 5, [torch.zeros(3)], 1, 256)
    with pytest.raises(TypeError, match=r"written\[0\] is BFloat16"):  # loop 1 takes the read streams' dtype
        p([torch.zeros(3, dtype=torch.bfloat16), torch.zeros(3)], [torch.zeros(3)], 1, 256)
    with pytest.raises(ValueError, match=r"written\[1\] has 4 elements"):
        p([torch.zeros(3), torch.zeros(4)], [torch.zeros(3)], 1, 256)
    with pytest.raises(TypeError, match=r"read\[0\] must be float32 or bfloat16"):
        p([torch.zeros(3)], [torch.zeros(3, dtype=torch.float16)], 1, 256)
    with pytest.raises(ValueError, match="contiguous"):
        p([torch.zeros(3, 2).t()], [torch.zeros(2, 3)], 1, 256)
    with pytest.raises(ValueError, match="span"):
        p([torch.zeros(3)], [torch.zeros(3)], 1, 8)
