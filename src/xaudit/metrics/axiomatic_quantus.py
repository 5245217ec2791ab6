"""Axiomatic metrics of Quantus 0.6: input invariance and non-sensitivity.

- :class:`InputInvariance` (Kindermans et al., 2017/2019, "The (un)reliability of saliency
  methods"): does the map stay the same when a constant shift of the input is undone by the first
  layer's bias, so the model's function is unchanged?
- :class:`NonSensitivity` (Nguyen & Martínez, 2020, "On quantitative aspects of model
  interpretability"): pixels the model ignores should get zero attribution and vice versa.

Both follow Quantus 0.6 (``quantus.InputInvariance`` / ``quantus.NonSensitivity``) and are tested
equal to it (tests/metrics/test_faithfulness_sets_axiomatic.py); per-image deviations are listed
in each docstring.
"""

from __future__ import annotations

import copy
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xaudit.explainers.base import Explainer
from xaudit.metrics.base import (
    ModelHolder,
    XAuditMetric,
    blockwise_scores,
    check_attribution,
    check_explainer,
    check_images,
    check_target,
    evaluating,
)
from xaudit.metrics.faithfulness import baseline_values, check_baseline
from xaudit.metrics.faithfulness_sets import clean_scores
from xaudit.metrics.registry import register_metric
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import positive_int


def first_layer(model: nn.Module) -> nn.Conv2d | nn.Linear:
    """The first Conv2d or Linear of ``model`` (module order), the layer whose bias absorbs the shift."""
    for m in model.modules():
        if isinstance(m, (nn.Conv2d, nn.Linear)):
            return m
    raise ConfigError("InputInvariance needs a model whose first layer is a Conv2d or Linear (its bias absorbs "
                      "the input shift); this model has none.")


def absorb_shift_(model: nn.Module, shift: float) -> nn.Module:
    """Make ``model`` (in place; call it on a copy) compute on ``x + shift`` what it computed on ``x``:
    its first layer's bias becomes b − shift·Σ W (a bias is added if the layer has none)."""
    layer = first_layer(model)
    with torch.no_grad():
        offset = shift * layer.weight.sum(dim=tuple(range(1, layer.weight.ndim)))
        if layer.bias is None:
            layer.bias = nn.Parameter(torch.zeros_like(offset))
        layer.bias -= offset
    return model


def shifted_model(model: nn.Module, shift: float) -> nn.Module:
    """A deep copy of ``model`` with f'(x + shift) = f(x) (see :func:`absorb_shift_`)."""
    return absorb_shift_(copy.deepcopy(model), shift)


