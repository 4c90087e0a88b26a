"""Shared by the InfoNCE / NT-Xent test files: loss table, reference calls and the tolerance rule.

Tolerance rule (flash-attention's): error against float64 <= 2x eager torch's error in the same dtype
(eager = the reference run in that dtype), plus an atol floor relative to the largest reference value.
"""

import torch

from ssl_fast import reference
from ssl_fast.ops import infonce as ops

LOSSES = [("ntxent", {}), ("info_nce", {"symmetric": False}), ("info_nce", {"symmetric": True})]
LOSS_IDS = ["ntxent", "info_nce", "info_nce_sym"]
FLOORS = {torch.float32: 1e-5, torch.bfloat16: 2e-3, torch.float16: 5e-4}  # relative to max |ref|
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
DTYPE_IDS = ["fp32", "bf16", "fp16"]


def ours_fn(loss_name, backend=None):
    """ssl_fast's op, on ``backend`` (None: the one in force)."""
    fn = ops.ntxent if loss_name == "ntxent" else ops.info_nce
    return (lambda *a, **kw: fn(*a, backend=backend, **kw)) if backend else fn


def ref_fn(loss_name):
    return reference.ntxent_reference if loss_name == "ntxent" else reference.info_nce_reference


def definition_fn(loss_name):
    """The loss written from its definition, independent of ``ssl_fast.reference``: the whole logit matrix and
    ``F.cross_entropy`` (what eager SimCLR / CLIP code does). The ``torch`` backend IS the reference, so it is
    checked against this instead of against itself."""
    import torch.nn.functional as tF

    def prep(x, normalize, feature_dim):
        x = x[:, :feature_dim] if feature_dim else x
        return tF.normalize(x, dim=1) if normalize else x

    def ntxent(z1, z2, temperature, normalize=True, feature_dim=None):
        z = torch.cat([prep(z1, normalize, feature_dim), prep(z2, normalize, feature_dim)])
        n = z1.shape[0]
        logits = (z @ z.t()) / temperature
        logits = logits.masked_fill(torch.eye(2 * n, dtype=torch.bool), float("-inf"))
        labels = torch.cat([torch.arange(n, 2 * n), torch.arange(n)])
        return tF.cross_entropy(logits, labels)

    def info_nce(q, k, temperature, normalize=True, symmetric=False, feature_dim=None):
        logits = (prep(q, normalize, feature_dim) @ prep(k, normalize, feature_dim).t()) / temperature
        labels = torch.arange(q.shape[0])
        loss = tF.cross_entropy(logits, labels)
        return 0.5 * (loss + tF.cross_entropy(logits.t(), labels)) if symmetric else loss

    return ntxent if loss_name == "ntxent" else info_nce


def expected_fn(loss_name, backend):
    """What ``backend`` is compared with: the float64 reference, or for the reference itself its definition."""
    return definition_fn(loss_name) if backend == "torch" else ref_fn(loss_name)


def loss_and_grads(fn, x1, x2, temperature, go, **kw):
    """Loss and gradients w.r.t. x1, x2 (and the temperature when it is a tensor that requires grad)."""
    loss = fn(x1, x2, temperature, **kw)
    wrt = [x1, x2] + ([temperature] if isinstance(temperature, torch.Tensor) and temperature.requires_grad else [])
    grads = torch.autograd.grad(loss, wrt, grad_outputs=go.to(loss.dtype))
    return loss.detach(), [g.detach() for g in grads]


def err(a, b):
    return (a.double() - b.double()).abs().max().item()


def make_inputs(n, d, dtype=torch.float64, scale=1.0, device="cpu"):
    x1 = (scale * torch.randn(n, d, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_()
    x2 = (scale * torch.randn(n, d, dtype=torch.float64)).to(device=device, dtype=dtype).requires_grad_()
    return x1, x2


def check_rule(loss_name, backend, x1, x2, t, kw, dtype=None, go=None):
    """``backend`` vs the float64 reference, within 2x eager's error in the inputs' dtype (+ floor).

    Covers the loss and the gradients of both inputs and of a learnable fp32 temperature.
    x1, x2: leaf tensors (any layout) in the test dtype; t: python float temperature.
    """
    dtype = dtype or x1.dtype
    go = torch.randn((), device=x1.device) if go is None else go
    # float64 reference on the same (rounded) values, contiguous copies
    r1, r2 = (x.detach().double().contiguous().requires_grad_() for x in (x1, x2))
    tr = torch.tensor(t, dtype=torch.float64, device=x1.device, requires_grad=True)
    ref_loss, ref_grads = loss_and_grads(ref_fn(loss_name), r1, r2, tr, go.double(), **kw)
    # eager torch in the inputs' dtype
    e1, e2 = (x.detach().contiguous().requires_grad_() for x in (x1, x2))
    te = torch.tensor(t, dtype=dtype, device=x1.device, requires_grad=True)
    eager_loss, eager_grads = loss_and_grads(ref_fn(loss_name), e1, e2, te, go.to(dtype), **kw)
    # ours (learnable fp32 temperature)
    tt = torch.tensor(t, dtype=torch.float32, device=x1.device, requires_grad=True)
    loss, grads = loss_and_grads(ours_fn(loss_name, backend), x1, x2, tt, go, **kw)

    assert loss.dtype == torch.float32 and loss.dim() == 0
    assert grads[0].dtype == dtype and grads[0].shape == x1.shape
    floor = FLOORS[dtype]
    assert torch.isfinite(loss)
    assert err(loss, ref_loss) <= 2 * err(eager_loss, ref_loss) + floor * max(1.0, abs(ref_loss.item())), \
        (loss.item(), ref_loss.item(), eager_loss.item())
    for name, g, e, r in zip(["dx1", "dx2", "dtemp"], grads, eager_grads, ref_grads):
        assert torch.isfinite(g).all(), name
        scale = r.abs().max().item() or 1.0 / t  # an exactly-zero reference (N = 1): the logits' scale
        bound = 2 * err(e, r) + floor * scale
        assert err(g, r) <= bound, (name, err(g, r), err(e, r))
    return loss, grads
