"""Benchmark of the EMA teacher update over real models' parameter lists: every provider side by side.

    python bench/bench_ema.py                              # CPU (or CUDA when present), ResNet-50 + ViT-B/16
    python bench/bench_ema.py --models resnet50 --dtypes fp32 fp32-bf16 --threads 2 --repeats 15
    python bench/bench_ema.py --save                       # also append the rows to bench/results/ema.csv

Parameter lists: the shapes of torchvision's ``resnet50`` (161 tensors, 25.56M parameters) and ``vit_b_16``
(152 tensors, 86.57M), built on the meta device, then allocated as random tensors (``tiny``: 7 small
tensors, for the smoke test). Dtypes: ``fp32`` / ``bf16`` / ``fp16`` (ema and online weights in that dtype)
and ``fp32-bf16`` / ``fp32-fp16`` (an fp32 EMA of 16-bit online weights).

Providers, one update ``ema <- m ema + (1 - m) online`` (m = 0.996) per call:
  loop            the per-parameter loop of reference code: ``e.mul_(m).add_(o, alpha=1 - m)``
  foreach_lerp    ``torch._foreach_lerp_(ema, online, 1 - m)`` (online converted first when dtypes differ:
                  it needs equal dtypes; the conversion is timed, as a user would pay it)
  lightly         ``lightly.models.utils.update_momentum`` (``_foreach_mul_`` + ``_foreach_add_``)
  timm            ``timm.utils.ModelEmaV3.update`` (NaN row when timm is not installed)
  ssl_fast_cpp    ``ssl_fast.ema_update_`` with the compiled kernels (CPU; CUDA when built with CUDA)
  ssl_fast_triton ``ssl_fast.ema_update_`` with the Triton kernel (CUDA only)
  ssl_fast_torch  ``ssl_fast.ema_update_`` with the torch backend (``_foreach_lerp_`` per dtype group)

Each (model, dtype, provider) runs in a fresh child process (bench/_harness.py): peak extra memory of one
call first (RSS growth on CPU, max_memory_allocated on CUDA), then the median time over repeats after
warm-up. GB/s = the bytes an update must move (read ema + online, write ema: numel x (2 sizeof(ema) +
sizeof(online))) / time, for every provider alike (so a provider that moves more bytes shows a lower
figure); ``copy_gbps`` is the same child's ``dst.copy_(src)`` over a buffer of the ema list's size
(bytes read + written / time), the attainable streaming bandwidth, and ``pct_copy`` = gbps / copy_gbps.

Output: ``ema.csv`` + ``ema.md`` (+ ``ema_<device>_t<threads>.png``) in ``bench/results/_scratch/`` (ignored
by git) unless ``--out DIR``; ``--save`` also appends the rows to ``bench/results/ema.csv`` (committed
results) and re-renders ``bench/results/ema.md``.
"""

from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import re
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

OP = "ema"
HERE = os.path.dirname(os.path.abspath(__file__))
RESULTS = os.path.join(HERE, "results")
SCRATCH = os.path.join(RESULTS, "_scratch")
MODELS = ("resnet50", "vit_b_16", "tiny")
DTYPE_SETTINGS = {"fp32": ("fp32", "fp32"), "bf16": ("bf16", "bf16"), "fp16": ("fp16", "fp16"),
                  "fp32-bf16": ("fp32", "bf16"), "fp32-fp16": ("fp32", "fp16")}
PROVIDERS = ("loop", "foreach_lerp", "lightly", "timm", "ssl_fast_cpp", "ssl_fast_triton", "ssl_fast_torch")
OPTIONAL_MODULE = {"lightly": "lightly", "timm": "timm"}
MOMENTUM = 0.996
COLUMNS = [
    "timestamp", "commit", "device", "device_name", "threads", "torch", "triton", "model", "n_tensors", "n_params",
    "dtype", "mode", "provider", "backend", "repeats", "median_ms", "min_ms", "peak_mem_mib", "speedup", "gbps",
    "copy_gbps", "pct_copy", "status", "note",
]


# ====================================================================================================
# child: one measurement


def param_shapes(model: str) -> List[tuple]:
    """The parameter shapes of a torchvision model (built on the meta device: nothing is allocated)."""
    if model == "tiny":
        return [(), (1,), (7,), (33, 17), (64, 3, 3, 3), (5000,), (1000, 10)]
    import torch
    import torchvision

    with torch.device("meta"):
        net = getattr(torchvision.models, model)()
    return [tuple(p.shape) for p in net.parameters()]


