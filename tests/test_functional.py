"""ssl_fast.functional's entries that the nn modules and methods reach the ops through: the rectangular op
(``infonce_rect``), the local-loss form of the distributed losses, SwAV's swapped-prediction loss and
``update_momentum``: values and gradients against the float64 references, bad input naming the argument, and
the modules equal to the functions they wrap. (The per-backend and distributed sweeps are in
test_infonce_rect.py, test_distributed.py, test_sinkhorn.py and test_ema.py.)
"""

import pytest
import torch

import ssl_fast
from ssl_fast import functional as sf
from ssl_fast import reference

from infonce_helpers import err


def _leaf(*shape, seed, dtype=torch.float64):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed), dtype=dtype).requires_grad_()


# ----------------------------------------------------------------------------------------------------
# infonce_rect


@pytest.mark.parametrize("normalize", [True, False], ids=["norm", "raw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["fp64", "fp32"])
def test_infonce_rect_values_and_grads(normalize, dtype):
    r, cn, d = 7, 11, 5
    rows, cands = _leaf(r, d, seed=1), _leaf(cn, d, seed=2)
    t = torch.tensor(0.4 if normalize else 3.0, dtype=torch.float64, requires_grad=True)
    pos = torch.tensor([0, 3, -1, 10, 5, 2, -1])
    excl = torch.tensor([1, -1, 4, 0, -1, 2 + 1, 9])
    w = torch.randn(r, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    ref = reference.infonce_rect_reference(rows, cands, pos, excl, t, normalize=normalize)
    gref = torch.autograd.grad((ref * w).sum(), [rows, cands, t])
    x, c = rows.detach().to(dtype).requires_grad_(), cands.detach().to(dtype).requires_grad_()
    tt = t.detach().clone().requires_grad_()
    out = sf.infonce_rect(x, c, pos, excl, tt, normalize=normalize)
    assert out.shape == (r,) and out.dtype == dtype
    got = torch.autograd.grad((out * w.to(dtype)).sum(), [x, c, tt])
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    assert err(out, ref) <= tol * max(1.0, ref.abs().max().item())
    for name, g, gr in zip(("rows", "candidates", "temperature"), got, gref):
        assert g.dtype == (tt.dtype if name == "temperature" else dtype), name
        assert err(g, gr) <= tol * max(1.0, gr.abs().max().item()), (name, err(g, gr))


def test_infonce_rect_constant_candidates_and_no_excl():
    rows, cands = _leaf(4, 6, seed=4), _leaf(9, 6, seed=5)
    pos = torch.tensor([-1, 2, 8, 0])
    out = sf.infonce_rect(rows, cands, pos, temperature=0.3, grad_candidates=False)
    ref = reference.infonce_rect_reference(rows.detach(), cands.detach(), pos, None, 0.3)
    assert err(out, ref) <= 1e-12
    out.sum().backward()
    assert cands.grad is None and rows.grad is not None and torch.isfinite(rows.grad).all()


BAD_RECT = [
    ("rows not a tensor", lambda r, c, p: ([[1.0]], c, p), {}, TypeError, "rows"),
    ("rows rank", lambda r, c, p: (r[0], c, p), {}, ValueError, "rows"),
    ("candidates not a tensor", lambda r, c, p: (r, "c", p), {}, TypeError, "candidates"),
    ("candidates width", lambda r, c, p: (r, c[:, :3], p), {}, ValueError, "candidates"),
    ("candidates empty", lambda r, c, p: (r, c[:0], p), {}, ValueError, "candidates"),
    ("candidates dtype", lambda r, c, p: (r, c.double(), p), {}, TypeError, "candidates"),
    ("candidates device", lambda r, c, p: (r, c.to("meta"), p), {}, ValueError, "candidates"),
    ("pos not a tensor", lambda r, c, p: (r, c, [0, 1, 2]), {}, TypeError, "pos"),
    ("pos dtype", lambda r, c, p: (r, c, p.int()), {}, TypeError, "pos"),
    ("pos shape", lambda r, c, p: (r, c, p[:2]), {}, ValueError, "pos"),
    ("pos range", lambda r, c, p: (r, c, p + 7), {}, ValueError, "pos"),
    ("excl range", lambda r, c, p: (r, c, p), {"excl": torch.tensor([0, -2, 1])}, ValueError, "excl"),
    ("temperature", lambda r, c, p: (r, c, p), {"temperature": 0.0}, ValueError, "temperature"),
    ("grad_candidates", lambda r, c, p: (r, c, p), {"grad_candidates": 1}, TypeError, "grad_candidates"),
]


@pytest.mark.parametrize("case,make,kw,exc,word", BAD_RECT, ids=[b[0] for b in BAD_RECT])
def test_infonce_rect_bad_input(case, make, kw, exc, word):
    rows, cands, pos = torch.randn(3, 5), torch.randn(6, 5), torch.tensor([0, 1, 2])
    with pytest.raises(exc, match=word):
        sf.infonce_rect(*make(rows, cands, pos), **kw)


# ----------------------------------------------------------------------------------------------------
# the local-loss form (one process: the plain loss; distributed: test_distributed.py)


@pytest.mark.parametrize("fn", ["ntxent", "info_nce"])
def test_local_loss_in_one_process_is_the_loss(fn):
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    plain = getattr(sf, fn)(a, b, 0.3)
    for group in (None, True):
        assert err(getattr(sf, fn)(a, b, 0.3, process_group=group, local_loss=True), plain) == 0


def test_modules_are_their_functions():
    a, b = torch.randn(6, 8), torch.randn(6, 8)
    neg = torch.randn(5, 8)
    assert err(ssl_fast.nn.NTXentLoss(0.3, gather_distributed=True, local_loss=True)(a, b), sf.ntxent(a, b, 0.3)) == 0
    assert err(ssl_fast.nn.InfoNCELoss(0.2, symmetric=True)(a, b, neg),
               sf.info_nce(a, b, 0.2, symmetric=True, negatives=neg)) == 0
    assert err(ssl_fast.nn.DirectCLRLoss(feature_dim=5, temperature=0.2)(a, b),
               sf.info_nce(a, b, 0.2, symmetric=True, feature_dim=5)) == 0
    assert err(ssl_fast.nn.DirectCLRLoss(feature_dim=5, variant="ntxent")(a, b),
               sf.ntxent(a, b, 0.1, feature_dim=5)) == 0


# ----------------------------------------------------------------------------------------------------
# swav_loss


@pytest.mark.parametrize("n_high,n_low,queue", [(1, 1, False), (2, 3, False), (2, 0, True)],
                         ids=["1+1", "2+3", "2+0+queue"])
def test_swav_loss_values_and_grads(n_high, n_low, queue):
    b, k = 12, 7
    high = [_leaf(b, k, seed=10 + i) for i in range(n_high)]
    low = [_leaf(b, k, seed=20 + i) for i in range(n_low)]
    q = [torch.randn(5, k, generator=torch.Generator().manual_seed(30 + i), dtype=torch.float64)
         for i in range(n_high)] if queue else None
    loss = sf.swav_loss(high, low, q, temperature=0.2, sinkhorn_iterations=3, sinkhorn_epsilon=0.1)
    got = torch.autograd.grad(loss, high + low)
    # reference: the codes of each high crop computed on [scores; queue] and cut back to the batch
    ref_high = [h.detach().clone().requires_grad_() for h in high]
    ref_low = [z.detach().clone().requires_grad_() for z in low]
    if queue:
        crops = ref_high + ref_low
        ref = ref_high[0].new_zeros(())
        for i in range(n_high):
            with torch.no_grad():
                codes = reference.sinkhorn_knopp_log_reference(torch.cat([ref_high[i], q[i]]), 0.1, 3)[:b]
            sub = sum(-torch.mean(torch.sum(codes * torch.log_softmax(z / 0.2, dim=1), dim=1))
                      for v, z in enumerate(crops) if v != i)
            ref = ref + sub / (len(crops) - 1)
        ref = ref / n_high
    else:
        ref = reference.swav_loss_reference(ref_high, ref_low, 0.2, 0.1, 3)
    gref = torch.autograd.grad(ref, ref_high + ref_low, allow_unused=True)  # 1 + 1: the high crop only teaches
    gref = [torch.zeros_like(x) if g is None else g for g, x in zip(gref, ref_high + ref_low)]
    assert loss.dim() == 0
    assert err(loss, ref) <= 1e-9 * max(1.0, ref.abs().item())
    for g, gr in zip(got, gref):
        assert err(g, gr) <= 1e-9 * max(1.0, gr.abs().max().item())


BAD_SWAV = [
    ("no high crop", lambda x: ([], [x]), {}, ValueError, "high_resolution_outputs"),
    ("one crop", lambda x: ([x], []), {}, ValueError, "two crops"),
    ("shapes", lambda x: ([x, x[:3]], []), {}, ValueError, "shape"),
    ("not a tensor", lambda x: ([x, [[0.0]]], []), {}, TypeError, "high_resolution_outputs"),
    ("integer crop", lambda x: ([x], [x.long()]), {}, TypeError, "low_resolution_outputs"),
    ("queue", lambda x: ([x, x], [], [x]), {}, ValueError, "queue_outputs"),
    ("temperature", lambda x: ([x, x], []), {"temperature": 0}, ValueError, "temperature"),
    ("epsilon", lambda x: ([x, x], []), {"sinkhorn_epsilon": -1.0}, ValueError, "sinkhorn_epsilon"),
    ("iterations", lambda x: ([x, x], []), {"sinkhorn_iterations": 0}, ValueError, "sinkhorn_iterations"),
]


@pytest.mark.parametrize("case,make,kw,exc,word", BAD_SWAV, ids=[b[0] for b in BAD_SWAV])
def test_swav_loss_bad_input(case, make, kw, exc, word):
    with pytest.raises(exc, match=word):
        sf.swav_loss(*make(torch.randn(4, 3)), **kw)


def test_swav_module_is_the_function():
    high, low = [torch.randn(8, 5) for _ in range(2)], [torch.randn(8, 5)]
    crit = ssl_fast.nn.SwaVLoss(temperature=0.2, sinkhorn_iterations=2, sinkhorn_epsilon=0.1)
    assert err(crit(high, low), sf.swav_loss(high, low, temperature=0.2, sinkhorn_iterations=2,
                                             sinkhorn_epsilon=0.1)) == 0


# ----------------------------------------------------------------------------------------------------
# update_momentum


def test_update_momentum_values():
    torch.manual_seed(0)
    model, ema = torch.nn.Linear(5, 3), torch.nn.Linear(5, 3)
    want = reference.ema_update_reference(list(ema.parameters()), list(model.parameters()), 0.9)
    sf.update_momentum(model, ema, 0.9)
    for p, w in zip(ema.parameters(), want):
        assert err(p, w) <= 1e-6
    from ssl_fast.nn import lightly

    assert lightly.update_momentum is sf.update_momentum


@pytest.mark.parametrize("args,exc,word", [
    (("x", torch.nn.Linear(2, 2), 0.5), TypeError, "model"),
    ((torch.nn.Linear(2, 2), "x", 0.5), TypeError, "model_ema"),
    ((torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 1.5), ValueError, "momentum"),
    ((torch.nn.Linear(2, 2), torch.nn.Linear(2, 3), 0.5), ValueError, "ema_tensors"),
], ids=["model", "model_ema", "momentum", "shapes"])
def test_update_momentum_bad_input(args, exc, word):
    with pytest.raises(exc, match=word):
        sf.update_momentum(*args)
