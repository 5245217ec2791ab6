"""Saliency and integrated gradients on vision transformers against Captum, in float32 and float64.

Same comparisons as the CNN parity tests in test_gradient.py (same Captum calls, steps, Riemann
rules, baselines and chunking), on a tiny timm ViT (the project's ``vit_tiny``) and a tiny
torchvision Swin with random weights. Attention's softmax, LayerNorm and GELU are smooth, so the
two implementations differ only by floating-point summation order.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
from captum.attr import IntegratedGradients, Saliency
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer

from xaudit.explainers import create
from xaudit.explainers.fills import make_fill
from xaudit.models import build_backbone

from explainer_helpers import images

TARGET = torch.tensor([0, 3, 2])
# relative tolerance, and absolute tolerance as a fraction of the reference map's largest value:
# float32 as test_gradient.py (saliency 1e-5 / 1e-6, IG 1e-4 / 1e-5); float64 ~1e-16 rounding, so 1e-9 / 1e-10
TOL = {torch.float32: {"saliency": (1e-5, 1e-6), "ig": (1e-4, 1e-5)},
       torch.float64: {"saliency": (1e-9, 1e-10), "ig": (1e-9, 1e-10)}}


def _unit_head(model: nn.Module) -> nn.Module:
    """Eval mode, and a classifier with unit-scale weights (timm's and torchvision's 0.02-std / zero
    heads give gradients near float32 rounding, which would make the comparison vacuous)."""
    model.eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    return model


def vit_tiny() -> nn.Module:
    torch.manual_seed(0)
    return _unit_head(build_backbone("vit_tiny", 4, image_size=32, width=32, patch_size=8, depth=2, num_heads=2))


def swin() -> nn.Module:  # as test_token_cam.py, at 32 px
    torch.manual_seed(0)
    return _unit_head(SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
                                      window_size=[4, 4], num_classes=4))


MODELS: dict[str, Callable[[], nn.Module]] = {"vit_tiny": vit_tiny, "swin": swin}
DTYPES = [torch.float32, torch.float64]


def _setup(name: str, dtype: torch.dtype) -> tuple[nn.Module, torch.Tensor]:
    model = MODELS[name]().to(dtype)
    return model, images(3, size=32, seed=4).to(dtype)


def _scale(a: torch.Tensor) -> float:
    return float(a.detach().abs().max())


def _captum_input(x: torch.Tensor) -> torch.Tensor:
    return x.clone().requires_grad_(True)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("name", MODELS)
def test_saliency_matches_captum_on_transformers(name: str, dtype: torch.dtype) -> None:
    model, x = _setup(name, dtype)
    rtol, frac = TOL[dtype]["saliency"]
    for abs_ in (True, False):
        ours = create("saliency", model, abs=abs_).attribute(x, TARGET, reduce=None)
        ref = Saliency(model).attribute(_captum_input(x), target=TARGET, abs=abs_)
        assert ours.dtype == ref.dtype == dtype
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=frac * _scale(ref))
    # the default map: Simonyan's max over channels of |gradient|
    sal = create("saliency", model).attribute(x, TARGET)
    ref = Saliency(model).attribute(_captum_input(x), target=TARGET, abs=True).amax(1)
    assert sal.shape == (3, 32, 32)
    torch.testing.assert_close(sal, ref, rtol=rtol, atol=frac * _scale(ref))
    # distinct targets give distinct maps (the comparison is not of one map three times)
    other = create("saliency", model).attribute(x, (TARGET + 1) % 4)
    assert (other - sal).abs().max() > 0.01 * _scale(sal)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("method", ["riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid"])
@pytest.mark.parametrize("name", MODELS)
def test_integrated_gradients_matches_captum_on_transformers(name: str, method: str, dtype: torch.dtype) -> None:
    model, x = _setup(name, dtype)
    rtol, frac = TOL[dtype]["ig"]
    for baseline in ("zero", "mean", "blur"):
        # as test_gradient.py: ours chunks 16 steps x 3 images as 5 images per forward, Captum runs all 48
        ours = create("integrated_gradients", model, steps=16, method=method, baseline=baseline,
                      internal_batch_size=5).attribute(x, TARGET, reduce=None)
        ref = IntegratedGradients(model).attribute(_captum_input(x), baselines=make_fill(x, baseline),
                                                   target=TARGET, n_steps=16, method=method).detach()
        if method == "riemann_trapezoid":
            ref = ref * 16 / 15  # Captum's trapezoid weights are 1/n, ours the rule's 1/(n-1): see test_gradient.py
        assert ours.dtype == ref.dtype == dtype
        torch.testing.assert_close(ours, ref, rtol=rtol, atol=frac * _scale(ref))
