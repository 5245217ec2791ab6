"""Image files with an optional ground-truth object mask, resized, cropped and flipped together.

The shared piece of the file-backed datamodules (ImageFolder, Pascal VOC, Oxford-IIIT Pet,
CUB-200-2011): each lists its samples as ``(image path, label)`` plus, per sample, where its
mask comes from — a mask image (:class:`MaskImage`: nonzero pixels, or the pixels of given
values) or boxes (:class:`MaskBoxes`: filled rectangles). :class:`JointTransform` applies the
ImageFolder pipeline (shorter side to ``image_size``, centre crop, optional random horizontal
flip, normalisation) to the image and, with nearest-neighbour resizing, to its mask, so a mask
pixel stays on the image pixel it labels. Items are batch dicts with ``mask`` bool [H,W].
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as F

from xaudit.data.base import Batch, XAuditDataModule
from xaudit.utils.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
#: a box ``(x0, y0, x1, y1)`` in continuous pixel coordinates (pixel i covers [i, i+1)), half-open
Box = tuple[float, float, float, float]


class MaskImage:
    """A mask stored as an image of the same size as its photo.

    ``values=None``: every nonzero pixel is object (binary masks, instance-id masks, any nonzero
    colour of an RGB mask); otherwise the pixels whose (palette) value is in ``values`` (a VOC
    class index, the Pet trimap's foreground 1 and boundary 3).

    Args:
        path: the mask image file.
        values: the pixel (palette) values that are object; None: every nonzero pixel.
    """

    def __init__(self, path: str | Path, values: Sequence[int] | None = None) -> None:
        self.path, self.values = str(path), None if values is None else tuple(int(v) for v in values)

    def load(self, image_size: tuple[int, int], image_path: str) -> np.ndarray:
        """Bool [H,W] object mask; refuses a mask of another size than its image (W×H named)."""
        with Image.open(self.path) as img:
            if img.size != image_size:
                raise ConfigError(
                    f"Mask {self.path} is {img.size[0]}x{img.size[1]} (W×H) but its image {image_path} is "
                    f"{image_size[0]}x{image_size[1]}; a mask must have its image's size (resize it with "
                    "nearest-neighbour interpolation, or fix the pairing).")
            arr = np.asarray(img)
        if arr.ndim == 3:  # RGB(A)/LA masks: object where any colour channel is nonzero (alpha ignored)
            arr = arr[..., : 3 if arr.shape[-1] >= 3 else 1].max(axis=-1)
        return arr != 0 if self.values is None else np.isin(arr, self.values)


class MaskBoxes:
    """Boxes filled as rectangles (their union is the object). ``size``: the (W, H) the annotation
    was made on, when it says (COCO ``width``/``height``); it must match the image.

    Args:
        boxes: ``(x0, y0, x1, y1)`` boxes in pixel coordinates (pixel i covers [i, i+1)).
        size: the (W, H) the boxes were annotated on, or None.
        source: where the boxes come from (named in errors).
    """

    def __init__(self, boxes: Sequence[Box], size: tuple[int, int] | None = None, source: str = "") -> None:
        self.boxes, self.size, self.source = [tuple(float(v) for v in b) for b in boxes], size, source

    def load(self, image_size: tuple[int, int], image_path: str) -> np.ndarray:
        """Bool [H,W]: pixels a box overlaps (clipped to the image)."""
        w, h = image_size
        if self.size is not None and tuple(self.size) != (w, h):
            raise ConfigError(
                f"Boxes for {image_path} in {self.source} are annotated on a {self.size[0]}x{self.size[1]} image "
                f"but the image is {w}x{h} (W×H); the annotation's width/height must match the image file.")
        out = np.zeros((h, w), dtype=bool)
        for x0, y0, x1, y1 in self.boxes:
            c0, r0 = max(0, int(np.floor(x0))), max(0, int(np.floor(y0)))
            c1, r1 = min(w, int(np.ceil(x1))), min(h, int(np.ceil(y1)))
            out[r0:r1, c0:c1] = True
        return out


MaskSource = MaskImage | MaskBoxes


class JointTransform:
    """The ImageFolder pipeline on an image and (optionally) its mask, with one shared random flip.

    Image: RGB (or grayscale), shorter side to ``image_size`` (bilinear, antialiased), centre
    crop, horizontal flip with probability 0.5 when ``flip``, ``ToTensor``, normalisation. The
    mask takes the same geometry with nearest-neighbour resizing and comes back bool [S,S].

    Args:
        image_size: the output side S.
        mean: per-channel normalisation mean.
        std: per-channel normalisation standard deviation.
        grayscale: convert images to one channel instead of RGB.
        flip: random horizontal flip (training).
    """

    def __init__(self, image_size: int, mean: Sequence[float], std: Sequence[float], grayscale: bool = False,
                 flip: bool = False) -> None:
        self.size, self.mean, self.std = int(image_size), list(mean), list(std)
        self.grayscale, self.flip = bool(grayscale), bool(flip)

    def _geometry(self, img: Image.Image, interpolation: InterpolationMode, flip: bool) -> Image.Image:
        img = F.resize(img, self.size, interpolation=interpolation)
        img = F.center_crop(img, [self.size, self.size])
        return F.hflip(img) if flip else img

    def __call__(self, image: Image.Image, mask: np.ndarray | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Normalised float [C,S,S] image and bool [S,S] mask (None without a mask)."""
        flip = self.flip and bool(torch.rand(1) < 0.5)  # the draw RandomHorizontalFlip makes
        image = image.convert("L" if self.grayscale else "RGB")
        x = F.normalize(F.to_tensor(self._geometry(image, InterpolationMode.BILINEAR, flip)), self.mean, self.std)
        if mask is None:
            return x, None
        m = Image.fromarray(mask.astype(np.uint8) * 255, mode="L")
        m = self._geometry(m, InterpolationMode.NEAREST, flip)
        return x, torch.from_numpy(np.asarray(m) > 127)


class MaskedImageDataset(Dataset):
    """Image files (+ optional masks) as batch dicts: ``image``, ``label``, ``index`` [, ``mask``].

    ``samples``/``targets``/``root`` mirror torchvision's ImageFolder, so labels are read and the
    dataset fingerprinted (attribution stores) without decoding images.

    Args:
        samples: ``(image path, class index)`` pairs.
        transform: the image (+ mask) pipeline.
        root: the split's folder (recorded, as ImageFolder's ``root``).
        masks: one mask source per sample (:class:`MaskImage` or :class:`MaskBoxes`), or None.
        classes: the class names, or None.
    """

    def __init__(self, samples: Sequence[tuple[str, int]], transform: JointTransform, root: str | Path,
                 masks: Sequence[MaskSource] | None = None, classes: Sequence[str] | None = None) -> None:
        if masks is not None and len(masks) != len(samples):
            raise ValueError(f"{len(samples)} samples but {len(masks)} masks")
        self.samples = [(str(p), int(y)) for p, y in samples]
        self.targets = [y for _, y in self.samples]
        self.root = str(root)
        self.masks = None if masks is None else list(masks)
        self.transform = transform
        self.classes = list(classes) if classes is not None else None

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> Batch:
        path, label = self.samples[i]
        with Image.open(path) as img:
            img.load()
            mask = None if self.masks is None else self.masks[i].load(img.size, path)
            image, m = self.transform(img, mask)
        item = {"image": image, "label": torch.tensor(label), "index": torch.tensor(i)}
        if m is not None:
            item["mask"] = m
        return item


def holdout(n: int, val_size: float | int, seed: int) -> tuple[list[int], list[int]]:
    """Seeded (train, val) index lists of a split that ships without a validation part.

    ``val_size``: a fraction in (0, 1) or a count; the validation part keeps at least one sample."""
    if isinstance(val_size, bool) or not isinstance(val_size, (int, float)) or val_size <= 0:
        raise ConfigError(f"data.val_size={val_size!r}: use a fraction in (0, 1) or a count ≥ 1.")
    k = round(val_size * n) if val_size < 1 else int(val_size)
    k = max(1, k)
    if k >= n:
        raise ConfigError(f"data.val_size={val_size!r} leaves no training images out of {n}; use a smaller value.")
    order = torch.randperm(n, generator=torch.Generator().manual_seed(int(seed))).tolist()
    return sorted(order[k:]), sorted(order[:k])


def missing_listing(paths: Sequence[str], limit: int = 5) -> str:
    """The first ``limit`` of ``paths`` and how many more, for error messages."""
    head = ", ".join(str(p) for p in paths[:limit])
    return head + (f" (and {len(paths) - limit} more)" if len(paths) > limit else "")


class FileDataModule(XAuditDataModule):
    """Base of the file-backed datamodules: the resize/crop/normalise pipeline and the splits.

    Subclasses set ``class_names``, ``num_classes`` and ``has_masks`` and implement
    :meth:`dataset` (one split as a :class:`MaskedImageDataset`) and :meth:`split_names`.

    Args:
        image_size: side of the square network input (shorter side resized, centre crop).
        grayscale: read the images as one channel (``mean``/``std`` averaged to one value).
        mean: per-channel normalisation mean (ImageNet's by default).
        std: per-channel normalisation standard deviation.
        augment: random horizontal flip of the training images.
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`).
        seed: seeds the generated data or the validation holdout, and the DDP training sampler.
    """

    def __init__(self, image_size: int = 224, grayscale: bool = False,
                 mean: Sequence[float] = IMAGENET_MEAN, std: Sequence[float] = IMAGENET_STD,
                 augment: bool = True, batch_size: int = 64, eval_batch_size: int | None = None,
                 num_workers: int | str = 0, seed: int = 0) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size, num_workers=num_workers, seed=seed)
        self.image_size = int(image_size)
        self.grayscale = bool(grayscale)
        self.in_chans = 1 if grayscale else 3
        mean, std = list(mean), list(std)
        if len(mean) != self.in_chans or len(std) != self.in_chans:
            if self.in_chans == 1:
                mean, std = [sum(mean) / len(mean)], [sum(std) / len(std)]
            else:
                raise ConfigError(f"data.mean/std need {self.in_chans} values, got {mean} / {std}.")
        self.mean, self.std = tuple(float(m) for m in mean), tuple(float(s) for s in std)
        self.augment = bool(augment)

    def transform(self, train: bool) -> JointTransform:
        """The pipeline of a split: a random flip only for training with ``augment``."""
        return JointTransform(self.image_size, self.mean, self.std, self.grayscale, flip=train and self.augment)

    def split_names(self) -> dict[str, str]:
        """The dataset's own split read for each of ``train``, ``val`` and ``test``."""
        raise NotImplementedError

    def dataset(self, split: str, train: bool) -> MaskedImageDataset:
        """Split ``split`` (a key of :meth:`split_names`) with the train or the eval pipeline."""
        raise NotImplementedError

    def plain_train_set(self) -> MaskedImageDataset:
        """The train split with the evaluation transform (no random flip)."""
        return self.dataset("train", train=False)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set = self.dataset("train", train=True)
            self.val_set = self.dataset("val", train=False)
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self.dataset("test", train=False)


def rel(path: str | Path, root: str | Path) -> str:
    """``path`` relative to ``root`` with forward slashes (how annotation files name images)."""
    return os.path.relpath(path, root).replace(os.sep, "/")
