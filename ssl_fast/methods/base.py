"""What the six methods share: the Method interface, MLP heads and the collapse log.

A method is an ``nn.Module`` holding the backbone, its heads, its loss module and any teacher/queue state
(as submodules and buffers, so that ``state_dict`` holds everything a resume needs). ``forward(views, step,
total_steps)`` returns ``(loss, logs)``; ``on_step_end(step, total_steps)`` runs after the optimizer step
(the momentum-teacher update). Methods call only ``ssl_fast.nn`` modules and ``ssl_fast.functional``.
"""

from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
from torch import nn

from ..diagnostics.metrics import normalized_std


def mlp(dims: Sequence[int], bn_last: bool = False, bn_last_affine: bool = True, bias_last: bool = True,
        bn: bool = True) -> nn.Sequential:
    """Linear -> BN -> ReLU blocks through ``dims``; the last Linear optionally followed by BN.

    Args:
        dims: layer widths including input and output, e.g. (2048, 2048, 128).
        bn: BatchNorm1d in the hidden layers (MoCo v2's head has none).
        bn_last: BatchNorm1d after the last Linear (SimSiam's projector, MoCo v3's heads).
        bn_last_affine: whether that last BN has affine parameters.
        bias_last: bias of the last Linear.
    """
    layers: List[nn.Module] = []
    for i in range(len(dims) - 2):
        if bn:
            layers += [nn.Linear(dims[i], dims[i + 1], bias=False), nn.BatchNorm1d(dims[i + 1])]
        else:
            layers += [nn.Linear(dims[i], dims[i + 1])]
        layers.append(nn.ReLU(inplace=True))
    layers.append(nn.Linear(dims[-2], dims[-1], bias=bias_last and not bn_last))
    if bn_last:
        layers.append(nn.BatchNorm1d(dims[-1], affine=bn_last_affine))
    return nn.Sequential(*layers)


class Tower(nn.Sequential):
    """backbone -> projector (the part a momentum teacher copies)."""

    def __init__(self, backbone: nn.Module, projector: nn.Module):
        super().__init__()
        self.backbone = backbone
        self.projector = projector

    def forward(self, x):
        return self.projector(self.backbone(x))


class Method(nn.Module):
    """Base class. Subclasses set ``name`` and implement ``forward``.

    Attributes:
        backbone: the encoder whose representation is evaluated and exported.
        n_global_views / n_local_views: how many views ``forward`` expects.
    """

    name = "method"
    n_global_views = 2
    n_local_views = 0
    needs_unused_parameters = False
    #: Methods whose loss couples the samples only through the embeddings of the views set this and implement
    #: ``embed`` / ``loss_from_embeddings`` (gradient caching: ``ssl_fast.gradcache``, ``--grad-cache-chunk``).
    supports_grad_cache = False

    def __init__(self, backbone: nn.Module, feature_dim: int):
        super().__init__()
        self.backbone = backbone
        self.feature_dim = feature_dim

    def forward(self, views: List[torch.Tensor], step: int = 0, total_steps: int = 1
                ) -> Tuple[torch.Tensor, Dict[str, torch.Tensor]]:  # pragma: no cover - abstract
        raise NotImplementedError

    def embed(self, x: torch.Tensor) -> torch.Tensor:
        """The embedding the loss sees of one batch of one view (B, C, H, W) -> (B, D); per-sample except for
        BatchNorm statistics. Only where ``supports_grad_cache``."""
        raise ValueError(f"--grad-cache-chunk is not supported by --method {self.name}")

    def loss_from_embeddings(self, z0: torch.Tensor, z1: torch.Tensor) -> torch.Tensor:
        """The loss of the two views' embeddings (``embed`` of each view). Only where ``supports_grad_cache``."""
        raise ValueError(f"--grad-cache-chunk is not supported by --method {self.name}")

    @torch.no_grad()
    def on_step_end(self, step: int, total_steps: int) -> None:
        """After each optimizer step (``step`` = steps done, 1-based). Default: nothing."""

    @property
    def encoder(self) -> nn.Module:
        return self.backbone


def std_of_normalized(z: torch.Tensor) -> torch.Tensor:
    """The methods' collapse log: the mean over dimensions of ``ssl_fast.diagnostics.normalized_std`` (the
    per-dimension std of the l2-normalized rows: about 1/sqrt(d) when healthy, 0 when collapsed), NaN for a
    single row."""
    if z.shape[0] < 2:
        return z.new_full((), float("nan"), dtype=torch.float64)
    return normalized_std(z.detach()).mean()
