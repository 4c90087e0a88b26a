"""The C++ kernels use the intra-op thread pool, and their results do not depend on its size.

Every shape below is above the size at which the kernel leaves the calling thread (the comments give the
numbers), so 2 and 4 threads really split the work; 4 threads on a 2-core machine oversubscribe it, which
must not change a bit either.
"""

import pytest
import torch

import ssl_fast
from ssl_fast import _ext

pytestmark = pytest.mark.skipif(not _ext.HAS_EXT, reason="ssl_fast._C not built")

THREADS = (1, 2, 4)


def _per_thread_count(fn):
    """fn() at each thread count of THREADS; the caller's setting is restored."""
    prev = torch.get_num_threads()
    try:
        out = []
        for t in THREADS:
            torch.set_num_threads(t)
            out.append(fn())
        return out
    finally:
        torch.set_num_threads(prev)


def _assert_bitwise_equal(results):
    first = results[0]
    for t, other in zip(THREADS[1:], results[1:]):
        for a, b in zip(first, other):
            assert torch.equal(a, b), f"{t} threads differ from 1 thread: max |diff| {(a - b).abs().max()}"


def test_extension_parallel_for_uses_the_pool():
    """Built with OpenMP: one at::parallel_for of the extension runs on every intra-op thread (without
    -fopenmp it silently ran on the calling thread alone, and no CPU kernel scaled)."""
    assert ssl_fast._ext._C.with_openmp
    counts = _per_thread_count(lambda: ssl_fast._ext._C.parallel_for_threads(64))
    assert counts == list(THREADS)


def _loss_grads(fn, *inputs):
    xs = [x.detach().clone().requires_grad_(True) for x in inputs]
    go = torch.tensor(0.7)
    loss = fn(*xs)
    (loss * go).backward()
    return [loss.detach()] + [x.grad for x in xs]


# NT-Xent / cross-view InfoNCE: 2N = 1200 rows -> 64-row tiles (pick_block), 19 blocks; a round's work
# 9 tiles x 64 x 64 x 256 multiply-adds = 9.4M > kMinParallelWork (4M).
LOSSES = [
    ("ntxent", lambda a, b: ssl_fast.ntxent(a, b, 0.2)),
    ("ntxent_feature_dim", lambda a, b: ssl_fast.ntxent(a, b, 0.2, feature_dim=200)),
    ("info_nce", lambda a, b: ssl_fast.info_nce(a, b, 0.1)),
    ("info_nce_symmetric", lambda a, b: ssl_fast.info_nce(a, b, 0.1, symmetric=True)),
]


@pytest.mark.parametrize("name,fn", LOSSES, ids=[n for n, _ in LOSSES])
def test_infonce_bitwise_independent_of_threads(name, fn):
    g = torch.Generator().manual_seed(1)
    z1, z2 = torch.randn(600, 256, generator=g), torch.randn(600, 256, generator=g)
    with ssl_fast.set_backend("cpp"):
        _assert_bitwise_equal(_per_thread_count(lambda: _loss_grads(fn, z1, z2)))


def test_queue_bitwise_independent_of_threads():
    """The rectangular op (MoCo queue): 300 rows -> 32-row blocks, each sweeping 5300 candidates
    (32 x 5300 x 64 = 10.8M multiply-adds per task)."""
    g = torch.Generator().manual_seed(2)
    q, k = torch.randn(300, 64, generator=g), torch.randn(300, 64, generator=g)
    neg = torch.randn(5000, 64, generator=g)
    fn = lambda a, b: ssl_fast.info_nce(a, b, 0.2, negatives=neg)  # noqa: E731
    with ssl_fast.set_backend("cpp"):
        _assert_bitwise_equal(_per_thread_count(lambda: _loss_grads(fn, q, k)))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_sinkhorn_bitwise_independent_of_threads(dtype):
    """600 x 300 scores = 180K elements: 10 row chunks of 60 rows, 3 chunks per task (kGrainElems 64K): 4 tasks."""
    x = torch.randn(600, 300, generator=torch.Generator().manual_seed(3)).to(dtype)
    with ssl_fast.set_backend("cpp"):
        _assert_bitwise_equal(_per_thread_count(lambda: [ssl_fast.sinkhorn_knopp(x, 0.05, 3)]))


@pytest.mark.parametrize("ema_dtype,online_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16)])
def test_ema_bitwise_independent_of_threads(ema_dtype, online_dtype):
    """A mixed list of 70,001 + 3 + 40,000 elements (> the 32K-element grain)."""
    g = torch.Generator().manual_seed(4)
    shapes = [(70_001,), (3,), (200, 200)]
    online = [torch.randn(s, generator=g).to(online_dtype) for s in shapes]
    ema0 = [torch.randn(s, generator=g).to(ema_dtype) for s in shapes]

    def run():
        ema = [e.clone() for e in ema0]
        with ssl_fast.set_backend("cpp"):
            ssl_fast.ema_update_(ema, online, 0.996)
        return ema

    _assert_bitwise_equal(_per_thread_count(run))


def test_swav_bitwise_independent_of_threads():
    """The fused swapped prediction: 2 + 4 crops of 300 x 200 (6 x 200 elements per row, > the 32K-element grain
    for 28 rows per task)."""
    g = torch.Generator().manual_seed(5)
    crops = [torch.randn(300, 200, generator=g) for _ in range(6)]

    def run():
        xs = [c.clone().requires_grad_() for c in crops]
        with ssl_fast.set_backend("cpp"):
            loss = ssl_fast.functional.swav_loss(xs[:2], xs[2:])
        loss.backward()
        return [loss.detach()] + [x.grad for x in xs]

    _assert_bitwise_equal(_per_thread_count(run))
