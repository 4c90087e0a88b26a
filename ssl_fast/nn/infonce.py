"""Loss modules for InfoNCE / NT-Xent: hyperparameters only, the math is in ``ssl_fast.functional``."""

from __future__ import annotations

from typing import Optional, Union

import torch
from torch import nn

from .. import functional as sf

Temperature = Union[float, torch.Tensor]


class NTXentLoss(nn.Module):
    """SimCLR's NT-Xent loss; a drop-in for lightly's ``NTXentLoss`` (memory bank off).

    Args:
        temperature: T > 0 (float or 0-dim tensor; a tensor that requires grad is learned).
        normalize: l2-normalize the embeddings first (keyword-only: lightly's second positional argument is
            ``memory_bank_size``, which this module does not take, so ``NTXentLoss(0.5, 4096)`` fails loudly;
            ``ssl_fast.nn.lightly.NTXentLoss`` has lightly's exact signature).
        gather_distributed: negatives from every process of the default group (lightly's argument name): the
            value is the loss of the global batch and each rank's gradients are world_size x its share, so that
            DDP's averaging gives the single-process gradient (see ``ssl_fast.ntxent``); no-op in one process.
        local_loss: with ``gather_distributed``, return the mean over this rank's anchors only (open_clip's
            ``local_loss``; lightly's ``gather_distributed`` value); the gradients are the same.

    Shape:
        - out0, out1: (N, D), the two views' projections.
        - Output: scalar.

    Returns:
        The mean NT-Xent loss over the 2N anchors (float32).

    Example:
        >>> criterion = ssl_fast.nn.NTXentLoss(temperature=0.5)
        >>> loss = criterion(projector(backbone(x0)), projector(backbone(x1)))
    """

    def __init__(self, temperature: Temperature = 0.5, *, normalize: bool = True, gather_distributed: bool = False,
                 local_loss: bool = False):
        super().__init__()
        self.temperature = temperature
        self.normalize = normalize
        self.gather_distributed = gather_distributed
        self.local_loss = local_loss

    def forward(self, out0: torch.Tensor, out1: torch.Tensor) -> torch.Tensor:
        return sf.ntxent(out0, out1, self.temperature, normalize=self.normalize,
                         process_group=True if self.gather_distributed else None, local_loss=self.local_loss)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, normalize={self.normalize}"


class InfoNCELoss(nn.Module):
    """Cross-view InfoNCE (query i against key j, target j = i); ``symmetric=True`` is the CLIP loss.

    Args:
        temperature: T > 0 (float or 0-dim tensor; a tensor that requires grad is learned).
        symmetric: average the query->key and key->query losses.
        normalize: l2-normalize the embeddings first.
        gather_distributed: negatives from every process of the default group (lightly's argument name): the
            value is the loss of the global batch and each rank's gradients are world_size x its share, so that
            DDP's averaging gives the single-process gradient (see ``ssl_fast.ntxent``); no-op in one process.
        local_loss: with ``gather_distributed``, return the mean over this rank's anchors only (open_clip's
            ``local_loss``; lightly's ``gather_distributed`` value); the gradients are the same.
        forward's ``negatives``: (M, D) extra candidates without gradient (e.g. ``ssl_fast.nn.MemoryBank``).

    Shape:
        - query, key: (N, D).
        - Output: scalar.

    Example:
        >>> criterion = ssl_fast.nn.InfoNCELoss(temperature=0.07, symmetric=True)
        >>> loss = criterion(image_features, text_features)
    """

    def __init__(self, temperature: Temperature = 0.1, symmetric: bool = False, *, normalize: bool = True,
                 gather_distributed: bool = False, local_loss: bool = False):
        super().__init__()
        self.temperature = temperature
        self.symmetric = symmetric
        self.normalize = normalize
        self.gather_distributed = gather_distributed
        self.local_loss = local_loss

    def forward(self, query: torch.Tensor, key: torch.Tensor, negatives: Optional[torch.Tensor] = None
                ) -> torch.Tensor:
        return sf.info_nce(query, key, self.temperature, normalize=self.normalize, symmetric=self.symmetric,
                           negatives=negatives, process_group=True if self.gather_distributed else None,
                           local_loss=self.local_loss)

    def extra_repr(self) -> str:
        return f"temperature={self.temperature}, symmetric={self.symmetric}, normalize={self.normalize}"


class DirectCLRLoss(nn.Module):
    """DirectCLR: a contrastive loss on the first ``feature_dim`` dimensions of the representation, no projector.

    Args:
        feature_dim: d0, the sub-vector the loss sees (360 of ResNet-50's 2048 in the paper).
        temperature: T > 0.
        variant: ``"official"`` is the symmetric cross-view InfoNCE of the paper's code; ``"ntxent"`` is
            lightly's NT-Xent on the slice.
        gather_distributed: negatives from every process of the default group (lightly's argument name): the
            value is the loss of the global batch and each rank's gradients are world_size x its share, so that
            DDP's averaging gives the single-process gradient (see ``ssl_fast.ntxent``); no-op in one process.
        local_loss: with ``gather_distributed``, return the mean over this rank's anchors only (open_clip's
            ``local_loss``; lightly's ``gather_distributed`` value); the gradients are the same.

    Shape:
        - r0, r1: (N, D) backbone representations with D >= feature_dim (the slice is not copied).
        - Output: scalar.

    Example:
        >>> criterion = ssl_fast.nn.DirectCLRLoss(feature_dim=360)
        >>> loss = criterion(backbone(x0), backbone(x1))
    """

    VARIANTS = ("official", "ntxent")

    def __init__(self, feature_dim: int = 360, temperature: Temperature = 0.1, variant: str = "official", *,
                 gather_distributed: bool = False, local_loss: bool = False):
        super().__init__()
        self.gather_distributed = gather_distributed
        self.local_loss = local_loss
        if variant not in self.VARIANTS:
            raise ValueError(f"variant must be one of {self.VARIANTS}, got {variant!r}")
        if isinstance(feature_dim, bool) or not isinstance(feature_dim, int) or feature_dim < 1:
            raise ValueError(f"feature_dim must be a positive int, got {feature_dim!r}")
        self.feature_dim = feature_dim
        self.temperature = temperature
        self.variant = variant

    def forward(self, r0: torch.Tensor, r1: torch.Tensor) -> torch.Tensor:
        group = True if self.gather_distributed else None
        if self.variant == "official":
            return sf.info_nce(r0, r1, self.temperature, symmetric=True, feature_dim=self.feature_dim,
                               process_group=group, local_loss=self.local_loss)
        return sf.ntxent(r0, r1, self.temperature, feature_dim=self.feature_dim, process_group=group,
                         local_loss=self.local_loss)

    def extra_repr(self) -> str:
        return f"feature_dim={self.feature_dim}, temperature={self.temperature}, variant={self.variant!r}"
