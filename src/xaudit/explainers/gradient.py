"""Gradient family: saliency, gradient × input, integrated gradients, guided backprop, deconvnet.

All use ``torch.autograd.grad`` with respect to a private copy of the input, so no
``param.grad`` is written. Guided backprop and deconvnet change only how gradients pass
ReLUs, through a ``TorchFunctionMode`` that catches every ReLU call (module or functional,
in-place or not) for the duration of one forward: no module is modified or hooked.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from xaudit.explainers.base import Explainer, Target
from xaudit.explainers.registry import register
from xaudit.explainers.rerouting import RELU_IN_PLACE, RELU_OUT_OF_PLACE
from xaudit.ops.fills import FillLike, check_fill, make_fill
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import positive_int

# -- modified ReLU backward (guided backprop / deconvnet) -------------------------------------


class _ModifiedReLU(torch.autograd.Function):
    """ReLU forward; backward ``relu(g) * (out > 0)`` (guided) or ``relu(g)`` (deconvnet)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, deconv: bool, inplace: bool) -> Tensor:  # type: ignore[override]
        if inplace:
            out = x.relu_()
            ctx.mark_dirty(x)
        else:
            out = x.relu()
        ctx.deconv = deconv
        if not deconv:
            ctx.save_for_backward(out)
        return out

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None, None]:  # type: ignore[override]
        if ctx.deconv:
            return grad.clamp(min=0), None, None
        (out,) = ctx.saved_tensors
        return grad.clamp(min=0) * (out > 0).to(grad.dtype), None, None


class _ReLUBackwardOverride(TorchFunctionMode):
    """Route every ReLU call through :class:`_ModifiedReLU` while active."""

    def __init__(self, deconv: bool) -> None:
        super().__init__()
        self.deconv = deconv

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in RELU_OUT_OF_PLACE or func in RELU_IN_PLACE:
            x = args[0] if args else kwargs["input"]
            inplace = func in RELU_IN_PLACE or bool(kwargs.get("inplace", args[1] if len(args) > 1 else False))
            # an in-place op on a leaf that requires grad is illegal; such a ReLU gets a new tensor
            inplace = inplace and not (x.is_leaf and x.requires_grad)
            return _ModifiedReLU.apply(x, self.deconv, inplace)
        return func(*args, **kwargs)


@contextmanager
def modified_relu_backward(rule: str) -> Iterator[None]:
    """Within the block, ReLU gradients follow ``rule``: "guided" (Springenberg et al., 2015) or
    "deconv" (Zeiler & Fergus, 2014). Only ReLU is changed; other activations keep their gradient."""
    if rule not in ("guided", "deconv"):
        raise unknown_choice("ReLU rule", rule, ("guided", "deconv"))
    with _ReLUBackwardOverride(deconv=rule == "deconv"):
        yield


# -- shared gradient computation ---------------------------------------------------------------


class GradientExplainer(Explainer):
    """Base of the gradient family: ∂(target logit)/∂x for a batch, optionally with a ReLU rule."""

    default_reduce: str | None = "max_abs"
    relu_rule: str | None = None

    def input_gradient(self, x: Tensor, target: Target) -> Tensor:
        """∂ y_target / ∂x, [B,C,H,W]; one forward and one backward to the input."""
        x = x.detach().requires_grad_(True)
        if self.relu_rule is None:
            logits = self._logits(x)
        else:
            with modified_relu_backward(self.relu_rule):
                logits = self._logits(x)
        (grad,) = torch.autograd.grad(target.select(logits).sum(), x)
        return grad


@register("saliency")
class Saliency(GradientExplainer):
    """Vanilla gradient saliency (Simonyan et al., 2014, "Deep Inside Convolutional Networks").

    ``abs=True`` gives |∂y_c/∂x| per channel and the default reduction takes the max over
    channels, the paper's map; ``abs=False`` keeps the sign (default reduction: channel sum).
    """

    def __init__(self, model: nn.Module, abs: bool = True) -> None:
        super().__init__(model)
        self.abs = bool(abs)
        self.default_reduce = "max_abs" if self.abs else "sum"

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        g = self.input_gradient(x, target)
        return g.abs() if self.abs else g


@register("gradient_x_input")
class GradientXInput(GradientExplainer):
    """Gradient × input (Shrikumar et al., 2016): first-order contribution of each input value.

    The default reduction sums channels, so a pixel's value is its total first-order contribution.
    """

    default_reduce = "sum"
    signed = True

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        return self.input_gradient(x, target) * x


