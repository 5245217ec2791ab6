"""Datamodules yielding batch dicts (``image``, ``label``, ``index`` and ``mask`` where known)."""

from xaudit.data.base import (
    Batch,
    TensorDictDataset,
    UnpaddedDistributedSampler,
    XAuditDataModule,
    eval_shard,
)
from xaudit.data.cifar10 import CIFAR10DataModule
from xaudit.data.cub import CUBDataModule
from xaudit.data.imagefolder import ImageFolderDataModule
from xaudit.data.pet import OxfordPetDataModule
from xaudit.data.shapes import SHAPES, ShapesDataModule, generate_shapes
from xaudit.data.shapes_multilabel import ShapesMultilabelDataModule, generate_multilabel_shapes
from xaudit.data.voc import VOCDataModule

__all__ = [
    "SHAPES",
    "Batch",
    "CIFAR10DataModule",
    "CUBDataModule",
    "ImageFolderDataModule",
    "OxfordPetDataModule",
    "ShapesDataModule",
    "ShapesMultilabelDataModule",
    "TensorDictDataset",
    "UnpaddedDistributedSampler",
    "VOCDataModule",
    "XAuditDataModule",
    "eval_shard",
    "generate_multilabel_shapes",
    "generate_shapes",
]
