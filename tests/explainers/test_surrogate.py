"""LIME and KernelSHAP: parity with Captum on identical samples, exact Shapley values on known
games, seeded sampling, the torch segmentation, and the errors for bad superpixels."""

from __future__ import annotations

import itertools
import math
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import KernelShap, Lime
from captum.attr._core.lime import get_exp_kernel_similarity_function
from torch import nn

from xaudit.explainers import ExplainerInputError, create, segment
from xaudit.explainers.fills import make_fill
from xaudit.explainers.segmentation import grid_segments
from xaudit.utils.errors import ConfigError

from explainer_helpers import images, trained_shapes_cnn

TARGET = torch.tensor([2, 0])


def _replay(z: torch.Tensor) -> Any:
    """A Captum ``perturb_func`` (generator function) that yields our binary vectors in order."""

    def perturb(original_inp: torch.Tensor, **kwargs: Any) -> Any:
        for row in z:
            yield row[None].long().to(original_inp.device)

    return perturb


def _scale(a: torch.Tensor) -> float:
    return float(a.abs().max()) or 1.0


@pytest.mark.parametrize("distance", ["interpretable", "input"])
def test_lime_matches_captum_on_the_same_samples(distance: str, get_model: Any) -> None:
    """Same superpixels, samples, kernel, baseline and ridge (sklearn's, via Captum's SkLearnRidge).

    Captum fits float32 copies of the samples and scores, we fit float64: measured ≤3e-7 of the
    largest coefficient; asserted 1e-5."""
    model = get_model("resnet18")
    x = images(2, seed=4)
    lime = create("lime", model, n_samples=60, segmentation="grid", n_segments=9, kernel_width=0.5,
                  distance=distance, alpha=1.0, baseline="mean")
    ours = lime.attribute(x, TARGET)
    labels, counts = lime.superpixels(x)
    drawn = lime.samples(x, counts)
    fill = make_fill(x, "mean")
    for i in range(2):
        z = drawn[i][0]
        if distance == "input":
            similarity = get_exp_kernel_similarity_function("cosine", kernel_width=0.5)
        else:
            def similarity(orig: Any, pert: Any, interp: torch.Tensor, **kw: Any) -> float:
                d = 1 - F.cosine_similarity(interp.double(), torch.ones_like(interp, dtype=torch.float64))
                return float(torch.exp(-d**2 / (2 * 0.5**2)))
        ref = Lime(model, interpretable_model=SkLearnRidge(alpha=1.0), similarity_func=similarity,
                   perturb_func=_replay(z)).attribute(
            x[i:i + 1], target=int(TARGET[i]), baselines=fill[i:i + 1], feature_mask=labels[i][None, None],
            n_samples=z.shape[0], perturbations_per_eval=20)
        assert torch.equal(ref[:, 0], ref[:, 2])
        torch.testing.assert_close(ours[i], ref[0, 0], rtol=1e-5, atol=1e-5 * _scale(ours[i]))


def test_kernel_shap_matches_captum_on_the_same_samples(get_model: Any) -> None:
    """Captum approximates Σφ = f(x) − f(baseline) with weight 10⁶ on the full and empty coalitions
    (and fits float32), we impose it exactly: measured ≤5e-6 of the largest value; asserted 5e-5."""
    model = get_model("resnet18")
    x = images(2, seed=5)
    shap = create("kernel_shap", model, n_samples=80, segmentation="grid", n_segments=9)
    ours = shap.attribute(x, TARGET)
    labels, counts = shap.superpixels(x)
    drawn = shap.samples(x, counts)
    assert drawn[0][0].shape == (80, 9) and not torch.equal(drawn[0][0], drawn[1][0])
    for i in range(2):
        ks = KernelShap(model)
        ks.perturb_func = _replay(drawn[i][0])
        ref = ks.attribute(x[i:i + 1], target=int(TARGET[i]), baselines=0.0, feature_mask=labels[i][None, None],
                           n_samples=80, perturbations_per_eval=20)
        torch.testing.assert_close(ours[i], ref[0, 0], rtol=5e-5, atol=5e-5 * _scale(ours[i]))
    # efficiency holds for ours up to the float32 output
    with torch.no_grad():
        logits = model(x)[torch.arange(2), TARGET]
        base = model(torch.zeros_like(x))[torch.arange(2), TARGET]
    per_region = [torch.stack([ours[i][labels[i] == r][0] for r in range(counts[i])]) for i in range(2)]
    torch.testing.assert_close(torch.stack([p.sum() for p in per_region]), logits - base, rtol=1e-5, atol=1e-5)


