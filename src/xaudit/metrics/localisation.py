"""Localisation: does the attribution map point at the ground-truth object?

For data with object masks (the shapes dataset). ``update(attr, mask)``: attributions [B,H,W]
and bool masks [B,H,W] at image resolution. A sample with an empty mask has no object to
point at: its value is NaN and ``compute()`` skips it.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor

from xaudit.metrics.base import XAuditMetric, check_attribution, check_mask
from xaudit.metrics.registry import register_metric
from xaudit.ops.ranking import content_seeds, top_k_mask
from xaudit.utils.errors import ConfigError


class _LocalisationMetric(XAuditMetric):
    update_inputs: ClassVar[tuple[str, ...]] = ("attr", "mask")
    higher_is_better: ClassVar[bool] = True

    def update(self, attr: Tensor, mask: Tensor | None) -> None:
        """Add the scores of one batch (``mask`` None → error: this metric needs masks)."""
        name = type(self).__name__
        check_attribution(attr, name)
        mask = check_mask(mask, attr, name).to(attr.device)
        scores = self._score(attr.reshape(attr.shape[0], -1), mask, attr.shape[-2:])
        empty = ~mask.flatten(1).any(1)
        self._add_values(scores.masked_fill(empty, float("nan")))

    def _score(self, attr: Tensor, mask: Tensor, size: torch.Size) -> Tensor:
        raise NotImplementedError


def disc_dilate(mask: Tensor, radius: int) -> Tensor:
    """Grow bool masks [B,H,W] by a disc of ``radius`` pixels (Euclidean)."""
    if radius == 0:
        return mask
    r = torch.arange(-radius, radius + 1, device=mask.device, dtype=torch.float32)
    disc = ((r[:, None] ** 2 + r[None, :] ** 2) <= radius**2).float()[None, None]
    grown = F.conv2d(mask[:, None].float(), disc, padding=radius)
    return grown[:, 0] > 0.5


def pointing_tolerance(height: int, width: int) -> int:
    """TorchRay's pointing-game tolerance, 15 px at 224 px, scaled by the image side: round(15·max(H,W)/224)."""
    return round(15 * max(height, width) / 224)


@register_metric("pointing_game")
class PointingGame(_LocalisationMetric):
    """Pointing game of Zhang et al., "Top-down neural attention by excitation backprop", ECCV 2016.

    A hit when the map's maximum lies on the object or within ``tolerance`` pixels of it, as in
    TorchRay (Fong et al., 2019: 15 px at 224 px); ``tolerance=None`` (default) scales that to the
    image, round(15·max(H,W)/224) px (2 px at 32 px). If several pixels share the maximum, the
    score is the fraction of them that hit — the exact expectation over a uniformly random
    tie-break, so a constant map scores chance instead of a free hit. The paper explains the
    ground-truth class. Higher is better.
    """

    family = "localisation"
    measures = "whether the map's maximum falls on the object"

    paper: ClassVar[str] = "Zhang et al., ECCV 2016; tolerance of TorchRay (Fong, Patrick & Vedaldi, ICCV 2019)"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "several maxima: expected hit over a random choice among them (TorchRay takes one argmax)",)

    def __init__(self, tolerance: int | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if tolerance is not None and (isinstance(tolerance, bool) or not isinstance(tolerance, int) or tolerance < 0):
            raise ConfigError(f"tolerance={tolerance!r} must be an integer ≥0 (pixels), or null for TorchRay's "
                              "15 px at 224 px scaled to the image.")
        self.tolerance = tolerance

    def tolerance_for(self, height: int, width: int) -> int:
        """The tolerance used on H×W images: ``tolerance``, or TorchRay's scaled 15 px."""
        return pointing_tolerance(height, width) if self.tolerance is None else self.tolerance

    def protocol_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """The tolerance as run on ``size``."""
        return {"tolerance": self.tolerance_for(*size)}

    def paper_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """TorchRay's 15 px at 224, scaled."""
        return {"tolerance": pointing_tolerance(*size)}

    def _score(self, attr: Tensor, mask: Tensor, size: torch.Size) -> Tensor:
        near = disc_dilate(mask, self.tolerance_for(*size)).flatten(1)
        top = attr == attr.amax(dim=1, keepdim=True)
        return (top & near).sum(1).double() / top.sum(1).double()


@register_metric("mask_iou")
class MaskIoU(_LocalisationMetric):
    """IoU between the map's top ``top_k`` fraction of pixels and the object mask; higher is better.

    The thresholded-saliency localisation of the CAM/Grad-CAM papers, with a fixed area instead
    of a value threshold so maps on different scales compare fairly. Exactly
    ``max(1, round(top_k·H·W))`` pixels are kept, in the order of :mod:`xaudit.ops.ranking`:
    ties broken at random, seeded by ``tie_seed`` and the sample's map and mask.
    """

    family = "localisation"
    measures = "IoU of the top-k share of pixels with the object mask"

    paper: ClassVar[str] = "thresholded-map localisation of CAM (Zhou et al., CVPR 2016), at a fixed area"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "keeps the top_k share of pixels instead of CAM's 20 %-of-max value threshold",)

    def __init__(self, top_k: float = 0.2, tie_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        if isinstance(top_k, bool) or not isinstance(top_k, (int, float)) or not 0.0 < float(top_k) <= 1.0:
            raise ConfigError(f"top_k={top_k!r} must be a fraction in (0, 1] of the image's pixels.")
        self.top_k = float(top_k)
        self.tie_seed = int(tie_seed)

    def _score(self, attr: Tensor, mask: Tensor, size: torch.Size) -> Tensor:
        n = attr.shape[1]
        k = max(1, round(self.top_k * n))
        top = top_k_mask(attr, k, content_seeds(attr, self.tie_seed, mask))
        m = mask.flatten(1)
        inter = (top & m).sum(1).double()
        union = (top | m).sum(1).double()
        return inter / union


@register_metric("relevance_mass")
class RelevanceMass(_LocalisationMetric):
    """Relevance mass accuracy of Arras, Osman and Samek, "CLEVR-XAI", Information Fusion 2022.

    The share of the *positive* attribution that falls inside the mask: Σ relu(a)·m / Σ relu(a).
    NaN when a map has no positive attribution. Higher is better.
    """

    family = "localisation"
    measures = "share of positive relevance inside the object mask"

    paper: ClassVar[str] = "Arras, Osman & Samek, CLEVR-XAI, Information Fusion 2022"

    def _score(self, attr: Tensor, mask: Tensor, size: torch.Size) -> Tensor:
        pos = attr.clamp_min(0).double()
        total = pos.sum(1)
        inside = (pos * mask.flatten(1)).sum(1)
        return torch.where(total > 0, inside / total.clamp_min(math.ulp(0.0)), torch.full_like(total, float("nan")))
