"""EMA teacher update (ssl_fast.ema_update_, update_momentum, nn.EMA) and the BYOL / SimSiam losses.

Every backend available here runs: ``cpp`` (csrc/cpu/ema.cpp), ``torch`` (``_foreach_lerp_``) and ``triton``
(kernels/ema.py, in the interpreter on a CPU-only machine: small sizes). Values are compared with the
float64 reference under the tolerance rule: error <= 2x the error of eager torch in the same dtypes (the
per-parameter ``ema.mul_(m).add_(online, alpha=1 - m)`` loop) + an atol floor relative to max |ref|.
"""

import math
import os
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as TF
from torch import nn

import ssl_fast
from ssl_fast import reference
from ssl_fast.ops import _backend
from ssl_fast.ops import ema as ops

DTYPES = [torch.float32, torch.bfloat16, torch.float16, torch.float64]
NAMES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16", torch.float64: "fp64"}
FLOORS = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float16: 5e-4, torch.float64: 1e-12}

BACKENDS = ["torch"]
if ssl_fast.HAS_EXT:
    BACKENDS.append("cpp")
if _backend.triton_available() and _backend.interpreter_enabled() or torch.cuda.is_available():
    BACKENDS.append("triton")
# triton runs on CUDA tensors where a GPU is present (the GPU run of this file), else in the interpreter on CPU
# tensors at small sizes; cpp and torch run on CPU tensors
TRITON_DEV = "cuda" if torch.cuda.is_available() else "cpu"
INTERPRETED = TRITON_DEV == "cpu"


def _dev(backend):
    return TRITON_DEV if backend == "triton" else "cpu"

PAIRS = [(e, o) for e in DTYPES for o in DTYPES]
PAIR_IDS = [f"{NAMES[e]}<-{NAMES[o]}" for e, o in PAIRS]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item() if a.numel() else 0.0


def _eager(ema, online, m):
    """The per-parameter loop users write, in the tensors' own dtypes."""
    out = [e.detach().clone() for e in ema]
    for e, o in zip(out, online):
        e.mul_(m).add_(o.to(e.dtype), alpha=1.0 - m)
    return out


def _assert_rule(got, ema_before, online, m, edt):
    ref = reference.ema_update_reference(ema_before, online, m)
    eager = _eager(ema_before, online, m)
    for i, (g, r, e) in enumerate(zip(got, ref, eager)):
        assert g.dtype == edt and g.shape == r.shape
        scale = max(1.0, r.abs().max().item()) if r.numel() else 1.0
        bound = 2 * _err(e, r) + FLOORS[edt] * scale
        assert _err(g, r) <= bound, (i, tuple(r.shape), _err(g, r), _err(e, r))


def _mixed_list(edt, odt, big, n_small=12, gen_seed=0, device="cpu"):
    """Odd sizes, a 0-dim and a 1-element tensor, strided views, channels-last, many small and one large."""
    g = torch.Generator().manual_seed(gen_seed)

    def rnd(*shape):  # the same values on every device; the views below are taken on the device
        return torch.randn(shape, generator=g, dtype=torch.float64).to(device)

    ema_base = rnd(16, 40)
    ema = [rnd(), rnd(1), rnd(7), rnd(33, 17), rnd(3, 5, 7, 2), ema_base[:, ::2],       # a view with gaps
           rnd(9, 6).t(), rnd(2, 3, 4, 5).contiguous(memory_format=torch.channels_last), rnd(big)]
    ema += [rnd(int(n)) for n in torch.randint(1, 50, (n_small,), generator=g).tolist()]
    online = [rnd(*e.shape) for e in ema]
    online[6] = online[6].t().contiguous().t()                 # same (transposed) strides as its ema
    ema = [e.to(edt) for e in ema]
    online = [o.to(odt) for o in online]
    online[4] = online[4].transpose(0, 2).contiguous().transpose(0, 2)   # strides differ from its ema
    return ema, online


