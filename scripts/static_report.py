#!/usr/bin/env python
"""Static performance report of the Triton kernels on Hopper (sm_90) and Ampere (sm_80), read from the compiled
code: no GPU. Writes bench/results/static-sm90.md (one section per triton version).

For every launch the ops make at the target shapes (the launchers run on `meta` tensors with the kernels
replaced by recorders, as scripts/check_triton_compile.py does), each distinct variant is compiled with
triton.compile for the GPU target and read by scripts/sass_analysis.py: tensor-core instructions (HGMMA / HMMA)
and the MACs they issue against the MACs of the tt.dot ops (1.0 = no duplicated work), MUFU.EX2 per logit,
bytes loaded per MAC (global, from LDG / LDGSTS widths; shared, from LDS / LDSM and the wgmma operands),
issue slots per logit, registers, spills (stack bytes, and local-memory bytes per program), shared memory,
occupancy. From these, per launch, the time each unit needs on an H100 SXM (and with the H200's measured
ceilings) and the largest of them (the roofline estimate and its bound), and per op the sum over its launches.

Usage:
  python scripts/static_report.py              # all cases, sm_90 + sm_80, print the report
  python scripts/static_report.py --write      # ... and replace this triton version's section of the .md
  python scripts/static_report.py --quick --check   # the CI subset (sm_90), invariants checked, exit 1 if not
Invariants (--check): issued / useful tensor-core MACs <= 1.05 for every 16-bit InfoNCE kernel, every 16-bit
dot on tensor cores (wgmma on sm_90, mma on sm_80), no spills (stack bytes, local memory) in the default
variant at the target shapes, no loop left without a trip count, the MoCo queue shape >= 132 CTAs in the
launches that carry its work. With a triton whose ahead-of-time API differs, it says "unsupported triton
version" and exits 0 (as the compile check).
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import datetime
import importlib.util
import math
import multiprocessing
import os
import re
import sys
import time
import traceback

os.environ.pop("TRITON_INTERPRET", None)  # compile for real

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, HERE)
import check_triton_compile as C  # noqa: E402
import sass_analysis as S  # noqa: E402

REPORT = os.path.join(ROOT, "bench", "results", "static-sm90.md")
KERNEL_FILES = {m: os.path.join(ROOT, "kernels", f"{m}.py") for m in ("infonce", "infonce_rect", "sinkhorn", "ema",
                                                                      "swav")}
# the files whose source lines the SASS frames are matched against (the kernels and their shared helpers)
PROJECT_FILES = list(KERNEL_FILES.values()) + [os.path.join(ROOT, "kernels", "infonce_common.py")]

# ----------------------------------------------------------------------------------------------------
# the machine (leads: datasheet figures and this workplace's measurements; see the report's header)

CLK = 1.83e9  # the SM clock behind the 989.4 TFLOP/s dense bf16 figure: 132 SMs x 2048 MAC/clk x 2 x 1.83 GHz
MACHINES = {
    "H100 SXM (datasheet)": dict(sms=132, tc16=989.4e12 / 2, tf32=494.7e12 / 2, fma=66.9e12 / 2, mufu=16 * 132 * CLK,
                                 issue=4 * 132 * CLK, smem=128 * 132 * CLK, l2=5.5e12, hbm=3.35e12),
    "H200 (measured ceilings)": dict(sms=132, tc16=780e12 / 2, tf32=390e12 / 2, fma=66.9e12 / 2 * 780 / 989.4,
                                     mufu=16 * 132 * CLK * 780 / 989.4, issue=4 * 132 * CLK * 780 / 989.4,
                                     smem=128 * 132 * CLK * 780 / 989.4, l2=5.5e12, hbm=4.3e12),
}
H100 = "H100 SXM (datasheet)"

# ----------------------------------------------------------------------------------------------------
# trip counts of the source loops of a typical (full) program, from its launch arguments


def _cd(a, b):
    return -(-int(a) // int(b))


TRIPS = {
    ("_dot_tile", "k0"): lambda a: _cd(a["d"], a["BLOCK_K"]),
    ("_bwd_kernel", "jb"): lambda a: min(a["jps"], a["NSEG"] * _cd(a["N"], a["BLOCK_N"])),
    ("_fwd_grouped_kernel", "jb"): lambda a: a["jpg"],
    ("_fwd_kernel", "bj"): lambda a: a["tpp"],
    ("_bwd_epilogue_kernel", "_"): lambda a: a["nsplit"],
    ("_prep_kernel", "k0"): lambda a: _cd(a["d"], a["BLOCK_D"]),
    ("_merge_partials", "s0"): lambda a: _cd(a["nslots"] if "nslots" in a else a["nsplit"], a["BLOCK_S"]),
    ("_sum_kernel", "i0"): lambda a: _cd(a["n"], a["BLOCK"]),
    ("_rect_fwd_kernel", "j0"): lambda a: _cd(a["cps"], a["BLOCK_N"]),
    ("_rect_bwd_rows_kernel", "j0"): lambda a: _cd(a["cps"], a["BLOCK_N"]),
    ("_rect_bwd_cols_kernel", "i0"): lambda a: _cd(a["rps"], a["BLOCK_M"]),
    ("_rect_merge_kernel", "s0"): lambda a: _cd(a["nsplit"], a["BLOCK_S"]),
    ("_rect_bwd_epilogue_kernel", "_"): lambda a: a["nsplit"],
    ("_col_lse_kernel", "r0"): lambda a: _cd(a["rows_per_chunk"], a["BLOCK_B"]),
    ("_col_combine_kernel", "c0"): lambda a: _cd(a["NC"], a["BLOCK_C"]),
    ("_row_stats", "k0"): lambda a: _cd(a["K"], a["BLOCK_K"]),
    ("_row_pass_kernel", "r0"): lambda a: _cd(a["rows_per_chunk"], a["BLOCK_B"]),
    ("_row_pass_kernel", "k0"): lambda a: _cd(a["K"], a["BLOCK_K"]),
    ("_sum_chunks_kernel", "c0"): lambda a: _cd(a["NC"], a["BLOCK_C"]),
    ("_apply_kernel", "k0"): lambda a: _cd(a["K"], a["BLOCK_K"]),
    ("_swav_crop_kernel", "k0"): lambda a: _cd(a["K"], a["BLOCK_K"]),
}
# programs' worth of work when a grid has empty programs (the forward's chunks past the diagonal)
WORK = {
    "_fwd_kernel": lambda a: (a["nb1"] * (2 * a["nb1"] + 1) if a["NTXENT"] else a["nb1"] ** 2) / a["tpp"],
}
REDUCTION = {("_dot_tile", "k0")}  # loops over the dot's K: they do not multiply the logits
# code not counted: the forward's max-shifted statistics, the branch not taken when rows are normalized and
# T >= 0.024 (1 / T in base 2 <= 60: the fixed-shift branch runs; every case here normalizes)
COLD = {"_tile_stats_max"}

# ----------------------------------------------------------------------------------------------------
# cases: (op label, module, quick?, driver(modules) -> None). Drivers call the launchers on meta tensors.

_E = lambda shape, dt: __import__("torch").empty(shape, dtype=dt, device="meta")  # noqa: E731


def _infonce_case(loss, n, d, dt, prec="high"):
    def run(M):
        import torch
        K = M["infonce"]
        old = torch.get_float32_matmul_precision()
        torch.set_float32_matmul_precision(prec)
        try:
            a, b = _E((n, d), dt), _E((n, d), dt)
            t, g = _E((), torch.float32), _E((), torch.float32)
            _phase("fwd")
            if loss == "ntxent":
                _, *saved = K.ntxent_forward(a, b, t, True, d)
                _phase("bwd")
                K.ntxent_backward(g, a, b, *saved, t, True, d)
            else:
                _, *saved = K.info_nce_forward(a, b, t, True, True, d)
                _phase("bwd")
                K.info_nce_backward(g, a, b, *saved, t, True, True, d)
        finally:
            torch.set_float32_matmul_precision(old)
    return run


def _rect_case(r, cn, d, dt, grad_cols):
    def run(M):
        import torch
        K = M["infonce_rect"]
        rows, cands = _E((r, d), dt), _E((cn, d), dt)
        idx = _E((r,), torch.int64)
        t = _E((), torch.float32)
        _phase("fwd")
        terms, lse, *saved = K.rect_forward(rows, cands, idx, idx, t, True)
        _phase("bwd")
        K.rect_backward(terms, rows, cands, *saved, lse, idx, idx, t, True, grad_cols)
    return run


def _sinkhorn_case(b, k, dt, iters=3):
    def run(M):
        import torch
        K = M["sinkhorn"]
        x, u = _E((b, k), dt), _E((k,), torch.float32)
        _phase("fwd")
        K.col_lse(x, 20.0)
        for _ in range(iters - 1):
            K.row_pass(x, 20.0, u)
        K.apply(x, 20.0, u)
    return run


def _ema_case(numel, edt, odt):
    def run(M):
        import torch
        _phase("fwd")
        M["ema"].ema_update_([_E((numel,), edt)], [_E((numel,), odt)], 0.996, None)
    return run


def _swav_case(v, b, k, dt):
    def run(M):
        import torch
        _phase("fwd")
        M["swav"].swav_loss([_E((b, k), dt) for _ in range(v)], [_E((b, k), torch.float32) for _ in range(2)],
                            10.0, True)
    return run


def cases():
    import torch
    bf, f16, f32 = torch.bfloat16, torch.float16, torch.float32
    sq = lambda m, d: 3 * m * m * d  # noqa: E731  (eager torch's GEMMs: logits M^2 d, backward 2 M^2 d)
    return [  # (label, kind, quick, driver, model MACs: the GEMMs eager torch runs for the op, fwd + bwd)
        ("NT-Xent bf16 2N=65536 D=256", "infonce", True, _infonce_case("ntxent", 32768, 256, bf), sq(65536, 256)),
        ("NT-Xent bf16 2N=65536 D=128", "infonce", False, _infonce_case("ntxent", 32768, 128, bf), sq(65536, 128)),
        ("NT-Xent fp16 2N=65536 D=256", "infonce", False, _infonce_case("ntxent", 32768, 256, f16), sq(65536, 256)),
        ("NT-Xent bf16 2N=4194304 D=128", "infonce", False, _infonce_case("ntxent", 2097152, 128, bf),
         sq(4194304, 128)),
        ("NT-Xent tf32 2N=16384 D=128", "infonce", False, _infonce_case("ntxent", 8192, 128, f32, "high"),
         sq(16384, 128)),
        ("InfoNCE symmetric bf16 N=32768 D=256", "infonce", False, _infonce_case("info_nce", 32768, 256, bf),
         sq(32768, 256)),
        ("MoCo queue bf16 N=256 x 65792 D=128", "rect", True, _rect_case(256, 65792, 128, bf, 256),
         256 * 65792 * 128 * 2 + 256 * 256 * 128),
        ("distributed NT-Xent bf16 8192 x 65536 D=256", "rect", False, _rect_case(8192, 65536, 256, bf, 65536),
         3 * 8192 * 65536 * 256),
        ("Sinkhorn fp32 B=4096 K=3000 (3 iters)", "mem", False, _sinkhorn_case(4096, 3000, f32), None),
        ("Sinkhorn bf16 B=65536 K=65536 (3 iters)", "mem", False, _sinkhorn_case(65536, 65536, bf), None),
        ("EMA fp32 25.6M params", "mem", False, _ema_case(25_557_032, f32, f32), None),
        ("SwAV loss bf16 8 crops B=256 K=3000", "mem", True, _swav_case(8, 256, 3000, bf), None),
    ]


# ----------------------------------------------------------------------------------------------------
# recording

_RECORDS: list = []
_STATE = dict(case=None, phase=None, arch=90, candidates=True)


def _phase(p):
    _STATE["phase"] = p


class _Rec:
    def __init__(self, module, name):
        self.module, self.name = module, name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _RECORDS.append(dict(module=self.module, kernel=self.name, grid=grid, args=args, kwargs=kwargs,
                                 case=_STATE["case"], phase=_STATE["phase"], arch=_STATE["arch"], default=True))
        return launch


def _launch_hook(module):
    """For modules that launch through a `_launch(kernel, grid, args, kwargs, configs)` helper: every config of
    the (pruned) list is recorded, the first as the default."""
    def hook(kernel, grid, args, kwargs, configs):
        for i, cfg in enumerate(configs if _STATE["candidates"] else configs[:1]):
            _RECORDS.append(dict(module=module, kernel=kernel.name, grid=grid, args=args, kwargs={**kwargs, **cfg},
                                 case=_STATE["case"], phase=_STATE["phase"], arch=_STATE["arch"], default=i == 0))
    return hook


def load_modules(api):
    """The kernel modules ssl_fast.kernels.<name> (kernels/<name>.py; relative imports of infonce_common)."""
    mods = {}
    for m, path in KERNEL_FILES.items():
        if os.path.exists(path):
            mods[m] = importlib.import_module(f"ssl_fast.kernels.{m}")
    return mods


@contextlib.contextmanager
def recording(mods, api):
    saved = []
    for m, mod in mods.items():
        for n, v in list(vars(mod).items()):
            if isinstance(v, api["JITFunction"]) or type(v).__name__ == "Autotuner":
                saved.append((mod, n, v))
                setattr(mod, n, _Rec(m, n))
        for n in ("_check", "_check_scalar"):
            if hasattr(mod, n):
                saved.append((mod, n, getattr(mod, n)))
                setattr(mod, n, lambda *a, **k: None)
        if hasattr(mod, "_LAUNCH_HOOK"):
            saved.append((mod, "_LAUNCH_HOOK", mod._LAUNCH_HOOK))
            mod._LAUNCH_HOOK = _launch_hook(m)
    try:
        yield
    finally:
        for mod, n, v in saved:
            setattr(mod, n, v)


# ----------------------------------------------------------------------------------------------------
# one variant: compile + analyze (in a worker)

MODS = None


def _fn(rec):
    return getattr(MODS[rec["module"]], rec["kernel"])


def _jit(fn):
    while not hasattr(fn, "arg_names"):
        fn = fn.fn
    return fn


def _named(fn, spec, args, kwargs):
    """Launch arguments by name: ints and floats as given, constexprs, and tensors' shapes."""
    names = fn.arg_names
    out = {}
    for nm, v in list(zip(names, args)) + list(kwargs.items()):
        if isinstance(v, (bool, int, float)):
            out[nm] = v
    return out


