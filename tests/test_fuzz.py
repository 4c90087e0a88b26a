"""Fuzzed arguments (hypothesis) for every public function and module, on the cpp and torch backends.

Every draw either matches the float64 reference (values and gradients, the 2x-eager rule) or raises ValueError /
TypeError naming the invalid argument; never another exception, a silent NaN / Inf for finite input, a wrong
value, or a write into an input (the property and the strategies: tests/fuzz_helpers.py).

Profiles (tests/conftest.py): ``ci`` (the default: derandomized, bounded examples) and ``long``
(``pytest tests/test_fuzz.py --hypothesis-profile long --hypothesis-show-statistics``).
"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

hypothesis = pytest.importorskip("hypothesis")
from hypothesis import assume, given, note, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

import ssl_fast  # noqa: E402
from ssl_fast import functional as sf  # noqa: E402
from ssl_fast import reference  # noqa: E402
from ssl_fast.nn import lightly as lightly_nn  # noqa: E402

from fuzz_helpers import (FLOATS, NOT_FLOATS, Arg, Call, Scalar, acc_dtype, check_call, dtypes,  # noqa: E402
                          positive_scalar, raises_named, sizes, storage_bytes, tensor_arg, within_rule)

BACKENDS = [b for b in ("cpp", "torch") if b != "cpp" or ssl_fast.HAS_EXT]


def _backend(name):
    return ssl_fast.set_backend(name)


@st.composite
def matrix(draw, name, n, d, dtype, **kw):
    """A (n, d) argument, or now and then one of another rank (invalid)."""
    rank = draw(st.sampled_from([2] * 12 + [0, 1, 3]))
    shape = {2: (n, d), 0: (), 1: (d,), 3: (n, d, 1)}[rank]
    return draw(tensor_arg(name, shape, dtype, **kw))


def _tensor_invalid(a: Arg, names=None) -> bool:
    return len(a.shape) != 2 or not a.floating or a.shape[0] == 0 or a.shape[1] == 0


def _pair_invalid(inv, a: Arg, b: Arg):
    """The checks of a pair (same N, D, device, dtype): both names."""
    for x in (a, b):
        if _tensor_invalid(x):
            inv[x.name] = [x.name]
    if a.name in inv or b.name in inv:
        return
    if a.shape != b.shape or a.device != b.device or a.dtype != b.dtype:
        inv[a.name] = [a.name, b.name]


@st.composite
def feature_dims(draw, d):
    kind = draw(st.sampled_from(["none"] * 4 + ["ok", "ok", "bad"]))
    if kind == "none":
        return None, False
    if kind == "ok" and d >= 1:
        return draw(st.integers(1, d)), False
    return draw(st.sampled_from([0, -1, d + 1, True, 2.0, "3"])), True


# ----------------------------------------------------------------------------------------------------
# ntxent / info_nce (queues, feature_dim, symmetric, learnable temperature)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_ntxent_info_nce(backend, data):
    kind = data.draw(st.sampled_from(["ntxent", "info_nce", "info_nce_sym", "negatives", "negatives_sym"]))
    names = ("z1", "z2") if kind == "ntxent" else ("query", "key")
    n, d = data.draw(sizes()), data.draw(sizes())
    dt = data.draw(dtypes())
    a = data.draw(matrix(names[0], n, d, dt))
    other = data.draw(st.sampled_from(["same"] * 10 + ["n", "d", "dtype", "meta"]))
    n2 = n + 1 if other == "n" else n
    d2 = d + 1 if other == "d" else d
    dt2 = data.draw(st.sampled_from([x for x in FLOATS + NOT_FLOATS if x != dt])) if other == "dtype" else dt
    b = data.draw(matrix(names[1], n2, d2, dt2, device="meta" if other == "meta" else "cpu"))
    inv = {}
    _pair_invalid(inv, a, b)
    temp: Scalar = data.draw(positive_scalar("temperature"))
    if temp.invalid_for(acc_dtype(dt) if dt.is_floating_point else torch.float32):
        inv["temperature"] = ["temperature"]
    fd, fd_bad = data.draw(feature_dims(d))
    if fd_bad or (fd is not None and not 1 <= fd <= d):
        inv["feature_dim"] = ["feature_dim"]
    normalize = data.draw(st.sampled_from([True, True, False]))
    args = [a, b]
    neg = None
    if kind.startswith("negatives"):
        m = data.draw(sizes(0, 6))
        width = data.draw(st.sampled_from(["d", "d", "fd", "bad"]))
        w = d if width == "d" or fd is None or fd_bad else (fd if width == "fd" else d + 2)
        neg_dt = data.draw(st.sampled_from([dt] * 6 + [torch.float16 if dt != torch.float16 else torch.float32,
                                                        torch.int64]))
        neg_dev = data.draw(st.sampled_from(["cpu"] * 8 + ["meta"]))
        neg = data.draw(matrix("negatives", m, w, neg_dt, device=neg_dev))
        args.append(neg)
        fd_eff = fd if isinstance(fd, int) and not isinstance(fd, bool) and 1 <= fd <= d else d
        if len(neg.shape) != 2 or neg.shape[1] not in (d, fd_eff) or neg.dtype != dt or neg.device != "cpu":
            inv["negatives"] = ["negatives"]
    symmetric = kind.endswith("sym")
    note(f"{kind} backend={backend} temperature={temp.value!r} feature_dim={fd!r} normalize={normalize}")

    def ours(v):
        with _backend(backend):
            if kind == "ntxent":
                return ssl_fast.ntxent(v["z1"], v["z2"], temp.value, normalize=normalize, feature_dim=fd)
            return ssl_fast.info_nce(v["query"], v["key"], temp.value, normalize=normalize, symmetric=symmetric,
                                     feature_dim=fd, negatives=v.get("negatives"))

    def ref(v, dtype, t):
        t = temp.ref if t is None else t
        if kind == "ntxent":
            return reference.ntxent_reference(v["z1"], v["z2"], t, normalize=normalize, feature_dim=fd)
        if neg is not None:
            return reference.info_nce_negatives_reference(v["query"], v["key"], v["negatives"], t,
                                                          normalize=normalize, symmetric=symmetric, feature_dim=fd)
        return reference.info_nce_reference(v["query"], v["key"], t, normalize=normalize, symmetric=symmetric,
                                            feature_dim=fd)

    call = Call(args, ours, ref, inv, scalars=[temp.value], learnable=temp if temp.learnable else None,
                value_scale=_logit_scale(args, temp, normalize))
    check_call(call, dt if dt.is_floating_point else torch.float32, data.draw(st.integers(0, 99)))


def _logit_scale(args, temp: Scalar, normalize: bool) -> float:
    """1e-2 x the largest |logit| (1/T for unit rows): the fused kernels compute the positive logit apart from the
    log-sum-exp, so at T = 1e-6 their loss differs from eager's by ~1 fp32 ulp of the logits (0.02 at 1e6) where
    eager's cancellation is exact: the value's floor is taken relative to the logits, not to the ~0 loss."""
    if temp.ref is None:
        return 0.0
    top = 1.0
    if not normalize:
        for a in args:
            if a.floating and a.values.numel() and bool(torch.isfinite(a.values).all()):
                top = max(top, a.values.to(a.dtype).double().abs().max().item() ** 2 * max(a.shape[-1:] or (1,)))
    return 1e-2 * top / temp.ref


# ----------------------------------------------------------------------------------------------------
# functional.infonce_rect (the op under queues, memory banks and the distributed losses)


@st.composite
def index_arg(draw, name, r, cn):
    kind = draw(st.sampled_from(["ok"] * 6 + ["none", "range", "dtype", "shape", "meta", "list"]))
    lo, hi = -1, max(cn - 1, -1)
    if kind in ("ok", "none"):
        t = (torch.full((r,), -1, dtype=torch.int64) if kind == "none"
             else torch.tensor([draw(st.integers(lo, hi)) for _ in range(r)], dtype=torch.int64))
        return t, False
    if kind == "range":
        t = torch.full((max(r, 1),), draw(st.sampled_from([-2, cn, cn + 5])), dtype=torch.int64)
        return t[:max(r, 1)], True
    if kind == "dtype":
        return torch.zeros(r, dtype=draw(st.sampled_from([torch.int32, torch.float32, torch.bool]))), True
    if kind == "shape":
        return torch.zeros((r + 1,) if draw(st.booleans()) else (r, 1), dtype=torch.int64), True
    if kind == "meta":
        return torch.zeros(r, dtype=torch.int64, device="meta"), True
    return [0] * r, True


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_infonce_rect(backend, data):
    r, cn, d = data.draw(sizes(0, 7)), data.draw(sizes(0, 7)), data.draw(sizes(0, 9))
    dt = data.draw(dtypes())
    rows = data.draw(matrix("rows", r, d, dt))
    c_dt = data.draw(st.sampled_from([dt] * 8 + [torch.float16 if dt != torch.float16 else torch.bfloat16]))
    cands = data.draw(matrix("candidates", cn, d, c_dt, device=data.draw(st.sampled_from(["cpu"] * 9 + ["meta"]))))
    inv = {}
    if _tensor_invalid(rows):
        inv["rows"] = ["rows"]
    elif len(cands.shape) != 2 or cands.shape[1] != d or cands.shape[0] == 0 or cands.dtype != dt \
            or cands.device != "cpu":
        inv["candidates"] = ["candidates"]
    pos, pos_bad = data.draw(index_arg("pos", r, cn))
    excl_kind = data.draw(st.sampled_from(["none", "index"]))
    excl, excl_bad = (None, False) if excl_kind == "none" else data.draw(index_arg("excl", r, cn))
    if pos_bad:
        inv["pos"] = ["pos"]
    elif not excl_bad and excl is not None and bool(((pos == excl) & (pos >= 0)).any()):
        inv["pos"] = ["pos", "excl"]  # a row's positive excluded from its own softmax
    if excl_bad:
        inv["excl"] = ["excl"]
    temp: Scalar = data.draw(positive_scalar("temperature"))
    if temp.invalid_for(acc_dtype(dt) if dt.is_floating_point else torch.float32):
        inv["temperature"] = ["temperature"]
    normalize = data.draw(st.booleans())
    grad_candidates = data.draw(st.sampled_from([True, True, False, "yes"]))
    if not isinstance(grad_candidates, bool):
        inv["grad_candidates"] = ["grad_candidates"]
    scalars = [temp.value] + [t for t in (pos, excl) if isinstance(t, torch.Tensor)]
    # the index tensors are not fuzzed for values beyond their range when the rows themselves are invalid
    if inv.keys() & {"rows", "candidates"}:
        for k in ("pos", "excl"):
            inv.setdefault(k, [k]) if k in inv else None

    def ours(v):
        with _backend(backend):
            return sf.infonce_rect(v["rows"], v["candidates"], pos, excl, temp.value, normalize=normalize,
                                   grad_candidates=grad_candidates)

    def ref(v, dtype, t):
        c = v["candidates"] if grad_candidates else v["candidates"].detach()
        return reference.infonce_rect_reference(v["rows"], c.to(v["rows"].dtype), pos, excl,
                                                temp.ref if t is None else t, normalize=normalize)

    call = Call([rows, cands], ours, ref, inv, scalars=scalars, learnable=temp if temp.learnable else None,
                value_scale=_logit_scale([rows, cands], temp, normalize))
    check_call(call, dt if dt.is_floating_point else torch.float32, data.draw(st.integers(0, 99)))


# ----------------------------------------------------------------------------------------------------
# sinkhorn_knopp


@st.composite
def int_at_least_one(draw, name):
    kind = draw(st.sampled_from(["ok"] * 5 + ["bad"]))
    if kind == "ok":
        return draw(st.integers(1, 5)), False
    return draw(st.sampled_from([0, -1, 2.5, True, "3", None, torch.tensor(3)])), True


def _codes_structure(q):
    """What Sinkhorn codes are whatever the rounding: finite, in [0, 1], unit row sums."""
    assert bool(torch.isfinite(q).all()), "non-finite codes"
    assert bool(((q >= 0) & (q <= 1 + 1e-5)).all())
    torch.testing.assert_close(q.double().sum(1), torch.ones(q.shape[0], dtype=torch.float64), rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_sinkhorn_knopp(backend, data):
    b, k = data.draw(sizes(0, 9)), data.draw(sizes(0, 9))
    dt = data.draw(dtypes())
    scores = data.draw(matrix("scores", b, k, dt, grad=True))
    inv = {}
    if _tensor_invalid(scores):
        inv["scores"] = ["scores"]
    eps: Scalar = data.draw(positive_scalar("epsilon", lo=1e-2, hi=10.0))
    acc = acc_dtype(dt) if dt.is_floating_point else torch.float32
    if eps.invalid_for(acc):
        inv["epsilon"] = ["epsilon"]
    iters, iters_bad = data.draw(int_at_least_one("iterations"))
    if iters_bad:
        inv["iterations"] = ["iterations"]
    check_finite = data.draw(st.booleans())
    if check_finite and "scores" not in inv and not scores.finite_view():
        inv["scores"] = ["scores"]
    if backend == "triton" and dt == torch.float64:  # the Triton kernels take fp32 / bf16 / fp16 (documented)
        inv["scores"] = ["scores"]

    def ours(v):
        with _backend(backend):
            return ssl_fast.sinkhorn_knopp(v["scores"], eps.value, iters, check_finite=check_finite)

    def ref(v, dtype, t):
        return reference.sinkhorn_knopp_log_reference(v["scores"].detach(), eps.ref, iters)

    def eager(v, dtype, t):  # SwAV's code as written (the yardstick of tests/test_sinkhorn.py)
        return reference.sinkhorn_knopp_reference(v["scores"].detach(), eps.ref, iters)

    structural, extra = None, 0.0
    if not inv and len(scores.shape) == 2 and scores.finite_view():
        top = scores.view(scores.values.to(dt).double()).abs().max().item()
        # the codes are softmaxes of s = scores / eps + u in the accumulation dtype: |s| ~ top / eps rounds by
        # eps_acc * |s| nats, which the log-domain algorithm (scalings u of the same magnitude) cannot avoid
        extra = 8 * torch.finfo(acc).eps * top / eps.ref
        if top / eps.ref > 1e7 * (1e8 if dt == torch.float64 else 1.0):
            structural = _codes_structure  # s = scores / eps rounds by more than a nat: no reference is exact

    call = Call([scores], ours, ref, inv, scalars=[eps.value, iters], scalar_output_scale=False,
                structural=structural, eager=eager, extra=extra)
    check_call(call, dt if dt.is_floating_point else torch.float32)


# ----------------------------------------------------------------------------------------------------
# SwAV: functional swav_loss, ssl_fast.nn.SwaVLoss, ssl_fast.nn.lightly.SwaVLoss


def _swav_reference(high, low, queue, temperature, epsilon, iterations):
    """SwAV's loss written out (log-domain codes; the queue rows join the codes and are dropped)."""
    crops = list(high) + list(low)
    b = high[0].shape[0]
    loss = 0
    for i, h in enumerate(high):
        s = h.detach()
        if queue is not None:
            s = torch.cat([s, queue[i].detach().to(s.dtype)])
        q = reference.sinkhorn_knopp_log_reference(s, epsilon, iterations)[:b]
        sub = 0
        for v, z in enumerate(crops):
            if v != i:
                sub = sub - torch.mean(torch.sum(q * F.log_softmax(z / temperature, dim=1), dim=1))
        loss = loss + sub / (len(crops) - 1)
    return loss / len(high)


