"""The measurement child: one process that measures the specs it is given, one result line per spec.

    python bench/measure.py < specs.json      # a JSON list of specs (bench/runner.py writes them)

The runner (bench/runner.py) starts this file as a child process and reads its standard output line by line:
for every spec, in order, the child prints one line ``RESULT_MARK {"index": i, ...}`` as soon as that
measurement is taken, so a child that crashes, runs out of memory or times out loses only the spec it was on.
A child measures either one spec (CPU: isolated allocator state for the RSS measurement, cold compile caches)
or several in a row (CUDA: one CUDA context, Triton and inductor caches stay warm between shapes).

One measurement (:func:`measure`), in this order:

1. **Correctness gate** (:func:`gate`): the provider runs on the op's small gate shape in fp32; its value
   (and, for the losses, the gradients of the inputs) must match the float64 reference within the op's
   tolerance, otherwise the spec is refused (``status=wrong``, no time).
2. **First call** at the measured shape (compiles: torch.compile, Triton JIT), timed apart
   (``first_call_ms``), with the whole process's RSS growth around it on CPU (``process_rss_mib``), and
   the error against the float64 reference at the measured shape and dtype (``max_err``) when it fits.
3. **Memory**: the peak above the inputs during one call (:func:`cuda_peak_extra_mib`:
   ``max_memory_allocated``; :func:`cpu_peak_extra_mib`: peak RSS growth with glibc pinned to mmap, see
   :func:`pin_malloc_to_mmap`).
4. **Time**: median, min and interquartile range of repeats after warm-up (:func:`time_cuda`:
   ``triton.testing.do_bench`` or CUDA events; :func:`time_cpu`: ``perf_counter`` samples).

A measurement is a pair ``prep()`` (untimed: clearing ``.grad``, or the forward before a timed backward) and
``run()`` (timed): :func:`make_step`. ``{"kind": "peak"}`` specs measure the device's attainable GEMM and copy
rates instead (:func:`device_peak`). Nothing here imports CUDA or triton at import time.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import gc
import json
import math
import os
import statistics
import sys
import time
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops  # noqa: E402

RESULT_MARK = "@@BENCH_RESULT@@ "
MIB = 1024.0 * 1024.0
NAN = float("nan")


# ----------------------------------------------------------------------------------------------------
# timing


def _stats_ms(samples_ms: Sequence[float]) -> Tuple[float, float, float]:
    """(median, min, interquartile range) of the samples, ms."""
    xs = sorted(float(x) for x in samples_ms)
    if len(xs) >= 4:
        q = statistics.quantiles(xs, n=4)
        iqr = q[2] - q[0]
    else:
        iqr = xs[-1] - xs[0]
    return float(statistics.median(xs)), xs[0], float(iqr)


def time_cpu(run: Callable[[], object], prep: Optional[Callable[[], object]] = None, *, repeats: int = 5,
             warmup: int = 1, min_sample_s: float = 0.02, max_inner: int = 1000) -> Tuple[float, float, float]:
    """(median, min, IQR) milliseconds of ``run()`` over ``repeats`` samples after ``warmup`` calls (CPU).

    ``prep()`` runs before every call, untimed. A call shorter than ``min_sample_s`` is repeated inside
    one sample (the sample is then the mean of its calls) so that fast shapes are not timer noise.
    """
    def one() -> float:
        if prep is not None:
            prep()
        t0 = time.perf_counter()
        run()
        return time.perf_counter() - t0

    first = [one() for _ in range(max(1, warmup))][-1]
    inner = 1 if first >= min_sample_s else min(max_inner, max(1, int(math.ceil(min_sample_s / max(first, 1e-7)))))
    samples = []
    for _ in range(max(1, repeats)):
        samples.append(1e3 * sum(one() for _ in range(inner)) / inner)
    return _stats_ms(samples)


def time_cuda(run: Callable[[], object], prep: Optional[Callable[[], object]] = None, *, rep_ms: float = 100.0,
              warmup_ms: float = 25.0, samples: int = 10,
              grad_to_none: Optional[Sequence] = None) -> Tuple[float, float, float]:
    """(median, min, IQR) milliseconds of ``run()`` on the current CUDA device.

    Without ``prep``: ``triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms)`` (time budgets in ms,
    L2 cache flushed before every call, ``grad_to_none`` cleared between calls). With ``prep`` (e.g. a
    forward before a timed backward: ``retain_graph`` is not an option, torch.compile donates buffers):
    CUDA events around each ``run()``, median over ``max(samples, 10)`` calls after 3 warm-up calls.
    """
    import torch

    if prep is None:
        import triton.testing
        times = triton.testing.do_bench(run, warmup=warmup_ms, rep=rep_ms, grad_to_none=grad_to_none,
                                        return_mode="all")
        return _stats_ms(times)
    for _ in range(3):
        prep()
        run()
    torch.cuda.synchronize()
    n = max(int(samples), 10)
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n)]
    for i in range(n):
        prep()
        starts[i].record()
        run()
        ends[i].record()
    torch.cuda.synchronize()
    return _stats_ms([s.elapsed_time(e) for s, e in zip(starts, ends)])


# ----------------------------------------------------------------------------------------------------
# peak memory


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not found in /proc/self/status")


def process_rss_mark() -> int:
    """Start a whole-process measurement: reset the kernel's high-water mark (``/proc/self/clear_refs``) and
    return the current VmRSS (KiB). :func:`process_rss_growth_mib` then gives the peak growth since."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    return _status_kib("VmRSS")


