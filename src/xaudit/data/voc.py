"""Pascal VOC 2007/2012 as single-label classification with an object mask (torchvision's layout).

Layout (what the official tarballs extract to): ``data_dir/VOCdevkit/VOC<year>/`` with
``Annotations/<id>.xml``, ``JPEGImages/<id>.jpg``, ``ImageSets/Main/{train,val[,test]}.txt`` and,
for ``masks=segmentation``, ``ImageSets/Segmentation/*.txt`` and ``SegmentationClass/<id>.png``.
Nothing is downloaded. Splits: train, val, and test where ``ImageSets/.../test.txt`` exists
(VOC2007 with its test tarball), else val doubles as test.

Label (``label=largest``): the class of the image's largest box (by area, ``difficult`` objects
included); the mask is the union of that class's boxes (``masks=boxes``) or that class's pixels
of ``SegmentationClass`` (``masks=segmentation``, the segmentation subset only). The pointing
game is usually reported multi-label on VOC07 test (every class present); ``label`` is the hook
for that mode.
"""

from __future__ import annotations

import xml.etree.ElementTree as ET
from pathlib import Path

from torchvision.datasets import VOCDetection, VOCSegmentation
from torchvision.datasets.voc import DATASET_YEAR_DICT

from xaudit.data.masked import (
    IMAGENET_MEAN,
    IMAGENET_STD,
    FileDataModule,
    MaskBoxes,
    MaskedImageDataset,
    MaskImage,
)
from xaudit.utils.errors import ConfigError, DataNotFoundError, unknown_choice

VOC_CLASSES = (
    "aeroplane", "bicycle", "bird", "boat", "bottle", "bus", "car", "cat", "chair", "cow", "diningtable",
    "dog", "horse", "motorbike", "person", "pottedplant", "sheep", "sofa", "train", "tvmonitor",
)
LABEL_MODES = ("largest",)
MASK_MODES = ("boxes", "segmentation")


def voc_objects(xml_path: str) -> tuple[tuple[int, int], list[tuple[int, tuple[float, float, float, float]]]]:
    """(W, H) and the ``(class index, box)`` of every object of a VOC annotation file.

    VOC boxes are 1-based inclusive pixel indices; returned boxes are half-open continuous
    coordinates (``xmin - 1, ymin - 1, xmax, ymax``)."""
    try:
        root = ET.parse(xml_path).getroot()
        size = root.find("size")
        wh = (int(float(size.findtext("width"))), int(float(size.findtext("height")))) if size is not None else (0, 0)
        objects = []
        for obj in root.iter("object"):
            name = (obj.findtext("name") or "").strip()
            bb = obj.find("bndbox")
            box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
            objects.append((VOC_CLASSES.index(name), (box[0] - 1, box[1] - 1, box[2], box[3])))
    except (ET.ParseError, AttributeError, TypeError, ValueError) as err:
        raise ConfigError(f"{xml_path} is not a readable VOC annotation ({type(err).__name__}: {err}).") from err
    if not objects:
        raise ConfigError(f"{xml_path} has no <object>; every VOC image needs at least one.")
    return wh, objects


def largest_object(objects: list[tuple[int, tuple[float, float, float, float]]]) -> int:
    """The class of the largest box (the first one on ties)."""
    return max(objects, key=lambda o: (o[1][2] - o[1][0]) * (o[1][3] - o[1][1]))[0]


