"""Explainers: one registry and base for gradient, CAM, perturbation and baseline methods.

>>> from xaudit.explainers import create, names
>>> attr = create("grad_cam", model, target_layer="layer4").attribute(x, target)  # [B,H,W]
"""

from xaudit.explainers import baselines, cam, gradient, perturbation, smoothgrad  # noqa: F401  (registers)
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
from xaudit.explainers.perturbation import RISE, Occlusion
from xaudit.explainers.registry import create, names, register
from xaudit.explainers.smoothgrad import SmoothGrad

__all__ = [
    "CAM",
    "REDUCTIONS",
    "RISE",
    "CAMExplainer",
    "Deconvnet",
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
    "RandomBaseline",
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