def _finite_loss(out):
    assert bool(torch.isfinite(out).all()), "non-finite loss for finite crops"


def _same_finiteness(reference_loss):
    """Non-finite inputs where no reference is exact: the loss is finite exactly where the float64 one is."""
    def check(out):
        want = bool(torch.isfinite(reference_loss()).all())
        assert bool(torch.isfinite(out).all()) == want, f"loss {out} where the float64 reference is finite={want}"
    return check


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_swav_loss(backend, data):
    entry = data.draw(st.sampled_from(["functional", "functional", "nn", "lightly"]))
    n_high, n_low = data.draw(st.integers(0, 3)), data.draw(st.integers(0, 2))
    b, k = data.draw(sizes(0, 6)), data.draw(sizes(0, 6))
    dt = data.draw(dtypes())
    odd = data.draw(st.sampled_from(["none"] * 8 + ["shape", "dtype", "meta", "rank"]))
    odd_at = data.draw(st.integers(0, max(n_high + n_low - 1, 0)))
    crops, inv = [], {}
    for i in range(n_high + n_low):
        name = f"high{i}" if i < n_high else f"low{i - n_high}"
        which = "high_resolution_outputs" if i < n_high else "low_resolution_outputs"
        shape, cdt, dev = (b, k), dt, "cpu"
        if i == odd_at and i > 0:
            shape = {"shape": (b, k + 1), "rank": (b,)}.get(odd, shape)
            cdt = torch.float64 if odd == "dtype" and dt != torch.float64 else (torch.float32 if odd == "dtype" else dt)
            dev = "meta" if odd == "meta" else "cpu"
            if odd != "none":
                inv[which] = [which, "high_resolution_outputs", "low_resolution_outputs"]
        c = data.draw(tensor_arg(name, shape, cdt, device=dev))
        crops.append(c)
    if not dt.is_floating_point and crops:
        inv["high_resolution_outputs" if n_high else "low_resolution_outputs"] = [
            "high_resolution_outputs", "low_resolution_outputs"]
    if n_high == 0:
        inv["high_resolution_outputs"] = ["high_resolution_outputs"]
    elif n_high + n_low < 2:
        inv["crops"] = ["high_resolution_outputs", "low_resolution_outputs"]
    if crops and (b == 0 or k == 0):
        inv["high_resolution_outputs"] = ["high_resolution_outputs", "low_resolution_outputs"]
    queue_kind = data.draw(st.sampled_from(["none"] * 3 + ["ok", "ok", "few", "width", "meta", "int"]))
    queue = None
    if queue_kind != "none":
        nq = n_high - 1 if queue_kind == "few" else n_high + data.draw(st.integers(0, 1))
        bq = data.draw(sizes(0, 5))
        queue = [data.draw(tensor_arg(f"queue{i}", (bq, k + (queue_kind == "width")),
                                      torch.int64 if queue_kind == "int" else data.draw(st.sampled_from(FLOATS)),
                                      device="meta" if queue_kind == "meta" else "cpu"))
                 for i in range(max(nq, 0))]
        if queue_kind != "ok" and (n_high > 0 and (queue_kind == "few" or queue)):
            inv["queue_outputs"] = ["queue_outputs"]
    temp = data.draw(positive_scalar("temperature", tensors=False))
    eps = data.draw(positive_scalar("sinkhorn_epsilon", tensors=False, lo=1e-2, hi=10.0))
    iters, iters_bad = data.draw(int_at_least_one("sinkhorn_iterations"))
    for s, name in ((temp, "temperature"), (eps, "sinkhorn_epsilon")):
        if s.invalid_for(acc_dtype(dt) if dt.is_floating_point else torch.float32):
            inv[name] = [name]
    if iters_bad:
        inv["sinkhorn_iterations"] = ["sinkhorn_iterations"]
    note(f"{entry} backend={backend} n_high={n_high} n_low={n_low} queue={queue_kind} T={temp.value!r} "
         f"eps={eps.value!r} iters={iters!r}")
    args = crops + (queue or [])

    def split(v):
        cs = [v[a.name] for a in crops]
        qs = [v[a.name] for a in queue] if queue is not None else None
        return cs[:n_high], cs[n_high:], qs

    def ours(v):
        high, low, qs = split(v)
        with _backend(backend):
            if entry == "functional":
                return sf.swav_loss(high, low, qs, temperature=temp.value, sinkhorn_iterations=iters,
                                    sinkhorn_epsilon=eps.value)
            cls = ssl_fast.nn.SwaVLoss if entry == "nn" else lightly_nn.SwaVLoss
            crit = cls(temperature=temp.value, sinkhorn_iterations=iters, sinkhorn_epsilon=eps.value)
            return crit(high, low, qs)

    def ref(v, dtype, t):
        high, low, qs = split(v)
        out = _swav_reference(high, low, qs, temp.ref, eps.ref, iters)
        return out.reshape(1) if entry == "lightly" else out

    structural = None
    if not inv and eps.ref is not None:
        # the codes' inputs (high crops, queue rows), finite entries only
        vals = [c.view(c.values.to(c.dtype).double()) for c in crops[:n_high] + (queue or [])]
        top = max([v[torch.isfinite(v)].abs().max().item() for v in vals if bool(torch.isfinite(v).any())] + [0.0])
        if top / eps.ref > 1e7 * (1e8 if dt == torch.float64 else 1.0):
            # s = scores / eps rounds by more than a nat: no exact reference (the float64 one included)
            structural = _finite_loss if all(a.finite_view() for a in args) else _same_finiteness(
                lambda: ref({a.name: a.view(a.base(torch.float64)) for a in args}, torch.float64, None))
    extra = grad_extra = 0.0
    if not inv and eps.ref is not None and structural is None and b:
        # the codes are Sinkhorn's, whose rounding (test_sinkhorn_knopp: 8 eps_acc |scores| / eps nats, a relative
        # error of each code) no backend avoids: it moves the targets T_v, so the gradient c / T (n softmax - T_v)
        # by <= rel / (T B) and the value by <= rel (log K + range of P_v / T)
        rel = 8 * torch.finfo(acc_dtype(dt)).eps * top / eps.ref
        fin = [c.view(c.values.to(c.dtype).double()) for c in crops]
        span = max([(v[torch.isfinite(v)].max() - v[torch.isfinite(v)].min()).item() for v in fin
                    if bool(torch.isfinite(v).any())] + [0.0])
        grad_extra = rel / (temp.ref * b)
        extra = rel * (math.log(max(k, 1)) + span / temp.ref)
    call = Call(args, ours, ref, inv, structural=structural, extra=extra, grad_extra=grad_extra)
    check_call(call, dt if dt.is_floating_point else torch.float32, data.draw(st.integers(0, 99)))


