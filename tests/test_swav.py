"""SwAV's swapped prediction, fused (ssl_fast.ops.swav): every backend against the float64 reference in value and
gradient, low precision by the 2x-eager rule, odd shapes, strided crops, queues, random upstream gradients.

The torch backend is SwAV's math in eager ops, so it is checked against lightly's formulation written out here
(one log_softmax per (code, crop) pair), not against the reference it shares its form with.
"""

import pytest
import torch
import torch.nn.functional as F

import ssl_fast
from ssl_fast import reference
from ssl_fast.ops import swav as ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
BACKENDS = ["torch"] + (["cpp"] if ssl_fast.HAS_EXT else [])
try:
    import triton  # noqa: F401

    BACKENDS.append("triton")
except ImportError:
    pass
FLOORS = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}  # as tests/infonce_helpers.py


def _dev(backend):
    return DEVICE if backend == "triton" else "cpu"


def _lightly_swav(high, low, temperature, epsilon, iterations):
    """lightly's SwaVLoss.forward as written (sub-losses per code and crop), codes from the log-domain Sinkhorn."""
    crops = list(high) + list(low)
    loss = 0.0
    for i in range(len(high)):
        with torch.no_grad():
            q = reference.sinkhorn_knopp_log_reference(high[i].detach(), epsilon, iterations)
        sub = 0.0
        for v in range(len(crops)):
            if v != i:
                sub = sub - torch.mean(torch.sum(q * F.log_softmax(crops[v] / temperature, dim=1), dim=1))
        loss = loss + sub / (len(crops) - 1)
    return loss / len(high)


def _expected(backend):
    return _lightly_swav if backend == "torch" else (
        lambda h, lo, t, e, it: reference.swav_loss_reference(h, lo, t, e, it))


def _crops(n, b, k, dtype, dev, gen, layout="contiguous"):
    out = []
    for _ in range(n):
        if layout == "column_slice":
            base = torch.randn(b, k + 7, generator=gen, dtype=torch.float64)[:, 3:3 + k]
        elif layout == "row_strided":
            base = torch.randn(2 * b, k, generator=gen, dtype=torch.float64)[::2]
        else:
            base = torch.randn(b, k, generator=gen, dtype=torch.float64)
        out.append(base)
    return out


def _loss_grads(fn, crops, go):
    xs = [c.detach().requires_grad_() for c in crops]
    loss = fn(xs)
    grads = torch.autograd.grad(loss, xs, grad_outputs=go.to(loss.dtype), allow_unused=True)
    return loss.detach(), [torch.zeros_like(x) if g is None else g for g, x in zip(grads, xs)]


def _err(a, b):
    return (a.double() - b.double()).abs().max().item()


SHAPES = [(1, 1), (3, 5), (37, 70), (64, 3000)]
CROPS = [(1, 1), (2, 0), (2, 3), (1, 4)]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"{s[0]}x{s[1]}")
@pytest.mark.parametrize("n_high,n_low", CROPS, ids=lambda c: str(c))
def test_float64_and_fp32_against_reference(backend, shape, n_high, n_low):
    b, k = shape
    if backend == "triton" and DEVICE == "cpu" and (k > 100 or n_high + n_low > 3):
        pytest.skip("the interpreter: small shapes")
    dev = _dev(backend)
    gen = torch.Generator().manual_seed(b * 31 + k)
    crops = [c * 3 for c in _crops(n_high + n_low, b, k, torch.float64, dev, gen)]
    go = torch.randn((), generator=gen, dtype=torch.float64)
    t, eps, it = 0.1, 0.05, 3
    ref_loss, ref_grads = _loss_grads(lambda xs: _expected(backend)(xs[:n_high], xs[n_high:], t, eps, it), crops, go)
    dt = torch.float32 if backend == "triton" else torch.float64
    tol = 1e-5 if dt == torch.float32 else 1e-10
    ours = [c.to(dev, dt) for c in crops]
    loss, grads = _loss_grads(lambda xs: ops.swav_loss(xs[:n_high], xs[n_high:], temperature=t, sinkhorn_epsilon=eps,
                                                       sinkhorn_iterations=it, backend=backend), ours, go.to(dev))
    assert loss.dtype == (torch.float64 if dt == torch.float64 else torch.float32) and loss.dim() == 0
    assert _err(loss.cpu(), ref_loss) <= tol * max(1.0, abs(ref_loss.item()))
    for g, r, c in zip(grads, ref_grads, ours):
        assert g.dtype == c.dtype and g.shape == c.shape
        assert _err(g.cpu(), r) <= tol * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("layout", ["contiguous", "column_slice", "row_strided"])
