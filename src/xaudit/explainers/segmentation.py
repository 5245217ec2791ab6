"""Superpixels for the surrogate (LIME, KernelSHAP) and region (XRAI) explainers, in torch.

Two segmentations, both label maps long [B,H,W] with labels 0..M_i−1 per image:

- ``"slic"``: SLIC (Achanta et al., 2012, "SLIC Superpixels Compared to State-of-the-Art
  Superpixel Methods") — k-means on (colour, position) started from a regular grid of centres,
  each centre searching only a 2S×2S window (S the grid step). Colours are the model's input
  channels divided by the image's standard deviation (no CIELAB: the explainer sees normalised
  tensors, not RGB), so ``compactness`` weighs one grid step against one standard deviation of
  colour. SLIC's final connectivity pass is left out: a superpixel may come in pieces, which LIME,
  KernelSHAP and XRAI do not mind.
- ``"grid"``: a regular grid of about ``n_segments`` rectangular cells (model-free, no tuning).

Each image is segmented on its own (same ops at every batch size), so a batch gives every image
exactly the labels it gets alone. scikit-image stays a test-only reference.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

from xaudit.explainers.base import ExplainerInputError, check_positive_int
from xaudit.utils.errors import ConfigError, unknown_choice

SEGMENTATIONS: tuple[str, ...] = ("slic", "grid")
# an out-of-window centre costs this much more than any in-window one (finite: argmin stays defined)
_OUTSIDE = 1e9


def _grid_shape(h: int, w: int, n_segments: int) -> tuple[int, int]:
    """Rows × columns of a grid of about ``n_segments`` square-ish cells on an H×W image."""
    rows = min(h, max(1, round(math.sqrt(n_segments * h / w))))
    cols = min(w, max(1, round(n_segments / rows)))
    return rows, cols


def grid_segments(b: int, h: int, w: int, n_segments: int, device: torch.device | str = "cpu") -> Tensor:
    """A regular grid of about ``n_segments`` cells, the same for each of ``b`` images: long [B,H,W]."""
    rows, cols = _grid_shape(h, w, n_segments)
    r = torch.arange(h, device=device) * rows // h
    c = torch.arange(w, device=device) * cols // w
    return (r[:, None] * cols + c[None, :]).expand(b, h, w).clone()


def _slic_one(img: Tensor, n_segments: int, compactness: float, iters: int) -> Tensor:
    """SLIC labels [H,W] for one image [C,H,W] (labels not yet contiguous)."""
    c, h, w = img.shape
    rows, cols = _grid_shape(h, w, n_segments)
    step = math.sqrt(h * w / (rows * cols))
    dtype = img.dtype if img.is_floating_point() else torch.float32
    colour = img.to(dtype).reshape(c, -1).t()  # [HW,C]
    colour = colour / colour.std().clamp_min(1e-12)
    yy, xx = torch.meshgrid(torch.arange(h, device=img.device, dtype=dtype),
                            torch.arange(w, device=img.device, dtype=dtype), indexing="ij")
    pos = torch.stack([yy.flatten(), xx.flatten()], 1)  # [HW,2]
    cy = (torch.arange(rows, device=img.device, dtype=dtype) + 0.5) * (h / rows)
    cx = (torch.arange(cols, device=img.device, dtype=dtype) + 0.5) * (w / cols)
    c_pos = torch.stack(torch.meshgrid(cy, cx, indexing="ij"), -1).reshape(-1, 2) - 0.5  # [K,2]
    # a centre's colour starts as the pixel under it
    near = (c_pos[:, 0].round().clamp(0, h - 1) * w + c_pos[:, 1].round().clamp(0, w - 1)).long()
    c_col = colour[near]
    spatial_weight = (float(compactness) / step) ** 2
    labels = torch.zeros(h * w, dtype=torch.long, device=img.device)
    for _ in range(iters):
        dpos = pos[None] - c_pos[:, None]  # [K,HW,2]
        d = (colour[None] - c_col[:, None]).pow(2).sum(-1) + spatial_weight * dpos.pow(2).sum(-1)
        outside = (dpos.abs() > step).any(-1)
        labels = torch.where(outside, d + _OUTSIDE, d).argmin(0)
        onehot = torch.zeros(c_pos.shape[0], h * w, device=img.device, dtype=dtype)
        onehot[labels, torch.arange(h * w, device=img.device)] = 1
        count = onehot.sum(1, keepdim=True)
        keep = count > 0  # an emptied cluster keeps its old centre
        safe = count.clamp_min(1)
        c_pos = torch.where(keep, onehot @ pos / safe, c_pos)
        c_col = torch.where(keep, onehot @ colour / safe, c_col)
    return labels.view(h, w)


def relabel(labels: Tensor) -> tuple[Tensor, list[int]]:
    """Labels [B,H,W] made contiguous 0..M_i−1 per image (order of first label value kept),
    and the region counts M_i."""
    out = torch.empty_like(labels, dtype=torch.long)
    counts = []
    for i in range(labels.shape[0]):
        uniq, inv = torch.unique(labels[i], return_inverse=True)
        out[i] = inv.view(labels.shape[1:])
        counts.append(int(uniq.numel()))
    return out, counts


def segment(x: Tensor, method: str = "slic", n_segments: int = 50, compactness: float = 1.0,
            iters: int = 10) -> Tensor:
    """Superpixel labels long [B,H,W] (contiguous 0..M_i−1 per image) for images ``x`` [B,C,H,W].

    ``method``: "slic" (k-means on colour and position) or "grid"; ``n_segments`` is the number
    of grid cells / initial SLIC centres (SLIC may return fewer when clusters empty).
    """
    if method not in SEGMENTATIONS:
        raise unknown_choice("segmentation", method, SEGMENTATIONS)
    n_segments = check_positive_int("n_segments", n_segments)
    if x.ndim != 4:
        raise ExplainerInputError(f"segment expects images [B,C,H,W]; got shape {tuple(x.shape)}.")
    b, _, h, w = x.shape
    if method == "grid":
        return grid_segments(b, h, w, n_segments, x.device)
    if float(compactness) < 0:
        raise ConfigError(f"compactness must be ≥0; got {compactness}.")
    iters = check_positive_int("iters", iters)
    with torch.no_grad():
        raw = torch.stack([_slic_one(x[i].detach(), n_segments, compactness, iters) for i in range(b)])
    return relabel(raw)[0]


def check_feature_mask(mask: object, x: Tensor) -> tuple[Tensor, list[int]]:
    """A caller's superpixel labels ([B,H,W] or [H,W], integer) as contiguous labels on ``x``'s
    device, with the region counts; errors name the problem and the fix."""
    if not isinstance(mask, Tensor):
        raise ExplainerInputError(f"feature_mask must be a long tensor [B,H,W]; got {type(mask).__name__}.")
    if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
        raise ExplainerInputError(
            f"feature_mask must hold integer superpixel labels (long [B,H,W]); got {mask.dtype}. "
            "Use mask.long() for label maps.")
    b, _, h, w = x.shape
    if mask.ndim == 2:
        mask = mask.expand(b, *mask.shape)
    if tuple(mask.shape) != (b, h, w):
        raise ExplainerInputError(
            f"feature_mask has shape {tuple(mask.shape)} but x {tuple(x.shape)} needs [B,H,W] = {(b, h, w)} "
            "(or one [H,W] map for the whole batch).")
    return relabel(mask.to(x.device))


def require_regions(counts: list[int], where: str) -> None:
    """Raise unless every image has ≥2 regions (one region leaves nothing to compare)."""
    single = [i for i, m in enumerate(counts) if m < 2]
    if single:
        raise ExplainerInputError(
            f"{where} has a single region in sample(s) {single[:10]}: an explanation over superpixels "
            "needs ≥2. Pass a feature_mask with several labels per image, or raise n_segments "
            "(constant images give SLIC nothing to split: use segmentation='grid').")
