"""``ssl-fast lab normalization``: the L2 loss vs the cosine loss of a linear BYOL under weight decay.

The DirectPred setting (Tian, Chen, Ganguli 2021) extended to feature normalization (the cosine loss):
data ``x ~ N(0, I_16)``, views ``x + e`` with ``e ~ N(0, I_16)``; online ``W`` (16 x 16), linear predictor
``Wp`` (16 x 16), target ``Wa = EMA(W)`` (momentum 0.99, updated with ``ssl_fast.ema_update_``),
stop-gradient on the target; SGD (lr 0.05, batch 128) with weight decay eta on W and Wp;

    L2 loss:      || Wp W x1 - sg(Wa x2) ||^2
    cosine loss:  || n(Wp W x1) - sg(n(Wa x2)) ||^2 = 2 - 2 cos,   n(v) = v / ||v||

swept over eta. The eigenmode analysis predicts that the L2 dynamics have a non-collapsed fixed point only while
eta is small relative to the augmentation-dependent scale (about 1 / (2 (1 + sigma_aug^2)) = 0.25 here) and
collapse (W -> 0) beyond; with the cosine loss a stable non-collapsed equilibrium exists at every eta.

Collapse thresholds: a run is collapsed when ``||W||_F < 1e-3 ||W_0||_F`` (all inputs map to ~0) or the
effective rank of the embedding covariance (of 16) falls below 2 (the embeddings span a line). The sweep runs on
seed ``seed`` (quick) or ``seed .. seed + 2`` (full).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

import ssl_fast
from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import MarkdownReport, plots

from ._common import ClaimSpec, LabResult, conclude, f, out_dir

NAME = "normalization"
FINDING = ("linear BYOL: with the L2 loss strong weight decay collapses the representation; with the cosine "
           "loss (normalized features) a non-collapsed equilibrium survives the whole sweep")
N_DIM, BATCH, LR, TAU, AUG = 16, 128, 0.05, 0.99, 1.0
ETAS = (0.0, 0.03, 0.1, 0.2, 0.3, 0.5, 1.0, 2.0)
ETAS_QUICK = (0.0, 0.1, 0.5, 1.0, 2.0)
NORM_COLLAPSE = 1e-3
RANK_COLLAPSE = 2.0


def train(loss: str, eta: float, *, steps: int, seed: int):
    """One linear BYOL run; returns a dict of final diagnostics and the weights."""
    g = torch.Generator().manual_seed(seed)
    n = N_DIM
    w = torch.nn.Parameter(torch.randn(n, n, generator=g) / math.sqrt(n))
    wp = torch.nn.Parameter(torch.randn(n, n, generator=g) / math.sqrt(n))
    wa = w.detach().clone()
    w0 = float(w.detach().norm())
    opt = torch.optim.SGD([w, wp], lr=LR, weight_decay=eta)
    norms = []
    for step in range(steps):
        x = torch.randn(BATCH, n, generator=g)
        x1 = x + AUG * torch.randn(BATCH, n, generator=g)
        x2 = x + AUG * torch.randn(BATCH, n, generator=g)
        p = x1 @ w.T @ wp.T
        with torch.no_grad():
            z = x2 @ wa.T
        if loss == "cosine":
            p, z = F.normalize(p, dim=1), F.normalize(z, dim=1)
        value = (p - z).square().sum(dim=1).mean()
        opt.zero_grad(set_to_none=True)
        value.backward()
        opt.step()
        ssl_fast.ema_update_([wa], [w.detach()], TAU)
        if step % max(steps // 30, 1) == 0:
            norms.append((step, w.detach().norm()))
    xe = torch.randn(4096, n, generator=torch.Generator().manual_seed(seed + 999))
    emb = xe @ w.detach().T
    spec = dg.covariance_spectrum(emb)
    er = float(dg.effective_rank(spec)) if float(spec[0]) > 0 else 1.0
    wn = float(w.detach().norm())
    collapsed = wn < NORM_COLLAPSE * w0 or er < RANK_COLLAPSE
    align = float(dg.predictor_alignment(wp, emb).mean()) if wn > 0 else float("nan")
    return {"loss": loss, "eta": eta, "w_norm": wn, "w_norm_rel": wn / w0, "effective_rank": er,
            "std_sqrt_d": float(dg.normalized_std(emb).mean() * math.sqrt(n)) if wn > 0 else 0.0,
            "predictor_alignment": align, "collapsed": collapsed, "final_loss": float(value.detach()),
            "spectrum": spec, "norms": [(s, float(v)) for s, v in norms]}


def _healthy_decades(r: dict) -> float:
    """How far (decades) a run is from the collapse criteria on the healthy side (< 0: collapsed)."""
    w = math.log10(r["w_norm_rel"] / NORM_COLLAPSE) if r["w_norm_rel"] > 0 else -math.inf
    return min(w, math.log10(r["effective_rank"] / RANK_COLLAPSE))


WEAK, STRONG = 0.1, 1.0  # weight decays below / well above the predicted L2 scale 1 / (2 (1 + sigma_aug^2)) = 0.25
# (at 800 steps the L2 run at 0.5 is still shrinking: ||W|| / ||W0|| about 1e-3, on the collapse threshold)
# Each claim's noise per budget: the standard deviation of its effect over seeds x 1 and 2 threads, rounded up
# to one significant digit; measured by `python -m ssl_fast.lab.margins` (docs/lab/margins.md).
# (l2-strong-wd-collapses at the full budget: every measured run ends with ||W|| = 0 exactly, an infinite
# effect without spread; it keeps the quick budget's noise)
NOISE = {"l2-weak-wd-healthy": {"quick": 0.03, "full": 0.03}, "l2-strong-wd-collapses": {"quick": 0.5, "full": 0.5},
         "cosine-never-collapses": {"quick": 0.03, "full": 0.03}}
CLAIMS = {c.key: c for c in (
    ClaimSpec("l2-weak-wd-healthy", f"L2 loss: weight decay <= {WEAK} does not collapse (effect: the smallest "
              f"distance to the collapse criteria, in decades of ||W|| / ||W0|| / {NORM_COLLAPSE} or effective rank "
              f"/ {RANK_COLLAPSE}, over those weight decays)", "decades", NOISE["l2-weak-wd-healthy"]),
    ClaimSpec("l2-strong-wd-collapses", f"L2 loss: every weight decay >= {STRONG} collapses (effect: the smallest "
              f"distance past a collapse criterion over those weight decays, in decades)", "decades",
              NOISE["l2-strong-wd-collapses"]),
    ClaimSpec("cosine-never-collapses", "cosine loss: no weight decay of the sweep collapses (effect: the smallest "
              "distance to the collapse criteria over the sweep, in decades)", "decades",
              NOISE["cosine-never-collapses"]),
)}


def claims(numbers: dict, quick: bool) -> list:
    """The experiment's claims from its numbers (each run's ||W|| / ||W0|| and effective rank)."""
    seeds, etas = numbers["seeds"], numbers["etas"]

    def run_of(loss, eta, sd):
        return numbers[f"{loss}_eta{eta}_seed{sd}"]

    return [
        CLAIMS["l2-weak-wd-healthy"].measure(
            [min(_healthy_decades(run_of("l2", e, sd)) for e in etas if e <= WEAK) for sd in seeds], seeds, quick),
        CLAIMS["l2-strong-wd-collapses"].measure(
            [min(-_healthy_decades(run_of("l2", e, sd)) for e in etas if e >= STRONG) for sd in seeds], seeds, quick),
        CLAIMS["cosine-never-collapses"].measure(
            [min(_healthy_decades(run_of("cosine", e, sd)) for e in etas) for sd in seeds], seeds, quick),
    ]


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    d = out_dir(out, NAME)
    steps = 800 if quick else 1500
    etas = ETAS_QUICK if quick else ETAS
    seeds = [seed] if quick else [seed, seed + 1, seed + 2]
    rep = MarkdownReport("Lab: feature normalization vs weight decay in linear BYOL", d)
    rep.paragraph(__doc__.split("\n", 2)[2])
    runs = {(k, e, sd): train(k, e, steps=steps, seed=sd) for sd in seeds for k in ("l2", "cosine") for e in etas}
    rep.heading(f"Sweep ({steps} steps, seeds {', '.join(map(str, seeds))})")
    rep.table(["seed", "loss", "weight decay", "||W|| / ||W0||", "effective rank (of 16)", "std x sqrt(d)",
               "predictor alignment", "collapsed"],
              [[sd, r["loss"], r["eta"], r["w_norm_rel"], r["effective_rank"], r["std_sqrt_d"],
                r["predictor_alignment"], r["collapsed"]] for (_, _, sd), r in runs.items()])
    rep.paragraph("Predictor alignment: mean over the eigenvectors u of the predictor input's correlation matrix "
                  "of |u^T Wp u| / ||Wp u|| (1: Wp's eigenbasis is F's, as DirectPred predicts; ~0.2 random).")
    s0 = seeds[0]
    er_curves = {k: [runs[(k, e, s0)]["effective_rank"] for e in etas] for k in ("l2", "cosine")}
    nrm_curves = {k: [max(runs[(k, e, s0)]["w_norm_rel"], 1e-12) for e in etas] for k in ("l2", "cosine")}
    rep.image(plots.plot_curves(nrm_curves, f"{d}/weight_norm_vs_wd.png", x=list(etas), logy=True,
                                xlabel="weight decay", ylabel="||W|| / ||W0|| (floor 1e-12)",
                                title=f"online weight norm after training (seed {s0})",
                                hlines={"collapse": NORM_COLLAPSE}),
              "weight norm vs weight decay")
    rep.image(plots.plot_curves(er_curves, f"{d}/effective_rank_vs_wd.png", x=list(etas), xlabel="weight decay",
                                ylabel="effective rank", title=f"embedding effective rank (of 16, seed {s0})"),
              "effective rank vs weight decay")
    numbers = {f"{k}_eta{e}_seed{sd}": {"w_norm_rel": r["w_norm_rel"], "effective_rank": r["effective_rank"],
                                        "collapsed": r["collapsed"]} for (k, e, sd), r in runs.items()}
    onset = [min([e for e in etas if runs[("l2", e, sd)]["collapsed"]], default=None) for sd in seeds]
    numbers.update({"seeds": seeds, "etas": list(etas), "steps": steps, "l2_collapse_from": onset})
    cl = claims(numbers, quick)
    cos_coll = sorted({e for (k, e, _), r in runs.items() if k == "cosine" and r["collapsed"]})
    min_cos_er = min(r["effective_rank"] for (k, _, _), r in runs.items() if k == "cosine")
    line = (f"over {len(seeds)} seed(s): L2 loss collapses from weight decay "
            f"{', '.join('never' if o is None else f'{o:g}' for o in onset)} (per seed; ||W||/||W0|| <= "
            f"{f(max(runs[('l2', etas[-1], sd)]['w_norm_rel'] for sd in seeds))} at {etas[-1]}); cosine loss "
            f"collapsed at {cos_coll if cos_coll else 'no'} weight decay (effective rank >= {f(min_cos_er)} of 16, "
            f"||W||/||W0|| >= {f(min(runs[('cosine', etas[-1], sd)]['w_norm_rel'] for sd in seeds))} at {etas[-1]})")
    return conclude(NAME, FINDING, rep, cl, line, quick, numbers)
