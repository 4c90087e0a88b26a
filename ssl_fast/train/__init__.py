"""Training: the shared loop (``Trainer``), its configuration, optimizers/schedules, checkpoints, evaluation, and
the way back from a checkpoint to the model (``restore``).

    from ssl_fast.train import Trainer, make_config
    summary = Trainer(make_config({"method": "byol", "data": "digits"})).fit()
"""

from .checkpoint import CheckpointError, latest_good_checkpoint, load_checkpoint, save_checkpoint
from .config import TrainConfig, make_config, validate
from .evaluate import extract_features, knn_accuracy, knn_eval, linear_probe
from .optim import LARS, WarmupCosine, build_optimizer, param_groups, scaled_lr
from .restore import Restored, diagnose_checkpoint, load_run, restore
from .trainer import Trainer, TrainingInterrupted, build_pipeline

__all__ = ["CheckpointError", "LARS", "Restored", "TrainConfig", "Trainer", "TrainingInterrupted", "WarmupCosine",
           "build_optimizer", "build_pipeline", "diagnose_checkpoint", "extract_features", "knn_accuracy", "knn_eval",
           "latest_good_checkpoint", "linear_probe", "load_checkpoint", "load_run", "make_config", "param_groups",
           "restore", "save_checkpoint", "scaled_lr", "validate"]
