"""Overlay colours: which methods are signed (one decision, on the explainer classes), the
diverging scale of signed maps (symmetric, 0 ↦ the middle) and the unchanged min-max of unsigned ones."""

from __future__ import annotations

import pytest
import torch

import xaudit.explainers  # noqa: F401  (registers every method)
from xaudit.explainers.registry import get, is_signed, names
from xaudit.reporting.overlays import DIVERGING_CMAP, SEQUENTIAL_CMAP, _lut, colorize, grid_image

SIGNED = ("integrated_gradients", "gradient_x_input", "lrp", "attn_lrp", "cp_lrp", "deeplift", "deepshap",
          "kernel_shap", "lime", "occlusion", "pattern_attribution")
UNSIGNED = ("saliency", "guided_backprop", "deconvnet", "grad_cam", "cam", "deep_taylor", "rise", "smoothgrad",
            "xrai", "attention_rollout", "chefer", "random", "sobel", "pattern_net")


def test_signed_methods_are_decided_on_their_classes() -> None:
    assert all(is_signed(n) for n in SIGNED)
    assert not any(is_signed(n) for n in UNSIGNED)
    assert all(is_signed(n) == get(n).signed for n in names())
    # names not (yet) registered are drawn as unsigned
    assert not is_signed("gradient_shap_not_registered") and not is_signed("")


def test_signed_colorize_is_symmetric_and_centred_on_zero() -> None:
    lut = _lut(DIVERGING_CMAP, 255)
    maps = torch.tensor([[[-4.0, -2.0, 0.0, 1.0, 2.0]], [[0.0, 0.0, 0.0, 0.0, 0.0]]])
    rgb = colorize(maps, signed=True)  # [2,3,1,5]
    torch.testing.assert_close(rgb[0, :, 0, 0], lut[0])  # −max|a| ↦ the low end (blue)
    torch.testing.assert_close(rgb[0, :, 0, 2], lut[127])  # 0 ↦ the middle ...
    torch.testing.assert_close(lut[127], torch.ones(3))  # ... which is white for bwr
    torch.testing.assert_close(rgb[0, :, 0, 4], lut[round(127 + 127 * 2 / 4)])  # +max/2 (scale: max|a| = 4)
    torch.testing.assert_close(rgb[0, :, 0, 1].flip(0), rgb[0, :, 0, 4])  # ±2 mirror each other (bwr)
    assert torch.equal(rgb[1], lut[127].view(3, 1, 1).expand(3, 1, 5))  # an all-zero map: all middle


def test_unsigned_colorize_is_min_max_on_the_sequential_map() -> None:
    lut = _lut(SEQUENTIAL_CMAP)
    rgb = colorize(torch.tensor([[[-4.0, 0.0, 4.0]]]))
    torch.testing.assert_close(rgb[0, :, 0, 0], lut[0])
    torch.testing.assert_close(rgb[0, :, 0, 1], lut[128])
    torch.testing.assert_close(rgb[0, :, 0, 2], lut[255])


def test_grid_flags_one_per_column() -> None:
    images = torch.zeros(1, 1, 4, 4)
    maps = torch.randn(1, 4, 4)
    assert grid_image(images, [maps, maps], ["a", "b"], ["row"], cell=8, signed=[True, False]).size[0] > 0
    with pytest.raises(ValueError, match="signed has 1 entries for 2 columns"):
        grid_image(images, [maps, maps], ["a", "b"], ["row"], cell=8, signed=[True])
