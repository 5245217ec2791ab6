"""Faithfulness by feature sets (Quantus 0.6): IROF, Infidelity, Sensitivity-n, Sufficiency.

All four follow Quantus 0.6's implementations (``quantus.IROF``, ``Infidelity``, ``SensitivityN``,
``Sufficiency``) and are tested equal to them on the same model, images and maps
(tests/metrics/test_faithfulness_sets_axiomatic.py). Perturbed images are built on the device by
broadcasting and forwarded ``internal_batch_size`` at a time (:func:`blockwise_scores`).

Where Quantus' value depends on the batch the image came in (IROF's padded curves and batch-wide
``"mean"`` baseline, max-normalisation over the whole batch), the xaudit value is the one Quantus
gives the image alone, so ``devices=2`` equals ``devices=1``. Sufficiency compares the maps of a
batch with each other and is batch-dependent by definition (as in Quantus).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xaudit.explainers.segmentation import SEGMENTATIONS, segment
from xaudit.metrics.base import (
    ModelHolder,
    XAuditMetric,
    blockwise_scores,
    check_attribution,
    check_images,
    check_target,
    check_target_range,
    evaluating,
    model_logits,
    target_scores,
)
from xaudit.metrics.faithfulness import baseline_values, check_baseline
from xaudit.metrics.registry import register_metric
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import choice, positive_int


def clean_scores(model: nn.Module, x: Tensor, target: Tensor, output: str) -> Tensor:
    logits = model_logits(model, x)
    check_target_range(target, logits.shape[-1])
    return target_scores(logits, target, output)


def _check_batch(metric: str, x: Tensor, attr: Tensor, target: Tensor) -> None:
    check_images(x, metric)
    check_attribution(attr, metric, x=x)
    check_target(target, x.shape[0], metric)


@register_metric("irof")
class IROF(ModelHolder, XAuditMetric):
    """Iterative Removal Of Features (Rieger & Hansen, 2020); higher is better.

    Superpixels are ranked by their mean attribution (highest first) and replaced by the baseline
    one after another, cumulatively; after each removal the explained class's softmax probability
    is divided by the clean one. The score is the area over that curve, Quantus' ``M − trapz(curve)``
    for an image with M superpixels (curve points 1..M, unit spacing, no point at 0 removed).

    Segmentation: Quantus uses ``skimage.segmentation.slic(img, start_label=0)``; xaudit's own SLIC
    (:func:`xaudit.explainers.segmentation.segment`, torch, on normalised tensors) is a different
    implementation, so the default labels differ from Quantus'. ``update(..., segments=)`` takes any
    label map long [B,H,W] (labels 0..M_i−1), which the parity test uses to give both the same
    skimage superpixels. ``perturb_baseline="mean"`` (Quantus' default) is each image's own mean over
    C,H,W of the clean image; Quantus takes the mean of the whole, progressively perturbed batch and
    pads curves of images with fewer superpixels by zeros, so its value depends on the batch —
    xaudit's equals Quantus' on the image alone with a numeric baseline. The map's normalisation
    (Quantus ``normalise=True``) does not change a ranking and is not applied.
    """

    family = "faithfulness"
    measures = "area over the score curve as superpixels are removed in order of their mean attribution"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = "Rieger & Hansen, IROF: a low resource evaluation metric for explanation methods, 2020"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "segmentation: xaudit's torch SLIC (Quantus: skimage slic); 'mean' baseline per image, not per batch",)

    def __init__(self, model: nn.Module, perturb_baseline: str | float = "mean", segmentation_method: str = "slic",
                 n_segments: int = 100, internal_batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.perturb_baseline = check_baseline(perturb_baseline)
        self.segmentation_method = choice(segmentation_method, tuple(SEGMENTATIONS), "segmentation_method",
                                          "segmentation")
        self.n_segments = positive_int(n_segments, "n_segments")
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def update(self, x: Tensor, attr: Tensor, target: Tensor, segments: Tensor | None = None) -> None:
        """Add the AOCs of one batch; ``segments`` long [B,H,W] replaces the SLIC labels."""
        name = type(self).__name__
        _check_batch(name, x, attr, target)
        b, _, h, w = x.shape
        if segments is None:
            segments = segment(x, self.segmentation_method, n_segments=self.n_segments)
        if not isinstance(segments, Tensor) or tuple(segments.shape) != (b, h, w) or segments.is_floating_point():
            got = list(segments.shape) if isinstance(segments, Tensor) else type(segments).__name__
            raise ValueError(f"{name}: segments must be integer labels [B,H,W]={[b, h, w]} (0..M-1 per image); "
                             f"got {got}.")
        segments = segments.to(x.device).long().flatten(1)
        target = target.to(x.device)
        m = int(segments.max()) + 1 if segments.numel() else 1
        counts = torch.zeros(b, m, device=x.device, dtype=torch.float64).scatter_add_(
            1, segments, torch.ones_like(segments, dtype=torch.float64))
        n_seg = (counts > 0).sum(1)
        if bool((counts[:, :1] == 0).any()) or bool((n_seg != segments.amax(1) + 1).any()):
            raise ValueError(f"{name}: segment labels must be contiguous 0..M-1 in every image.")
        if bool((n_seg < 2).any()):
            raise ValueError(f"{name}: an image has fewer than 2 superpixels (Quantus' assert_nr_segments); "
                             "use a finer segmentation (more n_segments) or larger images.")
        sums = torch.zeros(b, m, device=x.device, dtype=torch.float64).scatter_add_(
            1, segments, attr.to(x.device).flatten(1).double())
        means = torch.where(counts > 0, sums / counts.clamp_min(1), torch.full_like(sums, -torch.inf))
        order = torch.argsort(-means, dim=1, stable=True)  # absent labels (−inf) come last
        rank_of_seg = torch.empty_like(order).scatter_(1, order, torch.arange(m, device=x.device).expand(b, m))
        pixel_rank = rank_of_seg.gather(1, segments).view(b, 1, 1, h, w)
        with evaluating(self.model):
            p0 = clean_scores(self.model, x, target, "prob")
            fill = baseline_values(x, self.perturb_baseline)
            steps = torch.arange(1, m + 1, device=x.device).view(1, m, 1, 1, 1)

            def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
                taken = pixel_rank[s0:s1] < steps[:, t0:t1]
                return torch.where(taken, fill[s0:s1, None], x[s0:s1, None]).flatten(0, 1)

            probs = blockwise_scores(self.model, b, m, build, target, self.internal_batch_size)
        curve = (probs.double() / p0.double()[:, None])
        valid = torch.arange(m, device=x.device)[None] < n_seg[:, None]
        curve = torch.where(valid, curve, torch.zeros_like(curve))
        # trapz over the first M_i points with dx=1: sum − (first + last)/2
        last = curve.gather(1, (n_seg - 1)[:, None]).squeeze(1)
        area = curve.sum(1) - (curve[:, 0] + last) / 2
        self._add_values(n_seg.double() - area)


def _blocks(h: int, w: int, patch: int, device: torch.device) -> tuple[Tensor, int]:
    """Block index [H,W] of each pixel in patch×patch blocks, raster order, and the number of blocks."""
    nbh, nbw = -(-h // patch), -(-w // patch)
    rows = torch.arange(h, device=device) // patch
    cols = torch.arange(w, device=device) // patch
    return rows[:, None] * nbw + cols[None], nbh * nbw


@register_metric("infidelity")
class Infidelity(ModelHolder, XAuditMetric):
    """Infidelity (Yeh et al., NeurIPS 2019) in Quantus 0.6's form; lower is better.

    Yeh et al. define E_I[(Iᵀ Φ(x) − (f(x) − f(x − I)))²] over random perturbations I. Quantus 0.6
    (reproduced here) uses deterministic ones: the image's ``patch_size``×``patch_size`` blocks
    are replaced by the baseline one after another in raster order, *cumulatively*; after each block
    I = x − x_perturbed, the term is (f(x) − f(x_perturbed) − Σ Φ·I)² with f the target **logit**
    (Quantus' ``softmax=False``) and Φ broadcast over channels; the score is the mean over the
    blocks (and over ``perturb_patch_sizes``). Quantus' ``n_perturb_samples`` repeats the same
    deterministic loop and averages identical values, so it is left out. Border blocks of an image
    whose side is not a multiple of the patch are cropped (Quantus mis-indexes that case).
    """

    family = "faithfulness"
    measures = "squared error between the score drop and the attribution-weighted input change under patch removal"
    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = "Yeh et al., On the (in)fidelity and sensitivity of explanations, NeurIPS 2019"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "Quantus 0.6's deterministic cumulative patch removal, not Yeh et al.'s random perturbations",)

    def __init__(self, model: nn.Module, perturb_patch_sizes: tuple[int, ...] | list[int] = (4,),
                 perturb_baseline: str | float = "black", output: str = "logit", internal_batch_size: int = 256,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        if isinstance(perturb_patch_sizes, int):
            perturb_patch_sizes = (perturb_patch_sizes,)
        if not perturb_patch_sizes:
            raise ConfigError("perturb_patch_sizes must list at least one patch size (e.g. [4]).")
        self.perturb_patch_sizes = tuple(positive_int(p, "perturb_patch_sizes") for p in perturb_patch_sizes)
        self.perturb_baseline = check_baseline(perturb_baseline)
        if output not in ("prob", "logit"):
            raise ConfigError(f"output={output!r} must be 'logit' (Quantus' default) or 'prob'.")
        self.output = output
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the infidelities of one batch."""
        name = type(self).__name__
        _check_batch(name, x, attr, target)
        b, _, h, w = x.shape
        for p in self.perturb_patch_sizes:
            if p > min(h, w):
                raise ValueError(f"{name}: patch size {p} exceeds the {h}x{w} images; use patch sizes ≤{min(h, w)}.")
        target = target.to(x.device)
        attr = attr.to(x.device)
        scores = []
        with evaluating(self.model):
            f0 = clean_scores(self.model, x, target, self.output).double()
            fill = baseline_values(x, self.perturb_baseline)
            # Σ_c (x − fill) · Φ per pixel: what removing a pixel contributes to Iᵀ Φ
            contrib = ((x - fill).double().sum(1) * attr.double()).flatten(1)
            for p in self.perturb_patch_sizes:
                block, nb = _blocks(h, w, p, x.device)
                steps = torch.arange(nb, device=x.device).view(1, nb, 1, 1, 1)

                def build(s0: int, s1: int, t0: int, t1: int, block: Tensor = block, steps: Tensor = steps) -> Tensor:
                    taken = block.view(1, 1, 1, h, w) <= steps[:, t0:t1]
                    return torch.where(taken, fill[s0:s1, None], x[s0:s1, None]).flatten(0, 1)

                f = blockwise_scores(self.model, b, nb, build, target, self.internal_batch_size, self.output)
                per_block = torch.zeros(b, nb, device=x.device, dtype=torch.float64).scatter_add_(
                    1, block.flatten().expand(b, -1), contrib)
                a_sums = per_block.cumsum(1)
                scores.append(((f0[:, None] - f.double()) - a_sums).square().mean(1))
        self._add_values(torch.stack(scores, 1).mean(1))


def pearson_columns(a: Tensor, b: Tensor) -> Tensor:
    """Pearson correlation of each column of [N,K] tensors over the N rows (NaN where constant)."""
    a = a.double() - a.double().mean(0, keepdim=True)
    b = b.double() - b.double().mean(0, keepdim=True)
    den = a.norm(dim=0) * b.norm(dim=0)
    num = (a * b).sum(0)
    return torch.where(den > 0, num / den, torch.full_like(num, float("nan")))


@register_metric("sensitivity_n")
class SensitivityN(ModelHolder, XAuditMetric):
    """Sensitivity-n (Ancona et al., ICLR 2018) in Quantus 0.6's form; higher is better.

    Pixels are removed (set to the baseline) in order of attribution, highest first,
    ``features_in_step`` at a time, cumulatively, for the first ``n_max_percentage`` of the image.
    For each step n the Pearson correlation **over all samples** between the summed attribution of
    the removed pixels and the drop of the target's softmax probability is taken; ``compute()`` is
    their mean over n (Quantus' aggregate), :meth:`correlations` the per-n values.

    Sensitivity-n is a dataset-level score: there is no per-sample value (``per_sample()`` is NaN
    per sample); the per-sample curves are kept (``cat`` states) and correlated in ``compute()``,
    so the value is exact across DDP ranks. ``cumulative_attr=True`` (default) sums the attribution
    of all pixels removed so far, Ancona et al.'s definition; Quantus 0.6 sums only the pixels of
    the latest step against the cumulative score drop — ``cumulative_attr=False`` reproduces that.
    Quantus' max-normalisation of the batch's maps is a global scale and leaves the correlation
    unchanged, so it is not applied. Images are ranked pixel-wise (all channels of a pixel removed
    together); Quantus ranks the C·H·W channel values of the broadcast map (the same for C=1).
    """

    family = "faithfulness"
    measures = "correlation across samples between the attribution of n removed pixels and the score drop"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = ("Ancona et al., Towards better understanding of gradient-based attribution methods "
                            "for deep neural networks, ICLR 2018")

    def __init__(self, model: nn.Module, n_max_percentage: float = 0.8, features_in_step: int = 1,
                 perturb_baseline: str | float = "black", cumulative_attr: bool = True,
                 internal_batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        if isinstance(n_max_percentage, bool) or not isinstance(n_max_percentage, (int, float)) \
                or not 0 < n_max_percentage <= 1:
            raise ConfigError(f"n_max_percentage={n_max_percentage!r} must be a fraction in (0, 1] of the pixels "
                              "(e.g. 0.8).")
        self.n_max_percentage = float(n_max_percentage)
        self.features_in_step = positive_int(features_in_step, "features_in_step")
        self.perturb_baseline = check_baseline(perturb_baseline)
        self.cumulative_attr = bool(cumulative_attr)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.add_state("pred_deltas", default=[], dist_reduce_fx="cat")
        self.add_state("att_sums", default=[], dist_reduce_fx="cat")

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the curves of one batch (``per_sample`` gets NaN per sample)."""
        name = type(self).__name__
        _check_batch(name, x, attr, target)
        b, _, h, w = x.shape
        k = self.features_in_step
        if (h * w) % k:
            raise ValueError(f"{name}: features_in_step={k} must divide the {h}x{w}={h * w} pixels "
                             "(Quantus' assert_features_in_step).")
        steps = int(self.n_max_percentage * h * w // k)
        if steps < 1:
            raise ValueError(f"{name}: n_max_percentage={self.n_max_percentage} of {h * w} pixels is less than one "
                             f"step of {k}; raise n_max_percentage or lower features_in_step.")
        target = target.to(x.device)
        flat = attr.to(x.device).flatten(1)
        order = torch.argsort(-flat, dim=1, stable=True)
        rank = torch.empty_like(order).scatter_(1, order, torch.arange(h * w, device=x.device).expand(b, -1))
        rank = rank.view(b, 1, 1, h, w)
        with evaluating(self.model):
            p0 = clean_scores(self.model, x, target, "prob")
            fill = baseline_values(x, self.perturb_baseline)
            counts = (torch.arange(1, steps + 1, device=x.device) * k).view(1, steps, 1, 1, 1)

            def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
                taken = rank[s0:s1] < counts[:, t0:t1]
                return torch.where(taken, fill[s0:s1, None], x[s0:s1, None]).flatten(0, 1)

            probs = blockwise_scores(self.model, b, steps, build, target, self.internal_batch_size)
        sorted_attr = flat.double().gather(1, order[:, :steps * k]).view(b, steps, k).sum(2)
        self.pred_deltas.append(p0.double()[:, None] - probs.double())
        self.att_sums.append(sorted_attr.cumsum(1) if self.cumulative_attr else sorted_attr)
        self._add_values(torch.full((b,), float("nan"), dtype=torch.float64, device=x.device))

    def correlations(self) -> Tensor:
        """Pearson correlation over all samples for each step n: [steps]."""
        return pearson_columns(self._gathered("att_sums"), self._gathered("pred_deltas"))

    def compute(self) -> Tensor:
        """Mean over n of the per-n correlations (NaN columns, e.g. one sample, left out)."""
        corr = self.correlations()
        defined = ~torch.isnan(corr)
        return corr[defined].mean().float() if bool(defined.any()) else torch.tensor(float("nan"))


def seuclidean_matrix(a: Tensor) -> Tensor:
    """Pairwise standardised Euclidean distances [N,N] of the rows of ``a`` [N,D], each feature
    scaled by its variance over the rows (ddof=1), as ``scipy.spatial.distance.cdist(a, a, "seuclidean")``."""
    a = a.double()
    v = a.var(0, unbiased=True)
    d = a[:, None, :] - a[None, :, :]
    return (d.square() / v).sum(-1).sqrt()


@register_metric("sufficiency")
class Sufficiency(ModelHolder, XAuditMetric):
    """Sufficiency (Dasgupta, Frost & Moshkovitz, ICML 2022) in Quantus 0.6's form; higher is better.

    Within each batch, two samples "share an explanation" when the standardised Euclidean distance
    of their maps (|Φ|, features standardised over the batch), divided by the batch's largest such
    distance, is ≤ ``threshold``. A sample's score is the fraction of the *other* samples sharing its
    explanation that get the same predicted class (0 when none does). The score depends on which
    samples share the batch, by definition (as in Quantus): use the same batches to compare methods
    (xaudit's evaluation shards DDP ranks by whole batches, so values under DDP equal one device's).
    ``target`` is unused (the model's top-1 classes are compared). A batch of one sample gets NaN. Quantus'
    max-normalisation of the maps is a global scale that the standardised distance ignores.
    """

    family = "faithfulness"
    measures = "how often samples with similar explanations get the same prediction"
    higher_is_better: ClassVar[bool] = True
    protocol_target: ClassVar[str] = "predicted"
    paper: ClassVar[str] = ("Dasgupta, Frost & Moshkovitz, Framework for evaluating faithfulness of local "
                            "explanations, ICML 2022")

    def __init__(self, model: nn.Module, threshold: float = 0.6, abs: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        if isinstance(threshold, bool) or not isinstance(threshold, (int, float)) or not 0 < threshold < 1:
            raise ConfigError(f"threshold={threshold!r} must be a fraction in (0, 1) of the batch's largest "
                              "explanation distance (e.g. 0.6).")
        self.threshold = float(threshold)
        self.abs = bool(abs)

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the sufficiency of each sample of one batch (a batch of one is undefined: NaN)."""
        name = type(self).__name__
        _check_batch(name, x, attr, target)
        b = x.shape[0]
        if b < 2:  # e.g. the last batch of a data set: no other sample to compare with
            self._add_values(torch.full((b,), float("nan"), dtype=torch.float64, device=x.device))
            return
        a = attr.to(x.device).flatten(1).double()
        a = a.abs() if self.abs else a
        dist = seuclidean_matrix(a)
        peak = dist.abs().max()
        dist = dist / peak if bool(peak != 0) else dist
        similar = (dist <= self.threshold) & ~torch.eye(b, dtype=torch.bool, device=x.device)
        with evaluating(self.model):
            pred = model_logits(self.model, x).argmax(-1).to(x.device)
        same = pred[None, :] == pred[:, None]
        n_sim = similar.sum(1).double()
        hits = (similar & same).sum(1).double()
        self._add_values(torch.where(n_sim > 0, hits / n_sim.clamp_min(1), torch.zeros_like(n_sim)))
