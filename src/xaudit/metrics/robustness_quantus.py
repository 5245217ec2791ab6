"""The rest of Quantus 0.6's robustness family, batched on the device.

- :class:`AvgSensitivity` (Yeh et al., 2019): the mean, not the max, of
  ``||Φ(x+δ_j) − Φ(x)||_F / ||Φ(x)||_F`` with δ_j ~ U(−r, r) — :class:`MaxSensitivity`'s sibling.
- :class:`Consistency` (Dasgupta et al., 2022): among the other samples whose discretised
  explanation equals this one's, the fraction with the same predicted class.
- :class:`Continuity` (Montavon et al., 2018): ``max_t ||Φ(x) − Φ(x_t)||_1 / ||x − x_t||_2`` over
  horizontal translations ``x_t`` of the image (Quantus' ``batched_translation``, "black" fill).
- :class:`RelativeInputStability`, :class:`RelativeOutputStability`,
  :class:`RelativeRepresentationStability` (Agarwal et al., 2022): the max over noisy copies of
  the relative map change ``||(Φ(x) − Φ(x'))/Φ(x)||_2`` divided by the relative input change, the
  logit change, or the relative change of a layer's activations.

All except Consistency take ``update(x, attr, target, explainer)`` and re-explain the ``n`` (or
``nr_steps``) perturbed copies of a batch in chunks of ``internal_batch_size`` images, one explainer
call and one forward per chunk. Noise is seeded per image (see :mod:`xaudit.metrics.robustness`):
reproducible, batch- and rank-independent, the global RNG untouched. Consistency needs only
``update(x, attr)``; it pools the whole evaluated set (see its docstring). Lower is more robust for
all but Consistency. Deviations from Quantus are listed in each class's docstring.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xaudit.explainers.base import Explainer
from xaudit.explainers.hooks import layer_names, record_output, resolve_layer
from xaudit.metrics.base import (
    ModelHolder,
    XAuditMetric,
    check_attribution,
    check_explainer,
    check_images,
    check_target,
    check_target_range,
    evaluating,
    model_logits,
)
from xaudit.metrics.registry import register_metric
from xaudit.metrics.robustness import (
    MaxSensitivity,
    checked_noise,
    seeded_noise,
)
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import choice, flag, positive_float, positive_int

__all__ = [
    "AvgSensitivity",
    "Consistency",
    "Continuity",
    "RelativeInputStability",
    "RelativeOutputStability",
    "RelativeRepresentationStability",
]


def _check_bool(value: Any, key: str, what: str) -> bool:
    """Alias of :func:`xaudit.utils.validation.flag`."""
    return flag(value, key, what)


def _by_max(maps: Tensor) -> Tensor:
    """Each flattened map [..., D] divided by its max |value| (Quantus' ``normalise_by_max``, per image)."""
    peak = maps.abs().amax(-1, keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


def _nanmax(values: Tensor) -> Tensor:
    """Max over dim 0 ignoring NaN; NaN where every entry is NaN."""
    nan = torch.isnan(values)
    out = values.masked_fill(nan, float("-inf")).amax(0)
    return out.masked_fill(nan.all(0), float("nan"))


# -- Yeh et al.: average sensitivity ----------------------------------------------------------
@register_metric("avg_sensitivity")
class AvgSensitivity(MaxSensitivity):
    """Mean relative change of the map under uniform noise of radius ``radius`` (Yeh et al., 2019).

    ``mean_j ||Φ(x+δ_j) − Φ(x)||_F / ||Φ(x)||_F``, δ_j ~ U(−radius, radius) per element, as
    ``quantus.AvgSensitivity`` (``abs=False``, ``normalise=False``, ``lower_bound=0.2``). Deviations:
    ``n=10`` noisy copies by default (Quantus: 200), like :class:`MaxSensitivity`; ``normalise``
    divides each map by its own max |Φ| (Quantus: by the batch's); ``+1e-10`` in the denominator.
    """

    measures = "average change of the map under small input noise"

    def __init__(self, model: nn.Module, radius: float = 0.2, n: int = 10, seed: int = 0,
                 internal_batch_size: int = 64, normalise: bool = False, **kwargs: Any) -> None:
        super().__init__(model, radius=radius, n=n, seed=seed, internal_batch_size=internal_batch_size,
                         normalise=normalise, **kwargs)

    def _reduce(self, ratios: Tensor) -> Tensor:
        return ratios.mean(0)


# -- Dasgupta et al.: consistency --------------------------------------------------------------
DISCRETISE: tuple[str, ...] = ("top_n", "first_n_sign")


@register_metric("consistency")
class Consistency(ModelHolder, XAuditMetric):
    """P(same predicted class | same discretised explanation) (Dasgupta et al., 2022).

    For sample i: ``#{j≠i: e_j = e_i, ŷ_j = ŷ_i} / (#{j≠i: e_j = e_i} + 1e-9)`` — Quantus' formula
    (0 when no other sample shares the explanation). ``e`` is the discretised map of ``|attr|``
    (``abs=True``, Quantus' default):

    - ``discretise="top_n"`` (default): the positions and signs of the ``n`` largest |values|;
    - ``discretise="first_n_sign"``: Quantus 0.6's ``top_n_sign``, the signs of the *first* ``n``
      values in row-major order. With ``abs=True`` those are all +1 for any map without exact
      zeros, so every explanation gets the same label and the score no longer depends on the
      explainer; it is kept only to reproduce Quantus, and ``top_n`` is the default (a deviation).

    Deviation: Quantus scores each ``batch_size`` batch on its own; here the comparison pool is every
    sample seen (all updates, all DDP ranks), the paper's population quantity, so scores do not
    depend on how the data was batched or sharded. ``per_sample()``/``compute()`` therefore
    recompute over the gathered labels. Quantus' ``normalise`` cannot change a sign or a ranking
    and is not a parameter. ``update(x, attr)``: ``x`` gives the model's predicted classes.
    """

    family = "robustness"
    measures = "how often samples with the same explanation get the same prediction"
    higher_is_better: ClassVar[bool] = True
    protocol_target: ClassVar[str] = "predicted"
    update_inputs: ClassVar[tuple[str, ...]] = ("x", "attr")
    paper: ClassVar[str] = ("Dasgupta, Frost & Moshkovitz, Framework for evaluating faithfulness of local "
                            "explanations, ICML 2022")

    def __init__(self, model: nn.Module, n: int = 5, discretise: str = "top_n", abs: bool = True,
                 internal_batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.n = positive_int(n, "n")
        self.discretise = choice(discretise, DISCRETISE, "discretise", "discretisation")
        self.abs = flag(abs, "abs", "compare |attributions|")
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.add_state("codes", default=[], dist_reduce_fx="cat")
        self.add_state("preds", default=[], dist_reduce_fx="cat")

    def labels(self, attr: Tensor) -> Tensor:
        """The discretised explanations [B, n] (equal rows ⇔ equal explanations)."""
        a = attr.flatten(1)
        if self.n > a.shape[1]:
            raise ConfigError(
                f"Consistency: n={self.n} exceeds the {a.shape[1]} values of a map; use n ≤ {a.shape[1]}.")
        if self.abs:
            a = a.abs()
        if self.discretise == "first_n_sign":
            return a[:, :self.n].sign().long()
        idx = a.abs().topk(self.n, dim=1, sorted=True).indices.sort(dim=1).values
        return idx * 3 + a.gather(1, idx).sign().long() + 1

    def update(self, x: Tensor, attr: Tensor, target: Tensor | None = None, explainer: Any = None) -> None:
        """Store a batch's discretised maps and predicted classes (``target``/``explainer`` unused)."""
        check_images(x, "Consistency")
        check_attribution(attr, "Consistency", x)
        preds = []
        with evaluating(self.model):
            for i in range(0, x.shape[0], self.internal_batch_size):
                preds.append(model_logits(self.model, x[i:i + self.internal_batch_size]).argmax(-1))
        self.codes.append(self.labels(attr).to(x.device))
        self.preds.append(torch.cat(preds).to(x.device) if preds else torch.empty(0, dtype=torch.long,
                                                                                   device=x.device))

    def _scores(self, codes: Tensor, preds: Tensor) -> Tensor:
        if preds.numel() == 0:
            return torch.empty(0, dtype=torch.float64)
        group = torch.unique(codes, dim=0, return_inverse=True)[1]
        both = torch.unique(torch.stack([group, preds.long()], 1), dim=0, return_inverse=True)[1]
        same_label = torch.bincount(group)[group] - 1
        same_both = torch.bincount(both)[both] - 1
        return same_both.double() / (same_label.double() + 1e-9)

    def per_sample(self) -> Tensor:
        """Per-sample consistency over every sample seen (gathered rank by rank under DDP)."""
        return self._scores(self._gathered("codes"), self._gathered("preds"))

    def compute(self) -> Tensor:
        """Mean consistency (NaN before any update)."""
        scores = self._scores(_cat_state(self.codes), _cat_state(self.preds))
        return scores.mean().float() if scores.numel() else torch.tensor(float("nan"))


def _cat_state(state: list[Tensor] | Tensor) -> Tensor:
    if isinstance(state, list):
        return torch.cat(state) if state else torch.empty(0, dtype=torch.long)
    return state


# -- Montavon et al.: continuity -------------------------------------------------------------
def translate(x: Tensor, shift: Tensor) -> Tensor:
    """``x`` [N,C,H,W] shifted right by ``shift[i]`` pixels (left if negative), the vacated columns
    filled with the image's minimum (Quantus' ``batched_translation`` with the "black" baseline)."""
    w = x.shape[-1]
    src = torch.arange(w, device=x.device)[None] - shift.to(x.device)[:, None]  # [N,W]
    valid = (src >= 0) & (src < w)
    idx = src.clamp(0, w - 1)[:, None, None].expand(x.shape)
    fill = x.flatten(1).amin(1)[:, None, None, None]
    return torch.where(valid[:, None, None], x.gather(3, idx), fill)


@register_metric("continuity")
class Continuity(ModelHolder, XAuditMetric):
    """Max ``||Φ(x) − Φ(x_t)||_1 / ||x − x_t||_2`` over translations ``x_t`` (Montavon et al., 2018).

    As ``quantus.Continuity`` (``nr_steps=28``, ``normalise=True``, ``abs=True``): shifts
    ``t_k = −W + k·((2W+1) // nr_steps)``, k = 1..nr_steps, along the width, vacated columns filled
    with the image's minimum; maps divided by their max |Φ|, then |·|. Deviations: the clean map is
    the ``attr`` passed in (Quantus re-explains ``x``; equal for a deterministic explainer);
    normalisation is per image (Quantus: over the batch); a shift that leaves the image unchanged
    (t = 0) scores 0 instead of ``||ΔΦ||_1 / 1e-9``, which is 0 in exact arithmetic and otherwise
    blows float rounding up by 1e9; ``return_nan_when_prediction_changes`` is not offered.
    """

    family = "robustness"
    measures = "largest change of the map per unit input change under image translation"
    higher_is_better: ClassVar[bool] = False
    update_inputs: ClassVar[tuple[str, ...]] = ("x", "attr", "target", "explainer")
    paper: ClassVar[str] = ("Montavon, Samek & Müller, Methods for interpreting and understanding deep neural "
                            "networks, Digital Signal Processing 2018")

    def __init__(self, model: nn.Module, nr_steps: int = 28, normalise: bool = True, abs: bool = True,
                 internal_batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.nr_steps = positive_int(nr_steps, "nr_steps")
        self.normalise = flag(normalise, "normalise", "divide each map by its max |value|")
        self.abs = flag(abs, "abs", "compare |attributions|")
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def shifts(self, width: int) -> Tensor:
        """The ``nr_steps`` translations (pixels) used on images ``width`` pixels wide."""
        dx = (2 * width + 1) // self.nr_steps
        if dx == 0:
            raise ConfigError(f"Continuity: nr_steps={self.nr_steps} exceeds 2·W+1={2 * width + 1} possible shifts "
                              f"of {width}-pixel-wide images; use nr_steps ≤ {2 * width + 1}.")
        return -width + dx * torch.arange(1, self.nr_steps + 1)

    def _prep(self, maps: Tensor) -> Tensor:
        maps = maps.float().flatten(1)
        if self.normalise:
            maps = _by_max(maps)
        return maps.abs() if self.abs else maps

    def update(self, x: Tensor, attr: Tensor, target: Tensor, explainer: Explainer) -> None:
        """Score a batch: explain its ``nr_steps`` translated copies, chunk by chunk."""
        check_images(x, "Continuity")
        check_attribution(attr, "Continuity", x)
        check_target(target, x.shape[0], "Continuity")
        check_explainer(explainer, "Continuity")
        b = x.shape[0]
        shifts = self.shifts(x.shape[-1]).to(x.device)
        clean = self._prep(attr)
        total = self.nr_steps * b
        scores = torch.full((total,), float("nan"), device=x.device)
        with evaluating(self.model, grad=True):
            for j0 in range(0, total, self.internal_batch_size):
                j = torch.arange(j0, min(j0 + self.internal_batch_size, total), device=x.device)
                img = j % b
                moved = translate(x[img], shifts[j // b])
                maps = self._prep(explainer.attribute(moved, target[img]))
                num = (clean[img] - maps).abs().sum(1)
                den = (x[img] - moved).flatten(1).float().pow(2).sum(1).sqrt()
                scores[j] = torch.where(den > 0, num / (den + 1e-9), torch.zeros_like(num))
        self._add_values(scores.view(self.nr_steps, b).amax(0))


# -- Agarwal et al.: relative stability ---------------------------------------------------------
class _RelativeStability(ModelHolder, XAuditMetric):
    """``max_j ||(Φ(x) − Φ(x'_j)) / Φ(x)||_2 / max(D(x, x'_j), eps_min)`` over noisy copies ``x'_j``."""

    family = "robustness"
    higher_is_better: ClassVar[bool] = False
    update_inputs: ClassVar[tuple[str, ...]] = ("x", "attr", "target", "explainer")
    paper: ClassVar[str] = ("Agarwal et al., Rethinking stability for attribution-based explanations, "
                            "ICLR 2022 PAIR2Struct workshop")

    def __init__(self, model: nn.Module, n: int = 10, lower_bound: float = 0.02, upper_bound: float = 0.2,
                 eps_min: float = 1e-6, return_nan_when_prediction_changes: bool = True, seed: int = 0,
                 internal_batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.n = positive_int(n, "n")
        self.lower_bound = positive_float(lower_bound, "lower_bound")
        self.upper_bound = positive_float(upper_bound, "upper_bound")
        if not self.upper_bound > self.lower_bound:
            raise ConfigError(f"upper_bound={upper_bound!r} must be larger than lower_bound={lower_bound!r} "
                              "(the noise is drawn from U(lower_bound, upper_bound)).")
        self.eps_min = positive_float(eps_min, "eps_min")
        self.return_nan_when_prediction_changes = flag(
            return_nan_when_prediction_changes, "return_nan_when_prediction_changes",
            "drop noisy copies whose predicted class differs from the clean image's")
        self.seed = int(seed)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def noise(self, x: Tensor) -> Tensor:
        """The ``n`` perturbations [n,B,C,H,W] of ``x``, U(lower_bound, upper_bound) per element."""
        def draw(shape: torch.Size, g: torch.Generator) -> Tensor:
            u = torch.rand(shape, generator=g, device=x.device, dtype=x.dtype)
            return self.lower_bound + u * (self.upper_bound - self.lower_bound)

        return seeded_noise(x, self.n, self.seed, draw)

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """Logits [N,K] and the representation [N,D] compared in the denominator."""
        logits = model_logits(self.model, x)
        return logits, logits

    def _denominator(self, x: Tensor, noisy: Tensor, h: Tensor, h_noisy: Tensor) -> Tensor:
        raise NotImplementedError

    def _relative_norm(self, ref: Tensor, other: Tensor) -> Tensor:
        """``||(ref − other) / (ref + (ref == 0)·eps_min)||_2`` over the last dim."""
        return ((ref - other) / (ref + (ref == 0) * self.eps_min)).norm(dim=-1)

    def update(self, x: Tensor, attr: Tensor, target: Tensor, explainer: Explainer,
               noise: Tensor | None = None) -> None:
        """Score a batch; ``noise`` [n,B,C,H,W] replaces the seeded draws (parity tests)."""
        delta = checked_noise(self, x, attr, target, explainer, noise)
        n, b = delta.shape[:2]
        noisy = (x[None] + delta).flatten(0, 1)
        targets = target.repeat(n)
        with evaluating(self.model):
            logits, rep = self._forward(x)
        check_target_range(target, logits.shape[-1])
        pred, rep = logits.argmax(-1), rep.double()
        flat_x, clean = x.flatten(1).double(), attr.double().flatten(1)
        ratios = torch.empty(n * b, dtype=torch.float64, device=x.device)
        for i in range(0, n * b, self.internal_batch_size):
            sl = slice(i, i + self.internal_batch_size)
            img = torch.arange(n * b, device=x.device)[sl] % b
            with evaluating(self.model, grad=True):
                maps = explainer.attribute(noisy[sl], targets[sl]).double().flatten(1)
            with evaluating(self.model):
                logits_n, rep_n = self._forward(noisy[sl])
            num = self._relative_norm(clean[img], maps)
            den = self._denominator(flat_x[img], noisy[sl].flatten(1).double(), rep[img], rep_n.double())
            ratio = num / (den + (den == 0) * self.eps_min)
            if self.return_nan_when_prediction_changes:
                ratio = ratio.masked_fill(logits_n.argmax(-1).to(pred.device) != pred[img], float("nan"))
            ratios[sl] = ratio
        self._add_values(_nanmax(ratios.view(n, b)))


@register_metric("relative_input_stability")
class RelativeInputStability(_RelativeStability):
    """RIS: relative map change over relative input change ``||(x − x')/x||_2`` (Agarwal et al., 2022).

    As ``quantus.RelativeInputStability`` (noise U(0.02, 0.2) per element, ``eps_min=1e-6``,
    ``abs=False``, ``normalise=False``, copies whose predicted class changes dropped). Deviations:
    ``n=10`` copies by default (Quantus: 200); the max is over the copies that keep the prediction
    (Quantus takes ``np.max`` over all, so a single flipped copy makes the whole score NaN); NaN only
    if every copy flips.
    """

    measures = "largest relative map change per relative input change"

    def _denominator(self, x: Tensor, noisy: Tensor, h: Tensor, h_noisy: Tensor) -> Tensor:
        return self._relative_norm(x, noisy)


@register_metric("relative_output_stability")
class RelativeOutputStability(_RelativeStability):
    """ROS: relative map change over the logit change ``||h(x) − h(x')||_2`` (Agarwal et al., 2022).

    As ``quantus.RelativeOutputStability`` (logits, not probabilities; other settings and
    deviations as :class:`RelativeInputStability`).
    """

    measures = "largest relative map change per change of the logits"

    def _denominator(self, x: Tensor, noisy: Tensor, h: Tensor, h_noisy: Tensor) -> Tensor:
        return (h - h_noisy).norm(dim=-1)


@register_metric("relative_representation_stability")
class RelativeRepresentationStability(_RelativeStability):
    """RRS: relative map change over the relative change of a layer's activations (Agarwal et al., 2022).

    ``layer``: dotted module name (default: the backbone's default target layer, e.g. the last conv
    block); its output is flattened per image. Quantus' default concatenates *every* non-Sequential
    module's output, which no paper setting uses — pass Quantus ``layer_names=[<the same layer>]``
    to compare (a deviation in the default only). Other settings and deviations as
    :class:`RelativeInputStability`. With ReLU activations, zero entries divide by ``eps_min``,
    as in Quantus and the paper's formula.
    """

    measures = "largest relative map change per relative change of internal activations"

    def __init__(self, model: nn.Module, layer: str | None = None, n: int = 10, lower_bound: float = 0.02,
                 upper_bound: float = 0.2, eps_min: float = 1e-6, return_nan_when_prediction_changes: bool = True,
                 seed: int = 0, internal_batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(model, n=n, lower_bound=lower_bound, upper_bound=upper_bound, eps_min=eps_min,
                         return_nan_when_prediction_changes=return_nan_when_prediction_changes, seed=seed,
                         internal_batch_size=internal_batch_size, **kwargs)
        self.layer = resolve_layer(model, layer, key="metric.layer", choices=lambda: layer_names(model))

    def _forward(self, x: Tensor) -> tuple[Tensor, Tensor]:
        with record_output(self.model.get_submodule(self.layer)) as rec:
            logits = model_logits(self.model, x)
        if rec.output is None:
            raise ConfigError(f"RelativeRepresentationStability: layer {self.layer!r} did not run in the forward "
                              "pass; pick a layer the model uses (xaudit.explainers.hooks.layer_names(model)).")
        return logits, rec.output.flatten(1)

    def _denominator(self, x: Tensor, noisy: Tensor, h: Tensor, h_noisy: Tensor) -> Tensor:
        return self._relative_norm(h, h_noisy)
