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
from ssl_fast.diagnostics.report import MarkdownReport
from ssl_fast.methods import SimCLR
from ssl_fast.methods.base import Method

from . import _image as I
from ._common import LabResult, f, out_dir

NAME = "alignment-uniformity"
FINDING = ("the contrastive encoder is both aligned and uniform (more uniform than random and supervised); "
           "alignment alone collapses, uniformity alone does not cluster")
DIM, T, LR, BATCH = I.DIM, 0.2, 1e-3, 256
COLLAPSED_UNIFORMITY = -0.1   # uniformity above this: (nearly) complete collapse
KNN_MARGIN = 0.02             # uniformity-only kNN (augmented queries) must be below the contrastive one by this
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
    from ssl_fast.train.evaluate import knn_accuracy, linear_probe

    return {"alignment": align, "uniformity": float(dg.uniformity(z)), "pair_d2": pair_d2,
            "align_ratio": align / max(pair_d2, 1e-12),
            "std_sqrt_d": float(dg.normalized_std(z).mean()) * math.sqrt(DIM),
            "knn": knn_accuracy(ftr, ytr, z, yte, source.num_classes),
            "knn_aug": knn_accuracy(ftr, ytr, z1, yte, source.num_classes),
            "probe": linear_probe(ftr, ytr, z, yte, source.num_classes, seed=seed)[1]}


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
    def seed_checks(i):
        c, r, s, a, u = ({m: per[k][m][i] for m in keys}
                         for k in ("contrastive", "random", "supervised", "alignment only", "uniformity only"))
        return {
            "contrastive more uniform than random and supervised":
                c["uniformity"] < min(r["uniformity"], s["uniformity"]),
            "contrastive better aligned than uniformity-only": c["alignment"] < u["alignment"],
            "alignment-only collapsed": a["uniformity"] > COLLAPSED_UNIFORMITY,
            "uniformity-only uniform (within 10% of contrastive)": u["uniformity"] < 0.9 * c["uniformity"],
            "uniformity-only does not cluster views (positive pairs nearly as far as random pairs)":
                u["align_ratio"] > ALIGN_RATIO_FAR,
            "uniformity-only: kNN on augmented views below contrastive": u["knn_aug"] < c["knn_aug"] - KNN_MARGIN,
        }

    by_seed = [seed_checks(i) for i in range(len(seeds))]
    checks = {k: all(sc[k] for sc in by_seed) for k in by_seed[0]}
    c, r, s, a, u = (res[k] for k in ("contrastive", "random", "supervised", "alignment only", "uniformity only"))
    passed = all(checks.values())
    verdict = (f"means over {len(seeds)} seed(s), (alignment, uniformity, kNN): random ({f(r['alignment'])}, {f(r['uniformity'])}, {r['knn']:.3f}), "
               f"supervised ({f(s['alignment'])}, {f(s['uniformity'])}, {s['knn']:.3f}), contrastive "
               f"({f(c['alignment'])}, {f(c['uniformity'])}, {c['knn']:.3f}), alignment-only "
               f"({f(a['alignment'])}, {f(a['uniformity'])}), uniformity-only ({f(u['alignment'])}, "
               f"{f(u['uniformity'])}, {u['knn']:.3f}); kNN on augmented views: contrastive {c['knn_aug']:.3f}, "
               f"uniformity-only {u['knn_aug']:.3f}; positive/random-pair distance: contrastive "
               f"{f(c['align_ratio'])}, uniformity-only {f(u['align_ratio'])}: "
               + ("as published on every seed" if passed
                  else "NOT as published: " + ", ".join(k for k, ok in checks.items() if not ok)))
    rep.heading("Verdict")
    rep.paragraph(f"Each check must hold on every seed (collapse: uniformity > {COLLAPSED_UNIFORMITY}; kNN margin {KNN_MARGIN}; not clustered: "
                  f"positive/random-pair distance > {ALIGN_RATIO_FAR}): "
                  + "; ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items()))
    rep.verdict(verdict, passed)
    return LabResult(NAME, FINDING, verdict, passed, {"encoders": res, "per_seed": per, "seeds": seeds,
                                                             "steps": steps, "checks": checks}, rep.write())
