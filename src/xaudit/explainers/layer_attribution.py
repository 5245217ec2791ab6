"""Layer and neuron attribution: *which layer / which unit* carries the evidence (Captum's layer and
neuron families).

Layer methods attribute the target logit to the activations A [B,K,h,w] of ``target_layer``:

* ``layer_integrated_gradients`` — IG in activation space (Sundararajan et al., 2017, "Axiomatic
  Attribution for Deep Networks"): (A − A') · Σ_k w_k ∂y/∂A(A' + α_k (A − A')), A' the layer's
  activations of the baseline image; Σ over units ≈ f(x) − f(x').
* ``layer_conductance`` — conductance (Dhamdhere et al., 2018, "How Important Is a Neuron?"): the
  flow of IG through each unit, Σ_k ∂y/∂A(x_k) · (A(x_{k+1}) − A(x_k)) along the input path x_k.
* ``layer_gradient_x_activation`` — ∂y/∂A · A, one forward and one backward to the layer.

``attribute_layer(x, target)`` returns that raw, Captum-shaped attribution ([B,K,h,w], or [B,K] for
a flat layer). ``attribute(x, target)`` keeps xaudit's contract: the channel sum of the layer
attribution, upsampled bilinearly (half-pixel centres) to the input — Captum's
``LayerAttribution.interpolate(attr.sum(1, keepdim=True), x.shape[-2:], "bilinear")``. Layers
without a spatial [B,K,h,w] output only offer ``attribute_layer``.

Neuron methods attribute ONE unit of ``target_layer`` to the input ([B,C,H,W] per channel):

* ``neuron_gradient`` — ∂A_u/∂x (saliency of a unit; default map: max |·| over channels).
* ``neuron_integrated_gradients`` — IG of A_u w.r.t. x (default map: channel sum, keeping
  completeness Σ ≈ A_u(x) − A_u(x')).

``neuron`` is an index tuple into one sample's layer output: (channel, y, x) for [B,K,h,w], (unit,)
for [B,K]. ``neuron=None`` picks, per image, the unit with the largest activation at ``x`` (the
"most excited unit"; batch-independent). The ``target`` class is not used by neuron methods
beyond being checked against the number of classes like every explainer's.

IG machinery (Riemann points and weights, baselines, ``internal_batch_size`` chunking) is the
one of :class:`xaudit.explainers.gradient.IntegratedGradients`; Captum's default Gauss–Legendre
rule is not offered, so compare with Captum's ``method="riemann_*"``. Conductance uses Captum's
points: ``steps + 1`` positions of ``method`` (the method's weights are not used; with
``riemann_trapezoid``, the default, the points run from x' to x so the layer's conductances sum
to ≈ f(x) − f(x')).

Speed: the layers before ``target_layer`` run without building a graph wherever no gradient goes
through them, the layers after it run without one for neuron gradients, and neuron IG stops each
path forward at the layer.
"""

from __future__ import annotations

import numbers
from collections.abc import Iterator, Sequence

import torch
from torch import Tensor, nn

from xaudit.explainers.base import (
    Explainer,
    Target,
    TargetLike,
    UnsupportedModelError,
    check_input,
    compute_dtype,
    explain_mode,
    upsample,
)
from xaudit.explainers.gradient import riemann_alphas
from xaudit.explainers.hooks import resolve_layer
from xaudit.explainers.registry import register
from xaudit.ops.fills import FillLike, check_fill, make_fill
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import positive_int

NeuronLike = Sequence[int] | int | None


class _StopForward(Exception):
    """Raised by a tap to end a forward at the target layer (nothing after it is needed)."""


class _Tap:
    """A forward hook on the target layer: records (or replaces) its output, then switches grad
    mode for the rest of the forward, or stops the forward."""

    def __init__(self, name: str, *, leaf: bool = False, replace: Tensor | None = None,
                 grad_after: bool = True, stop: bool = False) -> None:
        self.name, self.leaf, self.replace = name, leaf, replace
        self.grad_after, self.stop = grad_after, stop
        self.output: Tensor | None = None

    def __call__(self, module: nn.Module, inputs: object, output: object) -> Tensor:
        if not isinstance(output, Tensor):
            raise ConfigError(f"target_layer {self.name!r} ({type(module).__name__}) returns "
                              f"{type(output).__name__}, not a tensor; pick a layer whose output is one tensor.")
        if self.output is not None:
            raise ConfigError(f"target_layer {self.name!r} is called more than once in one forward (a shared "
                              "module, e.g. torchvision's BasicBlock.relu); pick a module called once.")
        if self.replace is not None:
            if self.replace.shape[1:] != output.shape[1:] or self.replace.shape[0] != output.shape[0]:
                raise ConfigError(f"internal: replacement {tuple(self.replace.shape)} for target_layer "
                                  f"{self.name!r} output {tuple(output.shape)}.")
            out = self.replace
        elif self.leaf:
            out = output.detach().requires_grad_(True)
        else:
            out = output
        self.output = out
        if self.stop:
            raise _StopForward
        torch._C._set_grad_enabled(self.grad_after)  # restored by the caller's grad-mode context
        # the model continues with a copy: an in-place op after the layer cannot touch `out`
        return out.clone()


