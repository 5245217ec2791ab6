"""Quantus 0.6's localisation metrics that xaudit's :mod:`xaudit.metrics.localisation` lacks.

Mask-based, ``update(attr, mask)`` (``attr`` [B,H,W], ``mask`` bool [B,H,W]; empty mask → NaN):

- :class:`AttributionLocalisation` (Kohlbrenner et al., 2020) — share of the attribution inside the mask;
- :class:`AUC` (Fawcett, 2006) — ROC AUC of the map as a pixel classifier of the mask;
- :class:`RelevanceRankAccuracy` (Arras et al., 2021) — share of the top-|mask| pixels inside the mask;
- :class:`TopKIntersection` (Theiner et al., 2021) — share of the top-k pixels inside the mask.

Model-based, ``update(x, target, explainer)``:

- :class:`Focus` (Arias-Duart et al., 2022) — share of positive relevance on the target-class tiles
  of 2×2 mosaics built from the batch and explained by ``explainer``.

Preprocessing as Quantus (``normalise`` by max |a|, then ``abs``; each metric keeps Quantus'
defaults), but the max is per image, not over the batch (see :mod:`xaudit.metrics.complexity`).
Ties among attribution values (top-k rankings) are scored by their exact expectation over a
uniformly random tie-break instead of NumPy's unspecified argsort order; without ties this is
Quantus' value.
"""

from __future__ import annotations

import warnings
from typing import Any, ClassVar

import torch
from torch import Tensor

from xaudit.explainers.base import Explainer
from xaudit.metrics.base import (
    XAuditMetric,
    check_attribution,
    check_images,
    check_mask,
    check_target,
    evaluating,
)
from xaudit.metrics.complexity import prepare_maps
from xaudit.metrics.registry import register_metric
from xaudit.ops.seeds import image_seeds
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import flag, positive_int


