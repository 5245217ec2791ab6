"""Multi-label generated shapes: several shapes per image, one ground-truth mask per class.

The multi-label sibling of :mod:`xaudit.data.shapes` (same shapes, same drawing, no download).
Each image holds ``min_objects``..``max_objects`` shapes of distinct classes at random places;
a later shape may cover an earlier one, so each class's mask holds the pixels where that class
is *visible*, and a class whose shape is fully covered is not in the label set.

Batch layout (the multi-label convention of xaudit, see ``multilabel = True``):

- ``image`` float [B,C,H,W] normalised, ``index`` long [B], as in single-label data;
- ``label`` long [B,K] multi-hot: 1 where class k is present (at least one class per image).
  A 2-D ``label`` is what tells multi-label code paths apart; keeping the key ``label`` lets
  every generic loader (the audit's tensor splits, ``DeviceBatches``) carry it unchanged;
- ``mask`` bool [B,K,H,W]: one mask per class (all False for an absent class).

The classifier trains these with binary cross-entropy (``model.multilabel``, set from the
datamodule by ``train.py``); explanations and the audit's evaluate mode explain each (image,
present class) pair (:class:`xaudit.explainers.targets.PresentClasses`).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from xaudit.data.base import channel_stats
from xaudit.data.shapes import GeneratedDataModule, check_shapes_args, shape_inside
from xaudit.utils.errors import ConfigError

#: a class is in an image's label set when at least this fraction of its shape stays visible
MIN_VISIBLE = 0.25


@dataclass(frozen=True)
class MultilabelShapesSplit:
    """One generated split: uint8 images [N,3,H,W], multi-hot labels long [N,K], masks bool [N,K,H,W]."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor


def generate_multilabel_shapes(
    n: int,
    *,
    num_classes: int = 4,
    image_size: int = 32,
    seed: int = 0,
    min_objects: int = 1,
    max_objects: int = 3,
    noise: float = 0.04,
) -> MultilabelShapesSplit:
    """Generate ``n`` images with ``min_objects``..``max_objects`` shapes of distinct classes each.

    Deterministic in ``seed``. Shapes are drawn in turn; a later one covers an earlier one, and
    the masks and labels record what stays visible: a class is present when at least
    ``MIN_VISIBLE`` of its shape's pixels show (the last shape drawn always does, so every image
    has at least one label).
    """
    check_multilabel_args(num_classes=num_classes, image_size=image_size, min_objects=min_objects,
                          max_objects=max_objects)
    g = torch.Generator().manual_seed(int(seed))
    s, k = int(image_size), int(num_classes)

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    counts = torch.randint(int(min_objects), int(max_objects) + 1, (n,), generator=g)
    order = rand(n, k).argsort(1)  # distinct classes per image: a random permutation, first `count` used
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    bg = 0.08 + 0.22 * rand(n, 3)
    images = bg[:, :, None, None].expand(n, 3, s, s).clone()
    masks = torch.zeros(n, k, s, s, dtype=torch.bool)
    drawn = torch.zeros(n, k)  # pixels each class's shape covered when it was drawn
    rows = torch.arange(n)
    for j in range(int(max_objects)):
        kind = order[:, j]
        # smaller than single-label shapes so several fit; ±15° keeps square and diamond distinct
        radius = (0.16 + 0.10 * rand(n)) * s
        margin = radius + 1.0
        cx = margin + rand(n) * (s - 2 * margin)
        cy = margin + rand(n) * (s - 2 * margin)
        angle = (rand(n) - 0.5) * (math.pi / 6)
        dx, dy = xx[None] - cx[:, None, None], yy[None] - cy[:, None, None]
        cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
        inside = shape_inside(kind, cos * dx + sin * dy, -sin * dx + cos * dy, radius)
        inside &= (j < counts)[:, None, None]
        colour = 0.35 + 0.65 * rand(n, 3)
        images = torch.where(inside[:, None], colour[:, :, None, None].expand(n, 3, s, s), images)
        masks &= ~inside[:, None]  # covered pixels no longer show the earlier shapes
        masks[rows, kind] |= inside
        drawn[rows, kind] += inside.flatten(1).sum(1).float()
    images = images + noise * torch.randn(n, 3, s, s, generator=g)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    # a shape mostly covered by later ones no longer shows its class: it leaves the label set
    visible = masks.flatten(2).sum(2).float() >= MIN_VISIBLE * drawn.clamp_min(1.0)
    masks &= visible[:, :, None, None]
    labels = (visible & (drawn > 0)).long()
    return MultilabelShapesSplit(images=images, labels=labels, masks=masks)


def check_multilabel_args(*, num_classes: int, image_size: int, min_objects: int, max_objects: int) -> None:
    """Raise a ConfigError naming the bad setting and its valid range."""
    check_shapes_args(num_classes=num_classes, image_size=image_size, spurious_p=0.0, cue="background")
    if not 1 <= int(min_objects) <= int(max_objects) <= int(num_classes):
        raise ConfigError(
            f"data.min_objects={min_objects}, data.max_objects={max_objects}: need 1 ≤ min_objects ≤ "
            f"max_objects ≤ num_classes ({num_classes}); each shape in an image has its own class.")


class ShapesMultilabelDataModule(GeneratedDataModule):
    """Multi-label generated shapes (see the module docstring for the batch layout).

    ``multilabel = True`` tells ``train.py`` to build the classifier with ``multilabel=True``
    (sigmoid outputs, binary cross-entropy, multi-label accuracy and mAP).

    Args:
        num_classes: number of shape classes; each shape in an image has its own class.
        image_size: side of the square images in px.
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        min_objects: fewest shapes per image (≥1).
        max_objects: most shapes per image (≤ ``num_classes``).
        noise: standard deviation of the pixel noise added to every image.
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`).
        seed: seeds the generated data or the validation holdout, and the DDP training sampler.
    """

    has_masks = True
    multilabel = True
    mean_is_train_mean = True

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 32,
        n_train: int = 4000,
        n_val: int = 500,
        n_test: int = 1000,
        min_objects: int = 1,
        max_objects: int = 3,
        noise: float = 0.04,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        check_multilabel_args(num_classes=num_classes, image_size=image_size, min_objects=min_objects,
                              max_objects=max_objects)
        self._init_splits(num_classes, image_size, n_train, n_val, n_test)
        self.min_objects, self.max_objects = int(min_objects), int(max_objects)
        self.noise = float(noise)
        self.mean, self.std = channel_stats(self.split("train").images)

    def _generate(self, name: str, seed: int) -> MultilabelShapesSplit:
        return generate_multilabel_shapes(self.sizes[name], num_classes=self.num_classes, image_size=self.image_size,
                                          seed=seed, min_objects=self.min_objects, max_objects=self.max_objects,
                                          noise=self.noise)

    def describe(self) -> dict[str, Any]:
        """As the base, plus ``multilabel: True`` (stored in checkpoints)."""
        return {**super().describe(), "multilabel": True}
