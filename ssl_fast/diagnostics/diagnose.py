"""``ssl-fast diagnose``: collapse diagnostics of trained embeddings, with plots and a markdown report.

:func:`diagnose_embeddings` works on any tensors (held-out embeddings, optionally a second view and labels);
:func:`diagnose_checkpoint` loads a run directory or checkpoint of ``ssl-fast train``, rebuilds the model from the
saved config, embeds the held-out split, and calls it.
"""

from __future__ import annotations

import math
import os
from typing import Dict, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from . import metrics, plots
from .report import MarkdownReport, fmt

HEALTHY_STD = 0.5     # std x sqrt(d) above: healthy
COLLAPSED_STD = 0.15  # below: collapsed
RANK_FRACTION = 0.1   # rank at 1e-3 below this fraction of d: dimensional collapse


def _knn(train_f, train_y, test_f, test_y, k=20, t=0.07) -> float:
    a, b = F.normalize(train_f.double(), dim=1), F.normalize(test_f.double(), dim=1)
    sim = b @ a.T
    w, idx = sim.topk(min(k, a.shape[0]), dim=1)
    votes = torch.zeros(b.shape[0], int(max(train_y.max(), test_y.max())) + 1, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx].cpu(), (w / t).exp().cpu())
    return float((votes.argmax(1) == test_y.cpu()).double().mean())


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
            s["knn_accuracy"] = _knn(train_embeddings[name].detach().flatten(1).cpu(), labels[0], z, labels[1])
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


def _load_state(run_or_checkpoint: str):
    from ssl_fast.train.checkpoint import latest_good_checkpoint, load_checkpoint

    if os.path.isdir(run_or_checkpoint):
        state = latest_good_checkpoint(run_or_checkpoint)
        if state is None:
            raise FileNotFoundError(f"no readable checkpoint (ckpt_*.pt) in run directory {run_or_checkpoint!r}")
        return state, state.get("_path", run_or_checkpoint)
    return load_checkpoint(run_or_checkpoint), run_or_checkpoint


@torch.no_grad()
def diagnose_checkpoint(run_or_checkpoint: str, out_dir: Optional[str] = None, *, device: str = "cpu",
                        max_samples: int = 4096, seed: int = 0) -> Tuple[str, Dict[str, Dict[str, float]]]:
    """Diagnose an ``ssl-fast train`` run directory (its newest good checkpoint) or checkpoint file.

    Rebuilds data source, backbone and method from the checkpoint's config, embeds the held-out split (the
    representation, and the projector output where the method has a ``projector``), two augmented views of it
    (alignment; with the run's own augmentation pipeline) and the training split (kNN bank), then calls
    :func:`diagnose_embeddings`.

    Args:
        run_or_checkpoint: a run directory or a ``ckpt_*.pt`` file.
        out_dir: output folder (default ``<run dir>/diagnose``).
        device: where to run the encoder.
        max_samples: held-out images used at most.
        seed: seed of the augmented views.

    Returns:
        (report path, summaries).
    """
    from ssl_fast.data.datasets import build_source
    from ssl_fast.methods import build_backbone, build_method
    from ssl_fast.train.config import make_config
    from ssl_fast.train.evaluate import extract_features

    state, path = _load_state(run_or_checkpoint)
    cfg = make_config(overrides=dict(state["config"]))
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(path)), "diagnose")
    dev = torch.device(device)
    source = build_source(cfg.data, cfg.dataset, image_size=cfg.image_size)
    backbone, dim = build_backbone(cfg.backbone, source.channels, cfg.small_stem, cfg.width)
    method = build_method(cfg, backbone, dim, max(source.steps_per_epoch(cfg.batch_size), 1))
    method.load_state_dict(state["model"])
    method.to(dev).eval()
    towers = {"representation": method.encoder}
    projector = getattr(method, "projector", None)
    if isinstance(projector, torch.nn.Module):
        towers["projection"] = torch.nn.Sequential(method.encoder, projector).eval()
    emb, bank, views = {}, {}, {}
    test_y = train_y = None
    for name, tower in towers.items():
        te, test_y = extract_features(tower, source, "test", dev, cfg.image_size)
        tr, train_y = extract_features(tower, source, "train", dev, cfg.image_size)
        emb[name], bank[name] = te[:max_samples].cpu(), tr.cpu()
    test_y = test_y[:max_samples].cpu()
    try:  # two augmented views of the held-out images, with the run's own pipeline
        from ssl_fast.train.trainer import build_pipeline

        pipeline = build_pipeline(cfg, source, 0)
        xs = torch.cat([x for x, _ in source.eval_batches("test", 512)])[:max_samples].to(dev)
        g = torch.Generator().manual_seed(seed)
        v = pipeline(xs, g)
        for name, tower in towers.items():
            views[name] = (tower(v[0]).float().cpu(), tower(v[1]).float().cpu())
    except Exception as exc:  # noqa: BLE001 - alignment is optional; say why it is missing
        views = {}
        notes_views = f" (alignment not computed: {type(exc).__name__}: {str(exc)[:120]})"
    else:
        notes_views = ""
    notes = (f"Checkpoint `{os.path.basename(path)}`: method {cfg.method}, backbone {cfg.backbone}, step "
             f"{state.get('step')}; held-out split of {cfg.data} ({emb['representation'].shape[0]} images)"
             f"{notes_views}.")
    return diagnose_embeddings(emb, out_dir, title=f"Collapse diagnostics: {cfg.method}", views=views,
                               labels=(train_y.cpu(), test_y), train_embeddings=bank, notes=notes)


__all__ = ["diagnose_checkpoint", "diagnose_embeddings", "state_of", "summarize"]
