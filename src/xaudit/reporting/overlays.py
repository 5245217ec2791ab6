"""Heat-map overlays and captioned grids, built as tensors (no per-pixel numpy, no figure).

Used by the monitoring callback every epoch and by audit reports, so it must be cheap: colour
mapping is one lookup-table gather on the device and text is drawn once with PIL.
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import lru_cache

import torch
from PIL import Image, ImageDraw, ImageFont

from xaudit.explainers.base import minmax_normalize


@lru_cache(maxsize=4)
def _lut(name: str) -> torch.Tensor:
    """A 256x3 colour lookup table from a matplotlib colormap (fetched once)."""
    from matplotlib import colormaps

    cmap = colormaps[name]
    return torch.tensor([cmap(i / 255.0)[:3] for i in range(256)], dtype=torch.float32)


def colorize(maps: torch.Tensor, cmap: str = "turbo") -> torch.Tensor:
    """[B,H,W] maps → [B,3,H,W] RGB in [0,1], each map min-max normalised on its own."""
    idx = (minmax_normalize(maps.detach().float()) * 255).round().long().clamp(0, 255)
    return _lut(cmap).to(maps.device)[idx].permute(0, 3, 1, 2)


def overlay(images: torch.Tensor, maps: torch.Tensor, alpha: float = 0.5, cmap: str = "turbo") -> torch.Tensor:
    """Blend coloured maps over images ([B,C,H,W] in [0,1], gray or RGB) → [B,3,H,W]."""
    if images.shape[1] == 1:
        images = images.expand(-1, 3, -1, -1)
    return (1 - alpha) * images.float() + alpha * colorize(maps, cmap)


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
) -> Image.Image:
    """Rows = samples, columns = the image, then one overlay per map in ``columns``.

    ``images`` [B,C,H,W] in [0,1]; each entry of ``columns`` is [B,H,W]. Every row gets a
    caption on its left (e.g. true/pred label and probability), every column a title on top.
    """
    b = images.shape[0]
    rgb = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
    cells = [rgb] + [overlay(rgb, m.to(rgb.device), alpha) for m in columns]
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
