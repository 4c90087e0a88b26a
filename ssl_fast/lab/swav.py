"""``ssl-fast lab swav``: SwAV's equal-partition constraint prevents collapse onto few prototypes.

Caron et al. (2020): the codes q of a batch come from Sinkhorn-Knopp (an entropic optimal transport with
equal prototype marginals, eps 0.05, 3 sweeps); the swapped-prediction loss trains the encoder and the
prototypes to predict one view's code from the other view. Replacing Sinkhorn by a plain softmax of the
scores (the same eps) drops the equal-partition constraint and the assignments collapse onto a few
prototypes: a trivial solution where every sample predicts the same code perfectly.

What runs is ``ssl_fast.methods.SwAV`` (``ssl_fast.nn.SwaVLoss`` with the fused Sinkhorn, l2-normalized
``ssl_fast.nn.SwaVPrototypes``, K = 30, temperature 0.1) on ``ssl_fast.methods.SmallCNN`` (width 8, 64-dim
representation), projector 64-128-32, two 16 x 16 views (``ssl_fast.data.digits_view``, no multi-crop, no
queue), batch 256, Adam lr 1e-3. The ablation ``SoftmaxCodesSwaVLoss`` is ``SwaVLoss`` whose codes are
``softmax(scores / eps)`` instead of Sinkhorn (the same swapped prediction through ``SwaVLoss.subloss``).
Each variant runs on several seeds (initialization, data order, views; shared by the two variants of a seed).

Measured on the held-out split: prototypes used (distinct argmax assignments), the perplexity of the mean
assignment (K if every prototype gets equal mass, 1 if one prototype takes all), the normalized-output std.
Collapse: perplexity below K / 5 = 6 prototypes.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import MarkdownReport, plots
from ssl_fast.methods import SwAV
from ssl_fast.nn import SwaVLoss

from . import _image as I
from ._common import ClaimSpec, LabResult, conclude, f, out_dir

NAME = "swav"
FINDING = "SwAV without the equal-partition constraint (softmax codes) collapses onto few prototypes; Sinkhorn does not"
DIM, OUT, K, TEMP, EPS, LR, BATCH = I.DIM, 32, 30, 0.1, 0.05, 1e-3, 256
COLLAPSE_PERPLEXITY = K / 5


class SoftmaxCodesSwaVLoss(SwaVLoss):
    """``SwaVLoss`` with codes ``softmax(scores / eps)`` (no equal-partition constraint), no queue."""

    def forward(self, high_resolution_outputs, low_resolution_outputs, queue_outputs=None):
        high, crops = list(high_resolution_outputs), list(high_resolution_outputs) + list(low_resolution_outputs)
        loss = 0.0
        for i, h in enumerate(high):
            q = F.softmax(h.detach() / self.sinkhorn_epsilon, dim=1)
            loss = loss + sum(self.subloss(z, q) for v, z in enumerate(crops) if v != i) / (len(crops) - 1)
        return loss / len(high)


def build(codes: str, seed: int) -> SwAV:
    torch.manual_seed(seed)
    m = SwAV(I.backbone(), DIM, proj_hidden_dim=128, proj_dim=OUT, n_prototypes=K, temperature=TEMP,
             sinkhorn_iterations=3, sinkhorn_epsilon=EPS, n_local_crops=0)
    if codes == "softmax":
        m.criterion = SoftmaxCodesSwaVLoss(temperature=TEMP, sinkhorn_iterations=3, sinkhorn_epsilon=EPS)
    return m


@torch.no_grad()
def _measure(source, m: SwAV):
    m.eval()
    z = torch.cat([m._project(I.eval_images(x, source)) for x, _ in source.eval_batches("test")])
    m.prototypes.normalize()
    p = F.softmax(m.prototypes(z) / TEMP, dim=1).double()
    m.train()
    marg = p.mean(0)
    perplexity = float(torch.exp(-(marg * marg.clamp_min(1e-300).log()).sum()))
    used = int(p.argmax(1).unique().numel())
    counts = torch.bincount(p.argmax(1), minlength=K).sort(descending=True).values
    return {"perplexity": perplexity, "used": used, "top_share": float(counts[0]) / z.shape[0],
            "std_sqrt_d": float(dg.normalized_std(z).mean()) * math.sqrt(z.shape[1]),
            "knn": I.evaluate(m.backbone, source, probe=False)["knn"], "counts": counts}


# Each claim's noise per budget: the standard deviation of its effect over seeds x 1 and 2 threads, rounded up
# to one significant digit; measured by `python -m ssl_fast.lab.margins` (docs/lab/margins.md). The full budget
# is measured only by the committed run (seeds 0-2, one thread): its noise is the larger of the quick one and
# that run's spread, and a claim is asserted there where it is asserted at the quick budget.
NOISE = {"sinkhorn-no-collapse": {"quick": 0.3, "full": 0.4}, "softmax-collapse": {"quick": 0.002, "full": 0.002}}
CLAIMS = {
    "sinkhorn-no-collapse": ClaimSpec(
        "sinkhorn-no-collapse", f"with Sinkhorn codes the assignments spread over the prototypes (effect: the "
                                f"assignment perplexity minus the collapse threshold {COLLAPSE_PERPLEXITY:g})",
        "prototypes", NOISE["sinkhorn-no-collapse"]),
    "softmax-collapse": ClaimSpec(
        "softmax-collapse", f"with softmax codes (no equal partition) the assignments collapse onto few prototypes "
                            f"(effect: {COLLAPSE_PERPLEXITY:g} minus the assignment perplexity)",
        "prototypes", NOISE["softmax-collapse"]),
}


def claims(numbers: dict, quick: bool) -> list:
    """The experiment's claims from its numbers (the assignment perplexity of each seed)."""
    seeds = numbers["seeds"]
    return [CLAIMS["sinkhorn-no-collapse"].measure(
                [p - COLLAPSE_PERPLEXITY for p in numbers["Sinkhorn"]["perplexity"]], seeds, quick),
            CLAIMS["softmax-collapse"].measure(
                [COLLAPSE_PERPLEXITY - p for p in numbers["softmax"]["perplexity"]], seeds, quick)]


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    d = out_dir(out, NAME)
    steps = 200 if quick else 400
    seeds = I.seeds(seed, quick, full=3, fast=1)
    source = I.data(0)
    rep = MarkdownReport("Lab: SwAV with and without the equal-partition constraint", d)
    rep.paragraph(__doc__.split("\n", 2)[2])
    keys = ("perplexity", "used", "top_share", "std_sqrt_d", "knn", "loss")
    res = {c: {k: [] for k in keys} for c in ("Sinkhorn", "softmax")}
    counts, seed_rows = {}, []
    for sd in seeds:
        for codes in res:
            m = build(codes, sd)
            loss = I.train(m, source, steps=steps, seed=sd, batch=BATCH, lr=LR)
            mm = _measure(source, m)
            mm["loss"] = loss
            for k in keys:
                res[codes][k].append(mm[k])
            if sd == seeds[0]:
                counts[codes] = mm["counts"]
            seed_rows.append([sd, codes, loss, mm["used"], mm["perplexity"], mm["top_share"], mm["std_sqrt_d"],
                              mm["knn"]])
    rep.heading(f"Runs ({steps} steps, seeds {', '.join(map(str, seeds))}, K = {K})")
    rep.paragraph("Mean ± std over the seeds (min..max).")
    rep.table(["codes", "final loss", "prototypes used", "assignment perplexity", "largest prototype's share",
               "std x sqrt(d)", "kNN acc of r"],
              [[c] + [I.pm(m[k]) for k in ("loss", "used", "perplexity", "top_share", "std_sqrt_d", "knn")]
               for c, m in res.items()])
    rep.heading("Per seed")
    rep.table(["seed", "codes", "final loss", "prototypes used", "assignment perplexity", "largest share",
               "std x sqrt(d)", "kNN acc of r"], seed_rows)
    rep.image(plots.plot_curves({c: (v.double() / v.sum()).tolist() for c, v in counts.items()},
                                f"{d}/prototype_mass.png", xlabel="prototype (sorted by mass)",
                                ylabel="share of held-out samples", title=f"assignment histogram (seed {seeds[0]})"),
              "prototype mass")
    sk, sm = res["Sinkhorn"], res["softmax"]
    numbers = {c: m for c, m in res.items()}
    numbers.update({"seeds": seeds, "steps": steps})
    cl = claims(numbers, quick)
    line = (f"assignment perplexity (of {K}) over {len(seeds)} seed(s): Sinkhorn {I.pm(sk['perplexity'])} "
            f"(prototypes used {I.pm(sk['used'])}), softmax {I.pm(sm['perplexity'])} (used {I.pm(sm['used'])}, "
            f"largest takes {f(100 * I.stats(sm['top_share'])['mean'])}% on average)")
    return conclude(NAME, FINDING, rep, cl, line, quick, numbers)
