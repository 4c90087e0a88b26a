"""SimSiam (Chen & He 2021): predictor + stop-gradient, symmetric negative cosine, no momentum, no negatives."""

from __future__ import annotations

import torch

from ..nn import NegativeCosineSimilarity
from .base import Method, mlp, std_of_normalized

# ResNet-50, ImageNet, 100 epochs: batch 512, SGD lr 0.05 x B/256, momentum 0.9, wd 1e-4, cosine, no warmup;
# projector 3 x 2048 with BN on the output, predictor 2048-512-2048 whose lr stays fixed at the initial lr
# (official --fix-pred-lr) -> ~67.7% linear probe.
IMAGENET = dict(backbone="resnet50", image_size=224, batch_size=512, epochs=100, optimizer="sgd", lr=0.05,
                weight_decay=1e-4, warmup_epochs=0, proj_hidden_dim=2048, proj_dim=2048, pred_hidden_dim=512,
                fix_pred_lr=True, precision="bf16", channels_last=True)
DIGITS = dict(backbone="small_cnn", image_size=32, batch_size=256, epochs=12, optimizer="adamw", lr=2e-3,
              weight_decay=1e-4, warmup_epochs=2, proj_hidden_dim=256, proj_dim=256, pred_hidden_dim=64)


class SimSiam(Method):
    """SimSiam: loss = (D(p0, sg(z1)) + D(p1, sg(z0))) / 2 with D = ``ssl_fast.nn.NegativeCosineSimilarity``.

    Args:
        backbone, feature_dim: encoder and its representation size.
        proj_hidden_dim, proj_dim: projector widths (3 layers, BN on the output).
        pred_hidden_dim: predictor bottleneck.
    """

    name = "simsiam"

    def __init__(self, backbone, feature_dim: int, proj_hidden_dim: int = 2048, proj_dim: int = 2048,
                 pred_hidden_dim: int = 512):
        super().__init__(backbone, feature_dim)
        self.projector = mlp((feature_dim, proj_hidden_dim, proj_hidden_dim, proj_dim), bn_last=True)
        self.predictor = mlp((proj_dim, pred_hidden_dim, proj_dim))
        self.criterion = NegativeCosineSimilarity()

    def forward(self, views, step: int = 0, total_steps: int = 1):
        z = self.projector(self.backbone(torch.cat(views[:2])))
        p = self.predictor(z)
        z0, z1 = z.chunk(2)
        p0, p1 = p.chunk(2)
        loss = 0.5 * (self.criterion(p0, z1.detach()) + self.criterion(p1, z0.detach()))  # stop-gradient
        return loss, {"std": std_of_normalized(z0)}
