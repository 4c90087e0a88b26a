"""ssl_fast's benchmark suite: every op's providers side by side in one run, time AND peak memory.

    python bench/suite.py --list                              # ops, providers, presets
    python bench/suite.py ntxent --preset quick               # = ssl-fast bench ntxent --preset quick
    python bench/suite.py ntxent --n2 1024 4096 --dim 128 --dtype fp32 bf16 --modes fwd full
    python bench/suite.py sinkhorn --b 4096 --k 3000 --providers swav lightly ssl_fast_cpp
    python bench/suite.py ema --model resnet50 vit_b_16 --dtype fp32 fp32-bf16
    python bench/suite.py e2e --model resnet18 --batch 128 --res 32          # one SimCLR step, only the loss swapped
    python bench/suite.py ntxent --largest-batch --mem-budget-gib 0.25 --dim 128
    python bench/suite.py all --preset cpu --save              # every op, the committed CPU results
    python bench/suite.py --report                             # re-render markdown + PNGs + the index

Ops and providers live in ``bench/ops.py`` (one provider table per op). For every (op, provider, shape,
dtype, mode) a FRESH child process (``bench/_harness.py``: isolated allocator state, compile caches and
crashes):

1. **Correctness gate**: the provider runs on the op's small gate shape in fp32; its value (and, for the
   losses, the gradients of the inputs) must match the float64 reference in ``ssl_fast.reference`` within the
   op's tolerance, otherwise the row is refused (``status=wrong``, NaN time): a benchmark of a wrong answer
   is not a benchmark. At the measured shape, ``max_err`` is the error against the float64 reference too
   (when the reference fits in memory), in the measured dtype.
2. **Memory**: the peak above the inputs during one call (in ``bwd`` mode above the inputs plus the saved
   forward graph): ``torch.cuda.max_memory_allocated`` on CUDA, peak RSS growth on CPU (glibc pinned to
   mmap so RSS follows live tensors, see ``_harness.pin_malloc_to_mmap``).
3. **Time**: median, min and interquartile range of repeats after warm-up (``triton.testing.do_bench`` on
   CUDA, an explicit median of ``perf_counter`` samples on CPU). The first call is timed apart
   (``first_call_ms``); for torch.compile, ``compile_ms`` is the wall time of the gate's call: the cold
   compile in a fresh cache (unless ``--warm-compile-cache``), at the gate shape.
4. **Work**: ``tflops`` (NOMINAL matmul flops, what the eager code executes: 2 R C D for the R x C logits
   forward, twice that backward; a kernel that exploits symmetry executes fewer, so its % of peak can exceed 100)
   or ``gbps`` (bytes the op must move: one read of the inputs, one write of the output), and ``pct_peak``
   against the device's peak MEASURED in the same run by a child with the same threads: a square GEMM in
   the dtype (``torch.mm``, 2048^3 on CPU, 8192^3 on CUDA) and ``copy_`` of a large buffer (2 x bytes / time).

Modes: ``fwd`` (a training forward: inputs require grad), ``bwd`` (the backward alone, an untimed forward
before each sample), ``full`` (forward + backward); ``update`` (EMA), ``step`` (e2e). Optional libraries
that are missing, providers that cannot run on the device (Inf-CL and Triton on CPU), crashes and
out-of-memory become NaN rows with the reason in ``note``.

Results: rows are appended to ``<out>/<device>/<op>.csv`` (device, torch, triton, commit, timestamp in every
row) with ``<out>/<device>/<op>.md`` and PNGs re-rendered from the whole CSV; ``<out>`` is
``bench/results/_scratch`` (ignored by git) unless ``--save`` (the committed ``bench/results``) or ``--out``.
``--report`` re-renders every CSV under ``bench/results`` and writes ``bench/results/README.md`` (the index and
the headline table).
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import re
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List, Optional

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import _harness as H  # noqa: E402
import ops as O  # noqa: E402

COMMON_COLS = ["timestamp", "commit", "device", "device_name", "threads", "torch", "triton", "op", "provider",
               "backend", "mode", "dtype"]
METRIC_COLS = ["repeats", "median_ms", "min_ms", "iqr_ms", "peak_mem_mib", "inputs_mib", "speedup", "tflops",
               "gbps", "pct_peak", "peak_tflops", "peak_gbps", "images_s", "value", "max_err", "gate",
               "first_call_ms", "compile_ms", "process_rss_mib", "status", "note"]
FLOAT_METRICS = ("median_ms", "min_ms", "iqr_ms", "peak_mem_mib", "inputs_mib", "speedup", "tflops", "gbps",
                 "pct_peak", "peak_tflops", "peak_gbps", "images_s", "value", "max_err", "first_call_ms",
                 "compile_ms", "process_rss_mib")
LARGEST_COLS = ["timestamp", "commit", "device", "device_name", "threads", "torch", "triton", "op", "provider",
                "backend", "mode", "dtype", "fixed", "batch_key", "budget_mib", "largest", "mib_at_largest",
                "ms_at_largest", "first_over", "probes", "note"]
RESULTS = os.path.join(HERE, "results")


def columns(op: O.Op) -> List[str]:
    return COMMON_COLS + list(op.shape_keys) + list(op.hparams) + METRIC_COLS


def device_slug(name: str) -> str:
    """Folder name of a device: 'AMD EPYC (2 cpus)' -> 'amd-epyc-2-cpus', 'NVIDIA H200' -> 'nvidia-h200'."""
    return re.sub(r"[^A-Za-z0-9]+", "-", name).strip("-").lower()[:60] or "device"


def load_extra_providers(path: Optional[str]) -> None:
    """``--providers-file FILE.py``: a file defining ``PROVIDERS = {"op": [ops.Provider(...), ...]}`` adds
    (or replaces, by name) providers, so a user's own implementation runs side by side, gate included."""
    if not path:
        return
    spec = importlib.util.spec_from_file_location("bench_extra_providers", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    for op_name, provs in getattr(mod, "PROVIDERS", {}).items():
        op = O.OPS[op_name]
        for p in provs:
            op.providers = [q for q in op.providers if q.name != p.name] + [p]


# ====================================================================================================
# child: one measurement


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


def gate(op: O.Op, prov: O.Provider, device, hp: Dict) -> float:
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
    try:  # forget what torch.compile traced at the gate shape: the measured shape compiles afresh, static
        torch._dynamo.reset()
    except Exception:  # noqa: BLE001
        pass
    return err


def _real_shape_error(op: O.Op, shape: Dict, inputs: Dict, out, hp: Dict, budget_gib: float) -> float:
    """Error at the measured shape and dtype against the float64 reference, when its estimated size fits."""
    if op.reference is None or out is None:
        return H.NAN
    if op.name == "ema":
        return H.NAN  # the in-place update has already moved on; the gate checked one update exactly
    shape_gib = sum(t.numel() for t in _flat_tensors(inputs)) * 8 / 1024 ** 3
    if op.estimate_gib("torch", shape, "fp64") * 2 + shape_gib > budget_gib:
        return H.NAN
    import torch
    with torch.no_grad():
        ref = op.reference({k: _to64(v) for k, v in inputs.items()}, hp)
        return float(op.compare(out, ref))


def _peak_child(spec: Dict) -> Dict:
    """The device's attainable peaks in this process: a square GEMM in the dtype, and copy_ bandwidth."""
    import torch
    device = torch.device(spec["device"])
    is_cuda = device.type == "cuda"
    torch.set_num_threads(int(spec["threads"]))
    dt_name = spec["dtype"].split("-")[-1] if spec["dtype"] in O.EMA_DTYPES else spec["dtype"]
    dt = getattr(torch, O.TORCH_DTYPE.get(dt_name, "float32"))
    n = 8192 if is_cuda else 2048
    a = torch.randn(n, n, device=device).to(dt)
    b = torch.randn(n, n, device=device).to(dt)
    run = lambda: torch.mm(a, b)  # noqa: E731
    ms = H.time_cuda(run, rep_ms=200.0)[0] if is_cuda else H.time_cpu(run, repeats=5)[0]
    del a, b
    nbytes = (1 << 31) if is_cuda else (1 << 28)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).fill_(1.0)
    dst = torch.empty_like(src)
    copy = lambda: dst.copy_(src)  # noqa: E731
    cms = H.time_cuda(copy, rep_ms=100.0)[0] if is_cuda else H.time_cpu(copy, repeats=7)[0]
    return dict(status="ok", peak_tflops=2.0 * n ** 3 / (ms * 1e-3) / 1e12,
                peak_gbps=2.0 * nbytes / (cms * 1e-3) / 1e9,
                how=f"torch.mm {n}^3 {dt_name}: {ms:.3g} ms; copy_ of {nbytes >> 20} MiB: {cms:.3g} ms")


