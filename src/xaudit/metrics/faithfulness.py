"""Quantus' perturbation faithfulness family: estimate, monotonicity, region perturbation, selectivity.

Five metrics with Quantus 0.6's defaults (at the same image size; none of its defaults scale
with the image): :class:`FaithfulnessEstimate`, :class:`Monotonicity`,
:class:`MonotonicityCorrelation`, :class:`RegionPerturbation` and :class:`Selectivity`. Each
perturbs *pixels* (all channels together; Quantus perturbs channel values, which is the same on
1-channel images) and replaces them by a per-image baseline value: ``black`` = the image's
minimum, ``white`` = its maximum, ``mean`` = its mean (Quantus' names), or a number.

Every perturbed image of a batch is built on the device by broadcasting and run through the model
in chunks of ``internal_batch_size`` images (:func:`blockwise_scores`): no numpy, no forward per
sample or per step. Pixel and patch orders come from :func:`xaudit.ops.ranking.pixel_ranks`
(ties broken by a seeded hash of the image, so a sample scores the same in any batch or DDP rank;
Quantus breaks ties by numpy's unstable ``argsort``). Quantus' ``normalise=True`` divides a map by
its maximum absolute value: a positive rescaling that changes none of these scores, so it is not
an option here; ``abs`` is (with each metric's Quantus default).
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xaudit.metrics.base import (
    OUTPUTS,
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
from xaudit.metrics.perturbation import pearson
from xaudit.metrics.randomisation import spearman
from xaudit.metrics.registry import register_metric
from xaudit.ops.ranking import content_seeds, pixel_ranks
from xaudit.ops.seeds import image_seeds
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import choice, positive_int

#: Quantus' deterministic baseline names (``uniform`` only where a metric draws it, see MonotonicityCorrelation)
BASELINES: tuple[str, ...] = ("black", "white", "mean")
ORDERS: tuple[str, ...] = ("morf", "lerf", "random")


def check_baseline(value: str | float, allowed: tuple[str, ...] = BASELINES,
                   key: str = "perturb_baseline") -> str | float:
    """A Quantus-style ``perturb_baseline``: one of ``allowed`` (each image's own min "black" / max
    "white" / mean over all channels and pixels) or a number in normalised units."""
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise ConfigError(f"{key}={value!r} must be one of {list(allowed)} (each image's own min / max / mean over "
                          "all channels and pixels) or a number in normalised units (e.g. 0.0).")
    if isinstance(value, str):
        return choice(value, allowed, key)
    return float(value)


def baseline_values(x: Tensor, baseline: str | float) -> Tensor:
    """The value perturbed pixels take, one per image [B,1,1,1] (Quantus' ``get_baseline_value``)."""
    flat = x.flatten(1)
    if baseline == "black":
        v = flat.amin(1)
    elif baseline == "white":
        v = flat.amax(1)
    elif baseline == "mean":
        v = flat.mean(1)
    else:
        v = torch.full((x.shape[0],), float(baseline), dtype=x.dtype, device=x.device)
    return v.view(-1, 1, 1, 1).to(x.dtype)


def feature_ranks(attr: Tensor, x: Tensor, descending: bool, tie_seed: int) -> Tensor:
    """Rank of each pixel, 0 = perturbed first: long [B, H·W] (highest attribution first if
    ``descending``, else lowest first); ties by the image's seeded hash."""
    key = attr.reshape(attr.shape[0], -1)
    return pixel_ranks(key if descending else -key, content_seeds(x, tie_seed))


def _prepare(metric: Any, x: Tensor, attr: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
    name = type(metric).__name__
    check_images(x, name)
    check_attribution(attr, name, x=x)
    check_target(target, x.shape[0], name)
    attr = attr.to(x.device)
    return (attr.abs() if metric.abs else attr), target.to(x.device)


def _check_step(features_in_step: int, h: int, w: int, name: str) -> int:
    if (h * w) % features_in_step:
        raise ValueError(f"{name}: features_in_step={features_in_step} must divide the {h}x{w}={h * w} pixels "
                         "of the images (as Quantus asserts); pick a divisor, e.g. a multiple of the width.")
    return h * w // features_in_step


def _base_scores(model: nn.Module, x: Tensor, target: Tensor, output: str) -> Tensor:
    logits = model_logits(model, x)
    check_target_range(target, logits.shape[-1])
    return target_scores(logits, target, output)


class _FaithfulnessBase(ModelHolder, XAuditMetric):
    family = "faithfulness"
    protocol_target: ClassVar[str] = "label"

    def _common(self, model: nn.Module, output: str, abs: bool, internal_batch_size: int, tie_seed: int) -> None:
        self._hold(model)
        self.output = choice(output, OUTPUTS, "output")
        self.abs = bool(abs)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.tie_seed = int(tie_seed)


@register_metric("faithfulness_estimate")
class FaithfulnessEstimate(_FaithfulnessBase):
    """Faithfulness estimate (Alvarez-Melis & Jaakkola, "Towards robust interpretability with
    self-explaining neural networks", NeurIPS 2018); higher is better.

    Pixels are taken in order of decreasing attribution, ``features_in_step`` at a time; each group
    alone is set to the baseline (one perturbed image per group, H·W/``features_in_step`` of them).
    The score is the Pearson correlation, over the groups, between the group's summed attribution
    and the drop of the explained class's logit (``output="logit"``) or probability (``"prob"``).

    Defaults = Quantus 0.6 ``FaithfulnessEstimate``: ``features_in_step=1`` (one forward per pixel),
    ``perturb_baseline="black"`` (the image minimum), ``abs=False``, logits (Quantus' ``softmax=False``).
    """

    measures = "correlation between each pixel group's attribution and the score drop when that group alone is removed"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = "Alvarez-Melis & Jaakkola, NeurIPS 2018 (Quantus 0.6 FaithfulnessEstimate)"

    def __init__(self, model: nn.Module, features_in_step: int = 1, perturb_baseline: str | float = "black",
                 abs: bool = False, output: str = "logit", internal_batch_size: int = 256, tie_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._common(model, output, abs, internal_batch_size, tie_seed)
        self.features_in_step = positive_int(features_in_step, "features_in_step")
        self.perturb_baseline = check_baseline(perturb_baseline)

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the correlations of one batch."""
        attr, target = _prepare(self, x, attr, target)
        b, _, h, w = x.shape
        steps = _check_step(self.features_in_step, h, w, type(self).__name__)
        group = feature_ranks(attr, x, True, self.tie_seed) // self.features_in_step  # [B,P] group of each pixel
        flat = attr.reshape(b, -1).double()
        sums = torch.zeros(b, steps, dtype=torch.float64, device=x.device).scatter_add_(1, group, flat)
        with evaluating(self.model):
            base = baseline_values(x, self.perturb_baseline)
            y = _base_scores(self.model, x, target, self.output)
            idx = torch.arange(steps, device=x.device)

            def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
                taken = (group[s0:s1, None, :] == idx[None, t0:t1, None]).view(s1 - s0, t1 - t0, 1, h, w)
                return torch.where(taken, base[s0:s1, None], x[s0:s1, None]).flatten(0, 1)

            scores = blockwise_scores(self.model, b, steps, build, target, self.internal_batch_size, self.output)
        self._add_values(pearson(sums, y[:, None] - scores))


@register_metric("monotonicity")
class Monotonicity(_FaithfulnessBase):
    """Monotonicity (Arya et al., "One explanation does not fit all", arXiv:1909.03012, 2019);
    higher is better.

    Starting from an all-baseline image, pixels are inserted (copied from the image) in order of
    *increasing* attribution, ``features_in_step`` at a time; the sample scores 1 if the explained
    class's probability never decreases over the H·W/``features_in_step`` insertions, else 0 (the
    mean is the fraction of monotonic samples).

    Defaults = Quantus 0.6 ``Monotonicity``: ``features_in_step=1``, ``perturb_baseline="black"``,
    ``abs=True``, probabilities (``softmax=True``). Deviation: Quantus 0.6 re-writes the baseline into
    the baseline image instead of inserting the image's pixels (its ``perturb_func`` is applied to
    ``x_baseline``), so its curve is constant and every sample scores True; we insert the pixels, as
    the paper does (tested against Quantus' loop with the insertion as its ``perturb_func``).
    """

    measures = "whether the target probability rises monotonically as pixels are added, least relevant first"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = "Arya et al., arXiv:1909.03012, 2019 (Quantus 0.6 Monotonicity)"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "Quantus 0.6 never inserts the image's pixels (always True); we insert them as the paper",)

    def __init__(self, model: nn.Module, features_in_step: int = 1, perturb_baseline: str | float = "black",
                 abs: bool = True, output: str = "prob", internal_batch_size: int = 256, tie_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._common(model, output, abs, internal_batch_size, tie_seed)
        self.features_in_step = positive_int(features_in_step, "features_in_step")
        self.perturb_baseline = check_baseline(perturb_baseline)
        self.add_state("curve_values", default=[], dist_reduce_fx="cat")

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the 0/1 monotonicity of one batch (curves kept for :meth:`curves`)."""
        attr, target = _prepare(self, x, attr, target)
        b, _, h, w = x.shape
        steps = _check_step(self.features_in_step, h, w, type(self).__name__)
        rank = feature_ranks(attr, x, False, self.tie_seed)
        counts = (torch.arange(1, steps + 1, device=x.device) * self.features_in_step)
        with evaluating(self.model):
            base = baseline_values(x, self.perturb_baseline)

            def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
                inserted = (rank[s0:s1, None, :] < counts[None, t0:t1, None]).view(s1 - s0, t1 - t0, 1, h, w)
                return torch.where(inserted, x[s0:s1, None], base[s0:s1, None]).flatten(0, 1)

            curves = blockwise_scores(self.model, b, steps, build, target, self.internal_batch_size, self.output)
        self.curve_values.append(curves)
        self._add_values((curves.diff(dim=1) >= 0).all(dim=1).double())

    def curves(self) -> Tensor:
        """Per-sample scores after each insertion [N, steps], in the order of ``per_sample``."""
        return self._gathered("curve_values")


def monotonicity_correlation(model: nn.Module, x: Tensor, attr: Tensor, target: Tensor, draws: Tensor,
                             features_in_step: int, eps: float = 1e-5, output: str = "prob",
                             internal_batch_size: int = 256, tie_seed: int = 0) -> Tensor:
    """Monotonicity correlation for given uniform baseline draws ``draws`` [B, steps, nr_samples]
    (one value per image, step and sample, as Quantus' ``uniform`` baseline); returns [B]."""
    b, _, h, w = x.shape
    steps, runs = draws.shape[1:]
    group = feature_ranks(attr, x, False, tie_seed) // features_in_step
    sums = torch.zeros(b, steps, dtype=torch.float64, device=x.device).scatter_add_(
        1, group, attr.reshape(b, -1).double())
    draws = draws.to(device=x.device, dtype=x.dtype)
    with evaluating(model):
        y = _base_scores(model, x, target, output)
        step_of = torch.arange(steps * runs, device=x.device) // runs  # variant v = step · runs + run

        def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
            taken = (group[s0:s1, None, :] == step_of[None, t0:t1, None]).view(s1 - s0, t1 - t0, 1, h, w)
            value = draws[s0:s1].reshape(s1 - s0, -1)[:, t0:t1].view(s1 - s0, t1 - t0, 1, 1, 1)
            return torch.where(taken, value, x[s0:s1, None]).flatten(0, 1)

        scores = blockwise_scores(model, b, steps * runs, build, target, internal_batch_size, output)
    inv = torch.where(y.abs() >= eps, 1.0 / y.abs(), torch.ones_like(y)) ** 2
    var = ((scores.view(b, steps, runs) - y[:, None, None]) ** 2).mean(-1) * inv[:, None]
    return spearman(sums, var)


@register_metric("monotonicity_correlation")
class MonotonicityCorrelation(_FaithfulnessBase):
    """Monotonicity correlation (Nguyen & Rodríguez Martínez, "On quantitative aspects of model
    interpretability", arXiv:2007.07584, 2020); higher is better.

    Pixels are grouped ``features_in_step`` at a time in order of increasing attribution; each group
    alone is replaced ``nr_samples`` times by a uniform random value in [0,1) (one value per image,
    group and draw, as Quantus' ``uniform`` baseline), and the group's score variance is the mean
    squared change of the explained class's probability, divided by the unperturbed probability²
    (when ≥ ``eps``). The score is the Spearman correlation between groups' summed attribution and
    their variance.

    Defaults = Quantus 0.6 ``MonotonicityCorrelation``: ``nr_samples=100``, ``features_in_step=1``
    (H·W·100 forwards per image), ``eps=1e-5``, ``abs=True``, ``perturb_baseline="uniform"``,
    probabilities. Draws come from a local generator seeded from ``seed`` and the image's bits (the
    same image gets the same draws in any batch or DDP rank; Quantus uses the global numpy RNG).
    """

    measures = "rank correlation between each pixel group's attribution and the score variance when it is randomised"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = "Nguyen & Rodríguez Martínez, arXiv:2007.07584, 2020 (Quantus 0.6 MonotonicityCorrelation)"

    def __init__(self, model: nn.Module, nr_samples: int = 100, features_in_step: int = 1, eps: float = 1e-5,
                 abs: bool = True, output: str = "prob", seed: int = 0, internal_batch_size: int = 256,
                 tie_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._common(model, output, abs, internal_batch_size, tie_seed)
        self.nr_samples = positive_int(nr_samples, "nr_samples")
        self.features_in_step = positive_int(features_in_step, "features_in_step")
        if not (isinstance(eps, (int, float)) and eps > 0):
            raise ConfigError(f"eps={eps!r} must be a positive number.")
        self.eps = float(eps)
        self.seed = int(seed)

    def draws(self, x: Tensor) -> Tensor:
        """The uniform baseline values [B, steps, nr_samples] drawn for the images ``x``."""
        steps = _check_step(self.features_in_step, *x.shape[-2:], type(self).__name__)
        g = torch.Generator()
        out = []
        for s in image_seeds(x, self.seed):
            g.manual_seed(s)
            out.append(torch.rand(steps, self.nr_samples, generator=g))
        return torch.stack(out) if out else torch.empty(0, steps, self.nr_samples)

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the correlations of one batch."""
        attr, target = _prepare(self, x, attr, target)
        self._add_values(monotonicity_correlation(self.model, x, attr, target, self.draws(x), self.features_in_step,
                                                  self.eps, self.output, self.internal_batch_size, self.tie_seed))


def patch_grid(h: int, w: int, patch_size: int, device: torch.device | None = None) -> tuple[Tensor, int]:
    """Patch id of each pixel [H·W] and the number of patches, on Quantus' grid: the image padded
    (⌊pad/2⌋ before, ⌈pad/2⌉ after) to a multiple of ``patch_size``, patches row-major."""
    def grid(n: int) -> tuple[Tensor, int]:
        pad = (patch_size - n % patch_size) % patch_size
        return (torch.arange(n, device=device) + pad // 2) // patch_size, (n + pad) // patch_size

    rows, nh = grid(h)
    cols, nw = grid(w)
    return (rows[:, None] * nw + cols[None, :]).flatten(), nh * nw


class _PatchMetric(_FaithfulnessBase):
    """Shared by region perturbation and selectivity: cumulative removal of ranked patches."""

    order: str = "morf"

    def _patch_curves(self, x: Tensor, attr: Tensor, target: Tensor, regions: int | None) -> tuple[Tensor, Tensor]:
        b, _, h, w = x.shape
        if self.patch_size > min(h, w):
            raise ValueError(f"{type(self).__name__}: patch_size={self.patch_size} exceeds the {h}x{w} images; "
                             f"use patch_size ≤{min(h, w)}.")
        pid, n = patch_grid(h, w, self.patch_size, x.device)
        sums = torch.zeros(b, n, dtype=torch.float64, device=x.device).scatter_add_(
            1, pid.expand(b, -1), attr.reshape(b, -1).double())
        seeds = content_seeds(x, self.tie_seed)
        key = {"morf": sums, "lerf": -sums, "random": torch.zeros_like(sums)}[self.order]
        prank = pixel_ranks(key, seeds)  # rank of each patch, 0 = removed first
        rank = prank.gather(1, pid.expand(b, -1))  # each pixel's patch rank
        steps = n if regions is None else min(regions, n)
        counts = torch.arange(1, steps + 1, device=x.device)
        with evaluating(self.model):
            base = baseline_values(x, self.perturb_baseline)
            y = _base_scores(self.model, x, target, self.output)

            def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
                gone = (rank[s0:s1, None, :] < counts[None, t0:t1, None]).view(s1 - s0, t1 - t0, 1, h, w)
                return torch.where(gone, base[s0:s1, None], x[s0:s1, None]).flatten(0, 1)

            curves = blockwise_scores(self.model, b, steps, build, target, self.internal_batch_size, self.output)
        return y, curves

    def curves(self) -> Tensor:
        """Per-sample curves [N, steps] (Quantus' per-sample output), in the order of ``per_sample``."""
        return self._gathered("curve_values")


@register_metric("region_perturbation")
class RegionPerturbation(_PatchMetric):
    """Region perturbation / AOPC (Samek et al., "Evaluating the visualization of what a deep neural
    network has learned", IEEE TNNLS 2017; arXiv 2015).

    The image is cut into ``patch_size``² patches (Quantus' grid) ranked by summed attribution —
    ``order="morf"`` most relevant first, ``"lerf"`` least relevant first, ``"random"`` a seeded
    random order — and the first ``regions_evaluation`` patches are set to the baseline one after
    another. The curve (:meth:`curves`, Quantus' per-sample output) is f(x) − f(x⁽ᵏ⁾), k = 1..L, of
    the explained class's probability; the score is Samek's AOPC = Σₖ₌₀ᴸ (f(x) − f(x⁽ᵏ⁾)) / (L+1)
    (Quantus returns the curves only). Higher is better for MoRF, lower for LeRF.

    Defaults = Quantus 0.6 ``RegionPerturbation``: ``patch_size=8``, ``regions_evaluation=100``
    (capped at the number of patches: 16 on 32² images), ``order="morf"``, ``perturb_baseline="black"``,
    ``abs=False``, probabilities. ``mean`` is the original image's mean (Quantus recomputes it from
    the partially perturbed, edge-padded image at every step).
    """

    measures = "average drop of the target probability as the most (MoRF) or least (LeRF) relevant patches are removed"
    paper: ClassVar[str] = "Samek et al., IEEE TNNLS 2017 (Quantus 0.6 RegionPerturbation)"

    def __init__(self, model: nn.Module, patch_size: int = 8, order: str = "morf", regions_evaluation: int = 100,
                 perturb_baseline: str | float = "black", abs: bool = False, output: str = "prob",
                 internal_batch_size: int = 256, tie_seed: int = 0, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._common(model, output, abs, internal_batch_size, tie_seed)
        self.patch_size = positive_int(patch_size, "patch_size")
        self.order = choice(order.lower() if isinstance(order, str) else order, ORDERS, "order")
        self.regions_evaluation = positive_int(regions_evaluation, "regions_evaluation")
        self.perturb_baseline = check_baseline(perturb_baseline)
        self.add_state("curve_values", default=[], dist_reduce_fx="cat")

    @property
    def higher_is_better(self) -> bool:  # type: ignore[override]
        """MoRF: higher is better; LeRF (and the random control): lower is better."""
        return self.order == "morf"

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the AOPCs (and curves) of one batch."""
        attr, target = _prepare(self, x, attr, target)
        y, scores = self._patch_curves(x, attr, target, self.regions_evaluation)
        drops = y[:, None] - scores
        self.curve_values.append(drops)
        self._add_values(drops.double().sum(1) / (drops.shape[1] + 1))


@register_metric("selectivity")
class Selectivity(_PatchMetric):
    """Selectivity (Montavon, Samek & Müller, "Methods for interpreting and understanding deep neural
    networks", Digital Signal Processing 2018); lower is better.

    ``patch_size``² patches (Quantus' grid) are set to the baseline one after another, most relevant
    (summed attribution) first, until the image is gone; the curve (:meth:`curves`) is the explained
    class's probability after each removal and the score its area by the trapezoid rule with unit
    spacing (Quantus' ``get_auc_score``): a selective map makes the probability fall fast.

    Defaults = Quantus 0.6 ``Selectivity``: ``patch_size=8``, ``perturb_baseline="black"``,
    ``abs=False``, probabilities.
    """

    measures = "area under the target probability as patches are removed, most relevant first"
    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = "Montavon, Samek & Müller, Digital Signal Processing 2018 (Quantus 0.6 Selectivity)"

    def __init__(self, model: nn.Module, patch_size: int = 8, perturb_baseline: str | float = "black",
                 abs: bool = False, output: str = "prob", internal_batch_size: int = 256, tie_seed: int = 0,
                 **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._common(model, output, abs, internal_batch_size, tie_seed)
        self.patch_size = positive_int(patch_size, "patch_size")
        self.perturb_baseline = check_baseline(perturb_baseline)
        self.add_state("curve_values", default=[], dist_reduce_fx="cat")

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the AUCs (and curves) of one batch."""
        attr, target = _prepare(self, x, attr, target)
        _, scores = self._patch_curves(x, attr, target, None)
        self.curve_values.append(scores)
        self._add_values(torch.trapezoid(scores.double(), dx=1.0, dim=1))


__all__: list[str] = ["BASELINES", "FaithfulnessEstimate", "Monotonicity", "MonotonicityCorrelation",
                      "RegionPerturbation", "Selectivity", "baseline_values", "monotonicity_correlation",
                      "patch_grid"]