class _Linear(nn.Module):
    """Class 0: Σ_p w_p · x_p over every pixel and channel (an additive game over any superpixels)."""

    def __init__(self, size: int = 16) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(3, size, size, generator=torch.Generator().manual_seed(7)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        s = (x * self.weight).flatten(1).sum(1)
        return torch.stack([s, -s], 1)


def _region_sums(values: torch.Tensor, labels: torch.Tensor, m: int) -> torch.Tensor:
    return torch.stack([values[labels == r].sum() for r in range(m)])


def _region_values(attr: torch.Tensor, labels: torch.Tensor, m: int) -> torch.Tensor:
    """One value per superpixel, checking the map is constant on each."""
    vals = []
    for r in range(m):
        v = attr[labels == r]
        assert torch.equal(v, v[:1].expand_as(v)), "a superpixel's pixels must share its coefficient"
        vals.append(v[0])
    return torch.stack(vals)


@pytest.mark.parametrize(("n_segments", "n_samples"), [(6, 64), (12, 100)])
def test_kernel_shap_is_exact_on_an_additive_model(n_segments: int, n_samples: int) -> None:
    """φ_s = Σ_{p∈s} w_p x_p (zero baseline). With 6 superpixels all 62 proper coalitions are
    enumerated; with 12, 98 are sampled — both exact for an additive game. Tolerance 1e-5."""
    model = _Linear().double()
    x = images(2, size=16, seed=1).double()
    shap = create("kernel_shap", model, n_samples=n_samples, segmentation="grid", n_segments=n_segments)
    attr = shap.attribute(x, 0)
    labels, counts = shap.superpixels(x)
    assert counts == [n_segments, n_segments]
    for i in range(2):
        expect = _region_sums((x[i] * model.weight).sum(0).detach(), labels[i], counts[i])
        torch.testing.assert_close(_region_values(attr[i], labels[i], counts[i]), expect, rtol=1e-5, atol=1e-5)


def test_lime_without_penalty_is_exact_on_an_additive_model() -> None:
    model = _Linear().double()
    x = images(1, size=16, seed=2).double()
    lime = create("lime", model, n_samples=80, segmentation="grid", n_segments=9, alpha=0.0)
    attr = lime.attribute(x, 0)
    labels, counts = lime.superpixels(x)
    expect = _region_sums((x[0] * model.weight).sum(0).detach(), labels[0], counts[0])
    torch.testing.assert_close(_region_values(attr[0], labels[0], counts[0]), expect, rtol=1e-6, atol=1e-6)


class _Interaction(nn.Module):
    """Class 0: a non-additive game over four quadrants: s₀·s₁ + 2·s₂ − s₃² + s₀·s₂·s₃."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        q = [x[:, :, :8, :8], x[:, :, :8, 8:], x[:, :, 8:, :8], x[:, :, 8:, 8:]]
        s = [t.mean((1, 2, 3)) for t in q]
        out = s[0] * s[1] + 2 * s[2] - s[3] ** 2 + s[0] * s[2] * s[3]
        return torch.stack([out, torch.zeros_like(out)], 1)


def _brute_force_shapley(model: nn.Module, x: torch.Tensor, labels: torch.Tensor, m: int) -> torch.Tensor:
    def value(coalition: tuple[int, ...]) -> float:
        keep = torch.zeros_like(labels, dtype=x.dtype)
        for r in coalition:
            keep[labels == r] = 1
        return float(model(x * keep)[0, 0])

    phi = torch.zeros(m, dtype=torch.float64)
    for i in range(m):
        others = [j for j in range(m) if j != i]
        for k in range(m):
            for s in itertools.combinations(others, k):
                weight = math.factorial(k) * math.factorial(m - k - 1) / math.factorial(m)
                phi[i] += weight * (value((*s, i)) - value(s))
    return phi


def test_kernel_shap_with_every_coalition_gives_the_shapley_values() -> None:
    """All 14 proper coalitions of 4 superpixels with the Shapley kernel reproduce the brute-force
    Shapley values of an interacting game (Lundberg & Lee, 2017, Theorem 2). Tolerance 1e-9."""
    model = _Interaction().double()
    x = images(1, size=16, seed=3).double() + 1
    mask = grid_segments(1, 16, 16, 4)
    attr = create("kernel_shap", model, n_samples=16).attribute(x, 0, feature_mask=mask)
    expect = _brute_force_shapley(model, x, mask[0], 4)
    torch.testing.assert_close(_region_values(attr[0], mask[0], 4).double(), expect, rtol=1e-9, atol=1e-9)


def test_sampling_is_seeded_per_image_and_leaves_the_global_rng_alone(get_model: Any) -> None:
    model = get_model("small_cnn")
    x = images(3)
    x[2] = x[0]
    lime = create("lime", model, n_samples=30, n_segments=8, seed=1)
    rng = torch.get_rng_state()
    _, counts = lime.superpixels(x)
    drawn = lime.samples(x, counts)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(drawn[0][0], drawn[2][0]) and not torch.equal(drawn[0][0][1:], drawn[1][0][1:])
    assert torch.equal(drawn[0][0][0], torch.ones(counts[0], dtype=torch.float64))  # the image itself first
    alone = lime.samples(x[1:2], counts[1:2])
    assert torch.equal(alone[0][0], drawn[1][0])
    other_seed = create("lime", model, n_samples=30, n_segments=8, seed=2).samples(x, counts)
    assert not torch.equal(other_seed[0][0], drawn[0][0])
    # KernelSHAP's sampled coalition sizes follow p(k) ∝ (M−1)/(k(M−k)) (M = 14: 2¹⁴ − 2 > 4000, so sampled)
    z, w = create("kernel_shap", model, n_samples=4002).coalitions(14, torch.Generator().manual_seed(0))
    sizes = z[2:].sum(1).long()
    k = torch.arange(1, 14, dtype=torch.float64)
    p = (13 / (k * (14 - k))) / (13 / (k * (14 - k))).sum()
    freq = torch.bincount(sizes, minlength=14)[1:].double() / 4000
    assert (freq - p).abs().max() < 0.02 and torch.equal(w, torch.ones(4002, dtype=torch.float64))
    # the full and empty coalitions come first (they carry f(x) and f(baseline))
    assert torch.equal(z[0], torch.ones(14, dtype=torch.float64)) and torch.equal(z[1], torch.zeros(14, dtype=torch.float64))


def test_slic_follows_object_boundaries() -> None:
    """On shape images the SLIC superpixels hardly cross the object outline: achievable
    segmentation accuracy (each superpixel labelled by its majority of object/background) ≥0.99,
    above a grid of as many cells, and no worse than scikit-image's SLIC (the reference) −0.01."""
    from skimage.segmentation import slic

    data = trained_shapes_cnn()
    x, masks = data["images"][:32], data["masks"][:32]

    def asa(labels: torch.Tensor) -> float:
        total = 0.0
        for lab, mask in zip(labels, masks):
            lab = torch.unique(lab.flatten(), return_inverse=True)[1]
            counts = torch.zeros(int(lab.max()) + 1, 2).index_put_((lab, mask.flatten().long()),
                                                                   torch.ones(lab.numel()), accumulate=True)
            total += float(counts.amax(1).sum()) / lab.numel()
        return total / len(labels)

    ours = segment(x, "slic", n_segments=16)
    rgb = x * torch.tensor(data["std"]).view(1, 3, 1, 1) + torch.tensor(data["mean"]).view(1, 3, 1, 1)
    ref = torch.stack([torch.from_numpy(slic(img.permute(1, 2, 0).clamp(0, 1).numpy(), n_segments=16,
                                             start_label=0)) for img in rgb])
    grid = segment(x, "grid", n_segments=16)
    assert asa(ours) >= 0.99 and asa(ours) > asa(grid) + 0.05 and asa(ours) >= asa(ref) - 0.01
    # contiguous labels, ~n_segments regions, the same labels for an image alone as in the batch
    for lab in ours:
        assert torch.equal(lab.unique(), torch.arange(int(lab.max()) + 1)) and 8 <= int(lab.max()) + 1 <= 16
    assert torch.equal(segment(x[5:6], "slic", n_segments=16)[0], ours[5])


def test_feature_mask_is_used_and_checked(get_model: Any) -> None:
    model = get_model("small_cnn")
    x = images(2)
    mask = torch.zeros(2, 32, 32, dtype=torch.long)
    mask[:, :, 16:] = 5  # two superpixels, labels need not be contiguous
    attr = create("kernel_shap", model, n_samples=8).attribute(x, 1, feature_mask=mask)
    assert attr[:, :, :16].unique().numel() == 2 and attr[:, :, 16:].unique().numel() == 2
    shap = create("lime", model, n_samples=8)
    with pytest.raises(ExplainerInputError, match=r"single region in sample\(s\) \[1\].*feature_mask with several"):
        shap.attribute(x, 1, feature_mask=torch.stack([mask[0], torch.zeros(32, 32, dtype=torch.long)]))
    with pytest.raises(ExplainerInputError, match=r"integer superpixel labels.*mask\.long\(\)"):
        shap.attribute(x, 1, feature_mask=mask.float())
    with pytest.raises(ExplainerInputError, match=r"\[B,H,W\] = \(2, 32, 32\)"):
        shap.attribute(x, 1, feature_mask=mask[:, :16])
    with pytest.raises(ConfigError, match="n_segments must be an integer ≥2"):
        create("lime", model, n_segments=1)
    with pytest.raises(ExplainerInputError, match="single region in sample"):
        shap.attribute(x, 1, feature_mask=torch.zeros(32, 32, dtype=torch.long))  # one [H,W] map for the batch
    with pytest.raises(ConfigError, match=r"Unknown segmentation 'felzenszwalb'.*Choices: grid, slic"):
        create("kernel_shap", model, segmentation="felzenszwalb")
    with pytest.raises(ConfigError, match="Unknown lime distance"):
        create("lime", model, distance="euclid")
