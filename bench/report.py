"""The results: CSV schema and files, the text summary, markdown tables, the index with the headline table.

    python bench/suite.py --report            # = ssl-fast bench --report: re-render everything under bench/results

Every measurement is one CSV row (``<out>/<device>/<op>.csv``, :func:`columns`), appended by the runner as soon
as it is taken (:func:`append_csv`). Rendering reads the CSVs back and keeps the latest row per (setting,
shape, mode, provider) (:func:`latest_rows`): ``<op>.md`` (:func:`render_op`: time, memory, % of peak and
images/s tables, providers side by side; PNGs from bench/plot.py), ``largest.md`` (:func:`render_largest`),
and the index ``README.md`` with the headline table (:func:`write_index`, :func:`headline`). The headline
gives one line per thread count for CPU devices: the committed CPU results are measured at 1 thread and at
the machine's default thread count.
"""

from __future__ import annotations

import csv
import math
import os
import sys
from typing import Dict, Iterable, List, Sequence, Tuple

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops  # noqa: E402

NAN = float("nan")

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
PEAK_COLS = ["timestamp", "commit", "device", "device_name", "threads", "torch", "dtype", "peak_tflops", "peak_gbps",
             "how"]


def columns(op: ops.Op) -> List[str]:
    """The CSV header of an op's results."""
    return COMMON_COLS + list(op.shape_keys) + list(op.hparams) + METRIC_COLS


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
    out += ["_Generated from the CSV by bench/report.py (`ssl-fast bench`); the latest row per (setting, shape, "
            "mode, provider)._", ""]
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
        for col, title_ in extra_tables:
            body = [list(k) + [fmt_num(lines[k][p].get(col)) if p in lines[k] else "" for p in provs] for k in order]
            if any(not math.isnan(to_float(lines[k][p].get(col))) for k in order for p in lines[k]):
                out += [f"**{title_}**", "", md_table(hdr, body), ""]
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


# ----------------------------------------------------------------------------------------------------
# an op: the text summary of a run, the markdown and plots of its CSV


def fast_providers(rows: List[Dict]) -> List[Dict]:
    return [r for r in rows if r["provider"].startswith("ssl_fast") and r["status"] == "ok"]


def summary(op: ops.Op, rows: List[Dict]) -> str:
    """The text table a run prints: per (shape, dtype, mode, device, threads), every provider against ssl_fast's
    fastest backend."""
    groups: Dict[tuple, List[Dict]] = {}
    for r in rows:
        groups.setdefault(tuple(str(r[k]) for k in op.shape_keys) + (r["dtype"], r["mode"], r["device"],
                                                                      str(r["threads"])), []).append(r)
    out = []
    for key, grp in groups.items():
        fast = min(fast_providers(grp), key=lambda r: to_float(r["median_ms"]), default=None)
        body = []
        for r in grp:
            t_vs = m_vs = NAN
            if fast is not None and not r["provider"].startswith("ssl_fast"):
                t_vs = to_float(r["median_ms"]) / to_float(fast["median_ms"])
                if to_float(fast["peak_mem_mib"]) > 0:
                    m_vs = to_float(r["peak_mem_mib"]) / to_float(fast["peak_mem_mib"])
            work = r["tflops"] if not math.isnan(to_float(r["tflops"])) else r["gbps"]
            body.append([r["provider"] + (f" ({r['backend']})" if r.get("backend") else ""),
                         fmt_num(r["median_ms"]), fmt_num(r["iqr_ms"]), fmt_num(r["peak_mem_mib"]),
                         fmt_num(r["speedup"]), fmt_num(t_vs), fmt_num(m_vs), fmt_num(work),
                         fmt_num(r["pct_peak"]), r.get("gate", ""), fmt_num(r["max_err"]),
                         (r["note"] or "")[:90] if r["status"] != "ok" else ""])
        shape = " ".join(f"{k}={v}" for k, v in zip(op.shape_keys, key))
        out.append(f"\n{op.name}  {shape}  {key[-4]}  mode={key[-3]}  [{key[-2]}, {key[-1]} thr]")
        out.append(text_table(["provider", "ms", "IQR", "MiB", f"x vs {op.baseline}", "ssl_fast x faster",
                               "x less mem", "TFLOP/s|GB/s", "% peak", "gate", "max_err", "note"], body))
    return "\n".join(out)


