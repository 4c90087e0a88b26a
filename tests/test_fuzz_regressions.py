"""Regression tests for the bugs tests/test_fuzz.py found (issue 24, fuzzed arguments): each was a crash with
another exception type, a message that named no argument, a silent NaN or a wrong value."""

import math

import pytest
import torch

import ssl_fast
from ssl_fast import functional as sf
from ssl_fast import reference
from ssl_fast.nn import lightly as lightly_nn

BACKENDS = [b for b in ("cpp", "torch") if b != "cpp" or ssl_fast.HAS_EXT]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("t", [1e-40, 1e38 * 10, 1e300, 5e-324])
def test_temperature_whose_reciprocal_leaves_fp32_is_a_value_error(backend, t):
    """Was: RuntimeError from the C++ op (1/T flushed to 0 or inf), or a silent NaN on the torch backend."""
    z = torch.randn(4, 8)
    with ssl_fast.set_backend(backend), pytest.raises(ValueError, match="temperature"):
        ssl_fast.ntxent(z, z + 1, t)
    with ssl_fast.set_backend(backend), pytest.raises(ValueError, match="temperature"):
        ssl_fast.info_nce(z, z + 1, torch.tensor(t, dtype=torch.float64))
    with ssl_fast.set_backend(backend), pytest.raises(ValueError, match="temperature"):
        sf.swav_loss([z, z + 1], [], temperature=t)
    with ssl_fast.set_backend(backend), pytest.raises(ValueError, match="sinkhorn_epsilon"):
        sf.swav_loss([z, z + 1], [], sinkhorn_epsilon=t)


def test_float64_inputs_keep_the_float64_temperature_range():
    z = torch.randn(4, 8, dtype=torch.float64)
    assert torch.isfinite(ssl_fast.ntxent(z, z + 1, 1e300))  # 1/T = 1e-300 is a normal float64
    with pytest.raises(ValueError, match="temperature"):
        ssl_fast.ntxent(z, z + 1, 5e-324)


def test_temperature_on_the_meta_device_is_a_value_error():
    """Was: NotImplementedError ('Cannot copy out of meta tensor')."""
    z = torch.randn(4, 8)
    with pytest.raises(ValueError, match="temperature"):
        ssl_fast.ntxent(z, z + 1, torch.empty((), device="meta"))
    with pytest.raises(ValueError, match="temperature"):
        ssl_fast.info_nce(z, z + 1, torch.empty((), device="meta"), negatives=z)


@pytest.mark.parametrize("eps", [torch.tensor(True), torch.tensor(0.1 + 0j), torch.tensor(1)])
def test_sinkhorn_epsilon_tensor_must_be_floating(eps):
    """Was: a bool / complex / integer CPU tensor accepted as its float() value."""
    with pytest.raises(TypeError, match="epsilon"):
        ssl_fast.sinkhorn_knopp(torch.randn(4, 8), eps)


def test_sinkhorn_epsilon_whose_reciprocal_overflows_is_a_value_error():
    """Was: RuntimeError from the C++ op."""
    with pytest.raises(ValueError, match="epsilon"):
        ssl_fast.sinkhorn_knopp(torch.randn(4, 8), 5e-324)


@pytest.mark.parametrize("backend", BACKENDS)
def test_sinkhorn_tiny_epsilon_gives_finite_codes(backend):
    """Was: all-NaN codes on the cpp backend (a column mass underflowed to 0 and log 0 = -inf)."""
    torch.manual_seed(1)
    with ssl_fast.set_backend(backend):
        q = ssl_fast.sinkhorn_knopp(torch.randn(4, 8), 1e-30)
    assert torch.isfinite(q).all()
    torch.testing.assert_close(q.sum(1), torch.ones(4))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("layout", ["expand", "overlap"])
