"""``ssl-fast lab alignment-uniformity``: contrastive learning = alignment + uniformity (Wang & Isola 2020).

Alignment ``E ||f(x) - f(y)||^2`` over positive pairs and uniformity ``log E exp(-2 ||f(x) - f(y)||^2)`` over
all pairs, on the unit sphere (``ssl_fast.diagnostics.alignment`` / ``uniformity``), for:

- a random encoder (initialization), a supervised encoder (cross-entropy on the labels, same views), and a
  contrastive encoder (NT-Xent, ``ssl_fast.ntxent``, T = 0.2): the contrastive one is the most uniform while
  keeping positive pairs aligned;
- an encoder trained on the alignment loss alone: it collapses (uniformity -> 0, every input to one point);
- an encoder trained on the uniformity loss alone: uniform but not clustered (positive pairs are not
  aligned; worse kNN accuracy than the contrastive encoder).

What runs: ``ssl_fast.methods.SimCLR`` (``ssl_fast.nn.NTXentLoss``, T = 0.2) on ``ssl_fast.methods.SmallCNN``
(width 8) whose projector is one ``nn.Linear(64, 64)``: its output is the embedding that is measured (a linear
last layer, as the encoders of Wang & Isola; the CNN's own output is post-ReLU, confined to the positive
orthant). The alignment-only and uniformity-only encoders are the same SimCLR with its criterion replaced by
``ssl_fast.diagnostics.alignment`` / ``uniformity`` (``AlignUniformSimCLR``); the supervised encoder is the
same backbone + linear embedding + a linear classifier trained with cross-entropy on the same views. 16 x 16
digits, ``ssl_fast.data.digits_view`` views, batch 256, Adam lr 1e-3; several seeds (initialization, data
order, views; shared by the encoders of a seed). Metrics on the held-out split (alignment over two fresh
views), kNN / linear probe on the embedding.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics import MarkdownReport
from ssl_fast.methods import Method, SimCLR
from ssl_fast.train import knn_accuracy, linear_probe

from . import _image as I
from ._common import ClaimSpec, LabResult, conclude, f, out_dir

NAME = "alignment-uniformity"
FINDING = ("the contrastive encoder is both aligned and uniform (more uniform than random and supervised); "
           "alignment alone collapses, uniformity alone does not cluster")
DIM, T, LR, BATCH = I.DIM, 0.2, 1e-3, 256
COLLAPSED_UNIFORMITY = -0.1   # uniformity above this: (nearly) complete collapse
ALIGN_RATIO_FAR = 0.75        # positive-pair distance / random-pair distance above this: views not clustered
OBJECTIVES = ("supervised", "contrastive", "alignment only", "uniformity only")


class AlignmentLoss(nn.Module):
    def forward(self, z0, z1):
        return dg.alignment(z0, z1)


class UniformityLoss(nn.Module):
    """Wang & Isola's uniformity loss on both views."""

    def forward(self, z0, z1):
        return 0.5 * (dg.uniformity(z0) + dg.uniformity(z1))


class AlignUniformSimCLR(SimCLR):
    """SimCLR with a linear projector (the embedding) and, for ``objective`` "alignment only" /
    "uniformity only", that loss instead of NT-Xent."""

    def __init__(self, backbone, objective: str = "contrastive"):
        super().__init__(backbone, DIM, temperature=T)
        self.projector = nn.Linear(DIM, DIM)
        if objective == "alignment only":
            self.criterion = AlignmentLoss()
        elif objective == "uniformity only":
            self.criterion = UniformityLoss()

    def embed(self, x):
        return self.projector(self.backbone(x))


class Supervised(Method):
    """The supervised baseline: backbone -> linear embedding -> linear classifier, cross-entropy on both views."""

    wants_labels = True

    def __init__(self, backbone, num_classes: int = 10):
        super().__init__(backbone, DIM)
        self.projector = nn.Linear(DIM, DIM)
        self.classifier = nn.Linear(DIM, num_classes)
        self.labels = None

    def embed(self, x):
        return self.projector(self.backbone(x))

    def forward(self, views, step: int = 0, total_steps: int = 1):
        logits = self.classifier(self.embed(torch.cat(views[:2])))
        return F.cross_entropy(logits, self.labels.repeat(2)), {}


class _Embed(nn.Module):
    def __init__(self, m):
        super().__init__()
        self.m = m

    def forward(self, x):
        return self.m.embed(x)