def _job(task):
    """Compile one variant and parse its SASS / TTIR (the counts per launch come later, from its arguments)."""
    api = C._triton_api()
    fn = _jit(_fn(task))
    arch = task["arch"]
    t0 = time.time()
    try:
        spec = C._specialize(api, fn, arch, task["args"], task["kwargs"])
        out = C._compile(api, fn, arch, *spec)
    except Exception as exc:
        return dict(ok=False, error=f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1:]}",
                    secs=time.time() - t0)
    cubin, ttir = out.asm["cubin"], out.asm.get("ttir", "")
    ttir = ttir.decode() if isinstance(ttir, bytes) else str(ttir)
    res = S.resources(cubin) or dict(reg=-1, stack=-1, local=-1)
    opts = spec[3]
    prog = S.Program(cubin, ttir, project_files=PROJECT_FILES)
    return dict(ok=True, secs=time.time() - t0, res=res, smem=out.metadata.shared, prog=prog,
                warps=opts["num_warps"], stages=opts["num_stages"], tile=_tile(fn, spec))


def counts_of(rec, r):
    """The counts of one launch: the variant's program with the trip counts of this launch's arguments."""
    fn = _jit(_fn(rec))
    a = _named(fn, None, rec["args"], rec["kwargs"])
    missing = []

    def trips(key):
        f = TRIPS.get(key)
        if f is None:
            missing.append(key)
            return None
        try:
            return f(a)
        except KeyError as exc:
            missing.append((key, f"needs {exc}"))
            return None

    c = r["prog"].count(r["warps"], trips, REDUCTION, COLD)
    return c, sorted(set(map(str, missing)))


