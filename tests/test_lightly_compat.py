"""ssl_fast.nn.lightly against lightly's own classes (installed in the dev set): value, gradients and memory-bank
content, in one process and on 2 gloo ranks."""

import pytest
import torch

import ssl_fast
from ssl_fast.nn import lightly as ours

lightly_loss = pytest.importorskip("lightly.loss")

from test_distributed import spawn  # noqa: E402

N, D = 6, 8


def _pair(cls_ours, cls_theirs, seed=0, **kw):
    torch.manual_seed(seed)  # the memory bank is drawn in __init__
    theirs = cls_theirs(**kw)
    torch.manual_seed(seed)
    mine = cls_ours(**kw)
    return mine, theirs


def _step(crit, a, b):
    a = a.clone().requires_grad_()
    b = b.clone().requires_grad_()
    loss = crit(a, b)
    ga, gb = torch.autograd.grad(loss, [a, b])
    return loss.detach(), ga, gb


def _close(x, y, tol=1e-5, what=""):
    x, y = x.double(), y.double()
    e = (x - y).abs().max().item()
    assert e <= tol * max(1.0, y.abs().max().item()), (what, e)


def _bank(crit):
    return crit.memory_bank.bank


@pytest.mark.parametrize("bank", [0, (16, D)], ids=["nobank", "bank"])
@pytest.mark.parametrize("name", ["NTXentLoss", "DirectCLRLoss"])
def test_matches_lightly(name, bank):
    kw = dict(temperature=0.3, memory_bank_size=bank)
    if name == "DirectCLRLoss":
        kw["loss_dim"] = 5 if bank == 0 else D
    mine, theirs = _pair(getattr(ours, name), getattr(lightly_loss, name), **kw)
    if bank:
        _close(_bank(mine), _bank(theirs), 0, "initial bank")
    for step in range(4):  # 16 / 6: the third step reaches the end of the bank (lightly cuts the batch there)
        shape = (N, 2, 2, 2) if name == "DirectCLRLoss" else (N, D)  # DirectCLR flattens 4-D inputs
        a, b = torch.randn(*shape), torch.randn(*shape)
        lm, gam, gbm = _step(mine, a, b)
        lt, gat, gbt = _step(theirs, a, b)
        _close(lm, lt, what=f"loss step {step}")
        _close(gam, gat, what=f"grad out0 step {step}")
        _close(gbm, gbt, what=f"grad out1 step {step}")
        if bank:
            _close(_bank(mine), _bank(theirs), 1e-6, f"bank step {step}")
            assert int(mine.memory_bank.bank_ptr) == int(theirs.memory_bank.bank_ptr)
    if bank:  # no update without requires_grad (evaluation), as lightly
        before = _bank(mine).clone()
        with torch.no_grad():
            _close(mine(a, b), theirs(a, b))
        _close(_bank(mine), before, 0, "no update in eval")


def test_signature_and_errors():
    import inspect

    for name in ("NTXentLoss", "DirectCLRLoss"):
        sig_mine = inspect.signature(getattr(ours, name).__init__)
        sig_theirs = inspect.signature(getattr(lightly_loss, name).__init__)
        assert [(p.name, p.default) for p in sig_mine.parameters.values()] == \
            [(p.name, p.default) for p in sig_theirs.parameters.values()]
    for bad in (5, (-1, 4), (4, 4, 4)):
        with pytest.raises(ValueError):
            lightly_loss.NTXentLoss(memory_bank_size=bad)
        with pytest.raises(ValueError):
            ours.NTXentLoss(memory_bank_size=bad)
    with pytest.raises(ValueError, match="temperature"):
        ours.NTXentLoss(temperature=0.0)


def _dist_lightly(rank, world):
    torch.manual_seed(100 + rank)  # different inputs per rank
    for bank in (0, (12, D)):
        mine, theirs = _pair(ours.NTXentLoss, lightly_loss.NTXentLoss, temperature=0.4, memory_bank_size=bank,
                             gather_distributed=True)
        for step in range(2):
            a, b = torch.randn(N, D), torch.randn(N, D)
            lm, gam, gbm = _step(mine, a, b)
            lt, gat, gbt = _step(theirs, a, b)
            what = f"rank {rank} bank {bank} step {step}"
            _close(lm, lt, what=what + " loss")
            _close(gam, gat, what=what + " grad out0")
            _close(gbm, gbt, what=what + " grad out1")
            if bank:
                _close(_bank(mine), _bank(theirs), 1e-6, what + " bank")


def test_matches_lightly_distributed():
    spawn(_dist_lightly, 2)


def test_one_import_line():
    """The drop-in: the same script with either import."""
    from lightly.loss import NTXentLoss as TheirNTXent

    from ssl_fast.nn.lightly import NTXentLoss as OurNTXent

    torch.manual_seed(0)
    a, b = torch.randn(N, D), torch.randn(N, D)
    assert abs(TheirNTXent()(a, b).item() - OurNTXent()(a, b).item()) < 1e-5
    assert "NTXentLoss" in ours.__all__ and ssl_fast.nn.MemoryBank is not None
