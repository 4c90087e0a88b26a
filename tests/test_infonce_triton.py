"""InfoNCE / NT-Xent: the triton backend (kernels/infonce.py) against the float64 reference.

Without a GPU, conftest.py sets TRITON_INTERPRET=1 and the kernels run on CPU tensors in the Triton
interpreter, with the block sizes the GPU uses (so shapes stay small: the interpreter runs numpy per tile).
The GPU tier (``requires_cuda``) runs real sizes. Every check calls through ``ssl_fast.ops.infonce`` with
``backend="triton"``, so the autograd Functions and the temperature gradient are covered too.

Tolerance rule: see tests/infonce_helpers.py.
"""

import os

import pytest
import torch

pytest.importorskip("triton")

from infonce_helpers import (  # noqa: E402
    DTYPE_IDS, DTYPES, FLOORS, LOSS_IDS, LOSSES, check_rule, make_inputs, ours_fn)
from infonce_helpers import err as _err  # noqa: E402
from infonce_helpers import loss_and_grads as _loss_and_grads  # noqa: E402
from infonce_helpers import ref_fn as _ref  # noqa: E402
from ssl_fast import reference  # noqa: E402
from ssl_fast.kernels import infonce as K  # noqa: E402
from ssl_fast.kernels import infonce_common as KC  # noqa: E402
from ssl_fast.ops import infonce as ops  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("the triton backend needs CUDA or TRITON_INTERPRET=1", allow_module_level=True)


def _fn(loss_name, backend=None):
    return ours_fn(loss_name, backend)


def _check_rule(loss_name, x1, x2, t, kw, dtype=None, go=None):
    """Triton vs float64 reference, within 2x eager's error in the inputs' dtype (+ floor)."""
    return check_rule(loss_name, "triton", x1, x2, t, kw, dtype=dtype, go=go)


def _inputs(n, d, dtype, scale=1.0, device=DEV):
    return make_inputs(n, d, dtype, scale, device)