def make_step(op: O.Op, fn, grads, mode: str, held: Dict):
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


def child_main(spec: Dict) -> Dict:
    is_cuda = spec["device"].startswith("cuda")
    if not is_cuda:
        H.pin_malloc_to_mmap()  # before any tensor exists: see _harness.pin_malloc_to_mmap
    import gc

    import torch

    H.limit_memory(spec.get("mem_limit_gib"))
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    if is_cuda:
        torch.cuda.set_device(device)
    if spec.get("kind") == "peak":
        return _peak_child(spec)
    load_extra_providers(spec.get("providers_file"))
    op = O.OPS[spec["op"]]
    prov = op.provider(spec["provider"])
    hp = {k: spec[k] for k in op.hparams}
    shape = {k: spec[k] for k in op.shape_keys}
    mode = spec["mode"]
    backend = prov.backend(device) if prov.backend is not None else ""
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    # 1. the correctness gate (fp32, small shape, float64 reference): a wrong answer is not timed
    t_gate = time.perf_counter()
    gate_err = gate(op, prov, device, hp)
    gate_ms = 1e3 * (time.perf_counter() - t_gate)  # torch.compile: its cold compile (at the gate shape)
    if not (gate_err <= op.gate_tol):
        return dict(status="wrong", backend=backend, max_err=gate_err, gate=f"FAIL {gate_err:.2e}",
                    note=f"refused: error {gate_err:.2e} against the float64 reference on the gate shape "
                         f"{O.shape_label(op, op.gate_shape)} fp32 exceeds {op.gate_tol:.0e}")
    gate_note = f"pass {gate_err:.1e}"

    differentiable = "bwd" in op.modes
    inputs = op.make_inputs(shape, spec["dtype"], device, differentiable)
    inputs_mib = sum(t.numel() * t.element_size() for t in _flat_tensors(inputs)) / H.MIB
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
    rss_mark = H.process_rss_mark() if not is_cuda else None
    t0 = time.perf_counter()
    clear_grads()
    out = fn()
    if mode in ("bwd", "full"):
        out.backward()
    sync()
    first_call_ms = 1e3 * (time.perf_counter() - t0)
    process_rss_mib = H.process_rss_growth_mib(rss_mark) if rss_mark is not None else H.NAN
    value = float(out.detach().float()) if isinstance(out, torch.Tensor) and out.numel() == 1 else H.NAN
    max_err = _real_shape_error(op, shape, inputs, out.detach() if isinstance(out, torch.Tensor) else out, hp,
                                float(spec.get("ref_budget_gib", 2.0)))
    del out
    clear_grads()
    gc.collect()

    # 2. memory (the CPU child is still in its pinned-malloc state), 3. then time
    peak = H.cuda_peak_extra_mib(run, prep) if is_cuda else H.cpu_peak_extra_mib(run, prep)
    held.clear()
    base = dict(status="ok", backend=backend, peak_mem_mib=peak, inputs_mib=inputs_mib, first_call_ms=first_call_ms,
                process_rss_mib=process_rss_mib, value=value, max_err=max_err, gate=gate_note, note="")
    if spec.get("memory_only"):  # a largest-batch probe: memory is the answer, the first call gave the time
        return dict(base, median_ms=first_call_ms, min_ms=first_call_ms, iqr_ms=H.NAN)
    clear_grads()
    gc.collect()
    repeats = int(spec["repeats"])
    if is_cuda:
        grad_to_none = grads if mode == "full" else None
        med, mn, iqr = H.time_cuda(run, prep, rep_ms=float(spec.get("cuda_rep_ms", 100)), samples=repeats,
                                   grad_to_none=grad_to_none)
    else:
        H.malloc_steady_state()
        med, mn, iqr = H.time_cpu(run, prep, repeats=repeats, warmup=1)
    held.clear()
    flops, nbytes = op.work(shape, mode, spec["dtype"])
    res = dict(base, median_ms=med, min_ms=mn, iqr_ms=iqr,
               # the gate's call is the process's cold compile (the measured shape then recompiles, mostly
               # from inductor's in-process caches, so first_call_ms - median would understate it)
               compile_ms=gate_ms if spec["provider"] == "torch_compile" else H.NAN,
               tflops=flops / (med * 1e-3) / 1e12 if flops else H.NAN,
               gbps=nbytes / (med * 1e-3) / 1e9 if nbytes and not flops else H.NAN)
    if op.name == "e2e":
        res["images_s"] = 2 * shape["batch"] / (med * 1e-3)
    return res


