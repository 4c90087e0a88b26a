"""Measure the lab's claims over seeds and thread counts: the spread each verdict's noise band rests on.

    python -m ssl_fast.lab.margins measure --raw lab_runs/margins            # quick budget, seeds 0-4, 1 and 2 threads
    python -m ssl_fast.lab.margins measure --budget full --names mechanisms,normalization,projector --seeds 0,3
    python -m ssl_fast.lab.margins import docs/lab                            # the committed full-budget runs
    python -m ssl_fast.lab.margins render --raw lab_runs/margins --out docs/lab/margins.md

``measure`` runs every experiment at the quick budget once per (seed, thread count), each in a fresh process,
and keeps the numbers of each run in ``<raw>/<name>_<budget>_s<seed>_t<threads>.json`` (runs already there are
not repeated); ``--budget full`` measures the full budget (seeds ``s .. s + 2`` per run). ``import`` adds the
runs an ``ssl-fast lab`` output folder holds. ``render`` recomputes every claim from those numbers with the
experiment's own ``claims`` function and writes the table of effects, spreads and margins (markdown + the same
data as JSON next to it).
"""

from __future__ import annotations

import argparse
import importlib
import json
import math
import os
import subprocess
import sys
import time
from typing import Dict, List, Tuple

from . import EXPERIMENTS
from ._common import ASSERT_MEAN, BAND_K, f

_CHILD = """
import json, sys, tempfile
from ssl_fast import lab
from ssl_fast.lab._common import jsonable
name, seed, threads, quick, path = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4] == "quick", sys.argv[5]
with tempfile.TemporaryDirectory() as out:
    r = lab.run(name, out, quick=quick, seed=seed, num_threads=threads)
with open(path + ".tmp", "w") as fh:
    json.dump(jsonable({"name": name, "seed": seed, "threads": threads, "quick": quick, "seconds": r.seconds,
                        "numbers": r.numbers}), fh)
"""


def raw_path(raw: str, name: str, seed: int, threads: int, budget: str = "quick") -> str:
    return os.path.join(raw, f"{name}_{budget}_s{seed}_t{threads}.json")


def measure(raw: str, names: List[str], seeds: List[int], thread_counts: List[int], budget: str = "quick") -> None:
    """Run every (experiment, seed, thread count) missing from ``raw``, one fresh process each."""
    os.makedirs(raw, exist_ok=True)
    for name in names:
        for threads in thread_counts:
            for seed in seeds:
                path = raw_path(raw, name, seed, threads, budget)
                if os.path.exists(path):
                    continue
                t0 = time.perf_counter()
                subprocess.run([sys.executable, "-c", _CHILD, name, str(seed), str(threads), budget, path],
                               check=True)
                os.replace(path + ".tmp", path)
                print(f"{name} {budget} seed {seed} threads {threads}: {time.perf_counter() - t0:.0f} s", flush=True)


def import_results(out: str, raw: str) -> List[str]:
    """Add the runs saved by ``ssl-fast lab`` under ``out`` (e.g. the committed full-budget docs/lab: seeds 0-2,
    one thread) to ``raw``, as measurements of their budget; returns the files written."""
    from . import load_results

    os.makedirs(raw, exist_ok=True)
    written = []
    for res in load_results(out):
        with open(os.path.join(os.path.dirname(res.report), "result.json")) as fh:
            data = json.load(fh)
        budget = "quick" if data["quick"] else "full"
        path = raw_path(raw, data["name"], data["seed"], data.get("threads", 1), budget)
        with open(path, "w") as fh:
            json.dump({"name": data["name"], "seed": data["seed"], "threads": data.get("threads", 1),
                       "quick": data["quick"], "seconds": data["seconds"], "numbers": data["numbers"]}, fh)
        written.append(path)
    return written


def load(raw: str) -> List[dict]:
    """Every run saved under ``raw``."""
    runs = []
    for fn in sorted(os.listdir(raw)):
        if fn.endswith(".json"):
            with open(os.path.join(raw, fn)) as fh:
                runs.append(json.load(fh))
    return runs


def _sd(v: List[float]) -> float:
    n = len(v)
    if n < 2:
        return 0.0
    m = sum(v) / n
    return math.sqrt(sum((x - m) ** 2 for x in v) / (n - 1))


def _mean(values: List[float]) -> float:
    """The mean of the finite values; +-inf when every value is infinite (a weight norm of exactly 0)."""
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else min(values)


