"""``python audit.py audit=explain images=DIR``: explain your own images with a checkpoint.

Reads image files (a folder, searched recursively, or one file, or a list of either; any size and
any format PIL opens), resizes each to the checkpoint's image size and normalises it as in
training, and writes into ``<out_dir>/explain/``:

- ``predictions.csv``: per image its top-k classes and probabilities (and, with masks, the pointing
  game and the relevance mass of every method against the mask);
- ``overlays/<name>.png``: the image and one overlay per method (the top-1 class explained);
- ``contact_sheet.png``: every image (up to ``explain.sheet_max``) × every method;
- ``report.md`` / ``report.html``: the table and the sheet (and the files skipped: a file PIL cannot
  read is reported with a warning and skipped, the others are explained).

``explain.masks=DIR``: binary masks (any format; nonzero = object) named like the images (same file
stem, any extension), scored with the pointing game and the relevance mass.
"""

from __future__ import annotations

import csv
import html
import io
import warnings
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import Tensor, nn

from xaudit.audits.base import AuditContext, AuditMode
from xaudit.explainers import create
from xaudit.explainers.registry import is_signed
from xaudit.metrics import PointingGame, RelevanceMass
from xaudit.metrics.base import evaluating
from xaudit.reporting.overlays import grid_image
from xaudit.utils.config import log
from xaudit.utils.errors import ConfigError
from xaudit.utils.io import atomic_write_bytes, atomic_write_text

IMAGE_EXTENSIONS: tuple[str, ...] = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp", ".ppm",
                                     ".pgm")


class Explain(AuditMode):
    """The user's own images: predictions, overlays, a contact sheet (``conf/audit/explain.yaml``).

    No test split and no resumable cells: the cells are the table's rows (one per image, keyed
    ``explain|<file>``), and the result also holds ``images``, ``rows``, ``skipped`` and ``files``.
    """

    name = "explain"
    needs_test = False
    resumable = False

    def run(self, ctx: AuditContext) -> dict[str, dict[str, Any]]:
        """Predict and explain every image; the files are written here (rank 0)."""
        ctx.net.to(ctx.device)
        out = run_explain(ctx.cfg, ctx.net, ctx.datamodule, ctx.methods, ctx.mode_dir, ctx.device, ctx.batch_size,
                          ctx.is_writer)
        ctx.extra.update({k: v for k, v in out.items() if k not in ("mode", "mode_dir")})
        if ctx.is_writer:
            log.info("Explained %d images; table %s", out["images"], out["files"]["csv"])
        return {f"explain|{r['image']}": r for r in out["rows"]}

    def report(self, ctx: AuditContext, cells: list[dict[str, Any]]) -> dict[str, Path]:
        """Written by :meth:`run` already: its files by kind."""
        return {k: Path(v) for k, v in (ctx.extra.get("files") or {}).items()}


def image_files(spec: str | Sequence[str] | None, key: str = "images") -> list[Path]:
    """The image files named by ``spec``: a file, a folder (recursive, sorted) or a list of them."""
    if spec is None or (not isinstance(spec, str) and len(spec) == 0):
        raise ConfigError(f"{key} is not set: pass {key}=/path/to/folder (or a file, or [a.png,b.jpg]) with the "
                          "images to explain.")
    out: list[Path] = []
    for item in [spec] if isinstance(spec, str) else list(spec):
        path = Path(str(item)).expanduser()
        if path.is_dir():
            out += sorted(p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)
        elif path.is_file():
            out.append(path)
        else:
            raise FileNotFoundError(f"{key}: {path} does not exist; pass a folder of images, an image file or a list.")
    if not out:
        raise ConfigError(f"{key}={spec}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found.")
    return out


