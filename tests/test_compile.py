"""Compiler integration: ``torch.compile(fullgraph=True)`` (inductor) of a small model + each ssl_fast loss.

Every fused call is a dispatcher op with a fake implementation, so dynamo traces the whole step without a graph
break (``fullgraph=True`` raises on one) and inductor compiles the model around the opaque op. Each case runs
forward and backward compiled and eager from the same weights and compares the loss and every parameter's
gradient. Under autocast the losses keep their documented dtypes: the loss is fp32, gradients reach the
(16-bit) embeddings in their own dtype, Sinkhorn codes are fp32.
"""

import copy

import pytest
import torch
from torch import nn

import ssl_fast
from ssl_fast import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")

DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.requires_cuda)]


class Encoder(nn.Module):
    """Linear -> BN -> ReLU -> Linear, with an optional learnable temperature (CLIP's logit scale)."""

    def __init__(self, d_in=12, hidden=32, d_out=16):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(d_in, hidden), nn.BatchNorm1d(hidden), nn.ReLU(), nn.Linear(hidden, d_out))
        self.log_scale = nn.Parameter(torch.tensor(2.0))
        self.prototypes = ssl_fast.nn.SwaVPrototypes(d_out, n_prototypes=10)

    def forward(self, x):
        return self.net(x)


def _ntxent(m, x0, x1):
    return ssl_fast.nn.NTXentLoss(0.5)(m(x0), m(x1))


def _info_nce_symmetric_learnable_t(m, x0, x1):
    return ssl_fast.nn.InfoNCELoss(1.0 / m.log_scale.exp(), symmetric=True)(m(x0), m(x1))


def _info_nce_queue(m, x0, x1):
    queue = torch.linspace(-1, 1, 40 * 16, device=x0.device).reshape(40, 16).sin()
    return ssl_fast.info_nce(m(x0), m(x1), 0.2, negatives=queue)


def _directclr(m, x0, x1):
    return ssl_fast.nn.DirectCLRLoss(feature_dim=5, temperature=0.1)(m(x0), m(x1))


def _swav(m, x0, x1):
    p0, p1 = m.prototypes(nn.functional.normalize(m(x0), dim=1)), m.prototypes(nn.functional.normalize(m(x1), dim=1))
    return ssl_fast.nn.SwaVLoss(temperature=0.1, sinkhorn_iterations=3)([p0, p1], [])


def _byol(m, x0, x1):
    z0, z1 = m(x0), m(x1)
    return ssl_fast.nn.BYOLLoss()(z0, z1, z1.detach(), z0.detach())


def _negative_cosine(m, x0, x1):
    return ssl_fast.nn.NegativeCosineSimilarity()(m(x0), m(x1).detach())


CASES = {"ntxent": _ntxent, "info_nce_symmetric_learnable_t": _info_nce_symmetric_learnable_t,
         "info_nce_queue": _info_nce_queue, "directclr": _directclr, "swav": _swav, "byol": _byol,
         "negative_cosine": _negative_cosine}


def _run(fn, model, x0, x1):
    loss = fn(model, x0, x1)
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("case", list(CASES))
def test_compiled_step_matches_eager(case, device):
    fn = CASES[case]
    eager = Encoder().to(device)
    compiled_model = copy.deepcopy(eager)
    x0, x1 = torch.randn(24, 12, device=device), torch.randn(24, 12, device=device)
    torch._dynamo.reset()
    step = torch.compile(fn, fullgraph=True)  # inductor; a graph break would raise
    loss_c, grads_c = _run(step, compiled_model, x0, x1)
    loss_e, grads_e = _run(fn, eager, x0, x1)
    assert loss_c.dtype == torch.float32 and torch.isfinite(loss_c)
    torch.testing.assert_close(loss_c, loss_e, rtol=1e-5, atol=1e-6)
    assert grads_c.keys() == grads_e.keys() and len(grads_e) >= 4
    for name in grads_e:
        torch.testing.assert_close(grads_c[name], grads_e[name], rtol=1e-4, atol=1e-6, msg=name)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_dtypes_compiled_and_eager(dtype, device):
    """Under autocast the embeddings are 16-bit; the losses return fp32, the codes are fp32, and the gradient
    reaching each embedding has the embedding's dtype; compiled equals eager."""
    lin = nn.Linear(12, 16).to(device)
    x0, x1 = torch.randn(20, 12, device=device), torch.randn(20, 12, device=device)
    seen = {}

    def step(x0, x1):
        with torch.autocast(device, dtype=dtype):
            z0, z1 = lin(x0), lin(x1)
            z0.register_hook(lambda g: seen.__setitem__("grad_dtype", g.dtype))
            codes = ssl_fast.sinkhorn_knopp(z0.detach(), epsilon=0.05, iterations=3)
            losses = (ssl_fast.ntxent(z0, z1, 0.5), ssl_fast.info_nce(z0, z1, 0.1, symmetric=True),
                      ssl_fast.nn.NegativeCosineSimilarity()(z0, z1.detach()))
        return z0.dtype, codes, losses

    emb_dtype, codes, losses = step(x0, x1)
    assert emb_dtype == dtype and codes.dtype == torch.float32
    assert all(v.dtype == torch.float32 for v in losses[:2])
    sum(losses).backward()
    assert seen["grad_dtype"] == dtype
    want_grad = lin.weight.grad.clone()
    lin.weight.grad = lin.bias.grad = None

    def compiled_step(x0, x1):
        with torch.autocast(device, dtype=dtype):
            z0, z1 = lin(x0), lin(x1)
            codes = ssl_fast.sinkhorn_knopp(z0.detach(), epsilon=0.05, iterations=3)
            losses = (ssl_fast.ntxent(z0, z1, 0.5), ssl_fast.info_nce(z0, z1, 0.1, symmetric=True),
                      ssl_fast.nn.NegativeCosineSimilarity()(z0, z1.detach()))
        return codes, losses

    torch._dynamo.reset()
    codes_c, losses_c = torch.compile(compiled_step, fullgraph=True)(x0, x1)
    assert codes_c.dtype == torch.float32 and all(v.dtype == torch.float32 for v in losses_c[:2])
    torch.testing.assert_close(codes_c, codes, rtol=1e-3, atol=1e-4)
    for got, want in zip(losses_c, losses):
        torch.testing.assert_close(got, want.detach(), rtol=2e-2, atol=1e-3)
    sum(losses_c).backward()
    torch.testing.assert_close(lin.weight.grad, want_grad, rtol=5e-2, atol=5e-3)


@pytest.mark.parametrize("device", DEVICES)
def test_compiled_ema_update_matches_eager(device):
    """The fused multi-tensor EMA inside a compiled training step: same teacher as eager."""
    student = Encoder().to(device)
    teacher_c, teacher_e = copy.deepcopy(student), copy.deepcopy(student)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(torch.randn_like(p))

    def update(teacher, m):
        ssl_fast.ema_update_(list(teacher.parameters()), list(student.parameters()), m)

    torch._dynamo.reset()
    m = torch.tensor(0.9, device=device)
    torch.compile(update, fullgraph=True)(teacher_c, m)
    update(teacher_e, m)
    for a, b in zip(teacher_c.parameters(), teacher_e.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=0)
    for a, s in zip(teacher_e.parameters(), student.parameters()):
        assert not torch.equal(a, s)  # the update moved the teacher, but not all the way