def test_ema_of_an_expanded_or_overlapping_view_is_a_value_error(backend, layout):
    """Was: RuntimeError from the in-place update (expanded) or a silent update of shared memory (overlapping)."""
    storage = torch.zeros(6)
    ema = storage[:3].expand(4, 3) if layout == "expand" else storage.as_strided((3, 3), (1, 1))
    before = storage.clone()
    with ssl_fast.set_backend(backend), pytest.raises(ValueError, match=r"ema_tensors\[0\]"):
        ssl_fast.ema_update_([ema], [torch.ones(ema.shape)], 0.5)
    assert torch.equal(storage, before)


@pytest.mark.parametrize("backend", BACKENDS)
def test_ema_view_with_gaps_still_updates(backend):
    base = torch.zeros(3, 6)
    with ssl_fast.set_backend(backend):
        ssl_fast.ema_update_([base[:, ::2]], [torch.ones(3, 3)], 0.5)
    assert torch.equal(base[:, ::2], torch.full((3, 3), 0.5)) and torch.equal(base[:, 1::2], torch.zeros(3, 3))


def test_ema_momentum_on_the_meta_device_is_a_value_error():
    """Was: NotImplementedError."""
    with pytest.raises(ValueError, match="momentum"):
        ssl_fast.ema_update_([torch.zeros(3)], [torch.ones(3)], torch.empty((), device="meta"))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["ntxent", "info_nce"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_single_pair_with_a_zero_row_has_zero_gradient(backend, fn, dtype):
    """Was (cpp): N = 1 with a zero row gave a gradient of 1.4e6 (fp32) instead of 0: the ~1 ulp of P - Y
    amplified by the normalization's 1/eps."""
    z1 = torch.zeros(1, 3, dtype=dtype, requires_grad=True)
    t = torch.tensor(0.01, requires_grad=True)
    with ssl_fast.set_backend(backend):
        loss = getattr(ssl_fast, fn)(z1, torch.ones(1, 3, dtype=dtype), t)
    g, gt = torch.autograd.grad(loss, [z1, t])
    assert loss.item() == 0.0 and torch.equal(g, torch.zeros_like(g)) and gt.item() == 0.0
    nan = ssl_fast.ntxent(torch.full((1, 3), float("nan"), dtype=dtype), torch.ones(1, 3, dtype=dtype))
    assert torch.isnan(nan)


def test_torch_backend_fp16_large_rows_stay_finite():
    """Was: NaN (the reference run in fp16: squared norms overflow 65504)."""
    z = (300 * torch.randn(4, 8)).half()
    with ssl_fast.set_backend("torch"):
        assert torch.isfinite(ssl_fast.ntxent(z, z.flip(0)))
        assert torch.isfinite(ssl_fast.info_nce(z, z.flip(0), symmetric=True))


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_rect_column_strided_candidates(backend):
    """Was (cpp): RuntimeError 'candidates must have unit stride along D' for a valid column-strided view."""
    rows, cands = torch.randn(4, 3, dtype=torch.float64), torch.randn(6, 3, dtype=torch.float64).t().contiguous().t()
    pos = torch.tensor([0, 1, 2, -1])
    with ssl_fast.set_backend(backend):
        out = sf.infonce_rect(rows, cands, pos)
    torch.testing.assert_close(out, reference.infonce_rect_reference(rows, cands, pos))


def test_infonce_rect_positive_excluded_is_a_value_error():
    """Was: a finite value (the kernels read S_pos unmasked) where the definition gives +inf."""
    with pytest.raises(ValueError, match="pos and excl"):
        sf.infonce_rect(torch.randn(2, 3), torch.randn(2, 3), torch.tensor([0, 1]), torch.tensor([0, -1]))


def test_swav_loss_argument_names():
    """Was: 'scores is an empty batch' (the inner op's name), RuntimeError from torch.cat for a queue of another
    width / device, RuntimeError from the cpp Sinkhorn for a crop on another device."""
    z = torch.randn(4, 5)
    with pytest.raises(ValueError, match="high_resolution_outputs"):
        sf.swav_loss([torch.randn(0, 5), torch.randn(0, 5)])
    with pytest.raises(ValueError, match="queue_outputs"):
        sf.swav_loss([z, z], queue_outputs=[torch.randn(3, 6), torch.randn(3, 6)])
    with pytest.raises(ValueError, match="queue_outputs"):
        sf.swav_loss([z, z], queue_outputs=[torch.randn(3, 5, device="meta")] * 2)
    with pytest.raises(ValueError, match="high_resolution_outputs"):
        sf.swav_loss([z, torch.randn(4, 5, device="meta")])
    with pytest.raises(TypeError, match="low_resolution_outputs"):
        sf.swav_loss([z], [z.double()])


def test_negative_cosine_similarity_eps_and_shapes():
    """Was: RuntimeError for eps NaN / negative, NaN for a zero fp16 vector, 0 instead of -1 for tiny vectors,
    IndexError for a lower-rank broadcast input, NaN for empty inputs."""
    x = torch.randn(4, 8)
    for eps in (float("nan"), -1.0, 0.0, float("inf")):
        with pytest.raises(ValueError, match="eps"):
            sf.negative_cosine_similarity(x, x, eps=eps)
    with pytest.raises(TypeError, match="eps"):
        sf.negative_cosine_similarity(x, x, eps="1e-8")
    zero = torch.zeros(2, 4, dtype=torch.float16)
    assert sf.negative_cosine_similarity(zero, torch.ones(2, 4, dtype=torch.float16)).item() == 0.0
    tiny = torch.full((2, 4), 1e-30)
    assert sf.negative_cosine_similarity(tiny, tiny, eps=1e-35).item() == pytest.approx(-1.0)
    torch.testing.assert_close(sf.negative_cosine_similarity(x, x[0], dim=1),
                               reference.negative_cosine_similarity_reference(x, x[0].expand(4, 8)))
    assert sf.negative_cosine_similarity(x[0], x, dim=-1).shape == ()
    with pytest.raises(ValueError, match="x0"):
        sf.negative_cosine_similarity(torch.zeros(0, 3), torch.zeros(0, 3))


def test_byol_reference_zero_vector_term_is_two():
    """The reference wrote 2 - 2 cos as |p^ - z^|^2, which is 1 (not 2) when one vector is zero."""
    p, z = torch.zeros(1, 3), torch.ones(1, 3)
    assert reference.byol_loss_reference(p, p, z, z).item() == 2.0
    assert sf.byol_loss(p, p, z, z).item() == 2.0


def test_lightly_ntxent_memory_bank_checks_and_fp16():
    """Was: RuntimeError from F.normalize (integer input), silent broadcasting of out1 (N = 1), 'candidates' in
    the message for a bank of another width, NaN for large fp16 rows; bad sizes / temperatures named no argument."""
    crit = lightly_nn.NTXentLoss(memory_bank_size=(8, 4))
    with pytest.raises(TypeError, match="out0"):
        crit(torch.zeros(3, 4, dtype=torch.uint8), torch.zeros(3, 4))
    with pytest.raises(ValueError, match="out0 and out1"):
        crit(torch.randn(3, 4), torch.randn(1, 4))
    with pytest.raises(ValueError, match="memory_bank_size"):
        crit(torch.randn(3, 5), torch.randn(3, 5))
    big = (300 * torch.randn(3, 4)).half()
    assert torch.isfinite(crit(big, big.flip(0)))
    with pytest.raises(ValueError, match="memory_bank_size"):
        lightly_nn.NTXentLoss(memory_bank_size=4)
    with pytest.raises(ValueError, match="memory_bank_size"):
        lightly_nn.NTXentLoss(memory_bank_size=(4, 0))
    with pytest.raises(TypeError, match="temperature"):
        lightly_nn.NTXentLoss(temperature="0.5")
    with pytest.raises(ValueError, match="temperature"):
        lightly_nn.NTXentLoss(temperature=torch.tensor([0.1, 0.2]))


def test_lightly_directclr_argument_checks():
    """Was: IndexError for a 1-D input (flatten(start_dim=1)); loss_dim 0 / negative accepted."""
    with pytest.raises(ValueError, match="out0"):
        lightly_nn.DirectCLRLoss()(torch.randn(4), torch.randn(4))
    for bad in (0, -1, 2.5, True):
        with pytest.raises(ValueError, match="loss_dim"):
            lightly_nn.DirectCLRLoss(loss_dim=bad)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("fn", ["ntxent", "info_nce"])
@pytest.mark.parametrize("z1, z2, t", [
    ([[1.5410], [1.5410]], [[46229.8832], [-8802.8672]], 1.0),
    ([[46229.8832], [-8802.8672]], [[11768.9047], [-6706.9206]], 0.01),
])
def test_unnormalized_large_logits_gradient(backend, fn, z1, z2, t):
    """Was (cpp, normalize=False, |S| ~ 1e5 .. 1e11): dz1 off by 18.9 (bound 0.32), or Inf. Three causes: the
    backward took P = exp(S - lse) with lse = m + log l rounded to fp32 (eps |S| nats: 0.4% of P at |S| ~ 7e4); the
    diagonal tile read P_ja from S_aj, which the GEMM need not round like the S_ja the forward summed (1 ulp =
    4096 nats at 5e10: exp overflowed); the targets were subtracted as 2 Z_p after the GEMM, leaving the rounding
    of |P Z| where the exact gradient is 0."""
    x1 = torch.tensor(z1, requires_grad=True)
    x2 = torch.tensor(z2)
    with ssl_fast.set_backend(backend):
        loss = getattr(ssl_fast, fn)(x1, x2, t, normalize=False)
    g, = torch.autograd.grad(loss, x1)
    r1 = x1.detach().double().requires_grad_()
    ref, = torch.autograd.grad(getattr(reference, f"{fn}_reference")(r1, x2.double(), t, normalize=False), r1)
    assert torch.isfinite(g).all()
    assert (g.double() - ref).abs().max().item() <= 1e-5 * max(1.0, ref.abs().max().item())


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [float("inf"), float("nan")])
def test_swav_non_finite_queue_entry_spoils_only_its_codes(backend, bad):
    """Was: NaN gradients for every crop when a queue row held +Inf / NaN (the targets were total - own, so the NaN
    codes of crop 0 reached crop 0's own targets); lightly / SwAV give crop 0 a finite gradient (it predicts crop
    1's codes, whose queue is finite) and NaN only to the crops that predict crop 0's codes. The property of
    tests/test_fuzz.py now draws such queues (it excluded them with assume())."""
    torch.manual_seed(0)
    high = [torch.randn(4, 5, requires_grad=True) for _ in range(2)]
    queue = [torch.randn(3, 5) for _ in range(2)]
    queue[0][1, 2] = bad
    with ssl_fast.set_backend(backend):
        loss = sf.swav_loss(high, [], queue, temperature=0.1, sinkhorn_iterations=3, sinkhorn_epsilon=0.05)
    g0, g1 = torch.autograd.grad(loss, high)
    ref_high = [h.detach().double().requires_grad_() for h in high]
    codes = reference.sinkhorn_knopp_log_reference(torch.cat([ref_high[1].detach(), queue[1].double()]), 0.05, 3)[:4]
    ref_loss = -torch.sum(codes * torch.log_softmax(ref_high[0] / 0.1, dim=1)) / 4 / 2
    r0, = torch.autograd.grad(ref_loss, ref_high[0])
    assert torch.isnan(loss) and not torch.isfinite(g1).all()
    torch.testing.assert_close(g0.double(), r0, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("backend", BACKENDS)
def test_swav_tied_scores_at_tiny_temperature(backend):
    """Was (cpp): loss -inf and NaN gradients (0 and a gradient of 1e-5 at T = 1e-3) for tied scores: x = P / T was
    computed twice, and the compiler contracted x - max into fma(P, 1/T, -max), the rounding error of the product
    (~1e23 nats at 1e30); and n lse - <T, x> cancelled to 0 instead of log 2 (now computed shifted)."""
    low = torch.full((1, 2), 1.541, requires_grad=True)
    for t in (1e-30, 1e-3):
        with ssl_fast.set_backend(backend):
            loss = sf.swav_loss([torch.zeros(1, 2)], [low], temperature=t, sinkhorn_iterations=1, sinkhorn_epsilon=1.0)
        g, = torch.autograd.grad(loss, low)
        assert loss.item() == pytest.approx(math.log(2)) and torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
def test_swav_single_high_crop_with_minus_inf_score(backend):
    """Was (torch): NaN for a finite loss: with one high-resolution crop its targets are empty, and 0 * log p
    = 0 * -inf was still summed for its -inf score."""
    high = torch.tensor([[float("-inf"), -0.0003], [0.1, 0.2]])
    with ssl_fast.set_backend(backend):
        loss = sf.swav_loss([high], [torch.zeros(2, 2)], temperature=1.0, sinkhorn_iterations=1, sinkhorn_epsilon=1.0)
    assert loss.item() == pytest.approx(math.log(2))


@pytest.mark.skipif(not ssl_fast.HAS_EXT, reason="the C++ extension is not built")
def test_one_dimensional_rows_have_zero_gradient():
    """Was (cpp): a gradient of 1.7e-5 where the exact one is 0 (D = 1: every normalized row is +-1): the rows were
    multiplied by a rounded 1/|x|, so z was not exactly +-1 and g - z <z, g> kept eps |g| / |x|."""
    x = torch.tensor([[-7.4136e-04], [6.7087e-06], [-2.0392e-04], [4.1159e-04], [1.2597e-03], [-1.7285e-03],
                      [6.8076e-04]], requires_grad=True)
    with ssl_fast.set_backend("cpp"):
        loss = ssl_fast.ntxent(x, x.detach(), 2.00001)
    g, = torch.autograd.grad(loss, x)
    assert torch.equal(g, torch.zeros_like(g))


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("queue", [None, 0, 3])
def test_info_nce_key_with_a_column_stride(backend, queue):
    """Was (cpp): RuntimeError 'candidates must have unit stride along D' for a key whose columns are not adjacent
    (every other column of a wider tensor), with no queue or an empty one: since the queue goes into the op as a
    second tensor, nothing had made the key contiguous (the concatenation with the queue used to)."""
    g = torch.Generator().manual_seed(0)
    query = torch.randn(5, 4, generator=g, requires_grad=True)
    wide = torch.randn(5, 8, generator=g, requires_grad=True)
    negatives = None if queue is None else torch.randn(queue, 4, generator=g)
    with ssl_fast.set_backend(backend):
        loss = ssl_fast.info_nce(query, wide[:, ::2], 0.2, negatives=negatives)
    gq, gw = torch.autograd.grad(loss, [query, wide])
    q64, w64 = query.detach().double().requires_grad_(), wide.detach().double().requires_grad_()
    neg64 = torch.empty(0, 4, dtype=torch.float64) if negatives is None else negatives.double()
    ref = reference.info_nce_negatives_reference(q64, w64[:, ::2], neg64, 0.2)
    rq, rw = torch.autograd.grad(ref, [q64, w64])
    torch.testing.assert_close(loss.double(), ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(gq.double(), rq, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(gw.double(), rw, rtol=1e-4, atol=1e-6)


_HUGE = [-69312.3540, -11197.5258, -31824.5004, 29985.2806, -26520.7501, -38266.4079, -18696.7374, -25993.2481,
         -38868.8142, 45708.9487, 9709.8170, 60531.7809, 34072.2702, -36806.4402, 2141.6541, 10140.5221]


@pytest.mark.parametrize("backend", BACKENDS)
def test_ntxent_tied_logits_at_a_billion_nats(backend):
    """Was (cpp): gradients off by 400 and 800 (of 4754 and 2745) with z1 == z2, D = 1, |S| ~ 3e9: MKL's sgemm
    rounds alpha * A B^T differently with the operands' roles swapped, so two logits of equal inputs (a row
    against z1_j and against z2_j in another tile) were not equal: one fp32 ulp is 256 nats there, and the
    softmax's tie became a 1 / 0 split. The logits are now the GEMM's A B^T times 1/T."""
    z1 = torch.tensor(_HUGE)[:, None]
    z2 = z1.clone().requires_grad_()
    with ssl_fast.set_backend(backend):
        loss = ssl_fast.ntxent(z1, z2, 1.5, normalize=False)
    g, = torch.autograd.grad(loss, z2)
    r64 = z1.double().requires_grad_()
    ref = reference.ntxent_reference(z1.double(), r64, 1.5, normalize=False)
    rg, = torch.autograd.grad(ref, r64)
    torch.testing.assert_close(g.double(), rg, rtol=1e-4, atol=1e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_rect_candidates_gradient_at_large_logits(backend):
    """Was (cpp): the candidates' gradient off by 416 (of 1e5) with rows of |x| ~ 7e4 against small-integer
    candidates (D = 17, T = 1): the backward recomputed each tile transposed (C A^T), which MKL sums in another
    order than the forward's A C^T, so exp(S - lse) was not the forward's softmax. It now recomputes the forward's
    own tiles."""
    rows = torch.tensor([_HUGE + [4605.5651], [-18998.2383, -283.3883, -36530.6334, -37963.9592, -33586.0555,
                         34994.5716, 27786.9737, 23910.3005, 6349.9254, -34383.2767, 56183.2913, -9297.4492,
                         7205.4070, -40462.8308, 7331.9728, -411.6210, -5988.2468]])
    cands = torch.tensor([[1., 0, -3, -1, -2, -1, 3, 0, 1, 2, -1, -3, -2, 2, -1, 1, 1],
                          [-1., 1, -1, 3, -1, 1, -1, 1, 1, -2, 0, -2, 1, -2, -3, 1, 2]], requires_grad=True)
    pos = torch.tensor([0, 0])
    with ssl_fast.set_backend(backend):
        terms = sf.infonce_rect(rows, cands, pos, None, 1.0, normalize=False)
    g, = torch.autograd.grad(terms.sum(), cands)
    c64 = cands.detach().double().requires_grad_()
    rg, = torch.autograd.grad(reference.infonce_rect_reference(rows.double(), c64, pos, None, 1.0,
                                                               normalize=False).sum(), c64)
    torch.testing.assert_close(g.double(), rg, rtol=1e-5, atol=1.0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_infonce_rect_tied_candidates_at_1e30_nats(backend):
    """Was: the float64 reference (and so the torch backend) returned term 0 and gradient c / T = 1.5e30 for a row
    against two equal candidates at 1/T = 1e30: torch.logsumexp(S) rounds log 2 away at |S| ~ 2e30 and its backward
    exp(S - lse) gives 1, 1 instead of the softmax's 1/2, 1/2. Exact: term log 2, gradient 0 (what cpp returned)."""
    rows = torch.tensor([[1.541]], requires_grad=True)
    cands = torch.tensor([[1.541], [1.541]])
    with ssl_fast.set_backend(backend):
        terms = sf.infonce_rect(rows, cands, torch.tensor([0]), None, 1e-30, normalize=False)
    g, = torch.autograd.grad(terms.sum(), rows)
    assert torch.equal(g, torch.zeros_like(g))
    if backend == "torch":
        assert terms.item() == pytest.approx(math.log(2))


def test_reference_keeps_tied_logits_at_1e30_nats():
    rows = torch.tensor([[1.541]], dtype=torch.float64, requires_grad=True)
    t = reference.infonce_rect_reference(rows, torch.full((2, 1), 1.541, dtype=torch.float64), torch.tensor([0]),
                                         None, 1e-30, normalize=False)
    g, = torch.autograd.grad(t.sum(), rows)
    assert t.item() == pytest.approx(math.log(2)) and g.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_single_pair_learnable_temperature_gradient_is_nan_with_the_loss(backend):
    """Was: N = 1 with a NaN input gave a NaN loss but a temperature gradient of 0.0 (the float64 reference: NaN)."""
    t = torch.tensor(1.0, requires_grad=True)
    with ssl_fast.set_backend(backend):
        loss = ssl_fast.ntxent(torch.tensor([[0.0015]]), torch.tensor([[float("nan")]]), t)
    g, = torch.autograd.grad(loss, t)
    assert torch.isnan(loss) and torch.isnan(g)
    t = torch.tensor(1.0, requires_grad=True)
    with ssl_fast.set_backend(backend):
        loss = ssl_fast.ntxent(torch.tensor([[0.0015]]), torch.tensor([[2.0]]), t)
    g, = torch.autograd.grad(loss, t)
    assert loss.item() == 0.0 and g.item() == 0.0


@pytest.mark.parametrize("backend", BACKENDS)
def test_swav_fp16_gradient_that_fits_only_after_the_upstream_scale(backend):
    """Was (cpp): inf gradients for fp16 scores at T = 1e-6 and an upstream gradient of 0.2: the op computes the
    gradient of a unit upstream gradient in the forward (2.5e5, past fp16's 65504) and stored it in fp16; eager
    torch scales first and returns 5e4. The cpp op now keeps fp32 gradients for fp16 scores."""
    h0 = torch.tensor([[0.0015, -0.0003]], dtype=torch.float16, requires_grad=True)
    with ssl_fast.set_backend(backend):
        loss = sf.swav_loss([h0, torch.zeros(1, 2, dtype=torch.float16)], [], temperature=1e-6,
                            sinkhorn_epsilon=1.0, sinkhorn_iterations=1)
    g, = torch.autograd.grad(loss, h0, grad_outputs=torch.tensor(0.2))
    assert g.dtype == torch.float16 and torch.isfinite(g).all()
    torch.testing.assert_close(g.float(), torch.tensor([[5e4, -5e4]]), rtol=1e-3, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_lightly_bank_loss_keeps_the_inputs_dtype_with_a_float64_temperature(backend):
    """Was: lightly's NTXentLoss with a memory bank and a float64 tensor temperature returned a float64 loss for
    fp32 inputs (the positive logit was divided by the float64 tensor)."""
    torch.manual_seed(0)
    crit = lightly_nn.NTXentLoss(temperature=torch.tensor([1.0], dtype=torch.float64), memory_bank_size=(4, 3))
    with ssl_fast.set_backend(backend):
        loss = crit(torch.randn(2, 3), torch.randn(2, 3))
    assert loss.dtype == torch.float32 and loss.dim() == 0


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_negative_gives_a_nan_loss(backend):
    """Was (cpp): a NaN in the queue gave the loss -inf and a learnable temperature the gradient -0.0: the merged
    row sum NaN failed `sum > 0` and was taken for a row with every logit masked."""
    t = torch.tensor(1.0, requires_grad=True)
    with ssl_fast.set_backend(backend):
        loss = ssl_fast.info_nce(torch.zeros(1, 1), torch.zeros(1, 1), t, negatives=torch.tensor([[float("nan")]]))
        two = ssl_fast.info_nce(torch.ones(2, 3), torch.ones(2, 3), 1.0, negatives=torch.full((1, 3), float("nan")))
    g, = torch.autograd.grad(loss, t)
    assert torch.isnan(loss) and torch.isnan(g) and torch.isnan(two)
