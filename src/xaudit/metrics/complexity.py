"""Complexity: how concentrated (simple) is an attribution map?

The three complexity metrics of Quantus 0.6, on the map alone — ``update(attr)`` with ``attr``
[B,H,W] (``update_inputs = ("attr",)``, which :func:`xaudit.metrics.base.update_metric` dispatches):

- :class:`Sparseness` — the Gini index of |a| (Chalasani et al., 2020); higher = sparser;
- :class:`Complexity` — the entropy of the fractional contribution |a|/Σ|a| (Bhatt et al., 2020);
  lower = simpler;
- :class:`EffectiveComplexity` — the number of pixels with |a| > ``eps`` (Nguyen & Martínez, 2020);
  lower = simpler.

Preprocessing as Quantus: ``normalise=True`` divides the map by its max |a| (``normalise_by_max``),
then ``abs=True`` takes |a| (both default on, Quantus' defaults). One deviation: Quantus'
``normalise_by_max`` takes one max over the whole batch, so a sample's value depends on the other
samples in its batch; here the max is taken per image (a batch-independent, DDP-exact value). On a
one-image batch both agree; the parity tests pass ``normalise_axes=(1, 2, 3)`` to Quantus.
Features are pixels: Quantus expands a [B,H,W] map to [B,1,H,W], so its features are our pixels.
"""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor

from xaudit.metrics.base import XAuditMetric, check_attribution
from xaudit.metrics.registry import register_metric
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import flag


def check_flag(value: Any, key: str, meaning: str) -> bool:
    """Alias of :func:`xaudit.utils.validation.flag` (kept for existing callers)."""
    return flag(value, key, meaning)


def prepare_maps(attr: Tensor, normalise: bool, take_abs: bool) -> Tensor:
    """Flattened maps [B,N] in float64, each divided by its own max |a| (``normalise``; an all-zero
    map stays zero), then made absolute (``take_abs``) — Quantus' order (normalise, then abs)."""
    a = attr.detach().flatten(1).to(torch.float64)
    if normalise:
        peak = a.abs().amax(1, keepdim=True)
        a = a / torch.where(peak > 0, peak, torch.ones_like(peak))
    return a.abs() if take_abs else a


class _MapMetric(XAuditMetric):
    """A metric of the attribution map alone: ``update(attr)``."""

    update_inputs: ClassVar[tuple[str, ...]] = ("attr",)
    family = "complexity"

    def __init__(self, abs: bool = True, normalise: bool = True, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.abs = flag(abs, "abs", "take |a| of the attributions")
        self.normalise = flag(normalise, "normalise", "divide each map by its max |a| first")

    def update(self, attr: Tensor) -> None:
        """Add the values of a batch of attribution maps [B,H,W]."""
        check_attribution(attr, type(self).__name__)
        self._add_values(self._score(prepare_maps(attr, self.normalise, self.abs)))

    def _score(self, a: Tensor) -> Tensor:
        raise NotImplementedError


@register_metric("sparseness")
class Sparseness(_MapMetric):
    """Gini index of the map (Chalasani et al., "Concise explanations of neural networks using
    adversarial training", ICML 2020), as ``quantus.Sparseness``.

    With a = sort(|a| + 1e-7) ascending over the N pixels:
    G = Σ_i (2i − N − 1)·a_i / (N·Σ a_i), in [0, 1): 0 for a uniform map, near 1 when one pixel holds
    all attribution. The 1e-7 is Quantus' (it keeps an all-zero map at 0 instead of 0/0). Higher is
    better (sparser, more concise).
    """

    measures = "Gini index of |attribution| (concentration on few pixels)"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = ("Chalasani et al., Concise explanations of neural networks using adversarial training, "
                            "ICML 2020")
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "normalise divides by each map's own max |a| (Quantus: one max over the batch)",)

    def _score(self, a: Tensor) -> Tensor:
        n = a.shape[1]
        a = (a + 1e-7).sort(dim=1).values
        i = torch.arange(1, n + 1, device=a.device, dtype=a.dtype)
        return ((2 * i - n - 1) * a).sum(1) / (n * a.sum(1))


@register_metric("complexity")
class Complexity(_MapMetric):
    """Entropy of the fractional contribution (Bhatt, Weller & Moura, "Evaluating and aggregating
    feature-based model explanations", IJCAI 2020), as ``quantus.Complexity``.

    p = a / Σ|a|, H = −Σ p·log(p + 1e-12) (Quantus' 1e-12). Between 0 (one pixel) and log N
    (uniform). An all-zero map is undefined (0/0): NaN, as Quantus. Lower is better (simpler).
    """

    measures = "entropy of the fractional contribution of pixels"
    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = ("Bhatt, Weller & Moura, Evaluating and aggregating feature-based model "
                            "explanations, IJCAI 2020")
    protocol_notes: ClassVar[tuple[str, ...]] = Sparseness.protocol_notes

    def _score(self, a: Tensor) -> Tensor:
        p = a / a.abs().sum(1, keepdim=True)
        return -(p * torch.log(p + 1e-12)).sum(1)


@register_metric("effective_complexity")
class EffectiveComplexity(_MapMetric):
    """Effective complexity (Nguyen & Martínez, "On quantitative aspects of model interpretability",
    2020), as ``quantus.EffectiveComplexity``: the number of pixels whose (normalised, absolute)
    attribution exceeds ``eps`` (default 1e-5, Quantus'). Lower is better (fewer relevant pixels).
    A count of pixels, so it scales with the image size.
    """

    measures = "number of pixels with |attribution| above eps"
    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = "Nguyen & Martínez, On quantitative aspects of model interpretability, 2020"
    protocol_notes: ClassVar[tuple[str, ...]] = Sparseness.protocol_notes

    def __init__(self, eps: float = 1e-5, abs: bool = True, normalise: bool = True, **kwargs: Any) -> None:
        super().__init__(abs=abs, normalise=normalise, **kwargs)
        if isinstance(eps, bool) or not isinstance(eps, int | float) or not eps >= 0 or eps == float("inf"):
            raise ConfigError(f"eps={eps!r} must be a finite number ≥0 (the attribution threshold; e.g. 1e-5).")
        self.eps = float(eps)

    def _score(self, a: Tensor) -> Tensor:
        return (a > self.eps).sum(1).to(torch.float64)
