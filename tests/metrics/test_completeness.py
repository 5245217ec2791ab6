"""Completeness: hand-computed on a linear model, and Integrated Gradients on a CNN."""

from __future__ import annotations

import math

import pytest
import torch

from xaudit.explainers import create
from xaudit.metrics import Completeness


def test_gradient_times_input_is_exactly_complete_for_a_linear_model(linear_scorer):
    # logit_0 = w·x, so f(x) − f(0) = Σ w·x: gradient × input is complete, a scaled copy is not
    w = torch.tensor([0.5, -1.0, 2.0, 0.25])
    model = linear_scorer(w)
    x = torch.tensor([[1.0, 2.0, 3.0, 4.0], [-1.0, 0.5, 0.0, 2.0]]).view(2, 1, 2, 2)
    exact = (w * x.flatten(1)).view(2, 1, 2, 2)  # per-channel attribution [B,C,H,W]
    m = Completeness(model)
    m.update(x, exact, torch.tensor([0, 0]))
    assert float(m.compute()) == pytest.approx(0.0, abs=1e-12)
    scaled = Completeness(model)
    scaled.update(x, 1.1 * exact[:, 0], torch.tensor([0, 0]))  # [B,H,W] works too
    assert scaled.per_sample().tolist() == pytest.approx([0.1, 0.1], abs=1e-6)
    assert Completeness.higher_is_better is False


def test_probability_output_and_other_baselines(linear_scorer):
    w = torch.ones(4)
    model = linear_scorer(w)
    x = torch.tensor([1.0, 2.0, 3.0, 4.0]).view(1, 1, 2, 2)
    attr = torch.full((1, 2, 2), 0.1)  # sums to 0.4
    m = Completeness(model, output="prob", baseline=1.0)  # f = sigmoid(Σx); x̄ = all ones → Σ = 4
    m.update(x, attr, torch.tensor([0]))
    delta = 1 / (1 + math.exp(-10.0)) - 1 / (1 + math.exp(-4.0))
    assert float(m.per_sample()[0]) == pytest.approx(abs(0.4 - delta) / abs(delta), rel=1e-5)
    mean = Completeness(model, baseline="mean")  # x̄ = 2.5 everywhere → Δ = 10 − 10 = 0
    mean.update(x, attr, torch.tensor([0]))
    assert float(mean.per_sample()[0]) == pytest.approx(0.4 / 1e-6, rel=1e-4)  # relative to eps


def test_integrated_gradients_converges_to_complete_on_a_trained_cnn(trained_shapes):
    # a trained CNN (BatchNorm shifts make it non-homogeneous, unlike a freshly initialised one)
    net, x, target = trained_shapes.net, trained_shapes.x[:4], trained_shapes.label[:4]
    scores = {}
    for name, kwargs in (("ig_64", {"steps": 64}), ("ig_2", {"steps": 2})):
        attr = create("integrated_gradients", net, baseline="zero", **kwargs).attribute(x, target)
        m = Completeness(net, baseline="zero")
        with torch.inference_mode():
            m.update(x, attr, target)
        scores[name] = float(m.compute())
    saliency = Completeness(net)
    saliency.update(x, create("saliency", net).attribute(x, target), target)
    # measured: 0.002 (64 steps), 0.19 (2 steps), ~3 (saliency, which claims no completeness)
    assert scores["ig_64"] < 0.01 < 0.1 < scores["ig_2"]
    assert float(saliency.compute()) > 1.0
