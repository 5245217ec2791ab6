"""SmoothGrad against Captum's NoiseTunnel with the same noise; seeding and noise scale."""

from __future__ import annotations

import warnings
from typing import Any

import pytest
import torch
from captum.attr import NoiseTunnel, Saliency

from xaudit.explainers import SmoothGrad, create

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


@pytest.mark.parametrize(("variant", "nt_type"), [("sg", "smoothgrad"), ("sg2", "smoothgrad_sq"),
                                                  ("vargrad", "vargrad")])
def test_matches_captum_noise_tunnel_with_the_same_noise(variant: str, nt_type: str, get_model: Any) -> None:
    model = get_model("resnet18")
    x = images(2)
    ours = _ReplayedCaptumNoise(model, base="saliency", n=N, variant=variant,
                                internal_batch_size=5).attribute(x, TARGET, reduce=None)
    torch.manual_seed(SEED)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        ref = NoiseTunnel(Saliency(model)).attribute(x.clone().requires_grad_(True), nt_type=nt_type,
                                                     nt_samples=N, stdevs=STDEV, target=TARGET).detach()
    # same noisy inputs and gradients; means of 6 terms summed in another order (float32)
    torch.testing.assert_close(ours, ref, rtol=1e-4, atol=1e-5 * float(ref.abs().max()))


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
