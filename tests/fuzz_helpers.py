"""Strategies and the one property of tests/test_fuzz.py (hypothesis).

A draw is a set of arguments, each either valid or deliberately invalid (the invalid ones are named). The property
(:func:`check_call`):

* an invalid argument -> ValueError or TypeError whose message names it (as a word), nothing else;
* all arguments valid -> no exception; the value and the gradients (w.r.t. the leaf storage of every input that
  requires grad, and a learnable temperature) within the project's rule against the float64 reference: error
  <= 2x the error of eager torch in the inputs' dtype, plus an atol floor (tests/infonce_helpers.py's floors);
  a non-finite result only where the float64 reference is non-finite too, or eager torch in the accumulation
  dtype (fp32) also overflows once returned in the result's dtype, or the exact gradient of the view the call
  received does not fit the dtype (autograd sums its overflowed aliases into the leaf);
* the yardsticks where the dtype itself decides: float64 inputs take as "eager" the float64 reference on inputs
  moved by an ulp or two (eager IS the reference there; this measures the reference's own rounding), and a
  gradient of an expanded / overlapping input is allowed half an ulp per alias (autograd rounds each alias's
  gradient to the dtype before it sums them);
* either way no input is written: every input's whole storage (expanded and overlapping views included) is
  compared bit for bit before and after the call.

Inputs are built from a leaf "base" tensor and a layout (contiguous, column-major, column step, row slice, row
step, expanded rows / columns (stride 0), overlapping rows (as_strided)), so the float64 reference sees the same
view of the same (rounded) values and gradients are compared on the leaf (overlaps accumulate).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Optional, Sequence

import torch
from hypothesis import note
from hypothesis import strategies as st

from infonce_helpers import FLOORS as _FLOORS

FLOORS = {**_FLOORS, torch.float64: 1e-10}  # relative to max |reference|
FLOATS = [torch.float32, torch.float64, torch.bfloat16, torch.float16]
NOT_FLOATS = [torch.int64, torch.int32, torch.uint8, torch.bool, torch.complex64]
LAYOUTS = ["contiguous", "colmajor", "colstep", "rowslice", "rowstep", "expand_rows", "expand_cols", "overlap"]
VALUES = ["normal", "normal", "normal", "zeros", "ties", "ints", "tiny", "huge"]


def acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


# ----------------------------------------------------------------------------------------------------
# tensors


@dataclass
class Arg:
    """One tensor argument: its values (float64, on the base's shape), dtype, layout, device and grad flag."""

    name: str
    shape: tuple
    dtype: torch.dtype
    layout: str = "contiguous"
    values: torch.Tensor = None
    step: int = 1  # row stride of the overlapping layout
    device: str = "cpu"
    requires_grad: bool = False

    @property
    def floating(self) -> bool:
        return self.dtype.is_floating_point

    def finite_view(self) -> bool:
        """The values the call sees (rounded to the dtype, through the layout) are all finite."""
        if not self.floating:
            return True
        return bool(torch.isfinite(self.view(self.values.to(self.dtype))).all())

    def shares_memory(self) -> bool:
        """Two elements of the view share one memory location (an expanded or overlapping layout)."""
        numel = 1
        for x in self.values.shape:
            numel *= x
        offsets = self.view(torch.arange(numel, dtype=torch.int64).reshape(self.values.shape)).reshape(-1)
        return offsets.unique().numel() < offsets.numel()

    def base(self, dtype: Optional[torch.dtype] = None) -> torch.Tensor:
        """A fresh leaf holding the values rounded to ``self.dtype`` (then cast to ``dtype``)."""
        if self.device == "meta":
            b = torch.empty(self.values.shape, dtype=dtype or self.dtype, device="meta")
        else:
            b = self.values.to(self.dtype)
            if dtype is not None:
                b = b.to(dtype)
        if self.requires_grad and b.dtype.is_floating_point:
            b.requires_grad_()
        return b

    def view(self, b: torch.Tensor) -> torch.Tensor:
        if len(self.shape) != 2:
            return b
        n, d = self.shape
        return {
            "contiguous": lambda: b,
            "colmajor": lambda: b.t(),
            "colstep": lambda: b[:, ::2],
            "rowslice": lambda: b[:, :d],
            "rowstep": lambda: b[::2],
            "expand_rows": lambda: b.expand(n, d),
            "expand_cols": lambda: b.expand(n, d),
            "overlap": lambda: b.as_strided((n, d), (self.step, 1)),
        }[self.layout]()

    def describe(self) -> str:
        return (f"{self.name}: shape {self.shape} {self.dtype} {self.layout}(step {self.step}) on {self.device}, "
                f"requires_grad={self.requires_grad}, finite={self.finite_view()}")


def _base_shape(shape, layout, step):
    if len(shape) != 2:
        return shape
    n, d = shape
    return {"contiguous": (n, d), "colmajor": (d, n), "colstep": (n, 2 * d), "rowslice": (n, d + 3),
            "rowstep": (2 * n, d), "expand_rows": (1, d), "expand_cols": (n, 1),
            "overlap": (max(0, (n - 1) * step + d) if n and d else 0,)}[layout]


@st.composite
def values(draw, shape, nonfinite: bool = True):
    """float64 values of ``shape``: Gaussian at several scales, zeros, tied rows, small integers, tiny, huge; with
    some NaN / +-Inf entries when ``nonfinite``."""
    numel = 1
    for s in shape:
        numel *= s
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31 - 1)))
    kind = draw(st.sampled_from(VALUES))
    if kind == "normal":
        scale = draw(st.sampled_from([1e-3, 1.0, 1.0, 10.0]))
        v = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    elif kind == "zeros":
        v = torch.zeros(shape, dtype=torch.float64)
    elif kind == "ties":
        v = torch.randn(shape[-1:] if shape else (), generator=g, dtype=torch.float64).expand(shape).clone()
    elif kind == "ints":
        v = torch.randint(-3, 4, shape, generator=g).double()
    elif kind == "tiny":
        v = 1e-30 * torch.randn(shape, generator=g, dtype=torch.float64)
    else:
        v = 3e4 * torch.randn(shape, generator=g, dtype=torch.float64)
    if nonfinite and numel and draw(st.integers(0, 9)) == 0:
        flat = v.reshape(-1)
        for _ in range(draw(st.integers(1, 3))):
            flat[draw(st.integers(0, numel - 1))] = draw(st.sampled_from([float("nan"), float("inf"), -float("inf")]))
    note(f"values: {kind}")
    return v