# ----------------------------------------------------------------------------------------------------
# CPU tier (interpreter) -- also runs on a GPU


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("n", [1, 3, 64, 70])
@pytest.mark.parametrize("d", [3, 17, 128, 300])
def test_fp32_matches_reference(loss_name, kw, n, d):
    """N = 1, tiny, one tile, a partial last tile; D below 16, odd, the single-chunk and multi-chunk paths."""
    x1, x2 = _inputs(n, d, torch.float32)
    _check_rule(loss_name, x1, x2, 0.1, kw)


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES[1:], ids=DTYPE_IDS[1:])
@pytest.mark.parametrize("n,d", [(3, 17), (64, 128), (70, 300)])
def test_low_precision_tolerance_rule(loss_name, kw, dtype, n, d):
    x1, x2 = _inputs(n, d, dtype)
    _check_rule(loss_name, x1, x2, 0.1, kw)


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=DTYPE_IDS)
@pytest.mark.parametrize("normalize", [True, False])
def test_normalize_and_feature_dim(loss_name, kw, dtype, normalize):
    scale = 1.0 if normalize else 0.2  # raw dot products of randn rows need a smaller scale at T = 0.2
    x1, x2 = _inputs(37, 40, dtype, scale)
    loss, grads = _check_rule(loss_name, x1, x2, 0.2, dict(kw, normalize=normalize, feature_dim=17))
    assert torch.all(grads[0][:, 17:] == 0) and torch.all(grads[1][:, 17:] == 0)


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("layout", ["row_strided", "column_slice", "mixed"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_strided_inputs(loss_name, kw, layout, dtype):
    """Row strides are passed to the kernels (no copy); the two inputs may have different strides."""
    n, d = 45, 33
    if layout == "row_strided":
        base = torch.randn(2 * n, d, device=DEV).to(dtype)
        x1, x2 = base[::2], base[1::2]
    elif layout == "column_slice":
        base = torch.randn(n, 2 * d + 5, device=DEV).to(dtype)
        x1, x2 = base[:, :d], base[:, d:2 * d]
    else:
        x1 = torch.randn(n, d + 7, device=DEV).to(dtype)[:, :d]
        x2 = torch.randn(3 * n, d, device=DEV).to(dtype)[::3]
    x1, x2 = x1.requires_grad_(), x2.requires_grad_()
    assert ops._fix_last_stride(x1) is x1 and ops._fix_last_stride(x2) is x2
    _check_rule(loss_name, x1, x2, 0.3, kw)
    # the column slice with feature_dim: a slice of the slice, normalization on the first 20 columns
    _check_rule(loss_name, x1, x2, 0.3, dict(kw, feature_dim=20))


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
def test_many_tiles(loss_name, kw):
    """Several forward tiles (the NT-Xent triangle mapping, partial LSE slots) and backward row blocks."""
    x1, x2 = _inputs(300, 16, torch.float32)
    _check_rule(loss_name, x1, x2, 0.1, kw)


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype,d", [(torch.bfloat16, 2048), (torch.float32, 768)], ids=["bf16-2048", "fp32-768"])
def test_large_feature_dim(loss_name, kw, dtype, d):
    """Large D: the logits loop over D in K-steps, the gradient is split in D-chunks (bf16 2048: 8 chunks)."""
    x1, x2 = _inputs(5, d, dtype)
    _check_rule(loss_name, x1, x2, 0.1, kw)


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("d", [17, 300])
def test_split_and_unsplit_backward_agree(monkeypatch, loss_name, kw, d):
    """The backward's column sweep split in pieces (workspace + epilogue kernel) == one sweep per program."""
    x1, x2 = _inputs(100 if d > 128 else 150, d, torch.float32)
    go = torch.randn(())
    t = torch.tensor(0.2, requires_grad=True)
    fn = _fn(loss_name, "triton")
    monkeypatch.setattr(KC, "_SM_TARGET", 1000)  # many programs wanted: split
    assert K._bwd_splits(2, 10, torch.device("cpu")) > 1
    split = _loss_and_grads(fn, x1, x2, t, go, **kw)
    monkeypatch.setattr(KC, "_SM_TARGET", 1)  # already enough programs: one sweep
    assert K._bwd_splits(2, 10, torch.device("cpu")) == 1
    whole = _loss_and_grads(fn, x1, x2, t, go, **kw)
    assert torch.equal(split[0], whole[0])
    for a, b in zip(split[1], whole[1]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
def test_deterministic(loss_name, kw):
    """No atomics: two runs are bitwise equal."""
    x1, x2 = _inputs(70, 40, torch.bfloat16)
    t = torch.tensor(0.1, requires_grad=True)
    go = torch.tensor(1.0)
    a = _loss_and_grads(_fn(loss_name, "triton"), x1, x2, t, go, **kw)
    b = _loss_and_grads(_fn(loss_name, "triton"), x1, x2, t, go, **kw)
    assert torch.equal(a[0], b[0]) and all(torch.equal(u, v) for u, v in zip(a[1], b[1]))


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("n,d,cap", [(70, 40, 1), (150, 100, 2)], ids=["n70-1group", "n150-2groups"])
def test_grouped_forward_matches_reference(monkeypatch, loss_name, kw, dtype, n, d, cap):
    """The grouped rows-only forward (forced by a small slot cap): values and gradients vs float64, a partial
    last block, one or several groups (n = 150: 3 blocks per source, groups of 2 and 1 / 3 and 3 blocks)."""
    x1, x2 = _inputs(n, d, dtype)
    monkeypatch.setattr(K, "_SLOT_CAP_OVERRIDE", cap)
    plan = K._fwd_plan(n, d, dtype, loss_name == "ntxent", x1.device)
    assert plan["grouped"] and plan["nslots"] == cap
    _check_rule(loss_name, x1, x2, 0.1, kw)


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
def test_grouped_and_per_tile_forward_agree(monkeypatch, loss_name, kw):
    """Same loss and LSEs (~1e-6) from the per-tile symmetric forward and the grouped one, for every group
    count (cap 0: always grouped, one group; NT-Xent cap 4: 3 groups, one straddling z1 / z2); raw dots."""
    n, d = 150, 40
    x1 = torch.randn(n, d + 8, device=DEV)[:, :d]  # strided rows: the strides reach the grouped kernel
    x2 = torch.randn(n, d, device=DEV)
    inv_t = torch.tensor(1 / 0.2, device=DEV)
    for normalize in (True, False):
        if loss_name == "ntxent":
            fwd = lambda: K.ntxent_forward(x1, x2, inv_t, normalize, d)  # noqa: E731
        else:
            fwd = lambda: K.info_nce_forward(x1, x2, inv_t, normalize, kw["symmetric"], d)  # noqa: E731
        rows = n if kw.get("symmetric") is False else 2 * n
        assert not K._fwd_plan(n, d, x1.dtype, loss_name == "ntxent", x1.device)["grouped"]
        tile_loss, tile_lse, _, _ = fwd()
        for cap in (0, 1, 2, 4):
            monkeypatch.setattr(K, "_SLOT_CAP_OVERRIDE", cap)
            if not K._fwd_plan(n, d, x1.dtype, loss_name == "ntxent", x1.device)["grouped"]:
                continue
            loss, lse, _, _ = fwd()
            assert abs(loss.item() - tile_loss.item()) <= 1e-6 * max(1.0, abs(tile_loss.item())), cap
            torch.testing.assert_close(lse[:rows], tile_lse[:rows], rtol=1e-6, atol=1e-6)
        monkeypatch.setattr(K, "_SLOT_CAP_OVERRIDE", None)


def test_partial_buffer_bound():
    """part is nslots x 2N fp32: the per-tile (symmetric) forward while that fits K._PART_BUDGET bytes, else the
    grouped forward with nslots <= max(64, d), O(N d) at any N (pure Python, the launcher's plan; nothing
    allocated)."""
    cpu = torch.device("cpu")
    for dtype in DTYPES:
        for d in (16, 128, 768, 2048):
            for n in (1, 70, 8192, 32768, 1 << 20):  # M = 2N up to 2 * 2^20 rows
                for ntxent in (True, False):
                    plan = K._fwd_plan(n, d, dtype, ntxent, cpu)
                    m = 2 * n
                    blocks = (2 if ntxent else 1) * plan["nb1"]
                    if plan["grouped"]:  # per-tile would not fit; enough programs unless the cap binds
                        assert blocks * 4 * m > K._PART_BUDGET
                        assert 1 <= plan["nslots"] <= max(64, d)
                        assert blocks * plan["nslots"] >= 2 * KC._SM_TARGET or plan["nslots"] == max(64, d)
                        assert (plan["nslots"] - 1) * plan["jpg"] < blocks <= plan["nslots"] * plan["jpg"]
                    else:
                        assert plan["nslots"] == blocks and 4 * m * blocks <= K._PART_BUDGET
                        assert 1 <= plan["tpp"] <= 16
    # the target 2N = 65536 (d = 128, 256): the symmetric forward, 512 slots of 128-row blocks = 128 MiB
    for d in (128, 256):
        plan = K._fwd_plan(32768, d, torch.bfloat16, True, cpu)
        assert not plan["grouped"] and 4 * 65536 * plan["nslots"] == 128 << 20
    # 2N = 2^21: grouped, one slot per group
    assert K._fwd_plan(1 << 20, 128, torch.bfloat16, True, cpu)["grouped"]


def test_n_equals_one():
    x1, x2 = _inputs(1, 8, torch.float32)
    loss = ops.ntxent(x1, x2, 0.5, backend="triton")  # only the positive remains: loss 0, gradient 0
    g1, g2 = torch.autograd.grad(loss, (x1, x2))
    assert abs(loss.item()) < 1e-6 and g1.abs().max() < 1e-6 and g2.abs().max() < 1e-6
    for sym in (False, True):
        assert abs(ops.info_nce(x1, x2, 0.1, symmetric=sym, backend="triton").item()) < 1e-6


@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_zero_row_no_nan(loss_name, kw, dtype):
    """F.normalize semantics: a zero row normalizes to zero, its gradient is g / eps, never NaN."""
    x1, x2 = torch.randn(6, 10, device=DEV), torch.randn(6, 10, device=DEV)
    x1[2] = 0
    x2[4] = 0
    x1, x2 = x1.to(dtype).requires_grad_(), x2.to(dtype).requires_grad_()
    t = torch.tensor(0.2, requires_grad=True)
    loss, grads = _loss_and_grads(_fn(loss_name, "triton"), x1, x2, t, torch.tensor(1.0), **kw)
    assert torch.isfinite(loss) and all(torch.isfinite(g).all() for g in grads)
    r1, r2 = x1.detach().double().requires_grad_(), x2.detach().double().requires_grad_()
    tr = torch.tensor(0.2, dtype=torch.float64, requires_grad=True)
    ref_loss, ref_grads = _loss_and_grads(_ref(loss_name), r1, r2, tr, torch.tensor(1.0), **kw)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref_loss, rtol=tol, atol=tol)
    for g, r in zip(grads, ref_grads):
        torch.testing.assert_close(g.double(), r, rtol=tol, atol=tol * r.abs().max().item())


def test_small_temperature_is_stable():
    """Max-shifted base-2 LSE: T = 1e-3 (logits up to 1000) stays finite and matches float64."""
    x1, x2 = _inputs(50, 16, torch.float32)
    for t in (1e-3, 1e-2):
        loss = ops.ntxent(x1, x2, t, backend="triton")
        ref = reference.ntxent_reference(x1.double(), x2.double(), t)
        assert torch.isfinite(loss)
        assert abs(loss.item() - ref.item()) <= 1e-4 * max(1.0, abs(ref.item()))


def test_contract_direct():
    """The four contract functions, called directly: shapes, dtypes, saved tensors, gz."""
    n, D, d = 10, 24, 20
    z1, z2 = torch.randn(n, D, device=DEV), torch.randn(n, D, device=DEV)
    inv_t = torch.tensor(1 / 0.3, device=DEV)
    loss, *saved = K.ntxent_forward(z1, z2, inv_t, True, d)
    assert loss.shape == () and loss.dtype == torch.float32 and len(saved) == 3
    assert all(s.dtype == torch.float32 for s in saved)
    dz1, dz2, gz = K.ntxent_backward(torch.tensor(1.0, device=DEV), z1, z2, *saved, inv_t, True, d)
    assert dz1.shape == z1.shape and dz2.shape == z2.shape and gz.shape == ()
    assert torch.all(dz1[:, d:] == 0) and torch.all(dz2[:, d:] == 0)
    # gz = sum_k <dL/dz_hat_k, z_hat_k>: check against autograd through the reference
    zh = torch.cat([torch.nn.functional.normalize(z[:, :d].double(), dim=1) for z in (z1, z2)]).requires_grad_()
    m = 2 * n
    logits = (zh @ zh.t()) * (1 / 0.3)
    logits = logits.masked_fill(torch.eye(m, dtype=torch.bool, device=DEV), float("-inf"))
    ref = torch.nn.functional.cross_entropy(logits, (torch.arange(m, device=DEV) + n) % m)
    (g,) = torch.autograd.grad(ref, zh)
    assert abs(gz.item() - (g * zh).sum().item()) < 1e-5
    assert abs(loss.item() - ref.item()) < 1e-5
    loss, *saved = K.info_nce_forward(z1, z2, inv_t, False, True, d)
    dq, dk, gz = K.info_nce_backward(torch.tensor(2.0, device=DEV), z1, z2, *saved, inv_t, False, True, d)
    assert dq.shape == z1.shape and dk.dtype == z2.dtype and gz.shape == ()


def test_rejects_float64_and_bad_layout():
    z = torch.randn(4, 8, dtype=torch.float64, device=DEV)
    inv_t = torch.tensor(2.0, device=DEV)
    with pytest.raises(TypeError, match="float64"):
        K.ntxent_forward(z, z, inv_t, True, 8)
    with pytest.raises(TypeError, match="float64"):
        ops.ntxent(z, z, 0.5, backend="triton")
    zt = torch.randn(8, 4, device=DEV).t()  # unit stride along N, not D
    with pytest.raises(ValueError, match="unit stride"):
        K.info_nce_forward(zt, zt, inv_t, True, False, 8)
    with pytest.raises(ValueError, match="d <= D"):
        K.info_nce_forward(z.float(), z.float(), inv_t, True, False, 9)


def test_interpreter_bf16_dot_flag():
    """The bf16 upcast before tl.dot is an interpreter-only workaround; on a GPU bf16 hits tensor cores."""
    bf = torch.zeros(2, 2, dtype=torch.bfloat16)
    assert K._flags(bf)["UPCAST"] == K._interpreting()
    assert not K._flags(bf.half())["UPCAST"]
    assert not K._flags(bf.float())["UPCAST"]
    assert K._flags(bf.float())["IEEE"] == (torch.get_float32_matmul_precision() == "highest")


def test_block_table():
    """Tile sides >= 16 for tl.dot, D-chunks cover d, split count bounded."""
    for dtype in DTYPES:
        for d in (1, 3, 17, 128, 300, 768, 2048):
            f = K._fwd_config(20000, d, dtype)
            b = K._bwd_config(d, dtype)
            assert f["BLOCK"] >= 16 and f["BLOCK_K"] >= 16
            assert min(b["BLOCK_M"], b["BLOCK_N"], b["BLOCK_K"], b["BLOCK_D"]) >= 16
            assert not b["SINGLE"] or b["BLOCK_K"] == b["BLOCK_D"] >= d
    assert K._bwd_splits(1000, 64, torch.device("cpu")) == 1
    assert 1 <= K._bwd_splits(2, 3, torch.device("cpu")) <= 3


# ----------------------------------------------------------------------------------------------------
# GPU tier: real sizes


@pytest.mark.requires_cuda
@pytest.mark.parametrize("loss_name,kw", LOSSES, ids=LOSS_IDS)
@pytest.mark.parametrize("d", [128, 768])
def test_gpu_real_sizes_bf16(loss_name, kw, d):
    """2N = 16384 rows, bf16; the yardstick is the reference in fp32 (float64 logits would need 2 GiB)."""
    n = 8192
    x1, x2 = _inputs(n, d, torch.bfloat16, device="cuda")
    go = torch.randn((), device="cuda")
    t = 0.1
    r1, r2 = (x.detach().float().requires_grad_() for x in (x1, x2))
    tr = torch.tensor(t, device="cuda", requires_grad=True)
    ref_loss, ref_grads = _loss_and_grads(_ref(loss_name), r1, r2, tr, go, **kw)
    e1, e2 = (x.detach().clone().requires_grad_() for x in (x1, x2))
    te = torch.tensor(t, dtype=torch.bfloat16, device="cuda", requires_grad=True)
    eager_loss, eager_grads = _loss_and_grads(_ref(loss_name), e1, e2, te, go.bfloat16(), **kw)
    tt = torch.tensor(t, device="cuda", requires_grad=True)
    loss, grads = _loss_and_grads(_fn(loss_name, "triton"), x1, x2, tt, go, **kw)
    floor = FLOORS[torch.bfloat16]
    assert _err(loss, ref_loss) <= 2 * _err(eager_loss, ref_loss) + floor * max(1.0, abs(ref_loss.item()))
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert torch.isfinite(g).all()
        assert _err(g, r) <= 2 * _err(e, r) + floor * r.abs().max().item()


@pytest.mark.requires_cuda
def test_gpu_column_slice_no_copy_and_fp16():
    base = torch.randn(4096, 2048, device="cuda", dtype=torch.float16)
    x1 = base[:, :768].requires_grad_()
    x2 = torch.randn(4096, 768, device="cuda", dtype=torch.float16).requires_grad_()
    _check_rule("ntxent", x1, x2, 0.07, {})
    _check_rule("info_nce", x1, x2, 0.07, {"symmetric": True, "feature_dim": 256})


@pytest.mark.parametrize("symmetric", [False, True])
def test_custom_ops_opcheck_triton(symmetric):
    """The fake implementations (torch.compile) agree with what the triton backend really returns."""
    x1, x2 = torch.randn(10, 12, device=DEV), torch.randn(10, 12, device=DEV)
    inv_temp = torch.tensor(5.0, device=DEV)
    one = torch.tensor(1.0, device=DEV)
    ops = torch.ops.ssl_fast
    fwd = ops.ntxent_fwd_triton(x1, x2, inv_temp, True, 9)
    torch.library.opcheck(ops.ntxent_fwd_triton.default, (x1, x2, inv_temp, True, 9))
    torch.library.opcheck(ops.ntxent_bwd_triton.default, (one, x1, x2, *fwd[1:], inv_temp, True, 9))
    args = (x1, x2, inv_temp, True, symmetric, 9)
    fwd = ops.info_nce_fwd_triton(*args)
    torch.library.opcheck(ops.info_nce_fwd_triton.default, args)
    torch.library.opcheck(ops.info_nce_bwd_triton.default, (one, x1, x2, *fwd[1:], inv_temp, True, symmetric, 9))
