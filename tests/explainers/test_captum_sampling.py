"""GradientSHAP, feature ablation, feature permutation and Shapley value sampling against Captum.

Parity on torchvision's ResNet-18 (random weights, randomised BatchNorm, eval), 4 images of 32 px
with 4 distinct target classes:

- feature ablation / permutation: deterministic given the permutations; feature permutation shares
  Captum's draws (one ``torch.randperm(B)`` per feature after ``torch.manual_seed(seed)``). Same
  images per forward as Captum's ``perturbations_per_eval``: measured max |Δ| = 0; asserted within
  1e-6 of the map's scale (other CPUs may pick other float32 kernels).
- GradientSHAP / Shapley sampling with the *same* draws: Captum on each image alone after seeding
  numpy and torch with that image's seed (``image_seeds``). GradientSHAP: measured |Δ| = 0;
  Shapley: ~1e-7 (f(x) is evaluated once and the gains summed in another order), asserted 1e-5
  of the scale.
- the same two *in expectation* with independent draws: K runs of each library, Welch's t per
  statistic, |t| < 5 — with the family of ≤64 statistics and ~48 degrees of freedom the chance of a
  false alarm is below 1e-3 (Bonferroni), while a bias of a few standard errors fails. Shapley is
  also compared with the exact Shapley values (4 features: all 16 coalitions).
"""

from __future__ import annotations

import itertools
import math
import warnings

import numpy as np
import pytest
import torch
import torchvision
from captum.attr import FeatureAblation as CaptumFeatureAblation
from captum.attr import FeaturePermutation as CaptumFeaturePermutation
from captum.attr import GradientShap as CaptumGradientShap
from captum.attr import ShapleyValueSampling as CaptumShapleyValueSampling
from torch import nn

import xaudit.explainers.attribution_sampling as sampling  # registers the four methods
from xaudit.explainers import ExplainerInputError, create
from xaudit.explainers.baselines import image_seeds
from xaudit.utils.errors import ConfigError

from explainer_helpers import images, make_model, randomize_batchnorm

B, SIZE = 4, 32
TARGETS = torch.tensor([0, 3, 5, 7])


@pytest.fixture(scope="module")
def resnet() -> nn.Module:
    torch.manual_seed(0)
    return randomize_batchnorm(torchvision.models.resnet18(num_classes=10)).eval()


@pytest.fixture(scope="module")
def x() -> torch.Tensor:
    return images(B, SIZE, seed=11)


def grid(cell: int) -> torch.Tensor:
    return sampling.grid_features(1, SIZE, SIZE, cell, torch.device("cpu"))[0]


def assert_exact(ours: torch.Tensor, ref: torch.Tensor, rel: float = 1e-6) -> None:
    scale = float(ref.abs().max())
    assert scale > 0
    torch.testing.assert_close(ours, ref, rtol=0, atol=rel * scale)


class _Seeded:
    """Seed the global torch and numpy RNGs for a Captum call; restore both afterwards."""

    def __init__(self, seed: int) -> None:
        self.seed = seed

    def __enter__(self) -> None:
        self.torch_state, self.np_state = torch.get_rng_state(), np.random.get_state()
        torch.manual_seed(self.seed)
        np.random.seed(self.seed % 2**32)

    def __exit__(self, *exc: object) -> None:
        torch.set_rng_state(self.torch_state)
        np.random.set_state(self.np_state)


# -- exact parity -----------------------------------------------------------------------------------
@pytest.mark.parametrize("cell", [8, 16])
def test_feature_ablation_equals_captum(resnet: nn.Module, x: torch.Tensor, cell: int) -> None:
    mask = grid(cell)
    m = int(mask.max()) + 1
    ours = create("feature_ablation", resnet, cell=cell, internal_batch_size=B * m).attribute(x, TARGETS)
    ref = CaptumFeatureAblation(resnet).attribute(x, target=TARGETS, feature_mask=mask[None, None],
                                                  perturbations_per_eval=m)
    assert torch.equal(ref, ref[:, :1].expand_as(ref))  # Captum's map is the same in every channel
    assert ours.shape == (B, SIZE, SIZE)
    assert_exact(ours, ref[:, 0])