@st.composite
def tensor_arg(draw, name, shape, dtype, *, layouts=LAYOUTS, nonfinite=True, grad=True, device="cpu"):
    """An :class:`Arg` of ``shape`` (2-D shapes get a random layout; other ranks are contiguous)."""
    layout = draw(st.sampled_from(layouts)) if len(shape) == 2 else "contiguous"
    step = 1
    if layout == "overlap":
        step = draw(st.integers(1, max(1, shape[1] - 1)))
    base_shape = _base_shape(tuple(shape), layout, step)
    v = draw(values(base_shape, nonfinite=nonfinite))
    rg = grad and dtype.is_floating_point and draw(st.booleans())
    return Arg(name, tuple(shape), dtype, layout, v, step, device, rg)


def dtypes(p_bad: int = 1):
    """Mostly floating dtypes; 1 in (4 + p_bad) draws an integer, bool or complex one."""
    return st.one_of(st.sampled_from(FLOATS), st.sampled_from(NOT_FLOATS)) if p_bad else st.sampled_from(FLOATS)


def sizes(lo: int = 0, hi: int = 9):
    return st.one_of(st.integers(lo, hi), st.sampled_from([lo, 1, 16, 17, 33]).filter(lambda s: s >= lo))


# ----------------------------------------------------------------------------------------------------
# scalar hyperparameters: (value for the call, float value for the references or None, invalid?)


