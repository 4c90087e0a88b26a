"""Data for the trainers: sources (embedded digits, CIFAR, ImageFolder) and batched on-device augmentations."""

from .augment import Pipeline, ViewSpec, augment, byol_views, digits_view, eval_view, multicrop, simclr_views
from .datasets import DATASETS, Source, build_source, epoch_order, load_cifar, load_digits

__all__ = ["DATASETS", "Pipeline", "Source", "ViewSpec", "augment", "build_source", "byol_views", "digits_view",
           "epoch_order", "eval_view", "load_cifar", "load_digits", "multicrop", "simclr_views"]
