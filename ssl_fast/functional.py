"""The public functions of ssl_fast (also exported from ``ssl_fast``)."""

from __future__ import annotations

from typing import Optional, Union

import torch

from .ops import infonce as _infonce

Temperature = Union[float, torch.Tensor]


def ntxent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Temperature = 0.5,
    *,
    normalize: bool = True,
    feature_dim: Optional[int] = None,
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

    Returns:
        0-dim tensor: the mean over the 2N anchors, float32 (float64 for float64 inputs). Statistics are
        accumulated in fp32; gradients come back in the inputs' dtype.

    With N = 1 every anchor has only its positive and no negative: the loss is exactly 0 with zero gradient.
    """
    return _infonce.ntxent(z1, z2, temperature, normalize=normalize, feature_dim=feature_dim)


def info_nce(
    query: torch.Tensor,
    key: torch.Tensor,
    temperature: Temperature = 0.1,
    *,
    normalize: bool = True,
    symmetric: bool = False,
    feature_dim: Optional[int] = None,
) -> torch.Tensor:
    """Cross-view InfoNCE, fused: logits ``query_i . key_j / T`` (N, N) with target j = i.

    ``symmetric=True`` averages the query->key and key->query losses: the official DirectCLR loss and the
    CLIP loss (with ``temperature = 1 / logit_scale.exp()``). With N = 1 the loss is 0.

    Args:
        query, key: shape (N, D); dtypes, strides, ``temperature``, ``normalize`` and ``feature_dim`` as in
            :func:`ntxent`.
        symmetric: average both directions.

    Returns:
        0-dim float32 tensor (float64 for float64 inputs): the mean over the N queries (and keys).
    """
    return _infonce.info_nce(query, key, temperature, normalize=normalize, symmetric=symmetric,
                             feature_dim=feature_dim)


__all__ = ["ntxent", "info_nce"]
