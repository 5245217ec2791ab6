"""Odd but legal inputs give the right answer, each checked against the plain case.

Half precision and bfloat16 input, channels_last and non-contiguous tensors, a model with in-place
ReLUs, a model left in train mode with dropout, grayscale input — on every method. (Batch size 1 vs
the same row in a batch is part of the contract test, tests/explainers/test_contract.py.)
"""

from __future__ import annotations

import copy
import warnings
from typing import Any

import pytest
import torch
from torch import nn

from xaudit.explainers import create
from xaudit.models.backbones import build_backbone

from explainer_helpers import GENERIC_METHODS, images, make_model, method_kw, randomize_batchnorm

METHODS = GENERIC_METHODS  # model-specific explainers (senn) are covered in test_contract
# float32 reference vs the same computation on a channels_last / strided copy: convolution kernels
# may sum in another order, so allow float32 rounding relative to the map's scale.
LAYOUT_RTOL = 1e-4


def explain(model: nn.Module, method: str, x: torch.Tensor, target: Any = 1, **kw: Any) -> torch.Tensor:
    return create(method, model, **{**method_kw(method, "small_cnn"), **kw}).attribute(x, target)


def close_to_scale(actual: torch.Tensor, expected: torch.Tensor, rtol: float) -> None:
    """``actual`` equals ``expected`` up to ``rtol`` × the largest |value| of ``expected``."""
    scale = float(expected.abs().max()) or 1.0
    torch.testing.assert_close(actual, expected, rtol=0, atol=rtol * scale)


@pytest.fixture(scope="module")
def model() -> nn.Module:
    return make_model("small_cnn")


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("method", METHODS)
def test_low_precision_input_is_explained_in_the_models_precision(method: str, dtype: torch.dtype,
                                                                  model: nn.Module) -> None:
    """An fp32 model given fp16/bf16 images explains them in fp32 and returns the map in the input's
    dtype: exactly the plain fp32 map of the same (rounded) images, rounded once at the end."""
    x = images(2).to(dtype)
    attr = explain(model, method, x)
    assert attr.dtype == dtype
    expected = explain(model, method, x.float()).to(dtype)
    torch.testing.assert_close(attr, expected, rtol=0, atol=0)


@pytest.mark.parametrize("method", METHODS)
def test_channels_last_and_non_contiguous_inputs(method: str, model: nn.Module) -> None:
    x = images(2)
    plain = explain(model, method, x)
    channels_last = x.to(memory_format=torch.channels_last)
    assert not channels_last.is_contiguous()
    close_to_scale(explain(model, method, channels_last), plain, LAYOUT_RTOL)
    wide = torch.zeros(2, 3, 32, 64)
    wide[..., ::2] = x
    strided = wide[..., ::2]  # a view with stride 2 along W
    assert not strided.is_contiguous() and torch.equal(strided, x)
    close_to_scale(explain(model, method, strided), plain, LAYOUT_RTOL)


def _without_inplace(model: nn.Module) -> nn.Module:
    out = copy.deepcopy(model)
    for m in out.modules():
        if isinstance(m, nn.ReLU):
            m.inplace = False
    return out


@pytest.mark.parametrize("method", METHODS)
def test_inplace_relu_model_gives_the_same_maps(method: str, model: nn.Module) -> None:
    assert any(isinstance(m, nn.ReLU) and m.inplace for m in model.modules())  # small_cnn uses inplace ReLU
    x = images(2)
    close_to_scale(explain(model, method, x), explain(_without_inplace(model), method, x), 1e-5)


class DropoutCNN(nn.Module):
    """small_cnn features → dropout → linear: the classic MC-dropout-style head."""

    def __init__(self, base: nn.Module) -> None:
        super().__init__()
        self.features, self.avgpool = base.features, base.avgpool
        self.drop = nn.Dropout(0.5)
        self.fc = base.fc
        self.default_target_layer = "features.block5"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.drop(torch.flatten(self.avgpool(self.features(x)), 1)))


