"""The Triton swapped-prediction kernel (kernels/swav.py) against the float64 reference, in the interpreter on
CPU (a GPU runs it directly). Small shapes: several K tiles (BLOCK_K) and a partial row block."""

import os

import pytest
import torch

pytest.importorskip("triton")

from ssl_fast import reference  # noqa: E402

HAS_CUDA = torch.cuda.is_available()
DEV = "cuda" if HAS_CUDA else "cpu"
if not HAS_CUDA and os.environ.get("TRITON_INTERPRET") != "1":  # pragma: no cover - conftest sets it
    pytest.skip("the triton kernels need CUDA or TRITON_INTERPRET=1", allow_module_level=True)

from ssl_fast.kernels import swav as K  # noqa: E402


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_swav_kernel_matches_reference(monkeypatch, dtype):
    """Loss and gradients of 2 high + 2 low crops (codes from the float64 Sinkhorn) vs autograd through the
    reference; K = 70 in tiles of 32 (3 tiles, the last partial), B = 6 rows (a partial row block of 4)."""
    monkeypatch.setattr(K, "BLOCK_K", 32)
    b, k, t = 6, 70, 0.1
    high = [torch.randn(b, k, dtype=torch.float64) for _ in range(2)]
    low = [torch.randn(b, k, dtype=torch.float64) for _ in range(2)]
    codes = [reference.sinkhorn_knopp_log_reference(h, 0.05, 3) for h in high]
    crops = [x.to(dtype) for x in high + low]
    loss, *grads = K.swav_loss([x.to(DEV) for x in crops], [c.float().to(DEV) for c in codes], 1.0 / t, True)
    ref = [x.double().requires_grad_() for x in crops]
    # the reference with these codes: -sum_i sum_{v != i} mean_b <q_i, log_softmax(z_v / T)> / (V - 1) / S
    ref_loss = sum(-torch.mean(torch.sum(q * torch.log_softmax(z / t, dim=1), dim=1))
                   for i, q in enumerate(codes) for v, z in enumerate(ref) if v != i) / (len(ref) - 1) / len(codes)
    ref_grads = torch.autograd.grad(ref_loss, ref)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    assert abs(loss.item() - ref_loss.item()) <= tol * max(1.0, abs(ref_loss.item()))
    for g, r in zip(grads, ref_grads):
        assert g.dtype == dtype and g.shape == r.shape
        torch.testing.assert_close(g.double().cpu(), r, rtol=tol, atol=tol * r.abs().max().item())
