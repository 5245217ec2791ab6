"""Superpixels for the surrogate (LIME, KernelSHAP) and region (XRAI) explainers, in torch.

Three segmentations, all label maps long [B,H,W] with labels 0..M_i−1 per image:

- ``"quickshift"``: quick shift (Vedaldi & Soatto, 2008, "Quick Shift and Kernel Methods for Mode
  Seeking"), scikit-image's algorithm with the lime package's settings (kernel_size=4,
  max_dist=200, ratio=0.2) as LIME's default. Each image is first mapped to [0,1] by its own
  value range (one min and max over all channels: an affine map, so a per-dataset normalisation
  is undone up to the image's contrast), a grayscale image is repeated to RGB (lime's gray2rgb),
  and RGB goes to CIELAB (D65) with scikit-image's formulas before the density and parent search.
  The tie-breaking density noise is scikit-image's: ``numpy.random.default_rng(42)``, scale 1e-5,
  the same for every image. Images with other than 1 or 3 channels have no CIELAB: the error
  says to use "slic" or "grid". On images ≲ 3·kernel_size px every pixel sees every other and
  quick shift returns one region (the error says so).

- ``"slic"``: SLIC (Achanta et al., 2012, "SLIC Superpixels Compared to State-of-the-Art
  Superpixel Methods") — k-means on (colour, position) started from a regular grid of centres,
  each centre searching only a 2S×2S window (S the grid step). Colours are the model's input
  channels divided by the image's standard deviation (no CIELAB: the explainer sees normalised
  tensors, not RGB), so ``compactness`` weighs one grid step against one standard deviation of
  colour. SLIC's final connectivity pass is left out: a superpixel may come in pieces, which LIME,
  KernelSHAP and XRAI do not mind.
- ``"grid"``: a regular grid of about ``n_segments`` rectangular cells (model-free, no tuning).

Each image is segmented on its own (same ops at every batch size), so a batch gives every image
exactly the labels it gets alone. scikit-image stays a test-only reference (the quick shift
labels are tested equal to ``skimage.segmentation.quickshift`` on the same [0,1] image).
"""

from __future__ import annotations

import math

import numpy as np
import torch
from torch import Tensor

from xaudit.explainers.base import ExplainerInputError
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import positive_int

SEGMENTATIONS: tuple[str, ...] = ("quickshift", "slic", "grid")
#: the lime package's quick shift settings (``SegmentationAlgorithm('quickshift', kernel_size=4,
#: max_dist=200, ratio=0.2)`` in ``LimeImageExplainer.explain_instance``)
QUICKSHIFT_DEFAULTS: dict[str, float] = {"kernel_size": 4.0, "max_dist": 200.0, "ratio": 0.2}
#: scikit-image's default seed of the tie-breaking density noise (``quickshift(..., rng=42)``)
QUICKSHIFT_SEED = 42
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


# -- quick shift -------------------------------------------------------------------------------
# scikit-image's sRGB → XYZ matrix and the D65 / 2° white point (skimage.color.colorconv)
_XYZ_FROM_RGB = ((0.412453, 0.357580, 0.180423),
                 (0.212671, 0.715160, 0.072169),
                 (0.019334, 0.119193, 0.950227))
_D65_WHITE = (0.95047, 1.0, 1.08883)


def unit_range(x: Tensor) -> Tensor:
    """Each image of [B,C,H,W] mapped affinely to [0,1] by its own min and max over all channels
    (a constant image becomes 0): the value range lime's quick shift expects of an RGB image."""
    flat = x.flatten(1)
    lo = flat.amin(1).view(-1, 1, 1, 1)
    span = (flat.amax(1).view(-1, 1, 1, 1) - lo)
    return torch.where(span > 0, (x - lo) / torch.where(span > 0, span, torch.ones_like(span)),
                       torch.zeros_like(x))


def rgb_to_lab(rgb: Tensor) -> Tensor:
    """CIELAB (D65, 2° observer) of sRGB images [B,3,H,W] in [0,1], scikit-image's ``rgb2lab``."""
    lin = torch.where(rgb > 0.04045, ((rgb + 0.055) / 1.055).pow(2.4), rgb / 12.92)
    m = torch.tensor(_XYZ_FROM_RGB, dtype=rgb.dtype, device=rgb.device)
    xyz = torch.einsum("ij,bjhw->bihw", m, lin)
    xyz = xyz / torch.tensor(_D65_WHITE, dtype=rgb.dtype, device=rgb.device).view(1, 3, 1, 1)
    f = torch.where(xyz > 0.008856, xyz.clamp_min(0).pow(1 / 3), 7.787 * xyz + 16.0 / 116.0)
    fx, fy, fz = f[:, 0], f[:, 1], f[:, 2]
    return torch.stack([116.0 * fy - 16.0, 500.0 * (fx - fy), 200.0 * (fy - fz)], 1)


def _window(n: int, d: int) -> tuple[slice, slice] | None:
    """Rows (or columns) p with p + d inside [0,n), and those p + d; None when there are none."""
    lo, hi = max(0, -d), min(n, n - d)
    return (slice(lo, hi), slice(lo + d, hi + d)) if lo < hi else None


def _sq_dist(feat: Tensor, at: tuple[slice, slice], nb: tuple[slice, slice], dr: int, dc: int) -> Tensor:
    """Squared (feature, position) distance of each pixel to its neighbour at offset (dr, dc),
    summed in scikit-image's order (channels, then rows, then columns) for identical rounding."""
    diff = feat[:, :, at[0], at[1]] - feat[:, :, nb[0], nb[1]]
    d = diff[:, 0] * diff[:, 0]
    for ch in range(1, feat.shape[1]):
        d = d + diff[:, ch] * diff[:, ch]
    return d + float(dr * dr) + float(dc * dc)


