"""Captum's sampling and feature-mask methods: GradientSHAP, feature ablation, feature permutation
and Shapley value sampling, batched on the device.

``gradient_shap`` averages (x̃ − x')·∇f(x' + α(x̃ − x')) over random baselines x' from a
distribution, uniform α and noisy inputs x̃ = x + ε. The other three act on *features*: groups of
pixels (all channels together) given by ``features="grid"`` (square cells of ``cell`` px),
``"superpixels"`` (:func:`xaudit.explainers.segmentation.segment`) or an explicit label map
[B,H,W] / [H,W] (as ``features`` or ``attribute(..., feature_mask=...)``), and return one map
[B,H,W] in which each pixel carries its feature's value.

All perturbed copies of the batch are built with tensor indexing and go through the model in
chunks of ``internal_batch_size`` images; there is no Python loop over images or features in the
hot path. Randomness comes from local generators, never the global RNGs:

- ``gradient_shap`` and ``shapley_value_sampling`` draw per image from the seed
  :func:`xaudit.explainers.baselines.image_seeds` gives it (reproducible, independent of the rest
  of the batch). The draws are Captum's for a batch of that one image with the global seeds set to
  it: ``np.random.seed(s % 2**32)`` (GradientSHAP's baseline indices and α) and
  ``torch.manual_seed(s)`` (its noise; Shapley's ``torch.randperm``), so Captum run image by image
  with those seeds gives the same numbers.
- ``feature_permutation`` permutes across the batch (as Captum, and Fisher et al.'s permutation
  importance): one ``torch.randperm(B)`` per feature, identity rejected, from a CPU generator seeded
  by ``seed`` — Captum's draws after ``torch.manual_seed(seed)``. Its maps therefore depend on the
  batch by definition; a batch of one image has nothing to permute with and gets zeros (warned).
"""

from __future__ import annotations

import math
import numbers
import warnings
from collections.abc import Callable

import numpy as np
import torch
from torch import Tensor, nn

from xaudit.explainers.base import (
    AUTO,
    Explainer,
    ExplainerInputError,
    Target,
    TargetLike,
)
from xaudit.explainers.baselines import image_seeds
from xaudit.explainers.registry import register
from xaudit.explainers.segmentation import SEGMENTATIONS, check_feature_mask, relabel, segment
from xaudit.ops.fills import FillLike, check_fill, make_fill
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import positive_int

FEATURES: tuple[str, ...] = ("grid", "superpixels")


def _numpy_seed(seed: int) -> int:
    """A per-image seed as numpy's legacy ``np.random.seed`` accepts it (< 2**32)."""
    return int(seed) % 2**32


