"""InfoNCE / NT-Xent: the cpp and torch backends against the float64 reference, API, dispatch, bad input.

The triton backend runs the same checks in tests/test_infonce_triton.py (interpreter on CPU, GPU tier).
"""

import math
import warnings

import pytest
import torch

import ssl_fast
from infonce_helpers import LOSS_IDS, LOSSES, check_rule, make_inputs
from infonce_helpers import expected_fn as _expected
from infonce_helpers import loss_and_grads as _loss_and_grads
from infonce_helpers import ours_fn as _ours
from infonce_helpers import ref_fn as _ref
from ssl_fast import _ext, reference
from ssl_fast.ops import _backend, _library
from ssl_fast.ops import infonce as ops

CPU_BACKENDS = [pytest.param("cpp", marks=pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")),
                "torch"]
NS = [1, 3, 64, 257]
DS = [3, 17, 128, 300]


def _inputs(n, d, dtype=torch.float64, scale=1.0):
    return make_inputs(n, d, dtype, scale)


# ----------------------------------------------------------------------------------------------------
# float64: every backend equals the reference to rounding


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("n", NS)
@pytest.mark.parametrize("d", DS)
@pytest.mark.parametrize("temp_kind", ["float", "tensor_grad"])
def test_matches_reference_float64(backend, loss_name, kw, n, d, temp_kind):
    z1, z2 = _inputs(n, d)
    go = torch.randn((), dtype=torch.float64)
    t = 0.07 if temp_kind == "float" else torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    ref_loss, ref_grads = _loss_and_grads(_expected(loss_name, backend), z1, z2, t, go, **kw)
    loss, grads = _loss_and_grads(_ours(loss_name, backend), z1, z2, t, go, **kw)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_normalize_and_feature_dim(backend, loss_name, kw, normalize):
    x1, x2 = _inputs(37, 40)
    go = torch.randn((), dtype=torch.float64)
    t = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    scale = 1.0 if normalize else 0.2  # raw dot products of randn rows need a smaller scale at T = 0.2
    y1, y2 = (scale * x1.detach()).requires_grad_(), (scale * x2.detach()).requires_grad_()
    kw = dict(kw, normalize=normalize, feature_dim=17)
    ref_loss, ref_grads = _loss_and_grads(_expected(loss_name, backend), y1, y2, t, go, **kw)
    loss, grads = _loss_and_grads(_ours(loss_name, backend), y1, y2, t, go, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11)
    assert torch.all(grads[0][:, 17:] == 0) and torch.all(grads[1][:, 17:] == 0)


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("layout", ["row_strided", "column_slice", "transposed"])
def test_strided_inputs(backend, loss_name, kw, layout):
    n, d = 45, 33
    if layout == "row_strided":
        base = torch.randn(2 * n, d, dtype=torch.float64)
        z1, z2 = base[::2], base[1::2]
    elif layout == "column_slice":
        base = torch.randn(n, 2 * d + 5, dtype=torch.float64)
        z1, z2 = base[:, :d], base[:, d:2 * d]
    else:
        z1, z2 = torch.randn(d, n, dtype=torch.float64).t(), torch.randn(d, n, dtype=torch.float64).t()
    z1, z2 = z1.requires_grad_(), z2.requires_grad_()
    go = torch.randn((), dtype=torch.float64)
    ref_loss, ref_grads = _loss_and_grads(_expected(loss_name, backend), z1.contiguous(), z2.contiguous(), 0.3, go, **kw)
    loss, grads = _loss_and_grads(_ours(loss_name, backend), z1, z2, 0.3, go, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11)


def test_column_slice_is_not_copied():
    base = torch.randn(10, 64)
    sliced = base[:, :20]
    assert ops._fix_last_stride(sliced).data_ptr() == base.data_ptr()
    assert ops._fix_last_stride(base[::3]).data_ptr() == base.data_ptr()
    assert ops._fix_last_stride(base.t()).is_contiguous()  # unit stride along D is the one requirement


@pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")
@pytest.mark.parametrize("block", [32, 48, 128])
@pytest.mark.parametrize("n", [257, 700])
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
def test_cpp_tile_schedules(monkeypatch, block, n, loss_name, kw):
    """Many tiles, an odd number of row blocks (the tournament's bye), a partial last block."""
    monkeypatch.setattr(_library, "CPU_BLOCK", block)
    z1, z2 = _inputs(n, 24)
    go = torch.randn((), dtype=torch.float64)
    ref_loss, ref_grads = _loss_and_grads(_ref(loss_name), z1, z2, 0.1, go, **kw)
    loss, grads = _loss_and_grads(_ours(loss_name, "cpp"), z1, z2, 0.1, go, **kw)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11)


@pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
def test_cpp_independent_of_thread_count(monkeypatch, loss_name, kw):
    """The round schedule has no atomics and no per-thread partial sums: bitwise equal across threads."""
    monkeypatch.setattr(_library, "CPU_BLOCK", 32)
    z1, z2 = _inputs(600, 256, torch.float32)  # rounds big enough to run on the thread pool
    go = torch.tensor(1.0)
    prev = torch.get_num_threads()
    results = []
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            results.append(_loss_and_grads(_ours(loss_name, "cpp"), z1, z2, 0.2, go, **kw))
    finally:
        torch.set_num_threads(prev)
    (l1, g1), (l2, g2) = results
    assert torch.equal(l1, l2)
    assert all(torch.equal(a, b) for a, b in zip(g1, g2))


# ----------------------------------------------------------------------------------------------------
# low precision: error <= 2x eager torch's error in the same dtype (+ an atol floor)

@pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("n,d", [(3, 17), (64, 128), (257, 300)])
def test_low_precision_tolerance_rule(loss_name, kw, dtype, n, d):
    """cpp: loss, input and temperature gradients within 2x eager's error (the torch backend IS eager)."""
    x1, x2 = _inputs(n, d, dtype)
    check_rule(loss_name, "cpp", x1, x2, 0.1, kw)


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=["bf16", "fp16"])
def test_torch_backend_low_precision_dtypes(loss_name, kw, dtype):
    x1, x2 = _inputs(20, 9, dtype)
    loss, grads = _loss_and_grads(_ours(loss_name, "torch"), x1, x2, 0.1, torch.tensor(1.0), **kw)
    assert loss.dtype == torch.float32 and all(g.dtype == dtype for g in grads)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)


# ----------------------------------------------------------------------------------------------------
# gradcheck, edge cases


@pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_cpp(loss_name, kw, normalize):
    z1, z2 = _inputs(3, 5)
    t = torch.tensor(0.4, dtype=torch.float64, requires_grad=True)
    fn = _ours(loss_name, "cpp")
    assert torch.autograd.gradcheck(lambda a, b, tt: fn(a, b, tt, normalize=normalize, **kw), (z1, z2, t))


@pytest.mark.parametrize("backend", CPU_BACKENDS)
def test_n_equals_one(backend):
    z1, z2 = _inputs(1, 8, torch.float32)
    loss = ops.ntxent(z1, z2, 0.5, backend=backend)  # only the positive remains: loss 0, gradient 0
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert abs(loss.item()) < 1e-6 and g1.abs().max() < 1e-6 and g2.abs().max() < 1e-6
    for sym in (False, True):
        assert abs(ops.info_nce(z1, z2, 0.1, symmetric=sym, backend=backend).item()) < 1e-6


@pytest.mark.parametrize("backend", CPU_BACKENDS)
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
def test_zero_row_no_nan(backend, loss_name, kw):
    z1, z2 = torch.randn(6, 10), torch.randn(6, 10)
    z1[2] = 0
    z2[4] = 0
    z1.requires_grad_()
    z2.requires_grad_()
    loss = _ours(loss_name, backend)(z1, z2, 0.2, **kw)
    g1, g2 = torch.autograd.grad(loss, (z1, z2))
    assert torch.isfinite(loss) and torch.isfinite(g1).all() and torch.isfinite(g2).all()
    torch.testing.assert_close(loss, _ref(loss_name)(z1, z2, 0.2, **kw), rtol=1e-5, atol=1e-5)


@pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")
def test_small_temperature_is_stable():
    """Max-shifted LSE: T = 1e-3 (logits up to 1000) stays finite and matches float64."""
    z1, z2 = _inputs(50, 16, torch.float32)
    for t in (1e-3, 1e-2):
        loss = ops.ntxent(z1, z2, t, backend="cpp")
        ref = reference.ntxent_reference(z1.double(), z2.double(), t)
        assert torch.isfinite(loss)
        assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))


# ----------------------------------------------------------------------------------------------------
# parity with the libraries users come from


