"""Matplotlib plots of collapse diagnostics (PNG, Agg backend; matplotlib is imported on first use)."""

from __future__ import annotations

import os
from typing import Dict, Mapping, Optional, Sequence

import torch


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=False)
    import matplotlib.pyplot as plt

    return plt


def _np(v):
    if isinstance(v, torch.Tensor):
        return v.detach().to("cpu", torch.float64).numpy()
    return v


def plot_spectra(spectra: Mapping[str, torch.Tensor], path: str, *, title: str = "embedding covariance spectrum",
                 floor: float = 1e-12, ylabel: str = "eigenvalue (log)", normalize: bool = True) -> str:
    """Sorted spectra on a log scale, one line per entry (DirectCLR's dimensional-collapse plot).

    Args:
        spectra: name -> 1-D tensor of nonnegative values (descending).
        path: output PNG path (folders are created).
        title, ylabel: labels.
        floor: values below ``floor`` (relative to each curve's largest when ``normalize``) are drawn at it.
        normalize: divide each spectrum by its largest value, so curves of different scales compare.

    Returns:
        ``path``.
    """
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=100)
    for name, s in spectra.items():
        v = _np(s).astype("float64").clip(min=0)
        if normalize and v.size and v.max() > 0:
            v = v / v.max()
        ax.semilogy(range(1, v.size + 1), v.clip(min=floor), label=name, lw=1.6)
    ax.set_xlabel("singular value rank index")
    ax.set_ylabel(ylabel + (" / largest" if normalize else ""))
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_curves(curves: Mapping[str, Sequence[float]], path: str, *, x: Optional[Sequence[float]] = None,
                title: str = "", xlabel: str = "step", ylabel: str = "", logy: bool = False,
                logx: bool = False, hlines: Optional[Dict[str, float]] = None) -> str:
    """Several curves over a shared x axis (training histories, sweeps). Returns ``path``."""
    plt = _plt()
    fig, ax = plt.subplots(figsize=(5.2, 3.6), dpi=100)
    for name, ys in curves.items():
        ys = _np(ys)
        xs = x if x is not None else range(len(ys))
        ax.plot(list(xs), list(ys), marker="o" if len(ys) < 20 else None, ms=3, label=name, lw=1.4)
    for name, yv in (hlines or {}).items():
        ax.axhline(yv, ls="--", c="gray", lw=1)
        ax.text(ax.get_xlim()[0], yv, " " + name, va="bottom", fontsize=7, color="gray")
    if logy:
        ax.set_yscale("log")
    if logx:
        ax.set_xscale("symlog", linthresh=1e-4)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title, fontsize=10)
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


def plot_bars(values: Mapping[str, float], path: str, *, title: str = "", ylabel: str = "") -> str:
    """One horizontal bar per entry (first entry on top). Returns ``path``."""
    plt = _plt()
    names = list(values)
    fig, ax = plt.subplots(figsize=(5.6, 1.0 + 0.28 * len(names)), dpi=100)
    ax.barh(range(len(names)), [float(values[n]) for n in names], color="tab:blue")
    ax.set_yticks(range(len(names)))
    ax.set_yticklabels(names, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel(ylabel)
    ax.set_title(title, fontsize=9)
    ax.grid(True, axis="x", alpha=0.3)
    fig.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
    return path


__all__ = ["plot_bars", "plot_curves", "plot_spectra"]