def load_images(paths: Sequence[Path], size: int, channels: int = 3) -> tuple[Tensor, list[Path], list[str]]:
    """(uint8 [N,C,size,size], the files read, one "file: reason" per file skipped): each file decoded
    by PIL, converted to RGB (or L), resized bilinearly; a file PIL cannot read is skipped with a
    warning, the others are still explained."""
    mode = "L" if channels == 1 else "RGB"
    out, kept, skipped = [], [], []
    for p in paths:
        try:
            with Image.open(p) as im:
                img = im.convert(mode).resize((size, size), Image.Resampling.BILINEAR)
        except OSError as err:
            skipped.append(f"{p}: {err}")
            warnings.warn(f"images: {p} could not be read as an image ({err}); skipped.", UserWarning, stacklevel=2)
            continue
        t = torch.frombuffer(bytearray(img.tobytes()), dtype=torch.uint8).view(size, size, len(mode))
        out.append(t.permute(2, 0, 1))
        kept.append(p)
    if not out:
        raise ConfigError(f"images: none of the {len(paths)} files could be read as an image ({skipped[:3]}).")
    return torch.stack(out), kept, skipped


def load_masks(mask_dir: str, paths: Sequence[Path], size: int) -> Tensor:
    """bool [N,size,size]: the mask whose file stem equals each image's (nonzero = object, nearest resize)."""
    folder = Path(mask_dir).expanduser()
    if not folder.is_dir():
        raise FileNotFoundError(f"explain.masks={folder} is not a folder; pass the folder of masks named like the "
                                "images (same stem), or explain.masks=null.")
    by_stem = {p.stem: p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS}
    missing = [p.name for p in paths if p.stem not in by_stem]
    if missing:
        raise FileNotFoundError(f"explain.masks: no mask named like {missing[:5]} in {folder} (a mask shares its "
                                "image's file stem, e.g. cat.png for cat.jpg).")
    out = []
    for p in paths:
        with Image.open(by_stem[p.stem]) as im:
            m = im.convert("L").resize((size, size), Image.Resampling.NEAREST)
        out.append(torch.frombuffer(bytearray(m.tobytes()), dtype=torch.uint8).view(size, size) > 0)
    return torch.stack(out)


def run_explain(cfg: Any, net: nn.Module, datamodule: Any, methods: dict[str, dict[str, Any]], mode_dir: Path,
                device: torch.device, batch_size: int, is_writer: bool = True) -> dict[str, Any]:
    """Predict and explain every image; write the table, overlays, contact sheet and report (rank 0)."""
    ex = cfg.get("explain") or {}
    size = int(datamodule.image_size)
    images, paths, skipped = load_images(image_files(cfg.get("images")), size, int(getattr(datamodule, "in_chans", 3)))
    masks = load_masks(str(ex["masks"]), paths, size) if ex.get("masks") else None
    top_k = min(int(ex.get("top_k", 5)), int(datamodule.num_classes))
    if top_k < 1:
        raise ConfigError(f"explain.top_k={ex.get('top_k')} must be at least 1.")
    mean = torch.tensor(datamodule.mean).view(1, -1, 1, 1)
    std = torch.tensor(datamodule.std).view(1, -1, 1, 1)
    names = list(getattr(datamodule, "class_names", [])) or [str(i) for i in range(int(datamodule.num_classes))]
    explainers = {m: create(m, net, **kw) for m, kw in methods.items()}
    probs, maps = [], {m: [] for m in methods}
    with evaluating(net, grad=True):
        for s in range(0, len(paths), batch_size):
            x = ((images[s:s + batch_size].float() / 255.0 - mean) / std).to(device)
            with torch.no_grad():
                p = net(x).float().softmax(1)
            probs.append(p.cpu())
            pred = p.argmax(1)
            for m, e in explainers.items():
                maps[m].append(e.attribute(x, pred).float().cpu())
    prob = torch.cat(probs)
    attr = {m: torch.cat(v) for m, v in maps.items()}
    top_p, top_c = prob.topk(top_k, dim=1)
    rows = []
    for i, p in enumerate(paths):
        row: dict[str, Any] = {"image": str(p), "prediction": names[int(top_c[i, 0])],
                               "probability": round(float(top_p[i, 0]), 6),
                               "top_k": "; ".join(f"{names[int(c)]} {float(q):.3f}"
                                                  for c, q in zip(top_c[i], top_p[i]))}
        rows.append(row)
    if masks is not None:
        for m, a in attr.items():
            pg, rm = PointingGame(), RelevanceMass()
            pg.update(a, masks)
            rm.update(a, masks)
            for i, (v1, v2) in enumerate(zip(pg.per_sample().tolist(), rm.per_sample().tolist())):
                rows[i][f"{m}/pointing_game"] = round(v1, 6)
                rows[i][f"{m}/mass_in_mask"] = round(v2, 6)
    out = {"mode": "explain", "mode_dir": str(mode_dir), "images": len(paths), "rows": rows, "skipped": skipped}
    if is_writer:
        out["files"] = _write(mode_dir, paths, images, attr, rows, names, top_c, top_p, masks, int(ex.get("cell", 128)),
                              int(ex.get("sheet_max", 64)), skipped)
    return out