@dataclass
class Scalar:
    value: object
    ref: Optional[float]  # the float the references use (None: invalid)
    invalid: bool
    learnable: bool = False  # a tensor that requires grad

    def invalid_for(self, acc: torch.dtype) -> bool:
        """Invalid, or out of the range the library documents for accumulation in ``acc``: 1/value must be a
        finite normal number of ``acc`` (ssl_fast._checks.positive_with_reciprocal)."""
        if self.invalid:
            return True
        info = torch.finfo(acc)
        return not info.tiny <= 1.0 / self.ref <= info.max

    def tensor_for(self, dtype: torch.dtype):
        """The value the references take in ``dtype`` (a learnable temperature becomes a fresh leaf)."""
        if isinstance(self.value, torch.Tensor):
            t = self.value.detach().to(dtype)
            return t.requires_grad_() if self.learnable else t
        return self.ref


@st.composite
def positive_scalar(draw, name, *, tensors=True, lo=1e-2, hi=1e2, extreme=True):
    """A hyperparameter that must be finite and > 0 (temperature, epsilon): floats, ints, numpy-free 0-dim / (1,)
    tensors (learnable or not), and the invalid: 0, negatives, NaN, +-Inf, bool, str, None, complex, tensors of
    the wrong shape / dtype / device, a 0-dim tensor holding an invalid value."""
    kind = draw(st.sampled_from(["float"] * 4 + ["int", "extreme", "extreme", "tensor", "tensor", "bad", "bad",
                                                 "badtensor"]))
    if kind == "float":
        v = draw(st.floats(lo, hi))
        return Scalar(v, v, False)
    if kind == "int":
        v = draw(st.integers(1, 5))
        return Scalar(v, float(v), False)
    if kind == "extreme":
        if not extreme:
            v = draw(st.floats(lo, hi))
            return Scalar(v, v, False)
        v = draw(st.sampled_from([1e-30, 1e-20, 1e-6, 1e6, 1e30, 1e-40, 1e38, 1e300, 5e-324]))
        return Scalar(v, v, False)
    if kind == "tensor":
        if not tensors:
            return Scalar(torch.tensor(0.5), None, True)
        dt = draw(st.sampled_from([torch.float32, torch.float64, torch.bfloat16]))
        shape = draw(st.sampled_from([(), (), (1,)]))
        t = torch.full(shape, draw(st.floats(lo, hi)), dtype=dt)
        learn = draw(st.booleans())
        if learn:
            t.requires_grad_()
        return Scalar(t, float(t.detach().reshape(())), False, learnable=learn)
    if kind == "bad":
        v = draw(st.sampled_from([0, 0.0, -0.0, -1.0, -1e-30, float("nan"), float("inf"), -float("inf"), True,
                                  False, "0.1", None, 1 + 0j, [0.1]]))
        return Scalar(v, None, True)
    t = draw(st.sampled_from([
        lambda: torch.tensor([0.1, 0.2]),                     # wrong shape
        lambda: torch.tensor(1),                               # integer
        lambda: torch.tensor(True),                            # bool
        lambda: torch.tensor(0.1 + 0j),                        # complex
        lambda: torch.tensor(0.0),                             # zero
        lambda: torch.tensor(-0.5),                            # negative
        lambda: torch.tensor(float("nan")),                    # NaN
        lambda: torch.tensor(float("inf")),                    # Inf
        lambda: torch.empty((), device="meta"),                # another device, no value
        lambda: torch.empty(0),                                # no element
    ]))()
    return Scalar(t, None, True)


# ----------------------------------------------------------------------------------------------------
# the property


def storage_bytes(t: torch.Tensor) -> Optional[torch.Tensor]:
    """A copy of the bytes of ``t``'s whole storage (None for meta tensors)."""
    if not isinstance(t, torch.Tensor) or t.device.type == "meta":
        return None
    s = t.untyped_storage()
    return torch.empty(0, dtype=torch.uint8).set_(s, 0, (s.nbytes(),), (1,)).clone()


def names_argument(message: str, names: Sequence[str]) -> bool:
    return any(re.search(rf"(?<![\w.]){re.escape(n)}(?![\w])", message) for n in names)


