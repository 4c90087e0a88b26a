"""Data for the trainers: sources (embedded digits, CIFAR, ImageFolder) and batched on-device augmentations."""

from .augment import Pipeline, ViewSpec, augment, byol_views, digits_view, eval_view, multicrop, simclr_views
from .datasets import (DATASETS, DECODERS, Source, build_source, decode_images, epoch_order, load_cifar, load_digits,
                       resize_center_crop)

__all__ = ["DATASETS", "DECODERS", "Pipeline", "Source", "ViewSpec", "augment", "build_source", "byol_views",
           "decode_images", "digits_view", "epoch_order", "eval_view", "load_cifar", "load_digits", "multicrop",
           "resize_center_crop", "simclr_views"]