def _check_neuron(neuron: NeuronLike) -> tuple[int, ...] | None:
    if neuron is None:
        return None
    if isinstance(neuron, numbers.Integral) and not isinstance(neuron, bool):
        neuron = (int(neuron),)
    if (isinstance(neuron, Tensor) or not isinstance(neuron, Sequence) or isinstance(neuron, str)
            or not neuron or not all(isinstance(i, numbers.Integral) and not isinstance(i, bool) for i in neuron)):
        raise ConfigError(f"neuron must be a tuple of ints — (channel, y, x) for a [B,K,h,w] layer, (unit,) "
                          f"for a [B,K] layer — or None (the most active unit per image); got {neuron!r}.")
    return tuple(int(i) for i in neuron)


class _LayerBase(Explainer):
    """Shared by layer and neuron methods: ``target_layer`` (dotted name, default: the backbone's
    ``default_target_layer``) and forwards tapped at that layer."""

    def __init__(self, model: nn.Module, target_layer: str | None = None) -> None:
        super().__init__(model)
        self.target_layer = resolve_layer(model, target_layer)

    def _forward(self, x: Tensor, tap: _Tap, grad_before: bool) -> Tensor | None:
        """Run the model on ``x`` with ``tap`` on the target layer; logits, or None when stopped."""
        handle = self.model.get_submodule(self.target_layer).register_forward_hook(tap)
        try:
            with torch.set_grad_enabled(grad_before):
                try:
                    logits: Tensor | None = self._logits(x)
                except _StopForward:
                    logits = None
        finally:
            handle.remove()
        if tap.output is None:
            raise ConfigError(f"target_layer {self.target_layer!r} was not called in the model's forward; "
                              "pick a layer on the path from input to logits.")
        return logits


# -- layer attribution ---------------------------------------------------------------------------


class LayerAttributionExplainer(_LayerBase):
    """Base of the layer methods: :meth:`attribute_layer` gives the raw attribution of the target to
    the layer's activations; :meth:`attribute` its channel sum upsampled to the input [B,H,W]."""

    default_reduce: str | None = None
    signed = True  # evidence for (+) and against (−) the target

    def attribute_layer(self, x: Tensor, target: TargetLike = "predicted") -> Tensor:
        """Attribution of ``target`` to ``target_layer``'s output, Captum-shaped ([B,K,h,w] or [B,K]),
        detached, in ``x.dtype`` — what Captum's Layer* classes return for the same work."""
        check_input(x, self.model)
        with explain_mode(self.model):
            xc = x.detach().to(dtype=compute_dtype(self.model, x), copy=True)
            attr = self._layer_attribution(xc, Target(target, xc.shape[0], xc.device))
        return attr.detach().to(dtype=x.dtype)

    def _layer_attribution(self, x: Tensor, target: Target) -> Tensor:
        raise NotImplementedError

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        attr = self._layer_attribution(x, target)
        if attr.ndim != 4:
            raise UnsupportedModelError(
                f"target_layer {self.target_layer!r} outputs [B,{','.join(map(str, attr.shape[1:]))}], not a "
                f"[B,K,h,w] feature map, so it has no map at input resolution; use attribute_layer() for the raw "
                "layer attribution, or pick a conv layer.")
        return upsample(attr.sum(1), tuple(x.shape[-2:]))

    def _acts_and_logits(self, x: Tensor) -> tuple[Tensor, Tensor]:
        tap = _Tap(self.target_layer, grad_after=False)
        logits = self._forward(x, tap, grad_before=False)
        assert logits is not None and tap.output is not None
        return tap.output, logits


