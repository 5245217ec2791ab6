"""What a person reading a report relies on: one colour per method in every plot, ↑/↓ next to every
metric, ROAR's chance line on an untruncated 0..1 axis, a caption on every table, a settings table
in words, the example grids, the monitor grid's options and progress lines naming method and split.

Plots are checked on their matplotlib artists (the figure handed to ``save_figure``, which still
writes the PNG), not on pixels."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from matplotlib.colors import to_hex
from PIL import Image
from test_report_browser import _evaluate_cells, _roar_cells

import xaudit.reporting.report as rep
from xaudit.reporting.overlays import (
    MASK_OUTLINE,
    WRONG_COLOUR,
    example_overlays,
    grid_image,
    masked_examples,
)
from xaudit.utils.progress import SweepProgress


@pytest.fixture
def figures(monkeypatch: pytest.MonkeyPatch) -> list[Any]:
    """Every figure the report functions save (still written to disk by the real save_figure)."""
    seen: list[Any] = []
    real = rep.save_figure

    def keep(fig: Any, path: Path) -> Path:
        seen.append(fig)
        return real(fig, path)

    monkeypatch.setattr(rep, "save_figure", keep)
    return seen


def _colours(fig: Any) -> dict[str, str]:
    """legend label → colour hex of every method line / bar / errorbar of the figure's axes."""
    out: dict[str, str] = {}
    for ax in fig.axes:
        for cont in ax.containers:
            label = cont.get_label()
            if hasattr(cont, "patches") and cont.patches:  # bars
                out[label] = to_hex(cont.patches[0].get_facecolor())
            elif hasattr(cont, "lines"):  # errorbar
                out[label] = to_hex(cont.lines[0].get_color())
        for line in ax.lines:
            if not line.get_label().startswith("_") and line.get_gid() != "chance":
                out.setdefault(line.get_label(), to_hex(line.get_color()))
    return out


# -- colours ----------------------------------------------------------------------------------------------
def test_method_colours_are_stable_and_distinct() -> None:
    a = rep.method_colors(["grad_cam", "saliency", "random", "sobel"])
    b = rep.method_colors(["sobel", "saliency", "random", "grad_cam"])
    assert a == b, "independent of order"
    assert a["random"] == rep.CONTROL_COLOURS["random"] and a["sobel"] == rep.CONTROL_COLOURS["sobel"]
    assert len(set(a.values())) == 4
    many = rep.method_colors([f"m{i}" for i in range(12)])
    assert len(set(many.values())) == 12, "clashes move to a free slot"


def test_one_colour_per_method_across_the_plots(tmp_path: Path, figures: list[Any]) -> None:
    rep.write_report(tmp_path, "evaluate", _evaluate_cells(), {})
    scores, curves = figures
    bar, line = _colours(scores), _colours(curves)
    assert set(bar) == set(line) == {"grad_cam", "saliency", "random"}
    assert bar == line
    assert len(set(bar.values())) == 3
    want = rep.method_colors(["grad_cam", "saliency", "random"])
    assert bar == want
    rep.write_report(tmp_path / "roar", "roar", _roar_cells(), {})
    roar = _colours(figures[-1])
    assert roar["grad_cam"] == bar["grad_cam"] and roar["random"] == bar["random"]


# -- arrows, chance line, axes ------------------------------------------------------------------------------
def test_arrows_next_to_every_metric(tmp_path: Path, figures: list[Any]) -> None:
    paths = rep.write_report(tmp_path, "evaluate", _evaluate_cells(), {})
    ticks = [t.get_text() for t in figures[0].axes[0].get_xticklabels()]
    assert ticks == ["deletion ↓", "insertion ↑", "pointing_game ↑"]
    assert [ax.get_title() for ax in figures[1].axes] == ["deletion curve (area ↓)", "insertion curve (area ↑)"]
    md = paths["md"].read_text()
    assert "| method | deletion ↓ | insertion ↑ | pointing_game ↑ | images |" in md
    assert "| method | deletion ↓ | insertion ↑ |" in md  # the faithfulness section
    rep.write_report(tmp_path / "roar", "roar", _roar_cells(), {})
    assert "↓ lower = better explanation" in figures[-1].axes[0].get_ylabel()
    rep.write_report(tmp_path / "kar", "kar", [{**c, "mode": "kar"} for c in _roar_cells()], {})
    assert "↑ higher = better explanation" in figures[-1].axes[0].get_ylabel()


