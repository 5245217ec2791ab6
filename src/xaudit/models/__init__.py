"""Backbones (torchvision + small CNN) and the Lightning classifier."""

from xaudit.models.backbones import (
    BACKBONES,
    SmallCNN,
    build_backbone,
    load_matching_weights,
    min_image_size,
)
from xaudit.models.classifier import Classifier, load_checkpoint, load_classifier

__all__ = [
    "BACKBONES",
    "Classifier",
    "SmallCNN",
    "build_backbone",
    "load_checkpoint",
    "load_classifier",
    "load_matching_weights",
    "min_image_size",
]