def _modules(ema, online):
    """Two modules whose parameters() are the given lists (lightly's and timm's APIs take modules)."""
    from torch import nn

    def wrap(tensors):
        m = nn.Module()
        m.params = nn.ParameterList([nn.Parameter(t, requires_grad=False) for t in tensors])
        return m

    return wrap(ema), wrap(online)


def _make_provider(provider: str, ema, online, device):
    """Returns (run() -> None, backend note). Raises ImportError for a missing library."""
    import torch

    m = MOMENTUM
    if provider == "loop":
        def run():
            for e, o in zip(ema, online):
                e.mul_(m).add_(o, alpha=1.0 - m)
        return run, ""
    if provider == "foreach_lerp":
        same = all(e.dtype == o.dtype for e, o in zip(ema, online))

        def run():
            src = online if same else [o.to(e.dtype) for e, o in zip(ema, online)]
            torch._foreach_lerp_(ema, src, 1.0 - m)
        return run, "" if same else "online converted to the ema dtype each call"
    if provider == "lightly":
        from lightly.models.utils import update_momentum
        model_ema, model = _modules(ema, online)
        return (lambda: update_momentum(model, model_ema, m)), ""
    if provider == "timm":
        from timm.utils import ModelEmaV3
        model_ema, model = _modules(ema, online)
        ema_obj = ModelEmaV3(model, decay=m)
        ema_obj.module = model_ema
        return (lambda: ema_obj.update(model)), ""
    if provider.startswith("ssl_fast_"):
        import ssl_fast
        from ssl_fast.ops import ema as ops

        backend = provider[len("ssl_fast_"):]
        resolved = ops._resolve(device, backend)  # raises when this backend cannot serve the device

        def run():
            ops.ema_update_(ema, online, m, backend=backend)
        _ = ssl_fast
        return run, resolved
    raise ValueError(f"unknown provider {provider!r}")


def child_main(spec: Dict) -> Dict:
    is_cuda = spec["device"].startswith("cuda")
    if not is_cuda:
        H.pin_malloc_to_mmap()  # before any tensor exists: see _harness.pin_malloc_to_mmap

    import gc

    import torch

    torch.set_num_threads(int(spec["threads"]))
    device = torch.device(spec["device"])
    if is_cuda:
        torch.cuda.set_device(device)
    e_name, o_name = DTYPE_SETTINGS[spec["dtype"]]
    edt, odt = (getattr(torch, H.DTYPES[n]) for n in (e_name, o_name))
    if spec["provider"] == "ssl_fast_triton" and not is_cuda:
        return dict(status="unavailable", note="the Triton kernel runs on CUDA (the CPU interpreter is for tests)")
    shapes = param_shapes(spec["model"])
    torch.manual_seed(0)
    ema = [torch.randn(s, device=device).to(edt) for s in shapes]
    online = [torch.randn(s, device=device).to(odt) for s in shapes]
    numel = sum(e.numel() for e in ema)
    nbytes = numel * (2 * ema[0].element_size() + online[0].element_size())
    sync = torch.cuda.synchronize if is_cuda else (lambda: None)

    run, backend = _make_provider(spec["provider"], ema, online, device)
    run()  # warm-up: JIT, tables, allocator
    sync()
    gc.collect()
    peak = H.cuda_peak_extra_mib(run) if is_cuda else H.cpu_peak_extra_mib(run)
    repeats = int(spec["repeats"])
    if is_cuda:
        median_ms, min_ms = H.time_cuda(run, rep_ms=float(spec.get("cuda_rep_ms", 100)), samples=repeats)
    else:
        H.malloc_steady_state()
        median_ms, min_ms = H.time_cpu(run, repeats=repeats, warmup=2)

    # attainable streaming bandwidth in this process: one copy over a buffer of the ema list's size
    flat = torch.empty(numel, dtype=edt, device=device)
    dst = torch.empty_like(flat)
    copy_run = lambda: dst.copy_(flat)  # noqa: E731
    copy_ms = (H.time_cuda(copy_run, rep_ms=50.0)[0] if is_cuda else H.time_cpu(copy_run, repeats=repeats)[0])
    copy_gbps = 2 * flat.numel() * flat.element_size() / (copy_ms * 1e-3) / 1e9
    gbps = nbytes / (median_ms * 1e-3) / 1e9
    return dict(status="ok", median_ms=median_ms, min_ms=min_ms, peak_mem_mib=peak, gbps=gbps, copy_gbps=copy_gbps,
                pct_copy=100.0 * gbps / copy_gbps, backend=backend, n_tensors=len(ema), n_params=numel, note="")


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
        result = dict(status="oom" if "out of memory" in msg.lower() else "error", note=msg)
    H.emit_result(result)
    return 0