def _big(backend):
    # the interpreter runs one Python call per 1024-element chunk; cpp: > 32K elements so threads split it
    return 2500 if backend == "triton" and INTERPRETED else 70_001


# ----------------------------------------------------------------------------------------------------
# values


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edt,odt", PAIRS, ids=PAIR_IDS)
def test_mixed_list_matches_reference(backend, edt, odt):
    ema, online = _mixed_list(edt, odt, _big(backend), device=_dev(backend))
    before = [e.clone() for e in ema]
    ops.ema_update_(ema, online, 0.9, backend=backend)
    _assert_rule(ema, before, online, 0.9, edt)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("mdt", [torch.float32, torch.float64])
@pytest.mark.parametrize("edt,odt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.bfloat16), (torch.float64, torch.float64)],
                         ids=["fp32", "bf16", "fp32<-bf16", "fp64"])
def test_tensor_momentum(backend, mdt, edt, odt):
    ema, online = _mixed_list(edt, odt, 3000, n_small=3, device=_dev(backend))
    before = [e.clone() for e in ema]
    m = torch.tensor(0.75, dtype=mdt, device=_dev(backend))
    ops.ema_update_(ema, online, m, backend=backend)
    _assert_rule(ema, before, online, 0.75, edt)


@pytest.mark.parametrize("backend", BACKENDS)
def test_view_with_gaps_leaves_other_elements(backend):
    base = torch.randn(8, 10, device=_dev(backend))
    keep = base[:, 1::2].clone()
    ema, online = [base[:, ::2]], [torch.randn(8, 5, device=_dev(backend))]
    expect = reference.ema_update_reference(ema, online, 0.5)[0].float()
    ops.ema_update_(ema, online, 0.5, backend=backend)
    assert torch.equal(base[:, 1::2], keep)
    torch.testing.assert_close(base[:, ::2], expect)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_edge_momenta_exact(backend, dtype):
    dev = _dev(backend)
    e = [torch.randn(1500).to(dev, dtype), torch.randn(3, 3).to(dev, dtype)]
    o = [torch.randn(1500).to(dev, dtype), torch.randn(3, 3).to(dev, dtype)]
    keep = [x.clone() for x in e]
    ops.ema_update_(e, o, 1.0, backend=backend)            # m = 1: unchanged
    assert all(torch.equal(a, b) for a, b in zip(e, keep))
    ops.ema_update_(e, e, 0.3, backend=backend)            # online == ema: unchanged (lerp form)
    assert all(torch.equal(a, b) for a, b in zip(e, keep))
    ops.ema_update_(e, o, 0.0, backend=backend)            # m = 0: a copy
    assert all(torch.equal(a, b) for a, b in zip(e, o))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("edt,odt", [(torch.float32, torch.float32), (torch.bfloat16, torch.bfloat16),
                                     (torch.float32, torch.bfloat16), (torch.float16, torch.float16)],
                         ids=["fp32", "bf16", "fp32<-bf16", "fp16"])
def test_many_steps_stay_within_tolerance(backend, edt, odt):
    """200 updates toward a drifting online model: the accumulated error stays within 2x the eager loop's."""
    slow = backend == "triton" and INTERPRETED
    n = 1100 if slow else 5000
    steps = 60 if slow else 200
    g = torch.Generator().manual_seed(1)
    shapes = [(n,), (7, 3), ()]
    start = [torch.randn(s, generator=g, dtype=torch.float64).to(_dev(backend)) for s in shapes]
    ours = [x.to(edt) for x in start]
    eager = [x.to(edt) for x in start]
    ref = [x.to(edt).double() for x in start]
    online64 = [x.clone() for x in start]
    m = 0.99
    for _ in range(steps):
        online64 = [x + 0.05 * torch.randn(x.shape, generator=g, dtype=torch.float64).to(x.device) for x in online64]
        online = [x.to(odt) for x in online64]
        ops.ema_update_(ours, online, m, backend=backend)
        for e, o in zip(eager, online):
            e.mul_(m).add_(o.to(edt), alpha=1 - m)
        ref = [m * r + (1 - m) * o.double() for r, o in zip(ref, online)]
    for o, e, r in zip(ours, eager, ref):
        assert torch.isfinite(o.float()).all()
        assert _err(o, r) <= 2 * _err(e, r) + FLOORS[edt] * max(1.0, r.abs().max().item()), (_err(o, r), _err(e, r))


