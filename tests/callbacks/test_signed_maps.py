"""Signed maps in the monitor's grid: a method whose sign means something (gradient × input) is
drawn with the diverging colormap centred on zero, an unsigned one (saliency) with the sequential
one. Checked on the PNG the monitor writes, read back pixel by pixel."""

from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch
from PIL import Image
from torch import nn

from xaudit.callbacks import ExplanationMonitor
from xaudit.reporting.overlays import DIVERGING_CMAP, SEQUENTIAL_CMAP, _lut

H, W = 8, 12
#: weights of class 0 per image column: positive evidence left, none in the middle, negative right
POS, ZERO, NEG = slice(0, 4), slice(4, 8), slice(8, 12)


def linear_model() -> nn.Module:
    weight = torch.zeros(2, 1, H, W)
    weight[0, :, :, POS] = 0.5
    weight[0, :, :, NEG] = -2.0
    model = nn.Sequential(nn.Flatten(), nn.Linear(H * W, 2, bias=False))
    with torch.no_grad():
        model[1].weight.copy_(weight.flatten(1))
    return model.eval()


def test_monitor_png_shows_negative_evidence_on_the_negative_side_of_a_diverging_map(tmp_path: Path) -> None:
    """On x = 1 the class-0 gradient × input is the weight: +0.5 | 0 | −2 by column. In the PNG
    (black image: the probe is constant, so the cell is half the colormap colour), the −2 region of
    gradient × input is blue (bwr's low end), its zero region the colormap's middle (white), its
    +0.5 region light red; saliency (|gradient|, unsigned) is at turbo's top — dark red — where
    gradient × input is most negative, and not blue."""
    monitor = ExplanationMonitor(explainers=["gradient_x_input", "saliency"], metrics=[], num_samples=2)
    monitor.probe = {"image": torch.ones(2, 1, H, W), "label": torch.zeros(2, dtype=torch.long)}
    monitor._denorm = None
    model = linear_model()
    result = monitor.explain(model)
    gxi = result["maps"]["gradient_x_input"]
    assert float(gxi[0, 0, 10]) == -2.0 and float(gxi[0, 0, 5]) == 0.0 and float(gxi[0, 0, 1]) == 0.5
    monitor._write(SimpleNamespace(default_root_dir=str(tmp_path), loggers=[]), 0, result)
    png = np.asarray(Image.open(tmp_path / "explanations" / "epoch_000.png").convert("RGB")).astype(float)

    cell, ncol, nrow = monitor.cell, 3, 2  # columns: image | gradient_x_input | saliency
    left, top = png.shape[1] - ncol * cell, png.shape[0] - nrow * cell

    def colour(column: int, map_col: int, row: int = 0) -> np.ndarray:
        """RGB in [0,1] at the centre of map column ``map_col`` of a grid cell, un-blended from the
        black image underneath (overlay alpha 0.5)."""
        x = left + column * cell + int((map_col + 0.5) * cell / W)
        y = top + row * cell + cell // 2
        return png[y, x] / 255 / 0.5

    neg, zero, pos = colour(1, 10), colour(1, 5), colour(1, 1)
    assert neg[2] > 0.9 and neg[0] < 0.05, neg  # blue: −max|a| ↦ bwr's low end
    assert neg[2] > neg[0]
    mid = _lut(DIVERGING_CMAP, 255)[127].numpy()  # the middle entry, white for bwr
    np.testing.assert_allclose(zero, mid, atol=2 / 255 / 0.5)
    np.testing.assert_allclose(mid, [1.0, 1.0, 1.0])
    assert pos[0] > 0.9 and pos[0] > pos[2] + 0.1, pos  # +0.5 of ±2: light red
    # the second sample is drawn the same way
    np.testing.assert_allclose(colour(1, 10, row=1), neg, atol=1e-6)

    sal = colour(2, 10)
    assert not sal[2] > sal[0], sal  # the unsigned map is not on any "negative" side there
    np.testing.assert_allclose(sal, _lut(SEQUENTIAL_CMAP)[255].numpy(), atol=2 / 255 / 0.5)
    # saliency's zero (no weight) is the low end of its min-max scale, not a middle
    np.testing.assert_allclose(colour(2, 5), _lut(SEQUENTIAL_CMAP)[0].numpy(), atol=2 / 255 / 0.5)