def assertable(effects: List[float], sd: float, noise: float) -> bool:
    """Whether a claim measured with ``effects`` (every run) may be asserted with ``noise`` declared: the noise
    covers the measured sd, the mean is >= ASSERT_MEAN x noise, every run is beyond the band."""
    if not effects or not noise > 0:
        return False
    return noise >= sd and _mean(effects) >= ASSERT_MEAN * noise and min(effects) > BAND_K * noise


def suggest_noise(sd: float) -> float:
    """The measured spread rounded up to one significant digit (what an experiment declares, at least)."""
    if not sd > 0:
        return 0.0
    x = sd
    e = math.floor(math.log10(x))
    return float(f"{math.ceil(x / 10 ** e)}e{e}")


def summarize(runs: List[dict]) -> List[dict]:
    """One row per (experiment, budget, claim): the effects over seeds x threads against the declared noise."""
    effects: Dict[Tuple[str, str, str], Dict[Tuple[int, int], float]] = {}
    specs = {}
    seconds: Dict[Tuple[str, str], List[float]] = {}
    for r in runs:
        budget = "quick" if r["quick"] else "full"
        mod = importlib.import_module(EXPERIMENTS[r["name"]])
        seconds.setdefault((r["name"], budget), []).append(r["seconds"])
        for c in mod.claims(r["numbers"], r["quick"]):
            cell = effects.setdefault((r["name"], budget, c.key), {})
            for sd, e in zip(c.seeds, c.effects):
                cell[(sd, r["threads"])] = e  # a seed shared by two runs (mechanisms) is the same run
            specs[(r["name"], budget, c.key)] = c
    rows = []
    order = list(EXPERIMENTS)
    for key in sorted(effects, key=lambda k: (order.index(k[0]), k[1] != "quick", k[2])):
        name, budget, ck = key
        cell, c = effects[key], specs[key]
        vals = list(cell.values())
        finite = [v for v in vals if math.isfinite(v)]
        by_t = {}
        for (sd, t), e in cell.items():
            by_t.setdefault(sd, {})[t] = e
        thread_diffs = [abs(max(d.values()) - min(d.values())) for d in by_t.values() if len(d) > 1]
        thread_diffs = [x for x in thread_diffs if math.isfinite(x)]
        sd = _sd(finite)
        lo = min(vals)
        rows.append({
            "experiment": name, "budget": budget, "claim": ck, "text": c.text, "unit": c.unit,
            "runs": len(vals), "seeds": sorted({s for s, _ in cell}), "threads": sorted({t for _, t in cell}),
            "mean": _mean(vals), "sd": sd, "min": lo, "max": max(vals),
            "sd_seeds_1_thread": _sd([e for (s_, t), e in cell.items() if t == min(t_ for _, t_ in cell)
                                      and math.isfinite(e)]),
            "max_thread_diff": max(thread_diffs) if thread_diffs else 0.0,
            "noise": c.noise, "band": c.band, "suggested_noise": suggest_noise(sd), "asserted": c.asserted,
            "noise_covers_spread": c.noise >= sd, "min_over_band": lo / c.band if c.band > 0 else float("inf"),
            "mean_over_noise": _mean(vals) / c.noise if c.noise > 0 else float("inf"),
            "assertable": assertable(vals, sd, c.noise),
            "assert_ok": assertable(vals, sd, c.noise) if c.asserted else None,
            "reproduced_runs": sum(v > c.band for v in vals), "failed_runs": sum(v < -c.band for v in vals),
            "seconds_per_run": sum(seconds[(name, budget)]) / len(seconds[(name, budget)]),
        })
    return rows


def _cpu() -> str:
    from . import _cpu_name

    return _cpu_name()


