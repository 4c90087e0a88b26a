#!/usr/bin/env python
"""Ahead-of-time compile check of the InfoNCE Triton kernels (kernels/infonce.py, kernels/infonce_rect.py) for real
GPU targets, no GPU needed.

The CPU interpreter tests (TRITON_INTERPRET=1) prove the math but not that the kernels compile for a GPU, nor
how they compile. This script runs the modules' own launchers (ntxent_forward / ntxent_backward /
info_nce_forward / info_nce_backward, rect_forward / rect_backward) on `meta` tensors with every kernel replaced
by a recorder, so the
launches it compiles are exactly the ones the launchers make: block sizes from _fwd_config / _bwd_config /
_fwd_plan, flags (NTXENT, COL_STATS, NSEG, SELF_MASK, W_ROW / W_COL, FOLD_RINV, WRITE_GZ, SPLIT, SINGLE, ...)
from the launchers' keyword arguments, and triton's own argument specialization (16-divisible ints and
pointers, ints equal to 1 become constexprs). It sweeps bf16 / fp16 / fp32 (IEEE and TF32), d in {128, 768},
NT-Xent and cross-view (one-way and symmetric), normalize True / False and several batch sizes (so both the
per-tile and the grouped forward, the split and the unsplit backward occur), de-duplicates the launches and
compiles each distinct variant with triton.compile(ASTSource(...), target=GPUTarget("cuda", arch, 32)).
Every @triton.jit function named *_kernel must be launched by some configuration, else that is an error.
One line per variant: kernel, dtype, d, flags, tile, num_warps / num_stages, registers, spills (cuobjdump
--dump-resource-usage LOCAL / STACK bytes), shared memory, and the tensor-core instructions of the PTX
(wgmma.mma_async on sm_90, mma.sync on sm_80; "fma" when a kernel with dots has none).
Exit status: 1 when a variant fails to compile or a kernel has no configuration; spills and 16-bit / TF32
dots without tensor cores are printed as WARN and fail only with --strict (the tables in infonce.py accept
a few spilled bytes for fp16 / fp32-IEEE). With a triton whose ahead-of-time API differs from the one used
here (written for triton 3.8), it prints "unsupported triton version for ahead-of-time compile check" and
exits 0. It never initializes CUDA; TRITON_INTERPRET is removed from the environment before triton loads.

Usage:  python scripts/check_triton_compile.py [--arch 80 90] [--quick] [--strict] [--jobs N] [-v]
"""

from __future__ import annotations

import argparse
import concurrent.futures as cf
import contextlib
import importlib.util
import inspect
import multiprocessing
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
import traceback
import types

os.environ.pop("TRITON_INTERPRET", None)  # before anything imports triton: compile for real, not interpret

UNSUPPORTED = "unsupported triton version for ahead-of-time compile check"
MODULES = ("infonce", "infonce_rect")  # ssl_fast.kernels.<name>: the kernel modules checked by default

K = None  # every launcher and kernel of the checked modules by name (set in main, inherited by forked workers)
_RECORDS: list = []  # (kernel name, case label, case dict, args, kwargs) of every recorded launch
_CASE: dict = {}


# ----------------------------------------------------------------------------------------------------
# triton API adapter (triton 3.8: the same steps as JITFunction.run)


class Unsupported(Exception):
    pass


def _triton_api():
    """The pieces of triton's ahead-of-time path this script uses; Unsupported when one is missing."""
    try:
        import triton
        from triton.backends.compiler import GPUTarget
        from triton.compiler import ASTSource, make_backend
        from triton.runtime.jit import JITFunction, create_function_from_signature
    except Exception as exc:  # ImportError, or an API that moved
        raise Unsupported(f"{type(exc).__name__}: {exc}") from exc
    params = inspect.signature(ASTSource.__init__).parameters
    if not {"fn", "signature", "constexprs", "attrs"} <= set(params):
        raise Unsupported(f"ASTSource{inspect.signature(ASTSource.__init__)}")
    if not hasattr(JITFunction, "_pack_args"):
        raise Unsupported("JITFunction._pack_args is missing")
    if len(inspect.signature(JITFunction._pack_args).parameters) != 6:
        raise Unsupported(f"JITFunction._pack_args{inspect.signature(JITFunction._pack_args)}")
    return dict(triton=triton, GPUTarget=GPUTarget, ASTSource=ASTSource, make_backend=make_backend,
                JITFunction=JITFunction, binder=create_function_from_signature)


