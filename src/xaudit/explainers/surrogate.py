"""Surrogate explainers over superpixels: LIME and KernelSHAP.

Both switch superpixels on (keep the pixels) or off (replace them by ``baseline``), score the
perturbed images with the model, and fit a weighted linear model of the score on the binary
"interpretable" vectors; each pixel gets its superpixel's coefficient. Superpixels come from
:func:`xaudit.explainers.segmentation.segment` (quick shift, torch SLIC or a grid), or from a
``feature_mask`` long [B,H,W] passed to ``attribute``.

LIME's defaults are the lime package's (``LimeImageExplainer().explain_instance``, lime 0.2):
quick shift superpixels (kernel_size=4, max_dist=200, ratio=0.2, on each image mapped to [0,1]
by its own range), 1000 samples, a hidden superpixel replaced by its own mean colour
(``hide_color=None`` → ``baseline="segment_mean"``), the class probability as the score,
kernel width 0.25 on the cosine distance in the binary space, and ``Ridge(alpha=1)`` with an
intercept. KernelSHAP keeps SLIC, a zero baseline and the logit.

The binary samples of each image come from a local generator seeded by ``seed`` and the image's
own bits (:func:`xaudit.explainers.baselines.image_seeds`): reproducible, independent of the rest
of the batch, and the global RNG is untouched. All perturbed images of the batch go through the
model in chunks of ``internal_batch_size``; the regressions are solved in float64.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.explainers.base import AUTO, Explainer, Target, TargetLike
from xaudit.explainers.baselines import image_seeds
from xaudit.explainers.registry import register
from xaudit.explainers.segmentation import (
    QUICKSHIFT_DEFAULTS,
    SEGMENTATIONS,
    check_feature_mask,
    require_regions,
    segment,
)
from xaudit.ops.fills import FILLS, FillLike, check_fill, make_fill
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import positive_int

SCORES: tuple[str, ...] = ("logit", "prob")
DISTANCES: tuple[str, ...] = ("interpretable", "input")
#: a hidden superpixel takes its own per-channel mean over the image (lime's ``hide_color=None``)
SEGMENT_MEAN = "segment_mean"
BASELINES: tuple[str, ...] = (SEGMENT_MEAN, *FILLS)
_QS = QUICKSHIFT_DEFAULTS


def segment_means(x: Tensor, labels: Tensor, counts: list[int]) -> Tensor:
    """Each pixel of ``x`` [B,C,H,W] replaced by the mean of its superpixel, per channel (labels
    long [B,H,W], contiguous 0..M_i−1): lime's fill for ``hide_color=None``. Summed in float64."""
    b, c, h, w = x.shape
    offsets = torch.tensor([0, *counts[:-1]], device=x.device).cumsum(0)
    flat = (labels + offsets.view(b, 1, 1)).flatten()  # one label space for the whole batch
    total = sum(counts)
    values = x.detach().to(torch.float64).permute(1, 0, 2, 3).reshape(c, -1)
    sums = torch.zeros(c, total, dtype=torch.float64, device=x.device).index_add_(1, flat, values)
    sizes = torch.zeros(total, dtype=torch.float64, device=x.device).index_add_(
        0, flat, torch.ones_like(flat, dtype=torch.float64))
    means = sums / sizes
    return means[:, flat].view(c, b, h, w).permute(1, 0, 2, 3).to(x.dtype).contiguous()


def check_baseline(baseline: FillLike) -> FillLike:
    """``baseline`` unchanged if it is "segment_mean" or a fill :func:`make_fill` understands."""
    if isinstance(baseline, str) and baseline not in BASELINES:
        raise unknown_choice("baseline", baseline, BASELINES)
    return baseline if isinstance(baseline, str) and baseline == SEGMENT_MEAN else check_fill(baseline, "baseline")


