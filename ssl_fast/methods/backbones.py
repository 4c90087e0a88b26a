"""Backbones: torchvision ResNet-18/50 (optionally with a small-image stem) and a small CNN for 32 px data.

Every backbone maps images (B, C, H, W) to a representation (B, D) (the pooled features, no classifier);
``build_backbone`` returns it with D. The ResNets are torchvision's modules with ``fc = Identity``, so
their ``state_dict`` loads into ``torchvision.models.resnet50()`` with ``strict=False`` (only ``fc`` is
missing); the small-image stem (3x3 stride-1 conv, no max-pool, as in SimCLR's CIFAR setting) changes
``conv1``'s shape.
"""

from __future__ import annotations

from typing import Tuple

import torch
from torch import nn

BACKBONES = ("small_cnn", "resnet18", "resnet50")


class SmallCNN(nn.Module):
    """A four-stage residual CNN for 32 x 32 inputs (the embedded digits default): 0.3 M parameters at width 16.

    stem 3x3 stride-2 conv (width) -> BasicBlock stages of widths (w, 2w, 4w, 8w) with strides (1, 2, 2, 2) ->
    global average pool. The residual connections matter for DirectCLR (the rest of the representation
    learns through them).

    Args:
        in_channels: image channels (1 for digits).
        width: channels of the stem; the representation has 8 * width dimensions.

    Shape:
        - Input: (B, in_channels, H, W), H and W >= 8.
        - Output: (B, 8 * width).
    """

    def __init__(self, in_channels: int = 1, width: int = 16):
        super().__init__()
        from torchvision.models.resnet import BasicBlock

        def stage(cin, cout, stride):
            down = None
            if stride != 1 or cin != cout:
                down = nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=False), nn.BatchNorm2d(cout))
            return BasicBlock(cin, cout, stride, down)

        w = width
        self.stem = nn.Sequential(nn.Conv2d(in_channels, w, 3, 2, 1, bias=False), nn.BatchNorm2d(w),
                                  nn.ReLU(inplace=True))
        self.layers = nn.Sequential(stage(w, w, 1), stage(w, 2 * w, 2), stage(2 * w, 4 * w, 2),
                                    stage(4 * w, 8 * w, 2))
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.out_dim = 8 * w

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.pool(self.layers(self.stem(x))).flatten(1)


def build_backbone(name: str, in_channels: int = 3, small_stem: bool = False, width: int = 16
                   ) -> Tuple[nn.Module, int]:
    """Build a backbone by name.

    Args:
        name: one of ``BACKBONES``.
        in_channels: image channels.
        small_stem: ResNets only: 3x3 stride-1 first conv and no max-pool (for 32-96 px images).
        width: ``small_cnn`` only: stem width.

    Returns:
        (module, representation dimension D).
    """
    if name == "small_cnn":
        net = SmallCNN(in_channels, width)
        return net, net.out_dim
    if name in ("resnet18", "resnet50"):
        import torchvision

        net = getattr(torchvision.models, name)(weights=None)
        if small_stem:
            net.conv1 = nn.Conv2d(in_channels, 64, 3, 1, 1, bias=False)
            net.maxpool = nn.Identity()
        elif in_channels != 3:
            net.conv1 = nn.Conv2d(in_channels, 64, 7, 2, 3, bias=False)
        dim = net.fc.in_features
        net.fc = nn.Identity()
        return net, dim
    raise ValueError(f"backbone must be one of {BACKBONES}, got {name!r}")
