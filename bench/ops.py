"""The benchmark's op table: for every op, its shapes, inputs, float64 reference and provider adapters.

One :class:`Op` per benchmarked operation, each with a table of :class:`Provider` adapters that run the
SAME math on the SAME inputs: the measurement child (``bench/measure.py``, started by ``bench/runner.py`` for
``ssl-fast bench``) builds the inputs per (shape, dtype), refuses a provider whose answer on a small input
differs from the float64 reference (the correctness gate), then measures time and peak memory. Adding a provider is one
``Provider(name, build)`` line: ``build(inputs, hp, device)`` returns a zero-argument callable that runs
one call on the prepared inputs and returns its output (a loss, the codes, or None for the in-place EMA).

Optional libraries (lightly, pytorch-metric-learning, open_clip, timm, inf_cl) are imported inside
``build``: a missing one gives a NaN row with the reason, never a crash. Nothing here imports CUDA or
triton at import time.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import math
from typing import Callable, Dict, List, Optional, Tuple

ELEM = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}
# the first GPU run (scripts/gpu_check.sh prove): eager torch, torch.compile and ssl_fast only; the libraries
# that the GPU image lacks run in the "gpu-peers" presets (scripts/gpu_check.sh tune, from carried wheels)
GPU_TARGET = ["torch", "ssl_fast_triton", "torch_compile"]  # in this order: a time budget cuts torch_compile first
TORCH_DTYPE = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


@dataclasses.dataclass
class Provider:
    """One implementation of an op. ``build(inputs, hp, device)`` -> ``run()``; ``backend(device)`` names
    the kernel family it dispatches to (ssl_fast), ``requires`` the optional module it imports."""

    name: str
    build: Callable
    requires: Optional[str] = None
    devices: Tuple[str, ...] = ("cpu", "cuda")
    dtypes: Optional[Tuple[str, ...]] = None  # None: every dtype of the op
    backend: Optional[Callable] = None
    about: str = ""
    probe: bool = False  # a measurement of the machine (e.g. the memory ceiling), not an implementation: no gate

    def unavailable(self, device: str, dtype: str) -> Optional[str]:
        """Why this provider cannot run on ``device`` ('cpu', 'cuda', 'cuda:K') in ``dtype``, or None when it can:
        its optional library is missing, it serves other devices, or not that dtype."""
        if self.requires and importlib.util.find_spec(self.requires) is None:
            return f"{self.requires} not installed"
        dev_type = "cuda" if device.startswith("cuda") else "cpu"
        if dev_type not in self.devices:
            return f"runs on {'/'.join(self.devices)} only" + (f" ({self.about})" if self.about and self.name == "inf_cl"
                                                                 else "")
        if self.dtypes and dtype not in self.dtypes:
            return f"dtype {dtype} not supported"
        return None


@dataclasses.dataclass
class Op:
    name: str
    about: str
    shape_keys: Tuple[str, ...]
    batch_key: Optional[str]  # the key the largest-batch search grows (None: no search)
    hparams: Dict[str, float]
    modes: Tuple[str, ...]
    dtypes: Tuple[str, ...]
    providers: List[Provider]
    baseline: str  # speedups are against this provider of the same run
    make_inputs: Callable  # (shape, dtype, device, requires_grad) -> dict of named inputs
    grad_inputs: Callable  # inputs -> list of tensors whose .grad a step clears
    reference: Callable  # (inputs converted to float64, hp) -> the float64 answer
    compare: Callable  # (output, reference output) -> max abs error, normalized as the op defines
    gate_shape: Dict[str, int]
    gate_tol: float  # the correctness gate (fp32, gate_shape): error <= gate_tol
    work: Callable  # (shape, mode, dtype) -> (flops, bytes): the useful work of one call
    estimate_gib: Callable  # (provider, shape, dtype) -> a rough peak (GiB), to skip what cannot fit
    presets: Dict[str, List[Dict]]
    default_shape: Dict[str, List]
    gate: Optional[Callable] = None  # (provider, device, hp) -> error; default: value + gradients vs reference

    def provider(self, name: str) -> Provider:
        for p in self.providers:
            if p.name == name:
                return p
        raise KeyError(f"op {self.name!r} has no provider {name!r}; choose from "
                       f"{', '.join(p.name for p in self.providers)}")


# ----------------------------------------------------------------------------------------------------
# shared helpers


def _torch():
    import torch
    return torch


def _call(crit: Callable, inputs: Dict, *names: str) -> Callable:
    """``run()`` = ``crit(inputs[name], ...)``: a loss module applied to the named inputs."""
    args = [inputs[n] for n in names]
    return lambda: crit(*args)


def _ssl_fast_providers(call: Optional[Callable], *, nn_module: Optional[Callable] = None) -> List[Provider]:
    """ssl_fast with each backend forced (cpp: the C++ CPU kernel or the CUDA extension; triton; torch: the
    plain-torch fallback) when ``call`` is given, and its ``nn`` module with the automatic backend when
    ``nn_module`` is."""

    def scoped(name, fn):  # the backend is in force during each call only: nothing leaks to the caller
        import ssl_fast

        def run():
            with ssl_fast.set_backend(name):
                return fn()
        return run

    def with_backend(name):
        def build(inputs, hp, device):
            return scoped(name, call(inputs, hp))
        return build

    def backend_of(name):
        return lambda device: name if name != "auto" else auto_backend(device)

    out = [] if call is None else [
           Provider("ssl_fast_cpp", with_backend("cpp"), backend=backend_of("cpp"),
                    about="ssl_fast, C++ kernel (CPU: at::parallel_for; CUDA: the extension's kernel where it has one)"),
           Provider("ssl_fast_triton", with_backend("triton"), backend=backend_of("triton"), devices=("cuda",),
                    about="ssl_fast, Triton kernel"),
           Provider("ssl_fast_torch", with_backend("torch"), backend=backend_of("torch"),
                    about="ssl_fast's plain-torch backend")]
    if nn_module is not None:
        def build_nn(inputs, hp, device):
            return scoped("auto", nn_module(inputs, hp))
        out.append(Provider("ssl_fast_nn", build_nn, backend=backend_of("auto"),
                            about="the ssl_fast.nn drop-in module, automatic backend"))
    return out


def auto_backend(device) -> str:
    """The kernel family ``ssl_fast.set_backend("auto")`` runs for float tensors on ``device``, from public facts
    (ssl_fast's documented rule: CUDA -> triton when triton imports, CPU -> cpp when ssl_fast._C is built, else
    torch). A forced backend is its own name: ssl_fast runs it or raises, it never switches silently."""
    import ssl_fast
    if _torch().device(device).type == "cuda":
        return "triton" if importlib.util.find_spec("triton") is not None else "torch"
    return "cpp" if ssl_fast.HAS_EXT else "torch"


def _max_err(out, ref) -> float:
    torch = _torch()
    if isinstance(out, (list, tuple)):
        return max(_max_err(o, r) for o, r in zip(out, ref))
    return float((torch.as_tensor(out).double() - ref.double()).abs().max())


def _loss_err(out, ref) -> float:
    """|loss - ref| / max(1, |ref|)."""
    out, ref = float(out.detach()), float(ref.detach())
    return abs(out - ref) / max(1.0, abs(ref))


def _pair_inputs(n: int, dim: int, dtype: str, device, requires_grad: bool, names=("z1", "z2")) -> Dict:
    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(0)
    dt = getattr(torch, TORCH_DTYPE[dtype])
    return {nm: torch.randn(n, dim, generator=g).to(device=device, dtype=dt).requires_grad_(requires_grad)
            for nm in names}


def _grads(*names):
    return lambda inputs: [inputs[n] for n in names]


def _matmul_work(m_rows: Callable, m_cols: Callable):
    """flops of the logit matrix: 2 R C D forward; the backward recomputes it and forms both gradients
    (2 more matmuls of that size): 4 R C D. Bytes: the inputs once (a lower bound)."""
    def work(shape, mode, dtype):
        r, c, d = m_rows(shape), m_cols(shape), shape["dim"]
        fwd = 2.0 * r * c * d
        flops = {"fwd": fwd, "bwd": 2 * fwd, "full": 3 * fwd}[mode]
        return flops, (r + c) * d * ELEM[dtype]
    return work


def _quadratic_estimate(rows: Callable, cols: Callable, fused=("ssl_fast_cpp", "ssl_fast_triton", "ssl_fast_nn")):
    """Eager providers hold a few (rows x cols) fp32 matrices; the fused kernels are linear in the rows."""
    def est(provider, shape, dtype):
        r, c, d = rows(shape), cols(shape), shape["dim"]
        if provider in fused:
            return (16 * (r + c) * d * 4 + (64 << 20)) / 1024 ** 3
        if provider == "pml":  # pytorch-metric-learning's NTXentLoss is cubic in 2N: a (2N, 2N(2N-2)) mask
            return r * r * max(r - 2, 1) * (4 * ELEM[dtype] + 1) / 1024 ** 3
        return 8.0 * r * c * 4 / 1024 ** 3
    return est


# ----------------------------------------------------------------------------------------------------
# NT-Xent (SimCLR): two views (N, D), 2N anchors, (2N)^2 logits


def _ntxent_ref(inputs, hp):
    from ssl_fast import reference
    return reference.ntxent_reference(inputs["z1"], inputs["z2"], hp["temperature"])


def _ntxent_providers() -> List[Provider]:
    def torch_eager(inputs, hp, device):
        from ssl_fast import reference
        z1, z2, t = inputs["z1"], inputs["z2"], hp["temperature"]
        return lambda: reference.ntxent_reference(z1, z2, t)

    def torch_compile(inputs, hp, device):
        from ssl_fast import reference
        fn = _torch().compile(reference.ntxent_reference)
        z1, z2, t = inputs["z1"], inputs["z2"], hp["temperature"]
        return lambda: fn(z1, z2, t)

    def lightly(inputs, hp, device):
        from lightly.loss import NTXentLoss
        crit = NTXentLoss(temperature=hp["temperature"], memory_bank_size=0)
        z1, z2 = inputs["z1"], inputs["z2"]
        return lambda: crit(z1, z2)

    def pml(inputs, hp, device):
        from pytorch_metric_learning.losses import NTXentLoss
        crit = NTXentLoss(temperature=hp["temperature"])
        z1, z2 = inputs["z1"], inputs["z2"]
        labels = _torch().arange(z1.shape[0], device=z1.device).repeat(2)
        return lambda: crit(_torch().cat([z1, z2]), labels)

    def call(inputs, hp):
        import ssl_fast
        z1, z2, t = inputs["z1"], inputs["z2"], hp["temperature"]
        return lambda: ssl_fast.ntxent(z1, z2, t)

    def module(inputs, hp):
        from ssl_fast.nn import NTXentLoss
        crit = NTXentLoss(temperature=hp["temperature"])
        z1, z2 = inputs["z1"], inputs["z2"]
        return lambda: crit(z1, z2)

    return [Provider("torch", torch_eager, about="ssl_fast.reference.ntxent_reference in eager torch"),
            Provider("torch_compile", torch_compile, about="torch.compile of that reference (inductor)"),
            Provider("lightly", lightly, requires="lightly", about="lightly.loss.NTXentLoss(memory_bank_size=0)"),
            Provider("pml", pml, requires="pytorch_metric_learning",
                     about="pytorch_metric_learning.losses.NTXentLoss on cat(z1, z2) with pair labels")] \
        + _ssl_fast_providers(call, nn_module=module)


NTXENT = Op(
    name="ntxent", about="NT-Xent (SimCLR) loss: views z1, z2 of (N, D), 2N = n2 anchors, temperature 0.5",
    shape_keys=("n2", "dim"), batch_key="n2", hparams={"temperature": 0.5}, modes=("fwd", "bwd", "full"),
    dtypes=("fp32", "bf16", "fp16"), providers=_ntxent_providers(), baseline="torch",
    make_inputs=lambda s, dt, dev, rg: _pair_inputs(s["n2"] // 2, s["dim"], dt, dev, rg),
    grad_inputs=_grads("z1", "z2"), reference=_ntxent_ref, compare=_loss_err,
    gate_shape={"n2": 64, "dim": 32}, gate_tol=1e-5,
    work=_matmul_work(lambda s: s["n2"], lambda s: s["n2"]),
    estimate_gib=_quadratic_estimate(lambda s: s["n2"], lambda s: s["n2"]),
    presets={
        "quick": [dict(n2=[1024, 2048], dim=[128], dtype=["fp32"], modes=["full"])],
        "cpu": [dict(n2=[1024, 8192], dim=[128], dtype=["fp32"], modes=["full"],
                     providers=["torch", "torch_compile", "lightly", "ssl_fast_cpp", "ssl_fast_torch", "ssl_fast_nn"]),
                dict(n2=[8192], dim=[128], dtype=["fp32"], modes=["fwd", "bwd"],
                     providers=["torch", "torch_compile", "lightly", "ssl_fast_cpp"]),
                dict(n2=[256, 512], dim=[128], dtype=["fp32"], modes=["full"], providers=["torch", "pml", "ssl_fast_cpp"]),
                dict(n2=[4096], dim=[128], dtype=["bf16"], modes=["full"],
                     providers=["torch", "torch_compile", "lightly", "ssl_fast_cpp"]),
                dict(n2=[65536], dim=[128], dtype=["fp32"], modes=["full"], providers=["ssl_fast_cpp"], repeats=3)],
        "gpu": [dict(n2=[16384, 65536], dim=[128, 256, 768], dtype=["bf16"], modes=["fwd", "bwd", "full"]),
                dict(n2=[16384], dim=[128], dtype=["fp32", "fp16"], modes=["full"])],
        "gpu-target": [dict(n2=[65536], dim=[256], dtype=["bf16"], modes=["full"], providers=GPU_TARGET),
                       dict(n2=[16384], dim=[128], dtype=["bf16"], modes=["full"], providers=GPU_TARGET)],
        "gpu-peers": [dict(n2=[16384, 65536], dim=[128], dtype=["bf16"], modes=["full"],
                           providers=["lightly", "ssl_fast_triton"])],
    },
    default_shape=dict(n2=[1024], dim=[128]),
)


# ----------------------------------------------------------------------------------------------------
# cross-view symmetric InfoNCE (CLIP loss, DirectCLR's official loss): N = n2 / 2 queries and keys


def _info_nce_ref(inputs, hp):
    from ssl_fast import reference
    return reference.info_nce_reference(inputs["q"], inputs["k"], hp["temperature"], symmetric=True)


def _info_nce_providers() -> List[Provider]:
    def torch_eager(inputs, hp, device):
        from ssl_fast import reference
        q, k, t = inputs["q"], inputs["k"], hp["temperature"]
        return lambda: reference.info_nce_reference(q, k, t, symmetric=True)

    def torch_compile(inputs, hp, device):
        from ssl_fast import reference
        fn = _torch().compile(reference.info_nce_reference)
        q, k, t = inputs["q"], inputs["k"], hp["temperature"]
        return lambda: fn(q, k, t, symmetric=True)

    def open_clip(inputs, hp, device):
        import torch.nn.functional as F
        from open_clip.loss import ClipLoss
        crit = ClipLoss()
        q, k = inputs["q"], inputs["k"]
        scale = _torch().tensor(1.0 / hp["temperature"], device=q.device)
        return lambda: crit(F.normalize(q, dim=1), F.normalize(k, dim=1), scale)

    def inf_cl(inputs, hp, device):
        # Inf-CL's cal_inf_loss: one direction (q -> k), features viewed as heads of head_dim in
        # {16, 32, 64, 128, 256} (D must be a multiple), upcast to fp32, Triton + CUDA asserts (GPU only).
        import torch.nn.functional as F
        from inf_cl import cal_inf_loss
        q, k = inputs["q"], inputs["k"]
        d = q.shape[1]
        head = next((h for h in (256, 128, 64, 32, 16) if d % h == 0), None)
        if head is None:
            raise ValueError(f"Inf-CL rejects D={d}: it must be a multiple of 16 (head_dim in 16..256)")
        scale = _torch().tensor(1.0 / hp["temperature"], device=q.device)

        def run():
            qn, kn = F.normalize(q, dim=1), F.normalize(k, dim=1)
            return 0.5 * (cal_inf_loss(qn, kn, scale=scale, head_dim=head)
                          + cal_inf_loss(kn, qn, scale=scale, head_dim=head))
        return run

    def call(inputs, hp):
        import ssl_fast
        q, k, t = inputs["q"], inputs["k"], hp["temperature"]
        return lambda: ssl_fast.info_nce(q, k, t, symmetric=True)

    def module(inputs, hp):
        from ssl_fast.nn import InfoNCELoss
        crit = InfoNCELoss(temperature=hp["temperature"], symmetric=True)
        q, k = inputs["q"], inputs["k"]
        return lambda: crit(q, k)

    return [Provider("torch", torch_eager, about="ssl_fast.reference.info_nce_reference(symmetric=True), eager"),
            Provider("torch_compile", torch_compile, about="torch.compile of that reference"),
            Provider("open_clip", open_clip, requires="open_clip",
                     about="open_clip.loss.ClipLoss on normalized features, logit scale 1/T"),
            Provider("inf_cl", inf_cl, requires="inf_cl", devices=("cuda",),
                     about="Inf-CL cal_inf_loss both directions (GPU only: Triton kernels with CUDA asserts; "
                           "D must be a multiple of its head_dim 16..256; computes in fp32)")] \
        + _ssl_fast_providers(call, nn_module=module)


INFO_NCE = Op(
    name="info_nce", about="symmetric cross-view InfoNCE (CLIP / DirectCLR official): q, k of (n2/2, D), T 0.1",
    shape_keys=("n2", "dim"), batch_key="n2", hparams={"temperature": 0.1}, modes=("fwd", "bwd", "full"),
    dtypes=("fp32", "bf16", "fp16"), providers=_info_nce_providers(), baseline="torch",
    make_inputs=lambda s, dt, dev, rg: _pair_inputs(s["n2"] // 2, s["dim"], dt, dev, rg, names=("q", "k")),
    grad_inputs=_grads("q", "k"), reference=_info_nce_ref, compare=_loss_err,
    gate_shape={"n2": 64, "dim": 32}, gate_tol=1e-5,
    work=_matmul_work(lambda s: s["n2"] // 2, lambda s: s["n2"] // 2),
    estimate_gib=_quadratic_estimate(lambda s: s["n2"] // 2, lambda s: s["n2"] // 2),
    presets={
        "quick": [dict(n2=[1024, 2048], dim=[128], dtype=["fp32"], modes=["full"])],
        "cpu": [dict(n2=[2048, 8192], dim=[128], dtype=["fp32"], modes=["full"],
                     providers=["torch", "torch_compile", "open_clip", "ssl_fast_cpp"])],
        "gpu": [dict(n2=[16384, 65536, 131072], dim=[256, 768], dtype=["bf16"], modes=["fwd", "bwd", "full"])],
        "gpu-peers": [dict(n2=[16384], dim=[128], dtype=["bf16"], modes=["full"],
                           providers=["open_clip", "inf_cl", "ssl_fast_triton"])],
    },
    default_shape=dict(n2=[1024], dim=[128]),
)


# ----------------------------------------------------------------------------------------------------
# InfoNCE with a queue of negatives (MoCo): q, k of (N, D), queue (K, D) without gradient


def _queue_inputs(s, dt, dev, rg):
    torch = _torch()
    out = _pair_inputs(s["n"], s["dim"], dt, dev, rg, names=("q", "k"))
    g = torch.Generator(device="cpu").manual_seed(1)
    out["queue"] = torch.nn.functional.normalize(torch.randn(s["queue"], s["dim"], generator=g), dim=1).to(
        device=dev, dtype=getattr(torch, TORCH_DTYPE[dt]))
    return out


def _queue_ref(inputs, hp):
    from ssl_fast import reference
    return reference.info_nce_negatives_reference(inputs["q"], inputs["k"], inputs["queue"], hp["temperature"])


def _queue_providers() -> List[Provider]:
    def torch_eager(inputs, hp, device):
        from ssl_fast import reference
        q, k, neg, t = inputs["q"], inputs["k"], inputs["queue"], hp["temperature"]
        return lambda: reference.info_nce_negatives_reference(q, k, neg, t)

    def torch_compile(inputs, hp, device):
        from ssl_fast import reference
        fn = _torch().compile(reference.info_nce_negatives_reference)
        q, k, neg, t = inputs["q"], inputs["k"], inputs["queue"], hp["temperature"]
        return lambda: fn(q, k, neg, t)

    def call(inputs, hp):
        import ssl_fast
        q, k, neg, t = inputs["q"], inputs["k"], inputs["queue"], hp["temperature"]
        return lambda: ssl_fast.info_nce(q, k, t, negatives=neg)

    def module(inputs, hp):
        from ssl_fast.nn import InfoNCELoss
        crit = InfoNCELoss(temperature=hp["temperature"])
        q, k, neg = inputs["q"], inputs["k"], inputs["queue"]
        return lambda: crit(q, k, neg)

    return [Provider("torch", torch_eager, about="ssl_fast.reference.info_nce_negatives_reference, eager"),
            Provider("torch_compile", torch_compile, about="torch.compile of that reference")] \
        + _ssl_fast_providers(call, nn_module=module)


INFO_NCE_QUEUE = Op(
    name="info_nce_queue", about="InfoNCE with a queue of negatives (MoCo): q, k of (N, D), queue (K, D), T 0.2",
    shape_keys=("n", "queue", "dim"), batch_key="queue", hparams={"temperature": 0.2},
    modes=("fwd", "bwd", "full"), dtypes=("fp32", "bf16", "fp16"), providers=_queue_providers(),
    baseline="torch", make_inputs=_queue_inputs, grad_inputs=_grads("q", "k"), reference=_queue_ref,
    compare=_loss_err, gate_shape={"n": 32, "queue": 96, "dim": 32}, gate_tol=1e-5,
    work=_matmul_work(lambda s: s["n"], lambda s: s["n"] + s["queue"]),
    estimate_gib=_quadratic_estimate(lambda s: s["n"], lambda s: s["n"] + s["queue"]),
    presets={
        "quick": [dict(n=[256], queue=[4096], dim=[128], dtype=["fp32"], modes=["full"])],
        "cpu": [dict(n=[256], queue=[16384, 65536], dim=[128], dtype=["fp32"], modes=["full"],
                     providers=["torch", "torch_compile", "ssl_fast_cpp"])],
        "gpu": [dict(n=[4096], queue=[65536, 262144], dim=[128], dtype=["bf16"], modes=["fwd", "full"])],
        "gpu-target": [dict(n=[256], queue=[65536], dim=[128], dtype=["bf16", "fp32"], modes=["full"],
                            providers=GPU_TARGET)],
    },
    default_shape=dict(n=[256], queue=[4096], dim=[128]),
)


# ----------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (SwAV codes): scores (B, K), 3 sweeps, epsilon 0.05


def _sinkhorn_inputs(s, dt, dev, rg):
    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(s["b"], 128, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(s["k"], 128, generator=g), dim=1)
    return {"scores": (z @ c.t()).to(device=dev, dtype=getattr(torch, TORCH_DTYPE[dt]))}


def _sinkhorn_ref(inputs, hp):
    from ssl_fast import reference
    return reference.sinkhorn_knopp_log_reference(inputs["scores"], hp["epsilon"], int(hp["iterations"]))


def _sinkhorn_providers() -> List[Provider]:
    def nograd(fn):
        def run():
            with _torch().no_grad():
                return fn()
        return run

    def swav(inputs, hp, device):
        from ssl_fast import reference
        x, e, it = inputs["scores"], hp["epsilon"], int(hp["iterations"])
        return nograd(lambda: reference.sinkhorn_knopp_reference(x, e, it))

    def torch_compile(inputs, hp, device):
        from ssl_fast import reference
        fn = _torch().compile(reference.sinkhorn_knopp_reference)
        x, e, it = inputs["scores"], hp["epsilon"], int(hp["iterations"])
        return nograd(lambda: fn(x, e, it))

    def lightly(inputs, hp, device):
        from lightly.loss.swav_loss import sinkhorn
        x, e, it = inputs["scores"], hp["epsilon"], int(hp["iterations"])
        return nograd(lambda: sinkhorn(x, iterations=it, epsilon=e))

    def call(inputs, hp):
        import ssl_fast
        x, e, it = inputs["scores"], hp["epsilon"], int(hp["iterations"])
        return nograd(lambda: ssl_fast.sinkhorn_knopp(x, e, it))

    return [Provider("swav", swav, about="SwAV's distributed_sinkhorn on one process, as written (eager torch)"),
            Provider("torch_compile", torch_compile, about="torch.compile of SwAV's code"),
            Provider("lightly", lightly, requires="lightly", about="lightly.loss.swav_loss.sinkhorn")] \
        + _ssl_fast_providers(call)


SINKHORN = Op(
    name="sinkhorn", about="Sinkhorn-Knopp equal-partition codes (SwAV): cosine scores (B, K), 3 sweeps, eps 0.05",
    shape_keys=("b", "k"), batch_key="b", hparams={"epsilon": 0.05, "iterations": 3}, modes=("fwd",),
    dtypes=("fp32", "bf16", "fp16"), providers=_sinkhorn_providers(), baseline="swav",
    make_inputs=_sinkhorn_inputs, grad_inputs=lambda inputs: [], reference=_sinkhorn_ref, compare=_max_err,
    gate_shape={"b": 64, "k": 30}, gate_tol=1e-5,
    work=lambda s, mode, dt: (0.0, s["b"] * s["k"] * (ELEM[dt] + 4)),  # one read of the scores, one fp32 write
    estimate_gib=lambda p, s, dt: (1.2 if p.startswith("ssl_fast") else 4.0) * s["b"] * s["k"] * 4 / 1024 ** 3,
    presets={
        "quick": [dict(b=[1024], k=[3000], dtype=["fp32"])],
        "cpu": [dict(b=[1024, 4096], k=[3000], dtype=["fp32"],
                     providers=["swav", "torch_compile", "lightly", "ssl_fast_cpp", "ssl_fast_torch"]),
                dict(b=[4096], k=[3000], dtype=["bf16"], providers=["swav", "lightly", "ssl_fast_cpp"])],
        "gpu": [dict(b=[4096, 16384, 65536], k=[3000, 65536], dtype=["fp32", "bf16"])],
        "gpu-target": [dict(b=[32768, 4096], k=[3000], dtype=["fp32"],
                            providers=["swav", "ssl_fast_triton", "torch_compile"])],
        "gpu-peers": [dict(b=[32768, 4096], k=[3000], dtype=["fp32"], providers=["lightly", "ssl_fast_triton"])],
    },
    default_shape=dict(b=[4096], k=[3000]),
)


# ----------------------------------------------------------------------------------------------------
# EMA teacher update over a model's parameter list


EMA_DTYPES = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "fp16": ("fp16", "fp16"),
              "fp32-bf16": ("fp32", "bf16"), "fp32-fp16": ("fp32", "fp16")}


def param_shapes(model: str) -> List[tuple]:
    """The parameter shapes of a torchvision model (built on the meta device: nothing is allocated)."""
    if model == "tiny":
        return [(), (1,), (7,), (33, 17), (64, 3, 3, 3), (5000,), (1000, 10)]
    torch = _torch()
    import torchvision

    with torch.device("meta"):
        net = getattr(torchvision.models, model)()
    return [tuple(p.shape) for p in net.parameters()]


def _ema_inputs(s, dt, dev, rg):
    torch = _torch()
    model = s["model"]
    e_name, o_name = EMA_DTYPES[dt]
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = param_shapes(model)
    ema = [torch.randn(sh, generator=g).to(device=dev, dtype=getattr(torch, TORCH_DTYPE[e_name])) for sh in shapes]
    online = [torch.randn(sh, generator=g).to(device=dev, dtype=getattr(torch, TORCH_DTYPE[o_name]))
              for sh in shapes]
    return {"ema": ema, "online": online}


def _ema_ref(inputs, hp):
    from ssl_fast import reference
    return reference.ema_update_reference(inputs["ema"], inputs["online"], hp["momentum"])


def _ema_modules(ema, online):
    """Two modules whose parameters() are the given lists (lightly's and timm's APIs take modules)."""
    from torch import nn

    def wrap(tensors):
        m = nn.Module()
        m.params = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])
        return m

    return wrap(ema), wrap(online)


def _ema_providers() -> List[Provider]:
    def loop(inputs, hp, device):
        ema, online, m = inputs["ema"], inputs["online"], hp["momentum"]

        def run():
            for e, o in zip(ema, online):
                e.mul_(m).add_(o, alpha=1.0 - m)
        return run

    def torch_compile(inputs, hp, device):
        ema, online, m = inputs["ema"], inputs["online"], hp["momentum"]

        def update(ema_, online_):
            for e, o in zip(ema_, online_):
                e.mul_(m).add_(o, alpha=1.0 - m)
        fn = _torch().compile(update)
        return lambda: fn(ema, online)

    def foreach_lerp(inputs, hp, device):
        ema, online, m = inputs["ema"], inputs["online"], hp["momentum"]
        same = all(e.dtype == o.dtype for e, o in zip(ema, online))

        def run():
            src = online if same else [o.to(e.dtype) for e, o in zip(ema, online)]
            _torch()._foreach_lerp_(ema, src, 1.0 - m)
        return run

    def lightly(inputs, hp, device):
        from lightly.models.utils import update_momentum
        model_ema, model = _ema_modules(inputs["ema"], inputs["online"])
        return lambda: update_momentum(model, model_ema, hp["momentum"])

    def timm(inputs, hp, device):
        from timm.utils import ModelEmaV3
        model_ema, model = _ema_modules(inputs["ema"], inputs["online"])
        ema_obj = ModelEmaV3(model, decay=hp["momentum"])
        ema_obj.module = model_ema  # update the given tensors, not timm's deep copy
        return lambda: ema_obj.update(model)

    def call(inputs, hp):
        import ssl_fast
        ema, online, m = inputs["ema"], inputs["online"], hp["momentum"]
        return lambda: ssl_fast.ema_update_(ema, online, m)

    return [Provider("loop", loop, about="per-parameter mul_ + add_ (the reference code of BYOL / MoCo)"),
            Provider("torch_compile", torch_compile, about="torch.compile of that loop (inductor fuses it)"),
            Provider("foreach_lerp", foreach_lerp, about="torch._foreach_lerp_ (online cast when dtypes differ)"),
            Provider("lightly", lightly, requires="lightly", about="lightly.models.utils.update_momentum"),
            Provider("timm", timm, requires="timm", about="timm.utils.ModelEmaV3.update")] \
        + _ssl_fast_providers(call)


def _ema_bytes(s, mode, dt):
    e_name, o_name = EMA_DTYPES[dt]
    n = sum(math.prod(sh) for sh in param_shapes(s["model"]))
    return 0.0, n * (2 * ELEM[e_name] + ELEM[o_name])  # read ema + online, write ema


EMA = Op(
    name="ema", about="EMA teacher update ema <- m ema + (1 - m) online over a model's parameter list, m 0.996",
    shape_keys=("model",), batch_key=None, hparams={"momentum": 0.996}, modes=("update",),
    dtypes=tuple(EMA_DTYPES), providers=_ema_providers(), baseline="loop",
    make_inputs=_ema_inputs, grad_inputs=lambda inputs: [], reference=_ema_ref, compare=_max_err,
    gate_shape={"model": "tiny"}, gate_tol=1e-6, work=_ema_bytes,
    estimate_gib=lambda p, s, dt: 0.0,
    presets={
        "quick": [dict(model=["resnet50"], dtype=["fp32"])],
        "cpu": [dict(model=["resnet50", "vit_b_16"], dtype=["fp32"],
                     providers=["loop", "torch_compile", "foreach_lerp", "lightly", "timm", "ssl_fast_cpp"]),
                dict(model=["resnet50", "vit_b_16"], dtype=["fp32-bf16"],
                     providers=["loop", "foreach_lerp", "lightly", "timm", "ssl_fast_cpp"])],
        "gpu": [dict(model=["resnet50", "vit_b_16", "vit_l_16"], dtype=["fp32", "bf16", "fp32-bf16"])],
        "gpu-target": [dict(model=["vit_b_16"], dtype=["fp32-bf16"],
                            providers=["loop", "ssl_fast_triton", "ssl_fast_cpp", "foreach_lerp", "torch_compile"])],
        "gpu-peers": [dict(model=["vit_b_16"], dtype=["fp32-bf16"], providers=["lightly", "timm", "ssl_fast_triton"])],
    },
    default_shape=dict(model=["resnet50"]),
)


# ----------------------------------------------------------------------------------------------------
# The losses as modules: SwAV (multi-crop, Sinkhorn codes) and DirectCLR (loss on r[:, :d0])


def _swav_inputs(s, dt, dev, rg):
    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(0)
    dtype = getattr(torch, TORCH_DTYPE[dt])

    def scores():  # cosine scores of normalized features against normalized prototypes
        return (torch.rand(s["b"], s["k"], generator=g) * 2 - 1).to(device=dev, dtype=dtype).requires_grad_(rg)

    return {"high": [scores() for _ in range(2)], "low": [scores() for _ in range(s["crops"] - 2)]}


def _swav_ref(inputs, hp):
    from ssl_fast import reference
    return reference.swav_loss_reference(inputs["high"], inputs["low"], hp["temperature"], hp["epsilon"],
                                         int(hp["iterations"]))


def _swav_providers() -> List[Provider]:
    def torch_eager(inputs, hp, device):
        # SwAV's main_swav.py loop, in eager torch: codes by distributed_sinkhorn of each high-res crop
        from ssl_fast import reference
        h, lo = inputs["high"], inputs["low"]
        return lambda: reference.swav_loss_reference(h, lo, hp["temperature"], hp["epsilon"],
                                                     int(hp["iterations"]), log_domain=False)

    def torch_compile(inputs, hp, device):
        from ssl_fast import reference
        fn = _torch().compile(reference.swav_loss_reference)
        h, lo = inputs["high"], inputs["low"]
        return lambda: fn(h, lo, hp["temperature"], hp["epsilon"], int(hp["iterations"]), log_domain=False)

    def swav_loss(cls, inputs, hp):  # lightly's SwaVLoss and ssl_fast.nn's take the same arguments
        crit = cls(temperature=hp["temperature"], sinkhorn_iterations=int(hp["iterations"]),
                   sinkhorn_epsilon=hp["epsilon"])
        return _call(crit, inputs, "high", "low")

    def lightly(inputs, hp, device):
        from lightly.loss import SwaVLoss
        return swav_loss(SwaVLoss, inputs, hp)

    def module(inputs, hp):
        from ssl_fast.nn import SwaVLoss
        return swav_loss(SwaVLoss, inputs, hp)

    return [Provider("torch", torch_eager, about="SwAV's loss loop with distributed_sinkhorn, eager torch"),
            Provider("torch_compile", torch_compile, about="torch.compile of that loop"),
            Provider("lightly", lightly, requires="lightly", about="lightly.loss.SwaVLoss")] \
        + _ssl_fast_providers(None, nn_module=module)


SWAV = Op(
    name="swav", about="SwAV loss module: 2 high-res + (crops - 2) low-res prototype scores (B, K), T 0.1",
    shape_keys=("b", "k", "crops"), batch_key="b",
    hparams={"temperature": 0.1, "epsilon": 0.05, "iterations": 3}, modes=("fwd", "bwd", "full"),
    dtypes=("fp32", "bf16"), providers=_swav_providers(), baseline="torch", make_inputs=_swav_inputs,
    grad_inputs=lambda inputs: inputs["high"] + inputs["low"], reference=_swav_ref, compare=_loss_err,
    gate_shape={"b": 64, "k": 30, "crops": 4}, gate_tol=1e-5,
    work=lambda s, mode, dt: (0.0, s["crops"] * s["b"] * s["k"] * ELEM[dt]),
    estimate_gib=lambda p, s, dt: 6.0 * s["crops"] * s["b"] * s["k"] * 4 / 1024 ** 3,
    presets={
        "quick": [dict(b=[256], k=[3000], crops=[4], dtype=["fp32"], modes=["full"])],
        "cpu": [dict(b=[256, 1024], k=[3000], crops=[8], dtype=["fp32"], modes=["full"])],
        "gpu": [dict(b=[4096], k=[3000], crops=[8], dtype=["fp32", "bf16"], modes=["full"])],
    },
    default_shape=dict(b=[256], k=[3000], crops=[4]),
)


def _directclr_inputs(s, dt, dev, rg):
    return _pair_inputs(s["n2"] // 2, s["dim"], dt, dev, rg, names=("r1", "r2"))


def _directclr_ref(inputs, hp):
    from ssl_fast import reference
    d0 = int(hp["d0"])
    return reference.ntxent_reference(inputs["r1"][:, :d0], inputs["r2"][:, :d0], hp["temperature"])


def _directclr_providers() -> List[Provider]:
    def torch_eager(inputs, hp, device):
        from ssl_fast import reference
        r1, r2, d0 = inputs["r1"], inputs["r2"], int(hp["d0"])
        return lambda: reference.ntxent_reference(r1[:, :d0], r2[:, :d0], hp["temperature"])

    def torch_compile(inputs, hp, device):
        from ssl_fast import reference
        d0 = int(hp["d0"])
        fn = _torch().compile(lambda a, b: reference.ntxent_reference(a[:, :d0], b[:, :d0], hp["temperature"]))
        r1, r2 = inputs["r1"], inputs["r2"]
        return lambda: fn(r1, r2)

    def lightly(inputs, hp, device):
        from lightly.loss import DirectCLRLoss
        return _call(DirectCLRLoss(loss_dim=int(hp["d0"]), temperature=hp["temperature"]), inputs, "r1", "r2")

    def module(inputs, hp):
        from ssl_fast.nn import DirectCLRLoss
        crit = DirectCLRLoss(feature_dim=int(hp["d0"]), temperature=hp["temperature"], variant="ntxent")
        return _call(crit, inputs, "r1", "r2")

    return [Provider("torch", torch_eager, about="NT-Xent reference on r[:, :d0], eager"),
            Provider("torch_compile", torch_compile, about="torch.compile of that reference"),
            Provider("lightly", lightly, requires="lightly", about="lightly.loss.DirectCLRLoss(loss_dim=d0)")] \
        + _ssl_fast_providers(None, nn_module=module)


DIRECTCLR = Op(
    name="directclr", about="DirectCLR loss module as lightly defines it: NT-Xent on r[:, :d0], T 0.1, d0 360",
    shape_keys=("n2", "dim"), batch_key="n2", hparams={"temperature": 0.1, "d0": 360},
    modes=("fwd", "bwd", "full"), dtypes=("fp32", "bf16"), providers=_directclr_providers(), baseline="torch",
    make_inputs=_directclr_inputs, grad_inputs=_grads("r1", "r2"), reference=_directclr_ref, compare=_loss_err,
    gate_shape={"n2": 64, "dim": 400}, gate_tol=1e-5,
    work=lambda s, mode, dt: _matmul_work(lambda x: x["n2"], lambda x: x["n2"])(dict(s, dim=360), mode, dt),
    estimate_gib=_quadratic_estimate(lambda s: s["n2"], lambda s: s["n2"]),
    presets={
        "quick": [dict(n2=[1024], dim=[2048], dtype=["fp32"], modes=["full"])],
        "cpu": [dict(n2=[1024, 4096], dim=[2048], dtype=["fp32"], modes=["full"])],
        "gpu": [dict(n2=[16384, 65536], dim=[2048], dtype=["bf16"], modes=["full"])],
    },
    default_shape=dict(n2=[1024], dim=[2048]),
)


# ----------------------------------------------------------------------------------------------------
# End to end: one SimCLR training step (2 views -> backbone -> projector -> loss -> backward -> SGD step)
# with the same model, optimizer and images for every provider: only the loss differs.


E2E_ARCH = {"resnet18": dict(backbone="resnet18", small_stem=True), "resnet50": dict(backbone="resnet50",
                                                                                      small_stem=False)}


def _e2e_inputs(s, dt, dev, rg):
    torch = _torch()
    from ssl_fast.methods.backbones import build_backbone
    torch.manual_seed(0)
    net, dim = build_backbone(E2E_ARCH[s["model"]]["backbone"], 3, small_stem=E2E_ARCH[s["model"]]["small_stem"])
    model = torch.nn.Sequential(net, torch.nn.Linear(dim, 2048), torch.nn.BatchNorm1d(2048), torch.nn.ReLU(),
                                torch.nn.Linear(2048, 128)).to(dev)
    cl = dev.type == "cuda"
    if cl:
        model = model.to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9)
    g = torch.Generator(device="cpu").manual_seed(0)
    views = [torch.randn(s["batch"], 3, s["res"], s["res"], generator=g).to(dev) for _ in range(2)]
    if cl:
        views = [v.contiguous(memory_format=torch.channels_last) for v in views]
    return {"x1": views[0], "x2": views[1], "model": model, "opt": opt, "dtype": dt}


def _e2e_loss(provider: str, temperature: float):
    """The loss each e2e provider swaps in: (z1, z2) -> loss."""
    if provider == "torch":
        from ssl_fast import reference
        return lambda z1, z2: reference.ntxent_reference(z1, z2, temperature)
    if provider == "lightly":
        from lightly.loss import NTXentLoss
        return NTXentLoss(temperature=temperature, memory_bank_size=0)
    if provider == "ssl_fast_nn":
        from ssl_fast.nn import NTXentLoss
        return NTXentLoss(temperature=temperature)
    raise ValueError(provider)


def _e2e_providers() -> List[Provider]:
    def builder(name):
        def build(inputs, hp, device):
            torch = _torch()
            loss_fn = _e2e_loss(name, hp["temperature"])
            model, opt, x1, x2 = inputs["model"], inputs["opt"], inputs["x1"], inputs["x2"]
            n = x1.shape[0]
            amp = inputs["dtype"] in ("bf16", "fp16")
            amp_dtype = getattr(torch, TORCH_DTYPE[inputs["dtype"]])

            def run():
                opt.zero_grad(set_to_none=True)
                with torch.autocast(device.type, dtype=amp_dtype, enabled=amp):
                    z = model(torch.cat([x1, x2]))
                    loss = loss_fn(z[:n], z[n:])
                loss.backward()
                opt.step()
                return loss.detach()
            return run
        return build

    return [Provider("torch", builder("torch"), about="eager NT-Xent reference (one (2N, 2N) logit matrix)"),
            Provider("lightly", builder("lightly"), requires="lightly", about="lightly.loss.NTXentLoss"),
            Provider("ssl_fast_nn", builder("ssl_fast_nn"), backend=auto_backend, about="ssl_fast.nn.NTXentLoss")]


def _e2e_gate(provider: Provider, device, hp):
    """The step's correctness is its loss's: value and gradients of the swapped-in loss against the float64
    reference on a small (N=32, D=16) pair."""
    from ssl_fast import reference
    torch = _torch()
    g = torch.Generator(device="cpu").manual_seed(3)
    z1, z2 = (torch.randn(32, 16, generator=g).to(device).requires_grad_() for _ in range(2))
    loss = _e2e_loss(provider.name, hp["temperature"])(z1, z2)
    loss.backward()
    a, b = z1.detach().double().requires_grad_(), z2.detach().double().requires_grad_()
    ref = reference.ntxent_reference(a, b, hp["temperature"])
    ref.backward()
    scale = max(float(a.grad.abs().max()), float(b.grad.abs().max()), 1e-12)
    gerr = max(float((z1.grad.double() - a.grad).abs().max()), float((z2.grad.double() - b.grad).abs().max())) / scale
    return max(_loss_err(loss, ref), gerr)


E2E = Op(
    name="e2e", about="one SimCLR training step (backbone + 2048-2048-128 projector + NT-Xent + SGD), only the loss "
                      "swapped; dtype = autocast dtype (fp32: none); CUDA: channels_last",
    shape_keys=("model", "batch", "res"), batch_key="batch", hparams={"temperature": 0.5}, modes=("step",),
    dtypes=("fp32", "bf16", "fp16"), providers=_e2e_providers(), baseline="torch", make_inputs=_e2e_inputs,
    grad_inputs=lambda inputs: [], reference=None, compare=None, gate_shape={}, gate_tol=1e-5,
    work=lambda s, mode, dt: (0.0, 0.0), estimate_gib=lambda p, s, dt: 0.0,
    presets={
        "quick": [dict(model=["resnet18"], batch=[64], res=[32], dtype=["fp32"])],
        "cpu": [dict(model=["resnet18"], batch=[128], res=[32], dtype=["fp32"], repeats=3)],
        "gpu": [dict(model=["resnet50"], batch=[256, 512], res=[224], dtype=["bf16"])],
        "gpu-target": [dict(model=["resnet50"], batch=[256], res=[224], dtype=["bf16"], providers=["torch", "ssl_fast_nn"])],
        "gpu-peers": [dict(model=["resnet50"], batch=[256], res=[224], dtype=["bf16"], providers=["lightly", "ssl_fast_nn"])],
    },
    default_shape=dict(model=["resnet18"], batch=[64], res=[32]),
    gate=_e2e_gate,
)


# ----------------------------------------------------------------------------------------------------
# The optimizer step + EMA teacher update over a model's parameter list (sgd_ema, adamw_ema, lars_ema)
#
# dtype "fp32": fp32 parameters, gradients, states and EMA; "fp32-bf16": bf16 parameters, gradients and
# states (torch.optim keeps them in the parameters' dtype) with an fp32 EMA of them. One timed call = one
# optimizer step of every parameter + the EMA of every one of them (fake gradients, fixed between steps).

OPTIM_EMA_DTYPES = ("fp32", "fp32-bf16")
OPTIM_HP = {"sgd": dict(lr=0.03, momentum=0.9, weight_decay=1e-4), "adamw": dict(lr=1e-3, weight_decay=0.05),
            "lars": dict(lr=0.3, momentum=0.9, weight_decay=1e-6)}


def _optim_ema_inputs(s, dt, dev, rg):
    torch = _torch()
    e_name, o_name = EMA_DTYPES[dt]
    odt, edt = getattr(torch, TORCH_DTYPE[o_name]), getattr(torch, TORCH_DTYPE[e_name])
    g = torch.Generator(device="cpu").manual_seed(0)
    shapes = param_shapes(s["model"])
    params = [torch.randn(sh, generator=g).to(device=dev, dtype=odt) for sh in shapes]
    grads = [(torch.randn(sh, generator=g) * 1e-2).to(device=dev, dtype=odt) for sh in shapes]
    for p, gr in zip(params, grads):
        p.grad = gr
    ema = [p.detach().to(edt).clone() for p in params]
    return {"params": params, "ema": ema}


def _optim_groups(kind: str, params):
    """Two groups as ssl_fast.train.param_groups builds them: weights (decayed, LARS-adapted) and the 0- / 1-d
    tensors (no decay, no adaptation)."""
    hp = OPTIM_HP[kind]
    wd = [p for p in params if p.ndim > 1]
    nd = [p for p in params if p.ndim <= 1]
    groups = [{"params": wd, "weight_decay": hp["weight_decay"]}, {"params": nd, "weight_decay": 0.0}]
    if kind == "lars":
        groups[0]["lars"], groups[1]["lars"] = True, False
    return [g for g in groups if g["params"]]


def _torch_optimizer(kind: str, params, **kw):
    torch = _torch()
    hp = {k: v for k, v in OPTIM_HP[kind].items() if k != "weight_decay"}
    groups = _optim_groups(kind, params)
    if kind == "lars":
        from ssl_fast.train import LARS
        return LARS(groups, **hp)
    return (torch.optim.SGD if kind == "sgd" else torch.optim.AdamW)(groups, **hp, **kw)


def _lerp_all(ema, params, m):
    """torch._foreach_lerp_ of the EMA toward the parameters (cast to the EMA's dtype when they differ)."""
    torch = _torch()
    src = [p.detach() if p.dtype == e.dtype else p.detach().to(e.dtype) for e, p in zip(ema, params)]
    torch._foreach_lerp_(ema, src, 1.0 - m)


def _optim_ema_gate(kind: str):
    def gate(provider: Provider, device, hp):
        """One step + EMA on the tiny model's list in fp32 against torch.optim (or LARS) + lerp in float64."""
        inputs = _optim_ema_inputs({"model": "tiny"}, "fp32", device, False)
        p64 = [p.detach().double().clone() for p in inputs["params"]]
        for p, q in zip(p64, inputs["params"]):
            p.grad = q.grad.double()
        e64 = [e.double().clone() for e in inputs["ema"]]
        provider.build(inputs, hp, device)()
        _torch_optimizer(kind, p64).step()
        _lerp_all(e64, p64, hp["momentum"])
        err = 0.0
        for got, want in ((inputs["params"], p64), (inputs["ema"], e64)):
            scale = max(float(w.abs().max()) for w in want)
            err = max(err, max(float((a.double() - w).abs().max()) for a, w in zip(got, want)) / scale)
        return err
    return gate


def _stream_ceiling(kind: str):
    """build(): the memory ceiling of the fused step (csrc/cpu/stream_probe.cpp). Its buffers stand for the
    optimizer's states; it writes the parameters and the EMA (bounded values: w <- w / 2 + g)."""
    def build(inputs, hp, device):
        torch = _torch()
        from ssl_fast._ext import HAS_EXT
        if not HAS_EXT:
            raise RuntimeError("stream_ceiling needs the compiled extension ssl_fast._C")
        params, ema = [p.detach() for p in inputs["params"]], inputs["ema"]
        grads = [p.grad for p in inputs["params"]]
        states = [torch.zeros_like(p) for _ in range({"sgd": 1, "adamw": 2, "lars": 1}[kind]) for p in params]
        written, n = params + states + list(ema), len(params)
        span = 256 if params[0].dtype == torch.float32 else 1024  # the optimizer + EMA kernel's blocks
        probe = torch.ops.ssl_fast.stream_probe_

        def run():
            if kind == "lars":
                probe([], params + grads, n, span)  # the norm pass: p and g read
            probe(written, grads, n, span)
        return run
    return build


def _optim_ema_providers(kind: str) -> List[Provider]:
    def torch_step(compiled: bool = False, **opt_kw):
        """build(): torch's optimizer (``opt_kw``: foreach / fused) step, then the lerp; optionally compiled."""
        def build(inputs, hp, device):
            params, ema = inputs["params"], inputs["ema"]
            opt = _torch_optimizer(kind, params, **({} if kind == "lars" else opt_kw))

            def step():
                opt.step()
                _lerp_all(ema, params, hp["momentum"])
            return _torch().compile(step) if compiled else step
        return build

    foreach_lerp, fused_lerp = torch_step(foreach=True), torch_step(fused=True)
    torch_compile = torch_step(compiled=True, foreach=True)

    def call(inputs, hp, ieee_sqrt=None):
        import ssl_fast.optim as fopt

        params, ema = inputs["params"], inputs["ema"]
        cls = {"sgd": fopt.SGD, "adamw": fopt.AdamW, "lars": fopt.LARS}[kind]
        hpk = {k: v for k, v in OPTIM_HP[kind].items() if k != "weight_decay"}
        if ieee_sqrt is not None:
            hpk["ieee_sqrt"] = ieee_sqrt
        opt = cls(_optim_groups(kind, params), **hpk, ema=list(zip(params, ema)), ema_momentum=hp["momentum"])
        return opt.step

    unfused = "ssl_fast.train.LARS (torch._foreach ops)" if kind == "lars" else "torch.optim, foreach=True"
    provs = [Provider("foreach_lerp", foreach_lerp, about=f"{unfused} + torch._foreach_lerp_ (the unfused default)"),
             Provider("torch_compile", torch_compile, about="torch.compile of that step + lerp (inductor fuses it)")]
    if kind != "lars":
        provs.insert(1, Provider("fused_lerp", fused_lerp, about="torch.optim, fused=True + torch._foreach_lerp_"))
    provs += _ssl_fast_providers(call)
    provs.append(Provider("stream_ceiling", _stream_ceiling(kind), devices=("cpu",), probe=True,
                          about="not an optimizer: ssl_fast::stream_probe_ moves the fused pass's bytes (p, states, "
                                "EMA read + written, g read; LARS: + its norm pass) with no math, in the C++ "
                                "kernel's layout: about the time a kernel moving those bytes needs here (a measurement, not a "
                                "proof: a kernel can come a few % under it)"))
    if kind == "adamw":
        def cpp_mkl(inputs, hp, device):
            import ssl_fast
            fn = call(inputs, hp, ieee_sqrt=False)

            def run():
                with ssl_fast.set_backend("cpp"):
                    return fn()
            return run
        provs.append(Provider("ssl_fast_cpp_mkl_sqrt", cpp_mkl, devices=("cpu",),
                              about="ssl_fast C++ kernel, ieee_sqrt=False: MKL's sqrt as torch's foreach path "
                                    "(bitwise foreach); the default takes the correctly rounded one (fused=True's)"))
    return provs


def _optim_ema_bytes(kind: str):
    def work(s, mode, dt):
        """The fused pass's traffic: every tensor read once, every written one written once (+ LARS's norms)."""
        e_name, o_name = EMA_DTYPES[dt]
        n = sum(math.prod(sh) for sh in param_shapes(s["model"]))
        o, e = ELEM[o_name], ELEM[e_name]
        states = {"sgd": 1, "adamw": 2, "lars": 1}[kind]
        per = (2 + states) * o + e + (1 + states) * o + e  # read p g states e, write p states e
        if kind == "lars":
            per += 2 * o  # the norm pass reads p and g
        return 0.0, n * per
    return work


def _optim_ema_op(kind: str) -> Op:
    cpu_models = ["resnet50", "vit_b_16"]
    # the fastest torch combinations (foreach, fused=True, compiled) against the C++ kernel (ssl_fast_torch is
    # foreach_lerp's sequence, ssl_fast_triton runs on CUDA only)
    cpu_providers = ["foreach_lerp", "torch_compile", "ssl_fast_cpp", "stream_ceiling"]
    if kind != "lars":
        cpu_providers.insert(1, "fused_lerp")
    if kind == "adamw":
        cpu_providers.append("ssl_fast_cpp_mkl_sqrt")
    return Op(
        name=f"{kind}_ema", about=f"{kind} step of a model's parameter list + EMA of the teacher (m 0.996) toward "
                                  "it; dtype fp32-bf16 = bf16 params / grads / states, fp32 EMA",
        shape_keys=("model",), batch_key=None, hparams={"momentum": 0.996}, modes=("update",),
        dtypes=OPTIM_EMA_DTYPES, providers=_optim_ema_providers(kind), baseline="foreach_lerp",
        make_inputs=_optim_ema_inputs, grad_inputs=lambda inputs: [], reference=None, compare=None,
        gate_shape={"model": "tiny"}, gate_tol=1e-5, work=_optim_ema_bytes(kind),
        estimate_gib=lambda p, s, dt: 0.0,
        presets={
            "quick": [dict(model=["resnet50"], dtype=["fp32"])],
            "cpu": [dict(model=cpu_models, dtype=["fp32", "fp32-bf16"], providers=cpu_providers)],
            "gpu": [dict(model=["resnet50", "vit_b_16", "vit_l_16"], dtype=["fp32", "fp32-bf16"])],
        },
        default_shape=dict(model=["resnet50"]),
        gate=_optim_ema_gate(kind),
    )


SGD_EMA, ADAMW_EMA, LARS_EMA = (_optim_ema_op(k) for k in ("sgd", "adamw", "lars"))


OPS: Dict[str, Op] = {op.name: op for op in (NTXENT, INFO_NCE, INFO_NCE_QUEUE, SINKHORN, EMA, SWAV, DIRECTCLR, E2E,
                                             SGD_EMA, ADAMW_EMA, LARS_EMA)}


def load_providers_file(path: Optional[str]) -> None:
    """``--providers-file FILE.py``: a file defining ``PROVIDERS = {"op": [ops.Provider(...), ...]}`` adds
    (or replaces, by name) providers, so a user's own implementation runs side by side, gate included."""
    if not path:
        return
    spec = importlib.util.spec_from_file_location("bench_extra_providers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for op_name, provs in getattr(mod, "PROVIDERS", {}).items():
        op = OPS[op_name]
        for p in provs:
            op.providers = [q for q in op.providers if q.name != p.name] + [p]


def shape_label(op: Op, shape: Dict) -> str:
    return " ".join(f"{k}={shape[k]}" for k in op.shape_keys if k in shape)
