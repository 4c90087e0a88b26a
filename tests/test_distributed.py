"""Distributed InfoNCE / NT-Xent on 2 and 3 gloo processes (CPU), against the single-process loss of the
concatenated global batch.

Every worker regenerates the inputs of ALL ranks from per-rank seeds (different content on every rank),
runs the distributed loss on its own slice and compares, in float64, the loss and its own input gradients
with the float64 reference on the concatenated batch. Gradient convention checked: each rank's gradient is
world_size x its share (DDP averages), i.e. grad / world == the reference's slice; a shared parameter's and
a learnable temperature's gradients averaged over ranks == the single-process ones.

Collectives are counted by wrapping ``torch.distributed``'s functions in the worker (the ops call them
through the module at call time); host reads are counted by wrapping ``Tensor.item`` / ``tolist`` /
``__bool__`` / ``nonzero`` and ``torch.equal`` for one step after the warm-up (the once-per-shape size check).
Several checks share one spawn to keep the file quick.
"""

import os

import pytest
import torch
import torch.distributed as dist

import ssl_fast
from ssl_fast import reference as R

from dist_helpers import spawn

N, D = 3, 6


def _inputs(world, n=N, d=D, dtype=torch.float64, seed=0):
    """Per-rank (a, b) pairs, different content on every rank."""
    out = []
    for s in range(world):
        g = torch.Generator().manual_seed(1000 * seed + s)
        out.append(((torch.randn(n, d, generator=g, dtype=torch.float64) * (1 + s)).to(dtype),
                    torch.randn(n, d, generator=g, dtype=torch.float64).to(dtype)))
    return out


def _close(a, b, tol=1e-9, what=""):
    a, b = a.detach().double(), b.detach().double()
    assert a.shape == b.shape, (what, a.shape, b.shape)
    err = (a - b).abs().max().item() if a.numel() else 0.0
    assert err <= tol * max(1.0, b.abs().max().item()), (what, err)


def _avg(t):
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / dist.get_world_size()


def _check_case(rank, world, backend, kind, kw, temp_learn=False, negatives=False, local_loss=False):
    pairs = _inputs(world, seed=len(kind) + 3 * len(kw))
    neg = torch.randn(4, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64) if negatives else None
    # single-process reference on the concatenated batch
    a_all = torch.cat([p[0] for p in pairs]).requires_grad_()
    b_all = torch.cat([p[1] for p in pairs]).requires_grad_()
    t_ref = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    if kind == "ntxent":
        ref = R.ntxent_reference(a_all, b_all, t_ref, **kw)
    else:
        ref = R.info_nce_negatives_reference(a_all, b_all, neg, t_ref, **kw)
    ga_ref, gb_ref, gt_ref = torch.autograd.grad(ref, [a_all, b_all, t_ref])
    # distributed
    a = pairs[rank][0].clone().requires_grad_()
    b = pairs[rank][1].clone().requires_grad_()
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True) if temp_learn else 0.3
    with ssl_fast.set_backend(backend):  # the public functions (ssl_fast.functional)
        if kind == "ntxent":
            loss = ssl_fast.ntxent(a, b, t, process_group=True, local_loss=local_loss, **kw)
        else:
            loss = ssl_fast.info_nce(a, b, t, negatives=neg, process_group=True, local_loss=local_loss, **kw)
    wrt = [a, b] + ([t] if temp_learn else [])
    grads = torch.autograd.grad(loss, wrt)
    sl = slice(rank * N, (rank + 1) * N)
    what = f"{backend} {kind} {kw} temp={temp_learn} neg={negatives} local={local_loss}"
    if local_loss:  # the value is the mean over this rank's anchors; the mean over ranks is the global loss
        _close(_avg(loss), ref, what=what + " loss")
    else:
        _close(loss, ref, what=what + " loss")
    _close(grads[0] / world, ga_ref[sl], what=what + " da")
    _close(grads[1] / world, gb_ref[sl], what=what + " db")
    if temp_learn:
        _close(_avg(grads[2]), gt_ref, what=what + " dtemp")


CASES = [
    ("ntxent", {}, False, False),
    ("ntxent", {"feature_dim": 4}, True, False),
    ("ntxent", {"normalize": False}, False, False),
    ("info_nce", {"symmetric": False}, False, False),
    ("info_nce", {"symmetric": True, "feature_dim": 5}, True, False),
    ("info_nce", {"symmetric": False}, True, True),
    ("info_nce", {"symmetric": True}, False, True),
]