def quickshift_segments(x: Tensor, kernel_size: float = QUICKSHIFT_DEFAULTS["kernel_size"],
                        max_dist: float = QUICKSHIFT_DEFAULTS["max_dist"],
                        ratio: float = QUICKSHIFT_DEFAULTS["ratio"]) -> Tensor:
    """Quick shift labels long [B,H,W] (contiguous per image) of images ``x`` [B,C,H,W], C ∈ {1,3}.

    scikit-image's ``quickshift(img, ratio, kernel_size, max_dist)`` (sigma=0, CIELAB, rng=42) on
    each image mapped to [0,1] by :func:`unit_range`, computed in float64: a Parzen density with a
    Gaussian of width ``kernel_size`` over a (2⌈3·kernel_size⌉+1)² window, each pixel linked to its
    nearest denser neighbour in the window (first in raster order on ties) unless that is farther
    than ``max_dist``, and the trees' roots give the segments.
    """
    if float(kernel_size) < 1:
        raise ConfigError(f"quickshift kernel_size must be ≥1 (scikit-image's limit); got {kernel_size}.")
    if float(max_dist) < 0 or float(ratio) < 0:
        raise ConfigError(f"quickshift max_dist and ratio must be ≥0; got max_dist={max_dist}, ratio={ratio}.")
    b, c, h, w = x.shape
    if c not in (1, 3):
        raise ExplainerInputError(
            f"quickshift segments RGB (or grayscale) images in CIELAB, as the lime package does; x has {c} "
            "channels. Use segmentation='slic' or 'grid', or pass a feature_mask.")
    img = unit_range(x.detach().to(torch.float64))
    if c == 1:
        img = img.expand(b, 3, h, w)  # lime's gray2rgb
    feat = rgb_to_lab(img) * float(ratio)
    kw = math.ceil(3 * float(kernel_size))
    inv = -0.5 / (float(kernel_size) * float(kernel_size))
    noise = np.random.default_rng(QUICKSHIFT_SEED).normal(scale=0.00001, size=(h, w))
    dens = torch.from_numpy(noise).to(feat.device).expand(b, h, w).clone()
    offsets = []
    for dr in range(-kw, kw + 1):
        for dc in range(-kw, kw + 1):
            rows, cols = _window(h, dr), _window(w, dc)
            if rows is not None and cols is not None:
                offsets.append((dr, dc, (rows[0], cols[0]), (rows[1], cols[1])))
    for dr, dc, at, nb in offsets:
        dens[:, at[0], at[1]] += torch.exp(_sq_dist(feat, at, nb, dr, dc) * inv)
    index = torch.arange(h * w, device=feat.device).view(1, h, w)
    parent = index.expand(b, h, w).clone()
    closest = torch.full((b, h, w), torch.finfo(torch.float64).max, dtype=torch.float64, device=feat.device)
    for dr, dc, at, nb in offsets:
        if dr == 0 and dc == 0:
            continue
        d = _sq_dist(feat, at, nb, dr, dc)
        better = (dens[:, nb[0], nb[1]] > dens[:, at[0], at[1]]) & (d < closest[:, at[0], at[1]])
        closest[:, at[0], at[1]] = torch.where(better, d, closest[:, at[0], at[1]])
        parent[:, at[0], at[1]] = torch.where(better, index[:, nb[0], nb[1]], parent[:, at[0], at[1]])
    parent = torch.where(closest.sqrt() > float(max_dist), index, parent).flatten(1)
    while True:  # point every pixel at its tree's root
        up = parent.gather(1, parent)
        if torch.equal(up, parent):
            break
        parent = up
    return relabel(parent.view(b, h, w))[0]


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
            iters: int = 10, *, kernel_size: float = QUICKSHIFT_DEFAULTS["kernel_size"],
            max_dist: float = QUICKSHIFT_DEFAULTS["max_dist"], ratio: float = QUICKSHIFT_DEFAULTS["ratio"]) -> Tensor:
    """Superpixel labels long [B,H,W] (contiguous 0..M_i−1 per image) for images ``x`` [B,C,H,W].

    ``method``: "slic" (k-means on colour and position), "grid", or "quickshift" (lime's default
    segmentation; ``kernel_size``, ``max_dist``, ``ratio`` are its parameters, see
    :func:`quickshift_segments`). ``n_segments`` is the number of grid cells / initial SLIC
    centres (SLIC may return fewer when clusters empty); quick shift finds its own count.
    """
    if method not in SEGMENTATIONS:
        raise unknown_choice("segmentation", method, SEGMENTATIONS)
    n_segments = positive_int(n_segments, "n_segments")
    if x.ndim != 4:
        raise ExplainerInputError(f"segment expects images [B,C,H,W]; got shape {tuple(x.shape)}.")
    b, _, h, w = x.shape
    if method == "grid":
        return grid_segments(b, h, w, n_segments, x.device)
    if method == "quickshift":
        with torch.no_grad():
            return quickshift_segments(x, kernel_size, max_dist, ratio)
    if float(compactness) < 0:
        raise ConfigError(f"compactness must be ≥0; got {compactness}.")
    iters = positive_int(iters, "iters")
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
            "(constant images give SLIC nothing to split: use segmentation='grid'; quickshift with "
            "kernel_size k merges images of ≲3k px into one region: use 'slic' or 'grid', or a smaller "
            "kernel_size).")
