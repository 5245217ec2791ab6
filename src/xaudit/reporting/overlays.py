"""Heat-map overlays and captioned grids, built as tensors (no per-pixel numpy, no figure).

Used by the monitoring callback every epoch and by audit reports, so it must be cheap: colour
mapping is one lookup-table gather on the device and text is drawn once with PIL.

Signed maps (methods whose :attr:`~xaudit.explainers.base.Explainer.signed` is True, asked through
:func:`xaudit.explainers.registry.is_signed`) keep their sign: each map is divided by its largest
|value| and drawn with the diverging :data:`DIVERGING_CMAP` (0 ↦ the middle, white; negative
evidence blue, positive red). Unsigned maps are min-max normalised and drawn with the sequential
:data:`SEQUENTIAL_CMAP`.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont

from xaudit.explainers.base import minmax_normalize

#: colormap of unsigned maps (min-max normalised)
SEQUENTIAL_CMAP = "turbo"
#: colormap of signed maps (symmetric scale ±max|a|, 0 in the middle): blue < 0 < red, white at 0
DIVERGING_CMAP = "bwr"
#: signed maps use an odd-sized table, so 0 falls exactly on its middle entry
_SIGNED_LEVELS = 255


@lru_cache(maxsize=8)
def _lut(name: str, n: int = 256) -> torch.Tensor:
    """An ``n``x3 colour lookup table from a matplotlib colormap (fetched once)."""
    from matplotlib import colormaps

    cmap = colormaps[name] if n == 256 else colormaps[name].resampled(n)
    return torch.tensor([cmap(i / (n - 1))[:3] for i in range(n)], dtype=torch.float32)


def default_cmap(signed: bool) -> str:
    """:data:`DIVERGING_CMAP` for signed maps, :data:`SEQUENTIAL_CMAP` otherwise."""
    return DIVERGING_CMAP if signed else SEQUENTIAL_CMAP


def colorize(maps: torch.Tensor, cmap: str | None = None, signed: bool = False) -> torch.Tensor:
    """[B,H,W] maps → [B,3,H,W] RGB in [0,1], each map scaled on its own.

    Unsigned: min-max normalised onto the colormap (default :data:`SEQUENTIAL_CMAP`). Signed:
    divided by its largest |value|, so −max ↦ the low end, 0 ↦ the middle, +max ↦ the high end
    (default :data:`DIVERGING_CMAP`); an all-zero map is all middle.
    """
    m = maps.detach().float()
    name = cmap or default_cmap(signed)
    if signed:
        scale = m.flatten(1).abs().amax(1).clamp_min(torch.finfo(m.dtype).tiny)[:, None, None]
        mid = (_SIGNED_LEVELS - 1) / 2
        idx = (mid + mid * (m / scale)).round().long().clamp(0, _SIGNED_LEVELS - 1)
        return _lut(name, _SIGNED_LEVELS).to(maps.device)[idx].permute(0, 3, 1, 2)
    idx = (minmax_normalize(m) * 255).round().long().clamp(0, 255)
    return _lut(name).to(maps.device)[idx].permute(0, 3, 1, 2)


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5, cmap: str | None = None,
            signed: bool = False) -> torch.Tensor:
    """Blend coloured maps over images ([B,C,H,W] in [0,1], gray or RGB) → [B,3,H,W] (see :func:`colorize`)."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (1 - alpha) * images.float() + alpha * colorize(maps, cmap, signed)


def _font(size: int) -> ImageFont.ImageFont:
    try:
        return ImageFont.load_default(size=size)
    except TypeError:  # Pillow < 10.1 has no size argument
        return ImageFont.load_default()


def grid_image(
    images: torch.Tensor,
    columns: Sequence[torch.Tensor],
    column_titles: Sequence[str],
    row_captions: Sequence[str],
    cell: int = 96,
    alpha: float = 0.5,
    signed: Sequence[bool] | None = None,
) -> Image.Image:
    """Rows = samples, columns = the image, then one overlay per map in ``columns``.

    ``images`` [B,C,H,W] in [0,1]; each entry of ``columns`` is [B,H,W]. Every row gets a
    caption on its left (e.g. true/pred label and probability), every column a title on top.
    ``signed``: per column, whether its maps are signed (diverging colormap centred on zero, see
    :func:`colorize`); None: all unsigned. Callers take it from
    :func:`xaudit.explainers.registry.is_signed` of each column's method.
    """
    b = images.shape[0]
    flags = [False] * len(columns) if signed is None else [bool(f) for f in signed]
    if len(flags) != len(columns):
        raise ValueError(f"signed has {len(flags)} entries for {len(columns)} columns.")
    rgb = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
    cells = [rgb] + [overlay(rgb, m.to(rgb.device), alpha, signed=f) for m, f in zip(columns, flags)]
    stacked = torch.stack(cells, 1).flatten(0, 1)  # [B*(1+M),3,H,W]
    stacked = torch.nn.functional.interpolate(stacked, size=(cell, cell), mode="nearest")
    ncol = len(cells)
    tiles = stacked.view(b, ncol, 3, cell, cell).permute(0, 3, 1, 4, 2).reshape(b * cell, ncol * cell, 3)
    body = Image.fromarray((tiles.clamp(0, 1) * 255).round().byte().cpu().numpy())
    left, top, pad = 170, 22, 2
    canvas = Image.new("RGB", (left + body.width, top + body.height), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    font = _font(12)
    for j, title in enumerate(["image", *column_titles]):
        draw.text((left + j * cell + pad, 4), title, fill="black", font=font)
    for i, caption in enumerate(row_captions):
        draw.multiline_text((pad, top + i * cell + pad), caption, fill="black", font=font)
    return canvas
