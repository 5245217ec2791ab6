"""The rest of pytorch-grad-cam's CAM family, and the options every CAM shares (multi-layer fusion,
aug_smooth, eigen_smooth), against pytorch-grad-cam's classes of the same names and by hand.

Model: torchvision ResNet-18 (random weights, randomised BatchNorm — fresh BN would zero
FullGrad's bias terms), eval, three 64 px images, three distinct classes.

Comparison convention (as tests/explainers/test_cam.py): pytorch-grad-cam returns [0,1] maps,
xaudit raw ones unless ``normalize=True``, so ours are built with ``normalize=True``. Tolerance
per image, absolute on [0,1] maps, rtol 0: pytorch-grad-cam scales twice, each time adding 1e-7
to the range, we once (≤ 1e-7·(1+s)/s for a raw map of range s, doubled), plus 4e-6 for float32
summation order (numpy vs torch; FullGrad sums ~20 [0,1] terms) and cv2-vs-torch bilinear
resizing (~6e-8). Measured: ≤ 1e-6 for the channel weightings, ≤ 2.4e-6 for FullGrad.
"""

from __future__ import annotations

import copy
import os

os.environ.setdefault("TQDM_DISABLE", "1")  # pytorch-grad-cam's Ablation-CAM draws progress bars

import numpy as np
import pytest
import pytorch_grad_cam as pgc
import torch
import torchvision
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from pytorch_grad_cam.utils.svd_on_activations import get_2d_projection
from torch import nn

import xaudit.explainers.cam  # noqa: F401  (registers the CAM family)
from xaudit.explainers import create
from xaudit.explainers.cam import first_principal_component

from explainer_helpers import randomize_batchnorm

TARGET = torch.tensor([1, 4, 7])
REFERENCES = {"hires_cam": pgc.HiResCAM, "xgrad_cam": pgc.XGradCAM, "layer_cam": pgc.LayerCAM,
              "eigen_cam": pgc.EigenCAM, "eigen_grad_cam": pgc.EigenGradCAM,
              "grad_cam_elementwise": pgc.GradCAMElementWise, "ablation_cam": pgc.AblationCAM,
              "full_grad": pgc.FullGrad, "grad_cam": pgc.GradCAM, "grad_cam_pp": pgc.GradCAMPlusPlus}
NEW = ["hires_cam", "xgrad_cam", "layer_cam", "eigen_cam", "eigen_grad_cam", "grad_cam_elementwise",
       "ablation_cam", "full_grad"]


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(1))


def _reference(kind: str, model: nn.Module, layers: list[str], x: torch.Tensor, **kw: bool) -> torch.Tensor:
    ref_model = copy.deepcopy(model)  # pytorch-grad-cam calls model.eval() and hooks the model
    cam = REFERENCES[kind](ref_model, [ref_model.get_submodule(n) for n in layers])
    if kind == "ablation_cam":
        cam.batch_size = 128
    out = cam(x, [ClassifierOutputTarget(int(t)) for t in TARGET], **kw)
    cam.activations_and_grads.release()
    return torch.from_numpy(out)


def _ours(kind: str, model: nn.Module, layers: list[str], x: torch.Tensor, **kw: object) -> torch.Tensor:
    # eigen_sign="numpy": the principal component's sign as pytorch-grad-cam takes it (our default
    # orients it by the channel sum instead; test_positive_sign_rule_is_stable)
    layer = layers[0] if len(layers) == 1 else layers
    return create(kind, model, target_layer=layer, eigen_sign="numpy", **kw).attribute(x, TARGET)


def _bound(kind: str, model: nn.Module, layers: list[str], x: torch.Tensor) -> torch.Tensor:
    """Per-image tolerance (module docstring): the eps terms of every layer's raw range s."""
    bound = torch.full((x.shape[0],), 4e-6, dtype=torch.float64)
    for layer in layers:
        raw = _ours(kind, model, [layer], x).double()
        s = raw.flatten(1).amax(1) - raw.flatten(1).amin(1)
        bound += _eps_term(s)
        if kind == "ablation_cam":
            bound += _ablation_term(model, layer, x, s)
    return bound


def _ablation_term(model: nn.Module, layer: str, x: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """Ablation-CAM's weights are w_k = (y − y_k)/y. pytorch-grad-cam takes y from another forward
    (batch 3) than y_k (batch 128), so float32 kernels chosen per batch size round y differently
    (we take both from one forward): |δw_k| ≤ 8 ulp-scale·max|logit|/|y| on every channel, i.e.
    |δmap| ≤ that × Σ_k A_k per pixel, over the range s of the raw map."""
    acts = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda _m, _i, out: acts.setdefault("a", out))
    with torch.no_grad():
        logits = model(x).double()
    handle.remove()
    y = logits.gather(1, TARGET[:, None]).squeeze(1).abs()
    dw = 8 * torch.finfo(torch.float32).eps * logits.abs().amax(1) / y
    mass = acts["a"].double().sum(1).flatten(1).amax(1)
    return dw * mass / s.clamp(min=1e-30)


