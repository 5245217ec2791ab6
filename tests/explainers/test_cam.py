"""CAM family against pytorch-grad-cam on the same layer, CAM against a hand computation."""

from __future__ import annotations

import copy
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, GuidedBackpropReLUModel, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from torch import nn

from xaudit.explainers import UnsupportedModelError, create

from explainer_helpers import images, make_model

TARGET = torch.tensor([0, 3])
# layers with ≥4×4 maps at 32 px (resnet18's layer4 is 1×1 there), narrow enough that Score-CAM's
# one-forward-per-channel reference stays fast
LAYERS = {"resnet18": "layer2", "vgg11_bn": "features.13", "small_cnn": "features.block5"}
REFERENCES = {"grad_cam": GradCAM, "grad_cam_pp": GradCAMPlusPlus, "score_cam": ScoreCAM}


def _reference_cam(kind: str, model: nn.Module, layer: str, x: torch.Tensor) -> torch.Tensor:
    ref_model = copy.deepcopy(model)  # pytorch-grad-cam calls model.eval() and hooks the model
    cam = REFERENCES[kind](ref_model, [ref_model.get_submodule(layer)])
    if kind == "score_cam":
        cam.batch_size = 64
    out = cam(x, [ClassifierOutputTarget(int(t)) for t in TARGET])
    cam.activations_and_grads.release()
    return torch.from_numpy(out)


CASES = [(kind, m) for kind in sorted(REFERENCES) for m in ("resnet18", "vgg11_bn", "small_cnn")
         # pytorch-grad-cam's Score-CAM needs one vgg forward per channel: too slow for CI on vgg
         if (kind, m) != ("score_cam", "vgg11_bn")]


def _eps_bound(spread: float) -> float:
    """|ours − pytorch-grad-cam| bound for a normalised map of that raw spread (see below)."""
    return 2 * (1e-6 + 1e-7 * (1 + spread) / spread)


@pytest.mark.parametrize(("kind", "model_name"), CASES)
def test_cam_methods_match_pytorch_grad_cam(kind: str, model_name: str, get_model: Any) -> None:
    model = get_model(model_name)
    layer = LAYERS[model_name]
    x = images(2, seed=5)
    ref = _reference_cam(kind, model, layer, x)
    ours = create(kind, model, target_layer=layer, normalize=True).attribute(x, TARGET)
    raw = create(kind, model, target_layer=layer).attribute(x, TARGET)
    spread = raw.flatten(1).amax(1) - raw.flatten(1).amin(1)
    # pytorch-grad-cam min-max scales twice (before and after cv2.resize, each (v-min)/(max-min+1e-7));
    # we scale once, after upsampling. Bilinear resizing is affine-equivariant, so the two differ only
    # through the eps terms, by at most ~1e-7·(1+spread)/spread for a map of that spread; cv2 and
    # torch bilinear add float32 rounding (~1e-6). Tolerance per image: that bound, doubled.
    assert (spread > 1e-4).all(), "a flat map would make the comparison vacuous"
    for i in range(2):
        torch.testing.assert_close(ours[i], ref[i], rtol=0, atol=_eps_bound(float(spread[i])))
    assert (ours.flatten(1).amax(1) > 0.99).all()


@pytest.mark.parametrize("model_name", ["resnet18", "vgg11_bn"])
def test_guided_grad_cam_matches_pytorch_grad_cam(model_name: str, get_model: Any) -> None:
    """pytorch-grad-cam's recipe: its GradCAM map × its GuidedBackpropReLUModel gradient."""
    model = get_model(model_name)
    layer = LAYERS[model_name]
    x = images(2, seed=5)
    cam = _reference_cam("grad_cam", model, layer, x)
    guided = []
    for i in range(2):  # GuidedBackpropReLUModel explains one image at a time and swaps the ReLUs
        gb = GuidedBackpropReLUModel(copy.deepcopy(model), device="cpu")
        guided.append(torch.from_numpy(gb(x[i:i + 1].clone(), target_category=int(TARGET[i]))).permute(2, 0, 1))
    ref = cam[:, None] * torch.stack(guided)
    # ours one image at a time too: batch-size-dependent conv kernels round a pre-activation near 0
    # to either sign on vgg11_bn, which flips a guided-ReLU gate (an ulp-level effect, not a leak)
    ggc = create("guided_grad_cam", model, target_layer=layer, normalize=True)
    ours = torch.cat([ggc.attribute(x[i:i + 1], TARGET[i:i + 1], reduce=None) for i in range(2)])
    raw = create("grad_cam", model, target_layer=layer).attribute(x, TARGET)
    spread = raw.flatten(1).amax(1) - raw.flatten(1).amin(1)
    # the guided gradients agree to float rounding; the CAM factor to the eps bound of the test
    # above, so each image's error is that bound times its largest gradient
    for i in range(2):
        atol = _eps_bound(float(spread[i])) * float(guided[i].abs().max())
        torch.testing.assert_close(ours[i], ref[i], rtol=1e-5, atol=atol)
    assert ours.shape == (2, 3, 32, 32)