# ----------------------------------------------------------------------------------------------------
# ema_update_ (and lightly's update_momentum)


@st.composite
def momenta(draw):
    kind = draw(st.sampled_from(["float"] * 4 + ["edge", "tensor", "bad", "badtensor"]))
    if kind == "float":
        v = draw(st.floats(0.0, 1.0))
        return Scalar(v, v, False)
    if kind == "edge":
        v = draw(st.sampled_from([0, 1, 0.0, 1.0, 5e-324, 1 - 1e-16]))
        return Scalar(v, float(v), False)
    if kind == "tensor":
        t = torch.full(draw(st.sampled_from([(), (1,)])), draw(st.floats(0.0, 1.0)),
                       dtype=draw(st.sampled_from([torch.float32, torch.float64])))
        return Scalar(t, float(t.reshape(())), False)
    if kind == "bad":
        return Scalar(draw(st.sampled_from([-0.1, 1.5, float("nan"), float("inf"), True, "0.9", None, 0.5j])),
                      None, True)
    t = draw(st.sampled_from([lambda: torch.tensor([0.5, 0.5]), lambda: torch.tensor(1), lambda: torch.tensor(True),
                              lambda: torch.tensor(1.5), lambda: torch.tensor(float("nan")),
                              lambda: torch.empty((), device="meta"), lambda: torch.tensor(0.5 + 0j)]))()
    return Scalar(t, None, True)


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_ema_update(backend, data):
    n_pairs = data.draw(st.integers(0, 3))
    ema, online, inv = [], [], {}
    for i in range(n_pairs):
        rank = data.draw(st.sampled_from([2, 2, 2, 0, 1, 3]))
        shape = tuple(data.draw(sizes(0, 5)) for _ in range(rank))
        edt = data.draw(dtypes())
        odt = data.draw(st.sampled_from([edt] * 3 + FLOATS + [torch.int64]))
        e = data.draw(tensor_arg(f"ema{i}", shape, edt))
        odd = data.draw(st.sampled_from(["none"] * 10 + ["shape", "meta", "alias"]))
        oshape = shape + (1,) if odd == "shape" else shape
        o = data.draw(tensor_arg(f"online{i}", oshape, odt, device="meta" if odd == "meta" else "cpu"))
        if not e.floating:
            inv[f"e{i}"] = [f"ema_tensors[{i}]"]
        if not o.floating:
            inv[f"o{i}"] = [f"online_tensors[{i}]"]
        if odd in ("shape", "meta"):
            inv[f"p{i}"] = [f"ema_tensors[{i}]", f"online_tensors[{i}]"]
        if e.floating and e.shares_memory():  # an in-place update of an expanded / overlapping view: ill-defined
            inv[f"x{i}"] = [f"ema_tensors[{i}]"]
        ema.append(e)
        online.append(o)
    extra = data.draw(st.sampled_from(["none"] * 10 + ["longer", "tensor", "nonlist", "notensor"]))
    m = data.draw(momenta())
    if m.invalid:
        inv["momentum"] = ["momentum"]
    if extra == "longer":
        inv["len"] = ["ema_tensors", "online_tensors"]
    elif extra in ("tensor", "nonlist"):
        inv["ema_tensors"] = ["ema_tensors"]
    elif extra == "notensor":
        inv["nt"] = [f"ema_tensors[{n_pairs}]", f"online_tensors[{n_pairs}]"]
    note(f"backend={backend} momentum={m.value!r} extra={extra}")

    bases = {a.name: a.base() for a in ema + online}
    views = {a.name: a.view(bases[a.name]) for a in ema + online}
    es, os_ = [views[a.name] for a in ema], [views[a.name] for a in online]
    if extra == "notensor":
        es, os_ = es + [1.0], os_ + [torch.zeros(1)]
    ema_before = [views[a.name].detach().clone() for a in ema]
    online_snap = {a.name: storage_bytes(bases[a.name]) for a in online}
    ema_snap = {a.name: bases[a.name].detach().clone() for a in ema}
    # the online tensor that aliases its ema tensor: the same tensor in both lists
    aliased = set()
    for i in range(n_pairs):
        if online[i].shape == ema[i].shape and data.draw(st.integers(0, 11)) == 0 and f"o{i}" not in inv \
                and f"p{i}" not in inv:
            os_[i] = es[i]
            aliased.add(i)

    def ours():
        with _backend(backend):
            if extra == "longer":
                return ssl_fast.ema_update_(es, os_ + [torch.zeros(1)], m.value)
            if extra == "tensor":
                return ssl_fast.ema_update_(es[0] if es else torch.zeros(2), os_, m.value)
            if extra == "nonlist":
                return ssl_fast.ema_update_(3, os_, m.value)
            return ssl_fast.ema_update_(es, os_, m.value)

    snap_m = storage_bytes(m.value) if isinstance(m.value, torch.Tensor) else None
    _, exc = raises_named(ours, inv)
    if snap_m is not None:
        assert torch.equal(snap_m, storage_bytes(m.value)), "momentum was written"
    for a in online:
        if online_snap[a.name] is not None and int(a.name[6:]) not in aliased:
            assert torch.equal(online_snap[a.name], storage_bytes(bases[a.name])), f"{a.name} was written"
    if exc is not None or extra != "none":
        for a in ema:  # a failed call modifies nothing
            assert torch.equal(ema_snap[a.name], bases[a.name].detach()) or ema_snap[a.name].isnan().any(), \
                f"{a.name} was modified by a call that raised"
        return
    mv = m.ref
    for i, a in enumerate(ema):
        got = views[a.name].detach()
        e0 = ema_before[i]
        o0 = (e0 if i in aliased else views[online[i].name].detach())
        ref = e0.double() + (1 - mv) * (o0.double() - e0.double())
        eager = e0.lerp(o0.to(e0.dtype), 1 - mv)
        eager_acc = e0.to(acc_dtype(e0.dtype)).lerp(o0.to(acc_dtype(e0.dtype)), 1 - mv)
        within_rule(f"ema_tensors[{i}]", got, ref, eager, eager_acc, a.dtype, max(1.0, ref[torch.isfinite(ref)]
                                                                                   .abs().max().item()
                                                                                   if ref.numel() and
                                                                                   torch.isfinite(ref).any()
                                                                                   else 1.0))
        # nothing outside the view changed: put ours' values into the old base, compare the whole storage
        expect = ema_snap[a.name].clone()
        a.view(expect).copy_(got)
        assert torch.equal(storage_bytes(expect), storage_bytes(bases[a.name])), f"{a.name}: written outside its view"


