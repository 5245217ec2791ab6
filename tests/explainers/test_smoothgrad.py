"""SmoothGrad against Captum's NoiseTunnel with the same noise (signed gradients, the default, and
|gradients|, base="saliency"), a VarGrad known answer that tells the two apart, aggregation before
the channel reduction, seeding and noise scale."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency
from torch import nn

from xaudit.explainers import SmoothGrad, create
from xaudit.utils.errors import ConfigError

from explainer_helpers import images

TARGET = torch.tensor([1, 2])
N, STDEV, SEED = 6, 0.3, 1234


class _ReplayedCaptumNoise(SmoothGrad):
    """SmoothGrad fed the exact noise Captum's NoiseTunnel draws after ``torch.manual_seed(SEED)``."""

    def noise(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        torch.manual_seed(SEED)
        # NoiseTunnel: torch.normal(0, stdev) over [B·n, ...], rows ordered sample-major (repeat_interleave)
        eps = torch.normal(0, torch.tensor(STDEV).repeat((b * self.n, *x.shape[1:])))
        return eps.view(b, self.n, *x.shape[1:]).transpose(0, 1)


@pytest.mark.parametrize(("base", "captum_abs"), [("gradient", False), ("saliency", True)])
@pytest.mark.parametrize(("variant", "nt_type"), [("sg", "smoothgrad"), ("sg2", "smoothgrad_sq"),
                                                  ("vargrad", "vargrad")])
def test_matches_captum_noise_tunnel_with_the_same_noise(variant: str, nt_type: str, base: str, captum_abs: bool,
                                                         get_model: Any) -> None:
    """The default base (signed gradients) is NoiseTunnel(Saliency) with abs=False; base="saliency"
    (|gradients|) is Captum's default abs=True."""
    model = get_model("resnet18")
    x = images(2)
    ours = _ReplayedCaptumNoise(model, base=base, n=N, variant=variant,
                                internal_batch_size=5).attribute(x, TARGET, reduce=None)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NoiseTunnel(Saliency(model)).attribute(x.clone().requires_grad_(True), nt_type=nt_type,
                                                     nt_samples=N, stdevs=STDEV, target=TARGET,
                                                     abs=captum_abs).detach()
    # same noisy inputs and gradients; means of 6 terms summed in another order, and VarGrad as a
    # merged sum of squared deviations where Captum takes E[a²] − E[a]² (float32)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))
    if base == "gradient" and variant == "sg":
        assert (ref < 0).any(), "signed gradients: the parity must cover negative values"


class _SquaredProjection(nn.Module):
    """Class 0: (w·x)²; its gradient 2(w·x)·w flips sign with the noise where w·x = 0."""

    def __init__(self, shape: tuple[int, int, int] = (3, 8, 8)) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(*shape, generator=torch.Generator().manual_seed(11),
                                               dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.weight).flatten(1).sum(1)
        return torch.stack([s * s, -s * s], 1)


def test_vargrad_known_answer_tells_signed_from_absolute_gradients() -> None:
    """f(x) = (w·x)² at w·x = 0: the noisy gradients g_k = 2 a_k w with a_k = w·(x + ε_k) are
    symmetric around 0. VarGrad of the signed gradients (Hooker et al., 2019; the default) is
    4w²·Var_k(a_k); of |g| (base="saliency") it is 4w²·Var_k(|a_k|) ≈ (1 − 2/π)× that for
    Gaussian a. Both computed here from the explainer's own noise (float64): asserted to 1e-9
    relative (measured ≤7e-16), and the two answers differ by a factor > 2 (1/(1 − 2/π) ≈ 2.75 in
    expectation; 3.09 with this noise)."""
    model = _SquaredProjection()
    w = model.weight.detach()
    x = torch.randn(2, 3, 8, 8, generator=torch.Generator().manual_seed(12), dtype=torch.float64)
    x = x - ((x * w).flatten(1).sum(1) / (w * w).sum()).view(2, 1, 1, 1) * w  # w·x = 0
    signed = create("smoothgrad", model, variant="vargrad", n=64, sigma=0.2, seed=5, internal_batch_size=30)
    absolute = create("smoothgrad", model, base="saliency", variant="vargrad", n=64, sigma=0.2, seed=5,
                      internal_batch_size=30)
    a = ((x[None] + signed.noise(x)) * w).flatten(2).sum(2)  # [n,B]
    assert bool((a > 0).any(0).all() and (a < 0).any(0).all()), "the gradient's sign must flip with the noise"

    def population_var(v: torch.Tensor) -> torch.Tensor:
        return (v - v.mean(0)).pow(2).mean(0)

    expect_signed = 4 * w * w * population_var(a).view(2, 1, 1, 1)
    expect_abs = 4 * w * w * population_var(a.abs()).view(2, 1, 1, 1)
    got_signed = signed.attribute(x, 0, reduce=None)
    got_abs = absolute.attribute(x, 0, reduce=None)
    torch.testing.assert_close(got_signed, expect_signed, rtol=1e-9, atol=0)
    torch.testing.assert_close(got_abs, expect_abs, rtol=1e-9, atol=0)
    ratio = population_var(a) / population_var(a.abs())
    assert bool((ratio > 2).all()), f"signed vs |grad| VarGrad should differ clearly; ratio {ratio.tolist()}"
    # the default map: the per-channel variance, then the channel sum (ROAR's reduction comes after)
    torch.testing.assert_close(signed.attribute(x, 0), expect_signed.sum(1), rtol=1e-9, atol=0)


@pytest.mark.parametrize("variant", ["sg", "sg2", "vargrad"])
def test_default_aggregates_signed_gradients_per_channel_then_reduces(variant: str, get_model: Any) -> None:
    """Hooker et al. (2019): mean / mean of squares / variance of the raw signed gradients over the
    noise, per channel, and only then the channel reduction (the sum). A hand loop over the
    explainer's noise with torch.autograd; float32, tolerance 1e-5 of the largest value."""
    model = get_model("small_cnn")
    x = images(2)
    sg = create("smoothgrad", model, variant=variant, n=5, sigma=0.2, seed=3)
    assert sg.base_name == "gradient" and sg.base.abs is False and sg.default_reduce == "sum"
    grads = []
    for eps in sg.noise(x):
        xi = (x + eps).requires_grad_(True)
        (g,) = torch.autograd.grad(model(xi)[torch.arange(2), TARGET].sum(), xi)
        grads.append(g)
    g = torch.stack(grads)
    per_channel = {"sg": g.mean(0), "sg2": (g * g).mean(0), "vargrad": g.var(0, unbiased=False)}[variant]
    scale = float(per_channel.abs().max())
    torch.testing.assert_close(sg.attribute(x, TARGET, reduce=None), per_channel, rtol=1e-5, atol=1e-5 * scale)
    torch.testing.assert_close(sg.attribute(x, TARGET), per_channel.sum(1), rtol=1e-5, atol=1e-5 * scale)
    if variant == "sg":
        assert (per_channel < 0).any()  # signed: not |grad| averaged
    else:
        assert (per_channel >= 0).all()


def test_base_options() -> None:
    net = nn.Sequential(nn.Conv2d(3, 2, 1), nn.Flatten(), nn.LazyLinear(2))
    assert create("smoothgrad", net, base="saliency").base.abs is True  # the earlier default: |∂y/∂x|
    assert create("smoothgrad", net, base="saliency").default_reduce == "max_abs"
    assert create("smoothgrad", net, base="saliency", abs=False).default_reduce == "sum"
    with pytest.raises(ConfigError, match=r"base='gradient' is the signed raw gradient and takes no options"):
        create("smoothgrad", net, base="gradient", abs=True)
    with pytest.raises(ConfigError, match="Unknown explainer 'gradiant'"):
        create("smoothgrad", net, base="gradiant")


def test_average_of_the_base_over_its_own_noise(get_model: Any) -> None:
    """What SmoothGrad computes with its seeded noise: the mean of the base over x + noise."""
    model = get_model("small_cnn")
    x = images(2)
    sg = create("smoothgrad", model, base="gradient_x_input", n=5, sigma=0.2, seed=3)
    noise = sg.noise(x)
    base = create("gradient_x_input", model)
    expect = torch.stack([base.attribute(x + e, TARGET, reduce=None) for e in noise]).mean(0)
    torch.testing.assert_close(sg.attribute(x, TARGET, reduce=None), expect, rtol=1e-5,
                               atol=1e-6 * float(expect.abs().max()))
    # default reduction is the base's (channel sum for gradient × input)
    torch.testing.assert_close(sg.attribute(x, TARGET), expect.sum(1), rtol=1e-5, atol=1e-6 * float(expect.abs().max()))


def test_noise_is_seeded_local_and_scaled_to_each_image_range() -> None:
    x = images(2) * torch.tensor([1.0, 3.0]).view(2, 1, 1, 1)
    sg = SmoothGrad(torch.nn.Conv2d(3, 1, 1), n=200, sigma=0.1, seed=7)
    rng = torch.get_rng_state()
    a, b = sg.noise(x), sg.noise(x)
    assert torch.equal(a, b) and torch.equal(torch.get_rng_state(), rng)
    assert not torch.equal(a, SmoothGrad(torch.nn.Conv2d(3, 1, 1), n=200, sigma=0.1, seed=8).noise(x))
    ranges = x.flatten(1).amax(1) - x.flatten(1).amin(1)
    std = a.transpose(0, 1).flatten(1).std(1)
    torch.testing.assert_close(std, 0.1 * ranges, rtol=0.01, atol=0)  # 200·3·32·32 samples: ±0.2 %


def test_other_bases_and_chunking(get_model: Any) -> None:
    model = get_model("small_cnn")
    x = images(3)
    t = torch.tensor([0, 1, 2])
    one = create("smoothgrad", model, base="integrated_gradients", steps=4, n=3, internal_batch_size=1)
    many = create("smoothgrad", model, base="integrated_gradients", steps=4, n=3, internal_batch_size=100)
    ref = one.attribute(x, t)
    torch.testing.assert_close(many.attribute(x, t), ref, rtol=1e-5, atol=1e-6 * float(ref.abs().max()))
    cam = create("smoothgrad", model, base="grad_cam", n=3).attribute(x, t)
    assert cam.shape == (3, 32, 32) and (cam >= 0).all()
