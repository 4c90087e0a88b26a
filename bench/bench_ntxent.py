"""NT-Xent / InfoNCE loss providers side by side: time and peak memory, CPU and CUDA.

    python bench/bench_ntxent.py --preset quick              # the main job: tiny shapes, every provider
    python bench/bench_ntxent.py --preset target             # 2N=8192 D=128 fp32, + ssl_fast at 2N=65536
    python bench/bench_ntxent.py --preset gpu                # bf16, 2N in {16384, 65536}, D in {128, 768}
    python bench/bench_ntxent.py --n2 1024 4096 --dim 128 --dtype fp32 bf16 --modes fwd full \\
        --providers torch ssl_fast --repeats 5 --threads 2
    python bench/bench_ntxent.py --loss info_nce --preset quick
    python bench/bench_ntxent.py --largest-batch --mem-budget-gib 0.25 --dim 128 --dtype fp32   # CPU
    python bench/bench_ntxent.py --largest-batch --mem-budget-gib 80 --dim 128 --dtype bf16 --device cuda

Providers (``--loss ntxent``): ``torch`` (eager ``ssl_fast.reference.ntxent_reference``: one (2N, 2N)
logit matrix), ``torch_compile`` (``torch.compile`` of that same function; its compile time is reported in
``compile_ms`` and excluded from the timed runs), ``lightly`` (``lightly.loss.NTXentLoss``, memory bank
off), ``pml`` (``pytorch_metric_learning.losses.NTXentLoss`` on the concatenated 2N batch with pair labels),
``ssl_fast`` (``ssl_fast.ntxent``, auto backend: cpp on CPU, triton on CUDA). ``--loss info_nce``
(cross-view, symmetric: the CLIP / DirectCLR loss, N = n2 / 2 queries and keys): ``torch``,
``torch_compile``, ``ssl_fast``, ``open_clip`` (``open_clip.loss.ClipLoss`` on normalized features).
A missing optional library gives a NaN row with a note.

Modes: ``fwd`` (forward with inputs that require grad, i.e. a training forward that keeps its graph),
``bwd`` (backward only; a fresh untimed forward before each timed backward), ``full`` (forward + backward).

Every (provider, shape, dtype, mode) runs in a fresh child process (see ``bench/_harness.py``): time is the
median of ``--repeats`` after a warm-up (``triton.testing.do_bench`` on CUDA, an explicit median on CPU);
memory is the peak above the inputs (plus, in ``bwd`` mode, the saved forward graph) during one call:
``torch.cuda.max_memory_allocated`` on CUDA, peak RSS growth on CPU. Beside it, ``process_rss_mib``: the whole
process's peak resident-memory growth over its FIRST call (what a user's fresh process pays: the modules,
libraries and caches the call loads, included), with ``first_call_ms``. Rows go to ``<out>/ntxent.csv``
(``<out>`` = ``bench/results/_scratch``, ignored by git, unless ``--out DIR``; ``--save`` writes the
committed ``bench/results/``); ``<out>/ntxent.md`` and the PNG plots (``bench/plot.py``) are rendered
from the whole CSV.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import math
import os
import shutil
import statistics
import sys
import tempfile
import time
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

OP = "ntxent"
LOSSES = ("ntxent", "info_nce")
PROVIDERS = {
    "ntxent": ("torch", "torch_compile", "lightly", "pml", "ssl_fast"),
    "info_nce": ("torch", "torch_compile", "open_clip", "ssl_fast"),
}
ALL_PROVIDERS = ("torch", "torch_compile", "lightly", "pml", "open_clip", "ssl_fast")
OPTIONAL_MODULE = {"lightly": "lightly", "pml": "pytorch_metric_learning", "open_clip": "open_clip"}
MODES = ("fwd", "bwd", "full")
DEFAULT_TEMPERATURE = {"ntxent": 0.5, "info_nce": 0.1}  # the ssl_fast defaults

COLUMNS = [
    "timestamp", "commit", "device", "device_name", "threads", "torch", "triton", "loss", "provider",
    "backend", "mode", "n2", "dim", "dtype", "temperature", "repeats", "median_ms", "min_ms", "peak_mem_mib",
    "speedup", "tflops", "first_call_ms", "compile_ms", "loss_value", "status", "note", "process_rss_mib",
]

# Shapes per preset: a list of jobs; explicit CLI options override the same field in every job.
PRESETS = {
    "quick": [dict(n2=[1024, 2048], dim=[128], dtype=["fp32"], modes=["full"], providers=None, repeats=3,
                   threads=2, mem_budget_gib=4.0)],
    "target": [
        dict(n2=[8192], dim=[128], dtype=["fp32"], modes=["full"], providers=None, repeats=5, threads=2),
        dict(n2=[65536], dim=[128], dtype=["fp32"], modes=["full"], providers=["ssl_fast"], repeats=3,
             threads=2),
    ],
    "gpu": [dict(n2=[16384, 65536], dim=[128, 768], dtype=["bf16"], modes=list(MODES),
                 providers=["torch", "torch_compile", "ssl_fast"], repeats=20, threads=2, device="cuda")],
}
DEFAULT_JOB = dict(n2=[1024], dim=[128], dtype=["fp32"], modes=list(MODES), providers=None, repeats=5, threads=2)


# ====================================================================================================
# child: one measurement


def _nominal_flops(loss: str, n2: int, dim: int, mode: str) -> float:
    """Useful matmul flops: the logit matrix once in the forward, twice in the backward (dZ from the
    probabilities, one recompute or re-read of the logits each way). NT-Xent: (2N)^2 logits;
    cross-view InfoNCE: N^2 logits with N = n2 / 2."""
    m = n2 if loss == "ntxent" else n2 // 2
    fwd = 2.0 * m * m * dim
    return {"fwd": fwd, "bwd": 2 * fwd, "full": 3 * fwd}[mode]


def estimate_peak_gib(loss: str, provider: str, n2: int, dim: int, dtype: str) -> float:
    """A rough upper estimate of one call's peak memory, to skip runs that cannot fit (CPU).

    pytorch-metric-learning's NTXentLoss is CUBIC in 2N: ``_compute_loss`` builds a (2N, 2N(2N-2)) mask
    ``n_per_p`` in the embedding dtype, a masked copy of the negatives and their exp (measured: 17 GiB
    at 2N=1024 fp32). The eager providers hold a few (2N)^2 logit-sized matrices; ssl_fast is linear.
    """
    elem = {"fp32": 4, "bf16": 2, "fp16": 2, "fp64": 8}[dtype]
    if provider == "pml":
        return n2 * n2 * max(n2 - 2, 1) * (4 * elem + 1) / 1024 ** 3
    if provider == "ssl_fast":
        return (16 * n2 * dim * 4 + (64 << 20)) / 1024 ** 3
    return 8 * n2 * n2 * max(elem, 4) / 1024 ** 3


def _make_provider(loss: str, provider: str, temperature: float, n: int, device):
    """Returns (fn(a, b) -> 0-dim loss, backend note). Raises ImportError for a missing library."""
    import torch
    import torch.nn.functional as F
    from ssl_fast import reference

    if loss == "ntxent":
        def eager(a, b):
            return reference.ntxent_reference(a, b, temperature)
    else:
        def eager(a, b):
            return reference.info_nce_reference(a, b, temperature, symmetric=True)

    if provider == "torch":
        return eager, ""
    if provider == "torch_compile":
        return torch.compile(eager), ""
    if provider == "ssl_fast":
        import ssl_fast
        from ssl_fast.ops import _backend
        backend = _backend.resolve(device)
        if loss == "ntxent":
            return (lambda a, b: ssl_fast.ntxent(a, b, temperature)), backend
        return (lambda a, b: ssl_fast.info_nce(a, b, temperature, symmetric=True)), backend
    if provider == "lightly" and loss == "ntxent":
        from lightly.loss import NTXentLoss
        crit = NTXentLoss(temperature=temperature, memory_bank_size=0)
        return (lambda a, b: crit(a, b)), ""
    if provider == "pml" and loss == "ntxent":
        from pytorch_metric_learning.losses import NTXentLoss
        crit = NTXentLoss(temperature=temperature)
        labels = torch.arange(n, device=device).repeat(2)
        return (lambda a, b: crit(torch.cat([a, b], dim=0), labels)), ""
    if provider == "open_clip" and loss == "info_nce":
        from open_clip.loss import ClipLoss
        crit = ClipLoss()
        scale = torch.tensor(1.0 / temperature, device=device)
        return (lambda a, b: crit(F.normalize(a, dim=1), F.normalize(b, dim=1), scale)), ""
    raise ValueError(f"provider {provider!r} does not serve loss {loss!r}")


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
    dtype = getattr(torch, H.DTYPES[spec["dtype"]])
    n2, dim, mode = int(spec["n2"]), int(spec["dim"]), spec["mode"]
    if n2 % 2:
        raise ValueError(f"--n2 must be even (2N anchors), got {n2}")
    n = n2 // 2
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    fn, backend = _make_provider(spec["loss"], spec["provider"], float(spec["temperature"]), n, device)
    torch.manual_seed(0)
    a = torch.randn(n, dim, device=device, dtype=dtype, requires_grad=True)
    b = torch.randn(n, dim, device=device, dtype=dtype, requires_grad=True)
    held: Dict = {}

    def clear_grads():
        a.grad = None
        b.grad = None

    if mode == "fwd":
        prep = None

        def run():
            return fn(a, b)
    elif mode == "full":
        prep = clear_grads

        def run():
            fn(a, b).backward()
    else:  # bwd: a fresh untimed forward before each timed backward (torch.compile forbids retain_graph)
        def prep():
            clear_grads()
            held["loss"] = fn(a, b)

        def run():
            held.pop("loss").backward()

    # First call: compiles (torch.compile, triton JIT / autotune) and gives the loss value. Around it, the
    # whole process's resident-memory growth: what a user's fresh process pays (modules, libraries, caches).
    sync()
    gc.collect()
    rss_mark = H.process_rss_mark()
    t0 = time.perf_counter()
    clear_grads()
    loss = fn(a, b)
    if mode != "fwd":
        loss.backward()
    sync()
    first_call_ms = 1e3 * (time.perf_counter() - t0)
    process_rss_mib = H.process_rss_growth_mib(rss_mark)
    loss_value = float(loss.detach().float())
    del loss
    clear_grads()

    # Memory first (the CPU child is still in its pinned-malloc state), then time.
    gc.collect()
    peak = H.cuda_peak_extra_mib(run, prep) if is_cuda else H.cpu_peak_extra_mib(run, prep)
    held.clear()
    if spec.get("memory_only"):  # a largest-batch probe: memory is the answer, the first call gave the time
        return dict(status="ok", median_ms=first_call_ms, min_ms=first_call_ms, peak_mem_mib=peak,
                    first_call_ms=first_call_ms, process_rss_mib=process_rss_mib, compile_ms=H.NAN, tflops=H.NAN,
                    loss_value=loss_value, backend=backend, note="")
    clear_grads()
    gc.collect()
    repeats = int(spec["repeats"])
    if is_cuda:
        median_ms, min_ms = H.time_cuda(run, prep, rep_ms=float(spec.get("cuda_rep_ms", 100)), samples=repeats,
                                        grad_to_none=[a, b] if mode == "full" else None)
    else:
        H.malloc_steady_state()
        median_ms, min_ms = H.time_cpu(run, prep, repeats=repeats, warmup=1)
    held.clear()

    flops = _nominal_flops(spec["loss"], n2, dim, mode)
    return dict(status="ok", median_ms=median_ms, min_ms=min_ms, peak_mem_mib=peak, first_call_ms=first_call_ms,
                process_rss_mib=process_rss_mib,
                compile_ms=(first_call_ms - median_ms) if spec["provider"] == "torch_compile" else H.NAN,
                tflops=flops / (median_ms * 1e-3) / 1e12, loss_value=loss_value, backend=backend, note="")


def _child_entry(payload: str) -> int:
    spec = json.loads(payload)
    try:
        result = child_main(spec)
    except ImportError as e:
        if spec["provider"] in OPTIONAL_MODULE:
            result = dict(status="unavailable", note=f"not installed: {e}")
        else:
            result = dict(status="error", note=f"ImportError: {e}")
    except Exception as e:  # a provider that fails is a NaN row with the error, never a crash
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        oom = any(s in msg.lower() for s in ("out of memory", "can't allocate memory", "cannot allocate memory"))
        result = dict(status="oom" if oom else "error", note=msg)
    H.emit_result(result)
    return 0


# ====================================================================================================
# parent: expand specs, run children, write results


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS), help="a predefined set of shapes (see PRESETS)")
    p.add_argument("--loss", choices=LOSSES, default="ntxent")
    p.add_argument("--n2", type=int, nargs="+", help="2N: total anchors (two views of N samples)")
    p.add_argument("--dim", type=int, nargs="+", help="feature dimension D")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--modes", nargs="+", choices=MODES)
    p.add_argument("--providers", nargs="+", choices=ALL_PROVIDERS)
    p.add_argument("--repeats", type=int,
                   help="timed samples on CPU (median); on CUDA the bwd mode's minimum sample count (fwd/full "
                        "use do_bench's time budget, --cuda-rep-ms)")
    p.add_argument("--cuda-rep-ms", type=float, default=100.0, help="do_bench measurement budget in ms")
    p.add_argument("--threads", type=int, help="torch.set_num_threads in the children (default 2)")
    p.add_argument("--temperature", type=float, help="default 0.5 for ntxent, 0.1 for info_nce")
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K (auto: cuda when present)")
    p.add_argument("--out", default=None,
                   help="results folder (default bench/results/_scratch, ignored by git: a user's runs leave the "
                        "checkout clean)")
    p.add_argument("--save", action="store_true",
                   help="append to the committed results in bench/results/ (the project's saved measurements)")
    p.add_argument("--timeout", type=float, default=1800.0, help="seconds per child before a NaN row")
    p.add_argument("--mem-budget-gib", type=float, default=None,
                   help="CPU: skip (NaN row) a run whose estimated peak exceeds this, and cap each child's "
                        "data segment at budget + 2 GiB so an allocation beyond it fails cleanly "
                        "(default: half of MemAvailable, the quick preset 4; 0 = no budget)")
    p.add_argument("--warm-compile-cache", action="store_true",
                   help="use the user's inductor/triton caches (default: a fresh cache per child, so "
                        "compile_ms is a cold compile)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list this many times, interleaving providers (noisy machines); "
                        "a row then holds the median of the rounds' medians")
    p.add_argument("--no-plot", action="store_true", help="skip the PNG plots")
    p.add_argument("--largest-batch", action="store_true",
                   help="instead of timing: the largest 2N whose fwd+bwd (inputs + peak extra memory) fits in "
                        "--mem-budget-gib, per provider (torch and ssl_fast by default); rows go to "
                        "<out>/ntxent_largest.csv and .md")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _jobs(args) -> List[Dict]:
    base = PRESETS[args.preset] if args.preset else [DEFAULT_JOB]
    jobs = []
    for job in base:
        job = dict(job)
        for field, value in (("n2", args.n2), ("dim", args.dim), ("dtype", args.dtype), ("modes", args.modes),
                             ("providers", args.providers), ("repeats", args.repeats),
                             ("threads", args.threads)):
            if value is not None:
                job[field] = value
        if args.device != "auto":
            job["device"] = args.device
        jobs.append(job)
    return jobs


def _resolve_device(requested: str) -> str:
    import torch
    if requested == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if requested.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit(f"--device {requested}: no CUDA device on this machine")
    return requested


def _speedups(rows: List[Dict]) -> None:
    """speedup = torch eager ms / provider ms, same loss / shape / dtype / mode, same run."""
    ref = {(r["loss"], r["n2"], r["dim"], r["dtype"], r["mode"], r["device"]): r["median_ms"]
           for r in rows if r["provider"] == "torch"}
    for r in rows:
        t = ref.get((r["loss"], r["n2"], r["dim"], r["dtype"], r["mode"], r["device"]), H.NAN)
        r["speedup"] = t / r["median_ms"] if r["median_ms"] and not math.isnan(t) else H.NAN


def _loss_tolerance(dtype: str) -> float:
    return 1e-3 if dtype == "fp32" else 5e-2


def _summary(rows: List[Dict]) -> str:
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault((r["loss"], r["device"], r["dtype"], r["n2"], r["dim"], r["mode"]), []).append(r)
    out = []
    for (loss, device, dtype, n2, dim, mode), grp in groups.items():
        fast = next((r for r in grp if r["provider"] == "ssl_fast"), None)
        ref = next((r for r in grp if r["provider"] == "torch"), None)
        body = []
        for r in grp:
            ssl_vs = H.NAN
            mem_vs = H.NAN
            if fast is not None and fast is not r and fast["median_ms"] == fast["median_ms"]:
                ssl_vs = r["median_ms"] / fast["median_ms"]
                if fast["peak_mem_mib"] > 0:
                    mem_vs = r["peak_mem_mib"] / fast["peak_mem_mib"]
            note = r["note"]
            if r["status"] == "ok" and ref is not None and r is not ref and ref["status"] == "ok":
                rel = abs(r["loss_value"] - ref["loss_value"]) / max(abs(ref["loss_value"]), 1e-12)
                if rel > _loss_tolerance(dtype):
                    note = (note + "; " if note else "") + f"LOSS DIFFERS from torch by {rel:.1e}"
            if r["provider"] == "torch_compile" and r["status"] == "ok":
                note = (note + "; " if note else "") + f"compile {r['compile_ms'] / 1e3:.1f} s"
            body.append([r["provider"] + (f" ({r['backend']})" if r["backend"] else ""), H.fmt_num(r["median_ms"]),
                         H.fmt_num(r["peak_mem_mib"]), H.fmt_num(r["speedup"]),
                         "" if r is fast else H.fmt_num(ssl_vs), "" if r is fast else H.fmt_num(mem_vs),
                         H.fmt_num(r["tflops"]), H.fmt_num(r.get("process_rss_mib", H.NAN)),
                         H.fmt_num(r["first_call_ms"]), H.fmt_num(r["loss_value"], 6), note])
        out.append(f"\n{loss}  2N={n2}  D={dim}  {dtype}  mode={mode}  [{device}]")
        out.append(H.text_table(["provider", "ms", "MiB", "x vs torch", "ssl_fast x faster", "ssl_fast x less mem",
                                 "TFLOP/s", "process MiB", "1st call ms", "loss", "note"], body))
    return "\n".join(out)


def render(out_dir: str) -> str:
    """(Re)write ``<out>/ntxent.md`` from ``<out>/ntxent.csv``; returns the markdown path."""
    rows = H.read_csv(os.path.join(out_dir, f"{OP}.csv"))
    md = H.render_markdown(
        rows, title="NT-Xent / InfoNCE loss providers", section_cols=("device_name", "threads", "loss", "dtype"),
        shape_cols=("n2", "dim"), provider_order=ALL_PROVIDERS,
        notes=["Time: median of repeats after warm-up (do_bench on CUDA, explicit median on CPU). Memory: peak "
               "above the inputs during one call (max_memory_allocated on CUDA, peak RSS growth of a fresh "
               "process on CPU); in `bwd` mode above the inputs plus the saved forward graph. "
               "`fwd` = forward with inputs that require grad; `full` = forward + backward. "
               "torch_compile times exclude compilation (see compile_ms in the CSV). nan = not run "
               "(see the notes)."])
    path = os.path.join(out_dir, f"{OP}.md")
    with open(path, "w") as f:
        f.write(md)
    return path


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args._child is not None:
        return _child_entry(args._child)
    if args.largest_batch:
        return largest_batch_main(args)

    import torch

    jobs = _jobs(args)
    loss = args.loss
    temperature = args.temperature if args.temperature is not None else DEFAULT_TEMPERATURE[loss]
    out_dir = os.path.abspath(args.out or H.results_dir(save=args.save))
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    commit = H.git_commit()
    torch_v, triton_v = torch.__version__, H.package_version("triton")
    avail = H.mem_available_gib()
    default_budget = 0.5 * avail if not math.isnan(avail) else 0.0

    specs = []
    for job in jobs:
        device = _resolve_device(job.get("device", args.device))
        providers = job["providers"] or list(PROVIDERS[loss])
        for prov in [p for p in providers if p not in PROVIDERS[loss]]:
            print(f"note: provider {prov} has no {loss} loss; skipped", file=sys.stderr)
        providers = [p for p in providers if p in PROVIDERS[loss]]
        budget = args.mem_budget_gib if args.mem_budget_gib is not None else job.get("mem_budget_gib",
                                                                                       default_budget)
        for dtype in job["dtype"]:
            for n2 in job["n2"]:
                for dim in job["dim"]:
                    for mode in job["modes"]:
                        for prov in providers:
                            specs.append(dict(loss=loss, provider=prov, mode=mode, n2=n2, dim=dim, dtype=dtype,
                                              device=device, threads=job["threads"], repeats=job["repeats"],
                                              temperature=temperature, cuda_rep_ms=args.cuda_rep_ms,
                                              mem_budget_gib=budget if device == "cpu" else 0.0,
                                              mem_limit_gib=budget + 2.0 if device == "cpu" and budget else 0))
    names = {}
    for s in specs:
        if s["device"] not in names:
            names[s["device"]] = H.device_name(s["device"])

    try:
        from tqdm import tqdm
        bar = tqdm(total=len(specs) * max(1, args.rounds), desc="bench ntxent", unit="run", file=sys.stderr, dynamic_ncols=True)
        say = bar.write
    except ImportError:  # tqdm is optional
        bar, say = None, print
    say(f"{len(specs)} measurements, one child process each; device: "
        f"{', '.join(names.values())}; commit {commit}; torch {torch_v}; triton {triton_v or '-'}")

    def measure(s: Dict) -> Dict:
        prov = s["provider"]
        if prov in OPTIONAL_MODULE and importlib.util.find_spec(OPTIONAL_MODULE[prov]) is None:
            return dict(status="unavailable", note=f"{OPTIONAL_MODULE[prov]} not installed")
        est = estimate_peak_gib(loss, prov, s["n2"], s["dim"], s["dtype"])
        if s["mem_budget_gib"] and est > s["mem_budget_gib"]:
            return dict(status="skipped", note=f"estimated peak {est:.0f} GiB > budget {s['mem_budget_gib']:.0f} GiB "
                                               f"(--mem-budget-gib)" + ("; pml's NTXentLoss is cubic in 2N"
                                                                         if prov == "pml" else ""))
        env = {"OMP_NUM_THREADS": str(s["threads"]), "MKL_NUM_THREADS": str(s["threads"])}
        tmp = None
        if not args.warm_compile_cache:
            tmp = tempfile.mkdtemp(prefix="bench_ntxent_cache_")
            env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                       TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
        try:
            return H.run_child([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(s)],
                               env=env, timeout=args.timeout)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    # Rounds interleave the providers in time: on a busy machine a burst of load then hits one round of
    # every provider rather than every round of one. Per spec: median of the rounds' medians, min of mins.
    rounds = max(1, args.rounds)
    results: List[List[Dict]] = [[] for _ in specs]
    for rnd in range(rounds):
        for i, s in enumerate(specs):
            res = measure(s)
            results[i].append(res)
            say(f"  {s['provider']:>13} {s['mode']:>4} 2N={s['n2']:<6} D={s['dim']:<4} {s['dtype']}"
                + (f" (round {rnd + 1}/{rounds})" if rounds > 1 else "") + ": "
                f"{H.fmt_num(res.get('median_ms', H.NAN))} ms, {H.fmt_num(res.get('peak_mem_mib', H.NAN))} MiB"
                + (f"  [{res.get('status')}: {res.get('note')}]" if res.get("status") != "ok" else ""))
            if bar is not None:
                bar.update(1)
    if bar is not None:
        bar.close()

    rows = []
    for s, rs in zip(specs, results):
        row = dict(timestamp=stamp, commit=commit, device=s["device"], device_name=names[s["device"]],
                   threads=s["threads"], torch=torch_v, triton=triton_v, loss=loss, provider=s["provider"],
                   backend="", mode=s["mode"], n2=s["n2"], dim=s["dim"], dtype=s["dtype"],
                   temperature=temperature, repeats=s["repeats"], median_ms=H.NAN, min_ms=H.NAN,
                   peak_mem_mib=H.NAN, speedup=H.NAN, tflops=H.NAN, first_call_ms=H.NAN, compile_ms=H.NAN,
                   process_rss_mib=H.NAN,
                   loss_value=H.NAN, status="", note="")
        ok = [r for r in rs if r.get("status") == "ok"]
        res = dict(rs[-1] if not ok else ok[0])
        if len(ok) > 1:
            med = statistics.median(r["median_ms"] for r in ok)
            res.update(median_ms=med, min_ms=min(r["min_ms"] for r in ok),
                       peak_mem_mib=statistics.median(r["peak_mem_mib"] for r in ok),
                       first_call_ms=statistics.median(r["first_call_ms"] for r in ok),
                       process_rss_mib=statistics.median(r["process_rss_mib"] for r in ok),
                       tflops=ok[0]["tflops"] * ok[0]["median_ms"] / med)
            if s["provider"] == "torch_compile":
                res["compile_ms"] = statistics.median(r["compile_ms"] for r in ok)
            res["note"] = f"{len(ok)}/{len(rs)} rounds"
        elif ok and len(rs) > 1:
            res["note"] = f"1/{len(rs)} rounds ok; " + "; ".join(r.get("note", "") for r in rs if r is not ok[0])
        for k, v in res.items():
            if k in row:
                row[k] = H.NAN if v is None else v
        rows.append(row)

    _speedups(rows)
    csv_path = os.path.join(out_dir, f"{OP}.csv")
    H.append_csv(csv_path, rows, COLUMNS)
    md_path = render(out_dir)
    print(_summary(rows))
    print(f"\nappended {len(rows)} rows to {csv_path}\nrendered {md_path}")
    if not args.no_plot:
        try:
            import plot
            for path in plot.plot_csv(csv_path, out_dir):
                print(f"plot {path}")
        except Exception as e:  # plots are a convenience; the CSV is the result
            print(f"plots skipped: {type(e).__name__}: {e}")
    return 0


# ====================================================================================================
# largest batch: the largest 2N whose forward + backward fits a memory budget

LARGEST_COLUMNS = ["timestamp", "commit", "device", "device_name", "threads", "torch", "loss", "provider", "backend",
                   "dim", "dtype", "budget_mib", "largest_n2", "mib_at_largest", "ms_at_largest", "first_fail_n2",
                   "probes", "note"]


def _probe(args, loss, provider, n2, dim, dtype, device, threads, temperature, budget_mib) -> Dict:
    """One fresh child, fwd+bwd at 2N: {fits, mib (inputs + peak extra), ms, backend, note}."""
    spec = dict(loss=loss, provider=provider, mode="full", n2=n2, dim=dim, dtype=dtype, device=device,
                threads=threads, repeats=1, temperature=temperature, cuda_rep_ms=args.cuda_rep_ms,
                memory_only=True, mem_limit_gib=(budget_mib / 1024 + 1.0) if device == "cpu" else 0)
    env = {"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)}
    res = H.run_child([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)], env=env,
                      timeout=args.timeout)
    elem = {"fp32": 4, "bf16": 2, "fp16": 2}[dtype]
    inputs_mib = n2 * dim * elem / H.MIB  # the two (N, D) views
    if res.get("status") != "ok":
        return dict(fits=False, mib=H.NAN, ms=H.NAN, backend="", note=f"{res.get('status')}: {res.get('note')}")
    mib = inputs_mib + float(res["peak_mem_mib"])
    return dict(fits=mib <= budget_mib, mib=mib, ms=float(res["median_ms"]), backend=res.get("backend", ""),
                note="")


def largest_batch(args, loss, provider, dim, dtype, device, threads, temperature, budget_mib, say) -> Dict:
    """Doubling from 2N = 256 until a probe does not fit, then bisection to 1/8 of the last doubling step
    (2N kept a multiple of 64)."""
    probes, lo, lo_res, hi = 0, 0, None, None
    n2 = 256
    while hi is None:
        r = _probe(args, loss, provider, n2, dim, dtype, device, threads, temperature, budget_mib)
        probes += 1
        say(f"  {provider:>9} 2N={n2:<8} {H.fmt_num(r['mib'])} MiB {'fits' if r['fits'] else 'does not fit'}"
            + (f" [{r['note']}]" if r["note"] else ""))
        if r["fits"]:
            lo, lo_res, n2 = n2, r, n2 * 2
        else:
            hi = n2
    step = max(64, (hi - lo) // 8)
    while hi - lo > step and lo:
        mid = (lo + hi) // 2 // 64 * 64
        r = _probe(args, loss, provider, mid, dim, dtype, device, threads, temperature, budget_mib)
        probes += 1
        say(f"  {provider:>9} 2N={mid:<8} {H.fmt_num(r['mib'])} MiB {'fits' if r['fits'] else 'does not fit'}")
        if r["fits"]:
            lo, lo_res = mid, r
        else:
            hi = mid
    return dict(largest_n2=lo, mib_at_largest=lo_res["mib"] if lo_res else H.NAN,
                ms_at_largest=lo_res["ms"] if lo_res else H.NAN, first_fail_n2=hi, probes=probes,
                backend=lo_res["backend"] if lo_res else "", note="" if lo else "2N = 256 does not fit")


def largest_batch_main(args) -> int:
    import torch

    loss = args.loss
    temperature = args.temperature if args.temperature is not None else DEFAULT_TEMPERATURE[loss]
    device = _resolve_device(args.device)
    budget_gib = args.mem_budget_gib if args.mem_budget_gib is not None else (0.25 if device == "cpu" else 80.0)
    budget_mib = budget_gib * 1024
    providers = [p for p in (args.providers or ["torch", "ssl_fast"]) if p in PROVIDERS[loss]]
    threads = args.threads or 2
    out_dir = os.path.abspath(args.out or H.results_dir(save=args.save))
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    base = dict(timestamp=stamp, commit=H.git_commit(), device=device, device_name=H.device_name(device),
                threads=threads, torch=torch.__version__, loss=loss, budget_mib=budget_mib)
    rows = []
    for dtype in args.dtype or ["fp32"]:
        for dim in args.dim or [128]:
            for prov in providers:
                print(f"largest batch: {prov} {loss} D={dim} {dtype}, budget {budget_mib:.0f} MiB on {device}")
                res = largest_batch(args, loss, prov, dim, dtype, device, threads, temperature, budget_mib, print)
                rows.append(dict(base, provider=prov, dim=dim, dtype=dtype, **res))
    csv_path = os.path.join(out_dir, f"{OP}_largest.csv")
    H.append_csv(csv_path, rows, LARGEST_COLUMNS)
    all_rows = H.latest_rows(H.read_csv(csv_path), ["device_name", "threads", "loss", "provider", "dim", "dtype",
                                                    "budget_mib"])
    hdr = ["device", "threads", "loss", "D", "dtype", "budget MiB", "provider", "largest 2N", "MiB at it",
           "fwd+bwd ms at it", "first 2N over", "commit"]
    body = [[r["device_name"], r["threads"], r["loss"], r["dim"], r["dtype"], H.fmt_num(r["budget_mib"]),
             r["provider"] + (f" ({r['backend']})" if r.get("backend") else ""), r["largest_n2"],
             H.fmt_num(r["mib_at_largest"]), H.fmt_num(r["ms_at_largest"]), r["first_fail_n2"], r["commit"]]
            for r in all_rows]
    md = ["# Largest batch within a memory budget", "",
          "_bench/bench_ntxent.py --largest-batch: the largest 2N (two views of N rows) whose forward + backward "
          "fits the budget (inputs + peak extra memory of one call: RSS growth on CPU, max_memory_allocated on "
          "CUDA), doubling then bisecting to 1/8 of the last step; one fresh process per probe._", "",
          H.md_table(hdr, body), ""]
    md_path = os.path.join(out_dir, f"{OP}_largest.md")
    with open(md_path, "w") as f:
        f.write("\n".join(md))
    print(H.md_table(hdr, body))
    print(f"\nappended {len(rows)} rows to {csv_path}\nrendered {md_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