class _MaskMetric(XAuditMetric):
    """``update(attr, mask)``; ``_score`` gets the preprocessed maps [B,N] (float64) and masks [B,N]."""

    update_inputs: ClassVar[tuple[str, ...]] = ("attr", "mask")
    higher_is_better: ClassVar[bool] = True
    family = "localisation"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "normalise divides by each map's own max |a| (Quantus: one max over the batch)",)

    def __init__(self, abs: bool = False, normalise: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.abs = flag(abs, "abs", "take |a| of the attributions")
        self.normalise = flag(normalise, "normalise", "divide each map by its max |a| first")

    def update(self, attr: Tensor, mask: Tensor | None) -> None:
        """Add the scores of one batch (``mask`` None → error: this metric needs masks)."""
        name = type(self).__name__
        check_attribution(attr, name)
        mask = check_mask(mask, attr, name).to(attr.device).flatten(1)
        scores = self._score(prepare_maps(attr, self.normalise, self.abs), mask)
        self._add_values(scores.masked_fill(~mask.any(1), float("nan")))

    def _score(self, a: Tensor, mask: Tensor) -> Tensor:
        raise NotImplementedError


def expected_top_hits(a: Tensor, mask: Tensor, k: Tensor) -> Tensor:
    """Expected number of mask pixels among the ``k`` [B] largest values of each row of ``a`` [B,N].

    Pixels tied with the k-th largest value share the remaining slots: the exact expectation over a
    uniformly random order among ties (equal to any order's count when there are no ties).
    """
    k = k.clamp(1, a.shape[1])
    kth = a.sort(dim=1, descending=True).values.gather(1, (k - 1).view(-1, 1))
    above, at = a > kth, a == kth
    slots = (k - above.sum(1)).to(a.dtype)
    at_in = (at & mask).sum(1).to(a.dtype)
    return (above & mask).sum(1).to(a.dtype) + slots * at_in / at.sum(1).to(a.dtype)


@register_metric("attribution_localisation")
class AttributionLocalisation(_MaskMetric):
    """Attribution localisation of Kohlbrenner et al., "Towards best practice in explaining neural
    network decisions with LRP", IJCNN 2020, as ``quantus.AttributionLocalisation``.

    Σ a·m / (Σ a + 1e-9) on the preprocessed map (defaults ``abs=True``, ``normalise=True``; with
    ``positive_attributions`` negative values are clipped to 0 first). A ratio above 1 (possible
    only with negative attributions) is NaN, as Quantus. ``weighted`` multiplies by the mask's share
    of the image, |m|/(H·W); Quantus divides by ``x_batch[2:].size`` instead — the size of the batch
    minus its first two images, a bug — so ``weighted`` deviates from Quantus (tested by hand).
    ``max_size``: warn when a mask covers more than this share of the image. Higher is better.
    """

    measures = "share of the attribution that falls inside the object mask"
    paper: ClassVar[str] = ("Kohlbrenner et al., Towards best practice in explaining neural network decisions with "
                            "LRP, IJCNN 2020")
    protocol_notes: ClassVar[tuple[str, ...]] = (
        *_MaskMetric.protocol_notes,
        "weighted: times |mask|/(H·W) (Quantus divides by the size of x_batch[2:], a bug)",
    )

    def __init__(self, weighted: bool = False, max_size: float = 1.0, positive_attributions: bool = False,
                 abs: bool = True, normalise: bool = True, **kwargs: Any) -> None:
        super().__init__(abs=abs, normalise=normalise, **kwargs)
        self.weighted = flag(weighted, "weighted", "multiply by the mask's share of the image")
        self.positive_attributions = flag(positive_attributions, "positive_attributions",
                                                "clip negative attributions to 0")
        if isinstance(max_size, bool) or not isinstance(max_size, int | float) or not 0.0 < max_size <= 1.0:
            raise ConfigError(f"max_size={max_size!r} must be a fraction in (0, 1] of the image (masks larger "
                              "than this share trigger a warning).")
        self.max_size = float(max_size)

    def _score(self, a: Tensor, mask: Tensor) -> Tensor:
        if self.positive_attributions:
            a = a.clamp_min(0)
        share = mask.sum(1).to(a.dtype) / mask.shape[1]
        if bool((share > self.max_size).any()):
            warnings.warn(f"AttributionLocalisation: a mask covers more than max_size={self.max_size} of the "
                          "image; the ratio is then uninformative.", stacklevel=3)
        ratio = (a * mask).sum(1) / (a.sum(1) + 1e-9)
        ratio = ratio.masked_fill(ratio > 1, float("nan"))
        return ratio * share if self.weighted else ratio


@register_metric("auc")
class AUC(_MaskMetric):
    """ROC AUC of the map as a score for the mask's pixels (Fawcett, "An introduction to ROC
    analysis", Pattern Recognition Letters 2006), as ``quantus.AUC`` (sklearn ``roc_curve`` + ``auc``).

    Computed exactly as the Mann–Whitney statistic with average ranks (ties count ½, which is
    what the ROC curve's trapezoids give). 0.5 is chance, 1 a perfect separation. Undefined (NaN)
    when the mask is empty or covers the whole image. Defaults ``abs=False``, ``normalise=True``.
    """

    measures = "ROC AUC of the attribution map against the object mask"
    paper: ClassVar[str] = "Fawcett, An introduction to ROC analysis, Pattern Recognition Letters 2006"

    def _score(self, a: Tensor, mask: Tensor) -> Tensor:
        ordered = a.sort(dim=1).values
        lo = torch.searchsorted(ordered, a.contiguous(), right=False)
        hi = torch.searchsorted(ordered, a.contiguous(), right=True)
        rank = (lo + hi + 1).to(torch.float64) / 2  # 1-based average rank
        pos = mask.sum(1).to(torch.float64)
        neg = mask.shape[1] - pos
        u = (rank * mask).sum(1) - pos * (pos + 1) / 2
        auc = u / (pos * neg)
        return auc.masked_fill(neg == 0, float("nan"))


@register_metric("relevance_rank_accuracy")
class RelevanceRankAccuracy(_MaskMetric):
    """Relevance rank accuracy of Arras, Osman & Samek, "CLEVR-XAI", Information Fusion 2022
    (arXiv 2021), as ``quantus.RelevanceRankAccuracy``: with K = |mask|, the share of the K
    highest-attributed pixels that lie in the mask. Defaults ``abs=False``, ``normalise=True``.
    Ties at the K-th value: expected share over a random tie-break. Higher is better.
    """

    measures = "share of the |mask| top-ranked pixels inside the object mask"
    paper: ClassVar[str] = "Arras, Osman & Samek, CLEVR-XAI, Information Fusion 2022"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        *_MaskMetric.protocol_notes, "ties at the K-th value: expectation over a random tie-break")

    def _score(self, a: Tensor, mask: Tensor) -> Tensor:
        k = mask.sum(1)
        return expected_top_hits(a, mask, k) / k.clamp_min(1).to(a.dtype)


#: Quantus' k=1000 pixels was set for 224×224 images; ``k=None`` keeps that share of the image
TOP_K_PIXELS_AT_224 = 1000