def _child_entry(payload: str) -> int:
    spec = json.loads(payload)
    try:
        result = child_main(spec)
    except ImportError as e:
        result = dict(status="unavailable" if spec.get("requires") else "error", note=f"ImportError: {e}")
    except Exception as e:  # a provider that fails is a NaN row with the error, never a crash
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        oom = any(s in msg.lower() for s in ("out of memory", "can't allocate memory", "cannot allocate memory"))
        result = dict(status="oom" if oom else "error", note=msg)
    H.emit_result(result)
    return 0


# ====================================================================================================
# parent: expand the CLI into specs, run the children, write results


SHAPE_FLAGS = {"n2": int, "dim": int, "n": int, "queue": int, "b": int, "k": int, "crops": int, "model": str,
               "batch": int, "res": int}


def parse_args(argv=None):
    p = argparse.ArgumentParser(
        prog="ssl-fast bench", description="Benchmark every provider of an op side by side (time, memory, "
        "TFLOP/s or GB/s vs the measured device peak), after a correctness gate against the float64 reference.",
        epilog="ops: " + ", ".join(f"{o.name} ({'/'.join(o.shape_keys)})" for o in O.OPS.values())
        + ". See bench/README.md.", formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("op", nargs="?", help="op name, or 'all' (every op at the preset's shapes)")
    p.add_argument("--list", action="store_true", help="list ops, providers and presets, then exit")
    p.add_argument("--report", action="store_true",
                   help="re-render markdown tables, PNG plots and the index README.md from every CSV under "
                        "--out (default bench/results), then exit")
    p.add_argument("--preset", help="quick | cpu | gpu: the op's predefined shapes (explicit flags override)")
    for k, typ in SHAPE_FLAGS.items():
        p.add_argument(f"--{k}", type=typ, nargs="+", help=f"shape: {k} (ops that have it)")
    p.add_argument("--dtype", nargs="+", help="fp32 bf16 fp16 (ema also fp32-bf16 fp32-fp16)")
    p.add_argument("--modes", nargs="+", help="fwd bwd full (losses), update (ema), step (e2e)")
    p.add_argument("--providers", nargs="+", help="default: every provider the op has (see --list)")
    p.add_argument("--providers-file", help="a .py file with PROVIDERS = {op: [ops.Provider(...)]} to add")
    p.add_argument("--set", nargs="+", default=[], metavar="NAME=VALUE",
                   help="override a hyperparameter, e.g. --set temperature=0.2")
    p.add_argument("--repeats", type=int, default=None,
                   help="timed samples (default 5 or the preset's); CPU: their median; CUDA: do_bench's budget")
    p.add_argument("--cuda-rep-ms", type=float, default=100.0, help="do_bench measurement budget, ms")
    p.add_argument("--threads", type=int, default=2, help="torch threads in the children (default 2)")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (auto: cuda when present)")
    p.add_argument("--out", default=None, help="results root (default bench/results/_scratch, ignored by git)")
    p.add_argument("--save", action="store_true", help="write to the committed bench/results/<device>/")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child before a NaN row")
    p.add_argument("--mem-budget-gib", type=float, default=None,
                   help="CPU: skip a run whose estimated peak exceeds this and cap each child at budget + 2 GiB "
                        "(default: half of MemAvailable); with --largest-batch: the budget searched")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="use your inductor/triton caches (default: a fresh one per child: cold compile_ms)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the list this many times interleaving providers; keep the median round")
    p.add_argument("--largest-batch", action="store_true",
                   help="instead of timing: per provider, the largest batch (the op's batch key) whose "
                        "inputs + peak extra memory fit --mem-budget-gib")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p


