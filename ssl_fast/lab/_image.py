"""The product pieces the lab's image experiments train: ``ssl_fast.data`` digits + batched views,
``ssl_fast.methods`` (the methods' heads, losses and teacher updates) on ``ssl_fast.methods.SmallCNN``, and
``ssl_fast.train``'s evaluation (kNN, linear probe).

Size: 16 x 16 digits (``ssl_fast.data.load_digits(size=16)``, the held-out 20%), views from
``ssl_fast.data.digits_view(16)`` (crop + rotation + brightness/contrast + blur), ``SmallCNN(width=8)`` (a
residual CNN with a 64-dim representation, 77 k parameters): about 40 ms per step of batch 256 on one CPU
thread. The loop is what ``ssl-fast train`` runs per step: ``loss, logs = method(views, step, total)``,
backward, optimizer step, ``method.on_step_end(step + 1, total)``.

The lab's variants that the methods do not offer (no stop-gradient, no predictor, other normalization
layers, fixed or diagonal projectors, softmax codes) are small subclasses or head swaps on these methods,
defined in each experiment.
"""

from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch
from torch import nn

from ssl_fast.data import Pipeline, digits_view, epoch_order, eval_view, load_digits
from ssl_fast.methods import SmallCNN
from ssl_fast.train import extract_features, knn_accuracy, linear_probe

SIZE, WIDTH = 16, 8
DIM = 8 * WIDTH  # the representation's dimension
DEVICE = torch.device("cpu")

_CACHE: dict = {}


def data(seed: int = 0):
    """The digits source at 16 x 16 (split seeded by ``seed``; cached)."""
    if seed not in _CACHE:
        _CACHE[seed] = load_digits(size=SIZE, seed=seed)
    return _CACHE[seed]


def views(n_views: int = 2) -> Pipeline:
    return Pipeline([digits_view(SIZE)] * n_views)


def backbone(bn: bool = True) -> SmallCNN:
    """``SmallCNN(1, 8)``; ``bn=False`` replaces its BatchNorm2d layers by identities."""
    net = SmallCNN(1, WIDTH)
    if not bn:
        replace_modules(net, nn.BatchNorm2d, lambda m: nn.Identity())
    return net


def replace_modules(root: nn.Module, kind, make) -> int:
    """Replace every submodule of type ``kind`` by ``make(old)``; returns how many were replaced."""
    n = 0
    for name, child in list(root.named_children()):
        if isinstance(child, kind):
            setattr(root, name, make(child))
            n += 1
        else:
            n += replace_modules(child, kind, make)
    return n


def train(method: nn.Module, source, *, steps: int, seed: int, batch: int = 256, lr: float = 1e-3,
          param_groups: Optional[List[dict]] = None, pipeline: Optional[Pipeline] = None) -> float:
    """Train ``method`` (an ``ssl_fast.methods.Method``) for ``steps`` steps with Adam; returns the last loss.

    Data order and views come from generators seeded with ``seed`` (the same for every variant)."""
    pipe = pipeline or views(method.n_global_views + method.n_local_views)
    g = torch.Generator().manual_seed(seed)
    groups = param_groups or [{"params": [p for p in method.parameters() if p.requires_grad]}]
    opt = torch.optim.Adam(groups, lr=lr)
    method.train()
    loss = torch.zeros(())
    step, epoch, n = 0, 0, len(source)
    while step < steps:
        order = epoch_order(n, seed, epoch)  # the order of ``source.train_batches(batch, seed, epoch)``
        for i in range(order.numel() // batch):
            if step >= steps:
                break
            idx = order[i * batch:(i + 1) * batch]
            if getattr(method, "wants_labels", False):  # the lab's supervised baseline
                method.labels = source.train_y[idx]
            loss, _ = method(pipe(source.train_x[idx], g), step, steps)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            method.on_step_end(step + 1, steps)
            step += 1
        epoch += 1
    return float(loss.detach().reshape(()))


def eval_images(x: torch.Tensor, source) -> torch.Tensor:
    """uint8 images -> the normalized float input of the encoders (no augmentation)."""
    return eval_view(x, None, source.mean, source.std)


@torch.no_grad()
def features(module: nn.Module, source, split: str = "test"):
    """(features, labels) of un-augmented images of ``split`` (eval mode)."""
    return extract_features(module, source, split, DEVICE)


def evaluate(encoder: nn.Module, source, *, sub: Optional[int] = None, probe: bool = True,
             seed: int = 0) -> Dict[str, float]:
    """kNN (k 20, T 0.07) and linear-probe accuracy of the representation (or of its first ``sub`` dims)."""
    (ftr, ytr), (fte, yte) = features(encoder, source, "train"), features(encoder, source, "test")
    if sub is not None:
        ftr, fte = ftr[:, :sub], fte[:, :sub]
    out = {"knn": knn_accuracy(ftr, ytr, fte, yte, source.num_classes)}
    if probe:
        out["probe"] = linear_probe(ftr, ytr, fte, yte, source.num_classes, seed=seed)[1]
    return out


def seeds(seed: int, quick: bool, full: int = 3, fast: int = 1) -> List[int]:
    return [seed + i for i in range(fast if quick else full)]


def stats(values: Sequence[float]) -> Dict[str, float]:
    """mean, std (n - 1; 0 for one value), min, max of ``values``."""
    v = [float(x) for x in values]
    n = len(v)
    mean = sum(v) / n
    std = math.sqrt(sum((x - mean) ** 2 for x in v) / (n - 1)) if n > 1 else 0.0
    return {"mean": mean, "std": std, "min": min(v), "max": max(v), "n": n}


def pm(values: Sequence[float], digits: int = 3) -> str:
    """'mean ± std (min..max)' of ``values`` (just the value for one)."""
    s = stats(values)
    fmt = f"{{:.{digits}g}}"
    if s["n"] == 1:
        return fmt.format(s["mean"])
    return (f"{fmt.format(s['mean'])} ± {fmt.format(s['std'])} "
            f"({fmt.format(s['min'])}..{fmt.format(s['max'])})")