def test_feature_ablation_explicit_mask_and_baseline(resnet: nn.Module, x: torch.Tensor) -> None:
    """A per-image mask [B,H,W] and a tensor baseline, as Captum's feature_mask [B,1,H,W] / baselines."""
    masks = torch.stack([grid(8), grid(16), grid(8).flip(0), grid(4)])
    base = images(1, SIZE, seed=5)[0] * 0.5
    ours = create("feature_ablation", resnet, baseline=base).attribute(x, TARGETS, feature_mask=masks)
    ref = CaptumFeatureAblation(resnet).attribute(x, target=TARGETS, feature_mask=masks[:, None],
                                                  baselines=base[None], perturbations_per_eval=16)
    assert_exact(ours, ref[:, 0])
    # the same mask given at construction
    again = create("feature_ablation", resnet, features=masks, baseline=base).attribute(x, TARGETS)
    torch.testing.assert_close(again, ours, rtol=0, atol=0)


@pytest.mark.parametrize("seed", [0, 3])
def test_feature_permutation_equals_captum_with_the_same_seed(resnet: nn.Module, x: torch.Tensor, seed: int) -> None:
    mask = grid(8)
    ours = create("feature_permutation", resnet, cell=8, seed=seed, internal_batch_size=B * 4).attribute(x, TARGETS)
    with _Seeded(seed):
        ref = CaptumFeaturePermutation(resnet).attribute(x, target=TARGETS, feature_mask=mask[None, None],
                                                         perturbations_per_eval=4)
    assert_exact(ours, ref[:, 0])


def test_feature_permutation_draws_are_captums() -> None:
    """One randperm(B) per feature in feature order, the identity rejected — Captum's loop."""
    perms = create("feature_permutation", make_model("small_cnn"), seed=7).permutations(50, 2)
    torch.manual_seed(7)
    for p in perms:  # with B = 2 every draw of the identity is rejected
        q = torch.randperm(2)
        while torch.equal(q, torch.arange(2)):
            q = torch.randperm(2)
        assert torch.equal(p, q)
    assert not (perms == torch.arange(2)).all(1).any()


def test_shapley_sampling_equals_captum_with_the_same_orders(resnet: nn.Module, x: torch.Tensor) -> None:
    mask = grid(8)
    ours = create("shapley_value_sampling", resnet, cell=8, n_samples=3, seed=1, internal_batch_size=7).attribute(
        x, TARGETS)
    for i, s in enumerate(image_seeds(x, 1)):
        with _Seeded(s):
            ref = CaptumShapleyValueSampling(resnet).attribute(
                x[i:i + 1], target=int(TARGETS[i]), feature_mask=mask[None, None], n_samples=3,
                perturbations_per_eval=16)
        assert_exact(ours[i], ref[0, 0], rel=1e-5)


@pytest.mark.parametrize(("stdevs", "ibs"), [(0.0, 64), (0.3, 64), (0.3, 3)])
def test_gradient_shap_equals_captum_with_the_same_draws(resnet: nn.Module, x: torch.Tensor, stdevs: float,
                                                         ibs: int) -> None:
    """(ibs 3: chunks that split an image's samples and straddle images.)"""
    dist = images(6, SIZE, seed=4)
    ours = create("gradient_shap", resnet, n_samples=7, stdevs=stdevs, baselines=dist, seed=2,
                  internal_batch_size=ibs).attribute(x, TARGETS, reduce=None)
    assert ours.shape == (B, 3, SIZE, SIZE)
    for i, s in enumerate(image_seeds(x, 2)):
        with _Seeded(s):
            ref = CaptumGradientShap(resnet).attribute(x[i:i + 1], baselines=dist, target=int(TARGETS[i]),
                                                       n_samples=7, stdevs=stdevs)
        assert_exact(ours[i], ref[0])


def test_gradient_shap_fill_baseline_is_a_one_image_distribution(resnet: nn.Module, x: torch.Tensor) -> None:
    ours = create("gradient_shap", resnet, n_samples=4, baselines="zero", seed=0).attribute(x, TARGETS, reduce=None)
    s = image_seeds(x, 0)[2]
    with _Seeded(s):
        ref = CaptumGradientShap(resnet).attribute(x[2:3], baselines=torch.zeros(1, 3, SIZE, SIZE),
                                                   target=int(TARGETS[2]), n_samples=4)
    assert_exact(ours[2], ref[0])
    # default reduction: channel sum (signed, completeness in expectation, as integrated gradients)
    torch.testing.assert_close(create("gradient_shap", resnet, n_samples=4).attribute(x, TARGETS), ours.sum(1))