def test_roar_chance_line_and_full_accuracy_axis(tmp_path: Path, figures: list[Any]) -> None:
    rep.write_report(tmp_path / "a", "roar", _roar_cells(), {"num_classes": 4})
    ax = figures[-1].axes[0]
    chance = [ln for ln in ax.lines if ln.get_gid() == "chance"]
    assert len(chance) == 1 and list(chance[0].get_ydata()) == [0.25, 0.25]
    assert "chance (1/4 = 0.25)" in [t.get_text() for t in ax.get_legend().get_texts()]
    low, high = ax.get_ylim()
    assert low == 0.0 and high >= 1.0, "accuracy axis is not truncated"
    cells = [{**c, "num_classes": 10} for c in _roar_cells()]  # a cell may carry it instead
    rep.write_report(tmp_path / "b", "roar", cells, {})
    assert [ln.get_ydata()[0] for ln in figures[-1].axes[0].lines if ln.get_gid() == "chance"] == [0.1]
    rep.write_report(tmp_path / "c", "roar", _roar_cells(), {})
    assert not [ln for ln in figures[-1].axes[0].lines if ln.get_gid() == "chance"], "unknown: no chance line"


# -- tables ---------------------------------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["evaluate", "roar"])
def test_every_table_has_a_caption_and_the_settings_are_in_words(tmp_path: Path, mode: str) -> None:
    cells = _evaluate_cells() if mode == "evaluate" else _roar_cells()
    meta = {"checkpoint": "/runs/last.ckpt", "data": "xaudit.data.synthetic.ShapesDataModule", "target": "label",
            "methods": "grad_cam, random", "cells": len(cells)}
    paths = rep.write_report(tmp_path, mode, cells, meta)
    page = paths["html"].read_text()
    tables = re.findall(r"<table.*?</table>", page, re.S)
    assert len(tables) == (4 if mode == "evaluate" else 2)  # settings, results (+ 2 family sections)
    for t in tables:
        cap = re.search(r"<caption>(.+?)</caption>", t)
        assert cap and len(cap.group(1)) > 20, t[:200]
    settings = tables[0]
    assert "<thead>" not in settings and "<th></th>" not in settings, "no empty header row"
    assert "<th scope='row'>Dataset</th><td>ShapesDataModule</td>" in settings
    assert "<th scope='row'>Class explained</th><td>true class</td>" in settings
    assert "xaudit.data" not in settings and ">target<" not in settings and ">data<" not in settings
    md = paths["md"].read_text()
    assert "|  |  |" not in md and "| Setting | Value |" in md and "| Dataset | ShapesDataModule |" in md
    lines = md.splitlines()
    for i, line in enumerate(lines):  # every table's header row follows an italic caption and a blank line
        if line.startswith("|") and (i == 0 or not lines[i - 1].startswith("|")):
            assert lines[i - 2].startswith("*") and lines[i - 2].endswith("*"), line
    if mode == "roar":
        assert "Test accuracy ↓ of models retrained" in md and "over 2 seeds" in md


def test_examples_png_is_embedded_when_present(tmp_path: Path) -> None:
    assert "examples.png" not in rep.write_report(tmp_path, "roar", _roar_cells(), {})["html"].read_text()
    images = torch.rand(2, 1, 8, 8)
    masked_examples(images, {0.5: torch.rand(2, 8, 8) > 0.5}, tmp_path / rep.EXAMPLES_FILE)
    page = rep.write_report(tmp_path, "roar", _roar_cells(), {})["html"].read_text()
    assert "<h3>Masked inputs the retrained models see</h3><img src='examples.png'" in page


# -- example grids ---------------------------------------------------------------------------------------
def test_masked_examples_show_the_fill_where_removed(tmp_path: Path) -> None:
    images = torch.full((2, 3, 8, 8), 0.9)
    keep = torch.ones(2, 8, 8, dtype=torch.bool)
    keep[:, :4] = False  # top half removed
    path = masked_examples(images, {0.5: keep}, tmp_path / "m.png", fill=[0.0, 0.0, 0.0], cell=8)
    img = np.asarray(Image.open(path).convert("RGB"))
    # layout: 170 px captions, 18 px title + 22 px column titles; columns: image, 50 % removed
    tile = img[40:48, 170 + 8:170 + 16]
    assert (tile[:4] == 0).all() and (tile[4:] == round(0.9 * 255)).all()
    with pytest.raises(ValueError, match=r"keep mask for 0\.5"):
        masked_examples(images, {0.5: keep[:1]}, tmp_path / "x.png")


def test_example_overlays_one_column_per_method(tmp_path: Path) -> None:
    maps = {"grad_cam": torch.rand(2, 8, 8), "integrated_gradients": torch.randn(2, 8, 8)}
    path = example_overlays(torch.rand(2, 3, 8, 8), maps, tmp_path / "e.png", cell=16)
    width, height = Image.open(path).size
    assert width == 170 + 3 * 16 and height == 22 + 2 * 16 + 30  # + the colour bars


