"""PNG plots of a benchmark CSV: time and peak memory against the batch, one line per provider.

    python bench/plot.py bench/results/amd-epyc-2-cpus/ntxent.csv        # PNGs next to the CSV
    python bench/plot.py CSV --out DIR

An op with a batch dimension (``ops.Op.batch_key``) gets one figure per (device, threads, dtype,
hyperparameters, other shape keys): top row time (ms), bottom row peak extra memory (MiB), one column per
mode, log-log axes. An op without one (the EMA update) gets grouped bars per shape: GB/s per provider with
the measured copy bandwidth dashed. Only the latest row per (setting, shape, mode, provider) is drawn, as in
the markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import ops  # noqa: E402
import report  # noqa: E402


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", str(text)).strip("-").lower()[:60]


def plot_op(op: ops.Op, csv_path: str, out_dir: str) -> List[str]:
    """Writes the plots of ``csv_path`` (an ``op``'s CSV) into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    setting = ["device_name", "threads", "dtype"] + list(op.hparams)
    rows = report.latest_rows(report.read_csv(csv_path), setting + list(op.shape_keys) + ["mode", "provider"])
    order = [p.name for p in op.providers]
    others = [k for k in op.shape_keys if k != op.batch_key] if op.batch_key else []
    sections: Dict[tuple, List[Dict]] = {}
    for r in rows:
        sections.setdefault(tuple(r.get(c, "") for c in setting + others), []).append(r)
    paths = []
    for sec, srows in sections.items():
        provs = [p for p in order if any(r["provider"] == p for r in srows)]
        provs += sorted({r["provider"] for r in srows} - set(provs))
        label = ", ".join(f"{k}={v}" for k, v in zip(setting[2:] + others, sec[2:]))
        if op.batch_key is None:
            fig, ax = plt.subplots(figsize=(6.5, 4))
            shapes = sorted({ops.shape_label(op, r) for r in srows})
            width = 0.8 / max(1, len(provs))
            for i, p in enumerate(provs):
                vals = [next((report.to_float(r["gbps"]) for r in srows if ops.shape_label(op, r) == s
                              and r["provider"] == p), report.NAN) for s in shapes]
                ax.bar([j + i * width for j in range(len(shapes))], vals, width, label=p)
            for j, s in enumerate(shapes):
                peak = next((report.to_float(r["peak_gbps"]) for r in srows if ops.shape_label(op, r) == s
                             and r.get("status") == "ok"), report.NAN)
                if not math.isnan(peak):
                    ax.hlines(peak, j - 0.1, j + 0.8, colors="k", linestyles="dashed")
            ax.set_xticks([j + 0.4 - width / 2 for j in range(len(shapes))])
            ax.set_xticklabels(shapes, fontsize=8)
            ax.set_ylabel("GB/s (bytes needed / time); dashed: copy")
            ax.legend(fontsize=7)
        else:
            modes = [m for m in op.modes if any(r["mode"] == m for r in srows)]
            fig, axes = plt.subplots(2, len(modes), figsize=(4.2 * len(modes), 6.4), squeeze=False)
            for j, mode in enumerate(modes):
                for i, (col, ylab) in enumerate((("median_ms", "time, ms"), ("peak_mem_mib", "peak extra memory, MiB"))):
                    ax = axes[i][j]
                    for p in provs:
                        pts = sorted((report.to_float(r[op.batch_key]), report.to_float(r[col])) for r in srows
                                     if r["provider"] == p and r["mode"] == mode)
                        pts = [(x, y) for x, y in pts if not math.isnan(y) and y > 0]
                        if pts:
                            ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p,
                                    linewidth=2.5 if p.startswith("ssl_fast") else 1.5)
                    ax.set_xscale("log", base=2)
                    ax.set_yscale("log")
                    ax.set_xlabel(op.batch_key)
                    ax.set_ylabel(ylab)
                    ax.set_title(f"{mode}: {ylab.split(',')[0]}")
                    ax.grid(True, which="both", alpha=0.3)
                    if ax.get_legend_handles_labels()[0]:
                        ax.legend(fontsize=7)
        fig.suptitle(f"{op.name}  {label}  |  {sec[0]}, {sec[1]} threads", fontsize=9)
        fig.tight_layout()
        name = "_".join([op.name] + [_slug(v) for v in sec[1:]])
        path = os.path.join(out_dir, f"{name}.png")
        fig.savefig(path, dpi=100)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description="PNG plots (time and memory per provider) from a benchmark CSV")
    p.add_argument("csv", help="bench/results/<device>/<op>.csv (the op is the file's name)")
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's folder)")
    args = p.parse_args(argv)
    op = ops.OPS[os.path.splitext(os.path.basename(args.csv))[0]]
    out = args.out or os.path.dirname(os.path.abspath(args.csv))
    os.makedirs(out, exist_ok=True)
    for path in plot_op(op, args.csv, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