def _values_and_grads(rank, world, backends):
    for backend in backends:
        for kind, kw, temp_learn, negatives in CASES:
            _check_case(rank, world, backend, kind, kw, temp_learn, negatives)
        _check_case(rank, world, backend, "ntxent", {}, local_loss=True)
        _check_case(rank, world, backend, "info_nce", {"symmetric": True}, local_loss=True)


def _shared_param_and_clip(rank, world, backend):
    """A Linear shared by all ranks (DDP) and a CLIP logit scale: after DDP's averaging, the single-process
    gradients of the global batch."""
    torch.manual_seed(0)
    enc = torch.nn.Linear(D, 4).double()
    logit_scale = torch.nn.Parameter(torch.tensor(2.0, dtype=torch.float64))
    pairs = _inputs(world, seed=3)
    # reference: one process, the whole batch
    ref_enc = torch.nn.Linear(D, 4).double()
    ref_enc.load_state_dict(enc.state_dict())
    ref_scale = torch.nn.Parameter(logit_scale.detach().clone())
    x_all = torch.cat([p[0] for p in pairs])
    y_all = torch.cat([p[1] for p in pairs])
    temp = lambda s: 1.0 / s.clamp(max=torch.log(torch.tensor(100.0, dtype=s.dtype))).exp()  # noqa: E731
    ref = R.info_nce_reference(ref_enc(x_all), ref_enc(y_all), temp(ref_scale), symmetric=True)
    ref = ref + R.ntxent_reference(ref_enc(x_all), ref_enc(y_all), 0.5)
    ref.backward()
    ddp = torch.nn.parallel.DistributedDataParallel(enc)
    x, y = pairs[rank]
    with ssl_fast.set_backend(backend):
        zx, zy = ddp(torch.cat([x, y])).split(N)  # one DDP forward per backward
        loss = ssl_fast.info_nce(zx, zy, temp(logit_scale), symmetric=True, process_group=True)
        loss = loss + ssl_fast.ntxent(zx, zy, 0.5, process_group=True)
        loss.backward()
        _close(loss, ref, what="shared loss")
        for p, q in zip(enc.parameters(), ref_enc.parameters()):
            _close(p.grad, q.grad, what="shared param grad (DDP-averaged)")
        _close(_avg(logit_scale.grad), ref_scale.grad, what="logit scale grad")
        # clamp at ln 100: a scale above it gets no gradient
        big = torch.nn.Parameter(torch.tensor(5.0, dtype=torch.float64))
        ssl_fast.info_nce(x, y, temp(big), symmetric=True, process_group=True).backward()
        assert big.grad.abs().item() == 0.0


def _collectives_and_syncs(rank, world, backend):
    """ONE all_gather + ONE reduce_scatter (+ the scalar all_reduce) per step, no host reads."""
    a, b = (t.clone().requires_grad_() for t in _inputs(world)[rank])
    with ssl_fast.set_backend(backend):
        ssl_fast.ntxent(a, b, 0.5, process_group=True).backward()  # warm-up: the once-per-shape size check
        counts = {}
        originals = {}

        def wrap(mod, name):
            if not hasattr(mod, name):
                return
            fn = getattr(mod, name)
            originals[(mod, name)] = fn

            def counted(*args, **kw):
                counts[name] = counts.get(name, 0) + 1
                return fn(*args, **kw)
            setattr(mod, name, counted)

        for name in ("all_gather_single", "all_gather_into_tensor", "all_gather", "reduce_scatter_single", "reduce_scatter_tensor",
                     "reduce_scatter", "all_reduce", "broadcast", "all_to_all", "all_to_all_single", "barrier",
                     "gather", "scatter", "reduce"):
            wrap(dist, name)
        for name in ("item", "tolist", "__bool__", "nonzero"):
            wrap(torch.Tensor, name)
        wrap(torch, "equal")
        try:
            for kind in ("ntxent", "info_nce_sym", "info_nce_queue"):
                counts.clear()
                if kind == "ntxent":
                    loss = ssl_fast.ntxent(a, b, 0.5, process_group=True)
                elif kind == "info_nce_sym":
                    loss = ssl_fast.info_nce(a, b, 0.2, symmetric=True, process_group=True)
                else:
                    loss = ssl_fast.info_nce(a, b, 0.2, negatives=a.detach() * 2, process_group=True)
                fwd = dict(counts)
                loss.backward()
                total = dict(counts)
                ag = fwd.pop("all_gather_single", 0) + fwd.pop("all_gather_into_tensor", 0)
                assert ag == 1 and fwd == {"all_reduce": 1}, (kind, fwd)
                rs = total.get("reduce_scatter_single", 0) + total.get("reduce_scatter_tensor", 0)
                assert rs == 1, (kind, total)
                host = {k: v for k, v in total.items() if k in ("item", "tolist", "__bool__", "nonzero", "equal")}
                assert not host, (kind, host)
                assert set(total) <= {"all_gather_single", "all_gather_into_tensor", "all_reduce", "reduce_scatter_single",
                                      "reduce_scatter_tensor"}, (kind, total)
        finally:
            for (mod, name), fn in originals.items():
                setattr(mod, name, fn)