def _specialize(api, fn, arch, args, kwargs):
    """(signature, constexprs, attrs, options dict) of launching fn(*args, **kwargs) on sm_<arch>, as
    JITFunction.run computes them (minus the driver)."""
    target = api["GPUTarget"]("cuda", arch, 32)
    backend = api["make_backend"](target)
    binder = api["binder"](fn.signature, fn.params, backend)
    bound_args, specialization, options = binder(*args, **kwargs)
    options, signature, constexprs, attrs = fn._pack_args(backend, kwargs, bound_args, specialization, options)
    return signature, constexprs, attrs, dict(options.__dict__)


def _compile(api, fn, arch, signature, constexprs, attrs, options):
    src = api["ASTSource"](fn=fn, signature=signature, constexprs=constexprs, attrs=attrs)
    return api["triton"].compile(src, target=api["GPUTarget"]("cuda", arch, 32), options=options)


def _probe(api, arch):
    """Compile a tiny kernel through the whole path: any failure means this triton's API is not the one
    this script speaks (reported as unsupported, not as a failure of the project's kernels)."""
    triton, tl = api["triton"], __import__("triton.language", fromlist=["language"])

    @triton.jit
    def _probe_kernel(x_ptr, n, BLOCK: tl.constexpr):
        i = tl.arange(0, BLOCK)
        tl.store(x_ptr + i, tl.load(x_ptr + i, mask=i < n) + 1.0, mask=i < n)

    import torch
    x = torch.empty(16, device="meta")
    spec = _specialize(api, _probe_kernel, arch, (x, 16), dict(BLOCK=16, num_warps=1))
    out = _compile(api, _probe_kernel, arch, *spec)
    if "ptx" not in out.asm or "cubin" not in out.asm:
        raise Unsupported(f"compiled kernel has asm keys {sorted(out.asm)}")


# ----------------------------------------------------------------------------------------------------
# recording the launches


class _Recorder:
    def __init__(self, name):
        self.name = name

    def __getitem__(self, grid):
        def launch(*args, **kwargs):
            _RECORDS.append((self.name, dict(_CASE), args, kwargs))
        return launch


@contextlib.contextmanager
def _recording(modules, jit_type):
    saved = []  # (module, name, value)
    try:
        for module in modules:
            jit_names = [n for n, v in vars(module).items() if isinstance(v, jit_type)]
            checks = [n for n in ("_check", "_check_scalar") if hasattr(module, n)]
            saved += [(module, n, getattr(module, n)) for n in jit_names + checks]
            for n in jit_names:
                setattr(module, n, _Recorder(n))
            for n in checks:  # they insist on CUDA tensors; ours are on `meta`
                setattr(module, n, lambda *a, **k: None)
        yield
    finally:
        for module, n, v in saved:
            setattr(module, n, v)


def _cases(quick):
    import torch
    dts = [("bf16", torch.bfloat16, "high"), ("fp16", torch.float16, "high"), ("fp32", torch.float32, "highest"),
           ("tf32", torch.float32, "high")]
    if quick:  # every kernel, 16-bit + fp32, both forward paths, split and unsplit backward
        return [dict(dt=dt, d=128, n=n, loss=loss, normalize=True)
                for dt in (dts[0], dts[2]) for n in (1024, 32768) for loss in ("ntxent", "info_nce_sym")] + \
            [dict(dt=dt, d=d, n=1024, loss="rect", normalize=True) for dt in (dts[0], dts[2]) for d in (128, 768)]
    return [dict(dt=dt, d=d, n=n, loss=loss, normalize=norm)
            for dt in dts for d in (128, 768) for n in (256, 2048, 8192, 65536)
            for loss in ("ntxent", "info_nce", "info_nce_sym", "rect") for norm in (True, False)]


