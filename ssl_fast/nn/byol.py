"""BYOL / SimSiam loss modules: hyperparameters only, the math is in ``ssl_fast.functional``."""

from __future__ import annotations

import torch
from torch import nn

from .. import functional as sf


class NegativeCosineSimilarity(nn.Module):
    """SimSiam's loss, ``-mean cos(x0, x1)``; a drop-in for lightly's ``NegativeCosineSimilarity``.

    Args:
        dim: the dimension of the vectors (as ``torch.nn.CosineSimilarity``).
        eps: lower bound on each vector's norm.

    Shape:
        - x0, x1: broadcastable, e.g. (N, D) predictions and (N, D) targets.
        - Output: scalar.

    Returns:
        Minus the mean cosine similarity. Stop-gradient is the caller's, as in the paper: pass
        ``z.detach()`` as the target.

    Example:
        >>> criterion = ssl_fast.nn.NegativeCosineSimilarity()
        >>> loss = 0.5 * (criterion(p0, z1.detach()) + criterion(p1, z0.detach()))
    """

    def __init__(self, dim: int = 1, eps: float = 1e-8) -> None:
        super().__init__()
        self.dim = dim
        self.eps = eps

    def forward(self, x0: torch.Tensor, x1: torch.Tensor) -> torch.Tensor:
        return sf.negative_cosine_similarity(x0, x1, dim=self.dim, eps=self.eps)


class BYOLLoss(nn.Module):
    """BYOL's symmetric loss ``mean_i [(2 - 2 cos(p0_i, z1_i)) + (2 - 2 cos(p1_i, z0_i))] / 2``.

    The paper sums the two view terms per sample (``L + L~``); this averages them (half the paper's value,
    in [0, 4]; same minimizer, gradients halved) and averages over the batch. The targets z must come from
    the EMA target network without gradient (``torch.no_grad()`` or ``.detach()``): stop-gradient is the
    caller's, as in the paper.

    Shape:
        - p0, p1: (N, D), the online network's predictions for views 0 and 1.
        - z0, z1: (N, D), the target network's projections for views 0 and 1.
        - Output: scalar (float32; float64 for float64 inputs).

    Example:
        >>> criterion = ssl_fast.nn.BYOLLoss()
        >>> with torch.no_grad():
        ...     z0, z1 = teacher(x0), teacher(x1)
        >>> loss = criterion(predictor(student(x0)), predictor(student(x1)), z0, z1)
    """

    def forward(self, p0: torch.Tensor, p1: torch.Tensor, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        return sf.byol_loss(p0, p1, z0, z1)