def _tile(fn, spec):
    names = fn.arg_names
    declared = {p.name for p in fn.params if p.is_constexpr}
    parts = []
    for path, v in sorted(spec[1].items()):
        nm = names[path[0]]
        if nm in declared and (nm.startswith("BLOCK") or nm in ("SINGLE", "RADIAL", "SPLIT")):
            parts.append(f"{nm.replace('BLOCK_', '').replace('BLOCK', 'B')}={int(v) if isinstance(v, bool) else v}")
    return " ".join(parts)


# ----------------------------------------------------------------------------------------------------
# estimates


def _ctas(grid, kwargs):
    g = grid(kwargs) if callable(grid) else grid
    g = tuple(g) + (1,) * (3 - len(tuple(g)))
    return int(g[0]) * int(g[1]) * int(g[2])


def _dtype_of(rec):
    import torch
    for v in list(rec["args"]):
        if isinstance(v, torch.Tensor) and v.dtype in (torch.bfloat16, torch.float16):
            return "16"
    ieee = rec["kwargs"].get("IEEE")
    return "tf32" if ieee is False else "32"


def _hbm_bytes(rec, c, work):
    """Bytes from / to HBM, at least: the tensor arguments read once (no more than the kernel loads: a launch
    may read a few rows of a big tensor) and the bytes it stores written once (no more than the tensors)."""
    import torch
    seen, total = set(), 0
    for v in list(rec["args"]) + list(rec["kwargs"].values()):
        if isinstance(v, torch.Tensor) and id(v) not in seen:
            seen.add(id(v))
            total += v.numel() * v.element_size()
    return min(total, c.l2_bytes * work) + min(total, c.gst_bytes_ttir * work)


