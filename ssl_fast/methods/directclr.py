"""DirectCLR (Jing et al. 2022): no projector; the contrastive loss sees only r[:, :d0] of the representation."""

from __future__ import annotations

import torch

from ..nn import DirectCLRLoss
from .base import Method, std_of_normalized

# ResNet-50 on ImageNet (the official code): d0 = 360 of 2048, symmetric cross-view InfoNCE, T = 0.1,
# batch 4096, LARS, 100 epochs -> ~62.7% linear probe.
IMAGENET = dict(backbone="resnet50", image_size=224, batch_size=4096, epochs=100, optimizer="lars", lr=0.3,
                weight_decay=1e-6, warmup_epochs=10, temperature=0.1, d0=360, directclr_variant="official",
                precision="bf16", channels_last=True)
DIGITS = dict(backbone="small_cnn", image_size=32, batch_size=256, epochs=12, optimizer="adamw", lr=2e-3,
              weight_decay=1e-4, warmup_epochs=2, temperature=0.2, d0=32, directclr_variant="official")


class DirectCLR(Method):
    """DirectCLR: ``ssl_fast.nn.DirectCLRLoss(feature_dim=d0)`` directly on the backbone's representation.

    Args:
        backbone, feature_dim: encoder and its representation size D.
        d0: the sub-vector the loss sees; must satisfy 1 <= d0 <= D.
        temperature: InfoNCE temperature.
        variant: ``"official"`` (symmetric cross-view InfoNCE) or ``"ntxent"``.
        gather_distributed: negatives from every rank.

    Raises:
        ValueError: d0 larger than the representation (or < 1).
    """

    name = "directclr"
    supports_grad_cache = True

    def __init__(self, backbone, feature_dim: int, d0: int = 360, temperature: float = 0.1,
                 variant: str = "official", gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        if not 1 <= int(d0) <= feature_dim:
            raise ValueError(f"DirectCLR d0={d0} must be between 1 and the representation dimension {feature_dim}")
        self.criterion = DirectCLRLoss(feature_dim=int(d0), temperature=temperature, variant=variant,
                                       gather_distributed=gather_distributed)

    def embed(self, x):
        return self.backbone(x)

    def loss_from_embeddings(self, z0, z1):
        return self.criterion(z0, z1)

    def forward(self, views, step: int = 0, total_steps: int = 1, embed: bool = False):
        if embed:  # gradient caching: one chunk of one view (through DDP's forward)
            return self.embed(views)
        r = self.backbone(torch.cat(views[:2]))
        r0, r1 = r.chunk(2)
        return self.criterion(r0, r1), {"std": std_of_normalized(r0[:, : self.criterion.feature_dim])}
