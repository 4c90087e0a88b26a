"""Gradient caching: one chunked step gives the full-batch step's gradients (float64, small models, CPU)."""

import pytest
import torch
from torch import nn

import ssl_fast
from ssl_fast import gradcache

from test_distributed import _inputs, spawn

B, D_IN = 10, 8


def _model(dropout=0.0, seed=0):
    torch.manual_seed(seed)
    return nn.Sequential(nn.Linear(D_IN, 16), nn.Tanh(), nn.Dropout(dropout), nn.Linear(16, 6)).double()


def _grads(model, temp):
    return [p.grad.detach().clone() for p in model.parameters()] + [temp.grad.detach().clone()]


def _close(a, b, tol=1e-10):
    assert (a - b).abs().max().item() <= tol * max(1.0, b.abs().max().item()), (a - b).abs().max().item()


@pytest.mark.parametrize("chunk", [1, 3, 4, 10, 64])
@pytest.mark.parametrize("loss_name", ["ntxent", "info_nce_sym"])
def test_cached_step_equals_full_batch(chunk, loss_name):
    x0, x1 = torch.randn(B, D_IN, dtype=torch.float64), torch.randn(B, D_IN, dtype=torch.float64)

    def make():
        m = _model()
        t = nn.Parameter(torch.tensor(0.3, dtype=torch.float64))
        if loss_name == "ntxent":
            fn = lambda a, b: ssl_fast.ntxent(a, b, t)  # noqa: E731
        else:
            fn = lambda a, b: ssl_fast.info_nce(a, b, t, symmetric=True, feature_dim=5)  # noqa: E731
        return m, t, fn

    m_full, t_full, fn_full = make()
    loss_full = fn_full(m_full(x0), m_full(x1))
    loss_full.backward()
    m_gc, t_gc, fn_gc = make()
    loss_gc = gradcache.cached_step(m_gc, [x0, x1], fn_gc, chunk)
    assert not loss_gc.requires_grad
    _close(loss_gc, loss_full.detach())
    for a, b in zip(_grads(m_gc, t_gc), _grads(m_full, t_full)):
        _close(a, b)


def test_rng_replay_dropout():
    """With dropout, the replay draws the same masks as the first pass: the cached step's gradients equal
    those of a chunked forward WITH graph that consumes the RNG in the same order."""
    x0, x1 = torch.randn(B, D_IN, dtype=torch.float64), torch.randn(B, D_IN, dtype=torch.float64)
    chunk = 4
    ref_model = _model(dropout=0.5)
    torch.manual_seed(123)
    z0 = torch.cat([ref_model(c) for c in x0.split(chunk)])
    z1 = torch.cat([ref_model(c) for c in x1.split(chunk)])
    ref = ssl_fast.ntxent(z0, z1, 0.5)
    ref.backward()
    after_ref = torch.rand(1)
    model = _model(dropout=0.5)
    torch.manual_seed(123)
    loss = ssl_fast.GradCache(model, lambda a, b: ssl_fast.ntxent(a, b, 0.5), chunk).step(x0, x1)
    after = torch.rand(1)
    _close(loss, ref.detach())
    for p, q in zip(model.parameters(), ref_model.parameters()):
        _close(p.grad, q.grad)
    assert after.item() == after_ref.item()  # the global RNG stream continues as after one pass
    # and without the replay's RNG restore the gradients would differ (the test can fail)
    model2 = _model(dropout=0.5)
    torch.manual_seed(123)
    with torch.no_grad():
        [model2(c) for c in x0.split(chunk)]
    assert not torch.equal(model2(x0[:chunk]), z0[:chunk].detach())


def test_two_towers_and_tuple_inputs():
    img, txt = _model(seed=1), _model(seed=2)
    x0 = torch.randn(B, D_IN, dtype=torch.float64)
    x1 = torch.randn(B, D_IN, dtype=torch.float64)
    scale = nn.Parameter(torch.tensor(2.0, dtype=torch.float64))

    def loss_fn(a, b):
        return ssl_fast.info_nce(a, b, 1.0 / scale.exp(), symmetric=True)

    loss_fn(img(x0), txt(x1)).backward()
    ref = [p.grad.clone() for p in list(img.parameters()) + list(txt.parameters())] + [scale.grad.clone()]
    for p in list(img.parameters()) + list(txt.parameters()) + [scale]:
        p.grad = None
    # the second tower takes a tuple (x, mask), split together
    txt2 = lambda x, m: txt(x * m)  # noqa: E731
    gradcache.cached_step([img, txt2], [x0, (x1, torch.ones(B, 1, dtype=torch.float64))], loss_fn, 3)
    got = [p.grad for p in list(img.parameters()) + list(txt.parameters())] + [scale.grad]
    for a, b in zip(got, ref):
        _close(a, b)


def test_bad_input():
    m = _model()
    x = torch.randn(4, D_IN, dtype=torch.float64)
    with pytest.raises(ValueError, match="chunk_size"):
        gradcache.cached_step(m, [x, x], lambda a, b: ssl_fast.ntxent(a, b), 0)
    with pytest.raises(ValueError, match="model"):
        gradcache.cached_step([m], [x, x], lambda a, b: ssl_fast.ntxent(a, b), 2)


def _dist_cached(rank, world):
    n = 5
    x0, x1 = _inputs(world, n=n, d=D_IN, seed=11)[rank]
    full = _model()
    ddp_full = nn.parallel.DistributedDataParallel(full)
    z = ddp_full(torch.cat([x0, x1]))
    ssl_fast.ntxent(z[:n], z[n:], 0.4, process_group=True).backward()
    cached = _model()
    ddp = nn.parallel.DistributedDataParallel(cached)
    # DDP: one forward per backward; the cached step feeds both views through one call per chunk
    loss = gradcache.cached_step(ddp, [torch.stack([x0, x1], 1)],
                                 lambda z: ssl_fast.ntxent(z[:, 0], z[:, 1], 0.4, process_group=True), 2)
    assert torch.isfinite(loss)
    for p, q in zip(cached.parameters(), full.parameters()):
        _close(p.grad, q.grad)


def test_cached_step_distributed():
    spawn(_dist_cached, 2)
