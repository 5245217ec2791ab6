"""XRAI (Kapishnikov et al., 2019, "XRAI: Better Attributions Through Regions").

Integrated gradients (the :class:`~xaudit.explainers.gradient.IntegratedGradients` explainer)
from a black and a white baseline, averaged and reduced to one map by the maximum over
channels; the image is over-segmented at several scales (torch SLIC, see
:mod:`xaudit.explainers.segmentation`, in place of the paper's Felzenszwalb segmentations), each
region dilated; then regions are selected greedily, each time the one whose *not yet selected*
pixels have the highest mean attribution (the gain density of the paper), until the image is
covered. The returned map orders pixels by selection: the pixels a region adds at step t of T get
(T − t) / T, so earlier-selected regions get strictly higher values; pixels no region added get 0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.explainers.base import Explainer, Target
from xaudit.explainers.gradient import IntegratedGradients
from xaudit.explainers.registry import register
from xaudit.explainers.segmentation import segment
from xaudit.ops.fills import FILLS, FillLike, check_fill
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import positive_int

# the paper's baselines: the image's darkest and brightest value (its value range, per image)
EXTREMES: tuple[str, ...] = ("black", "white")


def _disk(radius: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    t = torch.arange(-radius, radius + 1, device=device, dtype=dtype)
    return ((t[:, None] ** 2 + t[None, :] ** 2) <= radius * radius).to(dtype)


def dilate(masks: Tensor, radius: int) -> Tensor:
    """Binary dilation of bool masks [R,H,W] by a disk of ``radius`` px (the paper dilates by 5 px
    at 224 px so regions include their edges)."""
    if radius <= 0 or masks.shape[0] == 0:
        return masks
    k = _disk(radius, masks.device, torch.float32)[None, None]
    return F.conv2d(masks[:, None].float(), k, padding=radius)[:, 0] > 0.5


def rank_regions(attr: Tensor, regions: Tensor, min_pixel_diff: int = 1,
                 area_threshold: float = 1.0) -> tuple[Tensor, Tensor]:
    """Greedy XRAI selection for one image: ``attr`` [H,W], candidate ``regions`` bool [R,H,W].

    Returns the step at which each pixel was added (long [H,W], −1 if never) and the gain density
    of each step [T]. A region that would add fewer than ``min_pixel_diff`` new pixels is dropped.
    """
    h, w = attr.shape
    a = attr.flatten().double()
    cand = regions.flatten(1)
    alive = torch.ones(cand.shape[0], dtype=torch.bool, device=attr.device)
    current = torch.zeros(h * w, dtype=torch.bool, device=attr.device)
    step = torch.full((h * w,), -1, dtype=torch.long, device=attr.device)
    gains: list[Tensor] = []
    while bool(alive.any()) and float(current.double().mean()) < area_threshold:
        new = cand & ~current
        count = new.sum(1)
        alive &= count >= min_pixel_diff
        if not bool(alive.any()):
            break
        density = (new.double() * a).sum(1) / count.clamp_min(1)
        best = int(torch.where(alive, density, -math.inf).argmax())
        added = new[best]
        step[added] = len(gains)
        gains.append(density[best])
        current |= added
        alive[best] = False
    return step.view(h, w), torch.stack(gains) if gains else attr.new_zeros(0, dtype=torch.float64)


@register("xrai")
class XRAI(Explainer):
    """XRAI region ranking (Kapishnikov et al., 2019) on top of integrated gradients.

    ``steps``/``method``/``internal_batch_size`` go to integrated gradients; ``baselines`` lists
    its baselines ("black"/"white" = the image's minimum/maximum value, as the paper, or any fill
    of :mod:`xaudit.ops.fills`). ``n_segments`` are the SLIC scales whose regions compete;
    ``dilation`` (px, default 5 px scaled from 224 px) and ``min_pixel_diff`` (default 50 px scaled
    from 224²) are the paper's; ``area_threshold`` stops once that fraction of the image is covered.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        steps: integrated-gradients path points.
        baselines: IG baselines: ``black``/``white`` (the image's min/max) or fills; the maps are averaged.
        n_segments: the SLIC scales (segments per scale) whose regions compete.
        compactness: SLIC's colour-vs-position weight.
        dilation: region dilation in px; None: 5 px at 224 px, scaled to the image.
        min_pixel_diff: fewest new pixels a region must add; None: 50 px at 224², scaled.
        area_threshold: stop once this fraction of the image is covered.
        method: integrated gradients' Riemann rule.
        internal_batch_size: path points per forward + backward.
    """

    def __init__(self, model: nn.Module, steps: int = 50, baselines: Sequence[FillLike] = EXTREMES,
                 n_segments: Sequence[int] = (8, 16, 32, 64), compactness: float = 1.0,
                 dilation: int | None = None, min_pixel_diff: int | None = None, area_threshold: float = 1.0,
                 method: str = "riemann_middle", internal_batch_size: int = 64) -> None:
        super().__init__(model)
        self.steps = positive_int(steps, "steps")
        if isinstance(baselines, str | Tensor) or not isinstance(baselines, Sequence) or not baselines:
            raise ConfigError(f"baselines must be a non-empty list, e.g. ['black', 'white']; got {baselines!r}.")
        for b in baselines:
            if not (isinstance(b, str) and b in EXTREMES):
                try:
                    check_fill(b, "baselines")
                except ConfigError as err:
                    raise ConfigError(f"{err} XRAI also accepts {list(EXTREMES)}; choices: "
                                      f"{[*EXTREMES, *FILLS]}.") from None
        self.baselines = list(baselines)
        if isinstance(n_segments, int):
            n_segments = (n_segments,)
        self.n_segments = tuple(positive_int(n, "n_segments", minimum=2) for n in n_segments)
        if not self.n_segments:
            raise ConfigError("n_segments must list at least one segmentation scale, e.g. [8, 16, 32, 64].")
        self.compactness = float(compactness)
        self.dilation = None if dilation is None else positive_int(dilation, "dilation", minimum=0)
        self.min_pixel_diff = None if min_pixel_diff is None else positive_int(min_pixel_diff, "min_pixel_diff")
        if not 0.0 < float(area_threshold) <= 1.0:
            raise ConfigError(f"area_threshold must be in (0, 1]; got {area_threshold}.")
        self.area_threshold = float(area_threshold)
        # validates steps/method/batch size once, here
        self._ig_kwargs = {"steps": self.steps, "method": method, "internal_batch_size": internal_batch_size}
        IntegratedGradients(model, **self._ig_kwargs)

    def base_attribution(self, x: Tensor, target: Target) -> Tensor:
        """Integrated gradients [B,H,W]: mean over the baselines, maximum over channels."""
        total = torch.zeros_like(x)
        flat = x.flatten(1)
        for b in self.baselines:
            if isinstance(b, str) and b in EXTREMES:
                value = flat.amin(1) if b == "black" else flat.amax(1)
                b = value.view(-1, 1, 1, 1)
            ig = IntegratedGradients(self.model, baseline=b, **self._ig_kwargs)
            total += ig._attribute(x, target)
        return (total / len(self.baselines)).amax(1)

    def regions(self, x: Tensor) -> list[Tensor]:
        """Candidate regions per image: bool [R_i,H,W], every SLIC scale's segments, dilated."""
        h, w = x.shape[-2:]
        radius = self.dilation if self.dilation is not None else round(5 * max(h, w) / 224)
        per_image: list[list[Tensor]] = [[] for _ in range(x.shape[0])]
        for n in self.n_segments:
            labels = segment(x, "slic", n, self.compactness)
            for i, lab in enumerate(labels):
                per_image[i].append(lab[None] == torch.arange(int(lab.max()) + 1, device=x.device)[:, None, None])
        return [dilate(torch.cat(r), radius) for r in per_image]

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        attr = self.base_attribution(x, target).detach()
        h, w = x.shape[-2:]
        min_diff = self.min_pixel_diff if self.min_pixel_diff is not None else max(1, round(50 * h * w / 224**2))
        out = torch.zeros_like(attr)
        for i, regions in enumerate(self.regions(x)):
            step, gains = rank_regions(attr[i], regions, min_diff, self.area_threshold)
            n = gains.shape[0]
            if n:
                out[i] = torch.where(step >= 0, (n - step).to(attr.dtype) / n, torch.zeros_like(attr[i]))
        return out
