"""LIME and KernelSHAP: parity with Captum on identical samples, LIME's defaults against the lime
package's pipeline on identical samples (a transcription of ``explain_instance`` with
scikit-image and scikit-learn, and the package itself where installed), quick shift equal to
scikit-image's, exact Shapley values on known games, seeded sampling, the torch segmentation, and
the errors for bad superpixels."""

from __future__ import annotations

import copy
import inspect
import itertools
import math
from typing import Any

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from captum._utils.models.linear_model import SkLearnRidge
from captum.attr import KernelShap, Lime
from captum.attr._core.lime import get_exp_kernel_similarity_function
from torch import nn

from xaudit.explainers import ExplainerInputError, create, segment
from xaudit.explainers.fills import make_fill
from xaudit.explainers.segmentation import grid_segments, unit_range
from xaudit.explainers.surrogate import segment_means
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
                  distance=distance, alpha=1.0, baseline="mean", score="logit")  # Captum regresses the output
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
    lime = create("lime", model, n_samples=80, segmentation="grid", n_segments=9, alpha=0.0, baseline="zero",
                  score="logit")
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
    lime = create("lime", model, n_samples=30, segmentation="slic", n_segments=8, seed=1)
    rng = torch.get_rng_state()
    _, counts = lime.superpixels(x)
    drawn = lime.samples(x, counts)
    assert torch.equal(torch.get_rng_state(), rng)
    assert torch.equal(drawn[0][0], drawn[2][0]) and not torch.equal(drawn[0][0][1:], drawn[1][0][1:])
    assert torch.equal(drawn[0][0][0], torch.ones(counts[0], dtype=torch.float64))  # the image itself first
    alone = lime.samples(x[1:2], counts[1:2])
    assert torch.equal(alone[0][0], drawn[1][0])
    other_seed = create("lime", model, n_samples=30, segmentation="slic", n_segments=8, seed=2).samples(x, counts)
    assert not torch.equal(other_seed[0][0], drawn[0][0])
    # KernelSHAP's sampled coalition sizes follow p(k) ∝ (M−1)/(k(M−k)) (M = 14: 2¹⁴ − 2 > 4000, so sampled)
    z, w = create("kernel_shap", model, n_samples=4002).coalitions(14, torch.Generator().manual_seed(0))
    sizes = z[2:].sum(1).long()
    k = torch.arange(1, 14, dtype=torch.float64)
    p = (13 / (k * (14 - k))) / (13 / (k * (14 - k))).sum()
    freq = torch.bincount(sizes, minlength=14)[1:].double() / 4000
    assert (freq - p).abs().max() < 0.02 and torch.equal(w, torch.ones(4002, dtype=torch.float64))
    # the full and empty coalitions come first (they carry f(x) and f(baseline))
    assert (torch.equal(z[0], torch.ones(14, dtype=torch.float64))
            and torch.equal(z[1], torch.zeros(14, dtype=torch.float64)))


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
    with pytest.raises(ConfigError, match="n_segments=1 must be an integer ≥2"):
        create("lime", model, n_segments=1)
    with pytest.raises(ExplainerInputError, match="single region in sample"):
        shap.attribute(x, 1, feature_mask=torch.zeros(32, 32, dtype=torch.long))  # one [H,W] map for the batch
    with pytest.raises(ConfigError, match=r"Unknown segmentation 'felzenszwalb'.*Choices: grid, quickshift, slic"):
        create("kernel_shap", model, segmentation="felzenszwalb")
    with pytest.raises(ConfigError, match="Unknown lime distance"):
        create("lime", model, distance="euclid")
    with pytest.raises(ConfigError, match=r"Unknown baseline 'segment_means'.*Did you mean 'segment_mean'.*Choices: "
                                          r"blur, .*mean, .*segment_mean, zero"):
        create("lime", model, baseline="segment_means")
    with pytest.raises(ConfigError, match=r"kernel_size \(quickshift\) must be ≥1"):
        create("lime", model, kernel_size=0.5)
    with pytest.raises(ConfigError, match=r"max_dist and ratio \(quickshift\) must be ≥0"):
        create("lime", model, ratio=-0.1)


def test_quickshift_refuses_what_it_cannot_segment(get_model: Any) -> None:
    """lime's quick shift (kernel_size=4) merges a 32-px image into one region: the error names the
    segmentation and the ways out; images with neither 1 nor 3 channels have no CIELAB."""
    lime = create("lime", get_model("small_cnn"), n_samples=8)
    with pytest.raises(ExplainerInputError, match=r"quickshift segmentation \(kernel_size=4, max_dist=200, "
                                                  r"ratio=0.2\) of x \(2, 3, 32, 32\) has a single region.*"
                                                  r"use 'slic' or 'grid'"):
        lime.attribute(images(2), 0)
    with pytest.raises(ExplainerInputError, match=r"x has 5 channels\. Use segmentation='slic' or 'grid'"):
        segment(images(1, channels=5), "quickshift")



