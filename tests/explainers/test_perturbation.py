"""Occlusion against Captum (every fill, partial windows); RISE against its definition."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from captum.attr import Occlusion
from torch import nn

from xaudit.explainers import create
from xaudit.explainers.fills import make_fill

from explainer_helpers import images

TARGET = torch.tensor([2, 0])


# every fill once, and window/stride pairs where the last window is cut off at the border
@pytest.mark.parametrize(("fill", "window", "stride"), [("zero", 8, 8), ("gray", 6, 4), ("mean", 5, 3),
                                                        ("blur", 6, 4), ("zero", 7, 5)])
def test_occlusion_matches_captum(fill: str, window: int, stride: int, get_model: Any) -> None:
    model = get_model("resnet18")
    x = images(2, seed=4)
    ours = create("occlusion", model, window=window, stride=stride, fill=fill,
                  internal_batch_size=7).attribute(x, TARGET)
    ref = Occlusion(model).attribute(x, sliding_window_shapes=(3, window, window), strides=(3, stride, stride),
                                     baselines=make_fill(x, fill), target=TARGET, perturbations_per_eval=16)
    assert torch.equal(ref[:, 0], ref[:, 2]), "Captum spreads one value over the channels"
    with torch.no_grad():
        logit_scale = float(model(x).abs().max())
    # both subtract the same logits of the same occluded images: float32 error relative to the logits
    torch.testing.assert_close(ours, ref[:, 0], rtol=1e-4, atol=1e-5 * logit_scale)


class _QuadrantModel(nn.Module):
    """Class 0's logit is 4 × the mean of channel 0 over the top-left quadrant; class 1's is 0."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = 4 * x[:, 0, :16, :16].mean((1, 2))
        return torch.stack([s, torch.zeros_like(s)], 1)


def test_occlusion_on_a_linear_model_is_exact() -> None:
    x = torch.ones(1, 3, 32, 32)
    attr = create("occlusion", _QuadrantModel(), window=8, stride=8).attribute(x, 0)
    # an 8×8 window in the quadrant removes 64/256 of the mean: drop 4 · 1/4 = 1, credited to its pixels
    assert torch.allclose(attr[0, :16, :16], torch.ones(16, 16))
    assert torch.equal(attr[0, 16:], torch.zeros(16, 32)) and torch.equal(attr[0, :, 16:], torch.zeros(32, 16))


def test_rise_is_its_definition(get_model: Any) -> None:
    """Σ_i softmax(f(x ⊙ M_i))_c · M_i / (N·p) (Petsiuk et al., 2018), with the explainer's own masks."""
    model = get_model("small_cnn")
    x = images(2)
    rise = create("rise", model, n_masks=40, p=0.4, seed=5, internal_batch_size=7)
    masks = rise.masks(32, 32, x.device, x.dtype)
    with torch.no_grad():
        expect = torch.zeros(2, 32, 32)
        for m in masks:
            p = model(x * m).softmax(1)[torch.arange(2), TARGET]
            expect += p[:, None, None] * m
        expect /= 40 * 0.4
    torch.testing.assert_close(rise.attribute(x, TARGET), expect, rtol=1e-5, atol=1e-6)


def test_rise_masks_are_seeded_shifted_grids() -> None:
    rise = create("rise", _QuadrantModel(), n_masks=400, p=0.3, cell_size=8, seed=1)
    rng = torch.get_rng_state()
    m = rise.masks(32, 32, torch.device("cpu"), torch.float32)
    assert torch.equal(torch.get_rng_state(), rng)
    assert m.shape == (400, 32, 32) and m.min() >= 0 and m.max() <= 1
    assert abs(float(m.mean()) - 0.3) < 0.02  # each cell kept with p = 0.3
    assert torch.equal(m, rise.masks(32, 32, torch.device("cpu"), torch.float32))
    other = create("rise", _QuadrantModel(), n_masks=400, p=0.3, cell_size=8, seed=2)
    assert not torch.equal(m, other.masks(32, 32, torch.device("cpu"), torch.float32))
    # random shifts: masks are not all aligned to the 8-px grid (a grid-aligned mask is constant on cells)
    aligned = (m[:, :8, :8].amax((1, 2)) == m[:, :8, :8].amin((1, 2)))
    assert aligned.float().mean() < 0.9


def test_rise_finds_the_region_the_model_uses() -> None:
    x = torch.ones(2, 3, 32, 32)
    attr = create("rise", _QuadrantModel(), n_masks=500, seed=0, score="logit").attribute(x, 0)
    quadrant = torch.zeros(32, 32, dtype=torch.bool)
    quadrant[:16, :16] = True
    # the 256 highest-ranked pixels (the quadrant's size) lie mostly in the quadrant (chance: 25 %)
    top = attr.flatten(1).topk(256, dim=1).indices
    assert (quadrant.flatten()[top].float().mean(1) > 0.75).all()
