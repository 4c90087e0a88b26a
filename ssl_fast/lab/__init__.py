"""The lab: small, seeded experiments that reproduce the published findings about collapse.

    ssl-fast lab mechanisms --out lab_runs        # or: python -m ssl_fast.cli lab all

    from ssl_fast import lab
    result = lab.run("normalization", out="lab_runs", quick=True)
    result.passed, result.verdict, result.report

Each experiment writes ``<out>/<name>/report.md`` with its plots, its claims and a verdict computed from the
measured numbers. Every claim has a signed effect per seed and a noise scale (its spread over seeds and thread
counts, measured by ``python -m ssl_fast.lab.margins``: docs/lab/margins.md); it reads "reproduced" when every
seed's effect is beyond the noise band in the published direction, "failed" when every seed's is beyond it in the
other, and "not resolved at this budget" otherwise. The experiment's status is "reproduced" (PASS) when every
asserted claim is reproduced, "failed" when one failed, "not resolved at this budget" otherwise; claims that are
within the noise at a budget are reported there, not asserted (see ``ssl_fast.lab._common``). ``quick=True`` is
the small budget the test suite uses.

The image experiments (projector, noncontrastive, swav, alignment-uniformity) train what ``ssl-fast train``
runs: ``ssl_fast.methods`` (SimCLR, DirectCLR, SimSiam, BYOL, SwAV and their ``ssl_fast.nn`` losses) on
``ssl_fast.methods.SmallCNN`` (projector: a small MLP encoder on the flattened digits, the setting in which the
collapse it studies appears) with ``ssl_fast.data``'s digits and batched views; the ablations are small
subclasses of those methods. At the full budget each runs seeds ``seed, seed + 1, seed + 2`` (quick: ``seed``),
reports mean ± std (min..max) and computes its verdict from every seed.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Dict, List, Optional

from ._common import DEFAULT_OUT, FAILED, REPRODUCED, UNRESOLVED, Claim, LabResult, finish, jsonable, threads

# name -> module (imported on demand)
EXPERIMENTS: Dict[str, str] = {
    "mechanisms": "ssl_fast.lab.mechanisms",
    "normalization": "ssl_fast.lab.normalization",
    "projector": "ssl_fast.lab.projector",
    "noncontrastive": "ssl_fast.lab.noncontrastive",
    "swav": "ssl_fast.lab.swav",
    "alignment-uniformity": "ssl_fast.lab.alignment_uniformity",
}


def run(name: str, out: str = DEFAULT_OUT, *, quick: bool = False, seed: int = 0, num_threads: int = 1) -> LabResult:
    """Run one experiment.

    Args:
        name: one of :data:`EXPERIMENTS`.
        out: output root; the report goes to ``<out>/<name>/report.md``.
        quick: the small budget (the test suite's).
        seed: base seed (every random draw comes from generators seeded from it).
        num_threads: torch CPU threads during the run (1 is fastest for these tiny models).

    Returns:
        :class:`LabResult` with the verdict, the numbers and the report path.
    """
    if name not in EXPERIMENTS:
        raise ValueError(f"unknown lab experiment {name!r}; choose from {', '.join(EXPERIMENTS)} or 'all'")
    mod = importlib.import_module(EXPERIMENTS[name])
    t0 = time.perf_counter()
    with threads(num_threads):
        import torch

        torch.manual_seed(seed)
        res = mod.run(out, quick=quick, seed=seed)
    res.seconds = time.perf_counter() - t0
    res.threads = num_threads
    _save_result(res, out, quick=quick, seed=seed)
    return res


def _save_result(res: LabResult, out: str, *, quick: bool, seed: int) -> None:
    import json

    d = os.path.dirname(res.report) if res.report else os.path.join(out, res.name)
    os.makedirs(d, exist_ok=True)
    with open(os.path.join(d, "result.json"), "w") as fh:
        json.dump({"name": res.name, "finding": res.finding, "verdict": res.verdict, "passed": res.passed,
                   "status": res.status or (REPRODUCED if res.passed else FAILED),
                   "claims": [c.as_dict() for c in res.claims], "seconds": round(res.seconds, 1), "quick": quick,
                   "seed": seed, "threads": res.threads,
                   "report": os.path.relpath(res.report, out) if res.report else "",
                   "numbers": jsonable(res.numbers)}, fh, indent=1)


def load_results(out: str) -> List[LabResult]:
    """The results saved under ``out`` (one ``result.json`` per experiment folder), in :data:`EXPERIMENTS` order."""
    import json

    found = {}
    if os.path.isdir(out):
        for sub in sorted(os.listdir(out)):
            p = os.path.join(out, sub, "result.json")
            if os.path.isfile(p):
                with open(p) as fh:
                    r = json.load(fh)
                claims = [Claim(c["key"], c["text"], c["effects"], c["seeds"], c["noise"], c["asserted"], c["unit"])
                          for c in r.get("claims", [])]
                found[r["name"]] = LabResult(r["name"], r["finding"], r["verdict"], r["passed"],
                                             report=os.path.join(out, r["report"]), seconds=r["seconds"],
                                             notes=["quick" if r.get("quick") else "full", f"seed {r.get('seed')}"],
                                             claims=claims, status=r.get("status", ""), threads=r.get("threads", 1))
    order = list(EXPERIMENTS)
    return [found[n] for n in sorted(found, key=lambda n: order.index(n) if n in order else len(order))]


def rejudge(out: str) -> List[LabResult]:
    """Recompute the claims and the verdict of every result saved under ``out`` from its saved numbers, with
    the claims' current noise (after ``python -m ssl_fast.lab.margins``): rewrites each report from its
    "## Claims" section on, each ``result.json`` and ``<out>/verdicts.md``. Trains nothing."""
    import json

    from ssl_fast.diagnostics import MarkdownReport

    results, quick, seed = [], False, 0
    for r in load_results(out):
        folder = os.path.dirname(r.report)
        with open(os.path.join(folder, "result.json")) as fh:
            data = json.load(fh)
        quick, seed, numbers = data["quick"], data["seed"], data["numbers"]
        claims = importlib.import_module(EXPERIMENTS[r.name]).claims(numbers, quick)
        rep = MarkdownReport(r.name, folder)
        rep.lines = []
        r.verdict, r.status = finish(rep, claims, numbers["summary"], quick)
        r.claims, r.passed, r.numbers = claims, r.status == REPRODUCED, numbers
        numbers["claims"] = [c.as_dict() for c in claims]
        with open(r.report) as fh:
            head = fh.read().split("\n## Claims\n")[0]
        with open(r.report, "w") as fh:
            fh.write(head.rstrip("\n") + "\n\n" + rep.text())
        _save_result(r, out, quick=quick, seed=seed)
        results.append(r)
    write_summary(results, out, quick=quick, seed=seed)
    return results


def run_all(out: str = DEFAULT_OUT, *, names: Optional[List[str]] = None, quick: bool = False, seed: int = 0,
            num_threads: int = 1) -> List[LabResult]:
    """Run several experiments and write ``<out>/verdicts.md`` (the table of verdicts)."""
    results = [run(n, out, quick=quick, seed=seed, num_threads=num_threads) for n in (names or list(EXPERIMENTS))]
    write_summary(results, out, quick=quick, seed=seed)
    return results


def summary_table(results: List[LabResult], out: str, link_prefix: str = "") -> str:
    """A markdown table of results; report links are relative to ``out`` (prefixed by ``link_prefix``)."""
    lines = ["| experiment | finding | status | asserted claims reproduced | verdict (computed from the numbers) "
             "| time |", "|---|---|---|---|---|---|"]
    for r in results:
        rel = link_prefix + os.path.relpath(r.report, out) if r.report else ""
        verdict = r.verdict.replace("|", "\\|")
        status = r.status or (REPRODUCED if r.passed else FAILED)
        asserted = [c for c in r.claims if c.asserted]
        count = f"{sum(c.status == REPRODUCED for c in asserted)} of {len(asserted)}" if r.claims else "-"
        lines.append(f"| [{r.name}]({rel}) | {r.finding} | {status if status == REPRODUCED else f'**{status}**'} | "
                     f"{count} | {verdict} | {r.seconds:.0f} s |")
    return "\n".join(lines) + "\n"


def write_summary(results: List[LabResult], out: str, *, quick: bool = False, seed: int = 0) -> str:
    """Write ``<out>/verdicts.md``: the table of every result saved under ``out`` (``results`` included)."""
    import platform

    import torch

    os.makedirs(out, exist_ok=True)
    merged = {r.name: r for r in load_results(out)}
    merged.update({r.name: r for r in results})
    order = list(EXPERIMENTS)
    rows = [merged[n] for n in sorted(merged, key=lambda n: order.index(n) if n in order else len(order))]
    path = os.path.join(out, "verdicts.md")
    with open(path, "w") as fh:
        fh.write("# Lab verdicts\n\n")
        threads_used = sorted({r.threads for r in rows})
        fh.write(f"Regenerate: `ssl-fast lab all --out {out}`. Latest run: budget {'quick' if quick else 'full'}, "
                 f"base seed {seed} (full budget: seeds {seed}..{seed + 2}; quick: image experiments seed {seed}, "
                 f"mechanisms {seed}..{seed + 1}), torch {torch.__version__}, {_cpu_name()} ({platform.machine()}), "
                 f"threads: {'/'.join(map(str, threads_used))}.\n\n")
        fh.write(f"Status per experiment: {REPRODUCED} (every asserted claim beyond its noise band in the published "
                 f"direction on every seed), {FAILED} (an asserted claim beyond it in the opposite direction on "
                 f"every seed) or {UNRESOLVED} (an asserted claim within the noise). Claims within the noise at a "
                 f"budget are reported in each report, not asserted; the measured noise of each claim and its margin: "
                 f"docs/lab/margins.md (`python -m ssl_fast.lab.margins`). Time: wall seconds of each run (on a "
                 f"shared machine they include the time spent waiting for a core).\n\n")
        fh.write(summary_table(rows, out))
    return path


def _cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo`` on Linux), else the platform's processor string."""
    import platform

    try:
        with open("/proc/cpuinfo") as fh:
            for line in fh:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown CPU"


README_START, README_END = "<!-- lab-verdicts:start -->", "<!-- lab-verdicts:end -->"


def update_readme(readme: str, out: str) -> None:
    """Replace the text between the lab-verdicts markers of ``readme`` with the table of the results in ``out``."""
    with open(readme) as fh:
        text = fh.read()
    if README_START not in text or README_END not in text:
        raise ValueError(f"{readme} has no {README_START} ... {README_END} markers")
    prefix = os.path.relpath(out, os.path.dirname(os.path.abspath(readme)) or ".").replace(os.sep, "/") + "/"
    table = summary_table(load_results(out), out, link_prefix=prefix)
    head, rest = text.split(README_START, 1)
    _, tail = rest.split(README_END, 1)
    with open(readme, "w") as fh:
        fh.write(head + README_START + "\n" + table + README_END + tail)


__all__ = ["EXPERIMENTS", "FAILED", "REPRODUCED", "UNRESOLVED", "Claim", "LabResult", "load_results", "rejudge", "run",
           "run_all", "summary_table", "update_readme", "write_summary"]