# ====================================================================================================
# parent


def _parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--models", nargs="+", choices=MODELS, default=["resnet50", "vit_b_16"])
    p.add_argument("--dtypes", nargs="+", choices=sorted(DTYPE_SETTINGS), default=["fp32", "bf16", "fp32-bf16"])
    p.add_argument("--providers", nargs="+", choices=PROVIDERS, default=None,
                   help="default: every provider that can run on the device")
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--cuda-rep-ms", type=float, default=100.0)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--device", default="auto", help="auto | cpu | cuda | cuda:K")
    p.add_argument("--out", default=None, help=f"results folder (default {os.path.relpath(SCRATCH)})")
    p.add_argument("--save", action="store_true", help="also append the rows to bench/results/ema.csv (committed)")
    p.add_argument("--rounds", type=int, default=1,
                   help="run the whole list K times, interleaving the providers, and keep each setting's median "
                        "round (robust to a busy machine)")
    p.add_argument("--timeout", type=float, default=900.0)
    p.add_argument("--no-plot", action="store_true")
    p.add_argument("--_child", help=argparse.SUPPRESS)
    return p.parse_args(argv)


def _speedups(rows: List[Dict]) -> None:
    ref = {(r["model"], r["dtype"], r["device"]): r["median_ms"] for r in rows if r["provider"] == "loop"}
    for r in rows:
        t = ref.get((r["model"], r["dtype"], r["device"]), H.NAN)
        r["speedup"] = t / r["median_ms"] if r["median_ms"] and not math.isnan(t) else H.NAN


def render(out_dir: str) -> str:
    rows = H.read_csv(os.path.join(out_dir, f"{OP}.csv"))
    md = H.render_markdown(
        rows, title="EMA teacher update providers", section_cols=("device_name", "threads", "dtype"),
        shape_cols=("model",), provider_order=PROVIDERS,
        notes=["One update ema <- m ema + (1 - m) online over the parameter list (ResNet-50: 161 tensors, 25.56M "
               "parameters; ViT-B/16: 152 tensors, 86.57M). dtype `fp32-bf16` = an fp32 EMA of bf16 online "
               "weights. Time: median after warm-up; the speedup in parentheses is against the per-parameter "
               "`loop` of the same run (the tables' generic header says torch eager). Memory: peak extra during "
               "one call. GB/s and % of copy bandwidth: see the CSV (`gbps`, `copy_gbps`, `pct_copy`)."])
    bw = [r for r in H.latest_rows(rows, ("device_name", "threads", "dtype", "model", "mode", "provider"))
          if r.get("status") == "ok"]
    if bw:
        md += "\n## Effective bandwidth (bytes an update must move / time)\n\n"
        body = [[r["device_name"], r["threads"], r["dtype"], r["model"], r["provider"], r.get("backend", ""),
                 H.fmt_num(r["median_ms"]), H.fmt_num(r["gbps"]), H.fmt_num(r["copy_gbps"]),
                 H.fmt_num(r["pct_copy"])] for r in bw]
        md += H.md_table(["device", "threads", "dtype", "model", "provider", "backend", "ms", "GB/s",
                          "copy GB/s", "% of copy"], body) + "\n"
    path = os.path.join(out_dir, f"{OP}.md")
    with open(path, "w") as f:
        f.write(md)
    return path