def _eps_term(s: torch.Tensor) -> torch.Tensor:
    # an all-negative map is 0 after the ReLU on both sides (pytorch-grad-cam: 0 / 1e-7): exact
    return torch.where(s > 0, 2e-7 * (1 + s) / s.clamp(min=1e-30), torch.zeros_like(s))


def _check(ours: torch.Tensor, ref: torch.Tensor, bound: torch.Tensor) -> None:
    assert ours.shape == ref.shape == (3, 64, 64)
    # flat maps would make the comparison vacuous: at least two of the three images have a real one
    assert int((ref.flatten(1).amax(1) - ref.flatten(1).amin(1) > 0.1).sum()) >= 2
    for i in range(3):
        torch.testing.assert_close(ours[i], ref[i], rtol=0, atol=float(bound[i]))


@pytest.mark.parametrize("kind", NEW)
def test_matches_pytorch_grad_cam(kind: str, resnet: nn.Module, x: torch.Tensor) -> None:
    layers = ["layer3"]
    ref = _reference(kind, resnet, layers, x)
    ours = _ours(kind, resnet, layers, x, normalize=True)
    _check(ours, ref, _bound(kind, resnet, layers, x))
    assert int((ours.flatten(1).amax(1) > 0.99).sum()) >= 2


# the options of the base, on methods that use them differently (channel weights, pixel weights,
# projections, gradient-free); Ablation-CAM's and FullGrad's own paths are covered above
OPTION_KINDS = ["grad_cam", "grad_cam_pp", "hires_cam", "layer_cam", "eigen_grad_cam", "full_grad"]


@pytest.mark.parametrize("kind", OPTION_KINDS)
def test_multi_layer_fusion_matches_pytorch_grad_cam(kind: str, resnet: nn.Module, x: torch.Tensor) -> None:
    layers = ["layer3", "layer4"]
    ref = _reference(kind, resnet, layers, x)
    ours = _ours(kind, resnet, layers, x, normalize=True)
    _check(ours, ref, _bound(kind, resnet, layers if kind != "full_grad" else layers[:1], x))


@pytest.mark.parametrize("kind", OPTION_KINDS)
def test_eigen_smooth_matches_pytorch_grad_cam(kind: str, resnet: nn.Module, x: torch.Tensor) -> None:
    ref = _reference(kind, resnet, ["layer3"], x, eigen_smooth=True)
    ours = _ours(kind, resnet, ["layer3"], x, normalize=True, eigen_smooth=True)
    # the raw map's range: the projection's (a different map from the plain one)
    raw = _ours(kind, resnet, ["layer3"], x, eigen_smooth=True)
    _check(ours, ref, 4e-6 + _eps_term(raw.flatten(1).amax(1) - raw.flatten(1).amin(1)))


@pytest.mark.parametrize("kind", OPTION_KINDS)
def test_aug_smooth_matches_pytorch_grad_cam(kind: str, resnet: nn.Module, x: torch.Tensor) -> None:
    ref = _reference(kind, resnet, ["layer3"], x, aug_smooth=True)
    ours = _ours(kind, resnet, ["layer3"], x, normalize=True, aug_smooth=True)
    # a mean of 6 normalised maps: each within the single-pass bound of its own (augmented) map;
    # the un-augmented map's range stands in for them (the ×0.9/×1.1 copies only rescale it ~10 %)
    _check(ours, ref, 2 * _bound(kind, resnet, ["layer3"], x))


def test_eigen_cam_with_more_positions_than_channels(resnet: nn.Module, x: torch.Tensor) -> None:
    """layer1 at 64 px: 16×16 = 256 positions > 64 channels (the other shape of the SVD)."""
    ref = _reference("eigen_cam", resnet, ["layer1"], x)
    ours = _ours("eigen_cam", resnet, ["layer1"], x, normalize=True)
    _check(ours, ref, _bound("eigen_cam", resnet, ["layer1"], x))


def _layer_and_grad(model: nn.Module, layer: str, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    acts = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: acts.update(a=o))
    try:
        logits = model(x)
    finally:
        handle.remove()
    (g,) = torch.autograd.grad(logits.gather(1, TARGET[:, None]).sum(), acts["a"])
    return acts["a"].detach(), g


