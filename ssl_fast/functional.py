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


# ----------------------------------------------------------------------------------------------------
# EMA teacher update and the BYOL / SimSiam losses

from .ops import ema as _ema  # noqa: E402
from .ops import byol as _byol  # noqa: E402


def ema_update_(ema_tensors, online_tensors, momentum: Union[float, torch.Tensor]) -> None:
    """In place ``ema = momentum * ema + (1 - momentum) * online`` for every pair of two lists of tensors.

    The teacher update of BYOL, MoCo and DINO, fused: the pairs are grouped by (device, ema dtype, online
    dtype) and each group is ONE kernel call (a CUDA multi-tensor launch, one CPU parallel region, or one
    Triton launch), not one kernel per tensor. Computed as ``ema + (1 - momentum) * (online - ema)`` in fp32
    (fp64 for fp64 tensors), then rounded once to the ema dtype. Runs under ``torch.no_grad``.

    Args:
        ema_tensors: list / tuple of floating tensors updated in place (float32, bfloat16, float16 or
            float64). Any layout: dense layouts (contiguous, channels-last) are updated where they are;
            views with gaps (``w[:, ::2]``) go through a contiguous copy that is written back.
        online_tensors: list of the same length; ``online_tensors[i]`` has the shape and device of
            ``ema_tensors[i]``, any floating dtype (an fp32 EMA of bf16 / fp16 weights reads 2-byte
            weights and needs no converted copy).
        momentum: m in [0, 1], a float or a 0-dim tensor. A tensor on the tensors' GPU is read by the
            kernel itself: no host sync, so a momentum schedule kept on the device can be captured in a
            CUDA graph (its value is then not range-checked). m = 1 leaves ``ema`` unchanged, m = 0 copies.

    Returns:
        None (like ``torch._foreach_*_``); the tensors of ``ema_tensors`` hold the result.

    Raises:
        ValueError: lists of different lengths, a pair of different shapes or devices, momentum outside
            [0, 1] (or a momentum tensor with more than one element).
        TypeError: a non-tensor element, an integer / bool / complex tensor, a non-real momentum.
        Nothing is modified when a check fails.

    Example:
        >>> teacher = [p.detach() for p in teacher_model.parameters()]
        >>> student = [p.detach() for p in student_model.parameters()]
        >>> ssl_fast.ema_update_(teacher, student, 0.996)
    """
    return _ema.ema_update_(ema_tensors, online_tensors, momentum)


def update_momentum(model: torch.nn.Module, model_ema: torch.nn.Module, m: Union[float, torch.Tensor]) -> None:
    """lightly's ``update_momentum(model, model_ema, m)``: EMA of ``model``'s parameters into ``model_ema``'s.

    Like lightly, only parameters are updated (buffers such as BatchNorm running statistics are not; see
    :class:`ssl_fast.nn.EMA` for buffer handling), in ``model.parameters()`` order, with one fused
    :func:`ema_update_` call instead of lightly's ``_foreach_mul_`` + ``_foreach_add_`` (two passes).

    Args:
        model: the online (student) model.
        model_ema: the EMA (teacher) model with the same parameter shapes.
        m: momentum in [0, 1], a float or a 0-dim tensor.

    Returns:
        None.

    Example:
        >>> update_momentum(backbone, backbone_momentum, m=0.99)
    """
    return _ema.update_momentum(model, model_ema, m)


def negative_cosine_similarity(x0: torch.Tensor, x1: torch.Tensor, dim: int = 1, eps: float = 1e-8) -> torch.Tensor:
    """SimSiam's loss: ``-cosine_similarity(x0, x1, dim, eps).mean()`` (lightly's NegativeCosineSimilarity).

    Args:
        x0, x1: tensors of broadcastable shapes, e.g. (N, D) predictions and stop-gradient targets: the
            caller detaches the target (``x1.detach()``), as in the paper.
        dim: the dimension of the vectors.
        eps: lower bound on each norm (``torch.nn.functional.cosine_similarity``).

    Returns:
        0-dim tensor: minus the mean cosine similarity over the remaining dimensions.
    """
    return _byol.negative_cosine_similarity(x0, x1, dim=dim, eps=eps)


def byol_loss(p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
    """BYOL's symmetric loss: ``mean_i [(2 - 2 cos(p0_i, z1_i)) + (2 - 2 cos(p1_i, z0_i))] / 2``.

    ``2 - 2 cos(p, z) = |p/|p| - z/|z||^2``: the squared distance of the l2-normalized vectors. The paper's
    loss is the SUM of the two view terms (``L + L~``) per sample; this returns their AVERAGE, averaged over
    the batch (half the paper's value; same minimizer, gradients halved), in [0, 4].

    Args:
        p0, p1: online predictions of views 0 and 1, shape (N, D).
        z0, z1: target projections of views 0 and 1, shape (N, D). Stop-gradient is the caller's: pass
            the target network's outputs (computed under ``torch.no_grad`` or ``.detach()``-ed).

    Returns:
        0-dim tensor, float32 (float64 for float64 inputs).

    Raises:
        ValueError: inputs that are not 2-D or do not all have the same shape.
    """
    return _byol.byol_loss(p0, p1, z0, z1)


__all__ += ["ema_update_", "update_momentum", "negative_cosine_similarity", "byol_loss"]