def test_backends_agree_bitwise_fp32():
    """Same fp32 formula (e + w (o - e)) everywhere: the fused backends agree with _foreach_lerp_ closely."""
    ema, online = _mixed_list(torch.float32, torch.float32, 3000, n_small=4)
    results = {}
    for b in BACKENDS:
        e = [x.to(_dev(b), copy=True) for x in ema]
        ops.ema_update_(e, [x.to(_dev(b)) for x in online], 0.996, backend=b)
        results[b] = [x.cpu() for x in e]
    for b in BACKENDS:
        for x, y in zip(results[b], results["torch"]):
            torch.testing.assert_close(x, y, rtol=2e-7, atol=2e-7)


def test_empty_list_and_empty_tensors():
    ops.ema_update_([], [], 0.5)
    for b in BACKENDS:
        dev = _dev(b)
        e, o = [torch.empty(0, device=dev), torch.ones(3, device=dev)], [torch.empty(0, device=dev),
                                                                         torch.zeros(3, device=dev)]
        ops.ema_update_(e, o, 0.5, backend=b)
        assert torch.equal(e[1].cpu(), torch.full((3,), 0.5))


def test_public_exports():
    assert ssl_fast.ema_update_ is ssl_fast.functional.ema_update_
    assert ssl_fast.update_momentum is ssl_fast.functional.update_momentum
    e, o = [torch.zeros(4)], [torch.ones(4)]
    assert ssl_fast.ema_update_(e, o, 0.25) is None
    assert torch.equal(e[0], torch.full((4,), 0.75))


def test_auto_backend_on_cpu_is_cpp():
    if not ssl_fast.HAS_EXT:
        pytest.skip("no C++ extension")
    assert ops.TABLE.resolve(torch.device("cpu")) == "cpp"


# ----------------------------------------------------------------------------------------------------
# bad input: a clear error naming the argument, nothing modified


def _valid():
    return [torch.zeros(3), torch.zeros(2, 2)], [torch.ones(3), torch.ones(2, 2)]


BAD = [
    ("length", lambda e, o: (e, o[:1], 0.5), ValueError, "same length"),
    ("shape", lambda e, o: (e, [o[0], torch.ones(4)], 0.5), ValueError, r"ema_tensors\[1\] and online_tensors\[1\]"),
    ("m>1", lambda e, o: (e, o, 1.5), ValueError, r"momentum must be in \[0, 1\]"),
    ("m<0", lambda e, o: (e, o, -0.1), ValueError, r"momentum must be in \[0, 1\]"),
    ("m=nan", lambda e, o: (e, o, float("nan")), ValueError, "momentum"),
    ("m tensor>1", lambda e, o: (e, o, torch.tensor(1.2)), ValueError, "momentum"),
    ("m shape", lambda e, o: (e, o, torch.tensor([0.5, 0.5])), ValueError, "momentum"),
    ("m int tensor", lambda e, o: (e, o, torch.tensor(1)), TypeError, "momentum"),
    ("m bool", lambda e, o: (e, o, True), TypeError, "momentum"),
    ("m str", lambda e, o: (e, o, "0.5"), TypeError, "momentum"),
    ("int ema", lambda e, o: ([e[0], torch.zeros(2, 2, dtype=torch.int64)], o, 0.5), TypeError, r"ema_tensors\[1\]"),
    ("int online", lambda e, o: (e, [o[0], torch.ones(2, 2, dtype=torch.int32)], 0.5), TypeError,
     r"online_tensors\[1\]"),
    ("bool online", lambda e, o: (e, [o[0], torch.ones(2, 2, dtype=torch.bool)], 0.5), TypeError,
     r"online_tensors\[1\]"),
    ("not a tensor", lambda e, o: (e, [o[0], [1.0, 2.0]], 0.5), TypeError, r"online_tensors\[1\]"),
    ("single tensor", lambda e, o: (e[0], o[0], 0.5), TypeError, "ema_tensors"),
    ("devices", lambda e, o: (e, [o[0], torch.ones(2, 2, device="meta")], 0.5), ValueError, "same device"),
]


