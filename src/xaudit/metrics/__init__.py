"""Explanation-quality metrics as torchmetrics ``Metric`` objects (DDP-exact, batched on the device).

```python
m = DeletionInsertion(model, mode="deletion", steps=32, substrate="zero")
m.update(x, attr, target); m.compute()      # mean normalised AUC; m.per_sample(), m.curves()
p = PointingGame(tolerance=0)
p.update(attr, mask); p.compute()
m = create_metric("faithfulness_correlation", model=model, nr_runs=50)
```
Model-based metrics take ``update(x, attr, target)``, localisation metrics ``update(attr, mask)``,
robustness metrics (MaxSensitivity, LocalLipschitz) ``update(x, attr, target, explainer)``;
:func:`update_metric` calls either from a batch's pieces.
"""

from xaudit.metrics.axiomatic import Completeness
from xaudit.metrics.base import SUBSTRATES, XAuditMetric, make_substrate, update_metric
from xaudit.metrics.localisation import MaskIoU, PointingGame, RelevanceMass
from xaudit.metrics.perturbation import (
    DeletionInsertion,
    FaithfulnessCorrelation,
    faithfulness_correlation,
)
from xaudit.metrics.randomisation import SanityCheck, randomise_, spearman, ssim
from xaudit.metrics.registry import create_metric, metric_class, metric_names, register_metric
from xaudit.metrics.robustness import LocalLipschitz, MaxSensitivity

__all__ = [
    "SUBSTRATES",
    "Completeness",
    "DeletionInsertion",
    "FaithfulnessCorrelation",
    "LocalLipschitz",
    "MaskIoU",
    "MaxSensitivity",
    "PointingGame",
    "RelevanceMass",
    "SanityCheck",
    "XAuditMetric",
    "create_metric",
    "faithfulness_correlation",
    "make_substrate",
    "metric_class",
    "metric_names",
    "randomise_",
    "register_metric",
    "spearman",
    "ssim",
    "update_metric",
]
