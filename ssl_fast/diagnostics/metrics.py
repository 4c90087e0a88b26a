"""Collapse metrics: spectra, effective rank, alignment / uniformity, normalized-output std, predictor alignment.

Every function is batched torch and returns tensors (never Python floats), so a training step may call them
without a host synchronization; a logger converts them to floats every k steps. Spectra and the quantities
derived from them are computed in float64 (the small singular values that reveal dimensional collapse are
lost in float32), on the inputs' device.

Definitions (``z``: (..., N, D) embeddings, one row per sample):

- covariance spectrum: eigenvalues of ``C = Zc^T Zc / (N - 1)``, ``Zc = Z - mean(Z)``, sorted descending
  (the singular values of the symmetric PSD matrix ``C``; Jing et al. 2022 plot their log), obtained as the
  squared singular values of ``Zc / sqrt(N - 1)`` (more accurate for the small ones than ``eigvalsh(C)``);
  length D, zero-padded when N - 1 < D.
- effective rank (Roy & Vetterli 2007): ``exp(H(p))`` with ``p_k = s_k / sum(s)``, ``H(p) = -sum p_k log p_k``
  (``0 log 0 = 0``): in [1, D], equal to k for k equal nonzero values, invariant to scale and rotation.
- alignment (Wang & Isola 2020): ``E_i ||x_i - y_i||^alpha`` on the unit sphere (alpha = 2).
- uniformity: ``log E_{i<j} exp(-t ||x_i - x_j||^2)`` on the unit sphere (t = 2); -4 is the large-N limit for
  points uniform on a high-dimensional sphere, 0 is complete collapse.
- normalized-output std (Chen & He 2021): per-dimension std over the batch of ``z / ||z||``; about
  ``1/sqrt(D)`` when healthy, 0 when collapsed.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn.functional as F

_F64 = torch.float64


def _check_embeddings(z: torch.Tensor, name: str = "z", min_rows: int = 1) -> None:
    if not isinstance(z, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(z).__name__}")
    if z.dim() < 2:
        raise ValueError(f"{name} must have shape (..., N, D), got {tuple(z.shape)}")
    if not (z.is_floating_point()):
        raise TypeError(f"{name} must be a floating-point tensor, got {z.dtype}")
    if z.shape[-2] < min_rows or z.shape[-1] < 1:
        raise ValueError(f"{name} needs at least {min_rows} rows and 1 column, got {tuple(z.shape)}")


def covariance_spectrum(z: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """Eigenvalues of the embedding covariance, sorted descending, in float64.

    Args:
        z: embeddings, shape (..., N, D), any floating dtype; N >= 2 when ``center``.
        center: subtract the batch mean (covariance); False gives the second-moment matrix ``Z^T Z / N``.

    Shape:
        z (..., N, D) -> (..., D)

    Returns:
        float64 tensor of the D eigenvalues of ``C`` (>= 0), largest first; the values past ``min(N-1, D)``
        are exactly 0.

    Example:
        >>> s = covariance_spectrum(torch.randn(512, 64))
        >>> s.shape, bool(s[0] >= s[-1])
        (torch.Size([64]), True)
    """
    _check_embeddings(z, min_rows=2 if center else 1)
    x = z.to(_F64)
    n, d = x.shape[-2], x.shape[-1]
    if center:
        x = x - x.mean(dim=-2, keepdim=True)
        denom = n - 1
    else:
        denom = n
    s = torch.linalg.svdvals(x)  # (..., min(N, D)), descending
    ev = s.square() / denom
    if center and ev.shape[-1] > n - 1:  # centering removes one dimension: that value is rounding noise
        ev = torch.cat([ev[..., : n - 1], torch.zeros_like(ev[..., n - 1:])], dim=-1)
    if ev.shape[-1] < d:
        ev = F.pad(ev, (0, d - ev.shape[-1]))
    return ev


def effective_rank(values: torch.Tensor, eps: float = 1e-300) -> torch.Tensor:
    """Roy & Vetterli's effective rank ``exp(H(p))``, ``p = values / sum(values)``, over the last dimension.

    Args:
        values: nonnegative singular values (or covariance eigenvalues), shape (..., K).
        eps: guard for an all-zero vector (its effective rank is reported as 1, complete collapse).

    Shape:
        (..., K) -> (...)

    Returns:
        float64 tensor in [1, K].

    Example:
        >>> effective_rank(torch.tensor([1.0, 1.0, 1.0, 0.0]))
        tensor(3., dtype=torch.float64)
    """
    if not isinstance(values, torch.Tensor) or values.dim() < 1:
        raise ValueError("values must be a tensor of shape (..., K)")
    v = values.to(_F64).clamp_min(0)
    total = v.sum(dim=-1, keepdim=True)
    p = v / total.clamp_min(eps)
    h = -torch.special.xlogy(p, p).sum(dim=-1)
    h = torch.where(total.squeeze(-1) > 0, h, torch.zeros_like(h))
    return h.exp()


def embedding_effective_rank(z: torch.Tensor, *, center: bool = True) -> torch.Tensor:
    """Effective rank of the embedding covariance: ``effective_rank(covariance_spectrum(z))``.

    Shape:
        z (..., N, D) -> (...), float64.
    """
    return effective_rank(covariance_spectrum(z, center=center))


def alignment(x: torch.Tensor, y: torch.Tensor, alpha: float = 2.0, *, normalize: bool = True) -> torch.Tensor:
    """Wang & Isola's alignment ``E_i ||x_i - y_i||_2^alpha`` of positive pairs (rows i of x and y).

    Args:
        x, y: the two views' embeddings, shape (..., N, D).
        alpha: exponent (> 0), 2 by default.
        normalize: l2-normalize the rows first (the definition is on the unit sphere).

    Shape:
        (..., N, D), (..., N, D) -> (...), float64.

    Returns:
        0 for perfectly aligned pairs, at most ``2**alpha`` on the sphere.
    """
    _check_embeddings(x, "x")
    _check_embeddings(y, "y")
    if x.shape != y.shape:
        raise ValueError(f"x and y must have the same shape, got {tuple(x.shape)} and {tuple(y.shape)}")
    if not alpha > 0:
        raise ValueError(f"alpha must be > 0, got {alpha}")
    x, y = x.to(_F64), y.to(_F64)
    if normalize:
        x, y = F.normalize(x, dim=-1), F.normalize(y, dim=-1)
    return (x - y).norm(dim=-1).pow(alpha).mean(dim=-1)


def uniformity(x: torch.Tensor, t: float = 2.0, *, normalize: bool = True) -> torch.Tensor:
    """Wang & Isola's uniformity ``log E_{i<j} exp(-t ||x_i - x_j||^2)`` over all distinct pairs.

    Computed in float64 with a log-sum-exp over the pairs (one N x N float64 matrix per batch element).

    Args:
        x: embeddings, shape (..., N, D), N >= 2.
        t: temperature (> 0), 2 by default.
        normalize: l2-normalize the rows first.

    Shape:
        (..., N, D) -> (...), float64.

    Returns:
        0 for complete collapse, more negative for more uniform points (``>= -4 t / 2`` on the sphere).
    """
    _check_embeddings(x, "x", min_rows=2)
    if not t > 0:
        raise ValueError(f"t must be > 0, got {t}")
    x = x.to(_F64)
    if normalize:
        x = F.normalize(x, dim=-1)
    n = x.shape[-2]
    sq = x.square().sum(dim=-1)
    d2 = (sq.unsqueeze(-1) + sq.unsqueeze(-2) - 2.0 * (x @ x.transpose(-1, -2))).clamp_min(0)
    # the i != j terms are each pair twice: log mean_{i<j} = logsumexp_{i != j} - log(N (N - 1))
    logits = (-t * d2).masked_fill(torch.eye(n, dtype=torch.bool, device=x.device), float("-inf"))
    return torch.logsumexp(logits.flatten(-2), dim=-1) - math.log(n * (n - 1))


def normalized_std(z: torch.Tensor) -> torch.Tensor:
    """Per-dimension std over the batch of the l2-normalized rows (SimSiam's collapse indicator).

    Shape:
        z (..., N, D), N >= 2 -> (..., D), float64. Healthy: about ``1/sqrt(D)``; collapsed: 0.
    """
    _check_embeddings(z, min_rows=2)
    return F.normalize(z.to(_F64), dim=-1).std(dim=-2)


def dead_fraction(z: torch.Tensor, threshold: float = 0.1) -> torch.Tensor:
    """Fraction of dimensions whose normalized-output std is below ``threshold / sqrt(D)``.

    Args:
        z: embeddings (..., N, D).
        threshold: relative to the healthy level ``1/sqrt(D)``; 0.1 by default.

    Shape:
        (..., N, D) -> (...), float64 in [0, 1]: 1 is complete collapse.
    """
    std = normalized_std(z)
    d = z.shape[-1]
    return (std < threshold / math.sqrt(d)).to(_F64).mean(dim=-1)


def weight_spectrum(weight: torch.Tensor) -> torch.Tensor:
    """Singular values of a linear layer's weight (..., out, in), float64, descending."""
    if not isinstance(weight, torch.Tensor) or weight.dim() < 2:
        raise ValueError("weight must be a tensor of shape (..., out_features, in_features)")
    return torch.linalg.svdvals(weight.detach().to(_F64))


def correlation_matrix(x: torch.Tensor) -> torch.Tensor:
    """Second-moment (correlation) matrix ``E[x x^T] = X^T X / N`` of a predictor's input, float64 (..., D, D)."""
    _check_embeddings(x, "x")
    x = x.detach().to(_F64)
    return x.transpose(-1, -2) @ x / x.shape[-2]


def predictor_alignment(predictor_weight: torch.Tensor, inputs: Optional[torch.Tensor] = None, *,
                        correlation: Optional[torch.Tensor] = None) -> torch.Tensor:
    """Alignment of a linear predictor's eigenspace with the correlation matrix F of its input (DirectPred).

    For each eigenvector ``u_j`` of ``F = E[f f^T]`` (eigenvalues descending) returns
    ``|u_j^T Wp u_j| / ||Wp u_j||``: 1 when ``u_j`` is an eigenvector of ``Wp`` (Wp and F share their
    eigenbasis, as Tian et al. 2021 predict for a trained BYOL predictor), about ``1/sqrt(D)`` for a random Wp.

    Args:
        predictor_weight: Wp, shape (..., D, D).
        inputs: the predictor's inputs f, shape (..., N, D) (F is computed from them), or
        correlation: F itself, shape (..., D, D) (symmetric PSD).

    Shape:
        -> (..., D), float64, one value per eigenvector of F (largest eigenvalue first).
    """
    if (inputs is None) == (correlation is None):
        raise ValueError("pass exactly one of inputs or correlation")
    wp = predictor_weight.detach().to(_F64)
    if wp.dim() < 2 or wp.shape[-1] != wp.shape[-2]:
        raise ValueError(f"predictor_weight must be square (..., D, D), got {tuple(wp.shape)}")
    f = correlation_matrix(inputs) if inputs is not None else correlation.detach().to(_F64)
    if f.shape[-1] != wp.shape[-1]:
        raise ValueError(f"the input dimension {f.shape[-1]} does not match the predictor's {wp.shape[-1]}")
    _, u = torch.linalg.eigh(0.5 * (f + f.transpose(-1, -2)))
    u = u.flip(-1)  # descending eigenvalues
    wu = wp @ u
    num = (u * wu).sum(dim=-2).abs()
    return num / wu.norm(dim=-2).clamp_min(1e-300)


def collapse_stats(z1: torch.Tensor, z2: Optional[torch.Tensor] = None) -> dict:
    """The standard set of collapse metrics of a batch, as 0-dim float64 tensors (no host sync).

    Args:
        z1: embeddings of the first view (N, D), N >= 2.
        z2: embeddings of the second view (N, D); adds ``alignment``.

    Returns:
        dict with ``effective_rank``, ``effective_rank_fraction`` (divided by D), ``top_eigenvalue``,
        ``uniformity``, ``std`` (mean normalized-output std), ``std_sqrt_d`` (that times sqrt(D): 1 is healthy),
        ``dead_fraction`` and, with ``z2``, ``alignment``.
    """
    _check_embeddings(z1, "z1", min_rows=2)
    if z1.dim() != 2:
        raise ValueError(f"z1 must have shape (N, D), got {tuple(z1.shape)}")
    d = z1.shape[-1]
    z = z1.detach()
    spec = covariance_spectrum(z)
    er = effective_rank(spec)
    std = normalized_std(z)
    out = {
        "effective_rank": er,
        "effective_rank_fraction": er / d,
        "top_eigenvalue": spec[0],
        "uniformity": uniformity(z),
        "std": std.mean(),
        "std_sqrt_d": std.mean() * math.sqrt(d),
        "dead_fraction": (std < 0.1 / math.sqrt(d)).to(_F64).mean(),
    }
    if z2 is not None:
        out["alignment"] = alignment(z, z2.detach())
    return out


__all__ = [
    "alignment",
    "collapse_stats",
    "correlation_matrix",
    "covariance_spectrum",
    "dead_fraction",
    "effective_rank",
    "embedding_effective_rank",
    "normalized_std",
    "predictor_alignment",
    "uniformity",
    "weight_spectrum",
]