@pytest.mark.parametrize("backend", [b for b in BACKENDS if _dev(b) == "cpu"])  # argument checks precede dispatch
@pytest.mark.parametrize("case,make,exc,match", BAD, ids=[b[0] for b in BAD])
def test_bad_input_raises_and_modifies_nothing(backend, case, make, exc, match):
    e, o = _valid()
    args = make(e, o)
    with pytest.raises(exc, match=match):
        ops.ema_update_(*args, backend=backend)
    assert torch.equal(e[0], torch.zeros(3)) and torch.equal(e[1], torch.zeros(2, 2))


def test_bad_backend_name():
    e, o = _valid()
    with pytest.raises(ValueError, match="backend"):
        ops.ema_update_(e, o, 0.5, backend="cuda-please")


# ----------------------------------------------------------------------------------------------------
# torch.compile and opcheck


def _ops_to_check():
    out = []
    if ops._CPP_OP is not None:
        out.append(("cpp", ops._CPP_OP))
    if "triton" in BACKENDS:
        out.append(("triton", torch.ops.ssl_fast.ema_update_triton_.default))
    return out  # (backend, op): the op runs on _dev(backend) tensors


@pytest.mark.parametrize("with_tensor", [False, True], ids=["float_m", "tensor_m"])
def test_opcheck(with_tensor):
    checked = _ops_to_check()
    if not checked:
        pytest.skip("no fused op here")
    for backend, op in checked:
        dev = _dev(backend)
        ema = [torch.randn(5, 3, device=dev), torch.randn((), device=dev), torch.randn(7, device=dev).to(torch.bfloat16),
               torch.randn(4, 6, device=dev)[:, ::2]]
        online = [torch.randn(5, 3, device=dev), torch.randn((), device=dev), torch.randn(7, device=dev),
                  torch.randn(4, 3, device=dev)]
        mt = torch.tensor(0.8, device=dev) if with_tensor else None
        torch.library.opcheck(op, (ema, online, 0.9, mt))


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "triton"])
def test_torch_compile_fullgraph(backend):
    torch._dynamo.reset()
    model = nn.Sequential(nn.Linear(6, 5), nn.ReLU(), nn.Linear(5, 3))
    teacher = [p.detach().clone() for p in model.parameters()]
    eager_teacher = [t.clone() for t in teacher]
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    x = torch.randn(4, 6)

    def ema_step(m):
        with ssl_fast.set_backend(backend):
            ssl_fast.ema_update_(teacher, [p.detach() for p in model.parameters()], m)

    compiled = torch.compile(ema_step, fullgraph=True, backend="aot_eager")
    for step in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        m = 0.9 + 0.01 * step
        compiled(m)
        for t, p in zip(eager_teacher, model.parameters()):
            t.mul_(m).add_(p.detach(), alpha=1 - m)
    for a, b in zip(teacher, eager_teacher):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-6)


def test_first_call_in_fresh_process_imports_no_dynamo():
    """The op registration costs a user nothing at first call (no torch.library.custom_op machinery)."""
    code = ("import sys, torch, ssl_fast\n"
            "before = 'torch._dynamo' in sys.modules\n"
            "e, o = [torch.zeros(3)], [torch.ones(3)]\n"
            "ssl_fast.ema_update_(e, o, 0.5)\n"
            "assert torch.equal(e[0], torch.full((3,), 0.5))\n"
            "print(before, 'torch._dynamo' in sys.modules)\n")
    env = {k: v for k, v in os.environ.items() if k != "SSL_FAST_BACKEND"}
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    before, after = out.stdout.split()
    assert after == before, out.stdout


