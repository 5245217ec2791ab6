"""Layer and neuron attribution against Captum on torchvision's ResNet-18 (random weights, eval,
32 px, float64), their maps at input resolution, completeness, and their configuration errors."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
import torchvision
from captum.attr import LayerAttribution
from captum.attr import LayerConductance as CaptumLayerConductance
from captum.attr import LayerGradientXActivation as CaptumLayerGradientXActivation
from captum.attr import LayerIntegratedGradients as CaptumLayerIntegratedGradients
from captum.attr import NeuronGradient as CaptumNeuronGradient
from captum.attr import NeuronIntegratedGradients as CaptumNeuronIntegratedGradients
from torch import nn

from xaudit.explainers import UnsupportedModelError, create
from xaudit.explainers.fills import make_fill
from xaudit.explainers.layer_attribution import LayerIntegratedGradients  # noqa: F401  (registers)
from xaudit.utils.errors import ConfigError

from explainer_helpers import images, make_model, randomize_batchnorm

TARGET = torch.tensor([0, 3, 7])  # three images, distinct classes
STEPS = 16
# float64 throughout: the same autograd ops on the same graph, only summation order differs
# (Captum sums all path points at once, ours in chunks of internal_batch_size). Measured max
# |Δ| / max |ref|: ≤ 4.3e-16 (layer IG, conductance), 0 (the others); the bound is 1e-12 of the
# map's scale.
TOL = 1e-12


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    model = torchvision.models.resnet18(weights=None, num_classes=10)
    return randomize_batchnorm(model).double().eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return images(3).double()


def _close(ours: torch.Tensor, ref: torch.Tensor) -> None:
    ref = ref.detach()
    scale = float(ref.abs().max())
    assert scale > 0, "the reference is all zero: nothing compared"
    torch.testing.assert_close(ours, ref, rtol=0, atol=TOL * scale)


def _captum_input(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"])
@pytest.mark.parametrize("baseline", ["zero", "mean"])
def test_layer_integrated_gradients_matches_captum(method: str, baseline: str, resnet: nn.Module,
                                                   x: torch.Tensor) -> None:
    ours = create("layer_integrated_gradients", resnet, target_layer="layer3", steps=STEPS, method=method,
                  baseline=baseline, internal_batch_size=5).attribute_layer(x, TARGET)
    ref = CaptumLayerIntegratedGradients(resnet, resnet.layer3).attribute(
        _captum_input(x), baselines=make_fill(x, baseline), target=TARGET, n_steps=STEPS, method=method)
    if method == "riemann_trapezoid":
        ref = ref * STEPS / (STEPS - 1)  # Captum's trapezoid weights sum to (n-1)/n (see test_gradient.py)
    assert ours.shape == (3, 256, 2, 2)
    _close(ours, ref)


@pytest.mark.parametrize("method", ["riemann_left", "riemann_middle", "riemann_trapezoid"])
@pytest.mark.parametrize("layer", ["layer2", "layer3"])
def test_layer_conductance_matches_captum(method: str, layer: str, resnet: nn.Module, x: torch.Tensor) -> None:
    base = make_fill(x, "mean")
    ours = create("layer_conductance", resnet, target_layer=layer, steps=STEPS, method=method, baseline="mean",
                  internal_batch_size=7).attribute_layer(x, TARGET)
    ref = CaptumLayerConductance(resnet, resnet.get_submodule(layer)).attribute(
        _captum_input(x), baselines=base, target=TARGET, n_steps=STEPS, method=method)
    _close(ours, ref)


@pytest.mark.parametrize("layer", ["layer1", "layer3", "avgpool", "fc"])
def test_layer_gradient_x_activation_matches_captum(layer: str, resnet: nn.Module, x: torch.Tensor) -> None:
    ours = create("layer_gradient_x_activation", resnet, target_layer=layer).attribute_layer(x, TARGET)
    ref = CaptumLayerGradientXActivation(resnet, resnet.get_submodule(layer)).attribute(
        _captum_input(x), target=TARGET)
    _close(ours, ref)


@pytest.mark.parametrize(("layer", "neuron"), [("layer2", (5, 1, 2)), ("layer3", (100, 0, 1)), ("fc", (4,))])
def test_neuron_gradient_matches_captum(layer: str, neuron: tuple[int, ...], resnet: nn.Module,
                                        x: torch.Tensor) -> None:
    ours = create("neuron_gradient", resnet, target_layer=layer, neuron=neuron).attribute(x, TARGET, reduce=None)
    ref = CaptumNeuronGradient(resnet, resnet.get_submodule(layer)).attribute(_captum_input(x), neuron)
    _close(ours, ref)


@pytest.mark.parametrize("method", ["riemann_middle", "riemann_left"])
@pytest.mark.parametrize(("layer", "neuron"), [("layer2", (5, 1, 2)), ("layer4", (300, 0, 0))])
def test_neuron_integrated_gradients_matches_captum(method: str, layer: str, neuron: tuple[int, ...],
                                                    resnet: nn.Module, x: torch.Tensor) -> None:
    base = make_fill(x, "mean")
    ours = create("neuron_integrated_gradients", resnet, target_layer=layer, neuron=neuron, steps=STEPS,
                  method=method, baseline="mean", internal_batch_size=5).attribute(x, TARGET, reduce=None)
    ref = CaptumNeuronIntegratedGradients(resnet, resnet.get_submodule(layer)).attribute(
        _captum_input(x), neuron, baselines=base, n_steps=STEPS, method=method)
    _close(ours, ref)


def test_layer_map_is_captums_bilinear_interpolation_of_the_channel_sum(resnet: nn.Module, x: torch.Tensor) -> None:
    for name in ("layer_integrated_gradients", "layer_conductance", "layer_gradient_x_activation"):
        kw = {} if name == "layer_gradient_x_activation" else {"steps": 4}
        e = create(name, resnet, target_layer="layer2", **kw)
        raw = e.attribute_layer(x, TARGET)
        ref = LayerAttribution.interpolate(raw.sum(1, keepdim=True), (32, 32), "bilinear")[:, 0]
        torch.testing.assert_close(e.attribute(x, TARGET), ref, rtol=0, atol=0)
        torch.testing.assert_close(e.attribute(x, TARGET, reduce=None), ref, rtol=0, atol=0)


def test_completeness(resnet: nn.Module, x: torch.Tensor) -> None:
    """Σ over units = f(x) − f(x'). After layer4 (1×1 at 32 px) the head is linear (GAP → fc), so
    layer IG and conductance (trapezoid points, which telescope) are exact with any step count;
    neuron IG of a layer2 unit converges as the Riemann sum does (2 % at 200 steps)."""
    zero = torch.zeros_like(x)
    with torch.no_grad():
        gap = resnet(x).gather(1, TARGET[:, None])[:, 0] - resnet(zero).gather(1, TARGET[:, None])[:, 0]
    for name in ("layer_integrated_gradients", "layer_conductance"):
        got = create(name, resnet, target_layer="layer4", steps=3,
                     method="riemann_trapezoid").attribute_layer(x, TARGET)
        torch.testing.assert_close(got.flatten(1).sum(1), gap, rtol=0, atol=1e-12 * float(gap.abs().max()))
    acts: dict[str, torch.Tensor] = {}
    h = resnet.layer2.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o[:, 7, 1, 1]))
    try:
        with torch.no_grad():
            resnet(zero)
            a0 = acts["a"]
            resnet(x)
            delta = acts["a"] - a0
    finally:
        h.remove()
    got = create("neuron_integrated_gradients", resnet, target_layer="layer2", neuron=(7, 1, 1), steps=200,
                 method="riemann_trapezoid").attribute(x, 0).sum((1, 2))
    torch.testing.assert_close(got, delta, rtol=0, atol=2e-2 * float(delta.abs().max()))


def test_default_neuron_is_the_most_active_unit_of_each_image(resnet: nn.Module, x: torch.Tensor) -> None:
    acts: dict[str, torch.Tensor] = {}
    h = resnet.layer3.register_forward_hook(lambda m, i, o: acts.__setitem__("a", o.detach()))
    try:
        with torch.no_grad():
            resnet(x)
    finally:
        h.remove()
    for name, kw in (("neuron_gradient", {}), ("neuron_integrated_gradients", {"steps": 4})):
        default = create(name, resnet, target_layer="layer3", **kw).attribute(x, 0, reduce=None)
        for i in range(3):
            flat = int(acts["a"][i].flatten().argmax())
            unit = tuple(int(v) for v in torch.unravel_index(torch.tensor(flat), acts["a"].shape[1:]))
            one = create(name, resnet, target_layer="layer3", neuron=unit, **kw).attribute(x[i:i + 1], 0, reduce=None)
            torch.testing.assert_close(default[i:i + 1], one, rtol=1e-9, atol=1e-12)


def test_neuron_methods_ignore_the_target_but_check_it(resnet: nn.Module, x: torch.Tensor) -> None:
    e = create("neuron_gradient", resnet, target_layer="layer3", neuron=(1, 0, 0))
    torch.testing.assert_close(e.attribute(x, 0), e.attribute(x, TARGET), rtol=0, atol=0)
    with pytest.raises(Exception, match="classes"):
        e.attribute(x, 99)


# -- errors ----------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["layer_integrated_gradients", "layer_conductance", "layer_gradient_x_activation",
                                  "neuron_gradient", "neuron_integrated_gradients"])
def test_unknown_layer_lists_the_layers(name: str, get_model: Any) -> None:
    with pytest.raises(ConfigError, match=r"layer5.*features\.block5"):
        create(name, get_model("small_cnn"), target_layer="layer5")


@pytest.mark.parametrize("name", ["neuron_gradient", "neuron_integrated_gradients"])
def test_neuron_errors_name_the_shape(name: str, resnet: nn.Module, x: torch.Tensor) -> None:
    kw: dict[str, Any] = {"steps": 2} if name == "neuron_integrated_gradients" else {}
    with pytest.raises(ConfigError, match=r"out of range.*'layer3'.*\(256, 2, 2\)"):
        create(name, resnet, target_layer="layer3", neuron=(256, 0, 0), **kw).attribute(x, 0)
    with pytest.raises(ConfigError, match=r"out of range.*\(256, 2, 2\)"):
        create(name, resnet, target_layer="layer3", neuron=(0, 2, 0), **kw).attribute(x, 0)
    with pytest.raises(ConfigError, match=r"out of range"):
        create(name, resnet, target_layer="layer3", neuron=(-1, 0, 0), **kw).attribute(x, 0)
    with pytest.raises(ConfigError, match=r"2 indices.*\[B,256,2,2\].*\(channel, y, x\)"):
        create(name, resnet, target_layer="layer3", neuron=(1, 0), **kw).attribute(x, 0)
    with pytest.raises(ConfigError, match=r"3 indices.*\[B,10\]"):
        create(name, resnet, target_layer="fc", neuron=(1, 0, 0), **kw).attribute(x, 0)
    for bad in ("3", (1.0, 0, 0), (True, 0, 0), ()):
        with pytest.raises(ConfigError, match="neuron must be a tuple of ints"):
            create(name, resnet, target_layer="layer3", neuron=bad, **kw)
    # an int is the unit of a flat layer
    create(name, resnet, target_layer="fc", neuron=3, **kw).attribute(x, 0)


def test_flat_layer_has_no_input_resolution_map(resnet: nn.Module, x: torch.Tensor) -> None:
    e = create("layer_gradient_x_activation", resnet, target_layer="fc")
    assert e.attribute_layer(x, TARGET).shape == (3, 10)
    with pytest.raises(UnsupportedModelError, match="attribute_layer"):
        e.attribute(x, TARGET)


def test_layer_called_twice_is_refused(resnet: nn.Module, x: torch.Tensor) -> None:
    # torchvision's BasicBlock applies its one ReLU module twice
    with pytest.raises(ConfigError, match="more than once"):
        create("layer_gradient_x_activation", resnet, target_layer="layer1.0.relu").attribute(x, TARGET)


def test_no_side_effects_in_float32(get_model: Any) -> None:
    """float32 ResNet-18 of the test helpers: hooks removed, no param.grad, output in x.dtype."""
    model = make_model("resnet18")
    xs = images(2)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for name in ("layer_integrated_gradients", "layer_conductance", "layer_gradient_x_activation",
                     "neuron_gradient", "neuron_integrated_gradients"):
            kw = {"steps": 4} if "integrated" in name or "conductance" in name else {}
            attr = create(name, model, target_layer="layer3", **kw).attribute(xs, 1)
            assert attr.shape == (2, 32, 32) and attr.dtype == torch.float32 and torch.isfinite(attr).all()
    assert all(p.grad is None for p in model.parameters())
    assert not any(len(m._forward_hooks) for m in model.modules())
