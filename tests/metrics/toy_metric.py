"""A toy metric in one file: defining and registering it is all it takes to use it from
``audit=evaluate`` (``evaluate.metrics={toy: {name: toy_confidence_drop}}``), from the explanation
monitor (``callbacks.explanation_monitor.metrics=...``) and to be covered by the metric contract
(tests/metrics/test_toy_metric.py shows all three)."""

from __future__ import annotations

from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xaudit.metrics.base import ModelHolder, XAuditMetric, evaluating, forward_probs
from xaudit.metrics.registry import register_metric

NAME = "toy_confidence_drop"


@register_metric(NAME)
class ToyConfidenceDrop(ModelHolder, XAuditMetric):
    """The explained class's probability lost when the ``fraction`` most relevant pixels are set to 0."""

    update_inputs: ClassVar[tuple[str, ...]] = ("x", "attr", "target")
    measures: ClassVar[str] = "probability lost when the top pixels are zeroed (toy)"

    def __init__(self, model: nn.Module, fraction: float = 0.25, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.fraction = float(fraction)

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        flat = attr.flatten(1)
        k = max(1, int(self.fraction * flat.shape[1]))
        keep = torch.ones_like(flat).scatter_(1, flat.topk(k, dim=1).indices, 0.0).view_as(attr)
        with evaluating(self.model):
            p = forward_probs(self.model, x).gather(1, target.view(-1, 1)).squeeze(1)
            q = forward_probs(self.model, x * keep.unsqueeze(1).to(x.dtype)).gather(1, target.view(-1, 1)).squeeze(1)
        self._add_values(p - q)