# ----------------------------------------------------------------------------------------------------
# BYOL loss, negative cosine similarity (functional and modules)


@given(data=st.data())
def test_byol_loss(data):
    entry = data.draw(st.sampled_from(["functional", "nn"]))
    n, d = data.draw(sizes(0, 7)), data.draw(sizes(0, 9))
    dt = data.draw(dtypes())
    names = ["p0", "p1", "z0", "z1"]
    odd = data.draw(st.sampled_from(["none"] * 8 + ["shape", "meta", "dtype"]))
    odd_at = data.draw(st.integers(1, 3))
    args, inv = [], {}
    for i, name in enumerate(names):
        shape, cdt, dev = (n, d), dt, "cpu"
        if i == odd_at:
            shape = (n + 1, d) if odd == "shape" else shape
            dev = "meta" if odd == "meta" else "cpu"
            cdt = torch.int32 if odd == "dtype" else dt
        a = data.draw(matrix(name, shape[0], shape[1], cdt, device=dev))
        args.append(a)
        if len(a.shape) != 2 or not a.floating:
            inv[name] = [name]
    if not inv:
        if any(a.shape != args[0].shape or a.device != "cpu" for a in args):
            inv["shape"] = ["p0"] + [a.name for a in args[1:] if a.shape != args[0].shape or a.device != "cpu"]
        elif n == 0 or d == 0:
            inv["empty"] = names

    def ours(v):
        xs = [v[k] for k in names]
        return sf.byol_loss(*xs) if entry == "functional" else ssl_fast.nn.BYOLLoss()(*xs)

    def ref(v, dtype, t):
        return reference.byol_loss_reference(*[v[k] for k in names])

    check_call(Call(args, ours, ref, inv), dt if dt.is_floating_point else torch.float32, data.draw(st.integers(0, 99)))


