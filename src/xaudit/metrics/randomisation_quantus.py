"""Quantus 0.6's later randomisation metrics: EfficientMPRT, SmoothMPRT (Hedström et al., 2023) and
RandomLogit (Sixt et al., 2020), on the helpers of :mod:`xaudit.metrics.randomisation`.

Model randomisation follows Quantus' ``get_random_layer_generator``: one layer (a module that owns
parameters) after another, each re-initialised as ``torch.manual_seed(seed + 1);
module.reset_parameters()`` — :func:`randomise_step_` with ``seed + 1`` draws exactly that. The
caller's model is never touched (a deep copy is randomised).
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.metrics.base import (
    ModelHolder,
    XAuditMetric,
    check_attribution,
    check_images,
    check_target,
    check_target_range,
    evaluating,
    model_logits,
)
from xaudit.metrics.randomisation import (
    check_explainer_name,
    parameter_steps,
    randomise_step_,
    spearman,
    ssim_map,
)
from xaudit.metrics.registry import register_metric
from xaudit.ops.seeds import image_seeds
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import choice, positive_int

LAYER_ORDERS: tuple[str, ...] = ("bottom_up", "top_down", "independent")


def _float(t: Tensor) -> Tensor:
    return t.detach().to(torch.float32 if t.device.type == "mps" else torch.float64)


def normalise_by_max(a: Tensor) -> Tensor:
    """Quantus' ``normalise_by_max`` per sample: a / max|a| (an all-zero map is left as is)."""
    m = a.flatten(1).abs().amax(1).view(-1, *[1] * (a.ndim - 1))
    return torch.where(m > 0, a / m.where(m > 0, 1.0), a)


def normalise_by_second_moment(a: Tensor) -> Tensor:
    """Quantus' ``normalise_by_average_second_moment_estimate`` per sample: a / sqrt(mean(a²))."""
    m = a.flatten(1).pow(2).mean(1).sqrt().view(-1, *[1] * (a.ndim - 1))
    return torch.where(m > 0, a / m.where(m > 0, 1.0), a)


def discrete_entropy(a: Tensor, n_bins: int = 100) -> Tensor:
    """Row-wise entropy (nats) of the ``n_bins``-bin histogram of [B,N] values over [min, max],
    binned exactly as ``np.histogram`` (float64 edges, the last bin closed) — Quantus'
    ``discrete_entropy``."""
    a = _float(a)
    lo, hi = a.amin(1, keepdim=True), a.amax(1, keepdim=True)
    same = lo == hi
    lo, hi = torch.where(same, lo - 0.5, lo), torch.where(same, hi + 0.5, hi)
    norm = n_bins / (hi - lo)
    idx = ((a - lo) * norm).floor().long().clamp(0, n_bins - 1)  # floor == astype(int) here (a ≥ lo)
    steps = torch.arange(n_bins + 1, device=a.device, dtype=a.dtype) / n_bins
    edges = lo + steps * (hi - lo)  # np.linspace's formula; [B, n_bins+1]
    edges[:, -1:] = hi
    idx = idx - (a < edges.gather(1, idx)).long()
    idx = idx + ((a >= edges.gather(1, idx + 1)) & (idx != n_bins - 1)).long()
    counts = torch.zeros(a.shape[0], n_bins, dtype=a.dtype, device=a.device).scatter_add_(1, idx, torch.ones_like(a))
    p = counts / counts.sum(1, keepdim=True)
    return -(p * torch.where(p > 0, p.log(), 0.0)).sum(1)


