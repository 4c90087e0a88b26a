"""A trained model from a checkpoint (``ssl-fast eval | linear-probe | diagnose``), and its collapse diagnostics.

:func:`restore` is the one path from a run directory or checkpoint of ``ssl-fast train`` back to the model: the
saved config (optionally on other data), the data source with the training run's load-size rule, and the whole
method rebuilt and loaded strictly (backbone, heads, teacher, queues: a checkpoint that does not match its own
config is an error, not a partly loaded model). :func:`diagnose_checkpoint` embeds the data with it and calls
``ssl_fast.diagnostics.diagnose.diagnose_embeddings``.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any, Dict, Optional, Tuple

import torch

from ..data import build_source
from ..diagnostics.diagnose import diagnose_embeddings
from ..methods import Method, build_backbone, build_method
from .checkpoint import latest_good_checkpoint, load_checkpoint
from .config import TrainConfig, make_config
from .evaluate import extract_features


@dataclass
class Restored:
    """What :func:`restore` rebuilt: the method (eval mode, on ``device``) with its config, data and state."""

    method: Method
    cfg: TrainConfig
    source: Any
    device: torch.device
    state: Dict[str, Any]
    path: str


def load_run(run_or_checkpoint: str) -> Tuple[Dict[str, Any], str]:
    """(state, path) of a checkpoint file, or of the newest good checkpoint of a run directory.

    Raises:
        FileNotFoundError: no such file, or a run directory without a readable checkpoint.
        CheckpointError: a checkpoint file that cannot be used.
    """
    if os.path.isdir(run_or_checkpoint):
        state = latest_good_checkpoint(run_or_checkpoint)
        if state is None:
            raise FileNotFoundError(f"no readable checkpoint (ckpt_*.pt) in run directory {run_or_checkpoint!r}")
        return state, state.get("_path", run_or_checkpoint)
    return load_checkpoint(run_or_checkpoint), run_or_checkpoint


def _device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def restore(run_or_checkpoint: str, *, data: Optional[str] = None, device: str = "auto") -> Restored:
    """Rebuild the trained method of a run directory (its newest good checkpoint) or checkpoint file.

    Args:
        run_or_checkpoint: a run directory or a ``ckpt_*.pt`` of ``ssl-fast train``.
        data: evaluate on this data instead of the checkpoint's (``--data`` of eval / linear-probe).
        device: ``auto`` (CUDA when available), ``cpu``, ``cuda[:N]``.

    Returns:
        :class:`Restored`; the method is in eval mode. Building it does not draw from the caller's RNG.

    Raises:
        FileNotFoundError, CheckpointError: see :func:`load_run`.
        ValueError: a saved config that no longer validates (e.g. a data folder that moved).
        RuntimeError: a state dict that does not fit the model its config describes.
    """
    state, path = load_run(run_or_checkpoint)
    saved = {k: v for k, v in dict(state.get("config", {})).items() if k != "resume"}
    if data:
        saved["data"] = data
    cfg = make_config(saved)
    dev = _device(device)
    load_size = cfg.load_size or max(cfg.image_size, round(cfg.image_size * 256 / 224))
    source = build_source(cfg.data, cfg.dataset, image_size=cfg.image_size, workers=cfg.workers, load_size=load_size)
    with torch.random.fork_rng(devices=[]):  # the random initialization is overwritten by the checkpoint
        backbone, dim = build_backbone(cfg.backbone, source.channels, cfg.small_stem, cfg.width)
        method = build_method(cfg, backbone, dim, max(source.steps_per_epoch(cfg.batch_size), 1))
    method.load_state_dict(state["model"])
    method.to(dev).eval()
    return Restored(method=method, cfg=cfg, source=source, device=dev, state=state, path=path)


@torch.no_grad()
def diagnose_checkpoint(run_or_checkpoint: str, out_dir: Optional[str] = None, *, device: str = "cpu",
                        max_samples: int = 4096, seed: int = 0) -> Tuple[str, Dict[str, Dict[str, float]]]:
    """Diagnose an ``ssl-fast train`` run directory (its newest good checkpoint) or checkpoint file.

    Rebuilds the method (:func:`restore`), embeds the held-out split (the representation, and the projector
    output where the method has a ``projector``), two augmented views of it (alignment; with the run's own
    augmentation pipeline) and the training split (kNN bank), then calls ``diagnose_embeddings``.

    Args:
        run_or_checkpoint: a run directory or a ``ckpt_*.pt`` file.
        out_dir: output folder (default ``<run dir>/diagnose``).
        device: where to run the encoder.
        max_samples: held-out images used at most.
        seed: seed of the augmented views.

    Returns:
        (report path, summaries).
    """
    from .trainer import build_pipeline

    run = restore(run_or_checkpoint, device=device)
    method, cfg, source, dev = run.method, run.cfg, run.source, run.device
    out_dir = out_dir or os.path.join(os.path.dirname(os.path.abspath(run.path)), "diagnose")
    towers = {"representation": method.encoder}
    projector = getattr(method, "projector", None)
    if isinstance(projector, torch.nn.Module):
        towers["projection"] = torch.nn.Sequential(method.encoder, projector).eval()
    emb, bank, views = {}, {}, {}
    test_y = train_y = None
    for name, tower in towers.items():
        te, test_y = extract_features(tower, source, "test", dev, cfg.image_size)
        tr, train_y = extract_features(tower, source, "train", dev, cfg.image_size)
        emb[name], bank[name] = te[:max_samples].cpu(), tr.cpu()
    test_y = test_y[:max_samples].cpu()
    try:  # two augmented views of the held-out images, with the run's own pipeline
        pipeline = build_pipeline(cfg, source, 0)
        xs = torch.cat([x for x, _ in source.eval_batches("test", 512)])[:max_samples].to(dev)
        g = torch.Generator().manual_seed(seed)
        v = pipeline(xs, g)
        for name, tower in towers.items():
            views[name] = (tower(v[0]).float().cpu(), tower(v[1]).float().cpu())
    except Exception as exc:  # noqa: BLE001 - alignment is optional; say why it is missing
        views = {}
        notes_views = f" (alignment not computed: {type(exc).__name__}: {str(exc)[:120]})"
    else:
        notes_views = ""
    notes = (f"Checkpoint `{os.path.basename(run.path)}`: method {cfg.method}, backbone {cfg.backbone}, step "
             f"{run.state.get('step')}; held-out split of {cfg.data} ({emb['representation'].shape[0]} images)"
             f"{notes_views}.")
    return diagnose_embeddings(emb, out_dir, title=f"Collapse diagnostics: {cfg.method}", views=views,
                               labels=(train_y.cpu(), test_y), train_embeddings=bank, notes=notes)


__all__ = ["Restored", "diagnose_checkpoint", "load_run", "restore"]
