"""Any image-classification folder tree, optionally with object masks or boxes.

Layout: ``data_dir/train/<class>/*.png|jpg`` and ``data_dir/val/<class>/...``; ``data_dir/test``
is used when present, otherwise the val split doubles as test. Ground truth for the localisation
metrics (pointing game, mass in mask, mask IoU), one of:

- ``masks_dir``: ``<masks_dir>/<split>/<class>/<image stem>.png`` per image, the image's size;
  nonzero pixels are the object (binary masks; in instance masks any instance).
- ``boxes``: COCO-style JSON per split (``images`` with ``id``/``file_name`` [/``width``/``height``],
  ``annotations`` with ``image_id``/``bbox`` = [x, y, w, h]); ``file_name`` is relative to the split
  folder (``cat/0.png``); the boxes of an image are filled as its mask. The path holds ``{split}``
  (``boxes_{split}.json``) or is a folder of ``<split>.json``. An image listed without boxes has an
  empty mask.

Relative ``masks_dir``/``boxes`` paths are read under ``data_dir``.
"""

from __future__ import annotations

import json
from pathlib import Path

from torchvision.datasets.folder import IMG_EXTENSIONS, make_dataset

from xaudit.data.masked import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileDataModule,
    MaskBoxes,
    MaskedImageDataset,
    MaskImage,
    MaskSource,
    missing_listing,
    rel,
)
from xaudit.utils.errors import ConfigError, DataNotFoundError

__all__ = ["IMAGENET_MEAN", "IMAGENET_STD", "ImageFolderDataModule"]


