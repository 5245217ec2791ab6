"""Embedded default data: generated shapes with ground-truth masks and an optional spurious cue.

Every image is drawn from a seed (no download, identical on every machine). The class is the
shape; its colour, size, position and a small rotation are random, so only the shape decides the
label. ``spurious_p`` ties a background cue to the class — the "wolf on snow" trap of the source
documents — so an audit can show a model that looks at the cue instead of the object. The test
split can shuffle the cue (``test_cue="shuffled"``), which exposes such a shortcut model.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch

from xaudit.data.base import TensorDictDataset, XAuditDataModule, channel_stats
from xaudit.utils.errors import ConfigError

SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "cross", "ring", "diamond")
CUES: tuple[str, ...] = ("background", "corner", "stripes")

# One colour per class for the cue; far apart so the cue is easy to learn (that is the trap).
_CUE_COLOURS = torch.tensor(
    [
        [0.85, 0.25, 0.25],
        [0.25, 0.75, 0.30],
        [0.25, 0.40, 0.90],
        [0.90, 0.80, 0.20],
        [0.70, 0.30, 0.85],
        [0.20, 0.80, 0.85],
    ]
)


@dataclass(frozen=True)
class ShapesSplit:
    """One generated split: uint8 images [N,3,H,W], labels [N], masks [N,H,W], cue ids [N]."""

    images: torch.Tensor
    labels: torch.Tensor
    masks: torch.Tensor
    cues: torch.Tensor


def shape_inside(kind: torch.Tensor, u: torch.Tensor, v: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Boolean inside-test for each image's shape in its own rotated, centred frame (u, v)."""
    r = r[:, None, None]
    d = torch.sqrt(u**2 + v**2)
    inside = torch.zeros_like(u, dtype=torch.bool)
    tests = {
        0: d <= r,
        1: (u.abs() <= 0.8 * r) & (v.abs() <= 0.8 * r),
        # upward triangle: base at v = +0.6r, apex at v = -0.9r
        2: (v <= 0.6 * r) & (v >= -0.9 * r) & (u.abs() <= (v + 0.9 * r) * (0.95 / 1.5)),
        3: ((u.abs() <= 0.3 * r) & (v.abs() <= r)) | ((v.abs() <= 0.3 * r) & (u.abs() <= r)),
        4: (d <= r) & (d >= 0.55 * r),
        5: (u.abs() + v.abs()) <= r,
    }
    for k, t in tests.items():
        inside |= (kind == k)[:, None, None] & t
    return inside


