"""SimCLR (Chen et al. 2020): two views -> encoder -> MLP projector -> NT-Xent over the 2N - 2 in-batch negatives."""

from __future__ import annotations

import torch

from ..nn import NTXentLoss
from .base import Method, mlp, std_of_normalized

# ResNet-50 on ImageNet, batch 4096: LARS, lr 0.3 x B/256, wd 1e-6, 10 warmup epochs + cosine, T = 0.1,
# projector 2048-2048-128, color distortion strength 1.0 with blur; 100 epochs -> ~64.4% linear probe.
IMAGENET = dict(backbone="resnet50", image_size=224, batch_size=4096, epochs=100, optimizer="lars", lr=0.3,
                weight_decay=1e-6, warmup_epochs=10, temperature=0.1, proj_hidden_dim=2048, proj_dim=128,
                precision="bf16", channels_last=True)
# The embedded digits default (CPU, minutes).
DIGITS = dict(backbone="small_cnn", image_size=32, batch_size=256, epochs=12, optimizer="adamw", lr=2e-3,
              weight_decay=1e-4, warmup_epochs=2, temperature=0.2, proj_hidden_dim=256, proj_dim=64)


class SimCLR(Method):
    """SimCLR: backbone + projector MLP (Linear-BN-ReLU-Linear), ``ssl_fast.nn.NTXentLoss``.

    Args:
        backbone: encoder (B, C, H, W) -> (B, feature_dim).
        feature_dim: representation size.
        proj_hidden_dim, proj_dim: projector widths.
        temperature: NT-Xent temperature.
        gather_distributed: negatives from every rank.

    Shape:
        views: two (B, C, H, W) tensors -> (loss scalar, logs).
    """

    name = "simclr"
    supports_grad_cache = True

    def __init__(self, backbone, feature_dim: int, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 temperature: float = 0.5, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        self.projector = mlp((feature_dim, proj_hidden_dim, proj_dim))
        self.criterion = NTXentLoss(temperature, gather_distributed=gather_distributed)

    def embed(self, x):
        return self.projector(self.backbone(x))

    def loss_from_embeddings(self, z0, z1):
        return self.criterion(z0, z1)

    def forward(self, views, step: int = 0, total_steps: int = 1, embed: bool = False):
        if embed:  # gradient caching: one chunk of one view (through DDP's forward)
            return self.embed(views)
        z = self.embed(torch.cat(views[:2]))
        z0, z1 = z.chunk(2)
        return self.criterion(z0, z1), {"std": std_of_normalized(z0)}