@given(data=st.data())
def test_negative_cosine_similarity(data):
    entry = data.draw(st.sampled_from(["functional", "nn", "lightly"]))
    n, d = data.draw(sizes(0, 7)), data.draw(sizes(0, 9))
    dt = data.draw(dtypes())
    x0 = data.draw(matrix("x0", n, d, dt))
    shape1 = data.draw(st.sampled_from(["same"] * 6 + ["row", "bad", "meta", "dtype"]))
    s1 = {"row": (1, d), "bad": (n + 2, d + 1)}.get(shape1, (n, d))
    x1 = data.draw(tensor_arg("x1", s1, torch.int64 if shape1 == "dtype" else dt,
                              device="meta" if shape1 == "meta" else "cpu"))
    dim = data.draw(st.sampled_from([1, 1, 1, -1, 0, -2, 2, -3, True, 1.0]))
    eps = data.draw(st.sampled_from([1e-8, 1e-8, 1e-8, 1e-3, 1e-30, 0.0, -1.0, float("nan"), float("inf"), True,
                                     "1e-8", None]))
    inv = {}
    for a in (x0, x1):
        if not a.floating:
            inv[a.name] = [a.name]
    if not inv:
        try:
            shape = torch.broadcast_shapes(x0.shape, x1.shape)
        except RuntimeError:
            shape = None
            inv["shape"] = ["x0", "x1"]
        if x1.device != "cpu":
            inv["device"] = ["x0", "x1"]
        if isinstance(dim, bool) or not isinstance(dim, int):
            inv["dim"] = ["dim"]
        elif shape is not None and not -len(shape) <= dim < max(len(shape), 1):
            inv["dim"] = ["dim"]
        if shape is not None and 0 in shape:
            inv["empty"] = ["x0", "x1"]
    if isinstance(eps, bool) or not isinstance(eps, float) or not (math.isfinite(eps) and eps > 0):
        inv["eps"] = ["eps"]

    def ours(v):
        if entry == "functional":
            return sf.negative_cosine_similarity(v["x0"], v["x1"], dim, eps)
        cls = ssl_fast.nn.NegativeCosineSimilarity if entry == "nn" else lightly_nn.NegativeCosineSimilarity
        return cls(dim=dim, eps=eps)(v["x0"], v["x1"])

    def ref(v, dtype, t):
        return reference.negative_cosine_similarity_reference(v["x0"], v["x1"], dim, eps)

    call = Call([x0, x1], ours, ref, inv, out_dtype=dt)
    check_call(call, dt if dt.is_floating_point else torch.float32, data.draw(st.integers(0, 99)))