def process_rss_growth_mib(mark: int) -> float:
    """Peak resident-set growth (MiB) of the process since :func:`process_rss_mark`: everything a user's
    process pays for a call, the allocator's buffers AND what the call loads (modules, libraries, caches,
    thread pools). Measured around the FIRST call of a fresh process, it is the cost a user sees."""
    return (_status_kib("VmHWM") - mark) / 1024.0


_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3
_pinned = False


def _libc():
    try:
        return ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
    except OSError:
        return None


def _mallopt(mmap_threshold: int, trim_threshold: int) -> bool:
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    ok = libc.mallopt(_M_MMAP_THRESHOLD, int(mmap_threshold)) == 1
    libc.mallopt(_M_TRIM_THRESHOLD, int(trim_threshold))
    return ok


def pin_malloc_to_mmap(threshold: int = 128 * 1024) -> bool:
    """Make glibc serve every block >= ``threshold`` bytes with its own mmap, returned to the OS on free.

    Call it FIRST in a child that measures CPU memory, before any tensor exists. glibc raises its mmap
    threshold dynamically (up to 32 MiB) when a large block is freed and then keeps blocks of a few MiB in
    its heap, where a later peak hides from RSS; pinning the threshold late does not undo that (measured:
    eager NT-Xent at 2N=2048 read 85-117 MiB when pinned after a warm-up, a steady 53 MiB when pinned at
    start). With the pin, RSS growth is the bytes of live tensors, like ``max_memory_allocated`` on CUDA.
    Returns False when the C library has no ``mallopt`` (not glibc).
    """
    global _pinned
    _pinned = _mallopt(threshold, threshold)
    return _pinned


def malloc_steady_state() -> bool:
    """Switch glibc to the state a long-running process reaches by itself, for TIMING after a pinned
    memory measurement: blocks < 32 MiB (the dynamic threshold's ceiling) come from the heap and stay there
    (trim threshold 64 MiB = 2x, as glibc sets it), larger ones are mmap'd. Without this, every
    few-MiB tensor of an eager provider would pay fresh page faults that a training loop does not pay."""
    global _pinned
    _pinned = False
    return _mallopt(32 * 1024 * 1024, 64 * 1024 * 1024)


def malloc_trim() -> None:
    libc = _libc()
    if libc is not None and hasattr(libc, "malloc_trim"):
        libc.malloc_trim(0)


def cpu_peak_extra_mib(run: Callable[[], object], prep: Optional[Callable[[], object]] = None) -> float:
    """Peak resident-set growth (MiB) during one ``run()``, above the RSS right after ``prep()``.

    Linux only. Use in a fresh process that called :func:`pin_malloc_to_mmap` at start (it pins here
    otherwise, which is exact only for blocks that the heap never held), after one warm-up call: the
    high-water mark VmHWM is reset to the current RSS by writing ``5`` to ``/proc/self/clear_refs``;
    extra = VmHWM after ``run()`` - VmRSS before.
    """
    if not _pinned:
        pin_malloc_to_mmap()
    gc.collect()
    malloc_trim()
    if prep is not None:
        prep()
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")
    base = _status_kib("VmRSS")
    out = run()
    peak = _status_kib("VmHWM")
    del out
    return (peak - base) / 1024.0


