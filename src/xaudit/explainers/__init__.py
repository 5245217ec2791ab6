"""Explainers: one registry and base for gradient, CAM, perturbation, relevance, surrogate, region
and influence methods, the baselines, and activation maximisation (:func:`maximize_activation`).

>>> from xaudit.explainers import create, names
>>> attr = create("grad_cam", model, target_layer="layer4").attribute(x, target)  # [B,H,W]
"""

import importlib
from typing import Any

from xaudit.explainers import (  # noqa: F401  (registers)
    attention,
    baselines,
    cam,
    gradient,
    influence,
    layer_attribution,
    pattern,
    perturbation,
    relevance,
    senn,
    smoothgrad,
    surrogate,
    transformer_lrp,
    xrai,
)
from xaudit.explainers.base import (
    REDUCTIONS,
    Explainer,
    ExplainerInputError,
    ExplainerTypeError,
    Target,
    UnsupportedModelError,
)
from xaudit.explainers.baselines import RandomBaseline, SobelBaseline
from xaudit.explainers.cam import (
    CAM,
    CAMExplainer,
    FeatureMaps,
    GradCAM,
    GradCAMPlusPlus,
    GuidedGradCAM,
    ScoreCAM,
)
from xaudit.explainers.gradient import (
    Deconvnet,
    GradientXInput,
    GuidedBackprop,
    IntegratedGradients,
    Saliency,
)
from xaudit.explainers.hooks import layer_names
from xaudit.explainers.influence import (
    InfluenceDirected,
    InfluenceResult,
    InternalInfluence,
    distributional_influence,
)
from xaudit.explainers.layer_attribution import (
    LayerConductance,
    LayerGradientXActivation,
    LayerIntegratedGradients,
    NeuronGradient,
    NeuronIntegratedGradients,
)
from xaudit.explainers.pattern import PatternAttribution, PatternNet, PatternsNotFittedError
from xaudit.explainers.perturbation import RISE, Occlusion
from xaudit.explainers.registry import create, names, register
from xaudit.explainers.relevance import COMPOSITES, LRP, RULES, DeepLift, DeepShap, DeepTaylor, Rule
from xaudit.explainers.segmentation import segment
from xaudit.explainers.smoothgrad import SmoothGrad
from xaudit.explainers.surrogate import KernelShap, Lime
from xaudit.explainers.transformer_lrp import CPLRP, AttnLRP
from xaudit.explainers.xrai import XRAI

__all__ = [
    "CAM",
    "COMPOSITES",
    "CPLRP",
    "LRP",
    "REDUCTIONS",
    "RISE",
    "RULES",
    "XRAI",
    "AttnLRP",
    "CAMExplainer",
    "Deconvnet",
    "DeepLift",
    "DeepShap",
    "DeepTaylor",
    "Explainer",
    "ExplainerInputError",
    "ExplainerTypeError",
    "FeatureMaps",
    "GradCAM",
    "GradCAMPlusPlus",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedGradCAM",
    "InfluenceDirected",
    "InfluenceResult",
    "IntegratedGradients",
    "InternalInfluence",
    "KernelShap",
    "LayerConductance",
    "LayerGradientXActivation",
    "LayerIntegratedGradients",
    "Lime",
    "NeuronGradient",
    "NeuronIntegratedGradients",
    "Occlusion",
    "PatternAttribution",
    "PatternNet",
    "PatternsNotFittedError",
    "RandomBaseline",
    "Rule",
    "Saliency",
    "ScoreCAM",
    "SmoothGrad",
    "SobelBaseline",
    "Target",
    "UnsupportedModelError",
    "Visualization",
    "create",
    "distributional_influence",
    "layer_names",
    "maximize_activation",
    "names",
    "register",
    "segment",
]


def __getattr__(name: str) -> Any:
    # activation maximisation loads on first use (its command line is xaudit.reporting.activation_max)
    if name in ("Visualization", "maximize_activation"):
        return getattr(importlib.import_module("xaudit.explainers.activation_max"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