def build(objective: str, seed: int) -> nn.Module:
    torch.manual_seed(seed)
    bb = I.backbone()
    if objective == "supervised":
        return Supervised(bb)
    return AlignUniformSimCLR(bb, "contrastive" if objective == "random" else objective)


def _measure(source, m, seed):
    g = torch.Generator().manual_seed(seed + 12345)
    emb = _Embed(m).eval()
    with torch.no_grad():
        v1, v2 = I.views(2)(source.test_x, g)
        z1, z2 = emb(v1), emb(v2)
    (ftr, ytr), (z, yte) = I.features(emb, source, "train"), I.features(emb, source, "test")
    m.train()
    zn = F.normalize(z1.double(), dim=1)  # the same views as the alignment
    n = zn.shape[0]
    pair_d2 = 2.0 - 2.0 * (float(zn.sum(0).square().sum()) - n) / (n * (n - 1))  # E ||x_i - x_j||^2, i != j
    align = float(dg.alignment(z1, z2))
    return {"alignment": align, "uniformity": float(dg.uniformity(z)), "pair_d2": pair_d2,
            "align_ratio": align / max(pair_d2, 1e-12),
            "std_sqrt_d": float(dg.normalized_std(z).mean()) * math.sqrt(DIM),
            "knn": knn_accuracy(ftr, ytr, z, yte, source.num_classes),
            "knn_aug": knn_accuracy(ftr, ytr, z1, yte, source.num_classes),
            "probe": linear_probe(ftr, ytr, z, yte, source.num_classes, seed=seed)[1]}


# Each claim's noise per budget: the standard deviation of its effect over seeds x 1 and 2 threads, rounded up
# to one significant digit; measured by `python -m ssl_fast.lab.margins` (docs/lab/margins.md). The full budget
# is measured only by the committed run (seeds 0-2, one thread): its noise is the larger of the quick one and
# that run's spread, and a claim is asserted there where it is asserted at the quick budget.
NOISE = {"contrastive-most-uniform": 0.04, "contrastive-aligned": 0.04, "alignment-only-collapses": 7e-4,
         "uniformity-only-uniform": 0.05, "uniformity-only-not-clustered": 0.02, "uniformity-only-worse-knn": 0.04}
FULL_NOISE = {"uniformity-only-uniform": 0.06}


def _q(key):
    return {"quick": NOISE[key], "full": FULL_NOISE.get(key, NOISE[key])}


CLAIMS = {c.key: c for c in (
    ClaimSpec("contrastive-most-uniform", "the contrastive encoder is more uniform than the random and the "
              "supervised ones (effect: the lower of their uniformities minus the contrastive one)", "uniformity",
              _q("contrastive-most-uniform")),
    ClaimSpec("contrastive-aligned", "the contrastive encoder aligns positive pairs better than the uniformity-only "
              "one (effect: uniformity-only alignment minus contrastive alignment)", "alignment",
              _q("contrastive-aligned")),
    ClaimSpec("alignment-only-collapses", f"alignment alone collapses (effect: its uniformity minus "
              f"{COLLAPSED_UNIFORMITY}, the collapse threshold)", "uniformity", _q("alignment-only-collapses")),
    ClaimSpec("uniformity-only-uniform", "uniformity alone is at least as uniform as the contrastive encoder "
              "(effect: contrastive uniformity minus uniformity-only's)", "uniformity", _q("uniformity-only-uniform")),
    ClaimSpec("uniformity-only-not-clustered", f"uniformity alone does not cluster the views: positive pairs nearly "
              f"as far apart as random pairs (effect: their distance ratio minus {ALIGN_RATIO_FAR})",
              "distance ratio", _q("uniformity-only-not-clustered")),
    ClaimSpec("uniformity-only-worse-knn", "uniformity alone classifies augmented views worse than the contrastive "
              "encoder (effect: contrastive minus uniformity-only kNN accuracy, augmented queries)", "accuracy",
              _q("uniformity-only-worse-knn")),
)}