@register("guided_backprop")
class GuidedBackprop(GradientExplainer):
    """Guided backpropagation (Springenberg et al., 2015, "Striving for Simplicity"): at every ReLU
    only positive gradients pass, and only where the forward input was positive.

    Works with ``inplace=True`` ReLUs and functional ReLUs (e.g. DenseNet's head).
    """

    relu_rule = "guided"

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        return self.input_gradient(x, target)


@register("deconvnet")
class Deconvnet(GradientExplainer):
    """DeconvNet (Zeiler & Fergus, 2014, "Visualizing and Understanding Convolutional Networks"):
    ReLUs pass the positive part of the gradient regardless of the forward activation."""

    relu_rule = "deconv"

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        return self.input_gradient(x, target)


# -- integrated gradients ----------------------------------------------------------------------

RIEMANN: tuple[str, ...] = ("riemann_left", "riemann_right", "riemann_middle", "riemann_trapezoid")


def riemann_alphas(steps: int, method: str) -> tuple[list[float], list[float]]:
    """Path positions α_k in [0,1] and their weights for an m-step Riemann sum.

    Captum's points; the trapezoid weights are the rule's (1/(m−1), halved at the ends), where
    Captum uses 1/m — its weights sum to (m−1)/m and lose completeness.
    """
    if method not in RIEMANN:
        raise unknown_choice("integrated_gradients method", method, RIEMANN)
    n = steps
    if method == "riemann_trapezoid":
        if n < 2:
            raise ConfigError("riemann_trapezoid needs steps ≥2.")
        weights = [1 / (2 * (n - 1))] + [1 / (n - 1)] * (n - 2) + [1 / (2 * (n - 1))]
        return torch.linspace(0, 1, n).tolist(), weights
    lo, hi = {"riemann_left": (0.0, 1 - 1 / n), "riemann_right": (1 / n, 1.0),
              "riemann_middle": (1 / (2 * n), 1 - 1 / (2 * n))}[method]
    # float32 linspace, exactly Captum's points (a kink of ReLU can make 1-ulp shifts visible)
    return torch.linspace(lo, hi, n).tolist(), [1 / n] * n


@register("integrated_gradients")
class IntegratedGradients(GradientExplainer):
    """Integrated gradients (Sundararajan et al., 2017, "Axiomatic Attribution for Deep Networks").

    (x − x') · Σ_k w_k ∂y/∂x(x' + α_k (x − x')), a Riemann sum over ``steps`` points of the
    straight path from the baseline x'. Per-channel values sum to ≈ f(x) − f(x') (completeness);
    the default reduction sums channels to keep that. ``baseline``: "zero", "mean", "blur",
    "gray", a number or a tensor. Work is chunked so one forward holds at most
    ``internal_batch_size`` images (at least one step of the whole batch).
    """

    default_reduce = "sum"
    signed = True

    def __init__(self, model: nn.Module, steps: int = 50, method: str = "riemann_middle",
                 baseline: FillLike = "zero", blur_sigma: float | None = None,
                 internal_batch_size: int = 64) -> None:
        super().__init__(model)
        self.steps = positive_int(steps, "steps")
        self.alphas, self.weights = riemann_alphas(self.steps, method)
        self.method = method
        self.baseline = check_fill(baseline, "baseline")
        self.blur_sigma = blur_sigma
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        target.resolve(self._logits, x)
        base = self.baseline_for(x)
        diff = x - base
        b = x.shape[0]
        per_chunk = max(1, self.internal_batch_size // b)
        alphas = torch.tensor(self.alphas, device=x.device, dtype=x.dtype)
        weights = torch.tensor(self.weights, device=x.device, dtype=x.dtype)
        total = torch.zeros_like(x)
        for start in range(0, self.steps, per_chunk):
            a = alphas[start:start + per_chunk]
            k = a.shape[0]
            path = (base[None] + a.view(k, 1, 1, 1, 1) * diff[None]).reshape(k * b, *x.shape[1:])
            path.requires_grad_(True)
            (grad,) = torch.autograd.grad(target.select(self._logits(path)).sum(), path)
            total += torch.einsum("k,kbchw->bchw", weights[start:start + k], grad.view(k, *x.shape))
        return diff * total

    def baseline_for(self, x: Tensor) -> Tensor:
        """The baseline image x' used for ``x`` (for completeness checks)."""
        return make_fill(x, self.baseline, self.blur_sigma, option="baseline")