def _resolve_device(requested: str) -> str:
    import torch
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: no CUDA device on this machine")
    if requested != "cpu" and not requested.startswith("cuda"):
        raise SystemExit(f"--device must be auto, cpu or cuda[:K], got {requested!r}")
    return requested


def _jobs(op: O.Op, args, device: str) -> List[Dict]:
    """The preset's jobs (or one default job) with the explicit flags applied to every job."""
    preset = args.preset or ("gpu" if device.startswith("cuda") and args.op == "all" else None)
    if preset and preset not in op.presets:
        raise SystemExit(f"--preset must be one of {', '.join(op.presets)}, got {preset!r}")
    base = op.presets[preset] if preset else [dict(op.default_shape)]
    jobs = []
    for job in base:
        job = dict(job)
        for k in SHAPE_FLAGS:
            v = getattr(args, k)
            if v is not None:
                if k not in op.shape_keys:
                    raise SystemExit(f"--{k}: op {op.name} has no shape {k!r}; its shape is "
                                     f"{', '.join('--' + s for s in op.shape_keys)}")
                job[k] = v
        for k in op.shape_keys:
            job.setdefault(k, op.default_shape[k])
        job["dtype"] = args.dtype or job.get("dtype") or [op.dtypes[0]]
        job["modes"] = args.modes or job.get("modes") or list(op.modes)
        job["providers"] = args.providers or job.get("providers") or [p.name for p in op.providers]
        job["repeats"] = args.repeats if args.repeats is not None else job.get("repeats", 5)
        for dt in job["dtype"]:
            if dt not in op.dtypes:
                raise SystemExit(f"--dtype {dt}: op {op.name} takes {', '.join(op.dtypes)}")
        for m in job["modes"]:
            if m not in op.modes:
                raise SystemExit(f"--modes {m}: op {op.name} has modes {', '.join(op.modes)}")
        for prov in job["providers"]:
            op.provider(prov)  # KeyError with the list of names
        jobs.append(job)
    return jobs


def _hparams(op: O.Op, args) -> Dict:
    hp = dict(op.hparams)
    for item in args.set:
        name, _, value = item.partition("=")
        if name in hp:
            hp[name] = float(value)
    return hp


def _grid(job: Dict, keys) -> List[Dict]:
    shapes = [{}]
    for k in keys:
        shapes = [dict(s, **{k: v}) for s in shapes for v in job[k]]
    return shapes


def _unrunnable(op: O.Op, prov: O.Provider, device: str, dtype: str) -> Optional[Dict]:
    if prov.requires and importlib.util.find_spec(prov.requires) is None:
        return dict(status="unavailable", note=f"{prov.requires} not installed")
    dev_type = "cuda" if device.startswith("cuda") else "cpu"
    if dev_type not in prov.devices:
        return dict(status="unavailable", note=f"runs on {'/'.join(prov.devices)} only"
                    + (f" ({prov.about})" if prov.about and prov.name == "inf_cl" else ""))
    if prov.dtypes and dtype not in prov.dtypes:
        return dict(status="unavailable", note=f"dtype {dtype} not supported")
    return None