@register_metric("input_invariance")
class InputInvariance(ModelHolder, XAuditMetric):
    """Input invariance (Kindermans et al., 2019); 1 if the map is invariant, else 0; higher is better.

    Every input value is shifted by ``input_shift`` (Quantus' default −1) and the model's first
    layer (first Conv2d/Linear) gets the bias b − shift·ΣW, so the shifted model on the shifted
    input computes exactly the original function. The explainer is re-run on the shifted pair;
    the sample scores 1 when every value of the new map is ``isclose`` to the original
    (|Δ| ≤ atol + rtol·|new|, Quantus' atol=1e-4 and NumPy's rtol=1e-5). Saliency passes,
    gradient×input does not.

    ``update(x, attr, target, explainer)``: ``explainer`` must explain this metric's model; it is
    deep-copied together with the model (layer references such as CAM's target layers follow the
    copy) and the copy's first layer is shifted; the caller's model is never touched. Explainers
    that seed their noise from the image's bits (SmoothGrad) draw other noise for the shifted image. Quantus takes its
    first named sub-module and
    ``2b − min(layer(shift))``, which equals b − shift·ΣW for a convolution without padding; with
    padding Quantus' bias is off at the borders, xaudit's is the exact interior one.
    """

    family = "axiomatic"
    measures = "whether the map is unchanged when a constant input shift is absorbed by the first layer's bias"
    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = "Kindermans et al., The (un)reliability of saliency methods, 2019"
    update_inputs: ClassVar[tuple[str, ...]] = ("x", "attr", "target", "explainer")

    def __init__(self, model: nn.Module, input_shift: float = -1.0, atol: float = 1e-4, rtol: float = 1e-5,
                 internal_batch_size: int = 64, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        if isinstance(input_shift, bool) or not isinstance(input_shift, (int, float)):
            raise ConfigError(f"input_shift={input_shift!r} must be a number (added to every input value).")
        self.input_shift = float(input_shift)
        self.atol, self.rtol = float(atol), float(rtol)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def shifted_explainer(self, explainer: Explainer) -> Explainer:
        """A copy of ``explainer`` explaining the bias-shifted copy of the model."""
        name = type(self).__name__
        check_explainer(explainer, name)
        if explainer.model is not self.model:
            raise ValueError(f"{name}: the explainer explains another model than the metric's; build both on the "
                             "same model.")
        # one deep copy of the explainer with its model: every reference it keeps to the model, its layers
        # (CAM's target layers) or a nested explainer's model points into the same copy
        new = copy.deepcopy(explainer)
        absorb_shift_(new.model, self.input_shift)
        return new

    def update(self, x: Tensor, attr: Tensor, target: Tensor, explainer: Explainer) -> None:
        """Add 1 (invariant) or 0 per sample of one batch."""
        name = type(self).__name__
        check_images(x, name)
        check_attribution(attr, name, x)
        check_target(target, x.shape[0], name)
        # the shifted copy is made outside inference mode (Lightning tests under it): tensors created there
        # could never enter the explainer's autograd graph
        with torch.inference_mode(False), torch.enable_grad():
            shifted = self.shifted_explainer(explainer)
            xs = x.clone() + self.input_shift
            target = target.clone()
            maps = []
            with evaluating(shifted.model, grad=True):
                for i in range(0, x.shape[0], self.internal_batch_size):
                    maps.append(shifted.attribute(xs[i:i + self.internal_batch_size],
                                                  target[i:i + self.internal_batch_size]))
        new = torch.cat(maps).to(attr.device, torch.float64)
        close = torch.isclose(attr.double(), new, rtol=self.rtol, atol=self.atol)
        self._add_values(close.flatten(1).all(1).double())


@register_metric("non_sensitivity")
class NonSensitivity(ModelHolder, XAuditMetric):
    """Non-sensitivity (Nguyen & Martínez, 2020): number of violations; lower is better.

    Each group of ``features_in_step`` pixels (raster order) is set alone to the baseline
    (Quantus' ``"black"``: the image's own minimum); the model is *insensitive* to it when the
    target's softmax probability moves by less than ``eps``. The map gives it *no attribution*
    when its |Φ|/max|Φ| values are all < ``eps``. A violation is a group where exactly one of the
    two holds (ignored but attributed, or used but unattributed); the score counts them.

    Quantus normalises by the max over the whole batch (xaudit: per image, so a sample's value does
    not depend on its batch; equal for a batch of one), and treats the C·H·W channel values as
    features (xaudit: pixels, all channels together; equal for C=1). Quantus' XOR of a [B,steps] and a
    [B,features] array only runs for ``features_in_step=1``; for larger groups xaudit calls a group
    unattributed when all its pixels are.
    """

    family = "axiomatic"
    measures = "number of pixels where zero attribution and model insensitivity disagree"
    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = "Nguyen & Martínez, On quantitative aspects of model interpretability, 2020"

    def __init__(self, model: nn.Module, eps: float = 1e-5, features_in_step: int = 1,
                 perturb_baseline: str | float = "black", abs: bool = True, normalise: bool = True,
                 internal_batch_size: int = 256, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        if isinstance(eps, bool) or not isinstance(eps, (int, float)) or not eps > 0:
            raise ConfigError(f"eps={eps!r} must be a number > 0 (e.g. 1e-5).")
        self.eps = float(eps)
        self.features_in_step = positive_int(features_in_step, "features_in_step")
        self.perturb_baseline = check_baseline(perturb_baseline)
        self.abs, self.normalise = bool(abs), bool(normalise)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add the violation counts of one batch (H·W/``features_in_step`` forwards per image)."""
        name = type(self).__name__
        check_images(x, name)
        check_attribution(attr, name, x=x)
        check_target(target, x.shape[0], name)
        b, _, h, w = x.shape
        k = self.features_in_step
        if (h * w) % k:
            raise ValueError(f"{name}: features_in_step={k} must divide the {h}x{w}={h * w} pixels.")
        steps = h * w // k
        target = target.to(x.device)
        a = attr.to(x.device).flatten(1).double()
        a = a.abs() if self.abs else a
        if self.normalise:
            peak = a.abs().amax(1, keepdim=True)
            a = a / torch.where(peak > 0, peak, torch.ones_like(peak))
        unattributed = (a < self.eps).view(b, steps, k).all(2)
        group = (torch.arange(h * w, device=x.device) // k).view(1, 1, 1, h, w)
        with evaluating(self.model):
            p0 = clean_scores(self.model, x, target, "prob")
            fill = baseline_values(x, self.perturb_baseline)
            ids = torch.arange(steps, device=x.device).view(1, steps, 1, 1, 1)

            def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
                taken = group == ids[:, t0:t1]
                return torch.where(taken, fill[s0:s1, None], x[s0:s1, None]).flatten(0, 1)

            probs = blockwise_scores(self.model, b, steps, build, target, self.internal_batch_size)
        insensitive = (probs - p0[:, None]).abs() < self.eps
        self._add_values((insensitive ^ unattributed).sum(1).double())