# ----------------------------------------------------------------------------------------------------
# update_momentum (lightly-compatible)


def _small_cnn():
    return nn.Sequential(nn.Conv2d(3, 6, 3), nn.BatchNorm2d(6), nn.ReLU(), nn.Conv2d(6, 4, 3, bias=False),
                         nn.BatchNorm2d(4), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 5))


def test_update_momentum_matches_lightly():
    lightly_utils = pytest.importorskip("lightly.models.utils")
    torch.manual_seed(3)
    model, ema_a = _small_cnn(), _small_cnn()
    model(torch.randn(2, 3, 9, 9))  # moves the student's BN running stats
    ema_b = _small_cnn()
    ema_b.load_state_dict(ema_a.state_dict())
    ssl_fast.update_momentum(model, ema_a, 0.99)
    lightly_utils.update_momentum(model, ema_b, 0.99)
    for (na, a), (nb, b) in zip(ema_a.state_dict().items(), ema_b.state_dict().items()):
        assert na == nb
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)  # buffers untouched by both
    assert ssl_fast.functional.update_momentum is ssl_fast.update_momentum


def test_update_momentum_bad_input():
    with pytest.raises(TypeError, match="model_ema"):
        ssl_fast.update_momentum(_small_cnn(), [torch.zeros(1)], 0.9)
    with pytest.raises(ValueError, match="same length"):
        ssl_fast.update_momentum(_small_cnn(), nn.Linear(2, 2), 0.9)


# ----------------------------------------------------------------------------------------------------
# nn.EMA


def _byol_tau(k, K, base, final=1.0):
    return final - (final - base) * (math.cos(math.pi * k / K) + 1) / 2


def test_schedule_matches_byol_formula():
    ema = ssl_fast.nn.EMA(nn.Linear(2, 2), momentum=0.996, total_steps=100)
    for k in [0, 1, 7, 50, 99, 100]:
        paper = 1 - (1 - 0.996) * (math.cos(math.pi * k / 100) + 1) / 2
        assert ema.momentum_at(k) == pytest.approx(paper, abs=1e-15)
    assert ema.momentum_at(0) == pytest.approx(0.996)
    assert ema.momentum_at(100) == 1.0 and ema.momentum_at(250) == 1.0  # clamped at K
    e2 = ssl_fast.nn.EMA(nn.Linear(2, 2), momentum=0.99, final_momentum=0.999)
    assert e2.momentum_at(30, 60) == pytest.approx(_byol_tau(30, 60, 0.99, 0.999))
    const = ssl_fast.nn.EMA(nn.Linear(2, 2), momentum=0.95, schedule="constant")
    assert const.momentum_at(5, 10) == 0.95 and const.update() == 0.95
    with pytest.raises(ValueError, match="total_steps"):
        ssl_fast.nn.EMA(nn.Linear(2, 2)).update()


