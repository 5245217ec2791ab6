"""The reports as a reader's browser shows them: headless Chromium loads report.html, every <img>
decodes (naturalWidth > 0) and every link to a local file points at a file that exists; the
screenshot helper writes a PNG of the window size. Skipped where no Chromium is installed."""

from __future__ import annotations

import struct
from pathlib import Path
from typing import Any
from urllib.parse import unquote, urlparse

import pytest
import torch

from xaudit.reporting.overlays import example_overlays, masked_examples
from xaudit.reporting.report import EXAMPLES_FILE, write_report
from xaudit.reporting.screenshot import check_images, find_browser, screenshot

pytestmark = pytest.mark.skipif(find_browser() is None,
                                reason="no chromium / chromium-browser / google-chrome on PATH "
                                       "(apt-get install chromium to run the browser checks)")


def _evaluate_cells() -> list[dict[str, Any]]:
    fam = {"deletion": "faithfulness", "insertion": "faithfulness", "pointing_game": "localisation"}
    hib = {"deletion": False, "insertion": True, "pointing_game": True}
    cells: list[dict[str, Any]] = [{"cell": "evaluate|model", "mode": "evaluate", "method": "model",
                                    "method_key": "model", "test_acc": 0.95, "count": 32}]
    for i, m in enumerate(("grad_cam", "saliency", "random")):
        cells.append({"cell": f"evaluate|{m}", "mode": "evaluate", "method": m, "method_key": m, "count": 32,
                      "metrics": {"deletion": 0.2 + 0.1 * i, "insertion": 0.7 - 0.1 * i,
                                  "pointing_game": 0.9 - 0.3 * i},
                      "metrics_se": {"deletion": 0.01, "insertion": 0.01, "pointing_game": 0.05},
                      "families": fam, "higher_is_better": hib,
                      "curves": {"deletion": [1.0, 0.5 + 0.1 * i, 0.2], "insertion": [0.1, 0.5 - 0.1 * i, 0.9]}})
    return cells


def _roar_cells() -> list[dict[str, Any]]:
    acc = {("baseline", 0.0): (0.96, 0.97), ("grad_cam", 0.5): (0.40, 0.44), ("random", 0.5): (0.84, 0.88)}
    return [{"cell": f"roar|{m}|{f:g}|{s}", "mode": "roar", "method": m, "method_key": m, "fraction": f, "seed": s,
             "test_acc": v, "test_count": 64} for (m, f), vals in acc.items() for s, v in enumerate(vals)]


def _write_reports(root: Path) -> dict[str, Path]:
    """An evaluate and a ROAR report, each with its examples.png, as the audit writes them."""
    g = torch.Generator().manual_seed(0)
    images = torch.rand(3, 3, 16, 16, generator=g)
    maps = {m: torch.rand(3, 16, 16, generator=g) for m in ("grad_cam", "saliency", "random")}
    example_overlays(images, maps, root / "evaluate" / EXAMPLES_FILE, masks=torch.rand(3, 16, 16, generator=g) > 0.5)
    masked_examples(images, {0.5: torch.rand(3, 16, 16, generator=g) > 0.5}, root / "roar" / EXAMPLES_FILE)
    meta = {"checkpoint": "/runs/last.ckpt", "data": "xaudit.data.synthetic.ShapesDataModule", "target": "label",
            "num_classes": 4}
    return {"evaluate": write_report(root / "evaluate", "evaluate", _evaluate_cells(), meta)["html"],
            "roar": write_report(root / "roar", "roar", _roar_cells(), meta)["html"]}


def _local(href: str, base: Path) -> Path | None:
    """The file a relative or file:// link points at; None for web links and in-page anchors."""
    url = urlparse(href)
    if url.scheme in ("http", "https", "mailto", "data") or href.startswith("#"):
        return None
    return Path(unquote(url.path)) if url.scheme == "file" else base / unquote(url.path)


@pytest.mark.parametrize("mode", ["evaluate", "roar"])
def test_every_image_loads_and_no_local_link_is_broken(tmp_path: Path, mode: str) -> None:
    report = _write_reports(tmp_path)[mode]
    seen = check_images(report)
    images = seen["images"]
    assert isinstance(images, list) and seen["title"] == f"xaudit {mode}"
    srcs = [i["src"] for i in images]
    assert EXAMPLES_FILE in srcs, "the examples.png of the mode directory is embedded"
    assert len(srcs) == (3 if mode == "evaluate" else 2), srcs  # scores + curves + examples / accuracy + examples
    for img in images:
        assert img["natural_width"] > 0 and img["natural_height"] > 0, f"{img['src']} did not load in the browser"
        target = _local(img["src"], report.parent)
        assert target is not None and target.is_file(), img["src"]
    for href in seen["links"]:
        target = _local(href, report.parent)
        assert target is None or target.exists(), f"broken local link {href}"
    assert not list(report.parent.glob(".xaudit_check_*")), "the checker page is removed"


def test_the_check_sees_a_broken_image(tmp_path: Path) -> None:
    page = tmp_path / "report.html"
    page.write_text("<!doctype html><title>t</title><img src='missing.png'><a href='gone.csv'>x</a>")
    seen = check_images(page)
    assert seen["images"] == [{"src": "missing.png", "natural_width": 0, "natural_height": 0}]
    assert seen["links"] == ["gone.csv"] and not (tmp_path / "gone.csv").exists()


def test_screenshot_writes_a_png_of_the_window_size(tmp_path: Path) -> None:
    report = _write_reports(tmp_path)["roar"]
    out = screenshot(report, tmp_path / "shots" / "roar.png", width=640, height=480, trim=False)
    head = out.read_bytes()[:24]
    assert head[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", head[16:24]) == (640, 480)
    tall = screenshot(report, tmp_path / "shots" / "tall.png", width=640, height=4000)  # trimmed to the content
    width, height = struct.unpack(">II", tall.read_bytes()[16:24])
    assert width == 640 and 480 < height < 4000
    with pytest.raises(FileNotFoundError, match="write the report first"):
        screenshot(tmp_path / "nope.html", tmp_path / "x.png")
