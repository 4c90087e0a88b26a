"""Self-supervised methods: heads + loss wiring + each paper's recipe (``IMAGENET``) and a CPU-sized recipe
for the embedded digits data (``DIGITS``). Methods call only the public ssl_fast losses and ops.

    from ssl_fast.methods import build_method, recipe
"""

from __future__ import annotations

from typing import Any, Dict

from . import byol, directclr, moco, simclr, simsiam, swav
from .backbones import BACKBONES, SmallCNN, build_backbone
from .base import Method, mlp
from .byol import BYOL
from .directclr import DirectCLR
from .moco import MoCo
from .simclr import SimCLR
from .simsiam import SimSiam
from .swav import SwAV

METHODS = ("simclr", "directclr", "moco", "byol", "simsiam", "swav")
CLASSES = {"simclr": SimCLR, "directclr": DirectCLR, "moco": MoCo, "byol": BYOL, "simsiam": SimSiam, "swav": SwAV}
_MODULES = {"simclr": simclr, "directclr": directclr, "moco": moco, "byol": byol, "simsiam": simsiam, "swav": swav}


def recipe(method: str, data: str = "digits") -> Dict[str, Any]:
    """The recipe (trainer config values) of ``method`` for ``data``: "digits" or "imagenet" (the paper's)."""
    if method not in _MODULES:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    mod = _MODULES[method]
    if method == "moco" and data == "imagenet_v3":
        return dict(mod.IMAGENET_V3)
    return dict(mod.DIGITS if data == "digits" else mod.IMAGENET)


def build_method(cfg, backbone, feature_dim: int, steps_per_epoch: int = 1, world_size: int = 1) -> Method:
    """The Method for a ``TrainConfig`` (see ``ssl_fast.train.TrainConfig`` for the fields)."""
    gather = bool(cfg.gather_distributed) and world_size > 1
    m = cfg.method
    if m == "simclr":
        return SimCLR(backbone, feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.temperature, gather)
    if m == "directclr":
        return DirectCLR(backbone, feature_dim, cfg.d0, cfg.temperature, cfg.directclr_variant, gather)
    if m == "moco":
        return MoCo(backbone, feature_dim, cfg.moco_version, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_hidden_dim,
                    cfg.temperature, cfg.queue_size, cfg.ema_momentum, cfg.ema_final_momentum, gather,
                    cfg.shuffle_bn, cfg.shuffle_bn_groups)
    if m == "byol":
        return BYOL(backbone, feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_hidden_dim, cfg.ema_momentum,
                    cfg.ema_final_momentum)
    if m == "simsiam":
        return SimSiam(backbone, feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.pred_hidden_dim)
    if m == "swav":
        return SwAV(backbone, feature_dim, cfg.proj_hidden_dim, cfg.proj_dim, cfg.n_prototypes, cfg.temperature,
                    cfg.sinkhorn_iterations, cfg.sinkhorn_epsilon,
                    int(cfg.freeze_prototypes_epochs * steps_per_epoch), cfg.n_local_crops, cfg.queue_size,
                    int(cfg.queue_start_epoch * steps_per_epoch), gather)
    raise ValueError(f"unknown method {m!r}; choose one of {', '.join(METHODS)}")


__all__ = ["BACKBONES", "BYOL", "CLASSES", "DirectCLR", "METHODS", "Method", "MoCo", "SimCLR", "SimSiam", "SmallCNN", "SwAV",
           "build_backbone", "build_method", "mlp", "recipe"]