@pytest.mark.parametrize("buffers", ["copy", "average"])
def test_ema_module_matches_plain_loop(buffers):
    torch.manual_seed(0)
    student = _small_cnn()
    ema = ssl_fast.nn.EMA(student, momentum=0.9, buffers=buffers, total_steps=6)
    assert all(not p.requires_grad for p in ema.teacher.parameters())
    assert list(ema.parameters()) == list(ema.teacher.parameters())  # the student is not a submodule
    plain = [t.detach().clone() for t in ema.teacher.state_dict().values()]
    names = list(ema.teacher.state_dict().keys())
    param_names = {n for n, _ in student.named_parameters()}
    opt = torch.optim.SGD(student.parameters(), lr=0.1, momentum=0.9)
    for k in range(5):
        loss = student(torch.randn(4, 3, 10, 10)).square().mean()
        loss.backward()
        opt.step()
        opt.zero_grad()
        m = ema.update()
        assert m == pytest.approx(_byol_tau(k, 6, 0.9))
        sd = student.state_dict()
        for i, n in enumerate(names):
            s = sd[n].detach()
            if n in param_names or (buffers == "average" and s.is_floating_point()):
                plain[i].mul_(m).add_(s, alpha=1 - m)
            else:
                plain[i].copy_(s)
    assert ema.step == 5
    for n, p in zip(names, plain):
        torch.testing.assert_close(ema.teacher.state_dict()[n], p, rtol=1e-6, atol=1e-6, msg=n)
    x = torch.randn(2, 3, 10, 10)
    ema.eval()
    ema.teacher.eval()
    torch.testing.assert_close(ema(x), ema.teacher(x))


def test_ema_state_dict_round_trip():
    torch.manual_seed(0)
    student = _small_cnn()
    ema = ssl_fast.nn.EMA(student, total_steps=10)
    for _ in range(3):
        with torch.no_grad():
            for p in student.parameters():
                p.add_(0.1 * torch.randn_like(p))
        ema.update()
    sd = ema.state_dict()
    assert any(k.startswith("teacher.") for k in sd) and not any(k.startswith("_student") for k in sd)
    other = ssl_fast.nn.EMA(student, total_steps=10)  # a fresh teacher (= the current student), step 0
    other.load_state_dict(sd)
    assert other.step == 3
    for a, b in zip(ema.teacher.state_dict().values(), other.teacher.state_dict().values()):
        assert torch.equal(a, b)
    assert ema.update() == other.update()
    for a, b in zip(ema.teacher.state_dict().values(), other.teacher.state_dict().values()):
        assert torch.equal(a, b)


def test_ema_bf16_student_fp32_teacher():
    student = nn.Linear(16, 8).to(torch.bfloat16)
    ema = ssl_fast.nn.EMA(student, schedule="constant", momentum=0.5)
    ema.teacher.float()  # an fp32 EMA of bf16 weights
    before = [p.clone() for p in ema.teacher.parameters()]
    with torch.no_grad():
        for p in student.parameters():
            p.add_(1.0)
    ema.update()
    for t, b, s in zip(ema.teacher.parameters(), before, student.parameters()):
        assert t.dtype == torch.float32
        torch.testing.assert_close(t, 0.5 * b + 0.5 * s.float())


def test_ema_unwraps_ddp(tmp_path):
    import torch.distributed as dist
    if not dist.is_available():
        pytest.skip("torch.distributed is not available")
    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'pg'}", rank=0, world_size=1)
    try:
        student = _small_cnn()
        ddp = nn.parallel.DistributedDataParallel(student)
        ema = ssl_fast.nn.EMA(ddp, momentum=0.5, schedule="constant")
        assert ema.student is student
        assert not any(k.startswith("teacher.module.") for k in ema.state_dict())
        ddp(torch.randn(2, 3, 9, 9)).sum().backward()
        with torch.no_grad():
            for p in student.parameters():
                p.add_(1.0)
        before = [p.clone() for p in ema.teacher.parameters()]
        ema.update()
        for t, b, s in zip(ema.teacher.parameters(), before, student.parameters()):
            torch.testing.assert_close(t, 0.5 * b + 0.5 * s.detach())
    finally:
        dist.destroy_process_group()