class _PathMixin:
    """IG options shared with :class:`xaudit.explainers.gradient.IntegratedGradients`."""

    def _init_path(self, steps: int, method: str, baseline: FillLike, blur_sigma: float | None,
                   internal_batch_size: int, points: int = 0) -> None:
        self.steps = positive_int(steps, "steps")
        self.alphas, self.weights = riemann_alphas(self.steps + points, method)
        self.method = method
        self.baseline = check_fill(baseline, "baseline")
        self.blur_sigma = blur_sigma
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def baseline_for(self, x: Tensor) -> Tensor:
        """The baseline image x' used for ``x``."""
        return make_fill(x, self.baseline, self.blur_sigma, option="baseline")

    def _chunks(self, b: int) -> Iterator[tuple[int, int]]:
        """(start, count) of the path points per forward: ≤ internal_batch_size images, ≥ 1 point."""
        per = max(1, self.internal_batch_size // b)
        n = len(self.alphas)
        for start in range(0, n, per):
            yield start, min(per, n - start)


def _expand(t: Tensor, k: int) -> Tensor:
    """k copies of the batch ``t`` one after the other (the layout Target.select expects)."""
    return t.repeat(k, *([1] * (t.ndim - 1)))


def _path(base: Tensor, diff: Tensor, alphas: Tensor) -> Tensor:
    k = alphas.shape[0]
    pts = base[None] + alphas.view(k, *([1] * base.ndim)) * diff[None]
    return pts.reshape(k * base.shape[0], *base.shape[1:])


@register("layer_integrated_gradients")
class LayerIntegratedGradients(LayerAttributionExplainer, _PathMixin):
    """Layer integrated gradients (Sundararajan et al., 2017, applied to a hidden layer as Captum's
    ``LayerIntegratedGradients``): IG of the target in the activation space of ``target_layer``.

    The layer's output is replaced along the straight path from A' (activations of the baseline
    image, ``baseline`` as in ``integrated_gradients``) to A, Riemann ``method`` with ``steps``
    points; attribution (A − A') · Σ_k w_k ∂y/∂A. Σ over all units ≈ f(x) − f(x').

    Args:
        model: the classifier (returns logits [B, num_classes]).
        target_layer: dotted module name; None: the backbone's ``default_target_layer``.
        steps: path points.
        method: Riemann rule: ``riemann_left`` | ``riemann_right`` | ``riemann_middle`` | ``riemann_trapezoid``.
        baseline: the reference image x': a fill (``zero``, ``mean``, ``gray``, ``blur``, ``rise_blur``), a number or a
            tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        internal_batch_size: path points per forward + backward.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, steps: int = 50,
                 method: str = "riemann_middle", baseline: FillLike = "zero", blur_sigma: float | None = None,
                 internal_batch_size: int = 64) -> None:
        super().__init__(model, target_layer)
        self._init_path(steps, method, baseline, blur_sigma, internal_batch_size)

    def _layer_attribution(self, x: Tensor, target: Target) -> Tensor:
        acts, logits = self._acts_and_logits(x)
        target.indices(logits)  # resolves "predicted", checks class indices
        base_tap = _Tap(self.target_layer, stop=True)
        self._forward(self.baseline_for(x), base_tap, grad_before=False)
        assert base_tap.output is not None
        base = base_tap.output
        diff = acts - base
        b = x.shape[0]
        alphas = torch.tensor(self.alphas, device=x.device, dtype=acts.dtype)
        weights = torch.tensor(self.weights, device=x.device, dtype=acts.dtype)
        total = torch.zeros_like(acts)
        for start, k in self._chunks(b):
            path = _path(base, diff, alphas[start:start + k]).requires_grad_(True)
            tap = _Tap(self.target_layer, replace=path)
            # the layers before target_layer run without a graph: their output is replaced anyway
            out = self._forward(_expand(x, k), tap, grad_before=False)
            assert out is not None
            (grad,) = torch.autograd.grad(target.select(out).sum(), path)
            total += torch.einsum("k,kb...->b...", weights[start:start + k], grad.view(k, *acts.shape))
        return diff * total


@register("layer_conductance")
class LayerConductance(LayerAttributionExplainer, _PathMixin):
    """Layer conductance (Dhamdhere, Sundararajan & Yan, 2018, "How Important Is a Neuron?"): how
    much of the input's integrated gradient flows through each unit of ``target_layer``.

    Σ_k ∂y/∂A(x_k) · (A(x_{k+1}) − A(x_k)) over ``steps + 1`` points x_k = x' + α_k (x − x') of
    ``method`` — Captum's ``LayerConductance`` discretisation. The default ``riemann_trapezoid``
    puts the points from x' to x, so Σ over units ≈ f(x) − f(x').

    Args:
        model: the classifier (returns logits [B, num_classes]).
        target_layer: dotted module name; None: the backbone's ``default_target_layer``.
        steps: path points.
        method: Riemann rule: ``riemann_left`` | ``riemann_right`` | ``riemann_middle`` | ``riemann_trapezoid``.
        baseline: the reference image x': a fill (``zero``, ``mean``, ``gray``, ``blur``, ``rise_blur``), a number or a
            tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        internal_batch_size: path points per forward + backward.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None, steps: int = 50,
                 method: str = "riemann_trapezoid", baseline: FillLike = "zero", blur_sigma: float | None = None,
                 internal_batch_size: int = 64) -> None:
        super().__init__(model, target_layer)
        self._init_path(steps, method, baseline, blur_sigma, internal_batch_size, points=1)

    def _layer_attribution(self, x: Tensor, target: Target) -> Tensor:
        target.resolve(self._logits, x)
        base = self.baseline_for(x)
        diff = x - base
        b = x.shape[0]
        alphas = torch.tensor(self.alphas, device=x.device, dtype=x.dtype)
        total: Tensor | None = None
        prev: tuple[Tensor, Tensor] | None = None  # (gradient, activation) of the last point so far
        for start, k in self._chunks(b):
            tap = _Tap(self.target_layer, leaf=True)
            # no graph before the layer: the gradient is taken w.r.t. the layer's output
            out = self._forward(_path(base, diff, alphas[start:start + k]), tap, grad_before=False)
            assert out is not None and tap.output is not None
            (grad,) = torch.autograd.grad(target.select(out).sum(), tap.output)
            acts = tap.output.detach().view(k, b, *tap.output.shape[1:])
            grad = grad.view(k, b, *grad.shape[1:])
            if prev is not None:
                acts, grad = torch.cat([prev[1][None], acts]), torch.cat([prev[0][None], grad])
            part = (grad[:-1] * (acts[1:] - acts[:-1])).sum(0)
            total = part if total is None else total + part
            prev = (grad[-1], acts[-1])
        assert total is not None
        return total


