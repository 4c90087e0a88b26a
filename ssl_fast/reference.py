"""Plain-torch references for every fused op (float64-capable, autograd-friendly).

These are the ground truth of the test suite and the ``torch`` backend: they materialize the full logit
matrix exactly as eager code does, in whatever dtype they are given. Called on float64 inputs they are
the float64 reference; called on bf16/fp16 inputs they are "eager torch in that dtype", the yardstick of
the tolerance rule (a fused kernel's error must be at most 2x eager's error against float64).

Math (shared by the kernels, see ``kernels/infonce.py`` and ``csrc/cpu/infonce.cpp``):

NT-Xent (SimCLR), views z1, z2 of shape (N, D), M = 2N anchors:
    Z = normalize([z1; z2]) (M, D),  S = Z Z^T / T,  S_ii = -inf,  p(i) = (i + N) mod M
    L = (1/M) sum_i [ logsumexp_j S_ij - S_{i,p(i)} ]

Cross-view InfoNCE (DirectCLR official loss, CLIP loss), query q and key k of shape (N, D):
    S = normalize(q) normalize(k)^T / T,  L_qk = (1/N) sum_i [ logsumexp_j S_ij - S_ii ]
    symmetric: L = (L_qk + L_kq) / 2 with L_kq the same over the columns of S.
"""

from __future__ import annotations

from typing import Optional, Union

import torch
import torch.nn.functional as F

Temperature = Union[float, torch.Tensor]

NORM_EPS = 1e-12  # the eps of F.normalize, so a zero row maps to zero, never NaN


def _prep(x: torch.Tensor, normalize: bool, feature_dim: Optional[int]) -> torch.Tensor:
    if feature_dim is not None:
        x = x[:, :feature_dim]
    return F.normalize(x, dim=1, eps=NORM_EPS) if normalize else x


def ntxent_reference(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Temperature = 0.5,
    *,
    normalize: bool = True,
    feature_dim: Optional[int] = None,
) -> torch.Tensor:
    """SimCLR NT-Xent over the 2N anchors of two views, materializing the (2N, 2N) logits."""
    z = torch.cat([_prep(z1, normalize, feature_dim), _prep(z2, normalize, feature_dim)], dim=0)
    m, n = z.shape[0], z1.shape[0]
    logits = (z @ z.t()) / temperature
    eye = torch.eye(m, dtype=torch.bool, device=z.device)
    logits = logits.masked_fill(eye, float("-inf"))
    target = (torch.arange(m, device=z.device) + n) % m
    return F.cross_entropy(logits, target)


def info_nce_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: Temperature = 0.1,
    *,
    normalize: bool = True,
    symmetric: bool = False,
    feature_dim: Optional[int] = None,
) -> torch.Tensor:
    """Cross-view InfoNCE: logits q_i . k_j / T (N, N), target j = i; optionally symmetrized."""
    q = _prep(query, normalize, feature_dim)
    k = _prep(key, normalize, feature_dim)
    logits = (q @ k.t()) / temperature
    target = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy(logits, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy(logits.t(), target))
    return loss


# ----------------------------------------------------------------------------------------------------
# Rectangular InfoNCE, negatives (queues) and lightly's memory-bank NT-Xent (ssl_fast.ops.infonce_rect)


def infonce_rect_reference(
    rows: torch.Tensor,
    candidates: torch.Tensor,
    pos: torch.Tensor,
    excl: Optional[torch.Tensor] = None,
    temperature: Temperature = 0.1,
    *,
    normalize: bool = True,
) -> torch.Tensor:
    """Per-row terms t_i = logsumexp_{j != excl[i]} S_ij - S_i,pos[i] (no positive term where pos[i] = -1),
    S = norm(rows) norm(candidates)^T / T, materializing the (R, Cn) logits.

    Also the ``torch`` backend of ``ssl_fast.ops.infonce_rect`` (its autograd is that backend's backward):
    ``excl=None`` or excl[i] = -1 excludes nothing; candidates that must get no gradient (a queue appended
    after the first grad_cols rows) are passed detached."""
    a = F.normalize(rows, dim=1, eps=NORM_EPS) if normalize else rows
    c = F.normalize(candidates, dim=1, eps=NORM_EPS) if normalize else candidates
    s = (a @ c.t()) / temperature
    if excl is not None:
        cols = torch.arange(c.shape[0], device=s.device)
        s = s.masked_fill(cols[None, :] == excl[:, None], float("-inf"))
    spos = s.gather(1, pos.clamp(min=0)[:, None]).squeeze(1)
    # lse_i - S_i,p = (m_i - S_i,p) + log sum_j exp(S_ij - m_i), m_i = max_j S_ij (no gradient: the result does not
    # depend on it): the difference of two logits is taken before any rounding to the scale of |S|, so at |S| ~ 1e30
    # two tied logits still give log 2 and a gradient with the softmax's 1/2, 1/2 (torch.logsumexp(s) - S_i,p
    # returns 0, and its backward exp(S - lse) gives 1, 1). An all -inf row keeps logsumexp's -inf.
    m = s.detach().amax(dim=1)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    shifted = torch.log(torch.exp(s - m[:, None]).sum(dim=1))
    return torch.where(pos >= 0, m - spos, m) + shifted