class ImageFolderDataModule(FileDataModule):
    """Folder-of-class-folders data, resized to ``image_size`` and normalised with ``mean``/``std``;
    ``masks_dir`` or ``boxes`` add the ``mask`` of each image (``has_masks``).

    Args:
        data_dir: the tree ``{train,val[,test]}/<class>/<images>``.
        image_size: side of the square network input (shorter side resized, centre crop).
        grayscale: read the images as one channel (``mean``/``std`` averaged to one value).
        mean: per-channel normalisation mean (ImageNet's by default).
        std: per-channel normalisation standard deviation.
        augment: random horizontal flip of the training images.
        masks_dir: mask images ``<dir>/{split}/<class>/<image stem>.png`` (nonzero = object; relative
            paths are under ``data_dir``).
        boxes: COCO-style box annotations per split (e.g. ``boxes_{split}.json``); at most one of
            ``masks_dir`` and ``boxes``.
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`).
        seed: seeds the generated data or the validation holdout, and the DDP training sampler.
    """

    def __init__(self, data_dir: str, image_size: int = 224, grayscale: bool = False,
                 mean: tuple[float, ...] = IMAGENET_MEAN, std: tuple[float, ...] = IMAGENET_STD,
                 augment: bool = True, masks_dir: str | None = None, boxes: str | None = None,
                 batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int | str = 0, seed: int = 0) -> None:
        super().__init__(image_size=image_size, grayscale=grayscale, mean=mean, std=std, augment=augment,
                         batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers,
                         seed=seed)
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
        if masks_dir and boxes:
            raise ConfigError("Set one of data.masks_dir and data.boxes (masks from files, or from boxes), not both.")
        self.masks_dir = self._under_data(masks_dir, "data.masks_dir") if masks_dir else None
        self.boxes = str(boxes) if boxes else None
        self.has_masks = bool(masks_dir or boxes)

    def _under_data(self, value: str, key: str) -> Path:
        path = Path(str(value)).expanduser()
        path = path if path.is_absolute() else self.data_dir / path
        if not path.exists():
            raise DataNotFoundError(f"{key}={value!r}: {path} does not exist.")
        return path

    def split_names(self) -> dict[str, str]:
        return {"train": "train", "val": "val", "test": "test" if (self.data_dir / "test").is_dir() else "val"}

    def dataset(self, split: str, train: bool) -> MaskedImageDataset:
        name = self.split_names()[split]
        root = self.data_dir / name
        if not root.is_dir():
            raise DataNotFoundError(f"Missing split folder {root} (data.data_dir={str(self.data_dir)!r}).")
        classes = sorted(p.name for p in root.iterdir() if p.is_dir())
        if classes != self.class_names:
            raise ConfigError(
                f"{root} has classes {classes} but train has {self.class_names}; "
                "every split needs the same class folders."
            )
        samples = make_dataset(str(root), {c: i for i, c in enumerate(classes)}, extensions=IMG_EXTENSIONS)
        masks: list[MaskSource] | None = None
        if self.masks_dir is not None:
            masks = self._mask_files(root, name, samples)
        elif self.boxes is not None:
            masks = self._box_masks(root, name, samples)
        return MaskedImageDataset(samples, self.transform(train), root, masks, classes)

    def _mask_files(self, root: Path, name: str, samples: list[tuple[str, int]]) -> list[MaskSource]:
        """One mask PNG per image; refuses missing masks and masks of no image (first few named)."""
        assert self.masks_dir is not None
        mask_root = self.masks_dir / name
        pattern = f"{mask_root}/<class>/<image stem>.png"
        expected = [mask_root / Path(rel(p, root)).with_suffix(".png") for p, _ in samples]
        missing = [str(m) for m in expected if not m.is_file()]
        if missing:
            raise DataNotFoundError(
                f"{len(missing)} of {len(samples)} images in {root} have no mask (data.masks_dir="
                f"{str(self.masks_dir)!r}); expected {pattern}. Missing: {missing_listing(missing)}.")
        known = {str(m) for m in expected}
        orphans = sorted(str(p) for p in mask_root.rglob("*.png") if str(p) not in known) if mask_root.is_dir() else []
        if orphans:
            raise ConfigError(
                f"{len(orphans)} mask file(s) under {mask_root} belong to no image of {root} (each mask is "
                f"{pattern} of an image <class>/<image stem>.<ext>): {missing_listing(orphans)}. "
                "Remove them or add their images.")
        if len(known) != len(expected):
            raise ConfigError(f"Two images of {root} share a class folder and a file stem, so they would share "
                              f"one mask {pattern}; rename one of them.")
        return [MaskImage(m) for m in expected]

    def _boxes_file(self, name: str) -> Path:
        assert self.boxes is not None
        text = self.boxes.replace("{split}", name)
        path = Path(text).expanduser()
        path = path if path.is_absolute() else self.data_dir / path
        if path.is_dir():
            path = path / f"{name}.json"
        if not path.is_file():
            raise DataNotFoundError(
                f"data.boxes={self.boxes!r}: no box file {path} for split {name!r}. Give a path with "
                "{split} (e.g. boxes_{split}.json) or a folder holding <split>.json, COCO-style.")
        return path

    def _box_masks(self, root: Path, name: str, samples: list[tuple[str, int]]) -> list[MaskSource]:
        """Masks from COCO-style boxes; refuses images without an entry and entries without an image."""
        path = self._boxes_file(name)
        try:
            coco = json.loads(path.read_text())
            images = {int(im["id"]): im for im in coco["images"]}
            by_name = {str(im["file_name"]).replace("\\", "/"): int(i) for i, im in images.items()}
            boxes: dict[int, list] = {i: [] for i in images}
            for ann in coco.get("annotations", []):
                x, y, w, h = (float(v) for v in ann["bbox"])
                boxes.setdefault(int(ann["image_id"]), []).append((x, y, x + w, y + h))
        except (KeyError, TypeError, ValueError) as err:
            raise ConfigError(f"{path} is not a COCO-style box file ({type(err).__name__}: {err}); it needs "
                              "images [{id, file_name}] and annotations [{image_id, bbox: [x, y, w, h]}].") from err
        names = [rel(p, root) for p, _ in samples]
        missing = [n for n in names if n not in by_name]
        if missing:
            raise DataNotFoundError(
                f"{len(missing)} of {len(names)} images in {root} are not in {path} (its images[].file_name is "
                f"relative to the split folder, e.g. {names[0]!r}). Missing: {missing_listing(missing)}.")
        extra = sorted(set(by_name) - set(names))
        if extra:
            raise ConfigError(f"{path} lists {len(extra)} image(s) not found in {root}: {missing_listing(extra)}.")
        unknown = sorted(set(boxes) - set(images))
        if unknown:
            raise ConfigError(f"{path}: annotations name image_id(s) not in images: {missing_listing(unknown)}.")
        out: list[MaskSource] = []
        for n in names:
            im = images[by_name[n]]
            size = (int(im["width"]), int(im["height"])) if "width" in im and "height" in im else None
            out.append(MaskBoxes(boxes[by_name[n]], size, str(path)))
        return out