def _run_case(c):
    import torch
    label, dtype, prec = c["dt"]
    n, d = c["n"], c["d"]
    old = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(prec)
    try:
        a = torch.empty((n, d), dtype=dtype, device="meta")
        b = torch.empty((n, d), dtype=dtype, device="meta")
        t = torch.empty((), dtype=torch.float32, device="meta")
        g = torch.empty((), dtype=torch.float32, device="meta")
        _CASE.clear()
        _CASE.update(dtype=label, d=d, n=n, loss=c["loss"])
        if c["loss"] == "rect":  # rectangular op: n local rows against 4n candidates (distributed / queue)
            cands = torch.empty((4 * n, d), dtype=dtype, device="meta")
            idx = torch.empty((n,), dtype=torch.int64, device="meta")
            _, lse, xn, yn = K.rect_forward(a, cands, idx, idx, t, c["normalize"])
            K.rect_backward(lse, a, cands, xn, yn, lse, idx, idx, t, c["normalize"], 2 * n)
        elif c["loss"] == "ntxent":
            _, *saved = K.ntxent_forward(a, b, t, c["normalize"], d)
            K.ntxent_backward(g, a, b, *saved, t, c["normalize"], d)
        else:
            sym = c["loss"] == "info_nce_sym"
            _, *saved = K.info_nce_forward(a, b, t, c["normalize"], sym, d)
            K.info_nce_backward(g, a, b, *saved, t, c["normalize"], sym, d)
    finally:
        torch.set_float32_matmul_precision(old)


# ----------------------------------------------------------------------------------------------------
# compiling one variant (in a worker process)

_CUOBJDUMP = None


def _cuobjdump():
    global _CUOBJDUMP
    if _CUOBJDUMP is None:
        import triton
        p = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
        _CUOBJDUMP = p if os.path.exists(p) else (shutil.which("cuobjdump") or "")
    return _CUOBJDUMP


def _resources(cubin):
    tool = _cuobjdump()
    if not tool:
        return None
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        out = subprocess.run([tool, "--dump-resource-usage", f.name], capture_output=True, text=True).stdout
    m = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)\s+LOCAL:(\d+)", out)
    return dict(reg=int(m[1]), stack=int(m[2]), local=int(m[4])) if m else None


def _compile_job(job):
    api = _triton_api()
    name, arch, spec = job["kernel"], job["arch"], job["spec"]
    t0 = time.time()
    try:
        out = _compile(api, getattr(K, name), arch, *spec)
    except Exception as exc:  # triton's CompilationError names the source line; keep its tail
        msg = f"{type(exc).__name__}: {exc}".strip().splitlines() or [traceback.format_exc(limit=-2)]
        return dict(ok=False, error="\n".join(msg[-25:]), secs=time.time() - t0)
    ptx, ttir = out.asm.get("ptx", ""), out.asm.get("ttir", "")
    if isinstance(ptx, bytes):
        ptx = ptx.decode()
    return dict(ok=True, secs=time.time() - t0, res=_resources(out.asm["cubin"]), smem=out.metadata.shared,
                wgmma=ptx.count("wgmma.mma_async"), mma=len(re.findall(r"\bmma\.sync", ptx)),
                dots=str(ttir).count("tt.dot"))


# ----------------------------------------------------------------------------------------------------


def _fmt_val(v):
    return str(int(v)) if isinstance(v, bool) else (f"{v:g}" if isinstance(v, float) else str(v))


def _describe(fn, spec):
    """(flags, tile) strings of a variant: declared constexprs, then ints triton turned into constants."""
    signature, constexprs, _, options = spec
    names = fn.arg_names
    declared = {p.name for p in fn.params if p.is_constexpr}
    flags, tile, spec1 = [], [], []
    for path, v in sorted(constexprs.items()):
        pname = names[path[0]]
        if pname in declared:
            (tile if pname.startswith("BLOCK") else flags).append(f"{pname}={_fmt_val(v)}")
        else:
            spec1.append(f"{pname}={_fmt_val(v)}")
    nondiv = [names[p[0]] for p, a in spec[2].items() if not a and signature[names[p[0]]] in ("i32", "i64")]
    extra = (" const:" + ",".join(spec1) if spec1 else "") + (" !div16:" + ",".join(nondiv) if nondiv else "")
    return " ".join(flags) + extra, " ".join(t.replace("BLOCK_", "").replace("BLOCK", "B") for t in tile)