@pytest.mark.parametrize("method", METHODS)
def test_train_mode_dropout_is_switched_off_with_a_warning(method: str, model: nn.Module) -> None:
    """Left in train mode, dropout would make every forward a different network; the explainer
    says so, switches dropout off while explaining and restores train mode afterwards."""
    net = DropoutCNN(copy.deepcopy(model)).eval()
    x = images(2)
    expected = explain(net, method, x)
    net.drop.train()
    rng = torch.get_rng_state()
    with pytest.warns(UserWarning, match=r"1 dropout module\(s\) in train mode.*model\.eval\(\)"):
        attr = explain(net, method, x)
    assert net.drop.training and not net.features.training
    torch.testing.assert_close(torch.get_rng_state(), rng)
    close_to_scale(attr, expected, 1e-6)


def test_eval_mode_model_gives_no_dropout_warning(model: nn.Module) -> None:
    net = DropoutCNN(copy.deepcopy(model)).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        explain(net, "saliency", images(1))


def _grayscale_and_rgb_twin() -> tuple[nn.Module, nn.Module]:
    """A 1-channel model and a 3-channel twin whose first conv splits each weight over RGB:
    rgb(x.repeat(1, 3, 1, 1)) == gray(x) for every x."""
    torch.manual_seed(0)
    gray = randomize_batchnorm(build_backbone("small_cnn", 4, in_chans=1, width=8)).eval()
    rgb = randomize_batchnorm(build_backbone("small_cnn", 4, in_chans=3, width=8)).eval()
    rgb.load_state_dict({k: (v.repeat(1, 3, 1, 1) / 3 if k == "features.block1.0.weight" else v)
                         for k, v in gray.state_dict().items()})
    return gray, rgb


# Methods whose map is unchanged when a grayscale image is fed as three equal channels to the twin:
# channel-free maps (CAM family, perturbations that mask all channels alike) and sums over channels of
# gradients or gradient × input (f_gray(x) = f_rgb(repeat(x)), so ∇_x f_gray = Σ_c ∂f_rgb/∂x_c).
GRAY_EQUAL: dict[str, dict[str, Any]] = {
    "cam": {}, "grad_cam": {}, "grad_cam_pp": {}, "score_cam": {}, "occlusion": {}, "rise": {},
    "saliency": {"reduce": "sum", "abs": False},
    "gradient_x_input": {"reduce": "sum"},
    "integrated_gradients": {"reduce": "sum"},
    "layer_integrated_gradients": {}, "layer_conductance": {}, "layer_gradient_x_activation": {},
    "neuron_gradient": {"reduce": "sum"}, "neuron_integrated_gradients": {"reduce": "sum"},
}


@pytest.mark.parametrize("method", METHODS)
def test_grayscale_input(method: str) -> None:
    gray, rgb = _grayscale_and_rgb_twin()
    x = images(2, channels=1)
    x3 = x.repeat(1, 3, 1, 1)
    torch.testing.assert_close(gray(x), rgb(x3), rtol=1e-5, atol=1e-5)
    kw = {k: v for k, v in method_kw(method, "small_cnn").items() if k not in ("fit_data",)}
    if "fit_data" in method_kw(method, "small_cnn"):
        kw["fit_data"] = images(8, channels=1, seed=3)
    opts = GRAY_EQUAL.get(method)
    reduce = (opts or {}).get("reduce", "auto")
    create_kw = {k: v for k, v in (opts or {}).items() if k != "reduce"}
    attr = create(method, gray, **kw, **create_kw).attribute(x, 1, reduce=reduce)
    assert attr.shape == (2, 32, 32) and torch.isfinite(attr).all()
    if opts is not None:
        twin = create(method, rgb, **kw, **create_kw).attribute(x3, 1, reduce=reduce)
        close_to_scale(attr, twin, 1e-4)