def render_op(op: ops.Op, out_dir: str, plot: bool = True) -> List[str]:
    """``<out_dir>/<op>.md`` (and the PNGs) from ``<out_dir>/<op>.csv``; returns the paths written."""
    rows = read_csv(os.path.join(out_dir, f"{op.name}.csv"))
    if not rows:
        return []
    about = {p.name: p.about for p in op.providers}
    provs = [p.name for p in op.providers]
    notes = [f"{op.about}.", "",
             "Providers: " + "; ".join(f"`{p}` = {about[p]}" for p in provs if about.get(p)) + ".", "",
             "Every row passed the correctness gate (fp32, small shape, value and input gradients against the "
             "float64 reference) unless its status says otherwise"
             + "".join(f" (`{p.name}` is a probe of the machine, not an implementation: no gate)"
                       for p in op.providers if p.probe) + "; `max_err` in the CSV is the error at the "
             "measured shape and dtype. Time: median of repeats after warm-up (IQR in the CSV). Memory: peak "
             "above the inputs during one call (CUDA: max_memory_allocated; CPU: peak RSS growth in a fresh "
             f"process). Speedups in parentheses are against `{op.baseline}` in the same run. % of peak: against "
             "the device's GEMM / copy peak measured in the same run (peak.csv). One section per thread count "
             "(`threads`: torch threads of the measuring process; `ssl-fast bench` measures CPU ops at 1 thread and "
             "at the machine's default count unless `--threads` says otherwise)."]
    md = render_markdown(rows, title=f"{op.name}: providers side by side",
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
            import plot as plots
            paths += plots.plot_op(op, os.path.join(out_dir, f"{op.name}.csv"), out_dir)
        except Exception as e:  # noqa: BLE001  (plots are a convenience; the CSV is the result)
            print(f"plots skipped: {type(e).__name__}: {e}")
    return paths


def render_largest(out_dir: str) -> str:
    """``<out_dir>/largest.md`` from ``largest.csv``; returns the markdown."""
    rows = latest_rows(read_csv(os.path.join(out_dir, "largest.csv")),
                       ["device_name", "threads", "op", "provider", "dtype", "fixed", "budget_mib"])
    hdr = ["device", "threads", "op", "shape", "dtype", "budget MiB", "provider", "largest", "MiB at it",
           "ms at it", "first over", "commit"]
    body = [[r["device_name"], r["threads"], r["op"], r["fixed"], r["dtype"], fmt_num(r["budget_mib"]),
             r["provider"] + (f" ({r['backend']})" if r.get("backend") else ""), f"{r['batch_key']}={r['largest']}",
             fmt_num(r["mib_at_largest"]), fmt_num(r["ms_at_largest"]), r["first_over"], r["commit"]]
            for r in rows]
    md = "\n".join(["# Largest batch within a memory budget", "",
                    "_`ssl-fast bench OP --largest-batch --mem-budget-gib X`: per provider, the largest batch whose "
                    "forward + backward (inputs + peak extra memory of one call: RSS growth on CPU, "
                    "max_memory_allocated on CUDA) fits the budget; doubling, then bisection to 1/8 of the last "
                    "step; one fresh process per probe._", "", md_table(hdr, body), ""])
    with open(os.path.join(out_dir, "largest.md"), "w") as f:
        f.write(md)
    return md


# ----------------------------------------------------------------------------------------------------
# the index


def _device_dirs(root: str) -> List[str]:
    return sorted(d for d in os.listdir(root) if os.path.isdir(os.path.join(root, d)) and not d.startswith("_"))


def headline(root: str) -> str:
    """Per device and op, at the largest shape where ssl_fast and a peer both ran (the op's main mode): ssl_fast's
    best time and memory against every other provider, one line per thread count measured at that shape."""
    lines = ["| device | threads | op | shape | dtype | mode | ssl_fast ms (MiB) | vs each peer: time x faster / "
             "memory x less |", "|---|---:|---|---|---|---|---|---|"]
    for dev in _device_dirs(root):
        for op in ops.OPS.values():
            rows = latest_rows(read_csv(os.path.join(root, dev, f"{op.name}.csv")),
                               ["device_name", "threads", "dtype", "mode", "provider"] + list(op.shape_keys))
            rows = [r for r in rows if r.get("status") == "ok"]
            main_mode = "full" if "full" in op.modes else op.modes[0]
            by: Dict[tuple, List[Dict]] = {}
            for r in rows:  # "+thp"-style variants (another allocator setting) are not peers of the default
                if r["mode"] == main_mode and "+" not in r["provider"]:
                    by.setdefault(tuple(r[k] for k in ("threads", "dtype") + op.shape_keys), []).append(r)
            cands = [(k, g) for k, g in by.items() if fast_providers(g) and any(
                not r["provider"].startswith("ssl_fast") for r in g)]
            if not cands:
                continue
            # the (dtype, shape) with the most peers at some thread count, then the largest shape; then a line
            # for each thread count measured there
            cands.sort(key=lambda kg: (len(kg[1]), [sort_key_num(v) for v in kg[0][2:]]))
            at = cands[-1][0][1:]
            for key, grp in sorted(((k, g) for k, g in cands if k[1:] == at), key=lambda kg: sort_key_num(kg[0][0])):
                fast = min(fast_providers(grp), key=lambda r: to_float(r["median_ms"]))
                peers = []
                for r in sorted(grp, key=lambda r: r["provider"]):
                    if r["provider"].startswith("ssl_fast"):
                        continue
                    t = to_float(r["median_ms"]) / to_float(fast["median_ms"])
                    fm = to_float(fast["peak_mem_mib"])
                    m = f"{to_float(r['peak_mem_mib']) / fm:.2g}x" if fm >= 0.5 else "- (ssl_fast ~0 MiB)"
                    peers.append(f"{r['provider']} {t:.2g}x / {m}")
                shape = " ".join(f"{k}={v}" for k, v in zip(op.shape_keys, key[2:]))
                lines.append(f"| {fast['device_name']} | {key[0]} | [{op.name}]({dev}/{op.name}.md) | {shape} | "
                             f"{key[1]} | {main_mode} | {fast['provider']}: {fmt_num(fast['median_ms'])} "
                             f"({fmt_num(fast['peak_mem_mib'])}) | {'; '.join(peers)} |")
    return "\n".join(lines)


def write_index(root: str, plot: bool = True) -> str:
    """Re-render every op's markdown and plots under ``root/<device>/`` and write ``root/README.md``."""
    index = ["# Benchmark results", "",
             "_Written by `ssl-fast bench --report` (bench/report.py) from the CSVs in the device folders; every "
             "row carries its device, threads, torch / triton versions, commit and timestamp._", "",
             "## Headline", "", "ssl_fast's fastest backend against every other provider at the largest shape "
             "that most providers ran (the op's main mode; a ratio > 1 means ssl_fast is faster / uses less "
             "memory). `threads`: the torch threads every number of that line was measured with (all providers "
             "of a line at the same count); a CPU op has one line per thread count measured at that shape "
             "(`ssl-fast bench` measures CPU ops at 1 thread and at the machine's default count, the device's "
             "cpus in its name).", "", headline(root), ""]
    for dev in _device_dirs(root):
        out_dir = os.path.join(root, dev)
        files = []
        for op in ops.OPS.values():
            if os.path.exists(os.path.join(out_dir, f"{op.name}.csv")):
                render_op(op, out_dir, plot=plot)
                files.append(f"[{op.name}]({dev}/{op.name}.md)")
        if os.path.exists(os.path.join(out_dir, "largest.csv")):
            render_largest(out_dir)
            files.append(f"[largest batch]({dev}/largest.md)")
        peaks = latest_rows(read_csv(os.path.join(out_dir, "peak.csv")), ["threads", "dtype"])
        index += [f"## {dev}", "", " · ".join(files), ""]
        if peaks:
            index += ["Measured peaks: " + "; ".join(
                f"{p['dtype']} {p['threads']} thr: GEMM {fmt_num(p['peak_tflops'])} TFLOP/s, copy "
                f"{fmt_num(p['peak_gbps'])} GB/s ({p['how']})" for p in peaks), ""]
    path = os.path.join(root, "README.md")
    with open(path, "w") as f:
        f.write("\n".join(index).rstrip() + "\n")
    return path