def test_parity_lightly():
    lightly_loss = pytest.importorskip("lightly.loss")
    for t in (0.5, 0.1):
        z1, z2 = _inputs(33, 20, torch.float32)
        want = lightly_loss.NTXentLoss(temperature=t)(z1, z2)
        w1, w2 = torch.autograd.grad(want, (z1, z2))
        got = ssl_fast.nn.NTXentLoss(temperature=t)(z1, z2)
        g1, g2 = torch.autograd.grad(got, (z1, z2))
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
        torch.testing.assert_close(g1, w1, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(g2, w2, rtol=1e-4, atol=1e-6)


def test_parity_pytorch_metric_learning():
    losses = pytest.importorskip("pytorch_metric_learning.losses")
    n = 29
    z1, z2 = _inputs(n, 24, torch.float32)
    want = losses.NTXentLoss(temperature=0.2)(torch.cat([z1, z2]), torch.arange(n).repeat(2))
    w1, w2 = torch.autograd.grad(want, (z1, z2))
    got = ssl_fast.ntxent(z1, z2, 0.2)
    g1, g2 = torch.autograd.grad(got, (z1, z2))
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(g1, w1, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(g2, w2, rtol=1e-4, atol=1e-6)


def test_clip_style_learnable_logit_scale():
    """CLIP: temperature = 1 / logit_scale.exp(); the logit scale gets its gradient through the op."""
    img, txt = _inputs(20, 12, torch.float32)
    logit_scale = torch.tensor(math.log(1 / 0.07), requires_grad=True)
    got = ssl_fast.info_nce(img, txt, 1.0 / logit_scale.exp(), symmetric=True)
    (gs,) = torch.autograd.grad(got, (logit_scale,))
    ls = logit_scale.detach().requires_grad_()
    logits = ls.exp() * torch.nn.functional.normalize(img.detach(), dim=1) @ \
        torch.nn.functional.normalize(txt.detach(), dim=1).t()
    labels = torch.arange(20)
    want = 0.5 * (torch.nn.functional.cross_entropy(logits, labels) +
                  torch.nn.functional.cross_entropy(logits.t(), labels))
    (ws,) = torch.autograd.grad(want, (ls,))
    torch.testing.assert_close(got.detach(), want.detach(), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(gs, ws, rtol=1e-4, atol=1e-6)


# ----------------------------------------------------------------------------------------------------
# modules


def test_modules_match_functional():
    r0, r1 = _inputs(16, 400, torch.float32)
    torch.testing.assert_close(ssl_fast.nn.NTXentLoss(0.3)(r0, r1), ssl_fast.ntxent(r0, r1, 0.3))
    torch.testing.assert_close(ssl_fast.nn.InfoNCELoss(0.2, symmetric=True)(r0, r1),
                               ssl_fast.info_nce(r0, r1, 0.2, symmetric=True))
    official = ssl_fast.nn.DirectCLRLoss(feature_dim=360)(r0, r1)
    want = reference.info_nce_reference(r0[:, :360], r1[:, :360], 0.1, symmetric=True)
    torch.testing.assert_close(official, want, rtol=1e-5, atol=1e-5)
    lightly_style = ssl_fast.nn.DirectCLRLoss(feature_dim=360, temperature=0.5, variant="ntxent")(r0, r1)
    torch.testing.assert_close(lightly_style, reference.ntxent_reference(r0[:, :360], r1[:, :360], 0.5),
                               rtol=1e-5, atol=1e-5)
    g0, = torch.autograd.grad(official, (r0,))
    assert torch.all(g0[:, 360:] == 0) and g0[:, :360].abs().sum() > 0
    with pytest.raises(ValueError, match="variant"):
        ssl_fast.nn.DirectCLRLoss(variant="simclr")
    with pytest.raises(ValueError, match="feature_dim"):
        ssl_fast.nn.DirectCLRLoss(feature_dim=0)
    with pytest.raises(ValueError, match="feature_dim"):
        ssl_fast.nn.DirectCLRLoss(feature_dim=500)(r0, r1)
    assert "temperature=0.3" in repr(ssl_fast.nn.NTXentLoss(0.3))


def test_learnable_temperature_module():
    t = torch.nn.Parameter(torch.tensor(0.5))
    crit = ssl_fast.nn.NTXentLoss(temperature=t)
    z1, z2 = _inputs(8, 6, torch.float32)
    crit(z1, z2).backward()
    assert t.grad is not None and torch.isfinite(t.grad) and t.grad != 0


# ----------------------------------------------------------------------------------------------------
# bad input: clear errors naming the argument

BAD = [
    (lambda: ssl_fast.ntxent(torch.randn(4), torch.randn(4)), ValueError, "z1"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3, 1)), ValueError, "z2"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(5, 3)), ValueError, "batch size"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 2)), ValueError, "feature size"),
    (lambda: ssl_fast.ntxent(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "empty"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), 0.0), ValueError, "temperature"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), -1.0), ValueError, "temperature"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), float("nan")), ValueError, "temperature"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), float("inf")), ValueError, "temperature"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), torch.tensor(-0.5)), ValueError,
     "temperature"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), torch.tensor([0.5, 0.1])), ValueError,
     "temperature"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), "0.5"), TypeError, "temperature"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), feature_dim=0), ValueError, "feature_dim"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), feature_dim=4), ValueError, "feature_dim"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3), feature_dim=2.0), TypeError, "feature_dim"),
    (lambda: ssl_fast.ntxent(torch.ones(4, 3, dtype=torch.int64), torch.ones(4, 3, dtype=torch.int64)),
     TypeError, "z1"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3, dtype=torch.float64)), TypeError, "dtype"),
    (lambda: ssl_fast.ntxent(torch.randn(4, 3), torch.randn(4, 3, device="meta")), ValueError, "device"),
    (lambda: ssl_fast.ntxent([[1.0]], torch.randn(1, 1)), TypeError, "z1"),
    (lambda: ssl_fast.info_nce(torch.randn(4, 3, 2), torch.randn(4, 3)), ValueError, "query"),
    (lambda: ssl_fast.info_nce(torch.randn(4, 3), torch.randn(3, 3)), ValueError, "batch size"),
    (lambda: ssl_fast.info_nce(torch.randn(4, 3), torch.randn(4, 3), 0), ValueError, "temperature"),
    (lambda: ssl_fast.info_nce(torch.randn(0, 3), torch.randn(0, 3)), ValueError, "empty"),
    (lambda: ssl_fast.info_nce(torch.randn(4, 3), torch.randn(4, 3), feature_dim=9), ValueError, "feature_dim"),
    (lambda: ssl_fast.info_nce(torch.randn(4, 0), torch.randn(4, 0)), ValueError, "D = 0"),
]


