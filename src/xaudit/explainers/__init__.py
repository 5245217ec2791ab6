"""Explainers: one registry and base for gradient, CAM, perturbation and baseline methods.

>>> from xaudit.explainers import create, names
>>> attr = create("grad_cam", model, target_layer="layer4").attribute(x, target)  # [B,H,W]
"""

from xaudit.explainers import (  # noqa: F401  (registers)
    baselines,
    cam,
    gradient,
    pattern,
    perturbation,
    relevance,
    smoothgrad,
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
from xaudit.explainers.pattern import PatternAttribution, PatternNet, PatternsNotFittedError
from xaudit.explainers.perturbation import RISE, Occlusion
from xaudit.explainers.registry import create, names, register
from xaudit.explainers.relevance import COMPOSITES, LRP, RULES, DeepLift, DeepShap, DeepTaylor, Rule
from xaudit.explainers.smoothgrad import SmoothGrad

__all__ = [
    "CAM",
    "COMPOSITES",
    "LRP",
    "REDUCTIONS",
    "RISE",
    "RULES",
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
    "IntegratedGradients",
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
    "create",
    "layer_names",
    "names",
    "register",
]
