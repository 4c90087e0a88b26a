#!/usr/bin/env python
"""The summary table of a scripts/gpu_check.sh call, from its work folder: every stage (status, seconds, cap, what
it did: test counts from the pytest logs, rows from the CSVs), then the benchmark rows (time, TFLOP/s or GB/s,
% of the peak measured in the same run) and the tile sweep's best configurations. Short on purpose: only the
last 12,000 characters of a device call's output come back.

    python scripts/gpu_summary.py WORK prove|tune
"""

import csv
import glob
import os
import re
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "bench"))
import report  # noqa: E402  (torch-free: CSV and table helpers)

PYTEST_END = re.compile(r"(\d+ (passed|failed|skipped|errors?|deselected|xfailed|xpassed)[, ]*)+( in [\d.]+s)?")


def _read_tsv(path):
    if not os.path.exists(path):
        return []
    with open(path, newline="") as f:
        return list(csv.DictReader(f, delimiter="\t"))


def _tail(path, n=40):
    try:
        with open(path, errors="replace") as f:
            return f.read().splitlines()[-n:]
    except OSError:
        return []


def _detail(work, stage):
    """What a stage's log says in one line: pytest's closing counts, a build's extension flag, ..."""
    lines = _tail(os.path.join(work, "logs", f"{stage}.log"), 60)
    name = stage
    if name.startswith("test_"):
        for ln in reversed(lines):
            m = PYTEST_END.search(ln)
            if m and ("passed" in ln or "failed" in ln or "error" in ln):
                return m.group(0).strip()
            if re.search(r"\d+ tests? collected|collected \d+ items?|no tests ran", ln):
                return ln.strip("= ").strip()
        return lines[-1][:120] if lines else ""
    if name == "info":
        return "; ".join(ln.strip() for ln in lines if ln.startswith(("C++ extension", "triton", "  cuda", "  cpu")))[:200]
    if name == "peer_imports":
        return ", ".join(("ok " if ln.startswith("import ok") else "FAIL ") + ln.split()[2] for ln in lines
                         if ln.startswith("import "))
    if name in ("bench", "peers"):
        plan = [ln for ln in lines if re.fullmatch(r"\d+ measurements", ln.strip())]
        rows = sum(int(m.group(1)) for ln in lines for m in [re.match(r"appended (\d+) rows", ln)] if m)
        if plan:
            return f"plan: {plan[-1].strip()}"
        if rows:
            return f"{rows} rows written"
    if name == "sweep":
        rows = report.read_csv(os.path.join(work, "results", "tune.csv"))
        if rows:
            return f"{sum(r['status'] == 'ok' for r in rows)}/{len(rows)} configurations ok (the sweep table below)"
    if name in ("bench", "peers", "sweep") or name.startswith("build") or name == "wheels":
        err = [ln for ln in lines if "Error" in ln or "error:" in ln]
        return err[-1].strip()[:160] if err else ""
    return ""


def stage_table(work):
    body = []
    for r in _read_tsv(os.path.join(work, "stages.tsv")):
        d = _detail(work, r["stage"]) if r["stage"] != "total" else ""
        note = "; ".join(x for x in (r["note"], d) if x)
        body.append([r["stage"], r["status"], r["seconds"], r["cap"], note[:150]])
    return report.text_table(["stage", "status", "s", "cap s", "what"], body)


def bench_table(work):
    body = []
    for path in sorted(glob.glob(os.path.join(work, "results", "*", "*.csv"))):
        op = os.path.splitext(os.path.basename(path))[0]
        if op in ("peak", "largest"):
            continue
        for r in report.read_csv(path):
            shape = " ".join(f"{k}={r[k]}" for k in ("n2", "n", "queue", "dim", "b", "k", "model", "batch", "res")
                             if r.get(k))
            work_ = r["tflops"] if r.get("tflops") not in ("", "nan", None) else r.get("gbps", "")
            unit = "TFLOP/s" if r.get("tflops") not in ("", "nan", None) else "GB/s"
            ok = r["status"] == "ok"
            body.append([op, shape, r["dtype"], r["mode"], r["provider"], r["status"],
                         report.fmt_num(r["median_ms"]), report.fmt_num(r.get("speedup")),
                         f"{report.fmt_num(work_)} {unit}" if ok else "", report.fmt_num(r.get("pct_peak")) if ok else "",
                         report.fmt_num(r.get("peak_mem_mib")) if ok else "", "" if ok else (r.get("note") or "")[:60]])
    if not body:
        return ""
    peaks = []
    for path in glob.glob(os.path.join(work, "results", "*", "peak.csv")):
        for p in report.read_csv(path):
            peaks.append(f"{p['dtype']}: GEMM {report.fmt_num(p['peak_tflops'])} TFLOP/s, copy "
                         f"{report.fmt_num(p['peak_gbps'])} GB/s")
    return ("benchmarks (speedup vs the op's eager baseline; % of the peak measured in this run"
            + (": " + "; ".join(peaks) if peaks else "") + ")\n"
            + report.text_table(["op", "shape", "dtype", "mode", "provider", "status", "ms", "x eager", "work",
                                 "% peak", "MiB", "note"], body))


def tune_table(work):
    path = os.path.join(work, "results", "tune.csv")
    rows = report.read_csv(path)
    if not rows:
        return ""
    import tune  # noqa: E402  (bench/tune.py: its summary; imports torch only when sweeping)
    for r in rows:
        r["median_ms"] = report.to_float(r["median_ms"])
        r["speedup_vs_table"] = report.to_float(r["speedup_vs_table"])
    return "tile sweep (bench/tune.py; x table: the best configuration's speedup over the heuristic table)\n" \
        + tune.summary(rows)


def main(argv=None):
    argv = sys.argv[1:] if argv is None else argv
    work, call = argv[0], argv[1]
    parts = [f"== scripts/gpu_check.sh {call}: summary", stage_table(work), bench_table(work), tune_table(work)]
    print("\n\n".join(p for p in parts if p))
    return 0


if __name__ == "__main__":
    sys.exit(main())
