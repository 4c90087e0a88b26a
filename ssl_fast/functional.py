"""The public functions of ssl_fast (also exported from ``ssl_fast``)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .ops import infonce as _infonce
from . import distributed as _dist  # process_group / negatives (ssl_fast.ops.infonce_rect)
from .ops import infonce_rect as _rect

Temperature = Union[float, torch.Tensor]


def ntxent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Temperature = 0.5,
    *,
    normalize: bool = True,
    feature_dim: Optional[int] = None,
    process_group=None,
) -> torch.Tensor:
    """SimCLR's NT-Xent loss, fused: the (2N, 2N) logit matrix is never stored.

    The 2N rows of ``[z1; z2]`` are anchors; the positive of row i is its other view (i +- N) and the other
    2N - 2 rows are its negatives. Equal to lightly's ``NTXentLoss(temperature)`` (memory bank off) and to
    pytorch-metric-learning's ``NTXentLoss`` on the concatenated batch with pair labels.

    Args:
        z1, z2: the two views, shape (N, D), float32 / bfloat16 / float16 (float64 for checks). Row-strided
            views are used in place; only a non-unit stride along D forces a copy.
        temperature: T > 0, a float or a 0-dim tensor; a tensor that requires grad gets its gradient
            (learnable temperature / logit scale).
        normalize: l2-normalize the rows first (eps 1e-12, as ``F.normalize``); False uses raw dot products.
        feature_dim: use only the first ``feature_dim`` columns (DirectCLR's sub-vector), without a copy;
            normalization then applies to the slice.
        process_group: global negatives across processes: a ``torch.distributed`` group, or ``True`` /
            ``"world"`` for the default group (None: this process only). See "Distributed" below.

    Returns:
        0-dim tensor: the mean over the 2N anchors, float32 (float64 for float64 inputs). Statistics are
        accumulated in fp32; gradients come back in the inputs' dtype.

    With N = 1 every anchor has only its positive and no negative: the loss is exactly 0 with zero gradient.
    """
    if process_group is not None and _dist.resolve_group(process_group) is not None:
        return _rect.ntxent_global(z1, z2, temperature, normalize=normalize, feature_dim=feature_dim,
                                   process_group=process_group)
    return _infonce.ntxent(z1, z2, temperature, normalize=normalize, feature_dim=feature_dim)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: Temperature = 0.1,
    *,
    normalize: bool = True,
    symmetric: bool = False,
    feature_dim: Optional[int] = None,
    negatives: Optional[torch.Tensor] = None,
    process_group=None,
) -> torch.Tensor:
    """Cross-view InfoNCE, fused: logits ``query_i . key_j / T`` (N, N) with target j = i.

    ``symmetric=True`` averages the query->key and key->query losses: the official DirectCLR loss and the
    CLIP loss (with ``temperature = 1 / logit_scale.exp()``). With N = 1 the loss is 0.

    Args:
        query, key: shape (N, D); dtypes, strides, ``temperature``, ``normalize`` and ``feature_dim`` as in
            :func:`ntxent`.
        symmetric: average both directions.
        negatives: (M, D) (or (M, feature_dim)) extra candidates of every query, without gradient (a MoCo
            queue, e.g. ``ssl_fast.nn.MemoryBank``); same dtype and device as ``query``; normalized like the
            keys when ``normalize``. With ``symmetric`` the key->query direction does not see them.
        process_group: global negatives across processes, as in :func:`ntxent` (the keys of every rank are
            candidates of every query; the negatives are this rank's own).

    Returns:
        0-dim float32 tensor (float64 for float64 inputs): the mean over the N queries (and keys).
    """
    if negatives is not None or (process_group is not None and _dist.resolve_group(process_group) is not None):
        return _rect.info_nce_global(query, key, temperature, normalize=normalize, symmetric=symmetric,
                                     feature_dim=feature_dim, negatives=negatives, process_group=process_group)
    return _infonce.info_nce(query, key, temperature, normalize=normalize, symmetric=symmetric,
                             feature_dim=feature_dim)


DISTRIBUTED_DOC = """
Distributed (``process_group``). Every rank passes its own N rows (the same N on every rank: checked once per
new shape, ValueError naming the argument otherwise). The rank's anchors are scored against the candidates of
ALL ranks with the fused rectangular kernel (one all_gather of the N x d local rows); the positive of a row is
its partner at the global rank offset. The value returned on every rank is the loss of the concatenated
global batch (an all_reduce of the scalar, no host synchronization), and the backward returns the gradient of
remote candidates to their owners with one reduce-scatter (N_global x d). Gradient convention: each rank's
input gradient is ``world_size`` x the single-process gradient of the global loss w.r.t. its rows, so that
after DDP's averaging (or an all_reduce / world_size) every parameter, shared ones included, receives exactly
the single-process gradient of the global batch; a learnable temperature gets world_size x its rank's share,
averaging likewise to the exact gradient. ``ssl_fast.nn`` modules take ``gather_distributed=True`` (default
group) and ``local_loss=True`` (open_clip's local loss: the value is the mean over this rank's anchors, the
gradients are the same).
"""
ntxent.__doc__ += DISTRIBUTED_DOC
info_nce.__doc__ += DISTRIBUTED_DOC

__all__ = ["ntxent", "info_nce"]


# ----------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (SwAV codes)

from .ops import sinkhorn as _sinkhorn  # noqa: E402


def sinkhorn_knopp(
    scores: torch.Tensor,
    epsilon: float = 0.05,
    iterations: int = 3,
    *,
    process_group=None,
    check_finite: bool = False,
) -> torch.Tensor:
    """SwAV's Sinkhorn-Knopp codes (equal-partition soft assignments), fused and in the log domain.

    Same result as SwAV's ``distributed_sinkhorn`` (and lightly's ``sinkhorn``): Q = exp(scores / eps)^T
    normalized to unit total, then ``iterations`` times prototype sums to 1/K and sample sums to 1/B, and
    finally scaled by B; returned transposed. Here the B x K matrix is never rewritten: prototype scalings
    u (K) are kept in the log domain with max-shifted fp32 statistics (fp64 for float64 input), so small
    ``epsilon`` or large scores (where the reference's ``exp`` overflows to NaN) stay finite. Each sweep is
    one fused pass over the scores; the codes are written once.

    No gradient flows through Q: it is a target (computed under ``torch.no_grad``, the result never
    requires grad), as in SwAV.

    Args:
        scores: (B, K) sample-prototype scores, float32 / bfloat16 / float16 (float64 for checks).
            Row-strided views are read in place; a non-unit stride along K forces a copy.
        epsilon: entropic regularization eps > 0 (SwAV: 0.05).
        iterations: number of Sinkhorn sweeps, >= 1 (SwAV: 3).
        process_group: a ``torch.distributed`` process group: the prototype sums run over the samples of
            every rank (each rank passes its own B_r x K scores and gets its own B_r x K codes, equal to the
            single-process result on the concatenated scores; B_r may differ). ``iterations + 1``
            all-reduces of K values, no host synchronization. None: this process's scores only.
        check_finite: raise ValueError when scores contains NaN or Inf. Off by default: the check reads
            a result on the host (a device synchronization on CUDA, a graph break under torch.compile).

    Shape:
        scores: (B, K). Returns (B, K).

    Returns:
        Q, float32 (float64 for float64 scores): each row sums to 1; the column sums approach B/K as the
        number of sweeps grows.

    Raises:
        ValueError: scores not of rank 2, an empty batch (B = 0) or K = 0, epsilon <= 0, iterations < 1,
            non-finite scores with ``check_finite=True``.

    Example:
        >>> scores = torch.nn.functional.normalize(z, dim=1) @ prototypes.t()   # (B, K)
        >>> q = ssl_fast.sinkhorn_knopp(scores, epsilon=0.05, iterations=3)
    """
    return _sinkhorn.sinkhorn_knopp(scores, epsilon, iterations, process_group=process_group,
                                    check_finite=check_finite)


__all__ += ["sinkhorn_knopp"]
