"""Completeness: do the attributions add up to the change in the output?"""

from __future__ import annotations

from typing import Any, ClassVar

from torch import Tensor, nn

from xaudit.metrics.base import (
    OUTPUTS,
    ModelHolder,
    XAuditMetric,
    check_attribution,
    check_images,
    check_target,
    check_target_range,
    evaluating,
    model_logits,
    target_scores,
)
from xaudit.metrics.registry import register_metric
from xaudit.ops.fills import FILLS, make_fill
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import choice


@register_metric("completeness")
class Completeness(ModelHolder, XAuditMetric):
    """Relative completeness error |Σ a − (f(x) − f(x̄))| / |f(x) − f(x̄)|; lower is better.

    Completeness (Sundararajan, Taly and Yan, "Axiomatic attribution for deep networks", ICML
    2017; "summation to delta" in DeepLIFT) holds for Integrated Gradients, DeepLIFT and
    LRP-style methods: the attributions sum to the output's change from the baseline x̄ to x. The
    baseline must be the one the explainer used (``baseline`` is a substrate name; ``zero`` is
    the dataset mean in normalised units) and f the quantity it explained (``output``: the
    target ``logit`` — what xaudit's explainers attribute — or its softmax ``prob``).

    ``update(x, attr, target)``: ``attr`` is [B,H,W] or per-channel [B,C,H,W]; all of it is summed.
    The error is relative to |f(x) − f(x̄)| (at least ``eps``), so 0.05 means "5% off".
    """

    family = "axiomatic"
    measures = "whether the attributions sum to f(x) - f(baseline)"

    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = "Sundararajan, Taly & Yan, Axiomatic attribution for deep networks, ICML 2017"

    def __init__(self, model: nn.Module, baseline: str | float = "zero", output: str = "logit",
                 blur_sigma: float | None = None, eps: float = 1e-6, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        if isinstance(baseline, bool) or not isinstance(baseline, (str, int, float)):
            raise ConfigError(f"baseline={baseline!r} must be one of {list(FILLS)} or a number.")
        self.baseline = choice(baseline, FILLS, "baseline") if isinstance(baseline, str) else baseline
        self.blur_sigma = blur_sigma
        self.output = choice(output, OUTPUTS, "output")
        self.eps = float(eps)

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the relative errors of one batch."""
        name = type(self).__name__
        check_images(x, name)
        check_attribution(attr, name, x=x, allow_channels=True)
        check_target(target, x.shape[0], name)
        target = target.to(x.device)
        with evaluating(self.model):
            logits = model_logits(self.model, x)
            check_target_range(target, logits.shape[-1])
            f_x = target_scores(logits, target, self.output)
            base = make_fill(x, self.baseline, self.blur_sigma, option="baseline")  # the explainers' own fills
            f_base = target_scores(model_logits(self.model, base), target, self.output)
        delta = (f_x - f_base).double()
        total = attr.to(x.device).flatten(1).double().sum(1)
        self._add_values((total - delta).abs() / delta.abs().clamp_min(self.eps))