def test_ema_bad_arguments():
    with pytest.raises(TypeError, match="model"):
        ssl_fast.nn.EMA([1, 2])
    with pytest.raises(ValueError, match="schedule"):
        ssl_fast.nn.EMA(nn.Linear(2, 2), schedule="linear")
    with pytest.raises(ValueError, match="buffers"):
        ssl_fast.nn.EMA(nn.Linear(2, 2), buffers="ignore")
    with pytest.raises(ValueError, match="momentum"):
        ssl_fast.nn.EMA(nn.Linear(2, 2), momentum=1.5)
    with pytest.raises(ValueError, match="final_momentum"):
        ssl_fast.nn.EMA(nn.Linear(2, 2), final_momentum=-1.0)
    with pytest.raises(ValueError, match="step"):
        ssl_fast.nn.EMA(nn.Linear(2, 2), total_steps=5).update(step=-1)


# ----------------------------------------------------------------------------------------------------
# losses


def _plain_byol(p0, p1, z0, z1):
    """The loss as BYOL implementations write it (normalize, 2 - 2 <p, z>), averaged over views and batch."""
    def term(p, z):
        return 2 - 2 * (TF.normalize(p, dim=-1) * TF.normalize(z, dim=-1)).sum(dim=-1)
    return (0.5 * (term(p0, z1) + term(p1, z0))).mean()