def test_hires_layer_xgrad_and_elementwise_equal_hand_computations(resnet: nn.Module, x: torch.Tensor) -> None:
    """Raw maps (no scaling) against the formulas, float64 model and input."""
    model, xd = copy.deepcopy(resnet).double(), x.double()
    a, g = _layer_and_grad(model, "layer3", xd)
    up = lambda m: nn.functional.interpolate(m[:, None], size=(64, 64), mode="bilinear")[:, 0]  # noqa: E731
    expect = {
        "hires_cam": (g * a).sum(1).clamp(min=0),
        "layer_cam": (g.clamp(min=0) * a).sum(1).clamp(min=0),
        "grad_cam_elementwise": (g * a).clamp(min=0).sum(1),
        "xgrad_cam": ((g * a / (a.sum((2, 3), keepdim=True) + 1e-7)).sum((2, 3))[:, :, None, None] * a)
        .sum(1).clamp(min=0),
    }
    for kind, e in expect.items():
        torch.testing.assert_close(_ours(kind, model, ["layer3"], xd), up(e), rtol=1e-10, atol=1e-12)


def test_first_principal_component_is_the_svd_projection() -> None:
    """Up to its arbitrary sign the projection is the top eigenvector of the positions' covariance
    (an independent route: torch.linalg.eigh); the sign is numpy's, i.e. pytorch-grad-cam's."""
    a = torch.randn(4, 32, 5, 6, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    got = first_principal_component(a, sign="numpy")
    m = a.flatten(2).transpose(1, 2)
    m = m - m.mean(1, keepdim=True)
    v = torch.linalg.eigh(m.transpose(1, 2) @ m).eigenvectors[:, :, -1]
    hand = (m @ v[:, :, None]).reshape(4, 5, 6)
    torch.testing.assert_close(got.abs(), hand.abs(), rtol=1e-9, atol=1e-9)
    np.testing.assert_allclose(got.numpy(), get_2d_projection(a.numpy()), rtol=1e-5, atol=1e-5)


def test_positive_sign_rule_is_stable() -> None:
    """The default orientation: the same projection up to sign, correlated positively with the centred
    channel sum, and unchanged by a rounding-level change of the input (where numpy's sign may flip)."""
    a = torch.randn(6, 32, 5, 6, generator=torch.Generator().manual_seed(4), dtype=torch.float64)
    got = first_principal_component(a)
    torch.testing.assert_close(got.abs(), first_principal_component(a, sign="numpy").abs(), rtol=1e-12, atol=1e-12)
    m = a.flatten(2).transpose(1, 2)
    m = m - m.mean(1, keepdim=True)
    assert ((got.flatten(1) * m.sum(-1)).sum(-1) > 0).all()
    flipped = first_principal_component(a * (1 + 1e-12))
    assert torch.equal(torch.sign(flipped), torch.sign(got))
    with pytest.raises(ValueError, match="eigen_sign"):
        first_principal_component(a, sign="svd")


def test_ablation_weights_equal_zeroing_each_channel(resnet: nn.Module, x: torch.Tensor) -> None:
    """w_k = (y − y_k)/y with channel k of layer4 set to 0 (post-ReLU: pytorch-grad-cam's value).
    float64: y − y_k cancels, so float32 rounding of the logits would dominate."""
    resnet, x = copy.deepcopy(resnet).double(), x.double()
    a, _ = _layer_and_grad(resnet, "layer4", x)
    assert (a.flatten(1).amin(1) == 0).all()
    with torch.no_grad():
        y = resnet(x).gather(1, TARGET[:, None])[:, 0]
        head = lambda t: resnet.fc(t.mean((2, 3)))  # noqa: E731  (ResNet after layer4)
        k = a.shape[1]
        ablated = a[:, None].repeat(1, k, 1, 1, 1)
        ablated[:, torch.arange(k), torch.arange(k)] = 0
        yk = head(ablated.flatten(0, 1)).view(3, k, -1).gather(2, TARGET[:, None, None].expand(3, k, 1))[..., 0]
        w = (y[:, None] - yk) / y[:, None]
        expect = nn.functional.interpolate(torch.einsum("bk,bkhw->bhw", w, a)[:, None].clamp(min=0),
                                           size=(64, 64), mode="bilinear")[:, 0]
    for ibs in (7, 4096):  # chunks across images, and everything in one forward
        got = _ours("ablation_cam", resnet, ["layer4"], x, internal_batch_size=ibs)
        torch.testing.assert_close(got, expect, rtol=1e-9, atol=1e-9 * float(expect.abs().max()))


def test_multi_layer_option_is_a_list_and_fusion_uses_one_forward(resnet: nn.Module, x: torch.Tensor) -> None:
    calls = []
    handle = resnet.register_forward_hook(lambda m, i, o: calls.append(1))
    try:
        e = create("grad_cam", resnet, target_layer=["layer3", "layer4"])
        out = e.attribute(x, TARGET)
    finally:
        handle.remove()
    assert e.target_layers == ["layer3", "layer4"] and len(calls) == 1
    assert out.shape == (3, 64, 64) and float(out.min()) >= 0 and float(out.max()) <= 1