def estimate(rec, r, c, mach):
    """Per-unit times (s) of one launch on `mach`, the wave factor, the roofline time and its bound."""
    ctas = _ctas(rec["grid"], rec["kwargs"])
    kernel = rec["kernel"]
    work = WORK[kernel](_named(_jit(_fn(rec)), None, rec["args"], rec["kwargs"])) if kernel in WORK else ctas
    occ = S.occupancy(90, r["res"]["reg"], r["smem"], r["warps"])
    busy = min(ctas, math.ceil(work))  # programs with work (some grids have empty programs)
    slots = mach["sms"] * max(1, occ["ctas"])
    waves = busy / slots
    factor = max(1.0, mach["sms"] / max(busy, 1)) * (math.ceil(waves) / waves if waves > 1 else 1.0)
    t = {}
    if c.tc_kind in ("wgmma", "mma"):  # each dot at its operands' rate (fp32 operands: TF32, half rate)
        per_mac = sum(dt["useful"] / (mach["tc16"] if dt["dtype"] in ("bf16", "f16") else mach["tf32"])
                      for dt in c.dots) / max(c.useful_macs, 1)
        t["tensor"] = c.issued_macs * work * per_mac
    elif c.tc_kind == "fma":
        t["fma"] = c.issued_macs * work / mach["fma"]
    t["mufu"] = sum(c.mufu.values()) * work / mach["mufu"]
    t["issue"] = c.warp_instrs * work / mach["issue"]
    t["smem"] = c.smem_bytes * work / mach["smem"]
    t["L2"] = (c.l2_bytes + c.gst_bytes_ttir + c.local_bytes) * work / mach["l2"]
    t["HBM"] = _hbm_bytes(rec, c, work) / mach["hbm"]
    bound = max(t, key=t.get)
    return dict(t=t, ctas=ctas, work=work, occ=occ, factor=factor, time=t[bound] * factor, bound=bound)