def render(raw: str, out: str) -> str:
    """Write ``out`` (markdown) and the same rows as JSON next to it; returns the markdown path."""
    import torch

    runs = load(raw)
    rows = summarize(runs)
    os.makedirs(os.path.dirname(os.path.abspath(out)), exist_ok=True)
    with open(os.path.splitext(out)[0] + ".json", "w") as fh:
        json.dump({"cpu": _cpu(), "torch": torch.__version__, "band_k": BAND_K, "assert_mean": ASSERT_MEAN,
                   "rows": rows}, fh, indent=1)
    budgets = {}
    for r in runs:
        budgets.setdefault(("quick" if r["quick"] else "full", r["name"]), set()).add(r["threads"])
    lines = [
        "# Lab claims: effects, spreads and margins", "",
        f"Generated by `python -m ssl_fast.lab.margins render` from {len(runs)} runs of `python -m "
        f"ssl_fast.lab.margins measure` ({_cpu()}, torch {torch.__version__}; the runs are deterministic given "
        f"the seed and the thread count, machine load changes only their wall time).", "",
        "Each claim's effect is signed (> 0 in the published direction; the claim's text says how it is "
        "computed). Per (experiment, budget, claim): the effects over every measured (seed, thread count); `sd`: "
        "their standard deviation; `sd seeds`: over the seeds at one thread; `thread diff`: the largest "
        "difference between 1 and 2 threads at one seed; `noise`: what the experiment declares (at least the "
        "measured sd, rounded up: the suggestion is 1.5 x sd to one digit); band = "
        f"{BAND_K:g} x noise. A claim can be asserted only where the declared noise covers the measured sd, the "
        f"mean effect is at least {ASSERT_MEAN:g} x noise (`mean / noise`) and every measured run is beyond the "
        "band (`min / band` > 1): `assertable`; `check` says whether an asserted claim meets it. Claims not "
        "asserted are reported with their status; `runs beyond +band / -band` counts the measured runs that "
        "would read reproduced / failed.", "",
        "The full budget is measured only where it is affordable (mechanisms, normalization, projector); the "
        "other experiments' full-budget runs use the quick budget's noise.", "",
        "| experiment | budget | claim | unit | runs | seeds | mean | min..max | sd | sd seeds | thread diff | "
        "noise (suggested) | band | mean / noise | min / band | assertable | asserted | check | runs beyond +band / "
        "-band | s per run |",
        "|" + "---|" * 20,
    ]
    for r in rows:
        check = "-" if r["assert_ok"] is None else ("ok" if r["assert_ok"] else "**NO**")
        cover = "" if r["noise_covers_spread"] else " **< sd**"
        lines.append(
            f"| {r['experiment']} | {r['budget']} | {r['claim']} | {r['unit']} | {r['runs']} | "
            f"{min(r['seeds'])}-{max(r['seeds'])} x {'/'.join(map(str, r['threads']))} thr | {f(r['mean'])} | "
            f"{f(r['min'])}..{f(r['max'])} | {f(r['sd'])} | {f(r['sd_seeds_1_thread'])} | "
            f"{f(r['max_thread_diff'])} | {f(r['noise'])} ({f(r['suggested_noise'])}){cover} | {f(r['band'])} | "
            f"{f(r['mean_over_noise'], 2)} | {f(r['min_over_band'], 2)} | {'yes' if r['assertable'] else 'no'} | "
            f"{'yes' if r['asserted'] else 'no'} | {check} | "
            f"{r['reproduced_runs']} / {r['failed_runs']} | {r['seconds_per_run']:.0f} |")
    lines += ["", "Claim texts:", ""]
    seen = set()
    for r in rows:
        if (r["experiment"], r["claim"]) not in seen:
            seen.add((r["experiment"], r["claim"]))
            lines.append(f"- {r['experiment']} / `{r['claim']}`: {r['text']}")
    with open(out, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return out


def _ints(text: str) -> List[int]:
    out: List[int] = []
    for part in text.split(","):
        a, _, b = part.partition("-")
        out += list(range(int(a), int(b) + 1)) if b else [int(a)]
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m ssl_fast.lab.margins", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="command", required=True)
    m = sub.add_parser("measure", help="run the quick budget over seeds x thread counts")
    m.add_argument("--raw", default="lab_runs/margins", help="folder of the per-run numbers")
    m.add_argument("--names", default=",".join(EXPERIMENTS), help="comma-separated experiments")
    m.add_argument("--seeds", default="0-4", help="seeds, e.g. 0-4 or 0,2,5")
    m.add_argument("--threads", default="1,2", help="thread counts, e.g. 1,2")
    m.add_argument("--budget", choices=("quick", "full"), default="quick", help="the budget (default quick)")
    a = sub.add_parser("import", help="add the runs of an ssl-fast lab output folder (e.g. docs/lab)")
    a.add_argument("out", help="the folder ssl-fast lab wrote (its <name>/result.json files)")
    a.add_argument("--raw", default="lab_runs/margins", help="folder of the per-run numbers")
    r = sub.add_parser("render", help="write the table of effects, spreads and margins")
    r.add_argument("--raw", default="lab_runs/margins", help="folder of the per-run numbers")
    r.add_argument("--out", default="docs/lab/margins.md", help="markdown output (JSON next to it)")
    args = p.parse_args(argv)
    if args.command == "measure":
        names = args.names.split(",")
        bad = [n for n in names if n not in EXPERIMENTS]
        if bad:
            p.error(f"unknown experiment(s) {', '.join(bad)}; choose from {', '.join(EXPERIMENTS)}")
        measure(args.raw, names, _ints(args.seeds), _ints(args.threads), args.budget)
    elif args.command == "import":
        print("\n".join(import_results(args.out, args.raw)))
    else:
        print(render(args.raw, args.out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
