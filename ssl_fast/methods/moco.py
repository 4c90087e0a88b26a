"""MoCo v2 / v3 (He et al. 2020; Chen et al. 2020, 2021): momentum (EMA) key encoder.

v2: queries against the momentum keys plus a queue of past keys (``ssl_fast.nn.MemoryBank``), through
``ssl_fast.info_nce(..., negatives=queue)``; MLP head without BN. v3: no queue, symmetric in-batch
InfoNCE (``ssl_fast.nn.InfoNCELoss``) with a predictor, loss scaled by 2T as in the paper's code, and a
cosine momentum schedule. The teacher is ``ssl_fast.nn.EMA`` (fused update).
"""

from __future__ import annotations

import torch

import ssl_fast

from .base import Method, Tower, teacher_of, loss_kwargs, mlp, require, std_of_normalized

# MoCo v2, ResNet-50, 200 epochs: batch 256, SGD lr 0.03 (x B/256), wd 1e-4, cosine, T 0.2, queue 65536, m 0.999.
IMAGENET_V2 = dict(backbone="resnet50", image_size=224, batch_size=256, epochs=200, optimizer="sgd", lr=0.03,
                   weight_decay=1e-4, warmup_epochs=0, temperature=0.2, proj_hidden_dim=2048, proj_dim=128,
                   queue_size=65536, ema_momentum=0.999, ema_final_momentum=0.999, moco_version="v2",
                   precision="bf16", channels_last=True)
# MoCo v3, ResNet-50, 100 epochs: batch 4096, LARS lr 0.6 (x B/256), wd 1e-6, T 1.0, m 0.99 -> 1 (cosine).
IMAGENET_V3 = dict(backbone="resnet50", image_size=224, batch_size=4096, epochs=100, optimizer="lars", lr=0.6,
                   weight_decay=1e-6, warmup_epochs=10, temperature=1.0, proj_hidden_dim=4096, proj_dim=256,
                   pred_hidden_dim=4096, queue_size=0, ema_momentum=0.99, ema_final_momentum=1.0,
                   moco_version="v3", precision="bf16", channels_last=True)
IMAGENET = IMAGENET_V2
DIGITS = dict(backbone="small_cnn", image_size=32, batch_size=256, epochs=12, optimizer="adamw", lr=2e-3,
              weight_decay=1e-4, warmup_epochs=2, temperature=0.2, proj_hidden_dim=256, proj_dim=64,
              queue_size=1024, ema_momentum=0.99, ema_final_momentum=0.99, moco_version="v2")


class MoCo(Method):
    """MoCo v2 (queue) or v3 (predictor, symmetric in-batch loss).

    Args:
        backbone, feature_dim: encoder and its representation size.
        version: ``"v2"`` or ``"v3"``.
        proj_hidden_dim, proj_dim: projector widths; ``pred_hidden_dim``: v3 predictor width.
        temperature: InfoNCE temperature.
        queue_size: v2 queue length (0 = in-batch negatives only).
        ema_momentum, ema_final_momentum: teacher momentum, cosine-scheduled between the two
            (equal values = constant, MoCo v2).
        gather_distributed: keys from every rank (when the loss supports it).
    """

    name = "moco"

    def __init__(self, backbone, feature_dim: int, version: str = "v2", proj_hidden_dim: int = 2048,
                 proj_dim: int = 128, pred_hidden_dim: int = 4096, temperature: float = 0.2,
                 queue_size: int = 65536, ema_momentum: float = 0.999, ema_final_momentum: float = 0.999,
                 gather_distributed: bool = False):
        super().__init__(backbone, feature_dim)
        if version not in ("v2", "v3"):
            raise ValueError(f"moco_version must be 'v2' or 'v3', got {version!r}")
        self.version, self.temperature = version, float(temperature)
        if version == "v2":
            projector = mlp((feature_dim, proj_hidden_dim, proj_dim), bn=False)
            self.predictor = None
        else:
            projector = mlp((feature_dim, proj_hidden_dim, proj_hidden_dim, proj_dim), bn_last=True,
                            bn_last_affine=False)
            self.predictor = mlp((proj_dim, pred_hidden_dim, proj_dim), bn_last=True, bn_last_affine=False)
        self.online = Tower(backbone, projector)
        EMA = require("EMA")
        self.teacher = EMA(self.online, momentum=ema_momentum, schedule="cosine", final_momentum=ema_final_momentum)
        self.queue = require("MemoryBank")(queue_size, proj_dim) if version == "v2" and queue_size > 0 else None
        cls = ssl_fast.nn.InfoNCELoss
        self.criterion = cls(temperature, symmetric=False, **loss_kwargs(cls, gather_distributed))

    def forward(self, views, step: int = 0, total_steps: int = 1):
        x = torch.cat(views[:2])
        q = self.online(x)
        z = q
        if self.predictor is not None:
            q = self.predictor(q)
        with torch.no_grad():
            k = teacher_of(self.teacher)(x)
        q0, q1 = q.chunk(2)
        k0, k1 = k.chunk(2)
        if self.version == "v3":
            loss = (self.criterion(q0, k1) + self.criterion(q1, k0)) * (2 * self.temperature)
        elif self.queue is not None:
            negatives = self.queue(torch.cat([k1, k0]), update=True).to(q0.dtype)
            loss = 0.5 * (ssl_fast.info_nce(q0, k1, self.temperature, negatives=negatives)
                          + ssl_fast.info_nce(q1, k0, self.temperature, negatives=negatives))
        else:
            loss = 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))
        return loss, {"std": std_of_normalized(z[: z.shape[0] // 2])}

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        self.teacher.update(step=step, total_steps=total_steps)