class Runner:
    def __init__(self, args):
        import torch
        self.args = args
        self.torch_v = torch.__version__
        self.triton_v = H.package_version("triton")
        self.commit = H.git_commit()
        self.stamp = datetime.datetime.now().isoformat(timespec="seconds")
        avail = H.mem_available_gib()
        self.default_budget = 0.5 * avail if not math.isnan(avail) else 0.0
        self.peaks: Dict[tuple, Dict] = {}
        try:
            from tqdm import tqdm
            self.tqdm = tqdm
        except ImportError:
            self.tqdm = None

    def child(self, spec: Dict, timeout: Optional[float] = None) -> Dict:
        env = {"OMP_NUM_THREADS": str(spec["threads"]), "MKL_NUM_THREADS": str(spec["threads"])}
        tmp = None
        if not self.args.warm_compile_cache:
            tmp = tempfile.mkdtemp(prefix="ssl_fast_bench_cache_")
            env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                       TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
        try:
            return H.run_child([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)], env=env,
                               timeout=timeout or self.args.timeout)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    def peak(self, device: str, dtype: str) -> Dict:
        key = (device, dtype, self.args.threads)
        if key not in self.peaks:
            self.peaks[key] = self.child(dict(kind="peak", device=device, dtype=dtype, threads=self.args.threads),
                                         timeout=600)
        return self.peaks[key]

    def specs(self, op: O.Op, device: str) -> List[Dict]:
        hp = _hparams(op, self.args)
        budget = self.args.mem_budget_gib if self.args.mem_budget_gib is not None else self.default_budget
        out = []
        for job in _jobs(op, self.args, device):
            for dtype in job["dtype"]:
                for shape in _grid(job, op.shape_keys):
                    for mode in job["modes"]:
                        for prov in job["providers"]:
                            out.append(dict(kind="measure", op=op.name, provider=prov, mode=mode, dtype=dtype,
                                            device=device, threads=self.args.threads, repeats=job["repeats"],
                                            cuda_rep_ms=self.args.cuda_rep_ms, providers_file=self.args.providers_file,
                                            requires=op.provider(prov).requires,
                                            mem_budget_gib=budget if device == "cpu" else 0.0,
                                            mem_limit_gib=budget + 2.0 if device == "cpu" and budget else 0,
                                            ref_budget_gib=min(2.0, budget or 2.0), **shape, **hp))
        return out

    def measure(self, op: O.Op, s: Dict) -> Dict:
        prov = op.provider(s["provider"])
        skip = _unrunnable(op, prov, s["device"], s["dtype"])
        if skip:
            return skip
        est = op.estimate_gib(s["provider"], {k: s[k] for k in op.shape_keys}, s["dtype"])
        if s["mem_budget_gib"] and est > s["mem_budget_gib"]:
            return dict(status="skipped", note=f"estimated peak {est:.1f} GiB > budget {s['mem_budget_gib']:.1f} GiB "
                                               "(--mem-budget-gib)" + ("; pml's NTXentLoss is cubic in 2N"
                                                                        if s["provider"] == "pml" else ""))
        return self.child(s)

    def run_op(self, op: O.Op, device: str, dev_name: str, out_dir: str) -> List[Dict]:
        specs = self.specs(op, device)
        say = print
        bar = None
        if self.tqdm is not None:
            bar = self.tqdm(total=len(specs) * max(1, self.args.rounds), desc=f"bench {op.name}", unit="run",
                            file=sys.stderr, dynamic_ncols=True)
            say = bar.write
        say(f"{op.name}: {len(specs)} measurements, one child process each; {dev_name}; commit {self.commit}; "
            f"torch {self.torch_v}; triton {self.triton_v or '-'}")
        results: List[List[Dict]] = [[] for _ in specs]
        for rnd in range(max(1, self.args.rounds)):
            for i, s in enumerate(specs):
                res = self.measure(op, s)
                results[i].append(res)
                say(f"  {s['provider']:>15} {s['mode']:>6} {O.shape_label(op, s):<28} {s['dtype']:<9}"
                    + (f" (round {rnd + 1})" if self.args.rounds > 1 else "")
                    + f": {H.fmt_num(res.get('median_ms', H.NAN))} ms, {H.fmt_num(res.get('peak_mem_mib', H.NAN))} MiB"
                    + (f"  [{res.get('status')}: {res.get('note')}]" if res.get("status") != "ok" else ""))
                if bar is not None:
                    bar.update(1)
        if bar is not None:
            bar.close()
        rows = []
        for s, rs in zip(specs, results):
            row = {c: "" for c in columns(op)}
            row.update({c: H.NAN for c in FLOAT_METRICS})
            row.update(timestamp=self.stamp, commit=self.commit, device=device, device_name=dev_name,
                       threads=s["threads"], torch=self.torch_v, triton=self.triton_v, op=op.name,
                       provider=s["provider"], mode=s["mode"], dtype=s["dtype"], repeats=s["repeats"])
            row.update({k: s[k] for k in op.shape_keys})
            row.update({k: s[k] for k in op.hparams})
            ok = sorted((r for r in rs if r.get("status") == "ok"), key=lambda r: r["median_ms"])
            res = dict(ok[(len(ok) - 1) // 2]) if ok else dict(rs[-1])
            if len(rs) > 1:
                res["note"] = (res.get("note") or "") + f" median of {len(ok)}/{len(rs)} rounds: " + ", ".join(
                    H.fmt_num(r["median_ms"]) for r in ok) + " ms"
            row.update({k: (H.NAN if v is None else v) for k, v in res.items() if k in row})
            if row["status"] == "ok":
                pk = self.peak(device, s["dtype"])
                if pk.get("status") == "ok":
                    row["peak_tflops"], row["peak_gbps"] = pk["peak_tflops"], pk["peak_gbps"]
                    if not math.isnan(H.to_float(row["tflops"])):
                        row["pct_peak"] = 100.0 * row["tflops"] / pk["peak_tflops"]
                    elif not math.isnan(H.to_float(row["gbps"])):
                        row["pct_peak"] = 100.0 * row["gbps"] / pk["peak_gbps"]
            rows.append(row)
        _speedups(op, rows)
        os.makedirs(out_dir, exist_ok=True)
        H.append_csv(os.path.join(out_dir, f"{op.name}.csv"), rows, columns(op))
        self._save_peaks(out_dir, device, dev_name)
        print(summary(op, rows))
        paths = render_op(op, out_dir, plot=not self.args.no_plot)
        print("\nappended {} rows to {}\nrendered {}".format(len(rows), os.path.join(out_dir, f"{op.name}.csv"),
                                                             ", ".join(paths)))
        return rows

    def _save_peaks(self, out_dir: str, device: str, dev_name: str) -> None:
        rows = [dict(timestamp=self.stamp, commit=self.commit, device=device, device_name=dev_name, threads=thr,
                     torch=self.torch_v, dtype=dt, peak_tflops=pk.get("peak_tflops", H.NAN),
                     peak_gbps=pk.get("peak_gbps", H.NAN), how=pk.get("how", pk.get("note", "")))
                for (dev, dt, thr), pk in self.peaks.items() if dev == device and not pk.get("_saved")]
        for pk in self.peaks.values():
            pk["_saved"] = True
        if rows:
            H.append_csv(os.path.join(out_dir, "peak.csv"), rows, ["timestamp", "commit", "device", "device_name",
                                                                   "threads", "torch", "dtype", "peak_tflops",
                                                                   "peak_gbps", "how"])


def _speedups(op: O.Op, rows: List[Dict]) -> None:
    """speedup = the baseline provider's median / this provider's, same shape / dtype / mode, same run."""
    key = lambda r: tuple(str(r[k]) for k in op.shape_keys) + (r["dtype"], r["mode"], r["device"])  # noqa: E731
    ref = {key(r): H.to_float(r["median_ms"]) for r in rows if r["provider"] == op.baseline}
    for r in rows:
        t, m = ref.get(key(r), H.NAN), H.to_float(r["median_ms"])
        r["speedup"] = t / m if m and not math.isnan(t) and not math.isnan(m) else H.NAN


def _fast_providers(rows):
    return [r for r in rows if r["provider"].startswith("ssl_fast") and r["status"] == "ok"]


def summary(op: O.Op, rows: List[Dict]) -> str:
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[k]) for k in op.shape_keys) + (r["dtype"], r["mode"], r["device"]), []).append(r)
    out = []
    for key, grp in groups.items():
        fast = min(_fast_providers(grp), key=lambda r: H.to_float(r["median_ms"]), default=None)
        body = []
        for r in grp:
            t_vs = m_vs = H.NAN
            if fast is not None and not r["provider"].startswith("ssl_fast"):
                t_vs = H.to_float(r["median_ms"]) / H.to_float(fast["median_ms"])
                if H.to_float(fast["peak_mem_mib"]) > 0:
                    m_vs = H.to_float(r["peak_mem_mib"]) / H.to_float(fast["peak_mem_mib"])
            work = r["tflops"] if not math.isnan(H.to_float(r["tflops"])) else r["gbps"]
            body.append([r["provider"] + (f" ({r['backend']})" if r.get("backend") else ""),
                         H.fmt_num(r["median_ms"]), H.fmt_num(r["iqr_ms"]), H.fmt_num(r["peak_mem_mib"]),
                         H.fmt_num(r["speedup"]), H.fmt_num(t_vs), H.fmt_num(m_vs), H.fmt_num(work),
                         H.fmt_num(r["pct_peak"]), r.get("gate", ""), H.fmt_num(r["max_err"]),
                         (r["note"] or "")[:90] if r["status"] != "ok" else ""])
        shape = " ".join(f"{k}={v}" for k, v in zip(op.shape_keys, key))
        out.append(f"\n{op.name}  {shape}  {key[-3]}  mode={key[-2]}  [{key[-1]}]")
        out.append(H.text_table(["provider", "ms", "IQR", "MiB", f"x vs {op.baseline}", "ssl_fast x faster",
                                 "x less mem", "TFLOP/s|GB/s", "% peak", "gate", "max_err", "note"], body))
    return "\n".join(out)