def test_low_precision_within_twice_eager(backend, dtype, layout):
    """Error against float64 <= 2x eager torch's error in the same dtype (+ an atol floor)."""
    b, k = (9, 40) if backend == "triton" and DEVICE == "cpu" else (100, 600)
    dev = _dev(backend)
    gen = torch.Generator().manual_seed(7)
    crops = [(5 * c).to(dtype).to(torch.float64) for c in _crops(4, b, k, dtype, dev, gen)]  # exact in dtype
    go = torch.randn((), generator=gen, dtype=torch.float64)
    ref = lambda xs: reference.swav_loss_reference(xs[:2], xs[2:], 0.1, 0.05, 3)  # noqa: E731
    ref_loss, ref_grads = _loss_grads(ref, crops, go)
    eager_loss, eager_grads = _loss_grads(ref, [c.to(dtype) for c in crops], go.to(dtype))
    if layout == "column_slice":
        ours = [torch.cat([c, c[:, :5]], 1).to(dev, dtype)[:, :k] for c in crops]
    elif layout == "row_strided":
        ours = [torch.stack([c, c], 1).reshape(2 * b, k).to(dev, dtype)[::2] for c in crops]
    else:
        ours = [c.to(dev, dtype) for c in crops]
    loss, grads = _loss_grads(lambda xs: ops.swav_loss(xs[:2], xs[2:], temperature=0.1, backend=backend), ours,
                              go.to(dev).float())
    floor = FLOORS[dtype]
    assert loss.dtype == torch.float32
    assert _err(loss.cpu(), ref_loss) <= 2 * _err(eager_loss, ref_loss) + floor * max(1.0, abs(ref_loss.item()))
    for g, e, r in zip(grads, eager_grads, ref_grads):
        assert g.dtype == dtype and torch.isfinite(g).all()
        assert _err(g.cpu(), r) <= 2 * _err(e, r) + floor * r.abs().max().item()


@pytest.mark.parametrize("backend", BACKENDS)
def test_queue_and_mixed_resolutions(backend):
    """Queue rows join the codes' Sinkhorn and are dropped; 2 x high + 4 x low crops (SwAV's multi-crop: the
    low-resolution crops have the same K)."""
    dev = _dev(backend)
    gen = torch.Generator().manual_seed(3)
    b, k = (6, 20) if backend == "triton" and DEVICE == "cpu" else (24, 50)
    crops = _crops(6, b, k, torch.float64, dev, gen)
    queue = [torch.randn(2 * b, k, generator=gen, dtype=torch.float64) for _ in range(2)]
    dt = torch.float32 if backend == "triton" else torch.float64

    def ref(xs):
        codes = [reference.sinkhorn_knopp_log_reference(torch.cat([xs[i].detach(), queue[i]]), 0.05, 3)[:b]
                 for i in range(2)]
        loss = 0.0
        for i in range(2):
            sub = sum(-torch.mean(torch.sum(codes[i] * F.log_softmax(xs[v] / 0.1, 1), 1)) for v in range(6) if v != i)
            loss = loss + sub / 5
        return loss / 2

    go = torch.tensor(0.37, dtype=torch.float64)
    ref_loss, ref_grads = _loss_grads(ref, crops, go)
    loss, grads = _loss_grads(lambda xs: ops.swav_loss(xs[:2], xs[2:], [q.to(dev, dt) for q in queue],
                                                       temperature=0.1, backend=backend),
                              [c.to(dev, dt) for c in crops], go.to(dev))
    tol = 1e-5 if dt == torch.float32 else 1e-10
    assert _err(loss.cpu(), ref_loss) <= tol * max(1.0, abs(ref_loss.item()))
    for g, r in zip(grads, ref_grads):
        assert _err(g.cpu(), r) <= tol * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_upstream_gradient_and_retain_graph(backend):
    """The gradient computed in the forward is scaled by the upstream gradient (1, 0, -2.5); a second backward
    through a retained graph gives the same gradients again; no gradient asked: the forward computes none."""
    dev = _dev(backend)
    crops = [torch.randn(5, 12, device=dev, requires_grad=True) for _ in range(3)]
    loss = ops.swav_loss(crops[:2], crops[2:], backend=backend)
    g1 = torch.autograd.grad(loss, crops, retain_graph=True)
    g0 = torch.autograd.grad(loss * 0.0, crops, retain_graph=True)
    g2 = torch.autograd.grad(-2.5 * loss, crops, retain_graph=True)
    g3 = torch.autograd.grad(loss, crops)
    for a, z, b, c in zip(g1, g0, g2, g3):
        assert torch.equal(a, c) and torch.all(z == 0)
        torch.testing.assert_close(b, -2.5 * a)
    with torch.no_grad():
        nograd = ops.swav_loss([c.detach() for c in crops[:2]], [crops[2].detach()], backend=backend)
    torch.testing.assert_close(nograd, loss.detach())


