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

from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path

import torch
from PIL import Image, ImageDraw, ImageFont

from xaudit.explainers.base import minmax_normalize
from xaudit.utils.io import atomic_write_bytes

#: colormap of unsigned maps (min-max normalised)
SEQUENTIAL_CMAP = "turbo"
#: colormap of signed maps (symmetric scale ±max|a|, 0 in the middle): blue < 0 < red, white at 0
DIVERGING_CMAP = "bwr"
#: outline colour of the ground-truth mask (RGB in [0, 1]): green, clear on both colormaps
MASK_OUTLINE = (0.0, 1.0, 0.0)
#: caption / border colour of misclassified rows
WRONG_COLOUR = (220, 20, 20)
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


def _mask_edges(masks: torch.Tensor, size: int) -> torch.Tensor:
    """[B,H,W] (or [B,1,H,W]) ground-truth masks → [B,size,size] bool outline (the mask's border pixels)."""
    m = masks.detach().float()
    if m.dim() == 4:
        m = m.amax(1)
    if m.dim() != 3:
        raise ValueError(f"masks must be [B,H,W] or [B,1,H,W], got shape {tuple(masks.shape)}.")
    m = torch.nn.functional.interpolate(m[:, None], size=(size, size), mode="nearest")
    m = (m > 0.5).float()
    eroded = 1.0 - torch.nn.functional.max_pool2d(1.0 - m, 3, stride=1, padding=1)
    return (m - eroded)[:, 0] > 0.5


def _per_row(name: str, values: Sequence[object] | torch.Tensor | None, b: int) -> list[object] | None:
    if values is None:
        return None
    out = values.tolist() if isinstance(values, torch.Tensor) else list(values)
    if len(out) != b:
        raise ValueError(f"{name} has {len(out)} entries for {b} rows (one per image).")
    return out


def _fit(draw: ImageDraw.ImageDraw, text: str, font: ImageFont.ImageFont, width: int) -> str:
    """``text`` shortened with "…" to fit ``width`` pixels (column titles of narrow cells)."""
    if draw.textlength(text, font=font) <= width:
        return text
    while text and draw.textlength(text + "…", font=font) > width:
        text = text[:-1]
    return text + "…"