def plot(out_dir: str) -> List[str]:
    """One PNG per (device, threads): effective GB/s per provider, one panel per dtype, a bar group per model."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return []
    rows = H.latest_rows(H.read_csv(os.path.join(out_dir, f"{OP}.csv")),
                         ("device_name", "threads", "dtype", "model", "mode", "provider"))
    paths = []
    for (dev, thr) in sorted({(r["device_name"], r["threads"]) for r in rows}):
        sub = [r for r in rows if r["device_name"] == dev and r["threads"] == thr]
        dtypes = sorted({r["dtype"] for r in sub})
        fig, axes = plt.subplots(1, len(dtypes), figsize=(5 * len(dtypes), 3.8), squeeze=False)
        for ax, dt in zip(axes[0], dtypes):
            d = [r for r in sub if r["dtype"] == dt]
            models = sorted({r["model"] for r in d})
            provs = [p for p in PROVIDERS if any(r["provider"] == p for r in d)]
            width = 0.8 / max(1, len(provs))
            for i, p in enumerate(provs):
                vals = [next((H.to_float(r["gbps"]) for r in d if r["model"] == mdl and r["provider"] == p), H.NAN)
                        for mdl in models]
                ax.bar([j + i * width for j in range(len(models))], vals, width, label=p)
            copy = [next((H.to_float(r["copy_gbps"]) for r in d if r["model"] == mdl and r["status"] == "ok"), H.NAN)
                    for mdl in models]
            for j, c in enumerate(copy):
                if not math.isnan(c):
                    ax.hlines(c, j - 0.1, j + 0.8, colors="k", linestyles="dashed")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(models))])
            ax.set_xticklabels(models)
            ax.set_ylabel("GB/s (bytes needed / time)")
            ax.set_title(f"{dt} (dashed: copy bandwidth)")
        axes[0][0].legend(fontsize=7)
        fig.suptitle(f"EMA update, {dev}, {thr} threads", fontsize=9)
        fig.tight_layout()
        slug = re.sub(r"[^A-Za-z0-9]+", "-", dev).strip("-").lower()[:40]
        path = os.path.join(out_dir, f"{OP}_{slug}_t{thr}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    args = _parse_args(argv)
    if args._child is not None:
        return _child_entry(args._child)
    import torch

    device = "cuda" if args.device == "auto" and torch.cuda.is_available() else (
        "cpu" if args.device == "auto" else args.device)
    providers = args.providers or [p for p in PROVIDERS if device.startswith("cuda") or p != "ssl_fast_triton"]
    out_dir = os.path.abspath(args.out or SCRATCH)
    os.makedirs(out_dir, exist_ok=True)
    stamp = datetime.datetime.now().isoformat(timespec="seconds")
    commit = H.git_commit()
    dev_name = H.device_name(device)
    by_key: Dict[tuple, List[Dict]] = {}
    for rnd in range(max(1, args.rounds)):
        for model in args.models:
            for dtype in args.dtypes:
                for prov in providers:
                    spec = dict(model=model, dtype=dtype, provider=prov, device=device, threads=args.threads,
                                repeats=args.repeats, cuda_rep_ms=args.cuda_rep_ms)
                    res = H.run_child([sys.executable, os.path.abspath(__file__), "--_child", json.dumps(spec)],
                                      timeout=args.timeout)
                    row = {c: "" for c in COLUMNS}
                    row.update(timestamp=stamp, commit=commit, device=device, device_name=dev_name,
                               threads=args.threads, torch=torch.__version__, triton=H.package_version("triton"),
                               model=model, dtype=dtype, mode="update", provider=prov, repeats=args.repeats,
                               median_ms=H.NAN, min_ms=H.NAN, peak_mem_mib=H.NAN, gbps=H.NAN, copy_gbps=H.NAN,
                               pct_copy=H.NAN)
                    row.update({k: v for k, v in res.items() if k in COLUMNS})
                    by_key.setdefault((model, dtype, prov), []).append(row)
                    print(f"[round {rnd + 1}] {model:9s} {dtype:9s} {prov:16s} {H.fmt_num(row['median_ms']):>8s} ms "
                          f"{H.fmt_num(row['gbps']):>6s} GB/s ({H.fmt_num(row['pct_copy'])}% of copy) "
                          f"{H.fmt_num(row['peak_mem_mib'])} MiB {row['status']} {row.get('note', '')}", flush=True)
    rows = []
    for runs in by_key.values():  # the median round of each setting (by time; NaN rows sort last)
        runs = sorted(runs, key=lambda r: (math.isnan(H.to_float(r["median_ms"])), H.to_float(r["median_ms"])))
        row = dict(runs[(len(runs) - 1) // 2])
        if len(runs) > 1:
            row["note"] = (row.get("note") or "") + f" median of {len(runs)} rounds: " + ", ".join(
                H.fmt_num(r["median_ms"]) for r in runs) + " ms"
        rows.append(row)
    _speedups(rows)
    targets = [out_dir] + ([RESULTS] if args.save and os.path.abspath(RESULTS) != out_dir else [])
    for d in targets:
        H.append_csv(os.path.join(d, f"{OP}.csv"), rows, COLUMNS)
        md = render(d)
        pngs = [] if args.no_plot else plot(d)
        print(f"wrote {os.path.join(d, OP + '.csv')}, {md}" + (f", {', '.join(pngs)}" if pngs else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