@pytest.mark.parametrize("backend", [b for b in BACKENDS if b != "torch"])
def test_only_the_crops_that_require_grad_get_one(backend):
    dev = _dev(backend)
    a = torch.randn(4, 9, device=dev, requires_grad=True)
    b, c = torch.randn(4, 9, device=dev), torch.randn(4, 9, device=dev, requires_grad=True)
    loss = ops.swav_loss([a, b], [c], backend=backend)
    loss.backward()
    assert a.grad is not None and c.grad is not None and b.grad is None


def test_bad_input_names_the_argument():
    x = torch.randn(4, 6)
    with pytest.raises(TypeError, match="same dtype"):
        ops.swav_loss([x, x.double()], [])
    with pytest.raises(ValueError, match="low_resolution_outputs"):
        ops.swav_loss([x], [torch.randn(4, 7)])
    with pytest.raises(ValueError, match="at least two crops"):
        ops.swav_loss([x], [])
    with pytest.raises(ValueError, match="temperature"):
        ops.swav_loss([x, x], [], temperature=0.0)


@pytest.mark.skipif("cpp" not in BACKENDS, reason="ssl_fast._C not built")
def test_cpp_gradients_are_separate_tensors_of_one_mapping():
    """The C++ op maps its V gradients as one block (scratch.h's empty_scratch_many, above 4 MiB): each is its own
    storage, none overlaps another, and one kept alone outlives the others (the block is released with the last)."""
    g = torch.Generator().manual_seed(7)
    crops = [torch.randn(512, 1000, generator=g) for _ in range(4)]  # 4 x 2 MB of fp32 gradients
    u = [torch.zeros(1000)]
    out = torch.ops.ssl_fast.swav_loss_cpp(crops, u, 20.0, 10.0, True)
    grads = out[1:]
    assert len(grads) == 4
    spans = sorted((t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()) for t in grads)
    assert all(a_end <= b_start for (_, a_end), (b_start, _) in zip(spans, spans[1:])), spans
    assert len({t.untyped_storage().data_ptr() for t in grads}) == 4
    for t in grads:
        assert t.untyped_storage().nbytes() == t.numel() * t.element_size()
    kept, expect = grads[2], grads[2].clone()
    del out, grads, t
    import gc

    gc.collect()
    junk = [torch.full((512, 1000), 3.0) for _ in range(8)]  # reuse whatever was released
    assert torch.equal(kept, expect) and all(float(j[0, 0]) == 3.0 for j in junk)
    # and its values: the float64 gradient of the swapped prediction with the codes softmax(crop 0 / eps) (u = 0)
    x = crops[2].double().requires_grad_()
    q = torch.softmax(crops[0].double() / 0.05, dim=1)
    (-(q * F.log_softmax(x / 0.1, dim=1)).sum(1).mean() / 3).backward()
    assert _err(kept, x.grad) < 1e-8