@register("layer_gradient_x_activation")
class LayerGradientXActivation(LayerAttributionExplainer):
    """Layer gradient × activation: ∂y/∂A · A for ``target_layer`` (Captum's
    ``LayerGradientXActivation``; the layer analogue of gradient × input, Shrikumar et al., 2016).
    One forward and one backward down to the layer.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        target_layer: dotted module name; None: the backbone's ``default_target_layer``.
    """

    def __init__(self, model: nn.Module, target_layer: str | None = None) -> None:
        super().__init__(model, target_layer)

    def _layer_attribution(self, x: Tensor, target: Target) -> Tensor:
        tap = _Tap(self.target_layer, leaf=True)
        out = self._forward(x, tap, grad_before=False)
        assert out is not None and tap.output is not None
        (grad,) = torch.autograd.grad(target.select(out).sum(), tap.output)
        return grad * tap.output.detach()


# -- neuron attribution --------------------------------------------------------------------------


class NeuronExplainer(_LayerBase):
    """Base of the neuron methods: one unit of ``target_layer`` (``neuron``) explained w.r.t. the input.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        target_layer: dotted module name; None: the backbone's ``default_target_layer``.
        neuron: the unit, e.g. ``(channel, y, x)``; None: each image's most active unit.
    """

    default_reduce: str | None = "max_abs"

    def __init__(self, model: nn.Module, target_layer: str | None = None, neuron: NeuronLike = None) -> None:
        super().__init__(model, target_layer)
        self.neuron = _check_neuron(neuron)

    def neuron_indices(self, acts: Tensor) -> Tensor:
        """Flat index [B] of the explained unit in each sample's layer output ``acts`` [B,...]."""
        unit_shape = tuple(acts.shape[1:])
        if self.neuron is None:
            return acts.detach().flatten(1).argmax(1)
        if len(self.neuron) != len(unit_shape):
            what = "(channel, y, x)" if len(unit_shape) == 3 else f"{len(unit_shape)} indices"
            raise ConfigError(
                f"neuron={self.neuron} has {len(self.neuron)} indices but target_layer {self.target_layer!r} "
                f"outputs [B,{','.join(map(str, unit_shape))}]: one unit is {what}.")
        if any(not 0 <= i < n for i, n in zip(self.neuron, unit_shape, strict=True)):
            raise ConfigError(
                f"neuron={self.neuron} is out of range for target_layer {self.target_layer!r}, whose output per "
                f"sample has shape {unit_shape} (valid: 0..n-1 in each dimension).")
        flat = 0
        for i, n in zip(self.neuron, unit_shape, strict=True):
            flat = flat * n + i
        return torch.full((acts.shape[0],), flat, dtype=torch.long, device=acts.device)

    @staticmethod
    def _unit(acts: Tensor, idx: Tensor) -> Tensor:
        k = acts.shape[0] // idx.shape[0]
        return acts.flatten(1).gather(1, _expand(idx, k)[:, None]).squeeze(1)