def top_k_pixels(height: int, width: int) -> int:
    """Quantus' k = 1000 at 224×224, scaled to H×W by area: max(1, round(1000·H·W/224²))."""
    return max(1, round(TOP_K_PIXELS_AT_224 * height * width / 224**2))


@register_metric("top_k_intersection")
class TopKIntersection(_MaskMetric):
    """Top-k intersection of Theiner, Müller-Budack & Ewerth, "Interpretable semantic photo geolocation",
    WACV 2022 (arXiv 2021), as ``quantus.TopKIntersection``: the share of the ``k`` highest-attributed
    pixels that lie in the mask; ``concept_influence`` divides it by the mask's share of the image.

    ``k=None`` (default) scales Quantus' k=1000 (at 224×224) by the image area (20 at 32×32); an
    explicit ``k`` must be below H·W (Quantus' check). Ties at the k-th value: expected share over a
    random tie-break. Defaults ``abs=False``, ``normalise=True``. Higher is better.
    """

    measures = "share of the top-k pixels inside the object mask"
    paper: ClassVar[str] = "Theiner, Müller-Budack & Ewerth, Interpretable semantic photo geolocation, WACV 2022"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        *_MaskMetric.protocol_notes, "ties at the k-th value: expectation over a random tie-break")

    def __init__(self, k: int | None = None, concept_influence: bool = False, abs: bool = False,
                 normalise: bool = True, **kwargs: Any) -> None:
        super().__init__(abs=abs, normalise=normalise, **kwargs)
        self.k = None if k is None else positive_int(k, "k")
        self.concept_influence = flag(concept_influence, "concept_influence",
                                            "divide by the mask's share of the image")

    def k_for(self, height: int, width: int) -> int:
        """The k used on H×W images: ``k``, or Quantus' 1000 at 224² scaled by area."""
        return top_k_pixels(height, width) if self.k is None else self.k

    def protocol_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """The hyper-parameters with k as run on ``size``."""
        return {**super().protocol_params(size), "k": self.k_for(*size)}

    def paper_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """Quantus' k = 1000 at 224², scaled by area."""
        return {"k": top_k_pixels(*size)}

    def update(self, attr: Tensor, mask: Tensor | None) -> None:
        """Add the scores of one batch; k must be below the number of pixels."""
        if isinstance(attr, Tensor) and attr.ndim == 3:
            k, n = self.k_for(*attr.shape[-2:]), attr.shape[-2] * attr.shape[-1]
            if k >= n:
                raise ConfigError(f"TopKIntersection: k={k} must be smaller than the {n} pixels of "
                                  f"{attr.shape[-2]}×{attr.shape[-1]} images; lower k (or use k=null for "
                                  "Quantus' 1000-at-224² share).")
            self._k_now = k
        super().update(attr, mask)

    def _score(self, a: Tensor, mask: Tensor) -> Tensor:
        k = self._k_now
        kk = torch.full((a.shape[0],), k, device=a.device, dtype=torch.long)
        tki = expected_top_hits(a, mask, kk) / k
        if self.concept_influence:
            tki = tki * mask.shape[1] / mask.sum(1).to(a.dtype)
        return tki