@pytest.mark.parametrize("call,exc,match", BAD, ids=[f"bad{i}" for i in range(len(BAD))])
def test_bad_input(call, exc, match):
    with pytest.raises(exc, match=match):
        call()


# ----------------------------------------------------------------------------------------------------
# backend selection


def test_set_backend_context_and_env(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    assert ssl_fast.get_backend() == "auto"
    with ssl_fast.set_backend("torch"):
        assert ssl_fast.get_backend() == "torch"
        with ssl_fast.set_backend("cpp"):
            assert ssl_fast.get_backend() == "cpp"
        assert ssl_fast.get_backend() == "torch"
    assert ssl_fast.get_backend() == "auto"
    monkeypatch.setenv(_backend.ENV_VAR, "torch")
    assert ssl_fast.get_backend() == "torch"
    monkeypatch.setenv(_backend.ENV_VAR, "cuda-magic")
    with pytest.raises(ValueError, match=_backend.ENV_VAR):
        ssl_fast.get_backend()
    with pytest.raises(ValueError, match="backend"):
        ssl_fast.set_backend("fast")


def test_plain_set_backend_call_persists():
    try:
        ssl_fast.set_backend("torch")
        assert ssl_fast.get_backend() == "torch"
    finally:
        _backend._state.name = None
    assert ssl_fast.get_backend() in _backend.BACKENDS


def test_backend_is_used(monkeypatch):
    """The selected backend really runs (not a silent switch)."""
    calls = []
    real = reference.ntxent_reference
    monkeypatch.setattr(reference, "ntxent_reference", lambda *a, **k: calls.append(1) or real(*a, **k))
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    with ssl_fast.set_backend("torch"):
        ssl_fast.ntxent(z1, z2)
    assert calls == [1]
    if _ext.HAS_EXT:
        with ssl_fast.set_backend("cpp"):
            ssl_fast.ntxent(z1, z2)
        assert calls == [1]


def test_missing_extension_fallback(monkeypatch):
    monkeypatch.setattr(_ext, "HAS_EXT", False)
    monkeypatch.setattr(_ext, "IMPORT_ERROR", "ImportError: test")
    monkeypatch.setattr(_backend, "_warned", set())
    z1, z2 = torch.randn(4, 3), torch.randn(4, 3)
    with pytest.warns(RuntimeWarning, match="torch backend"):
        auto = ssl_fast.ntxent(z1, z2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the warning is given once
        ssl_fast.ntxent(z1, z2)
    torch.testing.assert_close(auto, reference.ntxent_reference(z1, z2, 0.5))
    with ssl_fast.set_backend("cpp"), pytest.raises(RuntimeError, match="_C"):
        ssl_fast.ntxent(z1, z2)


def test_explicit_backend_that_cannot_serve(monkeypatch):
    with ssl_fast.set_backend("cpp"), pytest.raises(RuntimeError, match="CPU"):
        _backend.resolve(torch.device("cuda", 0))
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with ssl_fast.set_backend("triton"), pytest.raises(RuntimeError, match="TRITON_INTERPRET"):
        _backend.resolve(torch.device("cpu"))


def test_cli_info(capsys):
    from ssl_fast import cli

    assert cli.main(["info"]) == 0
    out = capsys.readouterr().out
    assert "ssl_fast" in out and "cpu" in out
    assert ("loaded" in out) == _ext.HAS_EXT


def test_auto_resolution_per_device(monkeypatch):
    monkeypatch.delenv(_backend.ENV_VAR, raising=False)
    cuda = torch.device("cuda", 0)  # resolve() only looks at the device type: no GPU needed
    assert _backend.resolve(cuda, dtype=torch.float64) == "torch"
    if _backend.triton_available():
        assert _backend.resolve(cuda, dtype=torch.bfloat16) == "triton"
    assert _backend.resolve(torch.device("cpu")) == ("cpp" if _ext.HAS_EXT else "torch")


def test_module_rejects_lightly_memory_bank_positional():
    """lightly's NTXentLoss(temperature, memory_bank_size): a memory bank must not be silently ignored."""
    with pytest.raises(TypeError):
        ssl_fast.nn.NTXentLoss(0.5, 4096)


# ----------------------------------------------------------------------------------------------------
# torch.compile: the backend calls are torch.library custom ops with fake implementations


@pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")
@pytest.mark.parametrize("symmetric", [False, True])
def test_custom_ops_opcheck(symmetric):
    """The C++ ops (TORCH_LIBRARY in csrc/cpu/infonce.cpp) agree with their fake implementations."""
    ops = torch.ops.ssl_fast
    x1, x2 = torch.randn(10, 12), torch.randn(10, 12)
    inv_temp, one = torch.tensor(5.0), torch.tensor(1.0)
    fwd = ops.ntxent_fwd_cpp(x1, x2, inv_temp, True, 9, 0)
    torch.library.opcheck(ops.ntxent_fwd_cpp.default, (x1, x2, inv_temp, True, 9, 0))
    torch.library.opcheck(ops.ntxent_bwd_cpp.default, (one, x1, x2, *fwd[1:], inv_temp, True, 9, 0))
    args = (x1, x2, inv_temp, True, symmetric, 9, 0)
    fwd = ops.info_nce_fwd_cpp(*args)
    torch.library.opcheck(ops.info_nce_fwd_cpp.default, args)
    torch.library.opcheck(ops.info_nce_bwd_cpp.default, (one, x1, x2, *fwd[1:], inv_temp, True, symmetric, 9, 0))


def test_torch_compile_fullgraph():
    """No graph break at the loss: the whole step (projector + both losses, learnable T) is one graph."""
    lin = torch.nn.Linear(16, 8)
    temp = torch.tensor(0.2, requires_grad=True)

    def step(x1, x2):
        a, b = lin(x1), lin(x2)
        return ssl_fast.ntxent(a, b, 0.5) + ssl_fast.info_nce(a, b, temp, symmetric=True)

    x1, x2 = torch.randn(32, 16), torch.randn(32, 16)
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")
    loss = compiled(x1, x2)
    grads = torch.autograd.grad(loss, (lin.weight, temp))
    want = step(x1, x2)
    want_grads = torch.autograd.grad(want, (lin.weight, temp))
    torch.testing.assert_close(loss, want)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w)


@pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
def test_cpp_portable_gemm_path(monkeypatch, loss_name, kw):
    """The at::addmm tile GEMM (used where torch's BLAS symbols are not found) gives the same answers."""
    assert _ext._C.cpu_gemm() in ("blas", "aten")
    monkeypatch.setattr(_library, "CPU_BLOCK", 48)
    z1, z2 = _inputs(130, 24)
    go = torch.randn((), dtype=torch.float64)
    ref_loss, ref_grads = _loss_and_grads(_ref(loss_name), z1, z2, 0.1, go, **kw)
    prev = _ext._C.set_cpu_gemm("aten")
    try:
        assert _ext._C.cpu_gemm() == "aten"
        loss, grads = _loss_and_grads(_ours(loss_name, "cpp"), z1, z2, 0.1, go, **kw)
    finally:
        _ext._C.set_cpu_gemm(prev)
    torch.testing.assert_close(loss, ref_loss, rtol=1e-9, atol=1e-10)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g, r, rtol=1e-8, atol=1e-11)
    with pytest.raises(RuntimeError, match="blas"):
        _ext._C.set_cpu_gemm("mkl")
