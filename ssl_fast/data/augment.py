"""Batched augmentations as torch ops, with per-sample random parameters, on whatever device holds the batch.

One call augments a whole batch: the random parameters (crop boxes, flips, jitter factors, blur sigmas ...)
are drawn per sample from a CPU ``torch.Generator`` (so the same seed gives the same views on CPU and GPU,
and a resumed run redraws exactly the same views) and the pixel work runs on the batch's device:

- random resized crop (+ flip, + optional rotation): one affine matrix per sample -> ``F.affine_grid`` +
  ``F.grid_sample`` (bilinear). Area fraction s ~ U(scale), log aspect ~ U(log ratio) as torchvision's
  ``RandomResizedCrop``; a box wider or taller than the image is clamped to it (torchvision retries 10
  times, then center-crops) and the box center is uniform over the valid positions.
- color jitter (brightness, contrast, saturation, hue in this fixed order, applied with probability p);
  hue is a rotation of the chroma plane in YIQ space (a per-sample 3x3 matrix), an approximation of the
  HSV hue shift that stays one batched matmul.
- grayscale (probability p), Gaussian blur (probability p, sigma ~ U(sigma), separable depthwise conv with
  one kernel per sample), solarize (probability p, threshold 0.5), then per-channel normalization.

Images enter as uint8 (0-255) or float (0-1) tensors (B, C, H, W). Channels other than 3 skip the
saturation, hue and grayscale steps (they are colour operations).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace
from typing import List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F


@dataclass
class ViewSpec:
    """The augmentation of one view (all probabilities are per sample).

    Args:
        size: output side in pixels.
        scale: area fraction range of the random resized crop.
        ratio: aspect ratio range of the crop.
        hflip: probability of a horizontal flip.
        rotation: maximum rotation in degrees (uniform in [-rotation, rotation]); 0 = none.
        jitter: probability of color jitter; brightness / contrast / saturation / hue are its strengths.
        grayscale: probability of converting to grayscale.
        blur: probability of Gaussian blur with sigma ~ U(blur_sigma); kernel side ~ 10% of ``size`` (odd).
        solarize: probability of solarization.
    """

    size: int = 32
    scale: Tuple[float, float] = (0.2, 1.0)
    ratio: Tuple[float, float] = (3 / 4, 4 / 3)
    hflip: float = 0.5
    rotation: float = 0.0
    jitter: float = 0.8
    brightness: float = 0.4
    contrast: float = 0.4
    saturation: float = 0.2
    hue: float = 0.1
    grayscale: float = 0.2
    blur: float = 0.5
    blur_sigma: Tuple[float, float] = (0.1, 2.0)
    solarize: float = 0.0


@dataclass
class Pipeline:
    """Views of a method: ``global_views`` then ``local_views`` (multi-crop), plus the normalization.

    Args:
        global_views: one ViewSpec per high-resolution view (2 for every method here).
        local_views: ViewSpecs of the low-resolution crops (SwAV's multi-crop), may be empty.
        mean, std: per-channel normalization applied last.
    """

    global_views: List[ViewSpec]
    local_views: List[ViewSpec] = field(default_factory=list)
    mean: Sequence[float] = (0.5,)
    std: Sequence[float] = (0.5,)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> List[torch.Tensor]:
        """Augment a batch into ``len(global_views) + len(local_views)`` views (a list of (B, C, s, s))."""
        x = to_float(images)
        return [augment(x, spec, generator, self.mean, self.std) for spec in self.global_views + self.local_views]


def to_float(images: torch.Tensor) -> torch.Tensor:
    """uint8 (0-255) -> float32 (0-1); float inputs pass through as float32."""
    if images.dtype == torch.uint8:
        return images.float().div_(255.0)
    return images.float()


def normalize(x: torch.Tensor, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    """Per-channel (x - mean) / std; a single value broadcasts over all channels."""
    c = x.shape[1]
    m = torch.as_tensor(list(mean) * (c if len(mean) == 1 else 1), dtype=x.dtype, device=x.device)
    s = torch.as_tensor(list(std) * (c if len(std) == 1 else 1), dtype=x.dtype, device=x.device)
    return (x - m.view(1, c, 1, 1)) / s.view(1, c, 1, 1)


def _uniform(n: int, lo: float, hi: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) * (hi - lo) + lo


def _coin(n: int, p: float, g: torch.Generator) -> torch.Tensor:
    return torch.rand(n, generator=g) < p


def crop_matrices(n: int, spec: ViewSpec, g: torch.Generator) -> torch.Tensor:
    """Affine matrices (n, 2, 3) mapping output coordinates in [-1, 1] to input coordinates (see module doc)."""
    area = _uniform(n, spec.scale[0], spec.scale[1], g)
    log_r = _uniform(n, math.log(spec.ratio[0]), math.log(spec.ratio[1]), g)
    r = torch.exp(log_r)
    w = torch.sqrt(area * r).clamp(max=1.0)
    h = torch.sqrt(area / r).clamp(max=1.0)
    cx = (torch.rand(n, generator=g) * 2 - 1) * (1 - w)
    cy = (torch.rand(n, generator=g) * 2 - 1) * (1 - h)
    flip = torch.where(_coin(n, spec.hflip, g), -1.0, 1.0)
    angle = _uniform(n, -spec.rotation, spec.rotation, g) * (math.pi / 180.0) if spec.rotation else torch.zeros(n)
    cos, sin = torch.cos(angle), torch.sin(angle)
    theta = torch.stack([torch.stack([cos * w * flip, -sin * h, cx], 1),
                         torch.stack([sin * w * flip, cos * h, cy], 1)], 1)
    return theta


_RGB2YIQ = torch.tensor([[0.299, 0.587, 0.114], [0.596, -0.274, -0.322], [0.211, -0.523, 0.312]])


def _hue_matrices(shift: torch.Tensor) -> torch.Tensor:
    """(n, 3, 3) RGB -> RGB matrices rotating the YIQ chroma plane by 2*pi*shift."""
    a = shift * (2 * math.pi)
    cos, sin = torch.cos(a), torch.sin(a)
    rot = torch.zeros(shift.shape[0], 3, 3)
    rot[:, 0, 0] = 1
    rot[:, 1, 1], rot[:, 1, 2], rot[:, 2, 1], rot[:, 2, 2] = cos, -sin, sin, cos
    yiq2rgb = torch.linalg.inv(_RGB2YIQ)
    return yiq2rgb @ rot @ _RGB2YIQ


def _luma(x: torch.Tensor) -> torch.Tensor:
    if x.shape[1] != 3:
        return x.mean(1, keepdim=True)
    return (0.299 * x[:, 0:1] + 0.587 * x[:, 1:2] + 0.114 * x[:, 2:3])


def _col(v: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    return v.to(device=x.device, dtype=x.dtype, non_blocking=True).view(-1, 1, 1, 1)


def augment(x: torch.Tensor, spec: ViewSpec, g: torch.Generator, mean: Sequence[float] = (0.5,),
            std: Sequence[float] = (0.5,)) -> torch.Tensor:
    """One augmented view of a float batch ``x`` (B, C, H, W) in [0, 1]; returns (B, C, size, size), normalized.

    Args:
        x: images in [0, 1] (any float dtype; computed in float32).
        spec: the view's augmentation.
        g: CPU generator for the per-sample parameters.
        mean, std: normalization.
    """
    n, c = x.shape[:2]
    theta = crop_matrices(n, spec, g).to(device=x.device, dtype=x.dtype, non_blocking=True)
    grid = F.affine_grid(theta, [n, c, spec.size, spec.size], align_corners=False)
    x = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)

    # color jitter (identity factors for the samples that skip it)
    on = _coin(n, spec.jitter, g)
    one = torch.ones(n)
    b = torch.where(on, _uniform(n, 1 - spec.brightness, 1 + spec.brightness, g), one)
    k = torch.where(on, _uniform(n, 1 - spec.contrast, 1 + spec.contrast, g), one)
    s = torch.where(on, _uniform(n, 1 - spec.saturation, 1 + spec.saturation, g), one)
    h = torch.where(on, _uniform(n, -spec.hue, spec.hue, g), torch.zeros(n))
    if spec.jitter > 0:
        x = (x * _col(b, x)).clamp_(0, 1)
        m = _luma(x).mean((2, 3), keepdim=True)
        x = ((x - m) * _col(k, x) + m).clamp_(0, 1)
        if c == 3:
            gray = _luma(x)
            x = ((x - gray) * _col(s, x) + gray).clamp_(0, 1)
            mats = _hue_matrices(h).to(device=x.device, dtype=x.dtype, non_blocking=True)
            x = torch.einsum("bij,bjhw->bihw", mats, x).clamp_(0, 1)
    gray_on = _coin(n, spec.grayscale, g)
    if c == 3 and spec.grayscale > 0:
        x = torch.where(_col(gray_on, x) > 0, _luma(x).expand_as(x), x)

    blur_on = _coin(n, spec.blur, g)
    sigma = _uniform(n, spec.blur_sigma[0], spec.blur_sigma[1], g)
    if spec.blur > 0:
        x = gaussian_blur(x, sigma, blur_on, ksize=max(3, int(0.1 * spec.size) | 1))
    sol_on = _coin(n, spec.solarize, g)
    if spec.solarize > 0:
        x = torch.where((_col(sol_on, x) > 0) & (x >= 0.5), 1 - x, x)
    return normalize(x, mean, std)


def gaussian_blur(x: torch.Tensor, sigma: torch.Tensor, apply: torch.Tensor, ksize: int) -> torch.Tensor:
    """Separable Gaussian blur with one sigma per sample; samples with ``apply`` False get a delta kernel."""
    n, c, hgt, wid = x.shape
    r = ksize // 2
    d = torch.arange(-r, r + 1, dtype=torch.float32)
    ker = torch.exp(-(d[None] ** 2) / (2 * sigma[:, None] ** 2))
    ker = ker / ker.sum(1, keepdim=True)
    delta = (d == 0).float().expand_as(ker)
    ker = torch.where(apply[:, None], ker, delta)
    ker = ker.to(device=x.device, dtype=x.dtype, non_blocking=True).repeat_interleave(c, 0)  # (n*c, k)
    y = x.reshape(1, n * c, hgt, wid)
    pad_mode = "reflect" if min(hgt, wid) > r else "replicate"
    y = F.conv2d(F.pad(y, (r, r, 0, 0), mode=pad_mode), ker.view(n * c, 1, 1, ksize), groups=n * c)
    y = F.conv2d(F.pad(y, (0, 0, r, r), mode=pad_mode), ker.view(n * c, 1, ksize, 1), groups=n * c)
    return y.view(n, c, hgt, wid)


def simclr_views(size: int, strength: float = 1.0, blur: float = 0.5, hflip: float = 0.5,
                 scale=(0.08, 1.0), rotation: float = 0.0) -> ViewSpec:
    """SimCLR's ImageNet view (color distortion of the given strength)."""
    return ViewSpec(size=size, scale=tuple(scale), hflip=hflip, rotation=rotation, jitter=0.8,
                    brightness=0.8 * strength, contrast=0.8 * strength, saturation=0.8 * strength,
                    hue=0.2 * strength, grayscale=0.2, blur=blur)


def byol_views(size: int, scale=(0.08, 1.0)) -> List[ViewSpec]:
    """BYOL's asymmetric pair (blur 1.0 / 0.1, solarize 0 / 0.2); also MoCo v3's."""
    base = ViewSpec(size=size, scale=tuple(scale), jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.2,
                    hue=0.1, grayscale=0.2)
    return [replace(base, blur=1.0, solarize=0.0), replace(base, blur=0.1, solarize=0.2)]


def digits_view(size: int = 32, scale=(0.3, 1.0), rotation: float = 15.0) -> ViewSpec:
    """Augmentation for the embedded digits (grayscale, orientation matters): crop + small rotation +
    brightness/contrast + blur, no flip."""
    return ViewSpec(size=size, scale=tuple(scale), ratio=(0.75, 1.333), hflip=0.0, rotation=rotation,
                    jitter=0.8, brightness=0.4, contrast=0.4, saturation=0.0, hue=0.0, grayscale=0.0,
                    blur=0.3, blur_sigma=(0.1, 1.0))


def multicrop(global_view: ViewSpec, n_local: int, local_size: int, global_scale=(0.14, 1.0),
              local_scale=(0.05, 0.14)) -> Tuple[List[ViewSpec], List[ViewSpec]]:
    """SwAV's multi-crop: 2 global views with ``global_scale`` and ``n_local`` small ones with ``local_scale``."""
    g = replace(global_view, scale=tuple(global_scale))
    loc = replace(global_view, size=local_size, scale=tuple(local_scale))
    return [g, g], [loc] * n_local


def eval_view(x: torch.Tensor, size: Optional[int], mean, std) -> torch.Tensor:
    """Evaluation transform of a batch: to float, resize to ``size`` (if given and different), normalize."""
    x = to_float(x)
    if size is not None and x.shape[-1] != size:
        x = F.interpolate(x, size=(size, size), mode="bilinear", antialias=True, align_corners=False)
    return normalize(x, mean, std)