# -- quick shift and the lime package's defaults ----------------------------------------------------
def _smooth_images(n: int, size: int, seed: int, channels: int = 3) -> torch.Tensor:
    """Blurred noise: regions of similar colour, so quick shift finds several segments."""
    x = images(n, size=size, channels=channels, seed=seed) * 2 + 0.5
    return F.avg_pool2d(x, 5, 1, 2, count_include_pad=False)


@pytest.mark.parametrize(("size", "channels", "params"), [
    (64, 3, {}),  # lime's settings: kernel_size=4, max_dist=200, ratio=0.2
    (32, 3, {"kernel_size": 1.0}),
    (32, 3, {"kernel_size": 2.0, "max_dist": 3.0, "ratio": 0.5}),  # max_dist cuts links: many regions
    (32, 1, {"kernel_size": 1.5, "ratio": 1.0}),  # grayscale: lime's gray2rgb
])
def test_quickshift_equals_scikit_image(size: int, channels: int, params: dict[str, float]) -> None:
    """The torch quick shift gives exactly ``skimage.segmentation.quickshift``'s labels on the same
    [0,1] image (float64, same tie-breaking noise), and an image alone the labels it gets in a batch."""
    from skimage.segmentation import quickshift

    x = _smooth_images(3, size, seed=size + channels, channels=channels)
    ours = segment(x, "quickshift", **params)
    kw = {"kernel_size": 4.0, "max_dist": 200.0, "ratio": 0.2, **params}
    for i, img in enumerate(unit_range(x.double())):
        rgb = img.permute(1, 2, 0).numpy()
        if channels == 1:
            rgb = np.repeat(rgb, 3, axis=2)
        ref = torch.from_numpy(quickshift(rgb, **kw)).long()
        assert int(ref.max()) + 1 >= 4, "the case must have several segments"
        assert torch.equal(ours[i], ref)
    assert torch.equal(segment(x[1:2], "quickshift", **params)[0], ours[1])


def test_segment_mean_fill_is_each_superpixels_mean_colour() -> None:
    x = images(2, size=16, seed=3)
    labels = torch.stack([grid_segments(1, 16, 16, 4)[0], grid_segments(1, 16, 16, 9)[0]])
    counts = [4, 9]
    fill = segment_means(x, labels, counts)
    for i in range(2):
        for r in range(counts[i]):
            where = labels[i] == r
            expect = x[i][:, where].double().mean(1).float()
            assert torch.allclose(fill[i][:, where], expect[:, None].expand(-1, int(where.sum())), atol=1e-6)


def _tiny_net() -> nn.Module:
    """A seeded float64 conv net, cheap enough for lime's 1000 samples per image (~0.1 s)."""
    torch.manual_seed(3)
    net = nn.Sequential(nn.Conv2d(3, 4, 5, stride=2), nn.ReLU(), nn.AdaptiveAvgPool2d(3), nn.Flatten(),
                        nn.Linear(36, 3))
    return net.double().eval()


def _lime_classifier_fn(model: nn.Module, lo: float, span: float) -> Any:
    """lime's ``classifier_fn``: images [N,H,W,3] in [0,1] → class probabilities [N,K] (the images
    mapped back to the model's normalised space by the inverse of :func:`unit_range`)."""

    def classifier_fn(batch: np.ndarray, **_: Any) -> np.ndarray:  # newer lime passes classifier_args
        x = torch.from_numpy(batch * span + lo).permute(0, 3, 1, 2).to(next(model.parameters()).dtype)
        with torch.no_grad():
            return model(x).softmax(-1).double().numpy()

    return classifier_fn


def _transcribed_lime(img: np.ndarray, classifier_fn: Any, label: int, data: np.ndarray,
                      segments: np.ndarray) -> np.ndarray:
    """``LimeImageExplainer().explain_instance(img, classifier_fn, hide_color=None)`` of lime 0.2,
    line by line, with the binary samples ``data`` given instead of drawn: the coefficient of
    ``label`` for each superpixel of ``segments``."""
    from sklearn.linear_model import Ridge
    from sklearn.metrics import pairwise_distances

    fudged_image = img.copy()
    for x in np.unique(segments):  # hide_color=None: each superpixel's mean colour
        fudged_image[segments == x] = (np.mean(img[segments == x][:, 0]), np.mean(img[segments == x][:, 1]),
                                       np.mean(img[segments == x][:, 2]))
    data = data.copy()
    data[0, :] = 1
    imgs = []
    for row in data:
        temp = copy.deepcopy(img)
        zeros = np.where(row == 0)[0]
        mask = np.zeros(segments.shape).astype(bool)
        for z in zeros:
            mask[segments == z] = True
        temp[mask] = fudged_image[mask]
        imgs.append(temp)
    labels = classifier_fn(np.array(imgs))
    distances = pairwise_distances(data, data[0].reshape(1, -1), metric="cosine").ravel()
    weights = np.sqrt(np.exp(-(distances ** 2) / 0.25 ** 2))  # kernel_width=0.25
    model_regressor = Ridge(alpha=1, fit_intercept=True)
    model_regressor.fit(data, labels[:, label], sample_weight=weights)
    return model_regressor.coef_


