"""Shared benchmark machinery: environment facts, timing, peak memory, child processes, CSV/markdown.

Every ``bench/bench_<op>.py`` uses the same protocol:

* the parent process expands the CLI into specs (provider x shape x dtype x mode) and runs each spec in a
  FRESH child process (``python bench/bench_<op>.py --_child '<json>'``) that prints one JSON line
  prefixed with :data:`RESULT_MARK`. A fresh process isolates torch.compile caches, the allocator state
  that a CPU peak-RSS measurement depends on, and crashes / out-of-memory: a child that dies becomes a
  NaN row carrying the error, never a crashed benchmark.
* in the child, a measurement is a pair ``prep()`` (untimed, e.g. the forward pass before a timed
  backward, or clearing ``.grad``) and ``run()`` (timed). Time is the median over repeats after a
  warm-up: :func:`time_cuda` (``triton.testing.do_bench`` when there is no ``prep``, CUDA events around
  ``run`` otherwise) or :func:`time_cpu` (explicit median of ``perf_counter`` samples).
* peak memory of one ``run()`` above the memory held just before it (inputs, plus the saved forward
  graph when only the backward is measured): :func:`cuda_peak_extra_mib` (``max_memory_allocated``) or
  :func:`cpu_peak_extra_mib` (peak RSS growth read from ``/proc/self/status`` after resetting the kernel's
  high-water mark through ``/proc/self/clear_refs``; the child pins glibc's mmap threshold first, and
  measures memory BEFORE timing, see :func:`pin_malloc_to_mmap`).
* rows are appended to ``<out>/<op>.csv`` (:func:`results_dir`: ``bench/results/_scratch``, ignored by git,
  unless the user saves to the committed ``bench/results/`` with ``--save``); :func:`render_markdown` turns the CSV into tables
  (latest row per key, providers side by side).

Nothing in this module imports CUDA or triton at import time.
"""

from __future__ import annotations

import csv
import ctypes
import ctypes.util
import gc
import importlib.metadata
import json
import math
import os
import platform
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Sequence, Tuple

RESULT_MARK = "@@BENCH_RESULT@@ "
MIB = 1024.0 * 1024.0
NAN = float("nan")

DTYPES = {"fp32": "float32", "bf16": "bfloat16", "fp16": "float16", "fp64": "float64"}


# ----------------------------------------------------------------------------------------------------
# environment


def repo_root() -> str:
    return os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def git_commit(root: Optional[str] = None) -> str:
    """``git rev-parse --short HEAD``, with ``+dirty`` when tracked files other than saved results differ."""
    root = root or repo_root()
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=root, capture_output=True,
                             text=True, timeout=10, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no", "--", ".",
                                ":(exclude)bench/results"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
        return sha + ("+dirty" if dirty else "")
    except Exception:
        return "unknown"


def results_dir(save: bool = False) -> str:
    """Where a benchmark writes: ``bench/results`` (the committed measurements) only when ``save``; otherwise
    ``bench/results/_scratch`` (ignored by git, so a user's runs leave the checkout clean)."""
    base = os.path.join(repo_root(), "bench", "results")
    return base if save else os.path.join(base, "_scratch")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def device_name(device: str) -> str:
    if device.startswith("cuda"):
        import torch
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_name()} ({os.cpu_count()} cpus)"


def package_version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return ""


def cuda_available() -> bool:
    import torch
    return torch.cuda.is_available()


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


# ----------------------------------------------------------------------------------------------------
# child processes


def emit_result(result: Dict) -> None:
    """Child side: print the one result line the parent looks for."""
    sys.stdout.write(RESULT_MARK + json.dumps(result) + "\n")
    sys.stdout.flush()


def _last_error_line(text: str) -> str:
    lines = [ln.strip() for ln in text.strip().splitlines() if ln.strip()]
    for ln in reversed(lines):  # the exception line of a traceback, not the warnings around it
        if "Error" in ln or "error" in ln or "Killed" in ln:
            return ln[:300]
    return lines[-1][:300] if lines else ""


