"""CIFAR-10 through torchvision's real loader (python batches on disk)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from torchvision.datasets import CIFAR10

from xaudit.data.base import TensorDictDataset, XAuditDataModule
from xaudit.utils.errors import ConfigError, DataNotFoundError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


class _CIFAR10(CIFAR10):
    """torchvision's CIFAR10 that checks the batch files exist instead of hashing 170 MB each start."""

    def _check_integrity(self) -> bool:
        base = Path(self.root) / self.base_folder
        return all((base / name).is_file() for name, _ in self.train_list + self.test_list)

    def _load_meta(self) -> None:
        # the class names are fixed; no need to hash or unpickle batches.meta
        if not (Path(self.root) / self.base_folder / self.meta["filename"]).is_file():
            raise RuntimeError("batches.meta missing")
        self.classes = list(CIFAR10_CLASSES)
        self.class_to_idx = {c: i for i, c in enumerate(self.classes)}


class CIFAR10DataModule(XAuditDataModule):
    """CIFAR-10 (32 px, 10 classes). ``val_size`` images are held out of the train batches.

    ``data_dir`` must contain ``cifar-10-batches-py/`` (or set ``download=true`` where there is
    network). Train images get the standard crop+flip augmentation.
    """

    def __init__(self, data_dir: str = "data", download: bool = False, val_size: int = 5000,
                 augment: bool = True, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int = 0, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.val_size = int(val_size)
        self.augment = bool(augment)
        self.num_classes, self.image_size, self.in_chans = 10, 32, 3
        self.mean, self.std = CIFAR10_MEAN, CIFAR10_STD
        self.class_names = list(CIFAR10_CLASSES)

    def _load(self, train: bool) -> CIFAR10:
        root = Path(self.data_dir).expanduser()
        try:
            return _CIFAR10(str(root), train=train, download=self.download)
        except RuntimeError as err:
            raise DataNotFoundError(
                f"CIFAR-10 not found under data.data_dir={str(root)!r} (expected "
                f"{root / 'cifar-10-batches-py'}/data_batch_1..5 and test_batch). Set data.download=true "
                "on a machine with internet, or download cifar-10-python.tar.gz from "
                "https://www.cs.toronto.edu/~kriz/cifar.html and extract it into that folder."
            ) from err

    @staticmethod
    def _tensors(ds: CIFAR10) -> tuple[torch.Tensor, torch.Tensor]:
        images = torch.from_numpy(np.ascontiguousarray(ds.data)).permute(0, 3, 1, 2).contiguous()
        return images, torch.tensor(ds.targets, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._tensors(self._load(train=True))
            if not 0 <= self.val_size < len(labels):
                raise ConfigError(f"data.val_size={self.val_size} must be in [0, {len(labels) - 1}].")
            perm = torch.randperm(len(labels), generator=torch.Generator().manual_seed(self.seed))
            val_idx, train_idx = perm[: self.val_size], perm[self.val_size :]
            self.train_set = TensorDictDataset(images[train_idx], labels[train_idx], self.mean, self.std,
                                               augment=self.augment)
            # an empty val split falls back to the test images so validation still runs
            if self.val_size > 0:
                self.val_set = TensorDictDataset(images[val_idx], labels[val_idx], self.mean, self.std)
            else:
                self.val_set = TensorDictDataset(*self._tensors(self._load(train=False)), self.mean, self.std)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = TensorDictDataset(*self._tensors(self._load(train=False)), self.mean, self.std)
