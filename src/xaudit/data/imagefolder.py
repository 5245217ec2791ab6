"""Any image-classification folder tree through torchvision's ``ImageFolder``.

Layout: ``data_dir/train/<class>/*.png|jpg`` and ``data_dir/val/<class>/...``; ``data_dir/test``
is used when present, otherwise the val split doubles as test.
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch.utils.data import Dataset
from torchvision import transforms as T
from torchvision.datasets import ImageFolder

from xaudit.data.base import Batch, XAuditDataModule
from xaudit.utils.errors import ConfigError, DataNotFoundError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def _to_rgb(image):  # module level so the transform pickles (DDP spawn, workers)
    return image.convert("RGB")


class _DictImageFolder(Dataset):
    """Wraps an ImageFolder so items are batch dicts like every other xaudit dataset."""

    def __init__(self, folder: ImageFolder) -> None:
        self.folder = folder

    def __len__(self) -> int:
        return len(self.folder)

    def __getitem__(self, i: int) -> Batch:
        image, label = self.folder[i]
        return {"image": image, "label": torch.tensor(label), "index": torch.tensor(i)}


class ImageFolderDataModule(XAuditDataModule):
    """Folder-of-class-folders data, resized to ``image_size`` and normalised with ``mean``/``std``."""

    def __init__(self, data_dir: str, image_size: int = 224, grayscale: bool = False,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 augment: bool = True, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int | str = 0, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        self.data_dir = Path(str(data_dir)).expanduser()
        train_dir = self.data_dir / "train"
        if not train_dir.is_dir():
            raise DataNotFoundError(
                f"No image folder at data.data_dir={str(self.data_dir)!r}: expected "
                f"{train_dir}/<class_name>/<image files> and {self.data_dir / 'val'}/<class_name>/... . "
                "Point data.data_dir at such a tree (e.g. an extracted ImageNet-style dataset)."
            )
        self.class_names = sorted(p.name for p in train_dir.iterdir() if p.is_dir())
        if len(self.class_names) < 2:
            raise ConfigError(f"{train_dir} holds {len(self.class_names)} class folder(s); need ≥2.")
        self.num_classes = len(self.class_names)
        self.image_size = int(image_size)
        self.in_chans = 1 if grayscale else 3
        self.grayscale = bool(grayscale)
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            if self.in_chans == 1:
                mean, std = (sum(mean) / len(mean),), (sum(std) / len(std),)
            else:
                raise ConfigError(f"data.mean/std need {self.in_chans} values, got {list(mean)} / {list(std)}.")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment = bool(augment)

    def _transform(self, train: bool) -> T.Compose:
        steps: list = [T.Grayscale(1)] if self.grayscale else [T.Lambda(_to_rgb)]
        steps += [T.Resize(self.image_size), T.CenterCrop(self.image_size)]
        if train and self.augment:
            steps.append(T.RandomHorizontalFlip())
        steps += [T.ToTensor(), T.Normalize(self.mean, self.std)]
        return T.Compose(steps)

    def _folder(self, split: str, train: bool) -> _DictImageFolder:
        root = self.data_dir / split
        if not root.is_dir():
            raise DataNotFoundError(f"Missing split folder {root} (data.data_dir={str(self.data_dir)!r}).")
        folder = ImageFolder(str(root), transform=self._transform(train))
        if folder.classes != self.class_names:
            raise ConfigError(
                f"{root} has classes {folder.classes} but train has {self.class_names}; "
                "every split needs the same class folders."
            )
        return _DictImageFolder(folder)

    def plain_train_set(self) -> _DictImageFolder:
        """The train split with the evaluation transform (no random flip)."""
        return self._folder("train", train=False)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set = self._folder("train", train=True)
            self.val_set = self._folder("val", train=False)
        if stage in (None, "test", "predict") and self.test_set is None:
            test = "test" if (self.data_dir / "test").is_dir() else "val"
            self.test_set = self._folder(test, train=False)
