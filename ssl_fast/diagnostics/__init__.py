"""Collapse diagnostics: spectra, effective rank, alignment / uniformity, normalized-output std, plots, reports.

    from ssl_fast import diagnostics as dg
    s = dg.covariance_spectrum(z)              # (D,) float64, descending
    dg.effective_rank(s)                       # Roy & Vetterli, in [1, D]
    dg.alignment(z1, z2), dg.uniformity(z1)    # Wang & Isola (alpha = 2, t = 2), on the unit sphere
    dg.normalized_std(z)                       # SimSiam's indicator, ~1/sqrt(D) healthy, 0 collapsed
    dg.knn_accuracy(bank, bank_y, z, y)        # weighted kNN (the training monitor's)
    cb = dg.DiagnosticsCallback(every=50, out_dir="runs/x")
    cb.on_step(step, embeddings=r, views=(z1, z2), model=model)   # dict of floats every 50 steps, else None

Every metric returns tensors (no host sync; ``knn_accuracy`` returns a float, one sync); see
:mod:`ssl_fast.diagnostics.metrics` for the definitions. Everything here is a function of embeddings and weights: rebuilding a model from a checkpoint (``ssl-fast
diagnose RUN``) is ``ssl_fast.train.restore``'s.
"""

from .callback import DiagnosticsCallback
from .knn import knn_accuracy
from .metrics import (
    alignment,
    collapse_stats,
    correlation_matrix,
    covariance_spectrum,
    dead_fraction,
    effective_rank,
    embedding_effective_rank,
    normalized_std,
    predictor_alignment,
    uniformity,
    weight_spectrum,
)
from .report import MarkdownReport

__all__ = [
    "DiagnosticsCallback",
    "MarkdownReport",
    "alignment",
    "collapse_stats",
    "correlation_matrix",
    "covariance_spectrum",
    "dead_fraction",
    "effective_rank",
    "embedding_effective_rank",
    "knn_accuracy",
    "normalized_std",
    "predictor_alignment",
    "uniformity",
    "weight_spectrum",
]
