"""CIFAR-10 from its python batches on disk (torchvision's file list and downloader, a safe reader)."""

from __future__ import annotations

import pickle
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torchvision.datasets import CIFAR10
from torchvision.datasets.utils import download_and_extract_archive

from xaudit.data.base import TensorDictDataset, XAuditDataModule
from xaudit.utils.errors import ConfigError, DataNotFoundError

CIFAR10_MEAN = (0.4914, 0.4822, 0.4465)
CIFAR10_STD = (0.2470, 0.2435, 0.2616)
CIFAR10_CLASSES = ["airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck"]


# the only globals a genuine CIFAR-10 batch pickle refers to
_BATCH_GLOBALS = frozenset({("numpy", "ndarray"), ("numpy", "dtype"), ("_codecs", "encode"),
                            ("numpy.core.multiarray", "_reconstruct"), ("numpy._core.multiarray", "_reconstruct"),
                            ("numpy.core.multiarray", "scalar"), ("numpy._core.multiarray", "scalar")})


class _ForbiddenGlobal(pickle.UnpicklingError):
    pass


class _ArraysOnly(pickle.Unpickler):
    """An unpickler that builds numpy arrays, lists, dicts and bytes and refuses every other global.

    CIFAR-10's python batches are pickles; a plain ``pickle.load`` of a file from disk can run
    arbitrary code, so only the globals a genuine batch needs are allowed."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in _BATCH_GLOBALS:
            raise _ForbiddenGlobal(f"global {module}.{name} is not allowed")
        if module.startswith("numpy.core.") and hasattr(np, "_core"):  # numpy 2 moved numpy.core
            module = "numpy._core." + module.split(".", 2)[2]
        return super().find_class(module, name)


def read_cifar_batch(path: str | Path) -> dict[str, Any]:
    """One CIFAR-10 python batch file → ``{"data": uint8 [N,3072], "labels": [N]}``, read with an
    allow-list unpickler (a file holding anything but arrays and lists is refused, not run)."""
    path = Path(path)
    try:
        with open(path, "rb") as f:
            entry = _ArraysOnly(f, encoding="latin1").load()
    except _ForbiddenGlobal as err:
        raise ValueError(f"Refusing to read {path}: it is not a plain CIFAR-10 batch ({err}). Re-download "
                         "cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html.") from err
    except (EOFError, ValueError, pickle.UnpicklingError) as err:
        raise ValueError(f"{path} is truncated or not a CIFAR-10 batch ({err}); re-download it.") from err
    labels = entry.get("labels", entry.get("fine_labels")) if isinstance(entry, dict) else None
    if labels is None or "data" not in entry:
        raise ValueError(f"{path} is not a CIFAR-10 batch (no 'data'/'labels' entries); re-download it.")
    return {"data": np.asarray(entry["data"], dtype=np.uint8), "labels": list(labels)}


class CIFAR10DataModule(XAuditDataModule):
    """CIFAR-10 (32 px, 10 classes). ``val_size`` images are held out of the train batches.

    ``data_dir`` must contain ``cifar-10-batches-py/`` (or set ``download=true`` where there is
    network). Train images get the standard crop+flip augmentation.

    Args:
        data_dir: folder holding ``cifar-10-batches-py/``.
        download: fetch the archive (md5-checked) when the batches are missing.
        val_size: training images held out as the validation split.
        augment: random crop (pad 4) and horizontal flip of the training images.
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`).
        seed: seeds the generated data or the validation holdout, and the DDP training sampler.
    """

    mean_is_train_mean = True  # CIFAR10_MEAN is the published mean of the 50 000 train images

    def __init__(self, data_dir: str = "data", download: bool = False, val_size: int = 5000,
                 augment: bool = True, batch_size: int = 128, eval_batch_size: int | None = None,
                 num_workers: int | str = 0, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        self.data_dir = str(data_dir)
        self.download = bool(download)
        self.val_size = int(val_size)
        self.augment = bool(augment)
        self.num_classes, self.image_size, self.in_chans = 10, 32, 3
        self.mean, self.std = CIFAR10_MEAN, CIFAR10_STD
        self.class_names = list(CIFAR10_CLASSES)

    def _load(self, train: bool) -> tuple[torch.Tensor, torch.Tensor]:
        """uint8 images [N,3,32,32] and labels [N] of the train (5 batches) or test split."""
        root = Path(self.data_dir).expanduser()
        base = root / CIFAR10.base_folder
        files = [base / name for name, _ in (CIFAR10.train_list if train else CIFAR10.test_list)]
        if self.download and not all(f.is_file() for f in files):
            # torchvision's downloader (md5-checked archive); the batches are then read below
            download_and_extract_archive(CIFAR10.url, str(root), filename=CIFAR10.filename, md5=CIFAR10.tgz_md5)
        missing = [f.name for f in files if not f.is_file()]
        if missing:
            raise DataNotFoundError(
                f"CIFAR-10 not found under data.data_dir={str(root)!r} (expected {base}/data_batch_1..5 and "
                f"test_batch; missing {', '.join(missing)}). Set data.download=true on a machine with internet, "
                "or download cifar-10-python.tar.gz from https://www.cs.toronto.edu/~kriz/cifar.html and extract "
                "it into that folder.")
        batches = [read_cifar_batch(f) for f in files]
        data = np.concatenate([b["data"] for b in batches]).reshape(-1, 3, 32, 32)
        labels = [label for b in batches for label in b["labels"]]
        return torch.from_numpy(np.ascontiguousarray(data)), torch.tensor(labels, dtype=torch.long)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            images, labels = self._load(train=True)
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
                self.val_set = TensorDictDataset(*self._load(train=False), self.mean, self.std)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = TensorDictDataset(*self._load(train=False), self.mean, self.std)
