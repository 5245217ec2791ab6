"""LRP composites against zennit's (``EpsilonPlusFlat``, ``EpsilonGammaBox``, ``EpsilonAlpha2Beta1``
with ``VGGCanonizer`` / ``ResNetCanonizer``) on VGG and ResNet at 32 px.

Tolerances, and the one real difference:

- zennit merges a BatchNorm by writing its statistics to mean 0, var 1, weight 1, bias 0, so the
  BatchNorm still computes ``x / √(1 + eps)``, not x: every merged BatchNorm shrinks activations by
  ~5e-6 (eps = 1e-5). Ours is the identity. With ``eps = 0`` both compute the same function, and in
  float64 the relevance maps agree to 1e-10 of their largest value on all four models.
- With the default eps in float32 the difference stays below 5e-5 of the largest value on
  vgg11_bn and resnet18 (measured ≤ 1.2e-5); ResNet-50's ~50 BatchNorms in a row make it ~5e-4.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn
from zennit.attribution import Gradient
from zennit.composites import EpsilonAlpha2Beta1, EpsilonGammaBox, EpsilonPlusFlat
from zennit.core import Composite
from zennit.torchvision import ResNetCanonizer, VGGCanonizer

import xaudit.explainers.relevance  # noqa: F401  (registers lrp)
from xaudit.explainers import create

from explainer_helpers import images, make_model

MODELS = {"vgg11_bn": {"cifar_stem": True}, "vgg16": {"cifar_stem": True}, "resnet18": {},
          "resnet50": {"cifar_stem": False}}
COMPOSITES = ("epsilon_plus_flat", "epsilon_gamma_box", "epsilon_alpha2_beta1")


def zennit_composite(name: str, model_name: str, x: torch.Tensor) -> Composite:
    canonizers = [VGGCanonizer()] if model_name.startswith("vgg") else [ResNetCanonizer()]
    if name == "epsilon_plus_flat":
        return EpsilonPlusFlat(canonizers=canonizers)
    if name == "epsilon_gamma_box":
        low = x.amin((2, 3), keepdim=True).expand_as(x)  # each image's per-channel range, our default
        high = x.amax((2, 3), keepdim=True).expand_as(x)
        return EpsilonGammaBox(low=low, high=high, canonizers=canonizers)
    return EpsilonAlpha2Beta1(canonizers=canonizers)


def zennit_relevance(model: nn.Module, composite: Composite, x: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """zennit's relevance with the target logit as the initial relevance (ours starts there)."""
    with torch.no_grad():
        logits = model(x)
    rows = torch.arange(len(target))
    start = torch.zeros_like(logits)
    start[rows, target] = logits[rows, target]
    with Gradient(model=model, composite=composite) as attributor:
        _, relevance = attributor(x, start)
    return relevance


def max_relative_difference(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max())


@pytest.mark.parametrize("model_name", list(MODELS))
def test_same_function_float64_agrees_to_1e10(model_name: str) -> None:
    model = make_model(model_name, **MODELS[model_name]).double()
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.eps = 0.0  # zennit's merged BatchNorm is then the identity, as ours
    x = images(1, seed=4).double()  # one image: float64 convolutions are slow on a 2-core CPU
    target = torch.tensor([3])
    for name in COMPOSITES:
        ours = create("lrp", model, composite=name).attribute(x, target, reduce=None)
        theirs = zennit_relevance(model, zennit_composite(name, model_name, x), x, target)
        assert max_relative_difference(ours, theirs) < 1e-10, name


@pytest.mark.parametrize("model_name", ["vgg11_bn", "resnet18"])
def test_default_float32_agrees_to_5e5(model_name: str) -> None:
    model = make_model(model_name, **MODELS[model_name])
    x = images(2)
    target = torch.tensor([0, 2])
    for name in COMPOSITES:
        ours = create("lrp", model, composite=name).attribute(x, target, reduce=None)
        theirs = zennit_relevance(model, zennit_composite(name, model_name, x), x, target)
        assert max_relative_difference(ours, theirs) < 5e-5, name