# -- parity in expectation (independent draws) --------------------------------------------------------
def welch_t(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Welch's t of the means of runs a [K,...] and b [K,...] (float64)."""
    a, b = a.double(), b.double()
    se = (a.var(0) / a.shape[0] + b.var(0) / b.shape[0]).sqrt()
    return (a.mean(0) - b.mean(0)) / se


T_MAX = 5.0  # see the module docstring


def test_gradient_shap_agrees_with_captum_in_expectation(resnet: nn.Module, x: torch.Tensor) -> None:
    k, n, std = 24, 8, 0.2
    dist = images(8, SIZE, seed=4)
    pool = torch.nn.AvgPool2d(8)  # statistics: channel-summed map averaged over 8×8 blocks (4·16 of them)
    ours = torch.stack([pool(create("gradient_shap", resnet, n_samples=n, stdevs=std, baselines=dist, seed=s)
                             .attribute(x, TARGETS)[:, None]) for s in range(k)])
    refs = []
    for s in range(k):
        with _Seeded(10_000 + s):
            refs.append(pool(CaptumGradientShap(resnet).attribute(x, baselines=dist, target=TARGETS, n_samples=n,
                                                                  stdevs=std).sum(1, keepdim=True)))
    t = welch_t(ours, torch.stack(refs))
    assert float(t.abs().max()) < T_MAX, float(t.abs().max())


def exact_shapley(model: nn.Module, x: torch.Tensor, target: int, mask: torch.Tensor) -> torch.Tensor:
    """Shapley values of the feature game (zero baseline) by enumerating every coalition."""
    m = int(mask.max()) + 1
    coalitions = list(itertools.product([0, 1], repeat=m))
    on = torch.tensor(coalitions, dtype=torch.bool)[:, mask].unsqueeze(1)  # [2^m,1,H,W]
    with torch.no_grad():
        v = model(torch.where(on, x, torch.zeros_like(x)))[:, target].double()
    value = dict(zip(coalitions, v.tolist()))
    phi = torch.zeros(m, dtype=torch.float64)
    for c, val in value.items():
        for f in range(m):
            if c[f]:
                size = sum(c) - 1
                w = math.factorial(size) * math.factorial(m - size - 1) / math.factorial(m)
                phi[f] += w * (val - value[(*c[:f], 0, *c[f + 1:])])
    return phi


def test_shapley_sampling_agrees_with_captum_and_the_exact_values(resnet: nn.Module, x: torch.Tensor) -> None:
    k, n, cell = 24, 4, 16
    mask = grid(cell)
    m = int(mask.max()) + 1
    first = (torch.arange(m)[:, None] == mask.flatten()).float().argmax(1)  # one pixel of each feature
    ours = torch.stack([create("shapley_value_sampling", resnet, n_samples=n, cell=cell, seed=s)
                        .attribute(x, TARGETS).flatten(1)[:, first] for s in range(k)])
    refs = []
    for s in range(k):
        with _Seeded(20_000 + s):
            ref = CaptumShapleyValueSampling(resnet).attribute(x, target=TARGETS, feature_mask=mask[None, None],
                                                               n_samples=n, perturbations_per_eval=m)
        refs.append(ref[:, 0].flatten(1)[:, first])
    refs_t = torch.stack(refs)
    t = welch_t(ours, refs_t)
    assert float(t.abs().max()) < T_MAX, float(t.abs().max())
    exact = torch.stack([exact_shapley(resnet, x[i], int(TARGETS[i]), mask) for i in range(B)])
    t_exact = (ours.double().mean(0) - exact) / (ours.double().var(0) / k).sqrt().clamp_min(1e-12)
    assert float(t_exact.abs().max()) < T_MAX, float(t_exact.abs().max())


# -- properties --------------------------------------------------------------------------------------
def test_shapley_sampling_is_efficient_for_every_order_count(resnet: nn.Module, x: torch.Tensor) -> None:
    """Σ_features φ = f(x) − f(baseline) exactly, whatever the orders drawn."""
    cell = 8
    attr = create("shapley_value_sampling", resnet, n_samples=2, cell=cell).attribute(x, TARGETS)
    per_feature = attr[:, ::cell, ::cell].flatten(1).double().sum(1)
    with torch.no_grad():
        gap = (resnet(x) - resnet(torch.zeros_like(x))).gather(1, TARGETS[:, None])[:, 0].double()
    torch.testing.assert_close(per_feature, gap, rtol=1e-5, atol=1e-5)


def test_feature_permutation_of_one_image_is_zero_with_a_warning() -> None:
    model = make_model("small_cnn")
    with pytest.warns(UserWarning, match="batch of one image"):
        attr = create("feature_permutation", model).attribute(images(1), 0)
    assert torch.equal(attr, torch.zeros(1, 32, 32))


def test_feature_permutation_depends_on_the_batch_by_design() -> None:
    """Fisher et al.'s importance is a batch quantity: a feature's values come from another image."""
    model = make_model("small_cnn")
    x = images(3)
    explainer = create("feature_permutation", model, cell=16)
    full = explainer.attribute(x, 1)
    perms = explainer.permutations(4, 3)
    cells = sampling.grid_features(3, 32, 32, 16, torch.device("cpu"))
    with torch.no_grad():
        base = model(x)[:, 1]
        for f in range(4):
            on = (cells == f)[:, None]
            drop = base - model(torch.where(on, x[perms[f]], x))[:, 1]
            torch.testing.assert_close(full[:, f // 2 * 16, f % 2 * 16], drop, rtol=1e-5, atol=1e-6)


def test_superpixel_features_use_xaudits_segmentation() -> None:
    from xaudit.explainers.segmentation import segment

    model = make_model("small_cnn")
    x = images(2)
    kw = {"features": "superpixels", "n_segments": 6}
    labels = segment(x, "slic", 6)
    auto = create("feature_ablation", model, **kw).attribute(x, 1)
    explicit = create("feature_ablation", model).attribute(x, 1, feature_mask=labels)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)


# -- bad input ---------------------------------------------------------------------------------------
MASK_METHODS = ("feature_ablation", "feature_permutation", "shapley_value_sampling")


@pytest.mark.parametrize("method", MASK_METHODS)
def test_bad_feature_masks_name_the_fix(method: str) -> None:
    model = make_model("small_cnn")
    x = images(2)
    explainer = create(method, model)
    with pytest.raises(ExplainerInputError, match=r"feature_mask has shape \(2, 16, 16\).*\[B,H,W\]"):
        explainer.attribute(x, 1, feature_mask=torch.zeros(2, 16, 16, dtype=torch.long))
    with pytest.raises(ExplainerInputError, match=r"shape \(2, 1, 32, 32\).*Drop the channel dimension"):
        explainer.attribute(x, 1, feature_mask=torch.zeros(2, 1, 32, 32, dtype=torch.long))
    with pytest.raises(ExplainerInputError, match=r"integer feature ids.*mask\.long\(\)"):
        explainer.attribute(x, 1, feature_mask=torch.zeros(32, 32))
    with pytest.raises(ExplainerInputError, match="Drop the channel dimension"):
        create(method, model, features=torch.zeros(1, 1, 32, 32, dtype=torch.long))
    with pytest.raises(ConfigError, match=r"Unknown features 'grids'.*Did you mean 'grid'"):
        create(method, model, features="grids")


@pytest.mark.parametrize("method", MASK_METHODS)
def test_bad_cells_name_the_fix(method: str) -> None:
    model = make_model("small_cnn")
    with pytest.raises(ConfigError, match=r"cell=12 px does not divide the image \(32x32\).*\[1, 2, 4, 8, 16, 32\]"):
        create(method, model, cell=12).attribute(images(2), 1)
    with pytest.raises(ConfigError, match=r"cell=64 px is larger than the image \(32x32\).*cell ≤ 32"):
        create(method, model, cell=64).attribute(images(2), 1)
    with pytest.raises(ConfigError, match="cell=0 must be an integer ≥1"):
        create(method, model, cell=0)


@pytest.mark.parametrize("method", ["gradient_shap", "shapley_value_sampling"])
@pytest.mark.parametrize("n", [0, -3, 2.5])
def test_n_samples_below_one_is_refused(method: str, n: object) -> None:
    with pytest.raises(ConfigError, match=r"n_samples=\S+ must be an integer ≥1"):
        create(method, make_model("small_cnn"), n_samples=n)


def test_gradient_shap_bad_options() -> None:
    model = make_model("small_cnn")
    with pytest.raises(ConfigError, match=r"stdevs .* must be a number ≥0"):
        create("gradient_shap", model, stdevs=-0.1)
    with pytest.raises(ExplainerInputError, match=r"pass \[N,3,32,32\]"):
        create("gradient_shap", model, baselines=torch.zeros(5, 3, 16, 16)).attribute(images(2), 1)
    with pytest.raises(ConfigError, match="Unknown baselines"):
        create("gradient_shap", model, baselines="zeros")


def test_no_global_rng_and_no_warning_for_normal_use() -> None:
    model = make_model("small_cnn")
    x = images(2)
    state = torch.get_rng_state(), np.random.get_state()[1].copy()
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for method, kw in [("gradient_shap", {"stdevs": 0.1}), ("feature_permutation", {}),
                           ("shapley_value_sampling", {"n_samples": 2}), ("feature_ablation", {})]:
            create(method, model, **kw).attribute(x, 1)
    assert torch.equal(state[0], torch.get_rng_state()) and np.array_equal(state[1], np.random.get_state()[1])