class VOCDataModule(FileDataModule):
    """Pascal VOC images labelled by their largest object, with that object's mask (``has_masks``).

    Args:
        data_dir: the folder holding ``VOCdevkit/VOC<year>/`` (no download).
        year: ``"2007"`` or ``"2012"``.
        masks: ``boxes`` (the label class's boxes) or ``segmentation`` (its SegmentationClass pixels;
            the segmentation subset only).
        label: ``largest``: the class of the largest object.
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

    def __init__(self, data_dir: str, year: str = "2007", masks: str = "boxes", label: str = "largest",
                 image_size: int = 224, mean: tuple[float, ...] = IMAGENET_MEAN,
                 std: tuple[float, ...] = IMAGENET_STD, augment: bool = True, batch_size: int = 64,
                 eval_batch_size: int | None = None, num_workers: int | str = 0, seed: int = 0) -> None:
        super().__init__(image_size=image_size, mean=mean, std=std, augment=augment, batch_size=batch_size,
                         eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        if masks not in MASK_MODES:
            raise unknown_choice("VOC mask source", masks, MASK_MODES, key="data.masks")
        if label not in LABEL_MODES:
            raise unknown_choice("VOC label mode", label, LABEL_MODES, key="data.label")
        years = [y for y in DATASET_YEAR_DICT if y.isdigit()]
        if str(year) not in years:
            raise unknown_choice("VOC year", year, years, key="data.year")
        self.data_dir, self.year, self.masks, self.label = Path(str(data_dir)).expanduser(), str(year), masks, label
        self.voc_root = self.data_dir / DATASET_YEAR_DICT[self.year]["base_dir"]
        self.sets_dir = self.voc_root / "ImageSets" / ("Segmentation" if masks == "segmentation" else "Main")
        needed = ["Annotations", "JPEGImages", "ImageSets"] + (["SegmentationClass"] if masks == "segmentation" else [])
        absent = [d for d in needed if not (self.voc_root / d).is_dir()]
        if absent or not (self.sets_dir / "train.txt").is_file():
            raise DataNotFoundError(
                f"No Pascal VOC {self.year} at data.data_dir={str(self.data_dir)!r} (missing "
                f"{', '.join(absent) or self.sets_dir / 'train.txt'}): expected {self.voc_root}/"
                "{Annotations/<id>.xml, JPEGImages/<id>.jpg, ImageSets/Main/{train,val[,test]}.txt"
                + (", ImageSets/Segmentation/*.txt, SegmentationClass/<id>.png" if masks == "segmentation" else "")
                + "}, as the VOCtrainval (and VOCtest) tarballs extract; set data.data_dir to the folder holding "
                "VOCdevkit and data.year (2007 or 2012).")
        self.class_names = list(VOC_CLASSES)
        self.num_classes = len(VOC_CLASSES)

    def split_names(self) -> dict[str, str]:
        test = "test" if (self.sets_dir / "test.txt").is_file() else "val"
        return {"train": "train", "val": "val", "test": test}

    def dataset(self, split: str, train: bool) -> MaskedImageDataset:
        image_set = self.split_names()[split]
        if not (self.sets_dir / f"{image_set}.txt").is_file():
            raise DataNotFoundError(f"Missing {self.sets_dir / (image_set + '.txt')} (the {split} split's image list).")
        kind = VOCSegmentation if self.masks == "segmentation" else VOCDetection
        voc = kind(str(self.data_dir), year=self.year, image_set=image_set, download=False)
        annotations = [str(self.voc_root / "Annotations" / (Path(p).stem + ".xml")) for p in voc.images]
        missing = [p for p in [*voc.images, *annotations, *voc.targets] if not Path(p).is_file()]
        if missing:
            raise DataNotFoundError(f"{len(missing)} file(s) listed by {self.sets_dir / (image_set + '.txt')} are "
                                    f"missing, e.g. {missing[:3]}.")
        samples, masks = [], []
        for image, xml, target in zip(voc.images, annotations, voc.targets):
            size, objects = voc_objects(xml)
            cls = largest_object(objects)
            samples.append((image, cls))
            if self.masks == "segmentation":
                masks.append(MaskImage(target, values=(cls + 1,)))  # SegmentationClass: 0 background, c+1 class c
            else:
                masks.append(MaskBoxes([b for c, b in objects if c == cls], size if all(size) else None, xml))
        return MaskedImageDataset(samples, self.transform(train), self.voc_root, masks, self.class_names)
