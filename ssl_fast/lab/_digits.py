"""Digits data, batched augmentations, small encoders and evaluation for the lab's image experiments.

The data is scikit-learn's digits set (1797 grayscale 8 x 8 images of 10 classes, shipped inside
scikit-learn: nothing is downloaded), upscaled to 16 x 16 and split 80/20 (seeded). Views are random affine
warps (rotation, scale, shift), pixel noise and a random erased patch, computed batched with
``affine_grid``/``grid_sample``. Encoders are small MLPs on the 256 pixels (the lab runs in seconds on one CPU
thread); the last block is residual so that DirectCLR's sub-vector loss reaches every dimension.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

SIZE = 16


@dataclass
class Digits:
    train_x: torch.Tensor  # (N, 1, 16, 16) float in [0, 1]
    train_y: torch.Tensor
    test_x: torch.Tensor
    test_y: torch.Tensor


_CACHE = {}


def load(seed: int = 0) -> Digits:
    """The digits split (cached per seed)."""
    if seed in _CACHE:
        return _CACHE[seed]
    from sklearn.datasets import load_digits  # the same copy ssl-fast train's default data set uses

    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    y = torch.tensor(d.target, dtype=torch.int64)
    x = F.interpolate(x, size=(SIZE, SIZE), mode="bilinear", align_corners=False).clamp(0, 1)
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(x.shape[0], generator=g)
    n_test = x.shape[0] // 5
    te, tr = perm[:n_test], perm[n_test:]
    out = Digits(x[tr], y[tr], x[te], y[te])
    _CACHE[seed] = out
    return out


def augment(x: torch.Tensor, g: torch.Generator, strength: float = 1.0) -> torch.Tensor:
    """A random view of each image (B, 1, 16, 16): affine warp, noise, erased patch. Returns (B, 256)."""
    b = x.shape[0]
    ang = (torch.rand(b, generator=g) * 2 - 1) * math.radians(25) * strength
    scale = 1 + (torch.rand(b, generator=g) * 2 - 1) * 0.2 * strength
    shift = (torch.rand(b, 2, generator=g) * 2 - 1) * 0.25 * strength
    cos, sin = torch.cos(ang) / scale, torch.sin(ang) / scale
    theta = torch.stack([torch.stack([cos, -sin, shift[:, 0]], 1), torch.stack([sin, cos, shift[:, 1]], 1)], 1)
    grid = F.affine_grid(theta, list(x.shape), align_corners=False)
    v = F.grid_sample(x, grid, align_corners=False, padding_mode="zeros")
    v = v + 0.1 * strength * torch.randn(v.shape, generator=g)
    # erase a random 6 x 6 patch in half of the views
    cy = torch.randint(0, SIZE - 6, (b,), generator=g)
    cx = torch.randint(0, SIZE - 6, (b,), generator=g)
    ar = torch.arange(SIZE)
    my = (ar[None] >= cy[:, None]) & (ar[None] < cy[:, None] + 6)
    mx = (ar[None] >= cx[:, None]) & (ar[None] < cx[:, None] + 6)
    on = (torch.rand(b, generator=g) < 0.5 * strength)[:, None, None]
    mask = (my[:, :, None] & mx[:, None, :] & on).unsqueeze(1)
    v = v.masked_fill(mask, 0.0)
    return v.flatten(1)


class Encoder(nn.Module):
    """MLP encoder 256 -> hidden -> dim, then a residual block (the representation r, dim ``dim``)."""

    def __init__(self, dim: int = 64, hidden: int = 256, bn: bool = True):
        super().__init__()
        norm = (lambda c: nn.BatchNorm1d(c)) if bn else (lambda c: nn.Identity())
        self.stem = nn.Sequential(nn.Linear(SIZE * SIZE, hidden), norm(hidden), nn.ReLU(),
                                  nn.Linear(hidden, dim))
        self.block = nn.Sequential(norm(dim), nn.ReLU(), nn.Linear(dim, dim))
        self.dim = dim

    def forward(self, x):
        h = self.stem(x.flatten(1))
        return h + self.block(h)


def mlp(dims, bn: bool = True, last_bn: bool = False) -> nn.Sequential:
    layers = []
    for i in range(len(dims) - 1):
        layers.append(nn.Linear(dims[i], dims[i + 1], bias=not (bn and i < len(dims) - 2)))
        if i < len(dims) - 2:
            if bn:
                layers.append(nn.BatchNorm1d(dims[i + 1]))
            layers.append(nn.ReLU())
        elif last_bn:
            layers.append(nn.BatchNorm1d(dims[i + 1], affine=False))
    return nn.Sequential(*layers)


@torch.no_grad()
def features(model: nn.Module, x: torch.Tensor, batch: int = 1024) -> torch.Tensor:
    was = model.training
    model.eval()
    out = torch.cat([model(x[i:i + batch]) for i in range(0, x.shape[0], batch)])
    model.train(was)
    return out


@torch.no_grad()
def knn_accuracy(train_f, train_y, test_f, test_y, k: int = 20, t: float = 0.1) -> float:
    """Weighted kNN (cosine similarity, weights exp(s / t)) accuracy on the test split."""
    a, b = F.normalize(train_f.double(), dim=1), F.normalize(test_f.double(), dim=1)
    sim = b @ a.T
    w, idx = sim.topk(k, dim=1)
    votes = torch.zeros(b.shape[0], int(train_y.max()) + 1, dtype=torch.float64)
    votes.scatter_add_(1, train_y[idx], (w / t).exp())
    return float((votes.argmax(1) == test_y).double().mean())


def linear_probe(train_f, train_y, test_f, test_y, steps: int = 300, seed: int = 0) -> float:
    """Logistic regression on standardized frozen features (full batch, L-BFGS); test accuracy."""
    mu, sd = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    a, b = ((train_f - mu) / sd).double(), ((test_f - mu) / sd).double()
    ncls = int(train_y.max()) + 1
    torch.manual_seed(seed)
    lin = nn.Linear(a.shape[1], ncls).double()
    opt = torch.optim.LBFGS(lin.parameters(), lr=1, max_iter=steps, history_size=20,
                            line_search_fn="strong_wolfe")

    def closure():
        opt.zero_grad()
        loss = F.cross_entropy(lin(a), train_y) + 1e-4 * lin.weight.square().sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    with torch.no_grad():
        return float((lin(b).argmax(1) == test_y).double().mean())


def batches(n: int, batch: int, g: torch.Generator):
    """Endless random mini-batch indices (drop last)."""
    while True:
        perm = torch.randperm(n, generator=g)
        for i in range(0, n - batch + 1, batch):
            yield perm[i:i + batch]


def evaluate(encoder: nn.Module, data: Digits, *, sub: Optional[int] = None, probe: bool = True) -> dict:
    """kNN and linear-probe accuracy of the representation (or of its first ``sub`` dimensions)."""
    tr, te = features(encoder, data.train_x), features(encoder, data.test_x)
    if sub is not None:
        tr, te = tr[:, :sub], te[:, :sub]
    out = {"knn": knn_accuracy(tr, data.train_y, te, data.test_y)}
    if probe:
        out["probe"] = linear_probe(tr, data.train_y, te, data.test_y)
    return out
