"""Benchmark Sinkhorn-Knopp (SwAV codes) providers side by side: time, peak memory, accuracy.

Providers: ``torch`` = SwAV's algorithm in eager torch (``ssl_fast.reference.sinkhorn_knopp_reference``:
exp without a max shift, a B x K matrix rewritten every normalization); ``torch_compile`` = torch.compile of
that function; ``lightly`` = ``lightly.loss.swav_loss.sinkhorn`` (the same algorithm, in place);
``ssl_fast`` = ``ssl_fast.sinkhorn_knopp`` with the auto backend (cpp on CPU, triton on CUDA). A library that
is not installed gives a NaN row with a note.

    python bench/bench_sinkhorn.py --preset target          # B=4096 K=3000, 3 sweeps, fp32, 2 threads (CPU)
    python bench/bench_sinkhorn.py --preset gpu             # CUDA: B 4096..65536, K 3000..65536
    python bench/bench_sinkhorn.py --b 1024 4096 --k 3000 --dtype fp32 bf16 --providers torch ssl_fast
    python bench/bench_sinkhorn.py --preset target --save   # append to bench/results/ (committed results)

Each (provider, shape, dtype) runs in a fresh child process (``bench/_harness.py``): time is the median of
``--repeats`` after a warm-up; memory is the peak above the input during one call (the returned B x K codes
included); ``process_rss_mib`` / ``first_call_ms``: the whole process's peak resident growth over its first
call and that call's time (CPU). ``gbps`` = (bytes of the scores read once + the fp32 codes written once) /
time: the one-pass bound of the GPU target. ``max_err`` = max |Q - Q_fp64| against the float64 log-domain reference on the
same (rounded) scores (NaN when the provider overflowed; not computed above 2^26 elements).
Rows go to ``bench/results/_scratch/sinkhorn.csv`` unless ``--save`` (then ``bench/results/sinkhorn.csv``);
the markdown table is rendered from the whole CSV. ``--thp`` runs every child with torch's
``THP_MEM_ALLOC_ENABLE=1`` (the ``alloc`` column says which): on CPU, every provider pays page faults for
each fresh B x K matrix (49 MB at B=4096, K=3000), which huge pages make ~4x cheaper.
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

OP = "sinkhorn"
PROVIDERS = ("torch", "torch_compile", "lightly", "ssl_fast")
OPTIONAL_MODULE = {"lightly": "lightly"}

COLUMNS = [
    "timestamp", "commit", "device", "device_name", "threads", "torch", "triton", "provider", "backend", "mode",
    "b", "k", "iterations", "epsilon", "dtype", "repeats", "median_ms", "min_ms", "peak_mem_mib", "speedup",
    "gbps", "max_err", "first_call_ms", "compile_ms", "alloc", "status", "note", "process_rss_mib",
]

PRESETS = {
    "quick": [dict(b=[1024], k=[3000], dtype=["fp32"], providers=None, repeats=3, threads=2)],
    "target": [dict(b=[4096], k=[3000], dtype=["fp32"], providers=None, repeats=7, threads=2)],
    "gpu": [dict(b=[4096, 16384, 65536], k=[3000, 65536], dtype=["fp32", "bf16"],
                 providers=["torch", "torch_compile", "ssl_fast"], repeats=20, threads=2, device="cuda")],
}
DEFAULT_JOB = dict(b=[4096], k=[3000], dtype=["fp32"], providers=None, repeats=5, threads=2)


# ====================================================================================================
# child


def _make_provider(provider: str, epsilon: float, iterations: int, device):
    import torch
    from ssl_fast import reference

    def eager(x):
        return reference.sinkhorn_knopp_reference(x, epsilon, iterations)

    if provider == "torch":
        return eager, ""
    if provider == "torch_compile":
        return torch.compile(eager), ""
    if provider == "lightly":
        from lightly.loss.swav_loss import sinkhorn
        return (lambda x: sinkhorn(x, iterations=iterations, epsilon=epsilon)), ""
    if provider == "ssl_fast":
        import ssl_fast
        from ssl_fast.ops import _backend
        return (lambda x: ssl_fast.sinkhorn_knopp(x, epsilon, iterations)), _backend.resolve(device)
    raise ValueError(f"unknown provider {provider!r}")


def child_main(spec: Dict) -> Dict:
    is_cuda = spec["device"].startswith("cuda")
    if not is_cuda:
        H.pin_malloc_to_mmap()  # before any tensor exists
    import gc

    import torch

    H.limit_memory(spec.get("mem_limit_gib"))
    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    if is_cuda:
        torch.cuda.set_device(device)
    dtype = getattr(torch, H.DTYPES[spec["dtype"]])
    b, k, iters, eps = int(spec["b"]), int(spec["k"]), int(spec["iterations"]), float(spec["epsilon"])
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)
    fn, backend = _make_provider(spec["provider"], eps, iters, device)

    # cosine scores (normalized features x normalized prototypes), as SwAV feeds them
    g = torch.Generator(device="cpu").manual_seed(0)
    z = torch.nn.functional.normalize(torch.randn(b, 128, generator=g), dim=1)
    c = torch.nn.functional.normalize(torch.randn(k, 128, generator=g), dim=1)
    x = (z @ c.t()).to(device=device, dtype=dtype)
    del z, c

    def run():
        with torch.no_grad():
            return fn(x)

    # first call; around it the whole process's resident growth (what a user's fresh process pays)
    sync()
    gc.collect()
    rss_mark = H.process_rss_mark() if not is_cuda else None
    t0 = time.perf_counter()
    out = run()
    sync()
    first_call_ms = 1e3 * (time.perf_counter() - t0)
    process_rss_mib = H.process_rss_growth_mib(rss_mark) if rss_mark is not None else H.NAN
    max_err = H.NAN
    if b * k <= (1 << 26):
        from ssl_fast import reference
        ref = reference.sinkhorn_knopp_log_reference(x.double(), eps, iters)
        max_err = float((out.double() - ref).abs().max())
        del ref
    del out
    gc.collect()
    peak = H.cuda_peak_extra_mib(run) if is_cuda else H.cpu_peak_extra_mib(run)
    gc.collect()
    repeats = int(spec["repeats"])
    if is_cuda:
        median_ms, min_ms = H.time_cuda(run, rep_ms=float(spec.get("cuda_rep_ms", 100)))
    else:
        H.malloc_steady_state()
        median_ms, min_ms = H.time_cpu(run, repeats=repeats, warmup=1)
    nbytes = b * k * (x.element_size() + 4)
    return dict(status="ok", median_ms=median_ms, min_ms=min_ms, peak_mem_mib=peak, first_call_ms=first_call_ms,
                process_rss_mib=process_rss_mib,
                compile_ms=(first_call_ms - median_ms) if spec["provider"] == "torch_compile" else H.NAN,
                gbps=nbytes / (median_ms * 1e-3) / 1e9, max_err=max_err, backend=backend, note="")


def _child_entry(payload: str) -> int:
    spec = json.loads(payload)
    try:
        result = child_main(spec)
    except ImportError as e:
        status = "unavailable" if spec["provider"] in OPTIONAL_MODULE else "error"
        result = dict(status=status, note=f"ImportError: {e}")
    except Exception as e:  # a failing provider is a NaN row, never a crash
        msg = f"{type(e).__name__}: {e}".splitlines()[0][:300]
        oom = any(s in msg.lower() for s in ("out of memory", "can't allocate memory", "cannot allocate memory"))
        result = dict(status="oom" if oom else "error", note=msg)
    H.emit_result(result)
    return 0


# ====================================================================================================
# parent


def estimate_peak_gib(provider: str, b: int, k: int) -> float:
    """Eager SwAV holds ~3 fp32 B x K matrices at once (exp, its transpose-normalized copies); ssl_fast one."""
    mats = 1.2 if provider == "ssl_fast" else 4.0
    return mats * b * k * 4 / 1024 ** 3


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", choices=sorted(PRESETS))
    p.add_argument("--b", type=int, nargs="+", help="batch size B (samples)")
    p.add_argument("--k", type=int, nargs="+", help="prototypes K")
    p.add_argument("--dtype", nargs="+", choices=["fp32", "bf16", "fp16"])
    p.add_argument("--iterations", type=int, default=3)
    p.add_argument("--epsilon", type=float, default=0.05)
    p.add_argument("--providers", nargs="+", choices=PROVIDERS)
    p.add_argument("--repeats", type=int)
    p.add_argument("--threads", type=int)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    p.add_argument("--cuda-rep-ms", type=float, default=100.0)
    p.add_argument("--thp", action="store_true",
                   help="children run with THP_MEM_ALLOC_ENABLE=1 (torch's CPU allocator asks for transparent "
                        "huge pages for blocks >= 2 MiB: fewer page faults on every fresh B x K matrix, for "
                        "every provider); recorded in the 'alloc' column")
    p.add_argument("--save", action="store_true",
                   help="append to bench/results/sinkhorn.csv (the committed results); default: the ignored "
                        "bench/results/_scratch/")
    p.add_argument("--out", default=None, help="results folder (overrides --save)")
    p.add_argument("--timeout", type=float, default=1800.0)
    p.add_argument("--mem-budget-gib", type=float, default=None,
                   help="CPU: skip a run whose estimated peak exceeds this (default half of MemAvailable)")
    p.add_argument("--warm-compile-cache", action="store_true")
    p.add_argument("--rounds", type=int, default=1, help="repeat the list, interleaving providers; median")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _jobs(args) -> List[Dict]:
    base = PRESETS[args.preset] if args.preset else [DEFAULT_JOB]
    jobs = []
    for job in base:
        job = dict(job)
        for field, value in (("b", args.b), ("k", args.k), ("dtype", args.dtype), ("providers", args.providers),
                             ("repeats", args.repeats), ("threads", args.threads)):
            if value is not None:
                job[field] = value
        if args.device != "auto":
            job["device"] = args.device
        jobs.append(job)
    return jobs


def render(out_dir: str) -> str:
    rows = H.read_csv(os.path.join(out_dir, f"{OP}.csv"))
    md = H.render_markdown(
        rows, title="Sinkhorn-Knopp (SwAV codes) providers",
        section_cols=("device_name", "threads", "dtype", "iterations", "epsilon", "alloc"), shape_cols=("b", "k"),
        provider_order=PROVIDERS,
        notes=["Time: median of repeats after warm-up. Memory: peak above the input scores during one call, "
               "the returned B x K codes included (CPU: peak RSS growth of a fresh process; CUDA: "
               "max_memory_allocated). torch = SwAV's code in eager torch; torch_compile excludes compilation. "
               "Accuracy (max_err vs float64) and gbps are in the CSV."])
    path = os.path.join(out_dir, f"{OP}.md")
    with open(path, "w") as f:
        f.write(md)
    return path


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args._child is not None:
        return _child_entry(args._child)
    import torch

    out_dir = os.path.abspath(args.out or H.results_dir(args.save))
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    commit = H.git_commit()
    torch_v, triton_v = torch.__version__, H.package_version("triton")
    avail = H.mem_available_gib()
    default_budget = 0.5 * avail if not math.isnan(avail) else 0.0
    specs = []
    for job in _jobs(args):
        device = job.get("device", "cuda" if args.device == "auto" and torch.cuda.is_available() else args.device)
        device = "cpu" if device == "auto" else device
        if device.startswith("cuda") and not torch.cuda.is_available():
            raise SystemExit("no CUDA device on this machine")
        budget = args.mem_budget_gib if args.mem_budget_gib is not None else default_budget
        for dtype in job["dtype"]:
            for b in job["b"]:
                for k in job["k"]:
                    for prov in job["providers"] or PROVIDERS:
                        specs.append(dict(provider=prov, b=b, k=k, dtype=dtype, iterations=args.iterations,
                                          epsilon=args.epsilon, device=device, threads=job["threads"],
                                          repeats=job["repeats"], cuda_rep_ms=args.cuda_rep_ms,
                                          mem_budget_gib=budget if device == "cpu" else 0.0,
                                          mem_limit_gib=budget + 2.0 if device == "cpu" and budget else 0))
    names = {s["device"]: H.device_name(s["device"]) for s in specs}
    print(f"{len(specs)} measurements; device {', '.join(names.values())}; commit {commit}; torch {torch_v}")

    def measure(s):
        prov = s["provider"]
        if prov in OPTIONAL_MODULE and importlib.util.find_spec(OPTIONAL_MODULE[prov]) is None:
            return dict(status="unavailable", note=f"{OPTIONAL_MODULE[prov]} not installed")
        est = estimate_peak_gib(prov, s["b"], s["k"])
        if s["mem_budget_gib"] and est > s["mem_budget_gib"]:
            return dict(status="skipped", note=f"estimated peak {est:.1f} GiB > budget {s['mem_budget_gib']:.1f} GiB")
        env = {"OMP_NUM_THREADS": str(s["threads"]), "MKL_NUM_THREADS": str(s["threads"])}
        if args.thp:
            env["THP_MEM_ALLOC_ENABLE"] = "1"
        tmp = None
        if not args.warm_compile_cache:
            tmp = tempfile.mkdtemp(prefix="bench_sinkhorn_cache_")
            env.update(TORCHINDUCTOR_CACHE_DIR=os.path.join(tmp, "inductor"),
                       TRITON_CACHE_DIR=os.path.join(tmp, "triton"))
        try:
            return H.run_child([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(s)], env=env,
                               timeout=args.timeout)
        finally:
            if tmp:
                shutil.rmtree(tmp, ignore_errors=True)

    results: List[List[Dict]] = [[] for _ in specs]
    for rnd in range(max(1, args.rounds)):
        for i, s in enumerate(specs):
            res = measure(s)
            results[i].append(res)
            print(f"  {s['provider']:>13} B={s['b']:<6} K={s['k']:<6} {s['dtype']}: "
                  f"{H.fmt_num(res.get('median_ms', H.NAN))} ms, {H.fmt_num(res.get('peak_mem_mib', H.NAN))} MiB, "
                  f"err {H.fmt_num(res.get('max_err', H.NAN))}"
                  + (f"  [{res.get('status')}: {res.get('note')}]" if res.get("status") != "ok" else ""), flush=True)

    rows = []
    for s, rs in zip(specs, results):
        row = {c: "" for c in COLUMNS}
        row.update(timestamp=stamp, commit=commit, device=s["device"], device_name=names[s["device"]],
                   threads=s["threads"], torch=torch_v, triton=triton_v, provider=s["provider"], mode="fwd",
                   b=s["b"], k=s["k"], iterations=s["iterations"], epsilon=s["epsilon"], dtype=s["dtype"],
                   repeats=s["repeats"], alloc="thp" if args.thp else "default")
        for c in ("median_ms", "min_ms", "peak_mem_mib", "speedup", "gbps", "max_err", "first_call_ms", "compile_ms",
                  "process_rss_mib"):
            row[c] = H.NAN
        ok = [r for r in rs if r.get("status") == "ok"]
        res = dict(ok[0] if ok else rs[-1])
        if len(ok) > 1:
            res["median_ms"] = statistics.median(r["median_ms"] for r in ok)
            res["min_ms"] = min(r["min_ms"] for r in ok)
            res["peak_mem_mib"] = statistics.median(r["peak_mem_mib"] for r in ok)
            res["note"] = f"{len(ok)}/{len(rs)} rounds"
        for key, v in res.items():
            if key in row:
                row[key] = H.NAN if v is None else v
        rows.append(row)
    ref = {(r["device"], r["b"], r["k"], r["dtype"]): r["median_ms"] for r in rows if r["provider"] == "torch"}
    for r in rows:
        t = ref.get((r["device"], r["b"], r["k"], r["dtype"]), H.NAN)
        r["speedup"] = t / r["median_ms"] if r["median_ms"] and not math.isnan(t) else H.NAN

    body = [[r["provider"] + (f" ({r['backend']})" if r["backend"] else ""), str(r["b"]), str(r["k"]), r["dtype"],
             H.fmt_num(r["median_ms"]), H.fmt_num(r["peak_mem_mib"]), H.fmt_num(r["speedup"]), H.fmt_num(r["gbps"]),
             H.fmt_num(r["max_err"]), r["note"] if r["status"] != "ok" else ""] for r in rows]
    print(H.text_table(["provider", "B", "K", "dtype", "ms", "MiB", "x vs torch", "GB/s", "max_err", "note"], body))
    csv_path = os.path.join(out_dir, f"{OP}.csv")
    H.append_csv(csv_path, rows, COLUMNS)
    print(f"\nappended {len(rows)} rows to {csv_path}\nrendered {render(out_dir)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