def _write(d: Path, paths: Sequence[Path], images: Tensor, attr: dict[str, Tensor], rows: list[dict[str, Any]],
           names: Sequence[str], top_c: Tensor, top_p: Tensor, masks: Tensor | None, cell: int,
           sheet_max: int, skipped: Sequence[str]) -> dict[str, str]:
    methods = list(attr)
    signed = [is_signed(m) for m in methods]
    rgb = images.float() / 255.0
    captions = [f"{p.name}\n{names[int(top_c[i, 0])]} {float(top_p[i, 0]):.2f}" for i, p in enumerate(paths)]
    stems: dict[str, int] = {}
    for i, p in enumerate(paths):
        stem = p.stem if p.stem not in stems else f"{p.stem}_{i}"  # two folders may hold the same name
        stems[stem] = i
        img = grid_image(rgb[i:i + 1], [attr[m][i:i + 1] for m in methods], methods, [captions[i]], cell=cell,
                         signed=signed)
        atomic_write_bytes(d / "overlays" / f"{stem}.png", _png(img))
    n = min(len(paths), sheet_max)
    sheet = grid_image(rgb[:n], [attr[m][:n] for m in methods], methods, captions[:n], cell=min(cell, 96),
                       signed=signed)
    atomic_write_bytes(d / "contact_sheet.png", _png(sheet))
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(dict.fromkeys(k for r in rows for k in r)))
    writer.writeheader()
    writer.writerows(rows)
    atomic_write_text(d / "predictions.csv", buf.getvalue())
    cols = list(dict.fromkeys(k for r in rows for k in r))
    md = ["# xaudit explain report", "", f"{len(paths)} images; methods: {', '.join(methods)}; each method explains "
          "the top-1 class." + (" Masks: pointing game and relevance mass per method." if masks is not None else ""),
          "", "| " + " | ".join(cols) + " |", "|" + "---|" * len(cols),
          *["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows], "",
          f"![contact sheet (first {n} images)](contact_sheet.png)", "",
          *([f"Skipped (not readable as images): {len(skipped)}", "", *[f"- {k}" for k in skipped], ""] if skipped
            else [])]
    atomic_write_text(d / "report.md", "\n".join(md))
    table = "".join("<tr>" + "".join(f"<td>{html.escape(str(r.get(c, '')))}</td>" for c in cols) + "</tr>"
                    for r in rows)
    atomic_write_text(d / "report.html", "<!doctype html><html><head><meta charset='utf-8'><title>xaudit explain"
                      "</title></head><body><h1>xaudit explain report</h1><table><thead><tr>"
                      + "".join(f"<th>{html.escape(c)}</th>" for c in cols) + f"</tr></thead><tbody>{table}</tbody>"
                      "</table><img src='contact_sheet.png' alt='contact sheet'></body></html>\n")
    return {"csv": str(d / "predictions.csv"), "sheet": str(d / "contact_sheet.png"), "md": str(d / "report.md"),
            "overlays": str(d / "overlays")}


def _png(img: Image.Image) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return buf.getvalue()
