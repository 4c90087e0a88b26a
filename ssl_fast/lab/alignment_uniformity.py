"""``ssl-fast lab alignment-uniformity``: contrastive learning = alignment + uniformity (Wang & Isola 2020).

Alignment ``E ||f(x) - f(y)||^2`` over positive pairs and uniformity ``log E exp(-2 ||f(x) - f(y)||^2)`` over
all pairs, on the unit sphere (``ssl_fast.diagnostics.alignment`` / ``uniformity``), for:

- a random encoder (initialization), a supervised encoder (cross-entropy on the labels, same views), and a
  contrastive encoder (NT-Xent, ``ssl_fast.ntxent``, T = 0.2): the contrastive one is the most uniform while
  keeping positive pairs aligned;
- an encoder trained on the alignment loss alone: it collapses (uniformity -> 0, every input to one point);
- an encoder trained on the uniformity loss alone: uniform but not clustered (positive pairs are not
  aligned; worse kNN accuracy than the contrastive encoder).

Set-up: digits (16 x 16), MLP encoder whose 64-dim output is the embedding (no projector), batch 256, Adam lr
1e-3, the same seed and views for every run. Metrics on the held-out split (alignment over two fresh views).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import ssl_fast
from ssl_fast import diagnostics as dg
from ssl_fast.diagnostics.report import MarkdownReport

from . import _digits as D
from ._common import LabResult, f, out_dir

NAME = "alignment-uniformity"
FINDING = ("the contrastive encoder is both aligned and uniform (more uniform than random and supervised); "
           "alignment alone collapses, uniformity alone does not cluster")
DIM, T, LR, BATCH = 64, 0.2, 1e-3, 256
COLLAPSED_UNIFORMITY = -0.1   # uniformity above this: (nearly) complete collapse
KNN_MARGIN = 0.02             # uniformity-only kNN (augmented queries) must be below the contrastive one by this
ALIGN_RATIO_FAR = 0.75        # positive-pair distance / random-pair distance above this: views not clustered


def train(data, *, objective: str, steps: int, seed: int):
    torch.manual_seed(seed)
    g = torch.Generator().manual_seed(seed)
    enc = D.Encoder(dim=DIM)
    head = nn.Linear(DIM, 10) if objective == "supervised" else nn.Identity()
    opt = torch.optim.Adam(list(enc.parameters()) + list(head.parameters()), lr=LR)
    it = D.batches(data.train_x.shape[0], BATCH, torch.Generator().manual_seed(seed + 1))
    for _ in range(steps):
        idx = next(it)
        x = data.train_x[idx]
        if objective == "supervised":
            loss = F.cross_entropy(head(enc(D.augment(x, g))), data.train_y[idx])
        else:
            z1, z2 = enc(D.augment(x, g)), enc(D.augment(x, g))
            if objective == "contrastive":
                loss = ssl_fast.ntxent(z1, z2, T)
            elif objective == "alignment only":
                loss = dg.alignment(z1, z2)
            else:  # uniformity only (both views, as Wang & Isola's uniform loss)
                loss = 0.5 * (dg.uniformity(z1) + dg.uniformity(z2))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
    return enc


def _measure(data, enc, seed):
    g = torch.Generator().manual_seed(seed + 12345)
    was = enc.training
    enc.eval()
    with torch.no_grad():
        z1, z2 = enc(D.augment(data.test_x, g)), enc(D.augment(data.test_x, g))
    enc.train(was)
    z = D.features(enc, data.test_x)
    ev = D.evaluate(enc, data)
    zn = F.normalize(z1.double(), dim=1)  # the same views as the alignment
    n = zn.shape[0]
    pair_d2 = 2.0 - 2.0 * (float(zn.sum(0).square().sum()) - n) / (n * (n - 1))  # E ||x_i - x_j||^2, i != j
    align = float(dg.alignment(z1, z2))
    knn_aug = D.knn_accuracy(D.features(enc, data.train_x), data.train_y, z1, data.test_y)
    return {"alignment": align, "uniformity": float(dg.uniformity(z)), "pair_d2": pair_d2,
            "align_ratio": align / max(pair_d2, 1e-12),
            "std_sqrt_d": float(dg.normalized_std(z).mean()) * math.sqrt(DIM), "knn": ev["knn"],
            "knn_aug": knn_aug, "probe": ev["probe"]}


def run(out: str, *, quick: bool = False, seed: int = 0) -> LabResult:
    d = out_dir(out, NAME.replace("-", "_"))
    steps = 300 if quick else 800
    data = D.load(seed)
    rep = MarkdownReport("Lab: alignment and uniformity", d)
    rep.paragraph(__doc__.split("\n", 2)[2])
    res = {}
    torch.manual_seed(seed)
    res["random"] = _measure(data, D.Encoder(dim=DIM), seed)
    for obj in ("supervised", "contrastive", "alignment only", "uniformity only"):
        res[obj] = _measure(data, train(data, objective=obj, steps=steps, seed=seed), seed)
    rep.heading(f"Encoders ({steps} steps, seed {seed})")
    rep.table(["encoder", "alignment (lower: better)", "uniformity (lower: better)",
               "alignment / E d^2 of random pairs", "std x sqrt(d)", "kNN acc", "kNN acc, augmented queries",
               "linear probe acc"],
              [[k, m["alignment"], m["uniformity"], m["align_ratio"], m["std_sqrt_d"], m["knn"], m["knn_aug"],
                m["probe"]] for k, m in res.items()])
    rep.paragraph("kNN acc, augmented queries: each held-out image is replaced by a random view before the "
                  "weighted kNN against the clean training set (what an encoder invariant to the views keeps).")
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
    c, r, s, a, u = (res[k] for k in ("contrastive", "random", "supervised", "alignment only", "uniformity only"))
    checks = {
        "contrastive more uniform than random and supervised": c["uniformity"] < min(r["uniformity"], s["uniformity"]),
        "contrastive better aligned than uniformity-only": c["alignment"] < u["alignment"],
        "alignment-only collapsed": a["uniformity"] > COLLAPSED_UNIFORMITY,
        "uniformity-only uniform (within 10% of contrastive)": u["uniformity"] < 0.9 * c["uniformity"],
        "uniformity-only does not cluster views (positive pairs nearly as far as random pairs)":
            u["align_ratio"] > ALIGN_RATIO_FAR,
        "uniformity-only: kNN on augmented views below contrastive": u["knn_aug"] < c["knn_aug"] - KNN_MARGIN,
    }
    passed = all(checks.values())
    verdict = (f"(alignment, uniformity, kNN): random ({f(r['alignment'])}, {f(r['uniformity'])}, {r['knn']:.3f}), "
               f"supervised ({f(s['alignment'])}, {f(s['uniformity'])}, {s['knn']:.3f}), contrastive "
               f"({f(c['alignment'])}, {f(c['uniformity'])}, {c['knn']:.3f}), alignment-only "
               f"({f(a['alignment'])}, {f(a['uniformity'])}), uniformity-only ({f(u['alignment'])}, "
               f"{f(u['uniformity'])}, {u['knn']:.3f}); kNN on augmented views: contrastive {c['knn_aug']:.3f}, "
               f"uniformity-only {u['knn_aug']:.3f}; positive/random-pair distance: contrastive "
               f"{f(c['align_ratio'])}, uniformity-only {f(u['align_ratio'])}: "
               + ("as published" if passed
                  else "NOT as published: " + ", ".join(k for k, ok in checks.items() if not ok)))
    rep.heading("Verdict")
    rep.paragraph(f"Checks (collapse: uniformity > {COLLAPSED_UNIFORMITY}; kNN margin {KNN_MARGIN}; not clustered: "
                  f"positive/random-pair distance > {ALIGN_RATIO_FAR}): "
                  + "; ".join(f"{k}: {'yes' if ok else 'NO'}" for k, ok in checks.items()))
    rep.verdict(verdict, passed)
    return LabResult(NAME, FINDING, verdict, passed, {"encoders": res, "checks": checks}, rep.write())
