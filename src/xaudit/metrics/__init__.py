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
from xaudit.metrics.axiomatic_quantus import InputInvariance, NonSensitivity
from xaudit.metrics.base import SUBSTRATES, XAuditMetric, make_substrate, update_metric
from xaudit.metrics.complexity import Complexity, EffectiveComplexity, Sparseness
from xaudit.metrics.faithfulness import (
    FaithfulnessEstimate,
    Monotonicity,
    MonotonicityCorrelation,
    RegionPerturbation,
    Selectivity,
)
from xaudit.metrics.faithfulness_sets import IROF, Infidelity, SensitivityN, Sufficiency
from xaudit.metrics.localisation import MaskIoU, PointingGame, RelevanceMass
from xaudit.metrics.localisation_quantus import (
    AUC,
    AttributionLocalisation,
    Focus,
    RelevanceRankAccuracy,
    TopKIntersection,
)
from xaudit.metrics.perturbation import (
    DeletionInsertion,
    FaithfulnessCorrelation,
    faithfulness_correlation,
)
from xaudit.metrics.randomisation import SanityCheck, randomise_, spearman, ssim
from xaudit.metrics.randomisation_quantus import EfficientMPRT, RandomLogit, SmoothMPRT
from xaudit.metrics.registry import create_metric, metric_class, metric_names, register_metric
from xaudit.metrics.road import ROAD
from xaudit.metrics.robustness import LocalLipschitz, MaxSensitivity
from xaudit.metrics.robustness_quantus import (
    AvgSensitivity,
    Consistency,
    Continuity,
    RelativeInputStability,
    RelativeOutputStability,
    RelativeRepresentationStability,
)

__all__ = [
    "AUC",
    "IROF",
    "ROAD",
    "SUBSTRATES",
    "AttributionLocalisation",
    "AvgSensitivity",
    "Completeness",
    "Complexity",
    "Consistency",
    "Continuity",
    "DeletionInsertion",
    "EffectiveComplexity",
    "EfficientMPRT",
    "FaithfulnessCorrelation",
    "FaithfulnessEstimate",
    "Focus",
    "Infidelity",
    "InputInvariance",
    "LocalLipschitz",
    "MaskIoU",
    "MaxSensitivity",
    "Monotonicity",
    "MonotonicityCorrelation",
    "NonSensitivity",
    "PointingGame",
    "RandomLogit",
    "RegionPerturbation",
    "RelativeInputStability",
    "RelativeOutputStability",
    "RelativeRepresentationStability",
    "RelevanceMass",
    "RelevanceRankAccuracy",
    "SanityCheck",
    "Selectivity",
    "SensitivityN",
    "SmoothMPRT",
    "Sparseness",
    "Sufficiency",
    "TopKIntersection",
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
