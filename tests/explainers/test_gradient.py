"""Gradient family against Captum on identical inputs, IG completeness, guided backprop with
in-place and functional ReLUs."""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from captum.attr import Deconvolution, GuidedBackprop, InputXGradient, IntegratedGradients, Saliency
from torch import nn

from xaudit.explainers import create
from xaudit.explainers.fills import make_fill
from xaudit.models import build_backbone

from explainer_helpers import images, make_model

TARGET = torch.tensor([0, 3, 2])


def _scale(a: torch.Tensor) -> float:
    return float(a.detach().abs().max())


def _captum_input(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18", "vgg11_bn"])
def test_saliency_and_gradient_x_input_match_captum(model_name: str, get_model: Any) -> None:
    model = get_model(model_name)
    x = images(3)
    # Same autograd ops on the same graph: only float summation order may differ, so a
    # tolerance of 1e-6 relative to the map's scale (float32 is ~1e-7) is tight.
    for abs_ in (True, False):
        ours = create("saliency", model, abs=abs_).attribute(x, TARGET, reduce=None)
        ref = Saliency(model).attribute(_captum_input(x), target=TARGET, abs=abs_)
        torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * _scale(ref))
    ours = create("gradient_x_input", model).attribute(x, TARGET, reduce=None)
    ref = InputXGradient(model).attribute(_captum_input(x), target=TARGET)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * _scale(ref))
    # the default map is Simonyan's max over channels of |gradient|
    sal = create("saliency", model).attribute(x, TARGET)
    torch.testing.assert_close(sal, Saliency(model).attribute(_captum_input(x), target=TARGET).amax(1),
                               rtol=1e-5, atol=1e-6 * _scale(sal))


@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"])
def test_integrated_gradients_matches_captum(method: str, get_model: Any) -> None:
    model = get_model("resnet18")
    x = images(3)
    for baseline in ("zero", "mean", "blur"):
        # ours chunks 16 steps × 3 images as 5 images per forward, Captum runs all 48 at once
        ours = create("integrated_gradients", model, steps=16, method=method, baseline=baseline,
                      internal_batch_size=5).attribute(x, TARGET, reduce=None)
        ref = IntegratedGradients(model).attribute(_captum_input(x), baselines=make_fill(x, baseline),
                                                   target=TARGET, n_steps=16, method=method).detach()
        if method == "riemann_trapezoid":
            # Captum places n points 1/(n-1) apart but weights them 1/n (ends 1/(2n)): its weights sum
            # to (n-1)/n, which breaks completeness. Ours are the trapezoid rule's 1/(n-1) (ends
            # 1/(2(n-1))), i.e. Captum's times n/(n-1) at every point.
            ref = ref * 16 / 15
        # identical path points and weights; the 16-term sums differ only in order (float32)
        torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * _scale(ref))


def test_integrated_gradients_completeness_at_200_steps() -> None:
    """Σ per-channel attributions = f(x) − f(x') within 1 % at m=200 (Sundararajan et al., 2017).

    On the project's small CNN with the default Riemann-middle rule. (Deep random nets cross many
    ReLU kinks along the path, where the Riemann error is O(1/m): at m=200 resnet18/vgg11_bn with
    random weights land at 0.3–1 %.)
    """
    model = make_model("small_cnn")
    x = images(4, seed=3)
    with torch.no_grad():
        target = (model(x) - model(torch.zeros_like(x))).abs().argmax(1)
    for baseline in ("zero", "mean", "blur"):
        ig = create("integrated_gradients", model, steps=200, baseline=baseline, internal_batch_size=200)
        attr = ig.attribute(x, target, reduce=None)
        with torch.no_grad():
            fx = model(x).gather(1, target[:, None])[:, 0]
            fb = model(ig.baseline_for(x)).gather(1, target[:, None])[:, 0]
        delta = fx - fb
        # 1 % of delta must stay far above float32 noise (~1e-7 of logits ≈ 0.1)
        assert (delta.abs() > 1e-3).all(), delta
        total = attr.sum((1, 2, 3))
        assert ((total - delta).abs() <= 0.01 * delta.abs()).all(), (baseline, total, delta)
        # the default reduction (channel sum) keeps completeness
        torch.testing.assert_close(ig.attribute(x, target).sum((1, 2)), total, rtol=1e-5, atol=1e-7)


def test_integrated_gradients_chunking_does_not_change_the_result(get_model: Any) -> None:
    model = get_model("small_cnn")
    x = images(3)
    runs = [create("integrated_gradients", model, steps=10, internal_batch_size=n).attribute(x, TARGET)
            for n in (1, 7, 1000)]
    for r in runs[1:]:
        # the same 10 gradients summed in the same order: equal up to float32 rounding of batched convs
        torch.testing.assert_close(r, runs[0], rtol=1e-5, atol=1e-6 * _scale(runs[0]))