@pytest.mark.parametrize("model_name", ["small_cnn", "resnet18"])
def test_cam_equals_hand_computation(model_name: str) -> None:
    """CAM_c = Σ_k w_ck A_k with w the final linear layer (Zhou et al., 2016), upsampled bilinearly."""
    model = make_model(model_name, cifar_stem=True) if model_name == "resnet18" else make_model(model_name)
    layer = model.default_target_layer
    x = images(2, seed=1)
    with torch.no_grad():
        acts = {}
        handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.update(a=o.clone()))
        model(x)
        handle.remove()
        a = acts["a"]
        w = model.fc.weight[TARGET]
        cam = (w[:, :, None, None] * a).sum(1)
        expect = F.interpolate(cam[:, None], size=(32, 32), mode="bilinear", align_corners=False)[:, 0]
    assert a.shape[-1] >= 4, "a real spatial map"
    ours = create("cam", model).attribute(x, TARGET)
    # the same sum of products; float32 summation order only
    torch.testing.assert_close(ours, expect, rtol=1e-5, atol=1e-5 * float(expect.abs().max()))
    # with a GAP→linear head, Grad-CAM's weights are the same linear weights / (h·w): same map up to scale
    gc = create("grad_cam", model, relu=False).attribute(x, TARGET)
    hw = a.shape[-2] * a.shape[-1]
    torch.testing.assert_close(gc * hw, expect, rtol=1e-4, atol=1e-5 * float(expect.abs().max()))


def test_cam_without_gap_linear_head_is_a_clear_error(get_model: Any) -> None:
    # vgg11_bn with its ImageNet MLP head
    vgg = make_model("vgg11_bn", cifar_stem=False)
    with pytest.raises(UnsupportedModelError, match=r"global-average-pool → linear head.*grad_cam"):
        create("cam", vgg).attribute(images(1), 0)
    # CIFAR VGG: a max-pool sits between the default layer and the GAP; the layer feeding it works
    cifar_vgg = get_model("vgg11_bn")
    with pytest.raises(UnsupportedModelError, match=r"features\.27"):
        create("cam", cifar_vgg).attribute(images(1), 0)
    assert create("cam", cifar_vgg, target_layer="features.28").attribute(images(1), 0).shape == (1, 32, 32)


def test_feature_maps_are_the_layer_channels_upsampled(get_model: Any) -> None:
    model = get_model("small_cnn")
    x = images(2, seed=2)
    with torch.no_grad():
        a = model.features(x)
    up = F.interpolate(a, size=(32, 32), mode="bilinear", align_corners=False)
    got = create("feature_maps", model, channel=5).attribute(x, 0)
    torch.testing.assert_close(got, up[:, 5], rtol=1e-6, atol=1e-6)
    top = a.mean((2, 3)).argmax(1)
    got = create("feature_maps", model).attribute(x, 0)
    torch.testing.assert_close(got, up[torch.arange(2), top], rtol=1e-6, atol=1e-6)


def test_grad_cam_backprops_only_to_the_target_layer(get_model: Any) -> None:
    """Grad-CAM differentiates w.r.t. the layer activation: no conv before the layer runs backward."""
    model = get_model("resnet18")
    seen: list[str] = []
    handles = [m.register_full_backward_hook(lambda mod, gi, go, n=n: seen.append(n))
               for n, m in model.named_modules() if isinstance(m, nn.Conv2d)]
    try:
        create("grad_cam", model, target_layer="layer3").attribute(images(2), 0)
    finally:
        for h in handles:
            h.remove()
    assert seen, "the hooks see the backward through layer4"
    assert all(n.startswith("layer4.") for n in seen), f"backward reached {[n for n in seen if 'layer4' not in n]}"