# ====================================================================================================
# rendering: markdown tables, PNG plots, the index


def render_op(op: O.Op, out_dir: str, plot: bool = True) -> List[str]:
    rows = H.read_csv(os.path.join(out_dir, f"{op.name}.csv"))
    if not rows:
        return []
    about = {p.name: p.about for p in op.providers}
    provs = [p.name for p in op.providers]
    notes = [f"{op.about}.", "",
             "Providers: " + "; ".join(f"`{p}` = {about[p]}" for p in provs if about.get(p)) + ".", "",
             "Every row passed the correctness gate (fp32, small shape, value and input gradients against the "
             "float64 reference) unless its status says otherwise; `max_err` in the CSV is the error at the "
             "measured shape and dtype. Time: median of repeats after warm-up (IQR in the CSV). Memory: peak "
             "above the inputs during one call (CUDA: max_memory_allocated; CPU: peak RSS growth in a fresh "
             f"process). Speedups in parentheses are against `{op.baseline}` in the same run. % of peak: against "
             "the device's GEMM / copy peak measured in the same run (peak.csv)."]
    md = H.render_markdown(rows, title=f"{op.name}: providers side by side",
                           section_cols=("device_name", "threads", "dtype") + tuple(op.hparams),
                           shape_cols=op.shape_keys, provider_order=provs, notes=notes, baseline=op.baseline,
                           extra_tables=[("pct_peak", "% of the measured device peak (TFLOP/s or GB/s)"),
                                         ("images_s", "Images per second")])
    path = os.path.join(out_dir, f"{op.name}.md")
    with open(path, "w") as f:
        f.write(md)
    paths = [path]
    if plot:
        try:
            import plot as P
            paths += P.plot_op(op, os.path.join(out_dir, f"{op.name}.csv"), out_dir)
        except Exception as e:  # noqa: BLE001  (plots are a convenience; the CSV is the result)
            print(f"plots skipped: {type(e).__name__}: {e}")
    return paths


