"""The lab: small, seeded experiments that reproduce the published findings about collapse.

    ssl-fast lab mechanisms --out lab_runs        # or: python -m ssl_fast.cli lab all

    from ssl_fast import lab
    result = lab.run("normalization", out="lab_runs", quick=True)
    result.passed, result.verdict, result.report

Each experiment writes ``<out>/<name>/report.md`` with its plots and a one-line verdict computed from the
measured numbers (the thresholds are stated in the report). ``quick=True`` is the small budget the test suite
uses; the verdicts must hold at both budgets.
"""

from __future__ import annotations

import importlib
import os
import time
from typing import Dict, List, Optional

from ._common import DEFAULT_OUT, LabResult, threads

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
    return res


def run_all(out: str = DEFAULT_OUT, *, names: Optional[List[str]] = None, quick: bool = False, seed: int = 0,
            num_threads: int = 1) -> List[LabResult]:
    """Run several experiments and write ``<out>/verdicts.md`` (the table of verdicts)."""
    results = [run(n, out, quick=quick, seed=seed, num_threads=num_threads) for n in (names or list(EXPERIMENTS))]
    write_summary(results, out, quick=quick, seed=seed)
    return results


def summary_table(results: List[LabResult], out: str) -> str:
    lines = ["| experiment | finding | reproduced | verdict (computed from the numbers) | time |",
             "|---|---|---|---|---|"]
    for r in results:
        rel = os.path.relpath(r.report, out) if r.report else ""
        lines.append(f"| [{r.name}]({rel}) | {r.finding} | {'yes' if r.passed else '**no**'} | {r.verdict} | "
                     f"{r.seconds:.0f} s |")
    return "\n".join(lines) + "\n"


def write_summary(results: List[LabResult], out: str, *, quick: bool = False, seed: int = 0) -> str:
    import platform

    import torch

    os.makedirs(out, exist_ok=True)
    path = os.path.join(out, "verdicts.md")
    with open(path, "w") as fh:
        fh.write("# Lab verdicts\n\n")
        fh.write(f"Budget {'quick' if quick else 'full'}, seed {seed}, torch {torch.__version__}, "
                 f"{platform.machine()} CPU, 1 thread.\n\n")
        fh.write(summary_table(results, out))
    return path


__all__ = ["EXPERIMENTS", "LabResult", "run", "run_all", "summary_table", "write_summary"]
