"""Datamodules yielding batch dicts (``image``, ``label``, ``index`` and ``mask`` where known)."""

from xaudit.data.base import Batch, TensorDictDataset, UnpaddedDistributedSampler, XAuditDataModule
from xaudit.data.cifar10 import CIFAR10DataModule
from xaudit.data.imagefolder import ImageFolderDataModule
from xaudit.data.shapes import SHAPES, ShapesDataModule, generate_shapes

__all__ = [
    "SHAPES",
    "Batch",
    "CIFAR10DataModule",
    "ImageFolderDataModule",
    "ShapesDataModule",
    "TensorDictDataset",
    "UnpaddedDistributedSampler",
    "XAuditDataModule",
    "generate_shapes",
]