def cuda_peak_extra_mib(run: Callable[[], object], prep: Optional[Callable[[], object]] = None) -> float:
    """Peak ``torch.cuda.max_memory_allocated`` growth (MiB) during one ``run()``, above the memory
    allocated right after ``prep()`` (the inputs, plus the forward graph when ``prep`` runs a forward)."""
    import torch

    gc.collect()
    if prep is not None:
        prep()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    out = run()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated()
    del out
    return (peak - base) / MIB


def limit_memory(gib: Optional[float]) -> None:
    """Cap the data segment (RLIMIT_DATA: heap + private anonymous mmaps) so a provider that would exhaust
    the machine fails with an allocation error (a NaN 'oom' row) instead of waking the OOM killer on a
    shared host."""
    if not gib or gib <= 0:
        return
    try:
        import resource
        lim = int(gib * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
    except (ImportError, ValueError, OSError):
        pass


# ----------------------------------------------------------------------------------------------------
# the correctness gate


def _to64(x):
    import torch
    if isinstance(x, torch.Tensor):
        if not x.is_floating_point():
            return x
        return x.detach().to(torch.float64, copy=True).requires_grad_(x.requires_grad)
    if isinstance(x, list):
        return [_to64(v) for v in x]
    return x


def _flat_tensors(inputs: Dict) -> List:
    import torch
    out = []
    for v in inputs.values():
        if isinstance(v, torch.Tensor):
            out.append(v)
        elif isinstance(v, list):
            out += [t for t in v if isinstance(t, torch.Tensor)]
    return out


def gate(op: ops.Op, prov: ops.Provider, device, hp: Dict) -> float:
    """The provider's error on the op's small gate shape in fp32 against the float64 reference: value AND,
    for differentiable ops, the gradients of the inputs (max abs difference / max |reference gradient|)."""
    import torch
    if op.gate is not None:
        return float(op.gate(prov, device, hp))
    differentiable = "bwd" in op.modes
    inputs = op.make_inputs(op.gate_shape, "fp32", device, differentiable)
    ref_inputs = {k: _to64(v) for k, v in inputs.items()}  # float64 copies: an in-place provider cannot touch them
    ref = op.reference(ref_inputs, hp)
    out = prov.build(inputs, hp, device)()
    # an in-place op (EMA) returns None: its answer is the updated tensors
    err = float(op.compare(out if out is not None else inputs["ema"], ref))
    if differentiable:
        out.backward()
        ref.backward()
        got, want = op.grad_inputs(inputs), op.grad_inputs(ref_inputs)
        scale = max(max(float(w.grad.abs().max()) for w in want), 1e-12)
        # a provider that drops an input's gradient (None) is wrong by that whole gradient
        gerr = max(float(((g.grad.double() if g.grad is not None else torch.zeros_like(w)) - w.grad).abs().max())
                   for g, w in zip(got, want)) / scale
        err = max(err, gerr)
    _forget_compiled()  # what torch.compile traced at the gate shape: the measured shape compiles afresh, static
    return err


def _forget_compiled() -> None:
    """Drop torch.compile's traced graphs (torch._dynamo.reset): the next shape compiles static, as in a fresh
    process, instead of triggering a dynamic-shape recompile."""
    import torch
    try:
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass


_GATES: Dict[tuple, float] = {}  # (op, provider, device, hparams) -> gate error, for a child with several specs


def _real_shape_error(op: ops.Op, shape: Dict, inputs: Dict, out, hp: Dict, budget_gib: float) -> float:
    """Error at the measured shape and dtype against the float64 reference, when its estimated size fits."""
    if op.reference is None or out is None:
        return NAN
    if op.name == "ema":
        return NAN  # the in-place update has already moved on; the gate checked one update exactly
    shape_gib = sum(t.numel() for t in _flat_tensors(inputs)) * 8 / 1024 ** 3
    if op.estimate_gib("torch", shape, "fp64") * 2 + shape_gib > budget_gib:
        return NAN
    import torch
    with torch.no_grad():
        ref = op.reference({k: _to64(v) for k, v in inputs.items()}, hp)
        return float(op.compare(out, ref))


# ----------------------------------------------------------------------------------------------------
# one measurement


def device_peak(spec: Dict) -> Dict:
    """The device's attainable peaks in this process: a square GEMM in the dtype, and copy_ bandwidth."""
    import torch
    device = torch.device(spec["device"])
    is_cuda = device.type == "cuda"
    torch.set_num_threads(int(spec["threads"]))
    dt_name = spec["dtype"].split("-")[-1] if spec["dtype"] in ops.EMA_DTYPES else spec["dtype"]
    dt = getattr(torch, ops.TORCH_DTYPE.get(dt_name, "float32"))
    n = 8192 if is_cuda else 2048
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    run = lambda: torch.mm(a, b)  # noqa: E731
    ms = time_cuda(run, rep_ms=200.0)[0] if is_cuda else time_cpu(run, repeats=5)[0]
    del a, b
    nbytes = (1 << 31) if is_cuda else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    cms = time_cuda(copy, rep_ms=100.0)[0] if is_cuda else time_cpu(copy, repeats=7)[0]
    # in-place dst += src: every written line was read first (no write-allocate read), as in the optimizer and
    # EMA steps; 3 x nbytes moved (the streaming rate those steps can reach)
    add = lambda: dst.add_(src)  # noqa: E731
    ams = time_cuda(add, rep_ms=100.0)[0] if is_cuda else time_cpu(add, repeats=7)[0]
    return dict(status="ok", peak_tflops=2.0 * n ** 3 / (ms * 1e-3) / 1e12,
                peak_gbps=2.0 * nbytes / (cms * 1e-3) / 1e9,
                how=f"torch.mm {n}^3 {dt_name}: {ms:.3g} ms; copy_ of {nbytes >> 20} MiB: {cms:.3g} ms; "
                    f"in-place add_: {ams:.3g} ms ({3.0 * nbytes / (ams * 1e-3) / 1e9:.3g} GB/s)")


def make_step(op: ops.Op, fn, grads, mode: str, held: Dict):
    """(prep, run) of one timed call in ``mode``: ``prep`` runs untimed before each ``run``."""
    def clear_grads():
        for t in grads:
            t.grad = None

    if mode in ("fwd", "update", "step"):
        return None, fn
    if mode == "full":
        def run():
            fn().backward()
        return clear_grads, run
    if mode == "bwd":  # a fresh untimed forward before each timed backward (torch.compile forbids retain_graph)
        def prep():
            clear_grads()
            held["out"] = fn()

        def run():
            held.pop("out").backward()
        return prep, run
    raise ValueError(f"mode {mode!r} is not one of {op.modes}")


def measure(spec: Dict) -> Dict:
    """One spec (op, provider, shape, dtype, mode, threads, repeats, ...) -> its result: status, times,
    memory, gate, errors. A ``{"kind": "peak"}`` spec -> :func:`device_peak`."""
    is_cuda = spec["device"].startswith("cuda")
    import torch

    limit_memory(spec.get("mem_limit_gib"))
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    if is_cuda:
        torch.cuda.set_device(device)
    if spec.get("kind") == "peak":
        return device_peak(spec)
    ops.load_providers_file(spec.get("providers_file"))
    op = ops.OPS[spec["op"]]
    prov = op.provider(spec["provider"])
    hp = {k: spec[k] for k in op.hparams}
    shape = {k: spec[k] for k in op.shape_keys}
    mode = spec["mode"]
    backend = prov.backend(device) if prov.backend is not None else ""
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    # 1. the correctness gate (fp32, small shape, float64 reference): a wrong answer is not timed. Once per
    # provider and process: later specs of a child that runs several reuse it (compile_ms is then NaN)
    key = (op.name, prov.name, str(device), tuple(sorted(hp.items())))
    if prov.probe:  # a measurement of the machine, not of the op: nothing to check against the reference
        _GATES[key] = gate_err = gate_ms = NAN
    elif key in _GATES:
        gate_err, gate_ms = _GATES[key], NAN
        _forget_compiled()
    else:
        t_gate = time.perf_counter()
        gate_err = _GATES[key] = gate(op, prov, device, hp)
        gate_ms = 1e3 * (time.perf_counter() - t_gate)  # torch.compile: its compile (at the gate shape)
    if not prov.probe and not (gate_err <= op.gate_tol):
        return dict(status="wrong", backend=backend, max_err=gate_err, gate=f"FAIL {gate_err:.2e}",
                    note=f"refused: error {gate_err:.2e} against the float64 reference on the gate shape "
                         f"{ops.shape_label(op, op.gate_shape)} fp32 exceeds {op.gate_tol:.0e}")
    gate_note = "probe (no gate)" if prov.probe else f"pass {gate_err:.1e}"

    differentiable = "bwd" in op.modes
    inputs = op.make_inputs(shape, spec["dtype"], device, differentiable)
    inputs_mib = sum(t.numel() * t.element_size() for t in _flat_tensors(inputs)) / MIB
    fn = prov.build(inputs, hp, device)
    grads = op.grad_inputs(inputs)
    held: Dict = {}

    def clear_grads():
        for t in grads:
            t.grad = None

    prep, run = make_step(op, fn, grads, mode, held)

    # first call (compiles: torch.compile, Triton JIT / autotune); around it the whole process's RSS growth
    sync()
    gc.collect()
    rss_mark = process_rss_mark() if not is_cuda else None
    t0 = time.perf_counter()
    clear_grads()
    out = fn()
    if mode in ("bwd", "full"):
        out.backward()
    sync()
    first_call_ms = 1e3 * (time.perf_counter() - t0)
    process_rss_mib = process_rss_growth_mib(rss_mark) if rss_mark is not None else NAN
    value = float(out.detach().float()) if isinstance(out, torch.Tensor) and out.numel() == 1 else NAN
    max_err = _real_shape_error(op, shape, inputs, out.detach() if isinstance(out, torch.Tensor) else out, hp,
                                float(spec.get("ref_budget_gib", 2.0)))
    del out
    clear_grads()
    gc.collect()

    # 2. memory (the CPU child is still in its pinned-malloc state), 3. then time
    peak = cuda_peak_extra_mib(run, prep) if is_cuda else cpu_peak_extra_mib(run, prep)
    held.clear()
    base = dict(status="ok", backend=backend, peak_mem_mib=peak, inputs_mib=inputs_mib, first_call_ms=first_call_ms,
                process_rss_mib=process_rss_mib, value=value, max_err=max_err, gate=gate_note, note="")
    if spec.get("memory_only"):  # a largest-batch probe: memory is the answer, the first call gave the time
        return dict(base, median_ms=first_call_ms, min_ms=first_call_ms, iqr_ms=NAN)
    clear_grads()
    gc.collect()
    repeats = int(spec["repeats"])
    if is_cuda:
        grad_to_none = grads if mode == "full" else None
        med, mn, iqr = time_cuda(run, prep, rep_ms=float(spec.get("cuda_rep_ms", 100)), samples=repeats,
                                 grad_to_none=grad_to_none)
    else:
        malloc_steady_state()
        med, mn, iqr = time_cpu(run, prep, repeats=repeats, warmup=1)
    held.clear()
    flops, nbytes = op.work(shape, mode, spec["dtype"])
    res = dict(base, median_ms=med, min_ms=mn, iqr_ms=iqr,
               # the gate's call is the process's compile of this provider (in a fresh child: cold; the
               # measured shape then recompiles, mostly from inductor's in-process caches, so
               # first_call_ms - median would understate it)
               compile_ms=gate_ms if spec["provider"] == "torch_compile" else NAN,
               tflops=flops / (med * 1e-3) / 1e12 if flops else NAN,
               gbps=nbytes / (med * 1e-3) / 1e9 if nbytes and not flops else NAN)
    if op.name == "e2e":
        res["images_s"] = 2 * shape["batch"] / (med * 1e-3)
    return res


def measure_safely(spec: Dict) -> Dict:
    """:func:`measure`, with a failure turned into a result: a missing optional library -> ``unavailable``,
    out of memory -> ``oom``, anything else -> ``error``, the reason in ``note``."""
    try:
        return measure(spec)
    except ImportError as e:
        return dict(status="unavailable" if spec.get("requires") else "error", note=f"ImportError: {e}")
    except Exception as e:  # a provider that fails is a NaN row with the error, never a crash
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        oom = any(s in msg.lower() for s in ("out of memory", "can't allocate memory", "cannot allocate memory"))
        return dict(status="oom" if oom else "error", note=msg)


def emit_result(index: int, result: Dict) -> None:
    """Print the one result line the runner looks for."""
    sys.stdout.write(RESULT_MARK + json.dumps(dict(result, index=index)) + "\n")
    sys.stdout.flush()


def main(argv=None) -> int:
    """Read a JSON list of specs from standard input; measure them in order, one result line each."""
    specs = json.loads(sys.stdin.read())
    if any(not s["device"].startswith("cuda") for s in specs):
        pin_malloc_to_mmap()  # before any tensor exists: see pin_malloc_to_mmap
    for i, spec in enumerate(specs):
        emit_result(i, measure_safely(spec))
        if spec["device"].startswith("cuda"):  # the next spec starts from an empty allocator
            import torch
            gc.collect()
            torch.cuda.empty_cache()
    return 0


if __name__ == "__main__":
    sys.exit(main())
