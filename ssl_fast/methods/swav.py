"""SwAV (Caron et al. 2020): prototypes, codes by Sinkhorn-Knopp on the high-resolution crops, swapped
prediction over multi-crop views, an optional queue of past projections (``ssl_fast.nn.MemoryBank``).

Loss: ``ssl_fast.nn.SwaVLoss`` (fused Sinkhorn). Prototypes: ``ssl_fast.nn.SwaVPrototypes`` (frozen for
the first steps), l2-normalized before every step.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from ..nn import MemoryBank, SwaVLoss, SwaVPrototypes
from .base import Method, mlp

# ResNet-50, ImageNet, 100-800 epochs: batch 4096, LARS lr 4.8 (0.3 x B/256) -> 0.0048, wd 1e-6, T 0.1,
# eps 0.05, 3 Sinkhorn sweeps, 3000 prototypes frozen for the first epoch, multi-crop 2 x 224 + 6 x 96
# (scales 0.14-1 / 0.05-0.14); a 3840-long queue from epoch 15 when the batch is small (256).
IMAGENET = dict(backbone="resnet50", image_size=224, batch_size=4096, epochs=100, optimizer="lars", lr=0.3,
                weight_decay=1e-6, warmup_epochs=10, min_lr_ratio=0.001, temperature=0.1, proj_hidden_dim=2048,
                proj_dim=128, n_prototypes=3000, sinkhorn_iterations=3, sinkhorn_epsilon=0.05,
                freeze_prototypes_epochs=1, n_local_crops=6, local_size=96, queue_size=0, queue_start_epoch=15,
                precision="bf16", channels_last=True)
# Digits (CPU-sized): T 0.2, not the paper's 0.1: at 0.1 this small model sat at the uniform prediction
# (loss = ln 30 = 3.40 throughout) and gained only +1.9 / +2.0 / +2.2 kNN points over the initialization on
# seeds 0 / 1 / 2; at 0.2: +4.5 / +6.4 / +4.4 (12 epochs, 2-core Xeon).
DIGITS = dict(backbone="small_cnn", image_size=32, batch_size=256, epochs=12, optimizer="adamw", lr=2e-3,
              weight_decay=1e-4, warmup_epochs=2, temperature=0.2, proj_hidden_dim=256, proj_dim=64,
              n_prototypes=30, sinkhorn_iterations=3, sinkhorn_epsilon=0.05, freeze_prototypes_epochs=1,
              n_local_crops=2, local_size=16, queue_size=0, queue_start_epoch=5)


class SwAV(Method):
    """SwAV with multi-crop.

    Args:
        backbone, feature_dim: encoder and its representation size.
        proj_hidden_dim, proj_dim: projector widths.
        n_prototypes: K.
        temperature, sinkhorn_iterations, sinkhorn_epsilon: loss hyperparameters.
        freeze_prototypes_steps: prototypes get no update for this many steps.
        n_local_crops: low-resolution views expected after the 2 global ones.
        queue_size: per-global-view queue of past projections (0 = none); used from ``queue_start_step``.
        gather_distributed: Sinkhorn over every rank's batch.
    """

    name = "swav"

    def __init__(self, backbone, feature_dim: int, proj_hidden_dim: int = 2048, proj_dim: int = 128,
                 n_prototypes: int = 3000, temperature: float = 0.1, sinkhorn_iterations: int = 3,
                 sinkhorn_epsilon: float = 0.05, freeze_prototypes_steps: int = 0, n_local_crops: int = 6,
                 queue_size: int = 0, queue_start_step: int = 0, gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        self.n_local_views = int(n_local_crops)
        self.needs_unused_parameters = freeze_prototypes_steps > 0
        self.projector = mlp((feature_dim, proj_hidden_dim, proj_dim))
        self.prototypes = SwaVPrototypes(proj_dim, n_prototypes, n_steps_frozen_prototypes=int(freeze_prototypes_steps))
        self.criterion = SwaVLoss(temperature=temperature, sinkhorn_iterations=sinkhorn_iterations,
                                  sinkhorn_epsilon=sinkhorn_epsilon, sinkhorn_gather_distributed=gather_distributed)
        self.queues = torch.nn.ModuleList([MemoryBank(queue_size, proj_dim) for _ in range(2)]) if queue_size else None
        self.queue_start_step = int(queue_start_step)

    def _project(self, x):
        return F.normalize(self.projector(self.backbone(x)), dim=1)

    def forward(self, views, step: int = 0, total_steps: int = 1):
        self.prototypes.normalize()
        z_high = self._project(torch.cat(views[:2]))
        high = list(self.prototypes(z_high, step).chunk(2))
        low = []
        if len(views) > 2:
            z_low = self._project(torch.cat(views[2:]))
            low = list(self.prototypes(z_low, step).chunk(len(views) - 2))
        queue_outputs = None
        if self.queues is not None:
            past = [q(z.detach(), update=True) for q, z in zip(self.queues, z_high.chunk(2))]
            if step >= self.queue_start_step:
                with torch.no_grad():
                    queue_outputs = [self.prototypes(p, step) for p in past]
        loss = self.criterion(high, low, queue_outputs=queue_outputs)
        return loss, {}