# -- the monitor grid's options ------------------------------------------------------------------------------
def _grid(**kw: Any) -> np.ndarray:
    images = torch.full((2, 3, 16, 16), 0.5)
    maps = torch.zeros(2, 16, 16)
    return np.asarray(grid_image(images, [maps], ["grad_cam"], ["true: 0", "true: 1"], cell=16, **kw))


def test_grid_defaults_keep_the_old_layout() -> None:
    assert _grid().shape == (22 + 2 * 16, 170 + 2 * 16, 3)


def test_grid_mask_outline_is_drawn() -> None:
    mask = torch.zeros(2, 16, 16)
    mask[:, 4:12, 4:12] = 1
    img = _grid(masks=mask)
    green = np.array([round(255 * v) for v in MASK_OUTLINE])
    tile = img[22:38, 170:186]  # row 0, the image column
    assert (tile[4, 4:12] == green).all() and (tile[4:12, 4] == green).all(), "border pixels"
    assert not (tile[8, 8] == green).all() and not (tile[0, 0] == green).all(), "inside and outside untouched"
    assert (img[22:38, 186:202][4, 4:12] == green).all(), "outlined on the overlay too"
    with pytest.raises(ValueError, match="one mask per image"):
        _grid(masks=mask[:1])


def test_grid_marks_misclassified_rows_names_classes_and_titles() -> None:
    plain = _grid()
    marked = _grid(correct=[True, False])
    red = (marked == np.array(WRONG_COLOUR)).all(-1)
    assert red[38:54].any() and not red[22:38].any(), "only the misclassified row is red"
    assert not (plain == np.array(WRONG_COLOUR)).all(-1).any()
    assert not np.array_equal(_grid(explained=["circle", "square"]), plain)
    titled = _grid(title="epoch 3 — probe accuracy 0.50")
    assert titled.shape[0] == plain.shape[0] + 18 and (titled[:18] != 255).any()
    bars = _grid(colorbar=True)
    assert bars.shape[0] == plain.shape[0] + 30 and (bars[-30:] != 255).any()
    with pytest.raises(ValueError, match="correct has 1 entries for 2 rows"):
        _grid(correct=[True])


# -- progress ----------------------------------------------------------------------------------------------
def test_progress_lines_name_method_and_split(capsys: pytest.CaptureFixture[str]) -> None:
    progress = SweepProgress(2, 0, "evaluate", split="test (32 images)")
    progress.start("grad_cam")
    progress.advance("grad_cam", "deletion 0.210", 1.0)
    progress.advance("random", "deletion 0.400", 1.0, split="train")
    err = capsys.readouterr().err
    assert "[1/2] computing grad_cam on test (32 images) …" in err
    assert "[1/2] grad_cam on test (32 images) — deletion 0.210" in err
    assert "[2/2] random on train — deletion 0.400" in err
    SweepProgress(1, 0, "old style").advance("saliency", "ok", 0.5)  # callers that name no split
    assert "[1/1] saliency — ok" in capsys.readouterr().err


def test_audit_examples_writes_the_grid_each_report_embeds(tmp_path: Path) -> None:
    from xaudit.reporting.overlays import audit_examples
    from xaudit.roar.data import TensorSplit

    torch.manual_seed(0)
    net = torch.nn.Sequential(torch.nn.Conv2d(3, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.AdaptiveAvgPool2d(1),
                              torch.nn.Flatten(), torch.nn.Linear(4, 3))
    masks = torch.zeros(5, 16, 16)
    masks[:, 4:12, 4:12] = 1
    split = TensorSplit(torch.randint(0, 256, (5, 3, 16, 16), dtype=torch.uint8), torch.tensor([0, 1, 2, 0, 1]),
                        (0.5, 0.5, 0.5), (0.25, 0.25, 0.25), masks)
    methods = {"saliency": {}, "random": {}}
    ev = audit_examples("evaluate", tmp_path / "evaluate", net, split, methods, n=3, class_names=["a", "b", "c"])
    assert ev is not None and Image.open(ev).size == (170 + 3 * 96, 22 + 3 * 96 + 30)
    roar = audit_examples("roar", tmp_path / "roar", net, split, methods, fractions=[0.3, 0.7], n=2)
    assert roar is not None and Image.open(roar).size[1] == 18 + 22 + 2 * 96
    assert audit_examples("sanity", tmp_path, net, split, methods) is None
    assert not any(p.requires_grad is False for p in net.parameters()), "the model is left as it was"