def headline(root: str) -> str:
    """Per device and op, at the largest shape where ssl_fast and a peer both ran (the op's main mode): ssl_fast's
    best time and memory against every other provider."""
    lines = ["| device | op | shape | dtype | mode | ssl_fast ms (MiB) | vs each peer: time x faster / memory x less |",
             "|---|---|---|---|---|---|---|"]
    for dev in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("_")):
        for op in O.OPS.values():
            rows = H.latest_rows(H.read_csv(os.path.join(root, dev, f"{op.name}.csv")),
                                 ["device_name", "threads", "dtype", "mode", "provider"] + list(op.shape_keys))
            rows = [r for r in rows if r.get("status") == "ok"]
            main_mode = "full" if "full" in op.modes else op.modes[0]
            by: Dict[tuple, List[Dict]] = {}
            for r in rows:  # "+thp"-style variants (another allocator setting) are not peers of the default
                if r["mode"] == main_mode and "+" not in r["provider"]:
                    by.setdefault(tuple(r[k] for k in ("threads", "dtype") + op.shape_keys), []).append(r)
            cands = [(k, g) for k, g in by.items() if _fast_providers(g) and any(
                not r["provider"].startswith("ssl_fast") for r in g)]
            if not cands:
                continue
            # the dtype of the op's first row, the shape with the most peers, then the largest
            cands.sort(key=lambda kg: (len(kg[1]), [H.sort_key_num(v) for v in kg[0][2:]]))
            key, grp = cands[-1]
            fast = min(_fast_providers(grp), key=lambda r: H.to_float(r["median_ms"]))
            peers = []
            for r in sorted(grp, key=lambda r: r["provider"]):
                if r["provider"].startswith("ssl_fast"):
                    continue
                t = H.to_float(r["median_ms"]) / H.to_float(fast["median_ms"])
                fm = H.to_float(fast["peak_mem_mib"])
                m = f"{H.to_float(r['peak_mem_mib']) / fm:.2g}x" if fm >= 0.5 else "- (ssl_fast ~0 MiB)"
                peers.append(f"{r['provider']} {t:.2g}x / {m}")
            shape = " ".join(f"{k}={v}" for k, v in zip(op.shape_keys, key[2:]))
            lines.append(f"| {fast['device_name']} ({key[0]} thr) | [{op.name}]({dev}/{op.name}.md) | {shape} | "
                         f"{key[1]} | {main_mode} | {fast['provider']}: {H.fmt_num(fast['median_ms'])} "
                         f"({H.fmt_num(fast['peak_mem_mib'])}) | {'; '.join(peers)} |")
    return "\n".join(lines)


def report(root: str, plot: bool = True) -> str:
    """Re-render every op's markdown and plots under ``root/<device>/`` and write ``root/README.md``."""
    index = ["# Benchmark results", "",
             "_Written by `ssl-fast bench --report` (bench/suite.py) from the CSVs in the device folders; every row "
             "carries its device, threads, torch / triton versions, commit and timestamp._", "",
             "## Headline", "", "ssl_fast's fastest backend against every other provider at the largest shape "
             "that most providers ran (the op's main mode; a ratio > 1 means ssl_fast is faster / uses less "
             "memory).", "", headline(root), ""]
    for dev in sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("_")):
        out_dir = os.path.join(root, dev)
        files = []
        for op in O.OPS.values():
            if os.path.exists(os.path.join(out_dir, f"{op.name}.csv")):
                render_op(op, out_dir, plot=plot)
                files.append(f"[{op.name}]({dev}/{op.name}.md)")
        if os.path.exists(os.path.join(out_dir, "largest.csv")):
            render_largest(out_dir)
            files.append(f"[largest batch]({dev}/largest.md)")
        peaks = H.latest_rows(H.read_csv(os.path.join(out_dir, "peak.csv")), ["threads", "dtype"])
        index += [f"## {dev}", "", " · ".join(files), ""]
        if peaks:
            index += ["Measured peaks: " + "; ".join(
                f"{p['dtype']} {p['threads']} thr: GEMM {H.fmt_num(p['peak_tflops'])} TFLOP/s, copy "
                f"{H.fmt_num(p['peak_gbps'])} GB/s ({p['how']})" for p in peaks), ""]
    path = os.path.join(root, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(index).rstrip() + "\n")
    return path


# ====================================================================================================
# largest batch under a memory budget