# ----------------------------------------------------------------------------------------------------
# main


def _variant_key(rec, arch, api):
    fn = _jit(_fn(rec))
    spec = C._specialize(api, fn, arch, rec["args"], rec["kwargs"])
    sig, constexprs, attrs, opts = spec
    return (rec["module"], rec["kernel"], arch, tuple(sig.items()), tuple(sorted(constexprs.items())),
            repr(sorted(attrs.items())), opts["num_warps"], opts["num_stages"])


def _fmt_t(s):
    return f"{s * 1e3:.3f} ms" if s >= 1e-3 else f"{s * 1e6:.1f} us"


def main(argv=None):
    global MODS
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--arch", nargs="+", type=int, default=None, help="default: 90 80 (90 with --quick)")
    ap.add_argument("--quick", action="store_true",
                    help="the CI subset: the cases marked quick, sm_90, default configs only (no candidates)")
    ap.add_argument("--check", action="store_true", help="exit 1 when an invariant fails")
    ap.add_argument("--write", action="store_true", help=f"replace this triton's section of {os.path.relpath(REPORT)}")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1)
    ap.add_argument("--only", default="", help="regex on case labels")
    args = ap.parse_args(argv)
    archs = args.arch or ([90] if args.quick else [90, 80])
    _STATE["candidates"] = not args.quick
    try:
        import torch  # noqa: F401
        import triton
    except ImportError as exc:
        print(f"triton / torch not importable ({exc}): nothing to report")
        return 0
    try:
        api = C._triton_api()
        for arch in archs:
            C._probe(api, arch)
    except Exception as exc:
        print(f"{C.UNSUPPORTED}: triton {getattr(triton, '__version__', '?')} ({type(exc).__name__}). Skipped, exit 0.")
        return 0
    if not S.tool("nvdisasm") or not S.tool("cuobjdump"):
        print(f"{C.UNSUPPORTED}: no nvdisasm / cuobjdump next to triton or on PATH. Skipped, exit 0.")
        return 0
    MODS = load_modules(api)
    todo = [c for c in cases() if (c[2] or not args.quick) and re.search(args.only, c[0])]
    _RECORDS.clear()
    with recording(MODS, api):
        for arch in archs:  # the launchers pick tiles per compute capability
            _STATE["arch"] = arch
            importlib.import_module("ssl_fast.kernels.infonce_common")._ARCH_OVERRIDE = arch
            for label, kind, _, driver, _ in todo:
                _STATE["case"] = label
                try:
                    driver(MODS)
                except Exception:
                    print(f"FAIL recording case {label}:\n{traceback.format_exc()}")
                    return 1
    variants = {}
    for rec in _RECORDS:
        variants.setdefault(_variant_key(rec, rec["arch"], api), rec)
    t0 = time.time()
    print(f"triton {triton.__version__}: {len(todo)} cases, {len(_RECORDS)} launches, {len(variants)} variants for "
          f"sm_{', sm_'.join(map(str, archs))}", flush=True)
    results = {}
    ctx = multiprocessing.get_context("fork")
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
        futs = {key: pool.submit(_job, task) for key, task in variants.items()}
        for key, f in futs.items():
            results[key] = f.result()
    print(f"compiled and read in {time.time() - t0:.0f}s", flush=True)
    text, problems = render(todo, archs, api, results, triton.__version__)
    print(text)
    if args.write:
        write_section(text, triton.__version__)
    for p in problems:
        print(f"INVARIANT: {p}")
    print(f"{len(problems)} invariant failure(s)")
    return 1 if (args.check and problems) else 0