@pytest.mark.parametrize("model_name", ["resnet18", "vgg11_bn"])
@pytest.mark.parametrize(("method", "reference"), [("guided_backprop", GuidedBackprop), ("deconvnet", Deconvolution)])
def test_modified_relu_methods_match_captum_with_inplace_relus(method: str, reference: Any, model_name: str,
                                                              get_model: Any) -> None:
    model = get_model(model_name)
    relus = [m for m in model.modules() if isinstance(m, nn.ReLU)]
    assert relus and all(m.inplace for m in relus), "the point is torchvision's inplace=True ReLUs"
    x = images(3)
    ours = create(method, model).attribute(x, TARGET, reduce=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Captum warns that it sets backward hooks
        ref = reference(model).attribute(_captum_input(x), target=TARGET)
        # and against Captum on a copy without in-place ReLUs, the unambiguous case for hooks
        plain = copy.deepcopy(model)
        for m in plain.modules():
            if isinstance(m, nn.ReLU):
                m.inplace = False
        ref_plain = reference(plain).attribute(_captum_input(x), target=TARGET)
    # same rule on the same graph: only float summation order may differ
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * _scale(ref))
    torch.testing.assert_close(ours, ref_plain, rtol=1e-5, atol=1e-6 * _scale(ref))
    # and the rule really changed the gradient
    grad = create("saliency", model, abs=False).attribute(x, TARGET, reduce=None)
    assert (ours - grad).abs().max() > 0.1 * _scale(grad)


class _FunctionalReLUNet(nn.Module):
    """ReLUs as F.relu(inplace=True), torch.relu and Tensor.relu_: no ReLU module to hook."""

    def __init__(self, modules: bool = False) -> None:
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, padding=1)
        self.c3 = nn.Conv2d(8, 8, 3, padding=1)
        self.fc = nn.Linear(8, 4)
        self.modules_ = modules
        self.r1, self.r2, self.r3 = nn.ReLU(), nn.ReLU(), nn.ReLU()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.modules_:
            h = self.r3(self.c3(self.r2(self.c2(self.r1(self.c1(x))))))
        else:
            h = F.relu(self.c1(x), inplace=True)
            h = torch.relu(self.c2(h))
            h = self.c3(h).relu_()
        return self.fc(h.mean((2, 3)))


@pytest.mark.parametrize(("method", "reference"), [("guided_backprop", GuidedBackprop), ("deconvnet", Deconvolution)])
def test_functional_relus_are_modified_too(method: str, reference: Any) -> None:
    """Captum only sees ReLU modules; ours catches functional ReLUs, so it must equal Captum on the
    same network written with modules."""
    torch.manual_seed(0)
    functional = _FunctionalReLUNet()
    modular = _FunctionalReLUNet(modules=True)
    modular.load_state_dict(functional.state_dict())
    x = images(3, size=16)
    ours = create(method, functional).attribute(x, TARGET, reduce=None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = reference(modular).attribute(_captum_input(x), target=TARGET)
    torch.testing.assert_close(ours, ref, rtol=1e-5, atol=1e-6 * _scale(ref))


def test_reductions_follow_their_definitions(get_model: Any) -> None:
    model = get_model("small_cnn")
    x = images(2)
    g = create("saliency", model, abs=False).attribute(x, 1, reduce=None)
    expect = {"sum": g.sum(1), "mean": g.mean(1), "abs_sum": g.abs().sum(1), "max_abs": g.abs().amax(1),
              "max": g.amax(1), "l2": g.norm(dim=1)}
    for name, value in expect.items():
        got = create("saliency", model, abs=False).attribute(x, 1, reduce=name)
        torch.testing.assert_close(got, value, rtol=1e-6, atol=0)
    # defaults: Simonyan's max |g| for saliency, channel sums where completeness matters
    torch.testing.assert_close(create("saliency", model).attribute(x, 1), expect["max_abs"], rtol=1e-6, atol=0)
    gxi = create("gradient_x_input", model).attribute(x, 1, reduce=None)
    torch.testing.assert_close(create("gradient_x_input", model).attribute(x, 1), gxi.sum(1), rtol=1e-6, atol=0)


def test_predicted_target_is_the_argmax(get_model: Any) -> None:
    model = get_model("resnet18")
    x = images(3)
    with torch.no_grad():
        pred = model(x).argmax(1)
    e = create("saliency", model)
    torch.testing.assert_close(e.attribute(x, "predicted"), e.attribute(x, pred), rtol=0, atol=0)
    # an int means that class for every sample
    torch.testing.assert_close(e.attribute(x, 2), e.attribute(x, torch.full((3,), 2)), rtol=0, atol=0)


def test_batchnorm_randomisation_matters_for_ig() -> None:
    """Guard for the fixtures: with default BN a bias-free ReLU net is positively homogeneous, so IG
    with a zero baseline would equal gradient × input and the IG tests would prove little."""
    x = images(2)
    fresh = make_model("small_cnn")
    torch.manual_seed(0)
    plain = build_backbone("small_cnn", 4, width=8).eval()
    ig = create("integrated_gradients", plain, steps=8).attribute(x, 1)
    gxi = create("gradient_x_input", plain).attribute(x, 1)
    torch.testing.assert_close(ig, gxi, rtol=1e-4, atol=1e-6)
    ig = create("integrated_gradients", fresh, steps=8).attribute(x, 1)
    gxi = create("gradient_x_input", fresh).attribute(x, 1)
    assert (ig - gxi).abs().max() > 0.05 * _scale(gxi)
