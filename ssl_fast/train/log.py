"""Per-run logs: ``metrics.csv`` (training), ``eval.csv`` (kNN monitor), TensorBoard under ``tensorboard/``
when the ``tensorboard`` package is installed (skipped silently otherwise), and peak-memory readings."""

from __future__ import annotations

import csv
import os
import resource
from typing import Dict, Optional

import torch

TRAIN_COLUMNS = ("step", "epoch", "loss", "lr", "images_per_s", "memory_mb", "elapsed_s", "std")
EVAL_COLUMNS = ("step", "epoch", "knn_acc", "elapsed_s")


def peak_memory_mb(device: torch.device) -> float:
    """Peak allocated accelerator memory (CUDA) or the process's peak RSS (CPU), in MiB."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


class RunLogger:
    """Appends rows to the run's CSV files (resumed runs continue them) and mirrors scalars to TensorBoard.

    Args:
        run_dir: the run directory.
        enabled: False on non-zero ranks (nothing is written).
        tensorboard: try to open a ``torch.utils.tensorboard.SummaryWriter``.
    """

    def __init__(self, run_dir: str, enabled: bool = True, tensorboard: bool = True):
        self.enabled = enabled
        self.writer = None
        if not enabled:
            return
        os.makedirs(run_dir, exist_ok=True)
        self.train_path = os.path.join(run_dir, "metrics.csv")
        self.eval_path = os.path.join(run_dir, "eval.csv")
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(run_dir, "tensorboard"))
            except ImportError:  # tensorboard not installed
                self.writer = None

    def _row(self, path, columns, values: Dict[str, float]) -> None:
        new = not os.path.exists(path)
        with open(path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(columns)
            w.writerow(["" if values.get(c) is None else values.get(c) for c in columns])

    def log_train(self, values: Dict[str, Optional[float]]) -> None:
        if not self.enabled:
            return
        self._row(self.train_path, TRAIN_COLUMNS, values)
        if self.writer is not None:
            for k in ("loss", "lr", "images_per_s", "memory_mb", "std"):
                if values.get(k) is not None:
                    self.writer.add_scalar(f"train/{k}", values[k], values["step"])

    def log_eval(self, values: Dict[str, Optional[float]]) -> None:
        if not self.enabled:
            return
        self._row(self.eval_path, EVAL_COLUMNS, values)
        if self.writer is not None and values.get("knn_acc") is not None:
            self.writer.add_scalar("eval/knn_acc", values["knn_acc"], values["step"])

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