def largest_batch(runner: Runner, op: O.Op, device: str, dev_name: str, out_dir: str) -> List[Dict]:
    args = runner.args
    if op.batch_key is None:
        raise SystemExit(f"--largest-batch: op {op.name} has no batch dimension")
    budget_gib = args.mem_budget_gib if args.mem_budget_gib is not None else (0.25 if device == "cpu" else 80.0)
    budget_mib = budget_gib * 1024
    hp = _hparams(op, args)
    mode = "full" if "full" in op.modes else op.modes[0]
    default_provs = [op.baseline] + [p.name for p in op.providers if p.name.startswith("ssl_fast")]
    rows = []
    for job in _jobs(op, args, device):
        fixed_keys = [k for k in op.shape_keys if k != op.batch_key]
        provs = args.providers or default_provs
        for dtype in job["dtype"]:
            for fixed in _grid(job, fixed_keys):
                for prov in provs:
                    skip = _unrunnable(op, op.provider(prov), device, dtype)
                    if skip:
                        continue

                    def probe(x):
                        spec = dict(kind="measure", op=op.name, provider=prov, mode=mode, dtype=dtype, device=device,
                                    threads=args.threads, repeats=1, memory_only=True, requires=None,
                                    providers_file=args.providers_file, ref_budget_gib=0.0,
                                    mem_limit_gib=(budget_gib + 1.0) if device == "cpu" else 0, **fixed, **hp)
                        spec[op.batch_key] = x
                        r = runner.child(spec)
                        if r.get("status") != "ok":
                            return dict(fits=False, mib=H.NAN, ms=H.NAN, backend="", note=f"{r.get('status')}: "
                                        f"{r.get('note')}")
                        mib = float(r["inputs_mib"]) + float(r["peak_mem_mib"])
                        return dict(fits=mib <= budget_mib, mib=mib, ms=float(r["median_ms"]),
                                    backend=r.get("backend", ""), note="")

                    x, lo, lo_res, hi, probes = 256 if op.batch_key != "batch" else 16, 0, None, None, 0
                    while hi is None:
                        r = probe(x)
                        probes += 1
                        print(f"  {prov:>14} {op.batch_key}={x:<8} {H.fmt_num(r['mib'])} MiB "
                              f"{'fits' if r['fits'] else 'does not fit'}" + (f" [{r['note']}]" if r["note"] else ""))
                        if r["fits"]:
                            lo, lo_res, x = x, r, x * 2
                        else:
                            hi = x
                    quantum = 64 if op.batch_key != "batch" else 8
                    step = max(quantum, (hi - lo) // 8)
                    while lo and hi - lo > step:
                        mid = (lo + hi) // 2 // quantum * quantum
                        r = probe(mid)
                        probes += 1
                        print(f"  {prov:>14} {op.batch_key}={mid:<8} {H.fmt_num(r['mib'])} MiB "
                              f"{'fits' if r['fits'] else 'does not fit'}")
                        if r["fits"]:
                            lo, lo_res = mid, r
                        else:
                            hi = mid
                    rows.append(dict(timestamp=runner.stamp, commit=runner.commit, device=device, device_name=dev_name,
                                     threads=args.threads, torch=runner.torch_v, triton=runner.triton_v, op=op.name,
                                     provider=prov, backend=lo_res["backend"] if lo_res else "", mode=mode,
                                     dtype=dtype, fixed=O.shape_label(op, fixed) if fixed else "",
                                     batch_key=op.batch_key, budget_mib=budget_mib, largest=lo,
                                     mib_at_largest=lo_res["mib"] if lo_res else H.NAN,
                                     ms_at_largest=lo_res["ms"] if lo_res else H.NAN, first_over=hi, probes=probes,
                                     note="" if lo else "the smallest probe does not fit"))
    os.makedirs(out_dir, exist_ok=True)
    H.append_csv(os.path.join(out_dir, "largest.csv"), rows, LARGEST_COLS)
    print(render_largest(out_dir))
    return rows


def render_largest(out_dir: str) -> str:
    rows = H.latest_rows(H.read_csv(os.path.join(out_dir, "largest.csv")),
                         ["device_name", "threads", "op", "provider", "dtype", "fixed", "budget_mib"])
    hdr = ["device", "threads", "op", "shape", "dtype", "budget MiB", "provider", "largest", "MiB at it",
           "ms at it", "first over", "commit"]
    body = [[r["device_name"], r["threads"], r["op"], r["fixed"], r["dtype"], H.fmt_num(r["budget_mib"]),
             r["provider"] + (f" ({r['backend']})" if r.get("backend") else ""), f"{r['batch_key']}={r['largest']}",
             H.fmt_num(r["mib_at_largest"]), H.fmt_num(r["ms_at_largest"]), r["first_over"], r["commit"]]
            for r in rows]
    md = "\n".join(["# Largest batch within a memory budget", "",
                    "_`ssl-fast bench OP --largest-batch --mem-budget-gib X`: per provider, the largest batch whose "
                    "forward + backward (inputs + peak extra memory of one call: RSS growth on CPU, "
                    "max_memory_allocated on CUDA) fits the budget; doubling, then bisection to 1/8 of the last "
                    "step; one fresh process per probe._", "", H.md_table(hdr, body), ""])
    with open(os.path.join(out_dir, "largest.md"), "w") as f:
        f.write(md)
    return md


# ====================================================================================================


def list_ops() -> str:
    out = []
    for op in O.OPS.values():
        out.append(f"{op.name}: {op.about}")
        out.append(f"  shape: {', '.join('--' + k for k in op.shape_keys)}; modes: {', '.join(op.modes)}; dtypes: "
                   f"{', '.join(op.dtypes)}; presets: {', '.join(op.presets)}; baseline: {op.baseline}")
        for p in op.providers:
            extra = []
            if p.requires:
                extra.append(f"needs {p.requires}")
            if p.devices != ("cpu", "cuda"):
                extra.append("/".join(p.devices) + " only")
            out.append(f"    {p.name:<16} {p.about}" + (f" [{'; '.join(extra)}]" if extra else ""))
    return "\n".join(out)


def main(argv=None) -> int:
    parser = parse_args()
    args = parser.parse_args(argv)
    if args._child is not None:
        return _child_entry(args._child)
    if args.list:
        print(list_ops())
        return 0
    if args.report:
        root = os.path.abspath(args.out or RESULTS)
        print(f"rendered {report(root, plot=not args.no_plot)}")
        return 0
    if not args.op:
        parser.error("name an op (or 'all'), or pass --list / --report")
    if args.op != "all" and args.op not in O.OPS:
        parser.error(f"unknown op {args.op!r}; choose from {', '.join(O.OPS)} or all")
    load_extra_providers(args.providers_file)
    device = _resolve_device(args.device)
    dev_name = H.device_name(device)
    root = os.path.abspath(args.out or (RESULTS if args.save else os.path.join(RESULTS, "_scratch")))
    out_dir = os.path.join(root, device_slug(dev_name))
    runner = Runner(args)
    op_list = list(O.OPS.values()) if args.op == "all" else [O.OPS[args.op]]
    for op in op_list:
        if args.largest_batch:
            if op.batch_key is not None:
                largest_batch(runner, op, device, dev_name, out_dir)
            continue
        runner.run_op(op, device, dev_name, out_dir)
    if args.save:
        print(f"index {report(root, plot=not args.no_plot)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
