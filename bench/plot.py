"""PNG plots from a benchmark CSV: time and peak memory against 2N, one line per provider.

    python bench/plot.py                                   # bench/results/ntxent.csv -> bench/results/*.png
    python bench/plot.py --csv /tmp/r/ntxent.csv --out /tmp/r

One figure per (device, threads, loss, dtype, D): the top row is time (ms), the bottom row peak extra
memory (MiB), one column per mode; log-log axes. Only the latest row per (setting, shape, mode, provider)
is drawn, as in the markdown tables.
"""

from __future__ import annotations

import argparse
import math
import os
import re
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import _harness as H  # noqa: E402

SECTION = ("device_name", "threads", "loss", "dtype", "dim")
MODES = ("fwd", "bwd", "full")
ORDER = ("torch", "torch_compile", "lightly", "pml", "open_clip", "ssl_fast")


def _slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()[:60]


def plot_csv(csv_path: str, out_dir: str) -> List[str]:
    """Writes the plots of ``csv_path`` into ``out_dir``; returns their paths."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = H.latest_rows(H.read_csv(csv_path), list(SECTION) + ["n2", "mode", "provider"])
    op = os.path.splitext(os.path.basename(csv_path))[0]
    sections: Dict[tuple, List[Dict]] = {}
    for r in rows:
        sections.setdefault(tuple(r.get(c, "") for c in SECTION), []).append(r)
    paths = []
    for sec, srows in sections.items():
        modes = [m for m in MODES if any(r["mode"] == m for r in srows)]
        provs = [p for p in ORDER if any(r["provider"] == p for r in srows)]
        provs += sorted({r["provider"] for r in srows} - set(provs))
        fig, axes = plt.subplots(2, len(modes), figsize=(4.2 * len(modes), 6.4), squeeze=False)
        for j, mode in enumerate(modes):
            for i, (col, label) in enumerate((("median_ms", "time, ms"), ("peak_mem_mib", "peak extra memory, MiB"))):
                ax = axes[i][j]
                for p in provs:
                    pts = sorted((H.to_float(r["n2"]), H.to_float(r[col])) for r in srows
                                 if r["provider"] == p and r["mode"] == mode)
                    pts = [(x, y) for x, y in pts if not math.isnan(y) and y > 0]
                    if pts:
                        ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p,
                                linewidth=2.5 if p == "ssl_fast" else 1.5)
                ax.set_xscale("log", base=2)
                ax.set_yscale("log")
                ax.set_xlabel("2N (anchors)")
                ax.set_ylabel(label)
                ax.set_title(f"{mode}: {label.split(',')[0]}")
                ax.grid(True, which="both", alpha=0.3)
                if ax.get_legend_handles_labels()[0]:
                    ax.legend(fontsize=8)
        device, threads, loss, dtype, dim = sec
        fig.suptitle(f"{loss}  D={dim}  {dtype}  |  {device}, {threads} threads", fontsize=10)
        fig.tight_layout()
        path = os.path.join(out_dir, f"{op}_{_slug(loss)}_{_slug(device)}_t{threads}_{dtype}_d{dim}.png")
        fig.savefig(path, dpi=110)
        plt.close(fig)
        paths.append(path)
    return paths


def main(argv=None) -> int:
    here = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
    p = argparse.ArgumentParser(description="PNG plots (time and memory per provider) from a benchmark CSV")
    p.add_argument("--csv", default=os.path.join(here, "ntxent.csv"))
    p.add_argument("--out", default=None, help="folder for the PNGs (default: the CSV's folder)")
    args = p.parse_args(argv)
    out = args.out or os.path.dirname(os.path.abspath(args.csv))
    os.makedirs(out, exist_ok=True)
    for path in plot_csv(args.csv, out):
        print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