def run_child(argv: List[str], *, env: Optional[Dict[str, str]] = None, timeout: float = 1200.0) -> Dict:
    """Run one child command; returns its result dict, or ``{"status": "error"|"timeout", "note": ...}``."""
    full_env = dict(os.environ)
    if env:
        full_env.update(env)
    try:
        proc = subprocess.run(argv, env=full_env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"status": "timeout", "note": f"child timed out after {timeout:.0f} s"}
    for line in reversed(proc.stdout.splitlines()):
        if line.startswith(RESULT_MARK):
            return json.loads(line[len(RESULT_MARK):])
    if proc.returncode < 0:
        sig = -proc.returncode
        why = " (killed: out of memory?)" if sig == 9 else ""
        return {"status": "error", "note": f"child died with signal {sig}{why}"}
    return {"status": "error",
            "note": f"child exit {proc.returncode}: {_last_error_line(proc.stderr or proc.stdout)}"}


def limit_memory(gib: Optional[float]) -> None:
    """Child side: cap the data segment (RLIMIT_DATA: heap + private anonymous mmaps) so a provider that
    would exhaust the machine fails with an allocation error (a NaN 'OOM' row) instead of waking the OOM
    killer on a shared host."""
    if not gib or gib <= 0:
        return
    try:
        import resource
        lim = int(gib * 1024 ** 3)
        resource.setrlimit(resource.RLIMIT_DATA, (lim, lim))
    except (ImportError, ValueError, OSError):
        pass


def mem_available_gib() -> float:
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) / 1024 ** 2
    except OSError:
        pass
    return NAN


# ----------------------------------------------------------------------------------------------------
# CSV


def append_csv(path: str, rows: Iterable[Dict], columns: Sequence[str]) -> None:
    """Append rows; when the file's header differs from ``columns`` the file is rewritten with the union
    of both (old rows keep their values, new columns are blank)."""
    rows = list(rows)
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    cols = list(columns)
    old: List[Dict] = []
    if os.path.exists(path) and os.path.getsize(path) > 0:
        with open(path, newline="") as f:
            reader = csv.DictReader(f)
            header = list(reader.fieldnames or [])
            if header != cols:
                old = list(reader)
                cols = cols + [c for c in header if c not in cols]
            else:
                header = cols
        if header == cols and not old:
            with open(path, "a", newline="") as f:
                w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
                w.writerows(rows)
            return
    with open(path, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=cols, extrasaction="ignore")
        w.writeheader()
        w.writerows(old)
        w.writerows(rows)


def read_csv(path: str) -> List[Dict[str, str]]:
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f))


def to_float(x) -> float:
    try:
        return float(x)
    except (TypeError, ValueError):
        return NAN


def latest_rows(rows: List[Dict], key_cols: Sequence[str]) -> List[Dict]:
    """The last row (CSV order = time order) for each key, in first-seen key order."""
    out: Dict[tuple, Dict] = {}
    for r in rows:
        k = tuple(r.get(c, "") for c in key_cols)
        out.pop(k, None)
        out[k] = r
    return list(out.values())


# ----------------------------------------------------------------------------------------------------
# tables


def fmt_num(x, digits: int = 3) -> str:
    x = to_float(x)
    if math.isnan(x):
        return "nan"
    if x == 0:
        return "0"
    if abs(x) >= 100:
        return f"{x:.0f}"
    return f"{x:.{digits}g}"


def text_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    widths = [max(len(str(h)), *(len(str(r[i])) for r in body)) if body else len(str(h))
              for i, h in enumerate(headers)]
    line = lambda cells: "  ".join(str(c).rjust(w) for c, w in zip(cells, widths))  # noqa: E731
    return "\n".join([line(headers), line(["-" * w for w in widths])] + [line(r) for r in body])