@pytest.mark.parametrize("shape", [(1, 1), (5, 3), (33, 129)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
def test_byol_loss_value_and_grad(shape, dtype):
    xs64 = [torch.randn(*shape, dtype=torch.float64) for _ in range(4)]
    xs = [x.to(dtype).requires_grad_() for x in xs64]
    loss = ssl_fast.functional.byol_loss(*xs)
    assert loss.dim() == 0 and loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    grads = torch.autograd.grad(loss, xs)
    refs = [x.detach().double().requires_grad_() for x in xs]
    ref = reference.byol_loss_reference(*refs)
    ref_grads = torch.autograd.grad(ref, refs)
    eager_in = [x.detach().clone().requires_grad_() for x in xs]
    eager = _plain_byol(*eager_in)
    eager_grads = torch.autograd.grad(eager, eager_in)
    floor = {torch.float32: 1e-6, torch.bfloat16: 4e-3, torch.float64: 1e-12}[dtype]
    assert _err(loss, ref) <= 2 * _err(eager, ref) + floor * 4
    for g, r, e in zip(grads, ref_grads, eager_grads):
        assert g.dtype == dtype
        assert _err(g, r) <= 2 * _err(e, r) + floor * max(1.0, r.abs().max().item())
    if dtype != torch.bfloat16:
        torch.testing.assert_close(loss.to(dtype), _plain_byol(*xs).to(dtype))
    module = ssl_fast.nn.BYOLLoss()
    torch.testing.assert_close(module(*xs), loss)


def test_byol_loss_properties():
    p = torch.randn(6, 4)
    assert ssl_fast.nn.BYOLLoss()(p, p, p, p).item() == pytest.approx(0.0, abs=1e-6)
    assert ssl_fast.nn.BYOLLoss()(p, p, -p, -p).item() == pytest.approx(4.0, abs=1e-6)
    torch.autograd.gradcheck(ssl_fast.functional.byol_loss,
                             [torch.randn(3, 5, dtype=torch.float64, requires_grad=True) for _ in range(4)])


@pytest.mark.parametrize("args", [
    ((4, 8), (4, 8), (4, 8), (4, 9)),
    ((4, 8), (3, 8), (4, 8), (4, 8)),
    ((8,), (8,), (8,), (8,)),
    ((2, 4, 8), (2, 4, 8), (2, 4, 8), (2, 4, 8)),
    ((0, 8), (0, 8), (0, 8), (0, 8)),
])
def test_byol_loss_bad_shapes(args):
    with pytest.raises(ValueError):
        ssl_fast.nn.BYOLLoss()(*[torch.randn(*s) for s in args])


def test_byol_loss_bad_types():
    x = torch.randn(2, 3)
    with pytest.raises(TypeError, match="z1"):
        ssl_fast.nn.BYOLLoss()(x, x, x, x.long())
    with pytest.raises(TypeError, match="p0"):
        ssl_fast.nn.BYOLLoss()([1.0], x, x, x)


@pytest.mark.parametrize("shapes,dim", [(((5, 16), (5, 16)), 1), (((4, 8, 3), (4, 8, 3)), 1),
                                        (((6, 7), (1, 7)), 1), (((3, 5), (3, 5)), -1)])
def test_negative_cosine_similarity_matches_lightly(shapes, dim):
    lightly_loss = pytest.importorskip("lightly.loss")
    a64, b64 = (torch.randn(*s, dtype=torch.float64) for s in shapes)
    ours_in = [a64.float().requires_grad_(), b64.float().requires_grad_()]
    theirs_in = [a64.float().requires_grad_(), b64.float().requires_grad_()]
    ours = ssl_fast.nn.NegativeCosineSimilarity(dim=dim)(*ours_in)
    theirs = lightly_loss.NegativeCosineSimilarity(dim=dim)(*theirs_in)
    torch.testing.assert_close(ours, theirs)
    for g, h in zip(torch.autograd.grad(ours, ours_in), torch.autograd.grad(theirs, theirs_in)):
        torch.testing.assert_close(g, h)
    ref = reference.negative_cosine_similarity_reference(a64, b64, dim=dim)
    assert _err(ours, ref) < 1e-6
    assert torch.equal(ssl_fast.functional.negative_cosine_similarity(*ours_in, dim=dim), ours)


def test_negative_cosine_similarity_bad_input():
    crit = ssl_fast.nn.NegativeCosineSimilarity()
    with pytest.raises(ValueError, match="broadcastable"):
        crit(torch.randn(4, 8), torch.randn(4, 9))
    with pytest.raises(ValueError, match="dim"):
        ssl_fast.nn.NegativeCosineSimilarity(dim=3)(torch.randn(4, 8), torch.randn(4, 8))
    with pytest.raises(TypeError, match="x1"):
        crit(torch.randn(4, 8), torch.ones(4, 8, dtype=torch.int64))


# ----------------------------------------------------------------------------------------------------
# GPU tier (skipped without CUDA)


def _cuda_backends():
    out = ["torch"]
    if ops.HAS_CUDA_KERNEL:
        out.append("cpp")
    if _backend.triton_available():
        out.append("triton")
    return out


@pytest.mark.requires_cuda
@pytest.mark.parametrize("edt,odt", PAIRS, ids=PAIR_IDS)
def test_cuda_mixed_list_matches_reference(edt, odt):
    for backend in _cuda_backends():
        ema, online = _mixed_list(edt, odt, 3_000_001, n_small=200)
        ema.append(torch.randn(4097, dtype=torch.float64).to(edt)[1:])     # misaligned (odd storage offset)
        online.append(torch.randn(4096, dtype=torch.float64).to(odt))
        before = [e.clone() for e in ema]
        ema_d, online_d = [e.cuda() for e in ema], [o.cuda() for o in online]
        ops.ema_update_(ema_d, online_d, 0.9, backend=backend)
        _assert_rule([e.cpu() for e in ema_d], before, online, 0.9, edt)


@pytest.mark.requires_cuda
def test_cuda_graph_capture_with_device_momentum():
    for backend in [b for b in _cuda_backends() if b != "torch"]:
        ema = [torch.randn(1000, 37, device="cuda"), torch.randn(5, device="cuda")]
        online = [torch.randn(1000, 37, device="cuda"), torch.randn(5, device="cuda")]
        m = torch.full((), 0.9, device="cuda")
        ops.ema_update_(ema, online, m, backend=backend)  # warm-up: JIT, tables
        torch.cuda.synchronize()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            ops.ema_update_(ema, online, m, backend=backend)
        for value in (0.5, 0.99):
            m.fill_(value)
            before = [e.clone() for e in ema]
            graph.replay()
            torch.cuda.synchronize()
            for e, b, o in zip(ema, before, online):
                torch.testing.assert_close(e, value * b + (1 - value) * o, rtol=1e-6, atol=1e-6)