def ssim_1d(a: Tensor, b: Tensor, win_size: int = 7, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """SSIM of flattened [B,N] maps as Quantus' ``ssim(..., batched=True)`` computes it: skimage's
    ``structural_similarity`` on the 1-D rows (uniform window of ``win_size`` values, sample
    covariance, border windows excluded), data range max − min over both rows."""
    a, b = _float(a), _float(b)
    both = torch.cat([a, b], dim=1)
    data_range = (both.amax(1) - both.amin(1))[:, None]

    def mean(t: Tensor) -> Tensor:
        return F.avg_pool1d(t[:, None], win_size, stride=1)[:, 0]

    return ssim_map(a, b, mean, win_size, data_range, k1, k2).mean(dim=1)


def quantus_layers(model: nn.Module, order: str) -> list[str]:
    """The randomisation steps in Quantus' order: modules owning parameters, input side first
    (``bottom_up``, ``independent``) or output side first (``top_down``)."""
    steps = parameter_steps(model)
    return steps[::-1] if order == "top_down" else steps


class _RandomisationBase(ModelHolder, XAuditMetric):
    """Shared plumbing: the explainer by name, a grad-enabled deep copy, map post-processing."""

    family = "randomisation"

    def __init__(self, model: nn.Module, explainer: str, explainer_kwargs: dict[str, Any] | None, seed: int,
                 abs: bool, normalise: bool, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.explainer = str(explainer)
        self.explainer_kwargs = dict(explainer_kwargs or {})
        self.seed = int(seed)
        self.abs = bool(abs)
        self.normalise = bool(normalise)
        check_explainer_name(self.explainer)
        if not parameter_steps(model):
            raise ConfigError(f"{type(self).__name__}: the model has no parameters to randomise.")

    def _check(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        name = type(self).__name__
        check_images(x, name)
        check_attribution(attr, name, x=x)
        check_target(target, x.shape[0], name)

    def _explain(self, model: nn.Module, x: Tensor, target: Tensor) -> Tensor:
        from xaudit.explainers import create

        return create(self.explainer, model, **self.explainer_kwargs).attribute(x, target).detach()

    def _post(self, a: Tensor, normalise: Any) -> Tensor:
        a = _float(a)
        if self.normalise:
            a = normalise(a)
        return a.abs() if self.abs else a


@register_metric("efficient_mprt")
class EfficientMPRT(_RandomisationBase):
    """Efficient MPRT (Hedström et al., "Sanity Checks Revisited: An Exploration to Repair the Model
    Parameter Randomisation Test", XAI in Action 2023), as Quantus 0.6 ``EfficientMPRT``.

    The relative rise in explanation complexity from the original to the fully randomised model:
    (H(a_rand) − H(a)) / H(a), H the discrete entropy of the map's ``n_bins``-bin histogram. All
    layers are randomised (Quantus' default ``skip_layers=True`` scores only the last, full model;
    the order does not change it since every layer is drawn from its own seed). Higher is better.

    ``update(x, attr, target)``: ``attr`` is the explainer's map on the original model (Quantus
    re-explains it with ``explain_func``; equal for a deterministic explainer). ``abs``/``normalise``
    (second-moment) as Quantus, default off; normalisation is per sample (Quantus: over the whole
    batch — a positive scale, which leaves the histogram unchanged). NaN where H(a) = 0.
    """

    measures = "relative rise in explanation entropy once the model is fully randomised (high = passes)"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = "Hedström et al., Sanity Checks Revisited (EfficientMPRT), XAI in Action 2023"

    def __init__(self, model: nn.Module, explainer: str = "saliency", explainer_kwargs: dict[str, Any] | None = None,
                 n_bins: int = 100, seed: int = 42, abs: bool = False, normalise: bool = False,
                 **kwargs: Any) -> None:
        super().__init__(model, explainer, explainer_kwargs, seed, abs, normalise, **kwargs)
        self.n_bins = positive_int(n_bins, "n_bins")

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Fully randomise a copy, re-explain, compare histogram entropies."""
        self._check(x, attr, target)
        with torch.inference_mode(False), torch.enable_grad():
            x, target = x.clone(), target.clone().to(x.device)
            model = copy.deepcopy(self.model).eval()
            for step in parameter_steps(model):
                randomise_step_(model, step, self.seed + 1)
            randomised = self._explain(model, x, target)
        h0 = discrete_entropy(self._post(attr.to(x.device), normalise_by_second_moment).flatten(1), self.n_bins)
        h1 = discrete_entropy(self._post(randomised, normalise_by_second_moment).flatten(1), self.n_bins)
        self._add_values(torch.where(h0 != 0, (h1 - h0) / h0.where(h0 != 0, 1.0), float("nan")))


@register_metric("smooth_mprt")
class SmoothMPRT(_RandomisationBase):
    """Smooth MPRT (Hedström et al., "Sanity Checks Revisited", XAI in Action 2023), as Quantus 0.6
    ``SmoothMPRT``: MPRT with explanations denoised by averaging ``nr_samples`` explanations of
    noisy copies (σ = ``noise_magnitude`` × (max − min) of the image; the last copy noise-free).

    Layers are randomised cumulatively in ``layer_order`` (default ``bottom_up``; ``independent``
    restores the others). After each, Spearman correlation between the (abs, second-moment
    normalised) ``attr`` and the smoothed map of the randomised model. :meth:`layer_scores` gives
    [N, 1 + layers]: column 0 the smoothed map of the *original* model (Quantus' ``"original"``
    key), then one column per layer — Quantus' default return value, as a tensor. The per-sample
    value is the mean over the layer columns, *without* column 0 (the paper's average
    correlation; Quantus' ``return_average_correlation`` also averages in "original" because it
    skips a key "orig" that does not exist — a quirk not copied). Lower is better.
    Noise is drawn per image and step from ``seed`` and the image's bits (Quantus: global NumPy RNG).
    """

    measures = "rank correlation of smoothed maps before and after layer-wise randomisation (low = passes)"
    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = "Hedström et al., Sanity Checks Revisited (SmoothMPRT), XAI in Action 2023"

    def __init__(self, model: nn.Module, explainer: str = "saliency", explainer_kwargs: dict[str, Any] | None = None,
                 layer_order: str = "bottom_up", nr_samples: int = 50, noise_magnitude: float = 0.1,
                 seed: int = 42, abs: bool = True, normalise: bool = True,
                 internal_batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(model, explainer, explainer_kwargs, seed, abs, normalise, **kwargs)
        self.layer_order = choice(layer_order, LAYER_ORDERS, "layer_order")
        self.nr_samples = positive_int(nr_samples, "nr_samples")
        if not float(noise_magnitude) >= 0:
            raise ConfigError(
                f"noise_magnitude={noise_magnitude!r} must be ≥ 0 (noise σ as a fraction of the image range).")
        self.noise_magnitude = float(noise_magnitude)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.layers = quantus_layers(model, self.layer_order)
        self.add_state("layer_values", default=[], dist_reduce_fx="cat")

    def smoothing_noise(self, x: Tensor, step: int) -> Tensor:
        """Standard normal draws [B, nr_samples − 1, C, H, W] for smoothing step ``step`` (0: the original
        model), one generator per image."""
        g = torch.Generator()
        out = []
        for seed in image_seeds(x, self.seed * 1000003 + step):
            g.manual_seed(seed)
            out.append(torch.randn(self.nr_samples - 1, *x.shape[1:], generator=g))
        return torch.stack(out).to(x.device, x.dtype)

    def smooth_explain(self, model: nn.Module, x: Tensor, target: Tensor, step: int) -> Tensor:
        """Mean of the explanations of ``nr_samples`` noisy copies of ``x`` (the last one noise-free)."""
        b, n = x.shape[0], self.nr_samples
        std = self.noise_magnitude * (x.flatten(1).amax(1) - x.flatten(1).amin(1))
        eps = self.smoothing_noise(x, step) * std.view(b, 1, 1, 1, 1)
        noisy = torch.cat([x[:, None] + eps, x[:, None]], dim=1).flatten(0, 1)  # sample-major
        targets = target.repeat_interleave(n)
        chunk = max(1, self.internal_batch_size)
        maps = torch.cat([self._explain(model, noisy[i:i + chunk], targets[i:i + chunk])
                          for i in range(0, b * n, chunk)])
        return (maps.view(b, n, *maps.shape[1:]) / n).sum(1)

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Randomise a copy layer by layer, smooth-explain, correlate with ``attr``."""
        self._check(x, attr, target)
        ref = self._post(attr.to(x.device), normalise_by_second_moment).flatten(1)
        cols = []
        with torch.inference_mode(False), torch.enable_grad():
            x, target = x.clone(), target.clone().to(x.device)
            model = copy.deepcopy(self.model).eval()
            original = copy.deepcopy(model.state_dict())
            cols.append(self._score(ref, self.smooth_explain(model, x, target, 0)))
            for i, layer in enumerate(self.layers):
                if self.layer_order == "independent":
                    model.load_state_dict(original)
                randomise_step_(model, layer, self.seed + 1)
                cols.append(self._score(ref, self.smooth_explain(model, x, target, i + 1)))
        scores = torch.stack(cols, dim=1)
        self.layer_values.append(scores)
        self._add_values(scores[:, 1:].mean(1))

    def _score(self, ref: Tensor, smooth: Tensor) -> Tensor:
        return spearman(ref, self._post(smooth, normalise_by_second_moment).flatten(1)).double()

    def layer_scores(self) -> Tensor:
        """Spearman per sample [N, 1 + layers]: the original model's smoothed map, then each layer."""
        return self._gathered("layer_values")


@register_metric("random_logit")
class RandomLogit(_RandomisationBase):
    """Random Logit test (Sixt, Granz & Landgraf, "When Explanations Lie: Why Many Modified BP
    Attributions Fail", ICML 2020), as Quantus 0.6 ``RandomLogit``: similarity between the map
    of the target class and the map of a uniformly drawn *other* class. Lower is better.

    Similarity ``ssim`` (Quantus' default; computed as Quantus does on the flattened maps, i.e.
    1-D SSIM with a 7-value window — :func:`ssim_1d`) or ``spearman``. Maps normalised by their max
    |a| (Quantus' default ``normalise=True``; per sample here, over the whole batch in Quantus).
    The other class is drawn per image from ``seed`` and the image's bits (Quantus: NumPy seeded
    with ``seed`` once per batch), so a sample's class does not depend on its batch or rank.
    ``num_classes``: default the model's output size (Quantus: 1000).
    """

    measures = "similarity of the explanation of the target class to that of a random other class (low = passes)"
    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = "Sixt, Granz & Landgraf, When Explanations Lie, ICML 2020"

    def __init__(self, model: nn.Module, explainer: str = "saliency", explainer_kwargs: dict[str, Any] | None = None,
                 num_classes: int | None = None, similarity: str = "ssim", seed: int = 42,
                 abs: bool = False, normalise: bool = True, **kwargs: Any) -> None:
        super().__init__(model, explainer, explainer_kwargs, seed, abs, normalise, **kwargs)
        self.num_classes = None if num_classes is None else positive_int(num_classes, "num_classes", minimum=2)
        self.similarity = choice(similarity, ("ssim", "spearman"), "similarity")

    def off_targets(self, x: Tensor, target: Tensor, num_classes: int) -> Tensor:
        """A class ≠ target per image, uniform over the others, from the image's own generator."""
        g = torch.Generator()
        draws = []
        for seed in image_seeds(x, self.seed):
            g.manual_seed(seed)
            draws.append(int(torch.randint(0, num_classes - 1, (1,), generator=g)))
        r = torch.tensor(draws, dtype=torch.long, device=target.device)
        return r + (r >= target).long()  # skip the target class

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Explain a random other class and compare with ``attr``."""
        self._check(x, attr, target)
        target = target.to(x.device)
        num_classes = self.num_classes
        if num_classes is None:
            with evaluating(self.model):
                num_classes = int(model_logits(self.model, x[:1]).shape[-1])
        if num_classes < 2:
            raise ConfigError("RandomLogit needs a model with at least 2 classes.")
        check_target_range(target, num_classes)
        off = self.off_targets(x, target, num_classes)
        with torch.inference_mode(False), torch.enable_grad():
            x2, off = x.clone(), off.clone()
            model = copy.deepcopy(self.model).eval()
            other = self._explain(model, x2, off)
        a = self._post(attr.to(x.device), normalise_by_max).flatten(1)
        b = self._post(other, normalise_by_max).flatten(1)
        sim = ssim_1d(a, b) if self.similarity == "ssim" else spearman(a, b)
        self._add_values(sim.double())
