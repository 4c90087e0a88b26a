"""Evaluation of a frozen encoder: weighted kNN (the training monitor) and a linear probe.

Features are the backbone's representation of un-augmented, normalized images, computed in eval mode.
Weighted kNN: ``ssl_fast.diagnostics.knn_accuracy`` of the held-out split against the training split.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from ..data.augment import eval_view
from ..diagnostics.knn import knn_accuracy


@torch.no_grad()
def extract_features(encoder: nn.Module, source, split: str, device, image_size: Optional[int] = None,
                     channels_last: bool = False, batch_size: int = 512) -> Tuple[torch.Tensor, torch.Tensor]:
    """(features (N, D) float32 on ``device``, labels (N,)) of ``split`` ("train" / "test")."""
    was_training = encoder.training
    encoder.eval()
    feats, labels = [], []
    try:
        for x, y in source.eval_batches(split, batch_size):
            x = eval_view(x.to(device, non_blocking=True), image_size, source.mean, source.std)
            if channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            feats.append(encoder(x).float())
            labels.append(y.to(device))
    finally:
        encoder.train(was_training)
    if not feats:
        return torch.empty(0, device=device), torch.empty(0, dtype=torch.long, device=device)
    return torch.cat(feats), torch.cat(labels)


def knn_eval(encoder: nn.Module, source, device, image_size=None, k: int = 20, t: float = 0.07,
             channels_last: bool = False) -> float:
    """kNN accuracy of ``encoder`` on ``source``'s held-out split (NaN when the source has none)."""
    tr = extract_features(encoder, source, "train", device, image_size, channels_last)
    te = extract_features(encoder, source, "test", device, image_size, channels_last)
    return knn_accuracy(*tr, *te, num_classes=source.num_classes, k=k, t=t)


def linear_probe(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: int, epochs: int = 100, lr: float = 0.1, weight_decay: float = 1e-4,
                 batch_size: int = 1024, seed: int = 0) -> Tuple[float, float]:
    """Logistic regression on frozen features (standardized with the training statistics), SGD + cosine.

    Returns:
        (train accuracy, test accuracy), fractions in [0, 1].
    """
    g = torch.Generator().manual_seed(seed)
    mean, std = train_f.mean(0), train_f.std(0).clamp_min(1e-6)
    xtr, xte = (train_f - mean) / std, (test_f - mean) / std
    head = nn.Linear(xtr.shape[1], num_classes).to(xtr.device)
    opt = torch.optim.SGD(head.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)
    steps_per_epoch = max(1, (xtr.shape[0] + batch_size - 1) // batch_size)
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, epochs * steps_per_epoch)
    for _ in range(epochs):
        perm = torch.randperm(xtr.shape[0], generator=g).to(xtr.device)
        for i in range(0, xtr.shape[0], batch_size):
            idx = perm[i:i + batch_size]
            loss = F.cross_entropy(head(xtr[idx]), train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    with torch.no_grad():
        acc_tr = (head(xtr).argmax(1) == train_y).float().mean().item()
        acc_te = (head(xte).argmax(1) == test_y).float().mean().item() if xte.numel() else float("nan")
    return acc_tr, acc_te


__all__ = ["extract_features", "knn_accuracy", "knn_eval", "linear_probe"]