def _layout(cells: Sequence[torch.Tensor], titles: Sequence[str], captions: Sequence[str], cell: int, *,
            masks: torch.Tensor | None = None, correct: Sequence[object] | None = None, title: str | None = None,
            colorbars: Sequence[tuple[str, bool] | None] | None = None) -> Image.Image:
    """Tile ``cells`` (each [B,3,H,W] in [0,1]) into rows × columns with titles, captions and the options of
    :func:`grid_image`."""
    b, ncol = cells[0].shape[0], len(cells)
    stacked = torch.stack([c.float() for c in cells], 1).flatten(0, 1)  # [B*ncol,3,H,W]
    stacked = torch.nn.functional.interpolate(stacked, size=(cell, cell), mode="nearest").view(b, ncol, 3, cell, cell)
    if masks is not None:
        edges = _mask_edges(masks.to(stacked.device), cell)[:, None, None].expand(-1, ncol, 3, -1, -1)
        colour = torch.tensor(MASK_OUTLINE, device=stacked.device).view(1, 1, 3, 1, 1).expand_as(stacked)
        stacked = torch.where(edges, colour, stacked)
    tiles = stacked.permute(0, 3, 1, 4, 2).reshape(b * cell, ncol * cell, 3)
    body = Image.fromarray((tiles.clamp(0, 1) * 255).round().byte().cpu().numpy())
    font = _font(12)
    left, pad = 170, 2
    head = 18 if title else 0
    top = head + 22
    bar_h = 30 if colorbars and any(colorbars) else 0
    need = int(ImageDraw.Draw(body).textlength(title, font=font)) + 2 * pad if title else 0
    canvas = Image.new("RGB", (max(left + body.width, need), top + body.height + bar_h), "white")
    canvas.paste(body, (left, top))
    draw = ImageDraw.Draw(canvas)
    if title:
        draw.text((pad, 3), title, fill="black", font=font)
    for j, name in enumerate(titles):
        draw.text((left + j * cell + pad, head + 4), _fit(draw, name, font, cell - 2 * pad), fill="black", font=font)
    for i, caption in enumerate(captions):
        wrong = correct is not None and not bool(correct[i])
        colour = WRONG_COLOUR if wrong else (0, 0, 0)
        text = caption + ("\nMISCLASSIFIED" if wrong else "")
        draw.multiline_text((pad, top + i * cell + pad), text, fill=colour, font=font)
        if wrong:  # a red frame around the whole row
            y0 = top + i * cell
            draw.rectangle((left, y0, left + body.width - 1, y0 + cell - 1), outline=WRONG_COLOUR, width=2)
    if bar_h:
        y0 = top + body.height + 4
        for j, spec in enumerate(colorbars or ()):
            if spec is None:
                continue
            cmap, signed = spec
            ramp = _lut(cmap, _SIGNED_LEVELS if signed else 256)
            gap = max(pad, cell // 16)  # keeps neighbouring bars and their labels apart
            span = cell - 2 * gap
            idx = torch.linspace(0, ramp.shape[0] - 1, span).round().long()
            strip = (ramp[idx][None].expand(10, -1, -1) * 255).round().byte().numpy()
            x0 = left + j * cell + gap
            canvas.paste(Image.fromarray(strip), (x0, y0))
            small = _font(10)
            low, high = ("-", "+") if signed else ("low", "high")
            draw.text((x0, y0 + 11), low, fill="black", font=small)
            draw.text((x0 + span - int(draw.textlength(high, font=small)), y0 + 11), high, fill="black", font=small)
            if signed:
                draw.text((x0 + span // 2 - int(draw.textlength("0", font=small)) // 2, y0 + 11), "0", fill="black",
                          font=small)
    return canvas


def grid_image(
    images: torch.Tensor,
    columns: Sequence[torch.Tensor],
    column_titles: Sequence[str],
    row_captions: Sequence[str],
    cell: int = 96,
    alpha: float = 0.5,
    signed: Sequence[bool] | None = None,
    *,
    title: str | None = None,
    explained: Sequence[str] | None = None,
    correct: Sequence[bool] | torch.Tensor | None = None,
    masks: torch.Tensor | None = None,
    colorbar: bool = False,
) -> Image.Image:
    """Rows = samples, columns = the image, then one overlay per map in ``columns``.

    ``images`` [B,C,H,W] in [0,1]; each entry of ``columns`` is [B,H,W]. Every row gets a
    caption on its left (e.g. true/pred label and probability), every column a title on top.
    ``signed``: per column, whether its maps are signed (diverging colormap centred on zero, see
    :func:`colorize`); None: all unsigned. Callers take it from
    :func:`xaudit.explainers.registry.is_signed` of each column's method.

    Options (all off by default): ``title`` a line above the grid (e.g. "epoch 3 — probe accuracy
    0.81"); ``explained`` per row, the class the maps explain (added to the caption as
    "explains: …"); ``correct`` per row, False marks a misclassified row (red caption and frame);
    ``masks`` [B,H,W] ground-truth masks, outlined in :data:`MASK_OUTLINE` on every tile of the row;
    ``colorbar`` a colour scale under each overlay column (low → high, or - → 0 → + if signed).
    """
    b = images.shape[0]
    flags = [False] * len(columns) if signed is None else [bool(f) for f in signed]
    if len(flags) != len(columns):
        raise ValueError(f"signed has {len(flags)} entries for {len(columns)} columns.")
    if len(row_captions) > b:
        raise ValueError(f"row_captions has {len(row_captions)} entries for {b} images.")
    explained_rows = _per_row("explained", explained, b)
    correct_rows = _per_row("correct", correct, b)
    if masks is not None and masks.shape[0] != b:
        raise ValueError(f"masks has {masks.shape[0]} entries for {b} images; pass one mask per image.")
    captions = list(row_captions)
    if explained_rows is not None:
        captions = [*captions, *[""] * (b - len(captions))]
        captions = [f"{c}\nexplains: {e}".lstrip("\n") for c, e in zip(captions, explained_rows)]
    rgb = images.float().expand(-1, 3, -1, -1) if images.shape[1] == 1 else images.float()
    cells = [rgb] + [overlay(rgb, m.to(rgb.device), alpha, signed=f) for m, f in zip(columns, flags)]
    bars = [None, *[(default_cmap(f), f) for f in flags]] if colorbar else None
    return _layout(cells, ["image", *column_titles], captions, cell, masks=masks, correct=correct_rows, title=title,
                   colorbars=bars)


def _save_png(image: Image.Image, path: str | Path) -> Path:
    import io

    buf = io.BytesIO()
    image.save(buf, format="PNG")
    atomic_write_bytes(path, buf.getvalue())
    return Path(path)


def example_overlays(images: torch.Tensor, maps_by_method: Mapping[str, torch.Tensor], path: str | Path,
                     captions: Sequence[str] | None = None, signed: Sequence[bool] | None = None,
                     masks: torch.Tensor | None = None, cell: int = 96) -> Path:
    """One PNG grid of example overlays for the evaluate report: rows = images ([B,C,H,W] in [0,1]),
    columns = the image then each method's map ([B,H,W]); signed methods keep their sign
    (:func:`~xaudit.explainers.registry.is_signed` of each name unless ``signed`` is given). The report
    embeds it when it is named ``examples.png`` in the mode directory."""
    from xaudit.explainers.registry import is_signed

    if not maps_by_method:
        raise ValueError("example_overlays needs at least one method's maps.")
    names = list(maps_by_method)
    flags = [is_signed(n) for n in names] if signed is None else list(signed)
    rows = list(captions) if captions is not None else [f"image {i}" for i in range(images.shape[0])]
    grid = grid_image(images, [maps_by_method[n] for n in names], names, rows, cell=cell, signed=flags,
                      masks=masks, colorbar=True)
    return _save_png(grid, path)


def masked_examples(images: torch.Tensor, keep_masks_by_fraction: Mapping[float, torch.Tensor], path: str | Path,
                    fill: torch.Tensor | Sequence[float] | None = None, captions: Sequence[str] | None = None,
                    mode: str = "roar", cell: int = 96) -> Path:
    """One PNG grid of what the retrained models see (ROAR/KAR report): rows = images ([B,C,H,W] in
    [0,1]), columns = the image then the image with the removed pixels set to ``fill`` for each
    fraction (``keep_masks_by_fraction``: fraction → [B,H,W] or [B,1,H,W] keep mask, True/1 = kept).
    ``fill``: the removed pixels' value per channel in image units (default: the images' channel
    mean, as ROAR's training-set mean fill looks). The report embeds it as ``examples.png``."""
    if not keep_masks_by_fraction:
        raise ValueError("masked_examples needs at least one fraction's keep masks.")
    x = images.float()
    b, c = x.shape[:2]
    value = (x.mean((0, 2, 3)) if fill is None else torch.as_tensor(fill, dtype=x.dtype, device=x.device))
    value = value.reshape(1, -1, 1, 1).expand(b, c, 1, 1)
    cells = [x]
    titles = ["image"]
    for fraction, keep in sorted(keep_masks_by_fraction.items()):
        k = keep.to(x.device).float()
        k = k[:, None] if k.dim() == 3 else k
        if k.shape[0] != b or k.shape[-2:] != x.shape[-2:]:
            raise ValueError(f"keep mask for {fraction:g} has shape {tuple(keep.shape)}; expected [{b},H,W] "
                             f"matching the images {tuple(x.shape)}.")
        cells.append(x * k + value * (1.0 - k))
        titles.append(f"{fraction:.0%} removed")
    rgb = [t.expand(-1, 3, -1, -1) if t.shape[1] == 1 else t for t in cells]
    rows = list(captions) if captions is not None else [f"image {i}" for i in range(b)]
    which = "least" if mode == "kar" else "most"
    title = f"{mode.upper()}: the {which} important pixels removed (set to the fill value)"
    return _save_png(_layout(rgb, titles, rows, cell, title=title), path)


def audit_examples(mode: str, mode_dir: str | Path, net: torch.nn.Module, split: object,
                   methods: Mapping[str, Mapping[str, object]], fractions: Sequence[float] = (), tie_seed: int = 0,
                   n: int = 4, class_names: Sequence[str] | None = None) -> Path | None:
    """Write the report's ``examples.png`` into ``mode_dir`` from the first ``n`` images of ``split``
    (a :class:`xaudit.roar.data.TensorSplit`): evaluate — each method's map over them (true class
    explained, ground-truth mask outlined when the split has masks); roar/kar — the inputs with
    each fraction removed by the first method that is not a control, as the retrained models see
    them. Runs on ``net``'s device; other modes write nothing (None). Call it on the writing rank
    before :func:`xaudit.reporting.report.write_report`, which embeds the file."""
    from xaudit.explainers.registry import create
    from xaudit.metrics.base import evaluating
    from xaudit.ops.masking import MODES, keep_mask

    if mode != "evaluate" and mode not in MODES:
        return None
    count = min(int(n), len(split))  # type: ignore[arg-type]
    if count == 0 or not methods:
        return None
    device = next(net.parameters()).device
    x = split.normalise(split.images[:count]).to(device)  # type: ignore[attr-defined]
    y = split.labels[:count].to(device)  # type: ignore[attr-defined]
    mean = torch.tensor(split.mean, device=device).view(1, -1, 1, 1)  # type: ignore[attr-defined]
    std = torch.tensor(split.std, device=device).view(1, -1, 1, 1)  # type: ignore[attr-defined]
    images = (x.float() * std + mean).clamp(0, 1)
    names = [class_names[int(c)] if class_names and int(c) < len(class_names) else str(int(c)) for c in y]
    captions = [f"true: {c}" for c in names]
    path = Path(mode_dir) / "examples.png"
    if mode == "evaluate":
        with evaluating(net, grad=True):
            maps = {name: create(name, net, **dict(kw)).attribute(x, y).detach() for name, kw in methods.items()}
        masks = split.masks[:count] if getattr(split, "masks", None) is not None else None  # type: ignore[attr-defined]
        return example_overlays(images, maps, path, captions=captions,
                                masks=None if masks is None else torch.as_tensor(masks))
    if not fractions:
        return None
    controls = ("random", "sobel")
    name = next((m for m in methods if m not in controls), next(iter(methods)))
    with evaluating(net, grad=True):
        attr = create(name, net, **dict(methods[name])).attribute(x, y).detach()
    keep = {float(f): keep_mask(attr, float(f), mode, tie_seed) for f in fractions}
    return masked_examples(images, keep, path, captions=[f"{c}\n{name}" for c in captions], mode=mode)
