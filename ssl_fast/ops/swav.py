"""SwAV's swapped-prediction loss on fused Sinkhorn-Knopp codes: argument checks and the (small) math in torch.

For each high-resolution crop i, codes q_i = sinkhorn_knopp(scores_i [; queue_i]) (the queue rows are used for
the codes and then dropped; no gradient: targets, as in SwAV); every other crop v predicts them:

    L = 1/n_high sum_i 1/(n_crops - 1) sum_{v != i} CE(q_i, softmax(scores_v / T)),
    CE(q, p) = -mean_b sum_k q_bk log p_bk,

computed as sum_v CE(sum_{i != v} q_i, p_v): one log_softmax per crop (lightly recomputes it per code). The
codes come from :mod:`ssl_fast.ops.sinkhorn` (fused, log domain); the rest is a few O(B K) torch ops whose
gradient autograd gives.
"""

from __future__ import annotations

from typing import List, Optional, Sequence

import torch
import torch.nn.functional as F

from .. import _checks
from .. import distributed as _dist
from .sinkhorn import SUPPORTED_DTYPES, sinkhorn_knopp


def _check_crops(high, low, queue_outputs) -> None:
    if len(high) == 0:
        raise ValueError("high_resolution_outputs must hold at least one tensor")
    for name, crops in (("high_resolution_outputs", high), ("low_resolution_outputs", low),
                        ("queue_outputs", queue_outputs or [])):
        for c in crops:
            if not isinstance(c, torch.Tensor):
                raise TypeError(f"{name}: every crop must be a torch.Tensor, got {type(c).__name__}")
            if c.dtype not in SUPPORTED_DTYPES:
                raise TypeError(f"{name}: every crop must be float32, bfloat16, float16 or float64, got {c.dtype}")
    if len(high) + len(low) < 2:
        raise ValueError("the swapped prediction needs at least two crops (high_resolution_outputs + "
                         "low_resolution_outputs)")
    if queue_outputs is not None and len(queue_outputs) < len(high):
        raise ValueError(f"queue_outputs must hold one tensor per high-resolution crop ({len(high)}), got "
                         f"{len(queue_outputs)}")
    shape = tuple(high[0].shape)
    for name, crops in (("high_resolution_outputs", high), ("low_resolution_outputs", low)):
        for c in crops:
            if c.dim() != 2 or tuple(c.shape) != shape:
                raise ValueError(f"{name}: every crop must have shape (B, K) = {shape}, got {tuple(c.shape)}")


def swav_loss(high_resolution_outputs: Sequence[torch.Tensor], low_resolution_outputs: Sequence[torch.Tensor] = (),
              queue_outputs: Optional[Sequence[torch.Tensor]] = None, *, temperature: float = 0.1,
              sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05, process_group=None) -> torch.Tensor:
    """SwAV's swapped-prediction loss (see ``ssl_fast.functional.swav_loss``)."""
    high: List[torch.Tensor] = list(high_resolution_outputs)
    low: List[torch.Tensor] = list(low_resolution_outputs)
    _check_crops(high, low, queue_outputs)
    temperature = _checks.positive_float(temperature, "temperature")
    iterations = _checks.int_at_least(sinkhorn_iterations, "sinkhorn_iterations", 1)
    epsilon = _checks.positive_float(sinkhorn_epsilon, "sinkhorn_epsilon")
    group = _dist.resolve_group(process_group)
    b = high[0].shape[0]

    # codes of every high-resolution crop (no gradient), and their sum
    codes = []
    for i, h in enumerate(high):
        scores = h.detach()
        if queue_outputs is not None:
            scores = torch.cat((scores, queue_outputs[i].detach().to(scores.dtype)))
        q = sinkhorn_knopp(scores, epsilon, iterations, process_group=group)
        codes.append(q[:b] if queue_outputs is not None else q)
    total = codes[0] if len(codes) == 1 else torch.stack(codes).sum(dim=0)

    # sum_i sum_{v != i} CE(q_i, p_v) = sum_v CE(sum_{i != v} q_i, p_v): one log_softmax per crop
    loss = None
    for v, z in enumerate(high + low):
        target = total - codes[v] if v < len(high) else total
        logp = F.log_softmax(z / temperature, dim=1)
        term = -torch.sum(target * logp) / b
        loss = term if loss is None else loss + term
    return loss / ((len(high) + len(low) - 1) * len(high))