def claims(numbers: dict, quick: bool) -> list:
    """The experiment's claims from its numbers (the per-seed measures of each encoder)."""
    per, seeds = numbers["per_seed"], numbers["seeds"]

    def v(encoder, metric):
        return per[encoder][metric]

    c_u, r_u, s_u = v("contrastive", "uniformity"), v("random", "uniformity"), v("supervised", "uniformity")
    u_u = v("uniformity only", "uniformity")
    effects = {
        "contrastive-most-uniform": [min(r, s) - c for c, r, s in zip(c_u, r_u, s_u)],
        "contrastive-aligned": [u - c for c, u in zip(v("contrastive", "alignment"),
                                                      v("uniformity only", "alignment"))],
        "alignment-only-collapses": [a - COLLAPSED_UNIFORMITY for a in v("alignment only", "uniformity")],
        "uniformity-only-uniform": [c - u for c, u in zip(c_u, u_u)],
        "uniformity-only-not-clustered": [r - ALIGN_RATIO_FAR for r in v("uniformity only", "align_ratio")],
        "uniformity-only-worse-knn": [c - u for c, u in zip(v("contrastive", "knn_aug"),
                                                            v("uniformity only", "knn_aug"))],
    }
    return [CLAIMS[k].measure(e, seeds, quick) for k, e in effects.items()]


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    d = out_dir(out, NAME.replace("-", "_"))
    steps = 200 if quick else 400
    seeds = I.seeds(seed, quick, full=3, fast=1)
    source = I.data(0)
    rep = MarkdownReport("Lab: alignment and uniformity", d)
    rep.paragraph(__doc__.split("\n", 2)[2])
    keys = ("alignment", "uniformity", "align_ratio", "std_sqrt_d", "knn", "knn_aug", "probe")
    per = {k: {m: [] for m in keys} for k in ("random",) + OBJECTIVES}
    seed_rows = []
    for sd in seeds:
        for obj in per:
            m = build(obj, sd)
            if obj != "random":
                I.train(m, source, steps=steps, seed=sd, batch=BATCH, lr=LR)
            mm = _measure(source, m, sd)
            for k in keys:
                per[obj][k].append(mm[k])
            seed_rows.append([sd, obj] + [mm[k] for k in keys])
    res = {k: {m: I.stats(v)["mean"] for m, v in vals.items()} for k, vals in per.items()}
    rep.heading(f"Encoders ({steps} steps, seeds {', '.join(map(str, seeds))})")
    rep.paragraph("Mean ± std over the seeds (min..max).")
    head = ["alignment (lower: better)", "uniformity (lower: better)", "alignment / E d^2 of random pairs",
            "std x sqrt(d)", "kNN acc", "kNN acc, augmented queries", "linear probe acc"]
    rep.table(["encoder"] + head, [[k] + [I.pm(v[m]) for m in keys] for k, v in per.items()])
    rep.heading("Per seed")
    rep.table(["seed", "encoder"] + head, seed_rows)
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=100)
    for k, m in res.items():
        ax.scatter(m["uniformity"], m["alignment"], s=40)
        ax.annotate(k, (m["uniformity"], m["alignment"]), fontsize=8, xytext=(4, 4), textcoords="offset points")
    ax.set_xlabel("uniformity (log E exp(-2 d^2))")
    ax.set_ylabel("alignment (E d^2 of positive pairs)")
    ax.set_title("alignment vs uniformity (lower-left is better)", fontsize=10)
    ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(f"{d}/alignment_uniformity.png")
    plt.close(fig)
    rep.image(f"{d}/alignment_uniformity.png", "alignment vs uniformity")
    numbers = {"encoders": res, "per_seed": per, "seeds": seeds, "steps": steps}
    cl = claims(numbers, quick)
    c, r, s, a, u = (res[k] for k in ("contrastive", "random", "supervised", "alignment only", "uniformity only"))
    line = (f"means over {len(seeds)} seed(s), (alignment, uniformity, kNN): random ({f(r['alignment'])}, "
            f"{f(r['uniformity'])}, {r['knn']:.3f}), supervised ({f(s['alignment'])}, {f(s['uniformity'])}, "
            f"{s['knn']:.3f}), contrastive ({f(c['alignment'])}, {f(c['uniformity'])}, {c['knn']:.3f}), "
            f"alignment-only ({f(a['alignment'])}, {f(a['uniformity'])}), uniformity-only ({f(u['alignment'])}, "
            f"{f(u['uniformity'])}, {u['knn']:.3f}); kNN on augmented views: contrastive {c['knn_aug']:.3f}, "
            f"uniformity-only {u['knn_aug']:.3f}; positive/random-pair distance: contrastive "
            f"{f(c['align_ratio'])}, uniformity-only {f(u['align_ratio'])}")
    return conclude(NAME, FINDING, rep, cl, line, quick, numbers)
