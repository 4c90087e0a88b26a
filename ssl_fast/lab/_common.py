"""Shared plumbing of the lab experiments: claims and their three-way verdicts, results, thread settings,
output folders.

The verdict rule (every experiment): each claim has a signed effect per seed (> 0 in the published
direction, in the claim's unit) and a noise scale ``noise``: the spread (standard deviation) of that effect
over seeds and thread counts, measured at the quick budget (seeds 0-4 x 1 and 2 threads) and at the full one
(mechanisms, normalization, projector: seeds 0-5 x 1 and 2 threads; the others: the committed run, seeds 0-2
at one thread, whose noise is then the larger of the quick one and that run's spread), rounded up to one
significant digit (``python -m ssl_fast.lab.margins``; docs/lab/margins.md). The noise band is
``BAND_K x noise``. A claim is

- **reproduced** when the effect is beyond the band in the published direction on every seed of the run,
- **failed** when it is beyond the band in the opposite direction on every seed,
- **not resolved at this budget** otherwise (within the noise, or seeds on both sides).

A claim is *asserted* at a budget only where the measurement at that budget puts its mean effect at least
``ASSERT_MEAN`` noise from zero (the band plus three noise: a new seed, thread count or CPU lands beyond the band
with margin) and every measured run beyond the band (docs/lab/margins.md; a test checks the declarations
against it; where the full budget is measured only by the committed run, a claim is asserted there where it is
asserted at the quick budget); the others are reported with their status but decide nothing. The overall
verdict: **reproduced** (PASS) when every asserted claim is reproduced; **failed** when an asserted claim
failed; **not resolved at this budget** when none failed but an asserted one is within the noise.
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from typing import Any, Dict, List, Sequence

import torch

DEFAULT_OUT = "lab_runs"

REPRODUCED, FAILED, UNRESOLVED = "reproduced", "failed", "not resolved at this budget"
BAND_K = 3.0    # the noise band: BAND_K x the claim's noise (its spread over seeds x threads)
ASSERT_MEAN = 6.0  # asserted only where the measured mean effect >= ASSERT_MEAN x noise, every run beyond the band


def classify(effects: Sequence[float], band: float) -> str:
    """The three-way status of a claim from its per-seed effects (> 0: the published direction)."""
    if not effects or any(e != e for e in effects):
        return UNRESOLVED
    if min(effects) > band:
        return REPRODUCED
    if max(effects) < -band:
        return FAILED
    return UNRESOLVED


@dataclass
class Claim:
    """One published claim as measured by a run.

    Attributes:
        key: stable short name (docs/lab/margins.md, the tests).
        text: the claim, one sentence, with the criterion that defines its effect.
        effects: the signed effect on each seed (> 0: as published), in ``unit``.
        seeds: the seed of each effect.
        noise: the effect's spread over seeds x thread counts (measured, rounded up), in ``unit``.
        asserted: whether the claim decides the verdict at this budget (and is asserted by the tests).
        unit: what the effect is measured in.
    """

    key: str
    text: str
    effects: List[float]
    seeds: List[int]
    noise: float
    asserted: bool
    unit: str = ""

    @property
    def band(self) -> float:
        return BAND_K * self.noise

    @property
    def status(self) -> str:
        return classify(self.effects, self.band)

    @property
    def margin(self) -> float:
        """The smallest per-seed effect in units of the noise (the band is at ``BAND_K``)."""
        return min(self.effects) / self.noise if self.noise > 0 else float("inf")

    def as_dict(self) -> Dict[str, Any]:
        return {"key": self.key, "text": self.text, "effects": list(self.effects), "seeds": list(self.seeds),
                "noise": self.noise, "band": self.band, "asserted": self.asserted, "unit": self.unit,
                "status": self.status}


@dataclass(frozen=True)
class ClaimSpec:
    """A claim as an experiment declares it: what it says, its unit, its noise per budget ("quick" / "full":
    the effect's spread over seeds x threads, measured by ``python -m ssl_fast.lab.margins``, rounded up)
    and the budgets at which it is asserted."""

    key: str
    text: str
    unit: str
    noise: Dict[str, float]
    asserted: Sequence[str] = ("quick", "full")

    def measure(self, effects: Sequence[float], seeds: Sequence[int], quick: bool) -> Claim:
        budget = "quick" if quick else "full"
        return Claim(self.key, self.text, [float(e) for e in effects], [int(s) for s in seeds],
                     float(self.noise[budget]), budget in self.asserted, self.unit)


def overall(claims: Sequence[Claim]) -> str:
    """The experiment's status from its asserted claims (see the module docstring)."""
    asserted = [c.status for c in claims if c.asserted]
    if FAILED in asserted:
        return FAILED
    if UNRESOLVED in asserted or not asserted:
        return UNRESOLVED
    return REPRODUCED


def verdict_line(claims: Sequence[Claim], summary: str) -> str:
    """``summary`` followed by the claims that are not reproduced (asserted ones first)."""
    status = overall(claims)
    off = [c for c in claims if c.asserted and c.status != REPRODUCED]
    reported = [c for c in claims if not c.asserted]
    text = summary + ": " + {REPRODUCED: "as published (every asserted claim reproduced)",
                             FAILED: "NOT as published", UNRESOLVED: "not resolved at this budget"}[status]
    if off:
        text += " (" + "; ".join(f"{c.key}: {c.status}" for c in off) + ")"
    if reported:
        text += "; reported, not asserted: " + "; ".join(f"{c.key} {c.status}" for c in reported)
    return text


def claims_section(rep, claims: Sequence[Claim], budget: str) -> None:
    """The claims table and the rule, in a report (``rep``: ``ssl_fast.diagnostics.MarkdownReport``)."""
    rep.heading("Claims")
    rep.paragraph(
        f"Effect: signed, > 0 in the published direction, one value per seed. Noise: the effect's spread "
        f"(standard deviation) measured over seeds x 1 and 2 threads, rounded up (docs/lab/margins.md says "
        f"which seeds and budget; `python -m ssl_fast.lab.margins`). Band: {BAND_K:g} x noise. Margin: the "
        f"smallest effect / noise. A claim is reproduced when every seed's effect is above the band, failed "
        f"when every seed's effect is below minus the band, and not resolved at this budget otherwise. "
        f"Asserted claims decide the verdict (and the test suite asserts them at the quick budget): a claim is "
        f"asserted at a budget only where the measured mean effect is at least {ASSERT_MEAN:g} x noise and every "
        f"measured run was beyond the band; the rest are "
        f"reported, not asserted. Budget of this run: {budget}.")
    rep.table(["claim", "asserted", "effect per seed", "unit", "noise", "band", "margin (x noise)", "status"],
              [[f"{c.key}: {c.text}", c.asserted, ", ".join(f(e) for e in c.effects), c.unit, f(c.noise),
                f(c.band), f(c.margin, 2), c.status] for c in claims])


def finish(rep, claims: Sequence[Claim], summary: str, quick: bool):
    """The end of every report: the claims table and the verdict (``summary``: the measured numbers in one
    line). Returns ``(verdict line, status)``. ``ssl_fast.lab.rejudge`` rewrites this part from saved numbers."""
    claims_section(rep, claims, "quick" if quick else "full")
    verdict = verdict_line(claims, summary)
    return verdict, write_verdict(rep, claims, verdict)


def write_verdict(rep, claims: Sequence[Claim], line: str) -> str:
    """The verdict heading and line of a report; returns the status."""
    status = overall(claims)
    tag = {REPRODUCED: "PASS (reproduced)", FAILED: "FAIL", UNRESOLVED: "NOT RESOLVED at this budget"}[status]
    rep.heading("Verdict")
    rep.paragraph("PASS when every asserted claim is reproduced; FAIL when an asserted claim failed; NOT "
                  "RESOLVED when none failed and an asserted claim is within the noise. Claims that are not "
                  "asserted are listed with their status and decide nothing.")
    rep.verdict(f"{tag}: {line}")
    return status


def conclude(name: str, finding: str, rep, claims: Sequence[Claim], summary: str, quick: bool,
             numbers: dict) -> "LabResult":
    """The end of every experiment: ``finish`` the report, record the summary and the claims in ``numbers``, write
    the report and return the LabResult."""
    verdict, status = finish(rep, claims, summary, quick)
    numbers["summary"] = summary
    numbers["claims"] = [c.as_dict() for c in claims]
    return LabResult(name, finding, verdict, status == REPRODUCED, numbers, rep.write(), claims=claims,
                     status=status)


@dataclass
class LabResult:
    """What an experiment returns.

    Attributes:
        name: the experiment's name (``ssl-fast lab NAME``).
        finding: the published finding under test, one sentence.
        verdict: one line computed from the numbers (which thresholds decided it is in the report).
        passed: whether the status is "reproduced" (every asserted claim reproduced).
        numbers: the measured numbers the verdict rests on.
        report: path of the markdown report.
        seconds: wall time.
        claims: the claims with their effects, noise and status.
        status: "reproduced", "failed" or "not resolved at this budget" (see the module docstring).
    """

    name: str
    finding: str
    verdict: str
    passed: bool
    numbers: Dict[str, Any] = field(default_factory=dict)
    report: str = ""
    seconds: float = 0.0
    notes: List[str] = field(default_factory=list)
    claims: List[Claim] = field(default_factory=list)
    status: str = ""
    threads: int = 1


@contextlib.contextmanager
def threads(n: int):
    """Run with ``torch.set_num_threads(n)`` (restored afterwards). The lab's models are tiny: one thread
    is fastest, and much faster than two on a machine whose cores are busy."""
    old = torch.get_num_threads()
    torch.set_num_threads(max(1, int(n)))
    try:
        yield
    finally:
        torch.set_num_threads(old)


def out_dir(root: str, name: str) -> str:
    path = os.path.join(root, name)
    os.makedirs(path, exist_ok=True)
    return path


def f(v: float, digits: int = 3) -> str:
    """Short number formatting for verdict lines."""
    if v != v:
        return "nan"
    if v == 0:
        return "0"
    if abs(v) >= 1e4 or abs(v) < 1e-3:
        return f"{v:.1e}"
    return f"{v:.{digits}g}"


def jsonable(obj):
    """``obj`` with tensors as lists and tuples as lists, for ``json.dump``."""
    if isinstance(obj, torch.Tensor):
        return obj.tolist()
    if isinstance(obj, dict):
        return {str(k): jsonable(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [jsonable(v) for v in obj]
    return obj