@pytest.mark.parametrize(("params", "n_images"), [({}, 1), ({"kernel_size": 2.0, "n_samples": 200}, 2)])
def test_lime_defaults_equal_the_lime_package_pipeline_on_the_same_samples(params: dict[str, float],
                                                                           n_images: int) -> None:
    """LIME with its defaults (quick shift 4/200/0.2, 1000 samples, segment-mean fill, probability,
    cosine kernel 0.25, Ridge α=1) against a transcription of lime's ``explain_instance`` fed our
    binary samples, with ``skimage.segmentation.quickshift`` on the [0,1] image as lime's
    segmentation_fn (second case: finer superpixels, fewer samples, a batch of two). A float64
    model: an untrained net's probabilities move little between samples, so float32 rounding of
    the perturbed images (ours mixed in the normalised space, lime's in [0,1] and mapped back)
    would show in the coefficients. The superpixels are equal exactly; the coefficients measured
    ≤1e-14 of the largest, asserted 1e-8."""
    from skimage.segmentation import quickshift

    model = _tiny_net()
    x = _smooth_images(2, 48, seed=1).double()[:n_images]
    lime = create("lime", model, **params)
    assert lime.n_samples == params.get("n_samples", 1000)
    target = torch.tensor([0, 2])[:n_images]
    ours = lime.attribute(x, target)
    labels, counts = lime.superpixels(x)
    drawn = lime.samples(x, counts)
    qs = {"kernel_size": 4.0, "max_dist": 200.0, "ratio": 0.2, **{k: v for k, v in params.items() if k != "n_samples"}}
    for i in range(n_images):
        lo, hi = float(x[i].min()), float(x[i].max())
        img = ((x[i] - lo) / (hi - lo)).permute(1, 2, 0).numpy()
        segments = quickshift(img, **qs)
        assert torch.equal(labels[i], torch.from_numpy(segments).long()) and counts[i] >= 3
        coef = _transcribed_lime(img, _lime_classifier_fn(model, lo, hi - lo), int(target[i]),
                                 drawn[i][0].numpy().astype(np.int64), segments)
        expect = torch.from_numpy(coef[segments])
        torch.testing.assert_close(ours[i], expect, rtol=0, atol=1e-8 * _scale(expect))


class _ReplayedRandomState(np.random.RandomState):
    """lime draws its binary samples with ``random_state.randint(0, 2, num_samples * n_features)``:
    this state answers that call with given samples (and any other call as a RandomState)."""

    def __init__(self, data: np.ndarray) -> None:
        super().__init__(0)
        self.data = data

    def randint(self, low: Any, high: Any = None, size: Any = None, dtype: Any = int) -> Any:
        if size is not None and low == 0 and high == 2 and size == self.data.size:
            return self.data.reshape(-1).copy()
        return super().randint(low, high, size, dtype)


def test_lime_defaults_equal_the_lime_package_on_the_same_samples() -> None:
    """The lime package itself (skipped where it is not installed): ``LimeImageExplainer()`` with
    every default, our binary samples injected through its random state. Tolerance as above."""
    lime_image = pytest.importorskip("lime.lime_image")
    model = _tiny_net()
    x = _smooth_images(1, 48, seed=1).double()
    lime = create("lime", model)
    ours = lime.attribute(x, 2)
    labels, counts = lime.superpixels(x)
    z = lime.samples(x, counts)[0][0].numpy().astype(np.int64)
    lo, hi = float(x[0].double().min()), float(x[0].double().max())
    img = ((x[0].double() - lo) / (hi - lo)).permute(1, 2, 0).numpy()
    explainer = lime_image.LimeImageExplainer(random_state=_ReplayedRandomState(z))
    quiet = ({"progress_bar": False} if "progress_bar" in inspect.signature(explainer.explain_instance).parameters
             else {})
    exp = explainer.explain_instance(img, _lime_classifier_fn(model, lo, hi - lo), labels=(2,), top_labels=None,
                                     num_samples=z.shape[0], **quiet)
    assert torch.equal(labels[0], torch.from_numpy(exp.segments).long()), "lime's quickshift segments differ"
    coef = dict(exp.local_exp[2])
    expect = torch.tensor([coef[r] for r in range(counts[0])], dtype=torch.float64)[labels[0]]
    torch.testing.assert_close(ours[0], expect, rtol=0, atol=1e-8 * _scale(expect))