class SuperpixelSurrogate(Explainer):
    """Shared machinery of LIME and KernelSHAP; subclasses say which binary vectors to sample
    (:meth:`coalitions`) and how to fit them (:meth:`fit`).

    Args:
        model: the classifier (returns logits [B, num_classes]).
        n_samples: perturbed samples per image (≥2).
        segmentation: superpixels: ``quickshift`` | ``slic`` | ``grid`` (see :func:`xaudit.explainers.segment`).
        n_segments: target number of superpixels (``slic``, ``grid``).
        compactness: SLIC's colour-vs-position weight (1: one grid step against one standard deviation).
        baseline: what a hidden superpixel shows: ``segment_mean`` (its own mean colour), a fill name
            (``zero``, ``mean``, ``gray``, ``blur``, ``rise_blur``), a number or a tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        score: the regressed output: ``logit`` or ``prob``.
        seed: seeds the sampled coalitions, per image (a local generator).
        internal_batch_size: perturbed images per forward.
        kernel_size: quick shift's kernel size.
        max_dist: quick shift's maximum distance.
        ratio: quick shift's colour-vs-space ratio.
    """

    def __init__(self, model: nn.Module, n_samples: int, segmentation: str = "slic", n_segments: int = 50,
                 compactness: float = 1.0, baseline: FillLike = "zero", blur_sigma: float | None = None,
                 score: str = "logit", seed: int = 0, internal_batch_size: int = 256, *,
                 kernel_size: float = _QS["kernel_size"], max_dist: float = _QS["max_dist"],
                 ratio: float = _QS["ratio"]) -> None:
        super().__init__(model)
        self.n_samples = positive_int(n_samples, "n_samples", minimum=2)
        if segmentation not in SEGMENTATIONS:
            raise unknown_choice("segmentation", segmentation, SEGMENTATIONS)
        self.segmentation = segmentation
        self.n_segments = positive_int(n_segments, "n_segments", minimum=2)
        if float(compactness) < 0:
            raise ConfigError(f"compactness must be ≥0; got {compactness}.")
        self.compactness = float(compactness)
        if float(kernel_size) < 1:
            raise ConfigError(f"kernel_size (quickshift) must be ≥1; got {kernel_size}.")
        if float(max_dist) < 0 or float(ratio) < 0:
            raise ConfigError(f"max_dist and ratio (quickshift) must be ≥0; got {max_dist}, {ratio}.")
        self.kernel_size, self.max_dist, self.ratio = float(kernel_size), float(max_dist), float(ratio)
        self.baseline = check_baseline(baseline)
        self.blur_sigma = blur_sigma
        if score not in SCORES:
            raise unknown_choice(f"{type(self).__name__} score", score, SCORES)
        self.score = score
        self.seed = int(seed)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self._feature_mask: Tensor | None = None

    def attribute(self, x: Tensor, target: TargetLike = "predicted", reduce: str | None = AUTO, *,
                  feature_mask: Tensor | None = None) -> Tensor:
        """As :meth:`Explainer.attribute`; ``feature_mask`` (long [B,H,W] or [H,W]) gives the
        superpixels instead of the configured segmentation."""
        self._feature_mask = feature_mask
        try:
            return super().attribute(x, target, reduce)
        finally:
            self._feature_mask = None

    # -- pieces a test or a caller can reproduce -------------------------------------------
    def superpixels(self, x: Tensor, feature_mask: Tensor | None = None) -> tuple[Tensor, list[int]]:
        """Contiguous superpixel labels long [B,H,W] and the number M_i of each image."""
        if feature_mask is not None:
            labels, counts = check_feature_mask(feature_mask, x)
            require_regions(counts, "feature_mask")
        else:
            labels = segment(x, self.segmentation, self.n_segments, self.compactness, kernel_size=self.kernel_size,
                             max_dist=self.max_dist, ratio=self.ratio)
            counts = [int(lab.max()) + 1 for lab in labels]
            params = (f"kernel_size={self.kernel_size:g}, max_dist={self.max_dist:g}, ratio={self.ratio:g}"
                      if self.segmentation == "quickshift" else f"n_segments={self.n_segments}")
            require_regions(counts, f"the {self.segmentation} segmentation ({params}) of x {tuple(x.shape)}")
        return labels, counts

    def fill(self, x: Tensor, labels: Tensor, counts: list[int]) -> Tensor:
        """The image [B,C,H,W] whose pixels replace those of switched-off superpixels."""
        if isinstance(self.baseline, str) and self.baseline == SEGMENT_MEAN:
            return segment_means(x, labels, counts)
        return make_fill(x, self.baseline, self.blur_sigma, option="baseline")

    def samples(self, x: Tensor, counts: list[int]) -> list[tuple[Tensor, Tensor | None]]:
        """Per image: the binary vectors Z [N,M_i] (float64, CPU) and their prior weights (or None),
        drawn from the generator of that image's seed."""
        return [self.coalitions(m, torch.Generator().manual_seed(s))
                for m, s in zip(counts, image_seeds(x, self.seed))]

    def coalitions(self, m: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """The binary vectors [N,m] of one image with ``m`` superpixels, and their weights."""
        raise NotImplementedError

    def fit(self, z: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Coefficients [M] of the surrogate for samples z [N,M], scores y [N], weights w [N]."""
        raise NotImplementedError

    def similarity(self, x: Tensor, perturbed: Tensor) -> Tensor | None:
        """Per-sample kernel weights computed from the perturbed images (LIME's input distance)."""
        return None

    # -- the method ------------------------------------------------------------------------
    def _scores(self, logits: Tensor, idx: Tensor) -> Tensor:
        out = logits.softmax(-1) if self.score == "prob" else logits
        return out.gather(1, idx[:, None]).squeeze(1)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        b, _, h, w = x.shape
        with torch.no_grad():
            idx = target.indices(self._logits(x))  # a bad target fails before any sampling
        labels, counts = self.superpixels(x, self._feature_mask)
        fill = self.fill(x, labels, counts)
        drawn = self.samples(x, counts)
        n_max = max(z.shape[0] for z, _ in drawn)
        m_max = max(counts)
        z_pad = torch.zeros(b, n_max, m_max, device=x.device, dtype=x.dtype)
        pair_img, pair_smp = [], []
        for i, (z, _) in enumerate(drawn):
            z_pad[i, :z.shape[0], :z.shape[1]] = z.to(device=x.device, dtype=x.dtype)
            pair_img.append(torch.full((z.shape[0],), i, dtype=torch.long))
            pair_smp.append(torch.arange(z.shape[0]))
        ii_all = torch.cat(pair_img).to(x.device)
        jj_all = torch.cat(pair_smp).to(x.device)
        flat_labels = labels.flatten(1)
        y = torch.empty(ii_all.shape[0], device=x.device, dtype=torch.float64)
        sim = torch.empty_like(y)
        with torch.no_grad():
            for s in range(0, ii_all.shape[0], self.internal_batch_size):
                ii, jj = ii_all[s:s + self.internal_batch_size], jj_all[s:s + self.internal_batch_size]
                keep = z_pad[ii, jj].gather(1, flat_labels[ii]).view(-1, 1, h, w)
                perturbed = x[ii] * keep + fill[ii] * (1 - keep)
                y[s:s + ii.shape[0]] = self._scores(self._logits(perturbed), idx[ii]).double()
                k = self.similarity(x[ii], perturbed)
                if k is not None:
                    sim[s:s + ii.shape[0]] = k.double()
        coef = torch.zeros(b, m_max, device=x.device, dtype=torch.float64)
        for i, (z, prior) in enumerate(drawn):
            rows = ii_all == i
            weight = sim[rows] if prior is None else prior.to(x.device)
            coef[i, :counts[i]] = self.fit(z.to(x.device), y[rows], weight)
        return coef.gather(1, flat_labels).view(b, h, w)


def _lime_kernel(d: Tensor, width: float) -> Tensor:
    """exp(−d² / (2 width²)): the kernel of the lime package (√exp(−d²/w²)) and of Captum."""
    return torch.exp(-d.pow(2) / (2 * width * width))


@register("lime")
class Lime(SuperpixelSurrogate):
    """LIME (Ribeiro et al., 2016, "Why Should I Trust You?") over superpixels.

    ``n_samples`` binary vectors: the first keeps every superpixel (the image itself, as the
    lime package does), the others keep each superpixel with probability 1/2 (lime's
    ``randint(0, 2)``). Each is weighted by exp(−d²/(2·``kernel_width``²)) with d the cosine
    distance to the image — in the binary space (``distance="interpretable"``, the lime package's
    choice) or between the flattened original and perturbed inputs (``"input"``, Captum's
    default) — and a ridge regression with intercept (``alpha``; 0 = ordinary weighted least
    squares) of ``score`` is fitted.

    Every default is the lime package's ``LimeImageExplainer().explain_instance``:
    ``segmentation="quickshift"`` (``kernel_size=4, max_dist=200, ratio=0.2``, run on each image
    mapped to [0,1] by its own min/max, see :mod:`xaudit.explainers.segmentation`),
    ``n_samples=1000``, ``baseline="segment_mean"`` (``hide_color=None``: a hidden superpixel
    shows its own mean colour), ``score="prob"`` (lime regresses ``classifier_fn``'s
    probabilities), ``kernel_width=0.25``, ``distance="interpretable"`` (cosine), ``alpha=1``.
    Deviations on request: ``segmentation="slic"``/``"grid"`` with ``n_segments`` (quick shift
    gives a single region on images ≲ 3·kernel_size px, e.g. often at 32 px), ``baseline="zero"``
    (or "mean", "gray", "blur", a number, a tensor — in the model's normalised space, not lime's
    pixel values), ``score="logit"``, ``distance="input"``. The previous defaults were
    ``segmentation="slic", n_segments=50, n_samples=500, baseline="zero", score="logit"``.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        n_samples: perturbed samples per image, the image itself first.
        segmentation: superpixels: ``quickshift`` | ``slic`` | ``grid`` (see :func:`xaudit.explainers.segment`).
        n_segments: target number of superpixels (``slic``, ``grid``).
        compactness: SLIC's colour-vs-position weight (1: one grid step against one standard deviation).
        baseline: what a hidden superpixel shows: ``segment_mean`` (its own mean colour), a fill name
            (``zero``, ``mean``, ``gray``, ``blur``, ``rise_blur``), a number or a tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        kernel_width: width w of the similarity kernel exp(−d²/(2w²)).
        distance: ``interpretable`` (cosine in the binary space) or ``input`` (between the images).
        alpha: ridge penalty (0: weighted least squares).
        score: the regressed output: ``prob`` or ``logit``.
        seed: seeds the sampled coalitions, per image (a local generator).
        internal_batch_size: perturbed images per forward.
        kernel_size: quick shift's kernel size.
        max_dist: quick shift's maximum distance.
        ratio: quick shift's colour-vs-space ratio.
    """

    signed = True

    def __init__(self, model: nn.Module, n_samples: int = 1000, segmentation: str = "quickshift",
                 n_segments: int = 50, compactness: float = 1.0, baseline: FillLike = SEGMENT_MEAN,
                 blur_sigma: float | None = None, kernel_width: float = 0.25, distance: str = "interpretable",
                 alpha: float = 1.0, score: str = "prob", seed: int = 0, internal_batch_size: int = 256,
                 kernel_size: float = _QS["kernel_size"], max_dist: float = _QS["max_dist"],
                 ratio: float = _QS["ratio"]) -> None:
        super().__init__(model, n_samples, segmentation, n_segments, compactness, baseline, blur_sigma, score,
                         seed, internal_batch_size, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio)
        if not float(kernel_width) > 0:
            raise ConfigError(f"kernel_width must be >0; got {kernel_width}.")
        self.kernel_width = float(kernel_width)
        if distance not in DISTANCES:
            raise unknown_choice("lime distance", distance, DISTANCES)
        self.distance = distance
        if float(alpha) < 0:
            raise ConfigError(f"alpha (ridge penalty) must be ≥0; got {alpha}.")
        self.alpha = float(alpha)

    def coalitions(self, m: int, gen: torch.Generator) -> tuple[Tensor, Tensor | None]:
        """All-ones first, then ``n_samples − 1`` vectors with each entry 1 with probability 1/2;
        with the interpretable distance, their kernel weights too."""
        draws = (torch.rand(self.n_samples - 1, m, generator=gen, dtype=torch.float64) < 0.5).double()
        z = torch.cat([torch.ones(1, m, dtype=torch.float64), draws])
        if self.distance == "input":
            return z, None
        # cosine distance between z and the all-ones vector (1 for the empty coalition)
        return z, _lime_kernel(1 - torch.sqrt(z.sum(1) / m), self.kernel_width)

    def similarity(self, x: Tensor, perturbed: Tensor) -> Tensor | None:
        if self.distance != "input":
            return None
        return _lime_kernel(1 - F.cosine_similarity(x.flatten(1), perturbed.flatten(1), dim=1), self.kernel_width)

    def fit(self, z: Tensor, y: Tensor, w: Tensor) -> Tensor:
        """Weighted ridge with an unpenalised intercept (sklearn's ``Ridge`` with sample weights)."""
        z, y, w = z.double(), y.double(), w.double()
        wn = w / w.sum()
        zc = z - wn @ z
        yc = y - wn @ y
        gram = zc.t() @ (w[:, None] * zc)
        rhs = zc.t() @ (w * yc)
        if self.alpha > 0:
            return torch.linalg.solve(gram + self.alpha * torch.eye(z.shape[1], dtype=z.dtype, device=z.device), rhs)
        return torch.linalg.pinv(gram, hermitian=True) @ rhs


def shapley_kernel_weight(m: int, k: int) -> float:
    """The Shapley kernel (M−1) / (C(M,k)·k·(M−k)) of a coalition of size 0 < k < M (Lundberg &
    Lee, 2017, Theorem 2)."""
    return (m - 1) / (math.comb(m, k) * k * (m - k))


@register("kernel_shap")
class KernelShap(SuperpixelSurrogate):
    """KernelSHAP (Lundberg & Lee, 2017, "A Unified Approach to Interpreting Model Predictions")
    over superpixels, with the efficiency constraint Σφ = f(x) − f(baseline) imposed exactly.

    Coalitions: the full and the empty one (they give f(x) and f(baseline)), then either every
    proper coalition weighted by the Shapley kernel when they number ≤ ``n_samples − 2`` (the
    solution then *is* the Shapley values of the superpixel game), or ``n_samples − 2`` coalitions
    drawn as Captum does — size k with probability ∝ (M−1)/(k(M−k)), members uniformly — each of
    weight 1. The weighted least squares problem is solved with one φ eliminated by the
    constraint (as the shap package); an under-determined system gets the minimum-norm solution.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        n_samples: coalitions per image, the full and the empty one included.
        segmentation: superpixels: ``quickshift`` | ``slic`` | ``grid`` (see :func:`xaudit.explainers.segment`).
        n_segments: target number of superpixels (``slic``, ``grid``).
        compactness: SLIC's colour-vs-position weight (1: one grid step against one standard deviation).
        baseline: what a hidden superpixel shows: ``segment_mean`` (its own mean colour), a fill name
            (``zero``, ``mean``, ``gray``, ``blur``, ``rise_blur``), a number or a tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        score: the explained output: ``logit`` or ``prob``.
        seed: seeds the sampled coalitions, per image (a local generator).
        internal_batch_size: perturbed images per forward.
        kernel_size: quick shift's kernel size.
        max_dist: quick shift's maximum distance.
        ratio: quick shift's colour-vs-space ratio.
    """

    signed = True

    def __init__(self, model: nn.Module, n_samples: int = 500, segmentation: str = "slic",
                 n_segments: int = 50, compactness: float = 1.0, baseline: FillLike = "zero",
                 blur_sigma: float | None = None, score: str = "logit", seed: int = 0,
                 internal_batch_size: int = 256, kernel_size: float = _QS["kernel_size"],
                 max_dist: float = _QS["max_dist"], ratio: float = _QS["ratio"]) -> None:
        super().__init__(model, n_samples, segmentation, n_segments, compactness, baseline, blur_sigma, score,
                         seed, internal_batch_size, kernel_size=kernel_size, max_dist=max_dist, ratio=ratio)
        self.n_samples = positive_int(n_samples, "n_samples", minimum=3)

    def coalitions(self, m: int, gen: torch.Generator) -> tuple[Tensor, Tensor]:
        """[full, empty, proper coalitions...] and their weights (the first two are constraints)."""
        ends = torch.stack([torch.ones(m, dtype=torch.float64), torch.zeros(m, dtype=torch.float64)])
        n = self.n_samples - 2
        if m < 62 and 2**m - 2 <= n:
            codes = torch.arange(1, 2**m - 1, dtype=torch.long)
            z = ((codes[:, None] >> torch.arange(m)) & 1).double()
            sizes = z.sum(1).long().tolist()
            weights = torch.tensor([shapley_kernel_weight(m, k) for k in sizes], dtype=torch.float64)
        else:
            k = torch.arange(1, m, dtype=torch.float64)
            sizes = torch.multinomial((m - 1) / (k * (m - k)), n, replacement=True, generator=gen) + 1
            ranks = torch.rand(n, m, generator=gen, dtype=torch.float64).argsort(1).argsort(1)
            z = (ranks < sizes[:, None]).double()
            weights = torch.ones(n, dtype=torch.float64)
        return torch.cat([ends, z]), torch.cat([torch.ones(2, dtype=torch.float64), weights])

    def fit(self, z: Tensor, y: Tensor, w: Tensor) -> Tensor:
        z, y, w = z.double(), y.double(), w.double()
        fx, f0 = y[0], y[1]
        z, y, w = z[2:], y[2:], w[2:]
        last = z[:, -1:]
        design = (z[:, :-1] - last) * w.sqrt()[:, None]
        rhs = (y - f0 - last[:, 0] * (fx - f0)) * w.sqrt()
        head = torch.linalg.pinv(design) @ rhs
        return torch.cat([head, (fx - f0 - head.sum())[None]])