def md_table(headers: Sequence[str], body: Sequence[Sequence[str]]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---:" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c) for c in r) + " |" for r in body]
    return "\n".join(out)


def sort_key_num(v):
    f = to_float(v)
    return (0, f, "") if not math.isnan(f) else (1, 0.0, str(v))


def render_markdown(rows: List[Dict], *, title: str, section_cols: Sequence[str], shape_cols: Sequence[str],
                    provider_order: Sequence[str], notes: Sequence[str] = (), baseline: str = "torch",
                    extra_tables: Sequence[Tuple[str, str]] = ()) -> str:
    """Markdown from CSV rows: one section per ``section_cols`` value, in it one time table and one memory
    table with a line per (shape, mode) and the providers side by side (speedups against ``baseline``), and
    one table per ``(column, title)`` of ``extra_tables`` that has a value. Only the latest row per key."""
    key = list(section_cols) + list(shape_cols) + ["mode", "provider"]
    rows = latest_rows(rows, key)
    sections: Dict[tuple, List[Dict]] = {}
    for r in rows:
        sections.setdefault(tuple(r.get(c, "") for c in section_cols), []).append(r)
    out = [f"# {title}", ""]
    out += [f"_Generated from the CSV by bench/suite.py (`ssl-fast bench`); the latest row per (setting, shape, mode, provider)._", ""]
    out += list(notes) + ([""] if notes else [])
    mode_rank = {"fwd": 0, "bwd": 1, "full": 2}
    for sec, srows in sections.items():
        out.append("## " + ", ".join(f"{c}={v}" for c, v in zip(section_cols, sec)))
        commits = sorted({r.get("commit", "") for r in srows})
        stamps = sorted(r.get("timestamp", "") for r in srows)
        meta = f"commit {', '.join(commits)}; torch {srows[0].get('torch', '')}"
        if srows[0].get("triton"):
            meta += f"; triton {srows[0].get('triton')}"
        backends = sorted({f"{r['provider']}={r['backend']}" for r in srows if r.get("backend")})
        if backends:
            meta += "; backend " + ", ".join(backends)
        meta += f"; {stamps[0]} .. {stamps[-1]}" if stamps and stamps[0] != stamps[-1] else f"; {stamps[0]}"
        out += ["", meta, ""]
        provs = [p for p in provider_order if any(r["provider"] == p for r in srows)]
        provs += sorted({r["provider"] for r in srows} - set(provs))
        lines: Dict[tuple, Dict[str, Dict]] = {}
        for r in srows:
            lines.setdefault(tuple(r.get(c, "") for c in shape_cols) + (r.get("mode", ""),), {})[r["provider"]] = r
        order = sorted(lines, key=lambda k: tuple(sort_key_num(v) for v in k[:-1]) + (mode_rank.get(k[-1], 9),))
        hdr = list(shape_cols) + ["mode"] + provs
        t_body, m_body, p_body = [], [], []
        for k in order:
            cells_t, cells_m, cells_p = [], [], []
            for p in provs:
                r = lines[k].get(p)
                if r is None:
                    cells_t.append("")
                    cells_m.append("")
                    cells_p.append("")
                    continue
                t, sp = to_float(r.get("median_ms")), to_float(r.get("speedup"))
                cell = fmt_num(t)
                if not math.isnan(t) and not math.isnan(sp) and p != baseline:
                    cell += f" ({sp:.3g}x)"
                if r.get("status") not in ("ok", None, "") and math.isnan(t):
                    cell += f" [{r.get('status')}]"
                cells_t.append(cell)
                cells_m.append(fmt_num(r.get("peak_mem_mib")))
                cells_p.append(f"{fmt_num(r.get('process_rss_mib'))} / {fmt_num(r.get('first_call_ms'))}"
                               if not math.isnan(to_float(r.get("process_rss_mib"))) else "")
            t_body.append(list(k) + cells_t)
            m_body.append(list(k) + cells_m)
            p_body.append(list(k) + cells_p)
        out += [f"**Time, median ms** (speedup vs {baseline} in the same run)", "", md_table(hdr, t_body), ""]
        out += ["**Peak extra memory, MiB** (above the inputs)", "", md_table(hdr, m_body), ""]
        for col, title in extra_tables:
            body = [list(k) + [fmt_num(lines[k][p].get(col)) if p in lines[k] else "" for p in provs] for k in order]
            if any(not math.isnan(to_float(lines[k][p].get(col))) for k in order for p in lines[k]):
                out += [f"**{title}**", "", md_table(hdr, body), ""]
        if any(c for row in p_body for c in row[len(k):]):
            out += ["**What a fresh process pays: peak RSS growth over its first call, MiB / that first call, ms** "
                    "(imports, libraries and caches the call loads included; torch_compile: its compile)", "",
                    md_table(hdr, p_body), ""]
        comp = [(k, p, to_float(lines[k][p].get("compile_ms"))) for k in order for p in provs if p in lines[k]]
        comp = [(k, p, c) for k, p, c in comp if not math.isnan(c)]
        if comp:
            out += ["**Compile time** (first call minus the median; excluded from the times above): "
                    + "; ".join(f"{p} {'/'.join(str(v) for v in k)}: {c / 1e3:.1f} s" for k, p, c in comp), ""]
        noted = [r for r in srows if r.get("note") and r.get("status") != "ok"]
        if noted:
            out.append("Notes:")
            seen = set()
            for r in noted:
                msg = f"- {r['provider']}: {r['note']}"
                if msg not in seen:
                    seen.add(msg)
                    out.append(msg)
            out.append("")
    return "\n".join(out).rstrip() + "\n"
