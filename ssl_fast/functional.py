"""The public functions of ssl_fast (also exported from ``ssl_fast``): the one entry into the ops from above.

``ssl_fast.nn`` modules, ``ssl_fast.methods``, the trainers, the lab and the benchmarks call these; the
dispatch to the fused backends (``ssl_fast.ops``) happens below them.
"""

from __future__ import annotations

from typing import Optional, Sequence, Union

import torch

from . import distributed as _dist
from .ops import byol as _byol
from .ops import ema as _ema
from .ops import infonce as _infonce
from .ops import infonce_rect as _rect
from .ops import optim_ema as _optim_ema
from .ops import sinkhorn as _sinkhorn
from .ops import swav as _swav
from .ops._backend import BACKENDS  # noqa: F401  (ssl_fast.optim checks backend names against it)

Temperature = Union[float, torch.Tensor]


def _distributed(process_group) -> bool:
    return process_group is not None and _dist.resolve_group(process_group) is not None


def ntxent(
    z1: torch.Tensor,
    z2: torch.Tensor,
    temperature: Temperature = 0.5,
    *,
    normalize: bool = True,
    feature_dim: Optional[int] = None,
    process_group=None,
    local_loss: bool = False,
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
        local_loss: with ``process_group``, return the mean over this rank's anchors only (open_clip's
            ``local_loss``, the value of lightly's ``gather_distributed``); the gradients are the same.

    Shape:
        z1, z2: (N, D). Returns a 0-dim tensor.

    Returns:
        0-dim tensor: the mean over the 2N anchors, float32 (float64 for float64 inputs). Statistics are
        accumulated in fp32; gradients come back in the inputs' dtype.

    With N = 1 every anchor has only its positive and no negative: the loss is exactly 0 with zero gradient.

    Example:
        >>> loss = ssl_fast.ntxent(projector(backbone(x0)), projector(backbone(x1)), temperature=0.5)
    """
    if _distributed(process_group):
        return _rect.ntxent_global(z1, z2, temperature, normalize=normalize, feature_dim=feature_dim,
                                   process_group=process_group, local_loss=local_loss)
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
    local_loss: bool = False,
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
        local_loss: with ``process_group``, the mean over this rank's queries only, as in :func:`ntxent`.

    Shape:
        query, key: (N, D); negatives: (M, D) or (M, feature_dim). Returns a 0-dim tensor.

    Returns:
        0-dim float32 tensor (float64 for float64 inputs): the mean over the N queries (and keys).

    Example:
        >>> loss = ssl_fast.info_nce(image_features, text_features, 0.07, symmetric=True)   # CLIP
        >>> loss = ssl_fast.info_nce(q, k, 0.2, negatives=bank.negatives())                 # MoCo v2
    """
    if negatives is not None or _distributed(process_group):
        return _rect.info_nce_global(query, key, temperature, normalize=normalize, symmetric=symmetric,
                                     feature_dim=feature_dim, negatives=negatives, process_group=process_group,
                                     local_loss=local_loss)
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


def infonce_rect(
    rows: torch.Tensor,
    candidates: torch.Tensor,
    pos: torch.Tensor,
    excl: Optional[torch.Tensor] = None,
    temperature: Temperature = 0.1,
    *,
    normalize: bool = True,
    grad_candidates: bool = True,
) -> torch.Tensor:
    """Rectangular InfoNCE, fused: the per-row terms of R anchors against Cn candidates (a queue, a memory bank,
    another rank's rows), without storing the (R, Cn) logits.

    With S = norm(rows) norm(candidates)^T / T and S_i,excl[i] = -inf, returns
    ``t_i = logsumexp_j S_ij - S_i,pos[i]``: the cross entropy of row i with target column ``pos[i]``, or, where
    ``pos[i] = -1``, the log-sum-exp alone (combine it with a positive computed elsewhere, as lightly's memory
    bank does: ``logaddexp(s_pos, t_i) - s_pos``). :func:`info_nce` with ``negatives=`` and every
    ``process_group`` loss are built on this op.

    Args:
        rows: (R, D) anchors, float32 / bfloat16 / float16 (float64 for checks); row-strided views are read in
            place.
        candidates: (Cn, D), Cn >= 1, same dtype and device as ``rows``.
        pos: (R,) int64 column of each row's positive in [0, Cn), or -1 for none.
        excl: (R,) int64 column excluded from each row's softmax (e.g. the anchor itself), or -1; None excludes
            nothing.
        temperature: T > 0, a float or a 0-dim tensor (a tensor that requires grad gets its gradient).
        normalize: l2-normalize rows and candidates first (eps 1e-12, as ``F.normalize``).
        grad_candidates: False treats the candidates as constants (a queue): no gradient flows to them.

    Shape:
        rows (R, D), candidates (Cn, D), pos / excl (R,). Returns (R,).

    Returns:
        (R,) float32 (float64 for float64 inputs), differentiable w.r.t. rows, candidates (unless
        ``grad_candidates=False``) and temperature.

    Raises:
        TypeError: a non-tensor argument, index tensors that are not int64, candidates of another dtype.
        ValueError: shapes that do not match, candidates or indices on another device, an index outside
            [-1, Cn) (checked for CPU tensors), temperature <= 0.

    Example:
        >>> none = torch.full((n,), -1, dtype=torch.int64)
        >>> lse = ssl_fast.functional.infonce_rect(q, queue, none, temperature=0.2, grad_candidates=False)
    """
    return _rect.infonce_rect(rows, candidates, pos, excl, temperature, normalize=normalize,
                              grad_candidates=grad_candidates)


__all__ = ["ntxent", "info_nce", "infonce_rect"]


# ----------------------------------------------------------------------------------------------------
# Sinkhorn-Knopp (SwAV codes) and SwAV's loss


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


def swav_loss(
    high_resolution_outputs: Sequence[torch.Tensor],
    low_resolution_outputs: Sequence[torch.Tensor] = (),
    queue_outputs: Optional[Sequence[torch.Tensor]] = None,
    *,
    temperature: float = 0.1,
    sinkhorn_iterations: int = 3,
    sinkhorn_epsilon: float = 0.05,
    process_group=None,
) -> torch.Tensor:
    """SwAV's swapped-prediction loss over multi-crop prototype scores, with fused Sinkhorn-Knopp codes.

    For each high-resolution crop i, codes q_i = :func:`sinkhorn_knopp` of its scores (with ``queue_outputs[i]``
    appended for the codes, then dropped); every other crop v predicts them:
    ``loss = 1/n_high sum_i 1/(n_crops - 1) sum_{v != i} CE(q_i, softmax(scores_v / T))`` with
    ``CE(q, p) = -mean_b sum_k q_bk log p_bk``. Equal to lightly's ``SwaVLoss`` in value and gradient. No
    gradient flows through the codes (targets, as in SwAV). The swapped prediction is fused (C++ on CPU, Triton on
    CUDA): one pass over each crop's scores gives the loss and its gradient (computed in the forward, as the loss
    is terminal; the backward scales it by the upstream gradient), with fp32 statistics.

    Args:
        high_resolution_outputs: n_high >= 1 prototype scores (B, K) of the high-resolution crops.
        low_resolution_outputs: prototype scores (B, K) of the low-resolution crops (n_high + n_low >= 2).
        queue_outputs: None, or at least n_high tensors (Bq, K): scores of queued past projections.
        temperature: T > 0 of the prediction softmax (SwAV: 0.1).
        sinkhorn_iterations: Sinkhorn sweeps, >= 1 (SwAV: 3).
        sinkhorn_epsilon: Sinkhorn eps > 0 (SwAV: 0.05).
        process_group: compute the codes over the samples of every rank (a ``torch.distributed`` group, or
            ``True`` / ``"world"`` for the default group; None: this process only).

    Shape:
        every crop (B, K); queue outputs (Bq, K). Returns a 0-dim tensor.

    Returns:
        0-dim float32 tensor (float64 for float64 scores); gradients come back in the scores' dtype.

    Raises:
        ValueError: no high-resolution crop, fewer than two crops, crops of different shapes, too few queue
            outputs, temperature / sinkhorn_epsilon <= 0, sinkhorn_iterations < 1.
        TypeError: a crop that is not a floating-point tensor, crops of different dtypes.

    Example:
        >>> scores = [prototypes(F.normalize(projector(backbone(x)), dim=1)) for x in crops]
        >>> loss = ssl_fast.functional.swav_loss(scores[:2], scores[2:], temperature=0.1)
    """
    return _swav.swav_loss(high_resolution_outputs, low_resolution_outputs, queue_outputs, temperature=temperature,
                           sinkhorn_iterations=sinkhorn_iterations, sinkhorn_epsilon=sinkhorn_epsilon,
                           process_group=process_group)


__all__ += ["sinkhorn_knopp", "swav_loss"]


# ----------------------------------------------------------------------------------------------------
# EMA teacher update and the BYOL / SimSiam losses


def ema_update_(ema_tensors, online_tensors, momentum: Union[float, torch.Tensor], *,
                backend: Optional[str] = None) -> None:
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
        backend: this call's backend (one of ``ssl_fast.BACKENDS``) instead of the one in force.

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
    return _ema.ema_update_(ema_tensors, online_tensors, momentum, backend=backend)


# ----------------------------------------------------------------------------------------------------
# the optimizer step fused with the EMA teacher update (ssl_fast.optim's optimizers call these)


def sgd_ema_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                  momentum_buffers: Sequence[torch.Tensor], ema: Sequence[torch.Tensor], fresh: Sequence[bool] = (),
                  *, lr: float, momentum: float = 0.0, dampening: float = 0.0, weight_decay: float = 0.0,
                  nesterov: bool = False, ema_momentum: Union[float, torch.Tensor] = 1.0,
                  backend: Optional[str] = None) -> None:
    """One ``torch.optim.SGD`` step of ``params`` and, in the same pass over memory, the EMA
    ``ema[i] <- lerp(ema[i], params[i], 1 - ema_momentum)`` of the first ``len(ema)`` of them (new values).

    The fp32 result equals ``torch.optim.SGD`` (foreach) then ``torch._foreach_lerp_`` to the last bit
    (``csrc/cpu/optim_ema.cpp`` derives the roundings). Parameters fp32 or bf16 (grads and buffers of their
    dtype), the EMA fp32 or the parameters' dtype, for the fused kernels; other dtypes run torch's sequence.

    Args:
        params, grads: the parameters (updated in place) and their gradients.
        momentum_buffers: one per parameter when ``momentum != 0``, else empty.
        ema: the teachers of ``params[:len(ema)]`` (updated in place).
        fresh: ``fresh[i]`` true when buffer i was just allocated (this step stores the gradient in it, as
            torch's first step); empty: none is fresh.
        lr, momentum, dampening, weight_decay, nesterov: as ``torch.optim.SGD``.
        ema_momentum: m in [0, 1], a float or a 0-dim tensor.
        backend: this call's backend instead of the one in force.

    Raises:
        ValueError / TypeError naming the argument (lists of other lengths, shapes, dtypes, devices, values out
        of range); nothing is modified when a check fails.
    """
    return _optim_ema.sgd_ema_step_(params, grads, momentum_buffers, ema, fresh, lr=lr, momentum=momentum,
                                    dampening=dampening, weight_decay=weight_decay, nesterov=nesterov,
                                    ema_momentum=ema_momentum, backend=backend)