@register("neuron_gradient")
class NeuronGradient(NeuronExplainer):
    """Gradient of one unit w.r.t. the input, ∂A_u/∂x (Captum's ``NeuronGradient``; saliency,
    Simonyan et al., 2014, of a hidden unit). ``reduce="auto"`` takes max |·| over channels."""

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        x = x.detach().requires_grad_(True)
        tap = _Tap(self.target_layer, grad_after=False)  # the head runs without a graph
        logits = self._forward(x, tap, grad_before=True)
        assert logits is not None and tap.output is not None
        target.indices(logits)
        acts = tap.output
        if not acts.requires_grad:  # e.g. a layer that ignores its input
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(self._unit(acts, self.neuron_indices(acts)).sum(), x, allow_unused=True)
        return torch.zeros_like(x) if grad is None else grad


@register("neuron_integrated_gradients")
class NeuronIntegratedGradients(NeuronExplainer, _PathMixin):
    """Integrated gradients (Sundararajan et al., 2017) of one unit A_u w.r.t. the input (Captum's
    ``NeuronIntegratedGradients``): (x − x') · Σ_k w_k ∂A_u/∂x(x' + α_k (x − x')). Each path
    forward stops at ``target_layer``. ``reduce="auto"`` sums channels (Σ ≈ A_u(x) − A_u(x')).

    Args:
        model: the classifier (returns logits [B, num_classes]).
        target_layer: dotted module name; None: the backbone's ``default_target_layer``.
        neuron: the unit, e.g. ``(channel, y, x)``; None: each image's most active unit.
        steps: path points.
        method: Riemann rule: ``riemann_left`` | ``riemann_right`` | ``riemann_middle`` | ``riemann_trapezoid``.
        baseline: the reference image x': a fill (``zero``, ``mean``, ``gray``, ``blur``, ``rise_blur``), a number or a
            tensor.
        blur_sigma: σ of a ``blur`` baseline in px (None: its default for the image size).
        internal_batch_size: path points per forward + backward.
    """

    default_reduce = "sum"
    signed = True

    def __init__(self, model: nn.Module, target_layer: str | None = None, neuron: NeuronLike = None,
                 steps: int = 50, method: str = "riemann_middle", baseline: FillLike = "zero",
                 blur_sigma: float | None = None, internal_batch_size: int = 64) -> None:
        super().__init__(model, target_layer, neuron)
        self._init_path(steps, method, baseline, blur_sigma, internal_batch_size)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        tap = _Tap(self.target_layer, grad_after=False)
        logits = self._forward(x, tap, grad_before=False)
        assert logits is not None and tap.output is not None
        target.indices(logits)
        idx = self.neuron_indices(tap.output)
        base = self.baseline_for(x)
        diff = x - base
        alphas = torch.tensor(self.alphas, device=x.device, dtype=x.dtype)
        weights = torch.tensor(self.weights, device=x.device, dtype=x.dtype)
        total = torch.zeros_like(x)
        for start, k in self._chunks(x.shape[0]):
            path = _path(base, diff, alphas[start:start + k]).requires_grad_(True)
            tap = _Tap(self.target_layer, stop=True)
            self._forward(path, tap, grad_before=True)
            assert tap.output is not None
            unit = self._unit(tap.output, idx)
            if not unit.requires_grad:
                continue
            (grad,) = torch.autograd.grad(unit.sum(), path, allow_unused=True)
            if grad is not None:
                total += torch.einsum("k,kb...->b...", weights[start:start + k], grad.view(k, *x.shape))
        return diff * total