@register_metric("focus")
class Focus(XAuditMetric):
    """Focus of Arias-Duart et al., "Focus! Rating XAI methods and finding biases", FUZZ-IEEE 2022,
    as ``quantus.Focus``: the share of positive relevance that falls on the target-class tiles of a
    2×2 mosaic holding two images of the target class and two of other classes.

    ``update(x, target, explainer)`` (``update_inputs = ("x", "target", "explainer")``; the map on
    the single image is not used). Every image of the batch anchors one mosaic: its partner is
    another image of the same ``target`` class and the two others are distinct images of other
    classes, all drawn from the batch, and the four tiles are placed in a random order. The draws
    use a generator seeded by ``seed`` and the anchor image's bits, so a batch always gives the
    same mosaics; an anchor without a same-class partner or two other-class images in its batch
    is NaN. Mosaics are 2H×2W (full-size tiles, as the paper and Quantus' ``mosaic_creation``): the
    model must accept that size (global pooling). They are explained by ``explainer`` for the
    anchor's class in chunks of ``internal_batch_size``; the score is Σ relu(a)·tiles / (Σ relu(a) +
    1e-9), after Quantus' preprocessing (defaults ``abs=False``, ``normalise=True``). 0.5 is chance
    for a map that ignores the image content; higher is better.

    Because the mosaics are drawn from the batch, a sample's value depends on which images share
    its batch (as the paper's value depends on the mosaic dataset): compare methods on the same
    batches. xaudit's evaluation shards DDP ranks by whole batches, so values under DDP equal one
    device's.
    """

    update_inputs: ClassVar[tuple[str, ...]] = ("x", "target", "explainer")
    higher_is_better: ClassVar[bool] = True
    family = "localisation"
    measures = "share of positive relevance on the target-class tiles of 2×2 mosaics"
    paper: ClassVar[str] = "Arias-Duart et al., Focus! Rating XAI methods and finding biases, FUZZ-IEEE 2022"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "mosaics are drawn from each batch (one per image, as anchor), not from the whole dataset",
        "normalise divides by each map's own max |a| (Quantus: one max over the batch)",
    )

    def __init__(self, seed: int = 0, internal_batch_size: int = 64, abs: bool = False, normalise: bool = True,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.seed = int(seed)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.abs = flag(abs, "abs", "take |a| of the attributions")
        self.normalise = flag(normalise, "normalise", "divide each map by its max |a| first")

    def mosaics(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """The batch's mosaics [B,C,2H,2W], their target-tile flags [B,4] (top-left, top-right,
        bottom-left, bottom-right; Quantus' ``p_batch``) and which anchors have one [B] bool."""
        b = x.shape[0]
        t = target.to(x.device)
        same = (t[:, None] == t[None, :]) & ~torch.eye(b, dtype=torch.bool, device=x.device)
        other = t[:, None] != t[None, :]
        valid = same.any(1) & (other.sum(1) >= 2)
        tiles = torch.arange(b, device=x.device).repeat(4, 1).T.contiguous()  # [B,4] image indices
        flags = torch.zeros(b, 4, dtype=torch.bool, device=x.device)
        g = torch.Generator(device="cpu")
        for i, s in enumerate(image_seeds(x, self.seed)):
            if not bool(valid[i]):
                continue
            g.manual_seed(s)
            r = torch.rand(2, b, generator=g).to(x.device)  # random keys: smallest eligible = chosen
            partner = r[0].masked_fill(~same[i], 2.0).argmin()
            others = r[1].masked_fill(~other[i], 2.0).argsort()[:2]
            chosen = torch.stack([torch.tensor(i, device=x.device), partner, *others])
            order = torch.randperm(4, generator=g).to(x.device)
            tiles[i] = chosen[order]
            flags[i] = (order < 2)
        top = torch.cat([x[tiles[:, 0]], x[tiles[:, 1]]], dim=-1)
        bottom = torch.cat([x[tiles[:, 2]], x[tiles[:, 3]]], dim=-1)
        return torch.cat([top, bottom], dim=-2), flags, valid

    def score(self, attr: Tensor, flags: Tensor) -> Tensor:
        """Focus [B] of mosaic maps [B,2H,2W] given the target-tile flags [B,4]."""
        b, hh, ww = attr.shape
        h, w = hh // 2, ww // 2
        tiles = torch.zeros(b, hh, ww, dtype=torch.bool, device=attr.device)
        f = flags.to(attr.device)[:, :, None, None]
        tiles[:, :h, :w], tiles[:, :h, w:] = f[:, 0], f[:, 1]
        tiles[:, h:, :w], tiles[:, h:, w:] = f[:, 2], f[:, 3]
        a = prepare_maps(attr, self.normalise, self.abs).clamp_min(0)
        return (a * tiles.flatten(1)).sum(1) / (a.sum(1) + 1e-9)

    def update(self, x: Tensor, target: Tensor, explainer: Explainer) -> None:
        """Build the batch's mosaics, explain them with ``explainer`` and add their Focus."""
        name = type(self).__name__
        check_images(x, name)
        check_target(target, x.shape[0], name)
        if not isinstance(explainer, Explainer):
            raise ValueError(f"{name}.update needs an xaudit Explainer to explain the mosaics (it holds the model; "
                             f"e.g. create('saliency', model)); got {type(explainer).__name__}.")
        mosaic, flags, valid = self.mosaics(x, target)
        maps = []
        with evaluating(explainer.model, grad=True):
            for i in range(0, mosaic.shape[0], self.internal_batch_size):
                maps.append(explainer.attribute(mosaic[i:i + self.internal_batch_size],
                                                target[i:i + self.internal_batch_size]).float())
        attr = torch.cat(maps) if maps else mosaic.new_zeros(0, *mosaic.shape[-2:])
        check_attribution(attr, name, mosaic)
        scores = self.score(attr, flags).to(target.device)
        self._add_values(scores.masked_fill(~valid.to(target.device), float("nan")))