def _bad_input(rank, world):
    n = 5 + rank  # different batch sizes, new on every rank (the check runs once per new local shape)
    a, b = torch.randn(n, D), torch.randn(n, D)
    with pytest.raises(ValueError, match="z1"):
        ssl_fast.ntxent(a, b, process_group=True)
    with pytest.raises(ValueError, match="query"):
        ssl_fast.info_nce(a, b, process_group=True)
    # a queue of the wrong width, dtype or device
    a, b = torch.randn(3, D), torch.randn(3, D)
    with pytest.raises(ValueError, match="negatives"):
        ssl_fast.info_nce(a, b, negatives=torch.randn(5, D + 1), process_group=True)
    with pytest.raises(ValueError, match="negatives"):
        ssl_fast.info_nce(a, b, negatives=torch.randn(5, D, dtype=torch.float64), process_group=True)


def _memory_bank(rank, world):
    bank = ssl_fast.nn.MemoryBank(2 * world + 1, D, process_group=True)
    x = torch.full((2, D), float(rank))
    before = bank(x)  # the queue before the update
    assert before.shape == (2 * world + 1, D)
    expect = torch.cat([torch.full((2, D), float(s)) for s in range(world)])
    _close(bank.bank[: 2 * world], expect, what="bank content (all ranks, rank-major)")
    assert int(bank.ptr) == 2 * world
    bank.enqueue(x + 10)  # wraps around: rows 2w (rank 0's first), then 0.. from the start
    _close(bank.bank[2 * world], torch.full((D,), 10.0), what="wrapped row")
    assert int(bank.ptr) == (4 * world) % (2 * world + 1)


def _all_checks(rank, world, backends):
    _values_and_grads(rank, world, backends)
    for backend in backends:
        _collectives_and_syncs(rank, world, backend)
    _shared_param_and_clip(rank, world, backends[0])
    _bad_input(rank, world)
    _memory_bank(rank, world)


def _backends():
    return ["cpp", "torch"] if ssl_fast.HAS_EXT else ["torch"]


@pytest.mark.parametrize("world", [2, 3])
def test_distributed_matches_single_process(world):
    spawn(_all_checks, world, _backends())


def _triton_checks(rank, world):
    for kind, kw, temp_learn, negatives in (CASES[0], CASES[4], CASES[5]):
        _check_case_triton(rank, world, kind, kw, temp_learn, negatives)


def _check_case_triton(rank, world, kind, kw, temp_learn, negatives):
    # float32 inputs (the triton backend's dtypes), compared with the float64 reference at fp32 tolerance
    pairs = _inputs(world, seed=5)
    neg = torch.randn(4, D, generator=torch.Generator().manual_seed(7), dtype=torch.float64) if negatives else None
    a_all = torch.cat([p[0] for p in pairs]).requires_grad_()
    b_all = torch.cat([p[1] for p in pairs]).requires_grad_()
    ref = (R.ntxent_reference(a_all, b_all, 0.3, **kw) if kind == "ntxent"
           else R.info_nce_negatives_reference(a_all, b_all, neg, 0.3, **kw))
    ga, gb = torch.autograd.grad(ref, [a_all, b_all])
    a = pairs[rank][0].float().requires_grad_()
    b = pairs[rank][1].float().requires_grad_()
    with ssl_fast.set_backend("triton"):
        if kind == "ntxent":
            loss = ssl_fast.ntxent(a, b, 0.3, process_group=True, **kw)
        else:
            loss = ssl_fast.info_nce(a, b, 0.3, negatives=None if neg is None else neg.float(), process_group=True,
                                     **kw)
    da, db = torch.autograd.grad(loss, [a, b])
    sl = slice(rank * N, (rank + 1) * N)
    _close(loss, ref, tol=1e-5, what="triton loss")
    _close(da / world, ga[sl], tol=1e-5, what="triton da")
    _close(db / world, gb[sl], tol=1e-5, what="triton db")


def test_distributed_triton_interpreter():
    pytest.importorskip("triton")
    if not torch.cuda.is_available() and os.environ.get("TRITON_INTERPRET") != "1":
        pytest.skip("needs CUDA or the Triton interpreter")
    spawn(_triton_checks, 2)