def _rows(todo, arch, api, results):
    """Per case, its launches on `arch` (dicts: rec, r, kind, c = counts, missing, e = estimates per machine)."""
    out = {}
    for label, kind, _, _, model in todo:
        rows = out.setdefault(label, [])
        for rec in _RECORDS:
            if rec["case"] != label or rec["arch"] != arch:
                continue
            r = results[_variant_key(rec, arch, api)]
            row = dict(rec=rec, r=r, kind=kind)
            if r["ok"]:
                row["c"], row["missing"] = counts_of(rec, r)
                if arch == 90:
                    row["e"] = {m: estimate(rec, r, row["c"], MACHINES[m]) for m in MACHINES}
            rows.append(row)
    return out


def _headline(todo, rows):
    mach = MACHINES[H100]
    out = ["| op | fwd (H100) | bwd (H100) | fwd+bwd H100 | fwd+bwd H200 | model TFLOP/s (% of 989) | tensor-core "
           "use | bound (largest launch per phase) | CTAs fwd / bwd |", "|" + "---|" * 9]
    for label, kind, _, _, model in todo:
        rs = [x for x in rows[label] if x["r"]["ok"] and x["rec"]["default"]]
        if not rs:
            continue
        ph = {}
        for x in rs:
            ph.setdefault(x["rec"]["phase"], []).append(x)
        t = {p: sum(x["e"][H100]["time"] for x in xs) for p, xs in ph.items()}
        t200 = sum(x["e"]["H200 (measured ceilings)"]["time"] for x in rs)
        total = sum(t.values())
        macs = sum(x["c"].issued_macs * x["e"][H100]["work"] for x in rs)
        util = f"{100 * macs / total / mach['tc16']:.0f}%" if macs else "-"
        tf = f"{2 * model / total / 1e12:.0f} ({100 * model / total / mach['tc16']:.0f}%)" if model else "-"
        big = {p: max(xs, key=lambda x: x["e"][H100]["time"]) for p, xs in ph.items()}
        bound = "; ".join(f"{p}: {x['rec']['kernel']} {x['e'][H100]['bound']}" for p, x in big.items())
        ctas = " / ".join(str(max(x["e"][H100]["ctas"] for x in ph[p])) for p in ("fwd", "bwd") if p in ph)
        out.append(f"| {label} | {_fmt_t(t.get('fwd', 0))} | {_fmt_t(t['bwd']) if 'bwd' in t else '-'} | "
                   f"**{_fmt_t(total)}** | {_fmt_t(t200)} | {tf} | {util} | {bound} | {ctas} |")
    return out