def adamw_ema_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor], exp_avgs: Sequence[torch.Tensor],
                    exp_avg_sqs: Sequence[torch.Tensor], ema: Sequence[torch.Tensor], steps: Sequence[float], *,
                    lr: float, beta1: float = 0.9, beta2: float = 0.999, eps: float = 1e-8,
                    weight_decay: float = 1e-2, ieee_sqrt: bool = True,
                    ema_momentum: Union[float, torch.Tensor] = 1.0, backend: Optional[str] = None) -> None:
    """One ``torch.optim.AdamW`` step of ``params`` and the EMA of the first ``len(ema)`` of them, one pass.

    ``steps[i]``: parameter i's step count after this step (1 on the first). ``ieee_sqrt`` (default): the
    correctly rounded sqrt of the second moment (torch's ``fused=True`` and CUDA math); False: the one torch's
    CPU foreach path takes (MKL's vector sqrt where torch has MKL; about 2x slower here). Otherwise as
    :func:`sgd_ema_step_`: fp32 results equal torch's (fused=True, or foreach with ``ieee_sqrt=False``) then
    ``_foreach_lerp_`` to the last bit.
    """
    return _optim_ema.adamw_ema_step_(params, grads, exp_avgs, exp_avg_sqs, ema, steps, lr=lr, beta1=beta1,
                                      beta2=beta2, eps=eps, weight_decay=weight_decay, ieee_sqrt=ieee_sqrt,
                                      ema_momentum=ema_momentum, backend=backend)


