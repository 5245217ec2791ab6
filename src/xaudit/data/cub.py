"""CUB-200-2011 (200 bird species) with the bird's bounding box as the mask (official layout).

Layout: ``data_dir/CUB_200_2011/`` (or ``data_dir`` itself) with ``images.txt`` (``<id> <path>``),
``image_class_labels.txt`` (``<id> <class 1..200>``), ``train_test_split.txt`` (``<id> <1 train |
0 test>``), ``bounding_boxes.txt`` (``<id> <x> <y> <w> <h>``), ``classes.txt`` and
``images/<path>``. Nothing is downloaded. The official train split is cut into train and a seeded
``val_size`` holdout; test is the official test split.
"""

from __future__ import annotations

from pathlib import Path

from xaudit.data.masked import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileDataModule,
    MaskBoxes,
    MaskedImageDataset,
    holdout,
    missing_listing,
)
from xaudit.utils.errors import ConfigError, DataNotFoundError

CUB_FILES = ("images.txt", "image_class_labels.txt", "train_test_split.txt", "bounding_boxes.txt")


def _table(path: Path) -> dict[int, list[str]]:
    """``<id> <fields...>`` lines as {id: fields}."""
    out = {}
    for n, line in enumerate(path.read_text().splitlines(), 1):
        if line.strip():
            parts = line.split()
            try:
                out[int(parts[0])] = parts[1:]
            except ValueError:
                raise ConfigError(f"{path}:{n}: expected '<image id> ...', got {line!r}.") from None
    return out


class CUBDataModule(FileDataModule):
    """CUB-200-2011 species with box masks (``has_masks``).

    Args:
        data_dir: the folder holding ``CUB_200_2011/`` (as the archive extracts; no download).
        val_size: seeded holdout of the official train split (a fraction or a count).
        image_size: side of the square network input (shorter side resized, centre crop).
        mean: per-channel normalisation mean (ImageNet's by default).
        std: per-channel normalisation standard deviation.
        augment: random horizontal flip of the training images.
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`).
        seed: seeds the generated data or the validation holdout, and the DDP training sampler.
    """

    has_masks = True

    def __init__(self, data_dir: str, val_size: float = 0.1, image_size: int = 224,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 augment: bool = True, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int | str = 0, seed: int = 0) -> None:
        super().__init__(image_size=image_size, mean=mean, std=std, augment=augment, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.data_dir, self.val_size = Path(str(data_dir)).expanduser(), val_size
        root = self.data_dir / "CUB_200_2011"
        self.root = root if root.is_dir() else self.data_dir
        absent = [f for f in CUB_FILES if not (self.root / f).is_file()]
        if absent or not (self.root / "images").is_dir():
            raise DataNotFoundError(
                f"No CUB-200-2011 at data.data_dir={str(self.data_dir)!r} (missing {', '.join(absent) or 'images/'} "
                f"in {self.root}): expected {root}/{{{', '.join(CUB_FILES)}, classes.txt, images/<class>/<file>.jpg}}, "
                "as CUB_200_2011.tgz extracts; set data.data_dir to the folder holding CUB_200_2011.")
        tables = {f: _table(self.root / f) for f in CUB_FILES}
        images = tables["images.txt"]
        for f in CUB_FILES[1:]:
            lost = sorted(set(images) - set(tables[f]))
            if lost:
                raise ConfigError(f"{self.root / f} has no line for image id(s) {missing_listing(lost)}.")
        ids = sorted(images)
        self._labels = {i: int(tables["image_class_labels.txt"][i][0]) - 1 for i in ids}
        self._boxes = {i: tuple(float(v) for v in tables["bounding_boxes.txt"][i][:4]) for i in ids}
        self._is_train = {i: tables["train_test_split.txt"][i][0] == "1" for i in ids}
        self._paths = {i: str(self.root / "images" / images[i][0]) for i in ids}
        self.num_classes = max(self._labels.values()) + 1
        names = _table(self.root / "classes.txt") if (self.root / "classes.txt").is_file() else {}
        self.class_names = [names.get(c + 1, [str(c + 1)])[0] for c in range(self.num_classes)]

    def split_names(self) -> dict[str, str]:
        return {"train": "train", "val": "train", "test": "test"}

    def dataset(self, split: str, train: bool) -> MaskedImageDataset:
        ids = [i for i in sorted(self._paths) if self._is_train[i] == (split != "test")]
        if not ids:
            raise ConfigError(f"{self.root / 'train_test_split.txt'} puts no image in the {split} split.")
        if split != "test":
            train_idx, val_idx = holdout(len(ids), self.val_size, self.seed)
            ids = [ids[k] for k in (train_idx if split == "train" else val_idx)]
        missing = [self._paths[i] for i in ids if not Path(self._paths[i]).is_file()]
        if missing:
            raise DataNotFoundError(f"{len(missing)} image(s) listed in {self.root / 'images.txt'} are missing: "
                                    f"{missing_listing(missing)}.")
        masks = []
        for i in ids:
            x, y, w, h = self._boxes[i]
            masks.append(MaskBoxes([(x, y, x + w, y + h)], None, str(self.root / "bounding_boxes.txt")))
        return MaskedImageDataset([(self._paths[i], self._labels[i]) for i in ids], self.transform(train),
                                  self.root, masks, self.class_names)
