"""MoCo v2 / v3 (He et al. 2020; Chen et al. 2020, 2021): momentum (EMA) key encoder.

v2: queries against the momentum keys plus a queue of past keys (``ssl_fast.nn.MemoryBank``), through
``ssl_fast.info_nce(..., negatives=queue)``; MLP head without BN. v3: no queue, symmetric in-batch
InfoNCE (``ssl_fast.nn.InfoNCELoss``) with a predictor, loss scaled by 2T as in the paper's code, and a
cosine momentum schedule. The teacher is ``ssl_fast.nn.EMA`` (fused update).

Shuffle-BN (MoCo v1/v2, ``shuffle_bn``): as the official ``_batch_shuffle_ddp`` / ``_batch_unshuffle_ddp``, the
key encoder's inputs are gathered from every rank, permuted by a random permutation broadcast from rank 0,
each rank encodes its slice of the permuted batch and the keys are gathered back and un-permuted. A query
and its positive key then get their BatchNorm statistics from different sub-batches, so the model cannot
find the positive through the statistics of its own sub-batch. On one process (and one group) a permutation
changes no BatchNorm statistic, so nothing is done; ``shuffle_bn_groups`` G > 1 splits every rank's
permuted key batch into G BatchNorm groups, which emulates G GPUs on one (or G per rank under DDP).
"""

from __future__ import annotations

from typing import Tuple

import torch
import torch.distributed as dist

from .. import distributed as _dist
from .. import functional as sf
from ..nn import EMA, InfoNCELoss, MemoryBank
from .base import Method, Tower, mlp, std_of_normalized

# MoCo v2, ResNet-50, 200 epochs: batch 256, SGD lr 0.03 (x B/256), wd 1e-4, cosine, T 0.2, queue 65536, m 0.999.
IMAGENET_V2 = dict(backbone="resnet50", image_size=224, batch_size=256, epochs=200, optimizer="sgd", lr=0.03,
                   weight_decay=1e-4, warmup_epochs=0, temperature=0.2, proj_hidden_dim=2048, proj_dim=128,
                   queue_size=65536, ema_momentum=0.999, ema_final_momentum=0.999, moco_version="v2",
                   shuffle_bn=True, precision="bf16", channels_last=True)
# MoCo v3, ResNet-50, 100 epochs: batch 4096, LARS lr 0.6 (x B/256), wd 1e-6, T 1.0, m 0.99 -> 1 (cosine).
IMAGENET_V3 = dict(backbone="resnet50", image_size=224, batch_size=4096, epochs=100, optimizer="lars", lr=0.6,
                   weight_decay=1e-6, warmup_epochs=10, temperature=1.0, proj_hidden_dim=4096, proj_dim=256,
                   pred_hidden_dim=4096, queue_size=0, ema_momentum=0.99, ema_final_momentum=1.0,
                   moco_version="v3", precision="bf16", channels_last=True)
IMAGENET = IMAGENET_V2
DIGITS = dict(backbone="small_cnn", image_size=32, batch_size=256, epochs=12, optimizer="adamw", lr=2e-3,
              weight_decay=1e-4, warmup_epochs=2, temperature=0.2, proj_hidden_dim=256, proj_dim=64,
              queue_size=1024, ema_momentum=0.99, ema_final_momentum=0.99, moco_version="v2")


def _world_group():
    return _dist.resolve_group(True)


@torch.no_grad()
def batch_shuffle(x: torch.Tensor, group=None) -> Tuple[torch.Tensor, torch.Tensor]:
    """MoCo's ``_batch_shuffle_ddp``: this rank's slice of a random permutation of every rank's ``x``.

    Args:
        x: this rank's batch (B, ...); every rank of ``group`` passes the same B.
        group: a process group; None = the default group when torch.distributed is initialized with more
            than one process, else a single process; False = a single process (a permutation of ``x``).

    Returns:
        (x_shuffled (B, ...), idx_unshuffle (W * B,) int64): ``batch_unshuffle(f(x_shuffled), idx_unshuffle)``
        is ``f(x)`` for any per-sample ``f``. The permutation is drawn on rank 0 (its global RNG) and
        broadcast.
    """
    group = _world_group() if group is None else _dist.resolve_group(group)
    world, rank = _dist.world_and_rank(group)
    x_all = _dist.all_gather(x.contiguous(), group) if world > 1 else x
    idx_shuffle = torch.randperm(x_all.shape[0], device=x.device)
    if world > 1:
        dist.broadcast(idx_shuffle, src=dist.get_global_rank(group, 0), group=group)
    idx_unshuffle = torch.argsort(idx_shuffle)
    return x_all[idx_shuffle.view(world, -1)[rank]], idx_unshuffle


