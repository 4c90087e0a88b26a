"""SwAV: the swapped-prediction loss on fused Sinkhorn-Knopp codes, and the prototype layer.

Drop-ins for lightly's ``lightly.loss.SwaVLoss`` and ``lightly.models.modules.SwaVPrototypes`` (same
arguments, same values); the loss is :func:`ssl_fast.functional.swav_loss`.
"""

from __future__ import annotations

from typing import List, Optional, Union

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import _checks
from .. import functional as sf


class SwaVLoss(nn.Module):
    """SwAV's swapped-prediction loss over multi-crop prototype scores.

    For each high-resolution crop i, codes q_i = sinkhorn_knopp(scores_i [; queue_i]) (the queue rows are
    used for the codes and then dropped); every other crop v predicts them:
    ``loss = 1/n_high * sum_i 1/(n_crops - 1) * sum_{v != i} CE(q_i, softmax(scores_v / T))`` with the soft
    cross entropy ``CE(q, p) = -mean_b sum_k q_bk log p_bk``. Equal to lightly's ``SwaVLoss`` in value and
    gradient; each crop's ``log_softmax`` is computed once (lightly recomputes it per code).

    No gradient flows through the codes (targets, as in SwAV); gradients reach every crop's scores.

    Args:
        temperature: T > 0 of the prediction softmax (SwAV: 0.1).
        sinkhorn_iterations: Sinkhorn sweeps (>= 1).
        sinkhorn_epsilon: Sinkhorn eps > 0.
        sinkhorn_gather_distributed: compute the codes over the samples of every rank (the default process
            group) when ``torch.distributed`` is initialized with more than one process.

    Shape:
        high_resolution_outputs: list of n_high >= 1 tensors (B, K); low_resolution_outputs: list of (B, K);
        queue_outputs: None or a list of at least n_high tensors (Bq, K). Output: 0-dim loss (lightly
        returns shape (1,), same value).

    Example:
        >>> criterion = ssl_fast.nn.SwaVLoss()
        >>> loss = criterion([p(z) for z in high_res], [p(z) for z in low_res])
    """

    def __init__(self, temperature: float = 0.1, sinkhorn_iterations: int = 3, sinkhorn_epsilon: float = 0.05,
                 sinkhorn_gather_distributed: bool = False):
        super().__init__()
        if sinkhorn_gather_distributed and not torch.distributed.is_available():
            raise ValueError("sinkhorn_gather_distributed is True but torch.distributed is not available")
        self.temperature = _checks.positive_float(temperature, "temperature")
        self.sinkhorn_iterations = _checks.int_at_least(sinkhorn_iterations, "sinkhorn_iterations", 1)
        self.sinkhorn_epsilon = _checks.positive_float(sinkhorn_epsilon, "sinkhorn_epsilon")
        self.sinkhorn_gather_distributed = bool(sinkhorn_gather_distributed)

    def subloss(self, z: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
        """Soft cross entropy -mean_b sum_k q_bk log_softmax(z_b / T)_k (lightly's ``subloss``)."""
        return -torch.mean(torch.sum(q * F.log_softmax(z / self.temperature, dim=1), dim=1))

    def forward(self, high_resolution_outputs: List[torch.Tensor], low_resolution_outputs: List[torch.Tensor],
                queue_outputs: Optional[List[torch.Tensor]] = None) -> torch.Tensor:
        return sf.swav_loss(high_resolution_outputs, low_resolution_outputs, queue_outputs,
                            temperature=self.temperature, sinkhorn_iterations=self.sinkhorn_iterations,
                            sinkhorn_epsilon=self.sinkhorn_epsilon,
                            process_group=True if self.sinkhorn_gather_distributed else None)


class SwaVPrototypes(nn.Module):
    """SwAV's prototype layer(s): scores = x W^T + b for one or several prototype heads.

    Same parameters and state-dict layout as lightly's ``SwaVPrototypes`` (``heads``: a ``ModuleList`` of
    ``nn.Linear(input_dim, n)``). In addition it keeps the prototypes on the unit sphere as SwAV does each
    step: in training mode, the first ``forward`` of each new ``step`` value normalizes every prototype
    (row of W) in place under ``no_grad`` (later calls with the same step, e.g. one per crop, do not touch
    W, so the autograd graph of earlier crops stays valid). Without ``step``, call :meth:`normalize` once
    per training step before the forward passes (lightly's usage). For the first
    ``n_steps_frozen_prototypes`` steps the prototypes get no gradient (``requires_grad`` off).

    Args:
        input_dim: feature dimension D.
        n_prototypes: number of prototypes K, or a list of K's for several heads.
        n_steps_frozen_prototypes: steps during which the prototypes stay fixed (needs ``step``).
        normalize_each_step: the per-step normalization described above (default True).

    Shape:
        x: (B, D) -> (B, K), or a list of (B, K_h) for a list ``n_prototypes``.

    Example:
        >>> protos = ssl_fast.nn.SwaVPrototypes(128, 3000)
        >>> scores = [protos(F.normalize(z, dim=1), step=it) for z in crops]
    """

    def __init__(self, input_dim: int = 128, n_prototypes: Union[List[int], int] = 3000,
                 n_steps_frozen_prototypes: int = 0, *, normalize_each_step: bool = True):
        super().__init__()
        self.n_prototypes = n_prototypes if isinstance(n_prototypes, list) else [n_prototypes]
        self._is_single_prototype = isinstance(n_prototypes, int)
        self.heads = nn.ModuleList([nn.Linear(input_dim, k) for k in self.n_prototypes])
        self.n_steps_frozen_prototypes = n_steps_frozen_prototypes
        self.normalize_each_step = normalize_each_step
        self._normalized_step: Optional[int] = None

    def forward(self, x: torch.Tensor, step: Optional[int] = None) -> Union[torch.Tensor, List[torch.Tensor]]:
        self._freeze_prototypes_if_required(step)
        if self.normalize_each_step and self.training and step is not None and step != self._normalized_step:
            self.normalize()
            self._normalized_step = step
        out = [layer(x) for layer in self.heads]
        return out[0] if self._is_single_prototype else out

    @torch.no_grad()
    def normalize(self) -> None:
        """Scale every prototype (row of each head's weight) to unit L2 norm, in place."""
        for layer in self.heads:
            layer.weight.div_(torch.norm(layer.weight, dim=1, keepdim=True))

    def _freeze_prototypes_if_required(self, step: Optional[int] = None) -> None:
        if self.n_steps_frozen_prototypes > 0:
            if step is None:
                raise ValueError("`n_steps_frozen_prototypes` is greater than 0, please provide the `step` "
                                 "argument to the `forward()` method.")
            self.requires_grad_(step >= self.n_steps_frozen_prototypes)
