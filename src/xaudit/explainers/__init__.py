"""Explainers: one registry and base for gradient, CAM, perturbation, relevance, surrogate, region
and influence methods, the baselines, and activation maximisation (:func:`maximize_activation`).

>>> from xaudit.explainers import create, names
>>> attr = create("grad_cam", model, target_layer="layer4").attribute(x, target)  # [B,H,W]
"""

import importlib
from typing import Any

from xaudit.explainers import (  # noqa: F401  (registers)
    attention,
    attribution_sampling,
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
from xaudit.explainers.attribution_sampling import (
    FeatureAblation,
    FeaturePermutation,
    GradientShap,
    ShapleyValueSampling,
)
from xaudit.explainers.base import (
    REDUCTIONS,
    Explainer,
    ExplainerInputError,
    ExplainerTypeError,
    Target,
    TargetSpec,
    UnsupportedModelError,
    UnsupportedTargetError,
)
from xaudit.explainers.baselines import RandomBaseline, SobelBaseline
from xaudit.explainers.cam import (
    CAM,
    AblationCAM,
    CAMExplainer,
    EigenCAM,
    EigenGradCAM,
    FeatureMaps,
    FullGrad,
    GradCAM,
    GradCAMElementWise,
    GradCAMPlusPlus,
    GuidedGradCAM,
    HiResCAM,
    LayerCAM,
    ScoreCAM,
    XGradCAM,
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
from xaudit.explainers.targets import (
    ClassContrast,
    ClassLogit,
    ClassProbability,
    PresentClasses,
    expand_pairs,
    present_pairs,
)
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
    "AblationCAM",
    "AttnLRP",
    "CAMExplainer",
    "ClassContrast",
    "ClassLogit",
    "ClassProbability",
    "Deconvnet",
    "DeepLift",
    "DeepShap",
    "DeepTaylor",
    "EigenCAM",
    "EigenGradCAM",
    "Explainer",
    "ExplainerInputError",
    "ExplainerTypeError",
    "FeatureAblation",
    "FeatureMaps",
    "FeaturePermutation",
    "FullGrad",
    "GradCAM",
    "GradCAMElementWise",
    "GradCAMPlusPlus",
    "GradientShap",
    "GradientXInput",
    "GuidedBackprop",
    "GuidedGradCAM",
    "HiResCAM",
    "InfluenceDirected",
    "InfluenceResult",
    "IntegratedGradients",
    "InternalInfluence",
    "KernelShap",
    "LayerCAM",
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
    "PresentClasses",
    "RandomBaseline",
    "Rule",
    "Saliency",
    "ScoreCAM",
    "ShapleyValueSampling",
    "SmoothGrad",
    "SobelBaseline",
    "Target",
    "TargetSpec",
    "UnsupportedModelError",
    "UnsupportedTargetError",
    "Visualization",
    "XGradCAM",
    "create",
    "distributional_influence",
    "expand_pairs",
    "layer_names",
    "maximize_activation",
    "names",
    "present_pairs",
    "register",
    "segment",
]


def __getattr__(name: str) -> Any:
    # activation maximisation loads on first use (its command line is xaudit.reporting.activation_max)
    if name in ("Visualization", "maximize_activation"):
        return getattr(importlib.import_module("xaudit.explainers.activation_max"), name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