def render(todo, archs, api, results, version):
    import torch
    out, problems = [], []
    out.append(f"## triton {version}, torch {torch.__version__}\n")
    for arch in archs:
        rows = _rows(todo, arch, api, results)
        out.append(f"### sm_{arch}\n")
        if arch == 90:
            out.append("Headline (the default configs; estimates, not measurements; model TFLOP/s counts the GEMMs "
                       "eager torch runs, 3 M^2 d for NT-Xent; tensor-core use counts the MACs the kernels "
                       "issue):\n")
            out += _headline(todo, rows)
            out.append("\nEvery launch ('candidate': another config of its autotuning list):\n")
            out.append("| op | phase | kernel | tile | w/s | CTAs | regs | spill | smem KiB | occ | tc | MAC ratio "
                       "| ex2/logit | L2 B/MAC | smem B/MAC | issue/logit | H100 est. | bound |")
            out.append("|" + "---|" * 18)
        else:
            out.append("| op | phase | kernel | tile | w/s | regs | spill | smem KiB | occ | tc | MAC ratio |")
            out.append("|" + "---|" * 11)
        for label, kind, _, _, _ in todo:
            for x in rows[label]:
                rec, r = x["rec"], x["r"]
                name = rec["kernel"] + ("" if rec["default"] else " (candidate)")
                if not r["ok"]:
                    out.append(f"| {label} | {rec['phase']} | {name} | compile error: {r['error']} |")
                    problems.append(f"{label} {name} sm_{arch}: compile error")
                    continue
                c, res = x["c"], r["res"]
                spill = f"{res['stack']} B" + (f" ({c.local_bytes / 1024:.0f} KiB/CTA)" if c.local_bytes else "")
                occ = S.occupancy(arch, res["reg"], r["smem"], r["warps"])
                ratio = f"{c.ratio:.3f}" if c.useful_macs else "-"
                row = [label, rec["phase"], name, r["tile"], f"{r['warps']}/{r['stages']}"]
                if arch == 90:
                    e = x["e"][H100]
                    ex2 = f"{c.mufu.get('EX2', 0) / c.logits:.2f}" if c.logits else "-"
                    bpm = f"{(c.l2_bytes + c.gst_bytes_ttir) / c.useful_macs:.4f}" if c.useful_macs else "-"
                    spm = f"{c.smem_bytes / c.useful_macs:.4f}" if c.useful_macs else "-"
                    ipl = f"{c.warp_instrs / c.logits:.2f}" if c.logits else "-"
                    row += [str(e["ctas"]), str(res["reg"]), spill, f"{r['smem'] / 1024:.0f}",
                            f"{occ['ctas']} ({occ['limit']})", c.tc_kind, ratio, ex2, bpm, spm, ipl,
                            _fmt_t(e["time"]) + (f" (x{e['factor']:.1f} waves)" if e["factor"] > 1.01 else ""),
                            e["bound"]]
                else:
                    row += [str(res["reg"]), spill, f"{r['smem'] / 1024:.0f}", f"{occ['ctas']} ({occ['limit']})",
                            c.tc_kind, ratio]
                out.append("| " + " | ".join(row) + " |")
                problems += _invariants(label, kind, rec, r, c, x["missing"], arch)
        out.append("")
    return "\n".join(out), problems