# ----------------------------------------------------------------------------------------------------
# the lightly drop-ins: NTXentLoss (with and without a memory bank), DirectCLRLoss; ssl_fast.nn's InfoNCE modules


def _bank_reference(out0, out1, bank, temperature):
    """lightly's NTXentLoss with a memory bank: positives out0_i . out1_i against the bank's rows, target 0."""
    a, b = F.normalize(out0, dim=1), F.normalize(out1, dim=1)
    pos = (a * b).sum(1, keepdim=True)
    neg = a @ bank.to(a.dtype).t()  # the bank holds normalized rows (as lightly's): used as stored
    logits = torch.cat([pos, neg], 1) / temperature
    return F.cross_entropy(logits, torch.zeros(a.shape[0], dtype=torch.long))


@pytest.mark.parametrize("backend", BACKENDS)
@given(data=st.data())
def test_lightly_losses(backend, data):
    cls = data.draw(st.sampled_from(["NTXentLoss", "NTXentLoss", "DirectCLRLoss", "nn.NTXentLoss",
                                     "nn.InfoNCELoss", "nn.DirectCLRLoss"]))
    n, d = data.draw(sizes(0, 7)), data.draw(sizes(0, 9))
    dt = data.draw(dtypes())
    rank = data.draw(st.sampled_from([2] * 8 + [1, 3]))
    shape = (n, d) if rank == 2 else ((n,) if rank == 1 else (n, d, 2))
    a = data.draw(tensor_arg("out0", shape, dt))
    other = data.draw(st.sampled_from(["same"] * 8 + ["n", "meta"]))
    b = data.draw(tensor_arg("out1", ((n + 1,) + shape[1:]) if other == "n" else shape, dt,
                             device="meta" if other == "meta" else "cpu"))
    temp = data.draw(positive_scalar("temperature"))
    bank = data.draw(st.sampled_from([0, 0, "ok", "dim", "int"])) if cls in ("NTXentLoss", "DirectCLRLoss") else 0
    loss_dim = data.draw(st.sampled_from([None, None, 1, 3, 64, 0, -1, 2.5])) if "DirectCLR" in cls else None
    width = 1
    for s in shape[1:]:
        width *= s
    eff_d = width if loss_dim is None or not isinstance(loss_dim, int) or loss_dim < 1 else min(width, loss_dim)
    if cls == "DirectCLRLoss" and loss_dim is None:
        eff_d = min(width, 64)
    if cls == "nn.DirectCLRLoss":
        eff_d = 360 if loss_dim is None else loss_dim  # ssl_fast's feature_dim: at most D, never capped
    m = data.draw(st.integers(1, 5))
    bank_size = {0: 0, "ok": (m, eff_d), "dim": (m, eff_d + 1), "int": m}[bank]
    inv = {}
    out_names = {"out0": ["out0", "z1", "query", "r0"], "out1": ["out1", "z2", "key", "r1"]}
    aliases = out_names["out0"] + out_names["out1"]
    if cls != "DirectCLRLoss":  # lightly's DirectCLRLoss flattens (N, ...) inputs; the others take (N, D)
        inv_shape = rank != 2
    else:
        inv_shape = rank < 2
    if not a.floating or inv_shape:
        inv["out0"] = out_names["out0"]
    if not b.floating and "out0" not in inv:
        inv["out1"] = out_names["out1"]
    if not inv and (a.shape[0] != b.shape[0] or b.device != "cpu" or (rank == 2 and a.shape != b.shape)):
        inv["pair"] = aliases
    if (not inv and (n == 0 or eff_d == 0)) or (not inv_shape and width == 0):
        inv["empty"] = aliases + (["loss_dim", "feature_dim"] if "DirectCLR" in cls else [])
    if temp.invalid_for(acc_dtype(dt) if dt.is_floating_point else torch.float32) or (
            not cls.startswith("nn.") and temp.ref < 1e-8):  # lightly: abs(T) < 1e-8 raises
        inv["temperature"] = ["temperature"]
    if bank in ("dim", "int") or (bank == "ok" and eff_d < 1):
        inv["memory_bank_size"] = ["memory_bank_size"]
    if loss_dim is not None and (not isinstance(loss_dim, int) or loss_dim < 1):
        inv["loss_dim"] = ["loss_dim", "feature_dim"]
    elif cls == "nn.DirectCLRLoss" and rank == 2 and eff_d > width:
        inv["loss_dim"] = ["feature_dim"]
    note(f"{cls} backend={backend} T={temp.value!r} bank={bank_size} loss_dim={loss_dim}")
    state = {}

    def build():
        kw = {}
        if cls in ("NTXentLoss", "DirectCLRLoss"):
            kw["memory_bank_size"] = bank_size
        if cls == "DirectCLRLoss" and loss_dim is not None:
            kw["loss_dim"] = loss_dim
        if cls == "nn.DirectCLRLoss" and loss_dim is not None:
            kw["feature_dim"] = loss_dim
        klass = {"NTXentLoss": lightly_nn.NTXentLoss, "DirectCLRLoss": lightly_nn.DirectCLRLoss,
                 "nn.NTXentLoss": ssl_fast.nn.NTXentLoss, "nn.InfoNCELoss": ssl_fast.nn.InfoNCELoss,
                 "nn.DirectCLRLoss": ssl_fast.nn.DirectCLRLoss}[cls]
        return klass(temperature=temp.value, **kw)

    def ours(v):
        crit = build()
        if bank == "ok" and crit.memory_bank.queue is not None:
            state["bank"] = crit.memory_bank.queue.negatives().detach().clone()
        with _backend(backend):
            return crit(v["out0"], v["out1"])

    def ref(v, dtype, t):
        x0, x1 = v["out0"], v["out1"]
        tt = temp.ref if t is None else t
        if "DirectCLR" in cls:
            x0, x1 = x0.flatten(1)[:, :eff_d], x1.flatten(1)[:, :eff_d]
        if "bank" in state:
            return _bank_reference(x0, x1, state["bank"], tt)
        if cls == "nn.InfoNCELoss" or cls == "nn.DirectCLRLoss":
            return reference.info_nce_reference(x0, x1, tt, symmetric=cls == "nn.DirectCLRLoss")
        return reference.ntxent_reference(x0, x1, tt)

    call = Call([a, b], ours, ref, inv, scalars=[temp.value], learnable=temp if temp.learnable else None,
                value_scale=_logit_scale([a, b], temp, True))
    check_call(call, dt if dt.is_floating_point else torch.float32, data.draw(st.integers(0, 99)))


