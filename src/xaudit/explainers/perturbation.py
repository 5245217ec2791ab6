"""Perturbation methods: occlusion and RISE. Forward passes only, many perturbed images per call."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.explainers.base import Explainer, Target
from xaudit.explainers.registry import register
from xaudit.ops.fills import FillLike, check_fill, make_fill
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import positive_int


def _pair(name: str, v: int | tuple[int, int]) -> tuple[int, int]:
    if isinstance(v, int | float) and not isinstance(v, bool):
        v = (int(v), int(v))
    if not (isinstance(v, tuple | list) and len(v) == 2):
        raise ConfigError(f"{name} must be an int or a pair of ints; got {v!r}.")
    return positive_int(v[0], name), positive_int(v[1], name)


def _window_indicators(size: int, window: int, stride: int, device: torch.device, dtype: torch.dtype) -> Tensor:
    """[n, size] 0/1 rows: window i covers [i*stride, i*stride + window) (the last may be cut off).

    ``n = ceil((size - window) / stride) + 1`` so every pixel is covered, as Captum's Occlusion.
    """
    n = math.ceil((size - window) / stride) + 1
    start = torch.arange(n, device=device)[:, None] * stride
    pos = torch.arange(size, device=device)[None]
    return ((pos >= start) & (pos < start + window)).to(dtype)


@register("occlusion")
class Occlusion(Explainer):
    """Occlusion (Zeiler & Fergus, 2014): slide a ``window`` over the image with ``stride``,
    replace it by ``fill`` ("zero", "gray", "mean", "blur", a number or a tensor) in every
    channel, and credit each pixel with the mean drop of the target logit over the windows that
    cover it. Windows are batched: ``internal_batch_size`` images per forward.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        window: occluded patch size in px, an int or (height, width).
        stride: step between windows; None: half the window (at most the window).
        fill: what replaces the window: ``zero`` | ``gray`` | ``mean`` | ``blur`` | ``rise_blur``, a number or a tensor.
        blur_sigma: σ of the ``blur`` fill in px (None: its default for the image size).
        internal_batch_size: occluded images per forward.
    """

    signed = True

    def __init__(self, model: nn.Module, window: int | tuple[int, int] = 8,
                 stride: int | tuple[int, int] | None = None, fill: FillLike = "zero",
                 blur_sigma: float | None = None, internal_batch_size: int = 256) -> None:
        super().__init__(model)
        self.window = _pair("window", window)
        self.stride = _pair("stride", stride) if stride is not None else (
            max(1, self.window[0] // 2), max(1, self.window[1] // 2))
        if self.stride[0] > self.window[0] or self.stride[1] > self.window[1]:
            raise ConfigError(f"stride {self.stride} larger than window {self.window} would leave pixels unoccluded.")
        self.fill = check_fill(fill, "fill")
        self.blur_sigma = blur_sigma
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        b, _, h, w = x.shape
        if self.window[0] > h or self.window[1] > w:
            raise ConfigError(f"occlusion window {self.window} is larger than the image ({h}x{w}).")
        fill = make_fill(x, self.fill, self.blur_sigma)
        rows = _window_indicators(h, self.window[0], self.stride[0], x.device, x.dtype)  # [I,H]
        cols = _window_indicators(w, self.window[1], self.stride[1], x.device, x.dtype)  # [J,W]
        n_i, n_j = rows.shape[0], cols.shape[0]
        with torch.no_grad():
            base = target.select(self._logits(x))
            drops = torch.empty(n_i * n_j, b, device=x.device, dtype=x.dtype)
            per_call = max(1, self.internal_batch_size // b)
            for s in range(0, n_i * n_j, per_call):
                win = torch.arange(s, min(s + per_call, n_i * n_j), device=x.device)
                m = rows[win // n_j][:, :, None] * cols[win % n_j][:, None, :]  # [k,H,W]
                m = m[:, None, None]  # [k,1,1,H,W]
                occluded = (x[None] * (1 - m) + fill[None] * m).reshape(-1, *x.shape[1:])
                drops[s:s + len(win)] = base[None] - target.select(self._logits(occluded)).view(len(win), b)
        # attribution = Σ_windows drop·mask / Σ_windows mask, done separably: rowsᵀ · D · cols
        d = drops.view(n_i, n_j, b).permute(2, 0, 1)
        total = torch.einsum("ih,bij,jw->bhw", rows, d, cols)
        count = torch.einsum("ih,jw->hw", rows, cols)
        return total / count


@register("rise")
class RISE(Explainer):
    """RISE (Petsiuk et al., 2018, "Randomized Input Sampling for Explanation of Black-box Models").

    ``n_masks`` random binary grids (cell ``cell_size`` px, each cell kept with probability
    ``p``), bilinearly upsampled and randomly shifted; the map is Σ_i score_i · M_i / (N·p) with
    score the softmax probability (``score="prob"``) or logit of the target. Masks come from a
    local generator seeded by ``seed`` and are shared by the batch, so each image's map is
    independent of the others. ``internal_batch_size`` images per forward.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        n_masks: number of random masks N.
        cell_size: grid cell in px; None: ceil(max(H, W) / 7) (the paper's 7×7 grid).
        p: probability that a cell is kept.
        score: ``prob`` (softmax probability, the paper's) or ``logit``.
        seed: seeds the masks (a local generator).
        internal_batch_size: masked images per forward.
    """

    def __init__(self, model: nn.Module, n_masks: int = 1000, cell_size: int | None = None, p: float = 0.5,
                 score: str = "prob", seed: int = 0, internal_batch_size: int = 256) -> None:
        super().__init__(model)
        self.n_masks = positive_int(n_masks, "n_masks")
        self.cell_size = None if cell_size is None else positive_int(cell_size, "cell_size")
        if not 0.0 < float(p) <= 1.0:
            raise ConfigError(f"p (keep probability) must be in (0, 1]; got {p}.")
        self.p = float(p)
        if score not in ("prob", "logit"):
            raise unknown_choice("rise score", score, ("prob", "logit"))
        self.score = score
        self.seed = int(seed)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def masks(self, h: int, w: int, device: torch.device, dtype: torch.dtype) -> Tensor:
        """The ``n_masks`` masks [N,H,W] for an H×W image (same seed → same masks)."""
        cell = self.cell_size or math.ceil(max(h, w) / 7)  # the paper's 7×7 grid by default
        gh, gw = math.ceil(h / cell), math.ceil(w / cell)
        gen = torch.Generator(device=device).manual_seed(self.seed)
        grid = (torch.rand(self.n_masks, 1, gh, gw, generator=gen, device=device) < self.p).to(dtype)
        up = F.interpolate(grid, size=((gh + 1) * cell, (gw + 1) * cell), mode="bilinear", align_corners=False)[:, 0]
        dy = torch.randint(0, cell, (self.n_masks,), generator=gen, device=device)
        dx = torch.randint(0, cell, (self.n_masks,), generator=gen, device=device)
        r = (dy[:, None] + torch.arange(h, device=device))[:, :, None]
        c = (dx[:, None] + torch.arange(w, device=device))[:, None, :]
        # bilinear weights can overshoot 1 by an ulp
        return up[torch.arange(self.n_masks, device=device)[:, None, None], r, c].clamp_(0, 1)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        b, _, h, w = x.shape
        masks = self.masks(h, w, x.device, x.dtype)
        target.resolve(self._logits, x)
        sal = torch.zeros(b, h, w, device=x.device, dtype=x.dtype)
        per_call = max(1, self.internal_batch_size // b)
        with torch.no_grad():
            for s in range(0, self.n_masks, per_call):
                m = masks[s:s + per_call]
                k = m.shape[0]
                out = self._logits((x[None] * m[:, None, None]).reshape(k * b, *x.shape[1:]))
                if self.score == "prob":
                    out = out.softmax(-1)
                sc = target.select(out).view(k, b)
                sal += torch.einsum("kb,khw->bhw", sc, m)
        return sal / (self.n_masks * self.p)