def _invariants(label, kind, rec, r, c, missing, arch):
    bad = []
    res = r["res"]
    name = f"{label} / {rec['kernel']} sm_{arch}"
    if missing:
        bad.append(f"{name}: loops without a trip count {missing}")
    sixteen = _dtype_of(rec) == "16"
    if kind in ("infonce", "rect") and sixteen and c.useful_macs:
        want = "wgmma" if arch == 90 else "mma"
        if c.tc_kind != want:
            bad.append(f"{name}: 16-bit dots on {c.tc_kind}, not {want}")
        wide = [dt["shape"] for dt in c.dots if dt["dtype"] not in ("bf16", "f16")]
        if wide:
            bad.append(f"{name}: dots with 32-bit operands for 16-bit inputs {wide}")
        if c.ratio > 1.05:
            bad.append(f"{name}: issued / useful MACs {c.ratio:.3f} > 1.05")
    if rec["default"] and (res["stack"] > 0 or res["local"] > 0 or c.local_bytes > 0):
        bad.append(f"{name}: spills (stack {res['stack']} B, local traffic {c.local_bytes:.0f} B per CTA)")
    if label.startswith("MoCo") and arch == 90 and rec["default"] and c.useful_macs:
        ctas = _ctas(rec["grid"], rec["kwargs"])
        if ctas < 132 and rec["kernel"] in ("_rect_fwd_kernel", "_rect_bwd_rows_kernel"):
            bad.append(f"{name}: {ctas} CTAs < 132")
    return bad


HEADER = """# Static performance report (sm_90, sm_80): read from the compiled code, no GPU

Regenerate: `python scripts/static_report.py --write` (one section per triton version; run it with each
triton, e.g. the pinned 3.8 and the GPU machines' 3.6). The CI test runs `--quick --check`
(tests/test_static_report.py). Every figure below comes from compiling the kernels with `triton.compile`
for the target (no GPU) and reading the cubin's SASS (nvdisasm) and the TTIR (scripts/sass_analysis.py);
the times are estimates, NOT measurements: the GPU run measures them.

Columns: **tile** the block sizes; **w/s** num_warps / num_stages; **CTAs** programs in the launch at that
shape; **regs** per thread; **spill** stack bytes per thread (and local-memory traffic per CTA when a spill is
inside a loop); **smem** dynamic shared memory; **occ** CTAs per SM (and the resource that limits it);
**tc** wgmma (HGMMA), mma (HMMA), fma (FFMA dot) or -; **MAC ratio** tensor-core MACs the instructions issue
over the MACs of the tt.dot ops (1.0 = no warp repeats another's work); **ex2/logit** MUFU.EX2 per logit of the
tile; **L2 B/MAC** global bytes loaded + stored per useful MAC (L2 traffic); **smem B/MAC** shared-memory
bytes (LDS/LDSM/STS and the wgmma operand reads) per MAC; **issue/logit** warp instructions per logit;
**H100 est.** the roofline estimate: max over units of (work / rate), times a wave factor (fewer CTAs than
SMs: SMs / CTAs; a partial last wave: ceil(waves) / waves); **bound** the unit that gives the max.

Rates used (H100 SXM, leads): dense bf16/fp16 tensor cores 989.4 TFLOP/s (datasheet), TF32 494.7, FP32
FMA 66.9 TFLOP/s; 132 SMs at 1.83 GHz (the clock implied by 989.4 = 132 x 2048 MAC/clk x 2); MUFU 16 /clk
/SM = 3.87e12 /s (the "3.9 TFLOPS of special functions" quoted by FlashAttention-3); issue 4 warp-instr /clk
/SM; shared memory 128 B /clk /SM = 30.9 TB/s (wgmma operand reads assumed to share it: a lead); L2 5.5 TB/s
(an assumption: the vendor publishes none, not measured here); HBM3 3.35 TB/s (datasheet; the H200: 4.8,
4.3 TB/s measured copy here, and 770-800 TFLOP/s measured bf16 matmul on random data). Work per CTA is the
compiled code's straight-line path (code under an `if` counts as run), loops times their trip counts at the
shape (scripts/static_report.py TRIPS); HBM bytes count each tensor argument once.
"""


def write_section(text, version):
    old = open(REPORT).read() if os.path.exists(REPORT) else HEADER
    if not old.startswith("# Static performance report"):
        old = HEADER
    head, _, rest = old.partition("\n## ")
    sections = [("## " + s) for s in ("\n## " + rest).split("\n## ")[1:]] if rest else []
    sections = [s for s in sections if not s.startswith(f"## triton {version},")]
    stamp = f"\n_generated {datetime.date.today().isoformat()}_\n"
    body = HEADER.rstrip() + "\n\n" + "\n".join(s.rstrip() + "\n" for s in sections + [text.rstrip() + stamp])
    with open(REPORT, "w") as f:
        f.write(body)
    print(f"wrote {os.path.relpath(REPORT)}")


if __name__ == "__main__":
    sys.exit(main())