def test_update_momentum_fuzz_smoke():
    """lightly's update_momentum wraps ema_update_ (fuzzed above): its own argument checks name the argument."""
    with pytest.raises(TypeError, match="model"):
        lightly_nn.update_momentum(3, torch.nn.Linear(2, 2), 0.5)
    with pytest.raises(ValueError, match="momentum"):
        lightly_nn.update_momentum(torch.nn.Linear(2, 2), torch.nn.Linear(2, 2), 1.5)


# ----------------------------------------------------------------------------------------------------
# the triton backend: on CPU tensors under the interpreter (conftest sets TRITON_INTERPRET=1 without a GPU), a few
# draws of the same properties (10 per op: an interpreted kernel call costs ~0.5 s)

TRITON_BODIES = {"ntxent_info_nce": test_ntxent_info_nce, "sinkhorn_knopp": test_sinkhorn_knopp,
                 "ema_update": test_ema_update}


@pytest.mark.skipif(not ssl_fast.ops._backend.triton_available() or (
    not torch.cuda.is_available() and not ssl_fast.ops._backend.interpreter_enabled()),
    reason="needs triton (a GPU or TRITON_INTERPRET=1)")
@pytest.mark.parametrize("body", sorted(TRITON_BODIES))
@settings(max_examples=10)
@given(data=st.data())
def test_triton_backend_few_draws(body, data):
    TRITON_BODIES[body].hypothesis.inner_test("triton", data)