def grid_features(b: int, h: int, w: int, cell: int, device: torch.device) -> Tensor:
    """Square cells of ``cell`` px as feature labels long [B,H,W] (row-major ids); ``cell`` must
    divide both sides, so that every feature has the same size."""
    if cell > h or cell > w:
        raise ConfigError(
            f"cell={cell} px is larger than the image ({h}x{w}): pass a cell ≤ {min(h, w)} px that divides "
            f"both sides (here {_common_divisors(h, w)}), or features='superpixels'.")
    if h % cell or w % cell:
        raise ConfigError(
            f"cell={cell} px does not divide the image ({h}x{w}): the last row/column of cells would be "
            f"smaller than the others. Pass a cell that divides both sides (here {_common_divisors(h, w)}), "
            "or features='superpixels' (or an explicit feature_mask).")
    r = torch.arange(h, device=device) // cell
    c = torch.arange(w, device=device) // cell
    return (r[:, None] * (w // cell) + c[None, :]).expand(b, h, w).clone()


def _common_divisors(h: int, w: int) -> list[int]:
    g = math.gcd(h, w)
    return [d for d in range(1, g + 1) if g % d == 0]


def _check_mask_tensor(mask: Tensor, option: str) -> Tensor:
    if mask.is_floating_point() or mask.is_complex() or mask.dtype == torch.bool:
        raise ExplainerInputError(
            f"{option} must hold integer feature ids (long [B,H,W] or [H,W]); got {mask.dtype}. "
            "Use mask.long() for label maps.")
    if mask.ndim not in (2, 3):
        raise ExplainerInputError(
            f"{option} must be a label map [B,H,W] or [H,W] (one id per pixel, shared by the channels); got "
            f"shape {tuple(mask.shape)}. Drop the channel dimension (e.g. mask[:, 0]).")
    return mask


class FeatureMaskExplainer(Explainer):
    """Base of the methods that perturb features (groups of pixels): how the features are made.

    ``features``: "grid" (cells of ``cell`` px; the cell must divide H and W), "superpixels"
    (``segmentation`` "slic" / "quickshift" / "grid" with ``n_segments``, ``compactness``), or an
    integer label map [B,H,W] / [H,W]. ``attribute(..., feature_mask=...)`` overrides it per call.
    Returns [B,H,W]: a feature's value on each of its pixels (channels are perturbed together).

    Args:
        model: the classifier (returns logits [B, num_classes]).
        features: ``grid``, ``superpixels``, or an integer label map [B,H,W] / [H,W].
        cell: grid cell in px (must divide H and W).
        segmentation: superpixels for ``features="superpixels"``: ``slic`` | ``quickshift`` | ``grid``.
        n_segments: target number of superpixels.
        compactness: SLIC's colour-vs-position weight.
        internal_batch_size: perturbed images per forward.
    """

    signed = True  # a feature's effect on the score: evidence for (+) or against (−)

    def __init__(self, model: nn.Module, features: str | Tensor = "grid", cell: int = 8,
                 segmentation: str = "slic", n_segments: int = 50, compactness: float = 1.0,
                 internal_batch_size: int = 256) -> None:
        super().__init__(model)
        if isinstance(features, Tensor):
            features = _check_mask_tensor(features, "features")
        elif not isinstance(features, str) or features not in FEATURES:
            raise unknown_choice("features", features, FEATURES)
        self.features = features
        self.cell = positive_int(cell, "cell")
        if segmentation not in SEGMENTATIONS:
            raise unknown_choice("segmentation", segmentation, SEGMENTATIONS)
        self.segmentation = segmentation
        self.n_segments = positive_int(n_segments, "n_segments")
        if float(compactness) < 0:
            raise ConfigError(f"compactness must be ≥0; got {compactness}.")
        self.compactness = float(compactness)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self._feature_mask: Tensor | None = None

    def attribute(self, x: Tensor, target: TargetLike = "predicted", reduce: str | None = AUTO, *,
                  feature_mask: Tensor | None = None) -> Tensor:
        """As :meth:`Explainer.attribute`; ``feature_mask`` (integer [B,H,W] or [H,W]) gives the
        features of this call instead of the configured ones."""
        if feature_mask is not None:
            if not isinstance(feature_mask, Tensor):
                raise ExplainerInputError(
                    f"feature_mask must be a long tensor [B,H,W] or [H,W]; got {type(feature_mask).__name__}.")
            _check_mask_tensor(feature_mask, "feature_mask")
        self._feature_mask = feature_mask
        try:
            return super().attribute(x, target, reduce)
        finally:
            self._feature_mask = None

    def feature_labels(self, x: Tensor, feature_mask: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """Contiguous feature labels long [B,H,W] (ids in increasing order of the given ones) and
        the number of features M_i of each image."""
        mask = feature_mask if feature_mask is not None else self.features
        b, _, h, w = x.shape
        if isinstance(mask, Tensor):
            return check_feature_mask(mask, x)
        if mask == "grid":
            labels = grid_features(b, h, w, self.cell, x.device)
            return labels, [int(labels[0].max()) + 1] * b
        return relabel(segment(x, self.segmentation, self.n_segments, self.compactness))

    def _flat_pairs(self, counts: list[int], device: torch.device) -> tuple[Tensor, Tensor]:
        """(image, feature) index pairs for every feature of every image, image-major."""
        img = torch.cat([torch.full((m,), i, dtype=torch.long) for i, m in enumerate(counts)])
        feat = torch.cat([torch.arange(m) for m in counts])
        return img.to(device), feat.to(device)

    def feature_drops(self, x: Tensor, idx: Tensor, full: Tensor, labels: Tensor, counts: list[int],
                      perturb: Callable[[Tensor, Tensor, Tensor], Tensor]) -> Tensor:
        """Map [B,H,W] of ``full − score(perturbed)`` per (image, feature), each feature's value on its
        pixels. ``perturb(ii, ff, on)`` builds the perturbed copies for image indices ``ii``, feature
        ids ``ff`` and their pixel masks ``on`` [N,1,H,W]; ``internal_batch_size`` copies per forward."""
        b, _, h, w = x.shape
        ii_all, ff_all = self._flat_pairs(counts, x.device)
        flat = labels.flatten(1)
        drop = torch.empty(ii_all.shape[0], device=x.device, dtype=x.dtype)
        with torch.no_grad():
            for s in range(0, ii_all.shape[0], self.internal_batch_size):
                ii, ff = ii_all[s:s + self.internal_batch_size], ff_all[s:s + self.internal_batch_size]
                on = (flat[ii] == ff[:, None]).view(-1, 1, h, w)
                drop[s:s + ii.shape[0]] = full[ii] - self._score(perturb(ii, ff, on), idx[ii])
        coef = torch.zeros(b, max(counts), device=x.device, dtype=x.dtype)
        coef[ii_all, ff_all] = drop
        return coef.gather(1, flat).view(b, h, w)

    def _score(self, x: Tensor, idx: Tensor) -> Tensor:
        """Target logit of each image of ``x`` [N,C,H,W] for class indices ``idx`` [N]."""
        return self._logits(x).gather(1, idx[:, None]).squeeze(1)

    def _checked_indices(self, x: Tensor, target: Target, first: Tensor) -> tuple[Tensor, Tensor]:
        """Target indices (a ``"predicted"`` target from ``x``) checked against the logits of
        ``first``, and those target logits."""
        logits = self._logits(first)
        if first is not x:
            target.resolve(self._logits, x)
        idx = target.indices(logits)  # resolves "predicted" from these logits when first is x
        return idx, logits.gather(1, idx[:, None]).squeeze(1)


@register("feature_ablation")
class FeatureAblation(FeatureMaskExplainer):
    """Feature ablation (Captum's ``FeatureAblation``; occlusion with arbitrary regions, Zeiler &
    Fergus, 2014): each feature in turn is replaced by ``baseline`` ("zero", "mean", "gray",
    "blur", a number or a tensor) and credited with the drop f(x) − f(x with it ablated) of the
    target logit. One forward per feature per image, ``internal_batch_size`` images per forward.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        features: ``grid``, ``superpixels``, or an integer label map [B,H,W] / [H,W].
        cell: grid cell in px (must divide H and W).
        baseline: replacement: a fill (``zero``, ``mean``, ``gray``, ``blur``, ``rise_blur``), a number or a tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        segmentation: superpixels for ``features="superpixels"``: ``slic`` | ``quickshift`` | ``grid``.
        n_segments: target number of superpixels.
        compactness: SLIC's colour-vs-position weight.
        internal_batch_size: perturbed images per forward.
    """

    def __init__(self, model: nn.Module, features: str | Tensor = "grid", cell: int = 8,
                 baseline: FillLike = "zero", blur_sigma: float | None = None, segmentation: str = "slic",
                 n_segments: int = 50, compactness: float = 1.0, internal_batch_size: int = 256) -> None:
        super().__init__(model, features, cell, segmentation, n_segments, compactness, internal_batch_size)
        self.baseline = check_fill(baseline, "baseline")
        self.blur_sigma = blur_sigma

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        with torch.no_grad():
            idx, full = self._checked_indices(x, target, x)
        labels, counts = self.feature_labels(x, self._feature_mask)
        fill = make_fill(x, self.baseline, self.blur_sigma, option="baseline")
        return self.feature_drops(x, idx, full, labels, counts,
                                  lambda ii, ff, on: torch.where(on, fill[ii], x[ii]))


@register("feature_permutation")
class FeaturePermutation(FeatureMaskExplainer):
    """Permutation feature importance (Fisher et al., 2019, "All Models are Wrong, but Many are
    Useful"; Captum's ``FeaturePermutation``): each feature's pixels are swapped across the batch by
    a random permutation (never the identity), and the feature is credited with
    f(x) − f(x with the feature permuted) per image.

    One ``torch.randperm(B)`` per feature in feature order from a CPU generator seeded by ``seed``:
    Captum's draws after ``torch.manual_seed(seed)``. The map of an image depends on the other
    images of the batch (that is the method); a single image gets zeros, with a warning.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        features: ``grid``, ``superpixels``, or an integer label map [B,H,W] / [H,W].
        cell: grid cell in px (must divide H and W).
        seed: seeds the permutations (a CPU generator).
        segmentation: superpixels for ``features="superpixels"``: ``slic`` | ``quickshift`` | ``grid``.
        n_segments: target number of superpixels.
        compactness: SLIC's colour-vs-position weight.
        internal_batch_size: perturbed images per forward.
    """

    def __init__(self, model: nn.Module, features: str | Tensor = "grid", cell: int = 8, seed: int = 0,
                 segmentation: str = "slic", n_segments: int = 50, compactness: float = 1.0,
                 internal_batch_size: int = 256) -> None:
        super().__init__(model, features, cell, segmentation, n_segments, compactness, internal_batch_size)
        self.seed = int(seed)

    def permutations(self, n_features: int, batch: int) -> Tensor:
        """The permutation of the batch used for each feature, long [M,B] (CPU)."""
        gen = torch.Generator().manual_seed(self.seed)
        ident = torch.arange(batch)
        out = []
        for _ in range(n_features):
            perm = torch.randperm(batch, generator=gen)
            while bool((perm == ident).all()):
                perm = torch.randperm(batch, generator=gen)
            out.append(perm)
        return torch.stack(out)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        b, _, h, w = x.shape
        with torch.no_grad():
            idx, full = self._checked_indices(x, target, x)
        labels, counts = self.feature_labels(x, self._feature_mask)
        if b == 1:
            warnings.warn("feature_permutation permutes each feature across the batch; a batch of one image has "
                          "nothing to permute with and gets a zero map. Explain several images at once.",
                          UserWarning, stacklevel=4)
            return torch.zeros(b, h, w, device=x.device, dtype=x.dtype)
        perms = self.permutations(max(counts), b).to(x.device)  # [M,B]
        return self.feature_drops(x, idx, full, labels, counts,
                                  lambda ii, ff, on: torch.where(on, x[perms[ff, ii]], x[ii]))


@register("shapley_value_sampling")
class ShapleyValueSampling(FeatureMaskExplainer):
    """Shapley value sampling (Castro et al., 2009, "Polynomial calculation of the Shapley value
    based on sampling"; Štrumbelj & Kononenko, 2014; Captum's ``ShapleyValueSampling``).

    For each of ``n_samples`` random orders of the features, start from ``baseline`` and add the
    features of the image one at a time; each feature is credited with the change of the target
    logit when it is added, averaged over the orders. Unbiased for the Shapley values of the
    feature game; their sum is exactly f(x) − f(baseline) for every order. The orders of an image
    are ``n_samples`` draws of ``torch.randperm(M_i)`` from a generator seeded by that image's seed
    (module docstring). n·(M_i − 1) + 2 forwards per image (f(x) once, not once per order).

    Args:
        model: the classifier (returns logits [B, num_classes]).
        n_samples: random feature orders per image.
        features: ``grid``, ``superpixels``, or an integer label map [B,H,W] / [H,W].
        cell: grid cell in px (must divide H and W).
        baseline: replacement: a fill (``zero``, ``mean``, ``gray``, ``blur``, ``rise_blur``), a number or a tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        seed: seeds the orders (one derived seed per image).
        segmentation: superpixels for ``features="superpixels"``: ``slic`` | ``quickshift`` | ``grid``.
        n_segments: target number of superpixels.
        compactness: SLIC's colour-vs-position weight.
        internal_batch_size: perturbed images per forward.
    """

    def __init__(self, model: nn.Module, n_samples: int = 25, features: str | Tensor = "grid", cell: int = 8,
                 baseline: FillLike = "zero", blur_sigma: float | None = None, seed: int = 0,
                 segmentation: str = "slic", n_segments: int = 50, compactness: float = 1.0,
                 internal_batch_size: int = 256) -> None:
        super().__init__(model, features, cell, segmentation, n_segments, compactness, internal_batch_size)
        self.n_samples = positive_int(n_samples, "n_samples")
        self.baseline = check_fill(baseline, "baseline")
        self.blur_sigma = blur_sigma
        self.seed = int(seed)

    def orders(self, x: Tensor, counts: list[int]) -> list[Tensor]:
        """Per image, the feature orders long [n_samples, M_i] (CPU)."""
        out = []
        for m, s in zip(counts, image_seeds(x, self.seed)):
            gen = torch.Generator().manual_seed(s)
            out.append(torch.stack([torch.randperm(m, generator=gen) for _ in range(self.n_samples)]))
        return out

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        b, _, h, w = x.shape
        n = self.n_samples
        fill = make_fill(x, self.baseline, self.blur_sigma, option="baseline")
        with torch.no_grad():
            idx, f_base = self._checked_indices(x, target, fill)
            f_full = self._score(x, idx)
        labels, counts = self.feature_labels(x, self._feature_mask)
        orders = self.orders(x, counts)
        m_max = max(counts)
        # position of each feature in each order, padded features never switched on
        pos = torch.full((b, n, m_max), m_max, dtype=torch.long)
        for i, o in enumerate(orders):
            pos[i].scatter_(1, o, torch.arange(o.shape[1]).expand_as(o).contiguous())
        pos = pos.to(x.device)
        # evaluations (image, order, k): the first k+1 features of the order on, k < M_i − 1 (k = M_i − 1 is x)
        inner = torch.tensor(counts, device=x.device) - 1
        ii_all = torch.arange(b, device=x.device).repeat_interleave(n * inner)
        local = torch.arange(ii_all.shape[0], device=x.device) - (torch.cumsum(n * inner, 0) - n * inner)[ii_all]
        pp_all, kk_all = local // inner[ii_all], local % inner[ii_all]
        flat = labels.flatten(1)
        y = torch.empty(ii_all.shape[0], device=x.device, dtype=x.dtype)
        with torch.no_grad():
            for s in range(0, ii_all.shape[0], self.internal_batch_size):
                sl = slice(s, s + self.internal_batch_size)
                ii, pp, kk = ii_all[sl], pp_all[sl], kk_all[sl]
                on = (pos[ii, pp].gather(1, flat[ii]) <= kk[:, None]).view(-1, 1, h, w)
                y[sl] = self._score(torch.where(on, x[ii], fill[ii]), idx[ii])
        coef = torch.zeros(b, m_max, device=x.device, dtype=x.dtype)
        start = 0
        for i, m in enumerate(counts):
            scores = torch.cat([f_base[i].expand(n, 1), y[start:start + n * (m - 1)].view(n, m - 1),
                                f_full[i].expand(n, 1)], 1)  # [n, M_i + 1]: 0..M_i features on
            start += n * (m - 1)
            gains = scores[:, 1:] - scores[:, :-1]  # gains[p, k]: adding orders[i][p, k]
            coef[i, :m] = torch.zeros(m, device=x.device, dtype=x.dtype).index_add_(
                0, orders[i].flatten().to(x.device), gains.flatten()) / n
        return coef.gather(1, flat).view(b, h, w)


@register("gradient_shap")
class GradientShap(Explainer):
    """GradientSHAP (Lundberg & Lee, 2017, "A Unified Approach to Interpreting Model Predictions";
    Captum's ``GradientShap``), i.e. expected gradients (Erion et al., 2021, "Improving performance
    of deep learning models with axiomatic attribution priors and expected gradients") with input
    noise: the mean over ``n_samples`` draws of (x̃ − x')·∂f/∂x(x' + α(x̃ − x')), with x' drawn
    uniformly from the baseline distribution, α ~ U(0, 1) and x̃ = x + N(0, ``stdevs``²).

    ``baselines``: a distribution [N,C,H,W] shared by the batch (e.g. training images: expected
    gradients), or one reference per image — "zero", "mean", "gray", "blur", a number or a tensor
    broadcastable to x [C,H,W]. Per-channel maps [B,C,H,W]; their sum approximates
    E[f(x)] − E[f(x')] (completeness in expectation), so the default reduction sums channels, as
    integrated gradients. ``internal_batch_size`` points per forward + backward.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        n_samples: draws (x', α, noise) per image.
        stdevs: standard deviation of the Gaussian input noise (0: none).
        baselines: a distribution [N,C,H,W], or one reference per image: a fill name, a number or a tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        seed: seeds the draws (one derived seed per image, see the module docstring).
        internal_batch_size: points per forward + backward.
    """

    default_reduce = "sum"
    signed = True

    def __init__(self, model: nn.Module, n_samples: int = 5, stdevs: float = 0.0, baselines: FillLike = "zero",
                 blur_sigma: float | None = None, seed: int = 0, internal_batch_size: int = 64) -> None:
        super().__init__(model)
        self.n_samples = positive_int(n_samples, "n_samples")
        if isinstance(stdevs, bool) or not isinstance(stdevs, numbers.Real) or not float(stdevs) >= 0:
            raise ConfigError(f"stdevs (the input noise's standard deviation) must be a number ≥0; got {stdevs!r}.")
        self.stdevs = float(stdevs)
        self.baselines = check_fill(baselines, "baselines")
        self.blur_sigma = blur_sigma
        self.seed = int(seed)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def distribution(self, x: Tensor) -> tuple[Tensor, bool]:
        """The baselines as [N,C,H,W] and whether they are shared by the batch (else N = B, one per image)."""
        if isinstance(self.baselines, Tensor) and self.baselines.ndim == 4:
            dist = self.baselines
            if tuple(dist.shape[1:]) != tuple(x.shape[1:]) or dist.shape[0] == 0:
                raise ExplainerInputError(
                    f"baselines of shape {tuple(dist.shape)} is not a distribution of images like x "
                    f"{tuple(x.shape)}: pass [N,{x.shape[1]},{x.shape[2]},{x.shape[3]}] with N ≥ 1 (or one "
                    "reference [C,H,W], or a fill name such as 'zero').")
            return dist.to(device=x.device, dtype=x.dtype), True
        return make_fill(x, self.baselines, self.blur_sigma, option="baselines"), False

    def draws(self, x: Tensor, n_baselines: int) -> tuple[Tensor, Tensor, list[int]]:
        """Per image: baseline indices long [B,n], α [B,n] (x.dtype) and the image seeds."""
        seeds = image_seeds(x, self.seed)
        ids, alphas = [], []
        for s in seeds:
            rs = np.random.RandomState(_numpy_seed(s))
            ids.append(torch.as_tensor(rs.choice(n_baselines, self.n_samples), dtype=torch.long))
            alphas.append(torch.as_tensor(rs.uniform(0.0, 1.0, self.n_samples)))
        return (torch.stack(ids).to(x.device), torch.stack(alphas).to(device=x.device, dtype=x.dtype), seeds)

    def noise(self, x: Tensor, seed: int) -> Tensor:
        """The input noise [n,C,H,W] of the image with seed ``seed`` (Captum's ``torch.normal`` draws)."""
        gen = torch.Generator(device=x.device).manual_seed(seed)
        return torch.randn(self.n_samples, *x.shape[1:], generator=gen, device=x.device, dtype=x.dtype) * self.stdevs

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        b = x.shape[0]
        n = self.n_samples
        dist, shared = self.distribution(x)
        ids, alphas, seeds = self.draws(x, dist.shape[0] if shared else 1)
        target.resolve(self._logits, x)
        rows_i = torch.arange(b, device=x.device).repeat_interleave(n)
        rows_j = torch.arange(n, device=x.device).repeat(b)
        total = torch.zeros_like(x)
        noise: dict[int, Tensor] = {}  # the noise of the images of the current chunk only
        for s in range(0, b * n, self.internal_batch_size):
            e = min(s + self.internal_batch_size, b * n)
            ii, jj = rows_i[s:e], rows_j[s:e]
            xi = x[ii]
            if self.stdevs > 0:
                first, last = s // n, (e - 1) // n
                noise = {i: noise[i] if i in noise else self.noise(x, seeds[i]) for i in range(first, last + 1)}
                xi = xi + torch.cat([noise[i][max(s - i * n, 0):min(e - i * n, n)] for i in range(first, last + 1)])
            base = dist[ids[ii, jj]] if shared else dist[ii]
            diff = xi - base
            point = (base + alphas[ii, jj].view(-1, 1, 1, 1) * diff).requires_grad_(True)
            logits = self._logits(point)
            idx = target.indices(logits)  # resolved above: checks the class count, returns [B]
            (grad,) = torch.autograd.grad(logits.gather(1, idx[ii][:, None]).sum(), point)
            total.index_add_(0, ii, diff * grad)
        return total / n
