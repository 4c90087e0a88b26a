"""Weighted kNN accuracy of embeddings against a labelled bank (Wu et al. 2018, as in DINO's monitor).

Cosine similarities of each query to the bank, the k nearest vote for their class with weight exp(s / T);
the accuracy is the fraction of queries whose vote is their label. The training monitor
(``ssl_fast.train.knn_eval``), ``ssl-fast eval`` and ``ssl-fast diagnose`` all use this one function.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F


@torch.no_grad()
def knn_accuracy(train_f: torch.Tensor, train_y: torch.Tensor, test_f: torch.Tensor, test_y: torch.Tensor,
                 num_classes: Optional[int] = None, k: int = 20, t: float = 0.07, chunk: int = 1024) -> float:
    """Weighted kNN top-1 accuracy of ``test_f`` against the bank ``train_f``.

    Computed in the dtype and on the device of the features (pass float64 features for a float64 result), the
    queries in chunks of ``chunk`` rows (one (chunk, N_train) similarity matrix at a time); one host sync.

    Args:
        train_f, train_y: the bank, (N_train, D) features and (N_train,) integer labels.
        test_f, test_y: the queries, (N_test, D) and (N_test,).
        num_classes: the number of classes (default: 1 + the largest label of either split).
        k: neighbours (at most N_train are used).
        t: temperature of the vote weights exp(similarity / t).
        chunk: queries per similarity matrix.

    Shape:
        train_f (N_train, D), train_y (N_train,), test_f (N_test, D), test_y (N_test,).

    Returns:
        A fraction in [0, 1]; NaN when either split is empty.

    Example:
        >>> acc = knn_accuracy(bank, bank_labels, queries, labels, k=20, t=0.07)
    """
    if test_f.numel() == 0 or train_f.numel() == 0:
        return float("nan")
    if num_classes is None:
        num_classes = int(max(train_y.max(), test_y.max())) + 1
    train_f = F.normalize(train_f, dim=1)
    test_f = F.normalize(test_f, dim=1)
    k = min(k, train_f.shape[0])
    correct = torch.zeros((), device=test_f.device)
    for i in range(0, test_f.shape[0], chunk):
        sim = test_f[i:i + chunk] @ train_f.T
        s, idx = sim.topk(k, dim=1)
        votes = torch.zeros(sim.shape[0], num_classes, dtype=sim.dtype, device=sim.device)
        votes.scatter_add_(1, train_y[idx], (s / t).exp())
        correct += (votes.argmax(1) == test_y[i:i + chunk]).sum()
    return float(correct) / test_f.shape[0]


__all__ = ["knn_accuracy"]