def lars_ema_step_(params: Sequence[torch.Tensor], grads: Sequence[torch.Tensor],
                   momentum_buffers: Sequence[torch.Tensor], ema: Sequence[torch.Tensor], *, lr: float,
                   momentum: float = 0.9, weight_decay: float = 0.0, eta: float = 0.001, adapt: bool = True,
                   ema_momentum: Union[float, torch.Tensor] = 1.0, backend: Optional[str] = None) -> None:
    """One LARS step (``ssl_fast.train.LARS``'s math; ``adapt=False``: SGD with momentum, for biases and
    norms) of ``params`` and the EMA of the first ``len(ema)`` of them, one pass (plus one reading of the
    parameters and gradients for the norms). Buffers start at zero. The fused kernels sum the norms in fp64
    in a fixed order, so the trust ratio agrees with torch's ``_foreach_norm`` to a few ulps, not bitwise;
    ``backend="torch"`` is the unfused foreach sequence itself."""
    return _optim_ema.lars_ema_step_(params, grads, momentum_buffers, ema, lr=lr, momentum=momentum,
                                     weight_decay=weight_decay, eta=eta, adapt=adapt, ema_momentum=ema_momentum,
                                     backend=backend)


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
        eps: lower bound on each norm (``torch.nn.functional.cosine_similarity``), finite and > 0. fp16 / bf16
            inputs are computed in fp32 (their eps^2 would underflow: a zero vector would give NaN); the result
            has the inputs' dtype.

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


__all__ += ["ema_update_", "update_momentum", "negative_cosine_similarity", "byol_loss", "sgd_ema_step_",
            "adamw_ema_step_", "lars_ema_step_"]