def info_nce_negatives_reference(
    query: torch.Tensor,
    key: torch.Tensor,
    negatives: Optional[torch.Tensor],
    temperature: Temperature = 0.1,
    *,
    normalize: bool = True,
    symmetric: bool = False,
    feature_dim: Optional[int] = None,
) -> torch.Tensor:
    """Cross-view InfoNCE whose queries also see ``negatives`` (M, D) as extra candidates, without gradient
    (a MoCo queue); with ``symmetric`` the key->query direction sees the queries only."""
    q = _prep(query, normalize, feature_dim)
    k = _prep(key, normalize, feature_dim)
    cands = k
    if negatives is not None:
        cands = torch.cat([k, _prep(negatives.detach(), normalize, feature_dim)])
    target = torch.arange(q.shape[0], device=q.device)
    loss = F.cross_entropy((q @ cands.t()) / temperature, target)
    if symmetric:
        loss = 0.5 * (loss + F.cross_entropy((k @ q.t()) / temperature, target))
    return loss


# ----------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (SwAV's equal-partition codes)


def sinkhorn_knopp_reference(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """SwAV's ``distributed_sinkhorn`` on one process, exactly as written (no max shift, so ``exp`` overflows
    to inf / NaN once ``max(scores) / epsilon`` exceeds ~88 in fp32, ~709 in fp64).

    Q = exp(scores / eps)^T (K, B); Q /= sum(Q); ``iterations`` times: Q /= rowsum(Q), Q /= K, Q /= colsum(Q),
    Q /= B; finally Q *= B. Returns Q^T of shape (B, K) in the dtype of ``scores``.
    """
    q = torch.exp(scores / epsilon).t()
    q = q / torch.sum(q)
    k, b = q.shape
    for _ in range(iterations):
        q = q / torch.sum(q, dim=1, keepdim=True)
        q = q / k
        q = q / torch.sum(q, dim=0, keepdim=True)
        q = q / b
    return (q * b).t()


def sinkhorn_knopp_log_reference(scores: torch.Tensor, epsilon: float = 0.05, iterations: int = 3) -> torch.Tensor:
    """The same algorithm with log Q stored and every normalization a ``logsumexp``: finite for any scores.

    Materializes log Q (B, K) in the dtype of ``scores`` (use float64 for a reference); same normalization
    order and constants as :func:`sinkhorn_knopp_reference`.
    """
    import math

    b, k = scores.shape
    lq = scores / epsilon
    lq = lq - torch.logsumexp(lq.reshape(-1), dim=0)
    for _ in range(iterations):
        lq = lq - torch.logsumexp(lq, dim=0, keepdim=True) - math.log(k)  # prototype sums (rows of Q)
        lq = lq - torch.logsumexp(lq, dim=1, keepdim=True) - math.log(b)  # sample sums (columns of Q)
    return torch.exp(lq + math.log(b))


def swav_loss_reference(high, low, temperature: float = 0.1, epsilon: float = 0.05, iterations: int = 3, *,
                        log_domain: bool = True) -> torch.Tensor:
    """SwAV's multi-crop swapped-prediction loss (main_swav.py; lightly's SwaVLoss), written out.

    For each high-resolution crop i: codes q_i = Sinkhorn(scores_i) without gradient; sub-loss of every
    other crop v: -mean_b sum_k q_i log softmax(scores_v / T); each i averages over the n_crops - 1 others;
    the loss averages over the high-resolution crops. ``log_domain`` computes the codes with
    :func:`sinkhorn_knopp_log_reference` (finite for any scores), else with SwAV's code as written.
    """
    sink = sinkhorn_knopp_log_reference if log_domain else sinkhorn_knopp_reference
    crops = list(high) + list(low)
    loss = high[0].new_zeros(())
    for i in range(len(high)):
        with torch.no_grad():
            q = sink(high[i].detach(), epsilon, iterations)
        sub = high[0].new_zeros(())
        for v, z in enumerate(crops):
            if v != i:
                sub = sub - torch.mean(torch.sum(q * F.log_softmax(z / temperature, dim=1), dim=1))
        loss = loss + sub / (len(crops) - 1)
    return loss / len(high)

# EMA teacher update, BYOL / SimSiam losses


def ema_update_reference(ema_tensors, online_tensors, momentum) -> list:
    """New float64 tensors m * ema + (1 - m) * online (the inputs are not modified)."""
    m = float(momentum)
    return [m * e.detach().double() + (1.0 - m) * o.detach().double() for e, o in zip(ema_tensors, online_tensors)]


def negative_cosine_similarity_reference(x0: torch.Tensor, x1: torch.Tensor, dim: int = 1,
                                         eps: float = 1e-8) -> torch.Tensor:
    """-mean cos(x0, x1) along ``dim`` of their broadcast shape (as ``F.cosine_similarity``), each norm clamped at
    ``eps``, written out."""
    x0, x1 = torch.broadcast_tensors(x0, x1)
    n0 = x0.norm(dim=dim).clamp_min(eps)
    n1 = x1.norm(dim=dim).clamp_min(eps)
    return -((x0 * x1).sum(dim=dim) / (n0 * n1)).mean()


def byol_loss_reference(p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """mean over the batch of the average of the two view terms 2 - 2 cos (= |p^ - z^|^2 for non-zero vectors; a
    zero vector has cos 0, so its term is 2, as with torch's cosine_similarity)."""
    def term(p, z):
        pn = p / p.norm(dim=1, keepdim=True).clamp_min(1e-12)
        zn = z / z.norm(dim=1, keepdim=True).clamp_min(1e-12)
        return 2 - 2 * (pn * zn).sum(dim=1)

    return (0.5 * (term(p0, z1) + term(p1, z0))).mean()