@torch.no_grad()
def batch_unshuffle(x: torch.Tensor, idx_unshuffle: torch.Tensor, group=None) -> torch.Tensor:
    """MoCo's ``_batch_unshuffle_ddp``: the inverse of :func:`batch_shuffle` for this rank's outputs (B, ...)."""
    group = _world_group() if group is None else _dist.resolve_group(group)
    world, rank = _dist.world_and_rank(group)
    x_all = _dist.all_gather(x.contiguous(), group) if world > 1 else x
    return x_all[idx_unshuffle.view(world, -1)[rank]]


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
        gather_distributed: keys from every rank; the v2 queue then enqueues
            every rank's keys (as the official ``concat_all_gather``), so all ranks hold the same queue.
        shuffle_bn: shuffle-BN of the key encoder (see the module docstring).
        shuffle_bn_groups: BatchNorm groups of the key encoder per rank under shuffle-BN.
    """

    name = "moco"
    #: True when the trainer's optimizer (``ssl_fast.optim``, ``--fused-ema-step``) updates the teacher in its step
    ema_in_optimizer = False

    def __init__(self, backbone, feature_dim: int, version: str = "v2", proj_hidden_dim: int = 2048,
                 proj_dim: int = 128, pred_hidden_dim: int = 4096, temperature: float = 0.2,
                 queue_size: int = 65536, ema_momentum: float = 0.999, ema_final_momentum: float = 0.999,
                 gather_distributed: bool = False, shuffle_bn: bool = False, shuffle_bn_groups: int = 1):
        super().__init__(backbone, feature_dim)
        if version not in ("v2", "v3"):
            raise ValueError(f"moco_version must be 'v2' or 'v3', got {version!r}")
        if isinstance(shuffle_bn_groups, bool) or not isinstance(shuffle_bn_groups, int) or shuffle_bn_groups < 1:
            raise ValueError(f"shuffle_bn_groups must be a positive int, got {shuffle_bn_groups!r}")
        self.shuffle_bn, self.shuffle_bn_groups = bool(shuffle_bn), shuffle_bn_groups
        self.version, self.temperature = version, float(temperature)
        if version == "v2":
            projector = mlp((feature_dim, proj_hidden_dim, proj_dim), bn=False)
            self.predictor = None
        else:
            projector = mlp((feature_dim, proj_hidden_dim, proj_hidden_dim, proj_dim), bn_last=True,
                            bn_last_affine=False)
            self.predictor = mlp((proj_dim, pred_hidden_dim, proj_dim), bn_last=True, bn_last_affine=False)
        self.online = Tower(backbone, projector)
        self.teacher = EMA(self.online, momentum=ema_momentum, schedule="cosine", final_momentum=ema_final_momentum)
        self.queue = (MemoryBank(queue_size, proj_dim, process_group=True if gather_distributed else None)
                      if version == "v2" and queue_size > 0 else None)
        self.criterion = InfoNCELoss(temperature, symmetric=False, gather_distributed=gather_distributed)

    def forward(self, views, step: int = 0, total_steps: int = 1):
        x = torch.cat(views[:2])
        q = self.online(x)
        z = q
        if self.predictor is not None:
            q = self.predictor(q)
        k = self.keys(x)
        q0, q1 = q.chunk(2)
        k0, k1 = k.chunk(2)
        if self.version == "v3":
            loss = (self.criterion(q0, k1) + self.criterion(q1, k0)) * (2 * self.temperature)
        elif self.queue is not None:
            negatives = self.queue(torch.cat([k1, k0]), update=True).to(q0.dtype)
            loss = 0.5 * (sf.info_nce(q0, k1, self.temperature, negatives=negatives)
                          + sf.info_nce(q1, k0, self.temperature, negatives=negatives))
        else:
            loss = 0.5 * (self.criterion(q0, k1) + self.criterion(q1, k0))
        return loss, {"std": std_of_normalized(z[: z.shape[0] // 2])}

    @torch.no_grad()
    def keys(self, x: torch.Tensor) -> torch.Tensor:
        """The key encoder's outputs of ``x`` (no gradient), with shuffle-BN when enabled."""
        teacher = self.teacher.teacher
        group = _world_group()
        if not self.shuffle_bn or (group is None and self.shuffle_bn_groups == 1):
            return teacher(x)  # one BatchNorm group: a permutation would change nothing
        xs, idx_unshuffle = batch_shuffle(x, group if group is not None else False)
        k = torch.cat([teacher(c) for c in xs.chunk(self.shuffle_bn_groups)])
        return batch_unshuffle(k, idx_unshuffle, group if group is not None else False)

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        if not self.ema_in_optimizer:
            self.teacher.update(step=step, total_steps=total_steps)