def err(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.detach().double(), b.detach().double()
    if a.numel() == 0:
        return 0.0
    return (a - b).abs().max().item()


def _finite(t) -> bool:
    return t is None or bool(torch.isfinite(t.detach()).all())


def within_rule(what: str, ours, ref, eager, eager_acc, dtype: torch.dtype, scale: Optional[float] = None,
                f32=None, min_scale: float = 0.0, extra: float = 0.0, view_overflows: bool = False) -> None:
    """``ours`` vs the float64 ``ref``: error <= 2x eager's (in ``dtype``) + floor; see the module docstring.

    The floor is FLOORS[dtype] x the larger of ``scale`` (default max |ref|) and the magnitude of the terms that
    make up the result, estimated from ``f32`` (the reference run in float32): its error / fp32's epsilon. A
    result that cancels to ~0 (tied rows, a gradient that vanishes) is thus compared at the scale of its terms.

    ``view_overflows``: the exact gradient of the tensor the call received (a view of the leaf: an expanded or
    strided layout) does not fit the dtype, so no implementation can return it; autograd then sums the
    overflowed rows into the leaf (inf - inf = NaN) although the leaf's own gradient fits. A non-finite
    gradient is accepted there; a finite one is still compared."""
    assert ours is not None, f"{what}: no gradient where the reference has one"
    assert tuple(ours.shape) == tuple(ref.shape), (what, tuple(ours.shape), tuple(ref.shape))
    ref_fin = torch.isfinite(ref.detach())
    if not bool(ref_fin.all()):
        # no silent finite value where the exact answer is undefined (only checked on scalar results: which
        # entries of a gradient become NaN depends on the order of operations)
        if ref.dim() == 0:
            assert not _finite(ours), f"{what}: finite {ours.item()} where the float64 reference is {ref.item()}"
        return
    if not _finite(ours):
        fits = bool(torch.isfinite(ref.detach().to(ours.dtype if ours.dtype.is_floating_point else torch.float64)).all())
        # eager in the accumulation dtype is the yardstick as the result it returns in ours' dtype: a residue of
        # cancelling terms (tied rows at 1/T = 1e30) that is finite in fp32 overflows fp16 there too
        eager_out = eager_acc.to(ours.dtype) if eager_acc is not None and ours.dtype.is_floating_point else eager_acc
        assert not fits or view_overflows or (eager_out is not None and not _finite(eager_out)), \
            f"{what}: non-finite result for a finite float64 reference (eager fp32 is finite)"
        return
    if scale is None:
        scale = ref.detach().abs().max().item() if ref.numel() else 1.0
    scale = max(scale, min_scale)
    if f32 is not None and _finite(f32):
        scale = max(scale, err(f32, ref) / torch.finfo(torch.float32).eps)
    scale = max(scale, 1e-300)
    floor = FLOORS[dtype] * scale
    e = err(eager, ref) if eager is not None else float("inf")
    if e != e or e == float("inf"):
        # eager torch overflows in this dtype: its fp32 error plus a few roundings to ``dtype`` is the yardstick
        e_acc = err(eager_acc, ref) if eager_acc is not None and _finite(eager_acc) else 0.0
        e = e_acc + 4 * torch.finfo(dtype).eps * scale
    bound = 2 * e + floor + extra
    got = err(ours, ref)
    assert got <= bound, f"{what}: error {got:.3g} > bound {bound:.3g} (eager {e:.3g}, scale {scale:.3g})"


@dataclass
class Call:
    """One draw: how to call ours and the reference, on which tensors, and which arguments are invalid."""

    args: List[Arg]
    ours: Callable  # (views: dict name -> tensor) -> output tensor (or None for in-place ops)
    ref: Callable  # (views in a dtype, dtype) -> output tensor
    invalid: Dict[str, Sequence[str]] = field(default_factory=dict)  # argument -> names its message may use
    scalars: Sequence[object] = ()  # tensors among the hyperparameters (snapshotted, gradients of learnable ones)
    learnable: Optional["Scalar"] = None  # a learnable temperature (its gradient is compared)
    out_dtype: Optional[torch.dtype] = None  # the dtype of ours' result (default: the accumulation dtype)
    scalar_output_scale: bool = True  # losses: atol relative to max(1, |ref|)
    value_scale: float = 0.0  # a lower bound of the value's floor scale (e.g. 1e-2 x the logits' magnitude)
    structural: Optional[Callable] = None  # (output) -> None: replaces the value rule where no reference is exact
    eager: Optional[Callable] = None  # eager torch in the inputs' dtype, when it is not ``ref`` run in that dtype
    extra: float = 0.0  # added to the value bound (a documented rounding the algorithm cannot avoid)
    grad_extra: float = 0.0  # added to the inputs' gradient bounds (the same, for the gradients)


def raises_named(fn: Callable, invalid: Dict[str, Sequence[str]]):
    """Run ``fn``; returns (result, exception). Fails on any exception other than ValueError / TypeError, on a
    ValueError / TypeError for a valid draw or one that names none of the invalid arguments, and on an invalid
    draw that returns."""
    try:
        out = fn()
    except (ValueError, TypeError) as e:
        assert invalid, f"a valid draw raised {type(e).__name__}: {e}"
        names = [n for ns in invalid.values() for n in ns]
        assert names_argument(str(e), names), f"{type(e).__name__}({e}) names none of {names}"
        return None, e
    except Exception as e:  # noqa: BLE001 - the property: no other exception type
        raise AssertionError(f"{type(e).__name__} (not ValueError / TypeError): {e}; invalid: {list(invalid)}") from e
    assert not invalid, f"invalid {list(invalid)} accepted"
    return out, None


def check_call(call: Call, dtype: torch.dtype, go_seed: int = 0) -> None:
    """The property for one draw (see the module docstring); ``dtype`` is the inputs' dtype (the rule's)."""
    for a in call.args:
        note(a.describe())
    note(f"invalid: {dict(call.invalid)}")
    bases = {a.name: a.base() for a in call.args}
    views = {a.name: a.view(bases[a.name]) for a in call.args}
    before = [(n, storage_bytes(b)) for n, b in bases.items()]
    before += [(f"scalar {i}", storage_bytes(s)) for i, s in enumerate(call.scalars) if isinstance(s, torch.Tensor)]
    out, exc = raises_named(lambda: call.ours(views), call.invalid)
    after = [storage_bytes(b) for b in bases.values()]
    after += [storage_bytes(s) for s in call.scalars if isinstance(s, torch.Tensor)]
    for (name, b0), b1 in zip(before, after):
        if b0 is not None:
            assert torch.equal(b0, b1), f"{name} was written"
    if exc is not None:
        return
    _compare(call, dtype, bases, views, out, go_seed)


def _grads(out, leaves, go, retain: bool = False):
    if not leaves or not out.requires_grad:
        return [None] * len(leaves)
    gs = torch.autograd.grad(out, leaves, grad_outputs=go.to(out.dtype), allow_unused=True, retain_graph=retain)
    return [torch.zeros_like(x) if g is None else g for g, x in zip(gs, leaves)]


def _last_bit_perturbed(t: torch.Tensor) -> torch.Tensor:
    """``t`` with every element moved by one or two ulps (a fixed pattern of signs), as a fresh leaf: the float64
    "eager" run. For float64 inputs eager torch IS the float64 reference, so its error against it says nothing;
    the reference's own rounding error (large where an exact 0 comes out of cancelling terms: the gradient of a
    normalized 1-D row at 1/T = 1e40 is 0, the reference returns ~1e26) is estimated instead by running it on
    inputs perturbed in their last bits, and the 2x rule applies to that error."""
    if not t.dtype.is_floating_point or t.device.type == "meta" or t.numel() == 0:
        return t
    signs = torch.tensor([1.0, -1.0, 2.0, -2.0], dtype=t.dtype).repeat(t.numel() // 4 + 1)[:t.numel()]
    out = (t.detach() * (1 + signs.reshape(t.shape) * torch.finfo(t.dtype).eps)).requires_grad_(t.requires_grad)
    return out


def _compare(call: Call, dtype, bases, views, out, go_seed) -> None:
    acc = acc_dtype(dtype)
    assert isinstance(out, torch.Tensor), type(out)
    want_dtype = call.out_dtype or acc
    assert out.dtype == want_dtype, (out.dtype, want_dtype)
    # the references: float64, eager in the inputs' dtype, eager in the accumulation dtype
    runs = {}
    ref_views = {}
    for key, dt in (("ref", torch.float64), ("eager", dtype), ("acc", acc), ("f32", torch.float32)):
        b = {a.name: a.base(dt) for a in call.args}
        if key == "eager" and dtype == torch.float64:
            b = {n: _last_bit_perturbed(t) for n, t in b.items()}
        v = {a.name: a.view(b[a.name]) for a in call.args}
        if key == "ref":
            ref_views = v
        temp = call.learnable.tensor_for(dt) if call.learnable is not None else None
        try:
            r = (call.eager if key == "eager" and call.eager is not None else call.ref)(v, dt, temp)
        except RuntimeError as e:  # eager torch has no kernel for this dtype: no yardstick
            assert key != "ref", e
            r = None
        runs[key] = (r, b, temp)
    if call.structural is not None:
        call.structural(out)
        return
    ref, ref_b, ref_t = runs["ref"]
    assert tuple(out.shape) == tuple(ref.shape), (tuple(out.shape), tuple(ref.shape))
    scale = max(1.0, ref.detach().abs().max().item()) if (call.scalar_output_scale and _finite(ref)) else None
    if scale is not None:
        scale = max(scale, call.value_scale)
    within_rule("value", out, ref, runs["eager"][0], runs["acc"][0], dtype, scale, runs["f32"][0], extra=call.extra)
    if not out.requires_grad:
        return
    go = torch.randn(out.shape, generator=torch.Generator().manual_seed(go_seed), dtype=torch.float64)
    names = [a.name for a in call.args if a.requires_grad]
    ours_leaves = [bases[n] for n in names] + ([call.learnable.value] if call.learnable is not None else [])
    ours_g = _grads(out, ours_leaves, go)
    # the float64 gradient of each view the call received: where it overflows the inputs' dtype, see within_rule
    ref_out = runs["ref"][0]
    views = [ref_views[n] for n in names]
    view_g = _grads(ref_out, views, go, retain=True) if views and ref_out.requires_grad else []
    overflows = {n: bool(g.abs().max() > torch.finfo(dtype).max) if g.numel() else False
                 for n, g in zip(names, view_g)}
    # an argument whose elements share memory (expanded, overlapping): autograd rounds the gradient of each of its
    # k aliases of one stored element to the dtype before it sums them, up to half an ulp each (the sum is then
    # rounded once more, which the rule's floor covers)
    args = {a.name: a for a in call.args}
    alias_extra = {}
    for n, g in zip(names, view_g):
        a = args[n]
        if a.shares_memory() and g.numel() and dtype.is_floating_point:
            k = max(1, g.numel() // max(1, bases[n].numel()))
            alias_extra[n] = 0.5 * torch.finfo(dtype).eps * k * g.abs().max().item()
    res = {}
    for key in ("ref", "eager", "acc", "f32"):
        r, b, t = runs[key]
        leaves = [b[n] for n in names] + ([t] if t is not None else [])
        res[key] = _grads(r, leaves, go) if r is not None and r.requires_grad else [None] * len(leaves)
    for i, name in enumerate(names + (["temperature"] if call.learnable is not None else [])):
        g, r, e, ea, e32 = ours_g[i], res["ref"][i], res["eager"][i], res["acc"][i], res["f32"][i]
        if r is None:
            continue
        leaf = ours_leaves[i]
        assert g.dtype == leaf.dtype, (name, g.dtype, leaf.dtype)
        gdt = dtype if name != "temperature" else leaf.dtype
        if name == "temperature" and gdt not in FLOORS:
            gdt = torch.float32
        sc = r.detach().abs().max().item() if r.numel() else 0.0
        # gradients that cancel to ~0 (tied rows, huge temperatures) are compared with an absolute floor of
        # FLOORS[dtype] x 1e-3
        # a temperature's gradient comes back in its dtype (bf16: rounded by up to half its epsilon)
        extra = torch.finfo(leaf.dtype).eps * sc if name == "temperature" else call.grad_extra
        extra += alias_extra.get(name, 0.0)
        within_rule(f"d{name}", g, r, e, ea, gdt if gdt in FLOORS else dtype, sc if sc > 0 else 1.0, e32,
                    min_scale=1e-3, extra=extra, view_overflows=overflows.get(name, False))