def _dtype_label(fn, spec):
    """Element type of the kernel's first pointer argument; fp32 dots without IEEE=1 are "tf32"."""
    signature, constexprs = spec[0], spec[1]
    ptrs = [t[1:] for t in signature.values() if t.startswith("*")]
    label = ptrs[0] if ptrs else "-"
    ieee = [v for p, v in constexprs.items() if fn.arg_names[p[0]] == "IEEE"]
    return "tf32" if label == "fp32" and ieee and not ieee[0] else label


def main(argv=None):
    global K
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0], formatter_class=argparse.RawTextHelpFormatter)
    ap.add_argument("--arch", nargs="+", default=["90"], help="compute capabilities (default 90): e.g. --arch 80 90")
    ap.add_argument("--quick", action="store_true", help="a subset that still compiles every kernel (the CI test)")
    ap.add_argument("--strict", action="store_true", help="spills / 16-bit dots without tensor cores fail too")
    ap.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="parallel compiles (default: cores)")
    ap.add_argument("--kernels", nargs="+", default=list(MODULES), metavar="MODULE",
                    help=f"kernel modules ssl_fast.kernels.<MODULE> (default: {' '.join(MODULES)})")
    ap.add_argument("-v", "--verbose", action="store_true", help="print the launches behind each variant")
    args = ap.parse_args(argv)
    archs = [int(str(a).lower().removeprefix("sm_").removeprefix("sm").rstrip("a")) for a in args.arch]

    try:
        import torch  # noqa: F401  (CPU only: nothing here touches torch.cuda)
        import triton
    except ImportError as exc:
        print(f"triton / torch not importable ({exc}): nothing to check")
        return 0
    try:
        api = _triton_api()
        for arch in archs:
            _probe(api, arch)
    except Exception as exc:
        print(f"{UNSUPPORTED}: triton {getattr(triton, '__version__', '?')} "
              f"({type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}); "
              f"written for triton 3.8. Skipped, exit 0.")
        return 0

    modules = [importlib.import_module(f"ssl_fast.kernels.{m}") for m in args.kernels]
    merged = {}
    for module in modules:
        merged.update({n: v for n, v in vars(module).items() if not n.startswith("__")})
    K = types.SimpleNamespace(**merged)
    jit_names = [n for n, v in merged.items() if isinstance(v, api["JITFunction"])]
    kernel_names = [n for n in jit_names if n.endswith("_kernel")]

    cases = _cases(args.quick)
    _RECORDS.clear()
    try:
        with _recording(modules, api["JITFunction"]):
            for c in cases:
                _run_case(c)
    except Exception:
        print(f"FAIL recording the launchers' launches (case {_CASE}); the launcher API changed? "
              f"Update _run_case() in this script.\n{traceback.format_exc()}")
        return 1

    # distinct variants per arch, in the order of the module's kernels
    variants = {}  # key -> dict(kernel, arch, spec, case, count)
    order = {n: i for i, n in enumerate(jit_names)}
    for name, case, a, kw in _RECORDS:
        if name not in kernel_names:
            kernel_names.append(name)  # launched although not named *_kernel: checked too
        fn = getattr(K, name)
        for arch in archs:
            spec = _specialize(api, fn, arch, a, kw)
            sig, constexprs, attrs, opts = spec
            key = (name, arch, tuple(sig.items()), tuple(sorted(constexprs.items())), repr(sorted(attrs.items())),
                   opts["num_warps"], opts["num_stages"])
            v = variants.setdefault(key, dict(kernel=name, arch=arch, spec=spec, case=case, cases=[]))
            v["cases"].append(case)
    jobs = sorted(variants.values(), key=lambda v: (v["arch"], order.get(v["kernel"], 99)))

    print(f"triton {triton.__version__}, kernels {', '.join(args.kernels)}: {len(cases)} launcher cases, "
          f"{len(jobs)} distinct variants for sm_{', sm_'.join(map(str, archs))} ({args.jobs} jobs)", flush=True)
    errors, warnings = [], []
    t0 = time.time()
    ctx = multiprocessing.get_context("fork")
    compiled = {}
    summary = {}  # (arch, kernel, dtype, d) -> worst case over its variants
    with cf.ProcessPoolExecutor(max_workers=max(1, args.jobs), mp_context=ctx) as pool:
        futs = [pool.submit(_compile_job, dict(kernel=j["kernel"], arch=j["arch"], spec=j["spec"])) for j in jobs]
        for j, f in zip(jobs, futs):
            r = f.result()
            c = j["case"]
            flags, tile = _describe(getattr(K, j["kernel"]), j["spec"])
            opts = j["spec"][3]
            dtl = _dtype_label(getattr(K, j["kernel"]), j["spec"])
            dl = (",".join(map(str, sorted({cc["d"] for cc in j["cases"]})))  # every d this variant serves
                  if "d" in getattr(K, j["kernel"]).arg_names else "-")
            head = (f"sm_{j['arch']} {j['kernel']:<21} {dtl:<4} d={dl:<7} {flags} | {tile} | "
                    f"w{opts['num_warps']} s{opts['num_stages']}")
            if not r["ok"]:
                print(f"FAIL {head} | compile error:\n" + "\n".join("    " + ln for ln in r["error"].splitlines()),
                      flush=True)
                errors.append(f"{j['kernel']} sm_{j['arch']}: compile error")
                continue
            compiled.setdefault(j["kernel"], 0)
            compiled[j["kernel"]] += 1
            res = r["res"]
            regs = f"regs {res['reg']:>3} spill {res['local']}/{res['stack']}B" if res else "regs ? (no cuobjdump)"
            tc = "-"
            if r["dots"]:
                tc = (f"wgmma x{r['wgmma']}" if r["wgmma"] else f"mma x{r['mma']}" if r["mma"] else "fma")
            note = []
            if res and (res["local"] or res["stack"]):
                note.append("SPILLS")
            if r["dots"] and tc == "fma" and dtl in ("bf16", "fp16", "tf32"):
                note.append("NO TENSOR CORES")
            status = "WARN" if note else "ok  "
            print(f"{status} {head} | {regs} | smem {r['smem']:>6} | tc {tc} | {r['secs']:.1f}s"
                  f" [{c['loss']} N={c['n']}{' +%d' % (len(j['cases']) - 1) if len(j['cases']) > 1 else ''}]"
                  + (" " + ", ".join(note) if note else ""), flush=True)
            if args.verbose:
                for cc in j["cases"]:
                    print(f"       from {cc}")
            row = summary.setdefault((j["arch"], j["kernel"], dtl, dl), dict(n=0, regs=[], spill=0, smem=0, tc=set()))
            row["n"] += 1
            row["regs"].append(res["reg"] if res else -1)
            row["spill"] = max(row["spill"], (res["local"] + res["stack"]) if res else 0)
            row["smem"] = max(row["smem"], r["smem"])
            row["tc"].add(tc.split(" x")[0])
            if res and (res["local"] or res["stack"]):
                note[note.index("SPILLS")] = f"SPILLS {res['local']}/{res['stack']}B"
            if note:
                warnings.append(f"{j['kernel']} sm_{j['arch']} {dtl} d={dl} {flags}: {', '.join(note)}")

    for name in kernel_names:
        if not any(j["kernel"] == name for j in jobs):
            print(f"FAIL {name}: no launcher configuration launches it (teach _cases() about it)")
            errors.append(f"{name}: not launched")
    print("\nsummary (per kernel / dtype / d over its variants: regs min-max, worst spill bytes, worst smem)")
    for (arch, name, dtl, dl), row in summary.items():
        regs = sorted(row["regs"])
        print(f"  sm_{arch} {name:<21} {dtl:<4} d={dl:<7} {row['n']:>3} variants | regs {regs[0]:>3}-{regs[-1]:<3} | "
              f"spill {row['spill']:>3}B | smem {row['smem']:>6} | tc {'/'.join(sorted(row['tc']))}")
    print(f"compiled {sum(compiled.values())}/{len(jobs)} variants of {len(compiled)}/{len(kernel_names)} kernels "
          f"with triton {triton.__version__} in {time.time() - t0:.0f}s; {len(errors)} error(s), {len(warnings)} warning(s)"
          + ("" if args.strict else " (warnings do not fail; --strict makes them)"))
    for w in warnings:
        print(f"  warning: {w}")
    for e in errors:
        print(f"  error: {e}")
    return 1 if errors or (args.strict and warnings) else 0


if __name__ == "__main__":
    sys.exit(main())
