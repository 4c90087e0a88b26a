"""A trainer callback that logs collapse diagnostics every k steps to CSV (and TensorBoard when installed)."""

from __future__ import annotations

import csv
import math
import os
from typing import Dict, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn

from . import metrics

Embeddings = Union[torch.Tensor, Mapping[str, torch.Tensor]]


class DiagnosticsCallback:
    """Collapse diagnostics for a training loop, computed only every ``every`` steps.

    The hook a trainer calls once per step::

        out = callback.on_step(step, embeddings=r, views=(z1, z2), model=model)
        # None on the steps in between (nothing computed, no host sync); on every k-th step a
        # dict {name: float} that was also appended to <out_dir>/diagnostics.csv

    Args:
        every: compute on steps with ``step % every == 0``.
        out_dir: folder for ``diagnostics.csv`` (and ``tensorboard/`` when ``tensorboard``); None: no files.
        tensorboard: also write TensorBoard scalars (needs the ``tensorboard`` package; otherwise one
            warning and CSV only). A ``writer`` with ``add_scalar(tag, value, step)`` may be passed instead.
        weight_names: substrings selecting the ``nn.Linear`` submodules of ``model`` whose weight spectra are
            logged (default: names containing ``projector`` or ``predictor``).
        max_samples: use at most this many rows of each embedding batch (the first ones).
        prefix: prepended to every logged name.

    Logged names (per embedding entry ``name``; ``views`` are logged as ``view``): ``{name}/effective_rank``,
    ``{name}/effective_rank_fraction``, ``{name}/top_eigenvalue``, ``{name}/uniformity``, ``{name}/std``,
    ``{name}/std_sqrt_d``, ``{name}/dead_fraction``, ``view/alignment``; per selected linear layer ``L``:
    ``{L}/weight_effective_rank``, ``{L}/weight_sv_max``, ``{L}/weight_sv_min``.
    """

    def __init__(self, every: int = 100, out_dir: Optional[str] = None, *, tensorboard: bool = False,
                 writer=None, weight_names: Sequence[str] = ("projector", "predictor"),
                 max_samples: int = 4096, prefix: str = ""):
        if int(every) < 1:
            raise ValueError(f"every must be >= 1, got {every}")
        if int(max_samples) < 2:
            raise ValueError(f"max_samples must be >= 2, got {max_samples}")
        self.every, self.out_dir, self.max_samples, self.prefix = int(every), out_dir, int(max_samples), prefix
        self.weight_names = tuple(weight_names)
        self.history: list = []
        self._csv_path = os.path.join(out_dir, "diagnostics.csv") if out_dir else None
        self._fields: Optional[list] = None
        self.writer = writer
        if tensorboard and writer is None:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(os.path.join(out_dir or ".", "tensorboard"))
            except ImportError:
                import warnings

                warnings.warn("tensorboard is not installed: diagnostics go to CSV only", stacklevel=2)

    def due(self, step: int) -> bool:
        """Whether ``on_step(step, ...)`` computes anything."""
        return step % self.every == 0

    @torch.no_grad()
    def compute(self, *, embeddings: Optional[Embeddings] = None,
                views: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                model: Optional[nn.Module] = None) -> Dict[str, torch.Tensor]:
        """The diagnostics as 0-dim float64 tensors on the inputs' device (no host sync)."""
        out: Dict[str, torch.Tensor] = {}
        m = self.max_samples
        if embeddings is not None:
            items = embeddings.items() if isinstance(embeddings, Mapping) else [("embedding", embeddings)]
            for name, z in items:
                z = z.detach().flatten(1)[:m]
                for k, v in metrics.collapse_stats(z).items():
                    out[f"{self.prefix}{name}/{k}"] = v
        if views is not None:
            if len(views) != 2:
                raise ValueError("views must be a pair (z1, z2)")
            z1, z2 = (v.detach().flatten(1)[:m] for v in views)
            for k, v in metrics.collapse_stats(z1, z2).items():
                out[f"{self.prefix}view/{k}"] = v
        if model is not None:
            for qname, mod in model.named_modules():
                if isinstance(mod, nn.Linear) and any(w in qname for w in self.weight_names):
                    s = metrics.weight_spectrum(mod.weight)
                    out[f"{self.prefix}{qname}/weight_effective_rank"] = metrics.effective_rank(s)
                    out[f"{self.prefix}{qname}/weight_sv_max"] = s[0]
                    out[f"{self.prefix}{qname}/weight_sv_min"] = s[-1]
        return out

    def on_step(self, step: int, *, embeddings: Optional[Embeddings] = None,
                views: Optional[Tuple[torch.Tensor, torch.Tensor]] = None,
                model: Optional[nn.Module] = None) -> Optional[Dict[str, float]]:
        """Compute and log the diagnostics on every ``every``-th step; None on the other steps.

        Args:
            step: the global step (an int).
            embeddings: a tensor (N, D) (or (N, ...), flattened), or a dict name -> tensor, e.g.
                ``{"representation": r, "projection": z}``.
            views: the two views' embeddings (z1, z2), each (N, D): adds the alignment of positive pairs.
            model: a module whose selected linear layers' weight spectra are logged.

        Returns:
            ``{name: float}`` (one host sync for the whole dict) on due steps, else None.
        """
        if not self.due(step):
            return None
        tensors = self.compute(embeddings=embeddings, views=views, model=model)
        if not tensors:
            return {}
        flat = torch.stack([t.to(torch.float64).reshape(()) for t in tensors.values()]).cpu().tolist()
        row = dict(zip(tensors.keys(), flat))
        self.log(step, row)
        return row

    def log(self, step: int, row: Mapping[str, float]) -> None:
        """Append ``row`` to the history, the CSV file and the TensorBoard writer."""
        self.history.append({"step": step, **row})
        if self._csv_path:
            os.makedirs(self.out_dir, exist_ok=True)
            new = self._fields is None
            if new:
                self._fields = ["step"] + list(row.keys())
            with open(self._csv_path, "a" if not new else "w", newline="") as fh:
                w = csv.DictWriter(fh, fieldnames=self._fields, extrasaction="ignore")
                if new:
                    w.writeheader()
                w.writerow({"step": step, **row})
        if self.writer is not None:
            for k, v in row.items():
                if not (isinstance(v, float) and math.isnan(v)):
                    self.writer.add_scalar(k, v, step)

    def close(self) -> None:
        if self.writer is not None and hasattr(self.writer, "close"):
            self.writer.close()


__all__ = ["DiagnosticsCallback"]
