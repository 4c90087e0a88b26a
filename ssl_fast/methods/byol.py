"""BYOL (Grill et al. 2020): online encoder + projector + predictor; the target is an EMA of encoder + projector.

The target runs under ``no_grad`` and changes only through ``ssl_fast.nn.EMA.update`` (fused, cosine
momentum schedule tau_k = 1 - (1 - tau_base)(cos(pi k / K) + 1) / 2). Loss: ``ssl_fast.nn.BYOLLoss``
(2 - 2 cos, symmetrized over the views).
"""

from __future__ import annotations

import torch

from ..nn import EMA, BYOLLoss
from .base import Method, Tower, mlp, std_of_normalized

# ResNet-50, ImageNet, 300 epochs: batch 4096, LARS lr 0.2 x B/256, wd 1.5e-6, 10 warmup epochs,
# projector / predictor 4096-256, tau_base 0.996; asymmetric views (blur 1.0 / 0.1, solarize 0 / 0.2).
IMAGENET = dict(backbone="resnet50", image_size=224, batch_size=4096, epochs=300, optimizer="lars", lr=0.2,
                weight_decay=1.5e-6, warmup_epochs=10, proj_hidden_dim=4096, proj_dim=256, pred_hidden_dim=4096,
                ema_momentum=0.996, ema_final_momentum=1.0, precision="bf16", channels_last=True)
DIGITS = dict(backbone="small_cnn", image_size=32, batch_size=256, epochs=12, optimizer="adamw", lr=2e-3,
              weight_decay=1e-4, warmup_epochs=2, proj_hidden_dim=256, proj_dim=64, pred_hidden_dim=256,
              ema_momentum=0.99, ema_final_momentum=1.0)


class BYOL(Method):
    """BYOL.

    Args:
        backbone, feature_dim: encoder and its representation size.
        proj_hidden_dim, proj_dim, pred_hidden_dim: head widths.
        ema_momentum, ema_final_momentum: tau_base and its final value (cosine schedule).
    """

    name = "byol"
    #: True when the trainer's optimizer (``ssl_fast.optim``, ``--fused-ema-step``) updates the teacher in its step
    ema_in_optimizer = False

    def __init__(self, backbone, feature_dim: int, proj_hidden_dim: int = 4096, proj_dim: int = 256,
                 pred_hidden_dim: int = 4096, ema_momentum: float = 0.996, ema_final_momentum: float = 1.0):
        super().__init__(backbone, feature_dim)
        self.online = Tower(backbone, mlp((feature_dim, proj_hidden_dim, proj_dim)))
        self.predictor = mlp((proj_dim, pred_hidden_dim, proj_dim))
        self.teacher = EMA(self.online, momentum=ema_momentum, schedule="cosine", final_momentum=ema_final_momentum)
        self.criterion = BYOLLoss()

    def forward(self, views, step: int = 0, total_steps: int = 1):
        x = torch.cat(views[:2])
        z = self.online(x)
        p0, p1 = self.predictor(z).chunk(2)
        with torch.no_grad():
            t0, t1 = self.teacher(x).chunk(2)
        return self.criterion(p0, p1, t0, t1), {"std": std_of_normalized(z[: z.shape[0] // 2])}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        if not self.ema_in_optimizer:
            self.teacher.update(step=step, total_steps=total_steps)