def generate_shapes(
    n: int,
    *,
    num_classes: int = 4,
    image_size: int = 32,
    seed: int = 0,
    spurious_p: float = 0.0,
    cue: str = "background",
    noise: float = 0.04,
    cue_class: int | None = None,
) -> ShapesSplit:
    """Generate ``n`` class-balanced shape images deterministically from ``seed``.

    With probability ``spurious_p`` an image carries its own class's cue; otherwise the cue of a
    uniformly drawn class. ``spurious_p=0`` therefore makes the cue pure noise, ``1`` makes it a
    perfect (spurious) predictor. ``cue_class=k`` gives every image the cue of class k whatever
    its shape (concept examples of "class k's cue" for TCAV).
    """
    check_shapes_args(num_classes=num_classes, image_size=image_size, spurious_p=spurious_p, cue=cue)
    if cue_class is not None and not 0 <= int(cue_class) < num_classes:
        raise ConfigError(f"cue_class={cue_class} must be a class index in 0..{num_classes - 1}.")
    g = torch.Generator().manual_seed(int(seed))
    s = image_size
    labels = torch.arange(n) % num_classes
    labels = labels[torch.randperm(n, generator=g)]

    def rand(*shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=g)

    radius = (0.22 + 0.14 * rand(n)) * s
    margin = radius + 1.0
    cx = margin + rand(n) * (s - 2 * margin)
    cy = margin + rand(n) * (s - 2 * margin)
    angle = (rand(n) - 0.5) * (math.pi / 6)  # ±15°: square and diamond stay distinct
    yy, xx = torch.meshgrid(torch.arange(s) + 0.5, torch.arange(s) + 0.5, indexing="ij")
    dx = xx[None] - cx[:, None, None]
    dy = yy[None] - cy[:, None, None]
    cos, sin = torch.cos(angle)[:, None, None], torch.sin(angle)[:, None, None]
    u = cos * dx + sin * dy
    v = -sin * dx + cos * dy
    masks = shape_inside(labels, u, v, radius)

    # Object colour: random saturated colour, never tied to the class.
    obj = 0.35 + 0.65 * rand(n, 3)
    bg = 0.08 + 0.22 * rand(n, 3)  # dark, neutral-ish background

    tied = rand(n) < spurious_p
    cues = torch.where(tied, labels, torch.randint(0, num_classes, (n,), generator=g))
    if cue_class is not None:
        cues = torch.full_like(cues, int(cue_class))
    cue_rgb = _CUE_COLOURS[cues]
    background = bg[:, :, None, None].expand(n, 3, s, s).clone()
    if cue == "background":
        background = 0.5 * background + 0.5 * cue_rgb[:, :, None, None]
    elif cue == "corner":
        k = max(3, s // 6)
        background[:, :, :k, :k] = cue_rgb[:, :, None, None]
    elif cue == "stripes":
        period = max(4, s // 6)
        # the cue class sets the stripe orientation (angle) of a faint texture
        theta = cues.float() * (math.pi / num_classes)
        phase = (xx[None] * torch.cos(theta)[:, None, None] + yy[None] * torch.sin(theta)[:, None, None])
        stripes = (torch.remainder(phase, period) < period / 2).float()
        background = background + 0.35 * stripes[:, None]
    images = torch.where(masks[:, None], obj[:, :, None, None].expand(n, 3, s, s), background)
    images = images + noise * torch.randn(n, 3, s, s, generator=g)
    images = (images.clamp(0, 1) * 255).round().to(torch.uint8)
    return ShapesSplit(images=images, labels=labels, masks=masks, cues=cues)


def check_shapes_args(*, num_classes: int, image_size: int, spurious_p: float, cue: str) -> None:
    """Raise a ConfigError naming the bad shapes setting and its valid range."""
    if not 2 <= num_classes <= len(SHAPES):
        raise ConfigError(
            f"data.num_classes={num_classes} is out of range: the shapes dataset has "
            f"{len(SHAPES)} shapes {list(SHAPES)}; choose 2..{len(SHAPES)}."
        )
    if image_size < 12:
        raise ConfigError(f"data.image_size={image_size} is too small to draw shapes; use ≥12 (default 32).")
    if not (isinstance(spurious_p, (int, float)) and 0.0 <= float(spurious_p) <= 1.0):
        raise ConfigError(
            f"data.spurious_p={spurious_p!r} must lie in [0, 1]: 0 = cue independent of the class, "
            "1 = cue always matches the class."
        )
    if cue not in CUES:
        raise ConfigError(f"data.cue={cue!r} is unknown; choose one of {list(CUES)}.")


class GeneratedDataModule(XAuditDataModule):
    """A datamodule whose splits are generated in memory (``split(name)`` → images, labels, masks):
    the splits become :class:`TensorDictDataset` objects on ``setup``."""

    def _init_splits(self, num_classes: int, image_size: int, n_train: int, n_val: int, n_test: int) -> None:
        """Class count, image size and split sizes (each ≥ 1), checked and stored; no split generated yet."""
        for key, n in (("n_train", n_train), ("n_val", n_val), ("n_test", n_test)):
            if int(n) < 1:
                raise ConfigError(f"data.{key}={n} must be ≥1.")
        self.num_classes = int(num_classes)
        self.image_size = int(image_size)
        self.in_chans = 3
        self.class_names = list(SHAPES[: self.num_classes])
        self.sizes = {"train": int(n_train), "val": int(n_val), "test": int(n_test)}
        self._splits: dict[str, Any] = {}

    def split(self, name: str) -> Any:
        """The generated split ``name`` (train, val or test): an object with images, labels and masks,
        generated once, each split with its own derived seed."""
        if name not in self._splits:
            offset = {"train": 0, "val": 1, "test": 2}[name]
            self._splits[name] = self._generate(name, self.seed * 1000 + offset)
        return self._splits[name]

    def _generate(self, name: str, seed: int) -> Any:
        """Generate split ``name`` from ``seed``."""
        raise NotImplementedError

    def _dataset(self, name: str) -> TensorDictDataset:
        s = self.split(name)
        return TensorDictDataset(s.images, s.labels, self.mean, self.std, masks=s.masks)

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.train_set is None:
            self.train_set = self._dataset("train")
            self.val_set = self._dataset("val")
        if stage in (None, "test", "predict") and self.test_set is None:
            self.test_set = self._dataset("test")


class ShapesDataModule(GeneratedDataModule):
    """The embedded default dataset (see module docstring). Batches carry ``mask``.

    ``test_cue="same"`` draws the test split like train (same ``spurious_p``);
    ``"shuffled"`` makes the test cue independent of the class, so a shortcut model is exposed.

    Args:
        num_classes: number of shapes (2..6, taken in the order circle, square, triangle, cross, ring, diamond).
        image_size: side of the square images in px (≥12).
        n_train: training images.
        n_val: validation images.
        n_test: test images.
        spurious_p: probability that the cue matches the class ("wolf on snow"); 0 = no shortcut.
        cue: the spurious cue: ``background`` | ``corner`` | ``stripes``.
        test_cue: ``same`` (test drawn like train) or ``shuffled`` (cue independent of the class).
        noise: standard deviation of the pixel noise added to every image.
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`).
        seed: seeds the generated data or the validation holdout, and the DDP training sampler.
    """

    has_masks = True
    mean_is_train_mean = True  # computed from the train split's images

    def __init__(
        self,
        num_classes: int = 4,
        image_size: int = 32,
        n_train: int = 4000,
        n_val: int = 500,
        n_test: int = 1000,
        spurious_p: float = 0.0,
        cue: str = "background",
        test_cue: str = "same",
        noise: float = 0.04,
        batch_size: int = 128,
        eval_batch_size: int | None = None,
        num_workers: int | str = 0,
        seed: int = 0,
    ) -> None:
        super().__init__(batch_size=batch_size, eval_batch_size=eval_batch_size,
                         num_workers=num_workers, seed=seed)
        check_shapes_args(num_classes=num_classes, image_size=image_size, spurious_p=spurious_p, cue=cue)
        if test_cue not in ("same", "shuffled"):
            raise ConfigError(f"data.test_cue={test_cue!r} is unknown; choose 'same' or 'shuffled'.")
        self._init_splits(num_classes, image_size, n_train, n_val, n_test)
        self.spurious_p = float(spurious_p)
        self.cue = cue
        self.test_cue = test_cue
        self.noise = float(noise)
        # The normalisation statistics come from the train split, so they are known before setup.
        self.mean, self.std = channel_stats(self.split("train").images)

    def _generate(self, name: str, seed: int) -> ShapesSplit:
        p = 0.0 if (name == "test" and self.test_cue == "shuffled") else self.spurious_p
        return generate_shapes(self.sizes[name], num_classes=self.num_classes, image_size=self.image_size,
                               seed=seed, spurious_p=p, cue=self.cue, noise=self.noise)
