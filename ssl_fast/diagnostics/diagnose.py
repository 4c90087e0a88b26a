"""Collapse diagnostics of embeddings, with plots and a markdown report (the work behind ``ssl-fast diagnose``).

:func:`diagnose_embeddings` works on any tensors (held-out embeddings, optionally a second view and labels).
``ssl-fast diagnose RUN`` rebuilds the model of a training run and embeds the data first: that is
``ssl_fast.train.restore.diagnose_checkpoint``, which calls this.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Mapping, Optional, Tuple

import torch

from . import metrics, plots
from .knn import knn_accuracy
from .report import MarkdownReport, fmt

HEALTHY_STD = 0.5     # std x sqrt(d) above: healthy
COLLAPSED_STD = 0.15  # below: collapsed
RANK_FRACTION = 0.1   # rank at 1e-3 below this fraction of d: dimensional collapse


def summarize(z: torch.Tensor, z2: Optional[torch.Tensor] = None) -> Dict[str, float]:
    """Floats for one embedding matrix (N, D): ranks, uniformity, std, dead fraction (+ alignment with z2)."""
    d = z.shape[1]
    s = metrics.covariance_spectrum(z)
    std = metrics.normalized_std(z)
    out = {"dim": d, "samples": z.shape[0],
           "effective_rank": float(metrics.effective_rank(s)),
           "effective_rank_singular_values": float(metrics.effective_rank(s.clamp_min(0).sqrt())),
           "rank_at_1e-3": int((s > 1e-3 * s[0]).sum()) if float(s[0]) > 0 else 0,
           "uniformity": float(metrics.uniformity(z[:4096])),
           "std_sqrt_d": float(std.mean()) * math.sqrt(d),
           "dead_fraction": float((std < 0.1 / math.sqrt(d)).double().mean()),
           "nonnegative": bool(z.min() >= 0)}
    if z2 is not None:
        out["alignment"] = float(metrics.alignment(z, z2))
    return out


def state_of(summary: Mapping[str, float]) -> str:
    """'complete collapse' / 'dimensional collapse' / 'healthy' from a :func:`summarize` dict (thresholds above).

    Non-negative features (ReLU outputs) share a large mean direction, which alone lowers the normalized std:
    they are judged by their spectrum only.
    """
    rank_low = summary["rank_at_1e-3"] < RANK_FRACTION * summary["dim"]
    if summary.get("nonnegative"):
        if summary["rank_at_1e-3"] <= 1:
            return "complete collapse"
        return "dimensional collapse" if rank_low else "healthy (non-negative features: judged by the spectrum)"
    if summary["std_sqrt_d"] < COLLAPSED_STD:
        return "complete collapse"
    if rank_low or summary["std_sqrt_d"] < HEALTHY_STD:
        return "dimensional collapse"
    return "healthy"


def diagnose_embeddings(embeddings: Mapping[str, torch.Tensor], out_dir: str, *, title: str = "Collapse diagnostics",
                        views: Optional[Mapping[str, Tuple[torch.Tensor, torch.Tensor]]] = None,
                        labels: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                        train_embeddings: Optional[Mapping[str, torch.Tensor]] = None,
                        notes: str = "") -> Tuple[str, Dict[str, Dict[str, float]]]:
    """Diagnose held-out embeddings; writes ``report.md`` and ``spectrum.png`` into ``out_dir``.

    Args:
        embeddings: name -> held-out embeddings (N, D) (e.g. ``{"representation": r, "projection": z}``).
        out_dir: output folder.
        views: name -> (z1, z2), embeddings of two augmented views of the same held-out images (alignment).
        labels: (train labels, test labels) for a weighted kNN with ``train_embeddings``.
        train_embeddings: name -> training-split embeddings (kNN bank).
        notes: a paragraph added under the title.

    Returns:
        (report path, {name: summary dict}).
    """
    os.makedirs(out_dir, exist_ok=True)
    rep = MarkdownReport(title, out_dir)
    if notes:
        rep.paragraph(notes)
    summaries, spectra = {}, {}
    for name, z in embeddings.items():
        z = z.detach().flatten(1).cpu()
        pair = views.get(name) if views else None
        s = summarize(z, pair[1].detach().flatten(1).cpu() if pair is not None else None)
        if pair is not None:  # alignment of the two views, not of (clean, view)
            a, b = (v.detach().flatten(1).cpu() for v in pair)
            s["alignment"] = float(metrics.alignment(a, b))
        if labels is not None and train_embeddings is not None and name in train_embeddings:
            bank = train_embeddings[name].detach().flatten(1).cpu().double()
            s["knn_accuracy"] = knn_accuracy(bank, labels[0].cpu(), z.double(), labels[1].cpu())
        s["state"] = state_of(s)
        summaries[name] = s
        spectra[name] = metrics.covariance_spectrum(z)
    keys = ["dim", "samples", "rank_at_1e-3", "effective_rank", "effective_rank_singular_values", "uniformity",
            "alignment", "std_sqrt_d", "dead_fraction", "knn_accuracy", "state"]
    keys = [k for k in keys if any(k in s for s in summaries.values())]
    rep.table(["embedding"] + keys, [[n] + [s.get(k, "") for k in keys] for n, s in summaries.items()])
    rep.paragraph(f"std_sqrt_d: mean per-dimension std of the l2-normalized embeddings times sqrt(d) (1 isotropic, "
                  f"0 complete collapse). State: complete collapse when std_sqrt_d < {COLLAPSED_STD}; dimensional "
                  f"collapse when fewer than {RANK_FRACTION:.0%} of the dimensions have a covariance eigenvalue "
                  f"above 1e-3 of the largest or std_sqrt_d < {HEALTHY_STD}; healthy otherwise. Non-negative "
                  f"features (ReLU outputs) share a large mean direction, which alone lowers std_sqrt_d: they are "
                  f"judged by the spectrum only.")
    rep.image(plots.plot_spectra(spectra, os.path.join(out_dir, "spectrum.png"), title=title), "spectrum")
    with open(os.path.join(out_dir, "spectrum.csv"), "w") as fh:
        names = list(spectra)
        fh.write("index," + ",".join(names) + "\n")
        for i in range(max(v.numel() for v in spectra.values())):
            fh.write(f"{i + 1}," + ",".join(fmt(float(spectra[n][i]), 8) if i < spectra[n].numel() else ""
                                            for n in names) + "\n")
    return rep.write(), summaries


__all__ = ["diagnose_embeddings", "state_of", "summarize"]
