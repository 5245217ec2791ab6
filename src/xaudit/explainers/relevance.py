"""Relevance propagation: LRP with rule composites and canonizers, deep Taylor decomposition,
DeepLIFT (rescale rule) and DeepSHAP.

- ``lrp``: layer-wise relevance propagation (Bach et al., 2015, "On pixel-wise explanations for
  non-linear classifier decisions by layer-wise relevance propagation"; Montavon et al., 2019,
  "Layer-wise relevance propagation: an overview") with the rules ε, γ, α-β, z⁺, z^B, flat and w²
  mapped onto layer types by a composite (Kohlbrenner et al., 2020, "Towards best practice in
  explaining neural network decisions with LRP").
- ``deep_taylor``: deep Taylor decomposition (Montavon et al., 2017, "Explaining nonlinear
  classification decisions with deep Taylor decomposition"): z⁺ in every layer, z^B at the input.
- ``deeplift``: DeepLIFT with the rescale rule (Shrikumar et al., 2017, "Learning important
  features through propagating activation differences").
- ``deepshap``: DeepLIFT averaged over a baseline distribution (Lundberg & Lee, 2017, "A unified
  approach to interpreting model predictions").

**How LRP runs on autograd.** Each rule is "gradient × input with a modified gradient"
(Montavon et al., 2019, §10.2): a layer's forward returns its normal output z, but its backward
maps ``g ↦ ρ(W)ᵀ(g ⊙ z / (z_ρ + ε))`` with ``z_ρ = ρ(W)x``. Then ``x ⊙ ∂y/∂x`` of the target
logit y is exactly the rule's redistribution ``R_i = Σ_k x_i ρ(w_ik) R_k / (ε + Σ_j x_j ρ(w_jk))``
with ``R_k = z_k ∂y/∂z_k``, and relevance starts as y itself. ReLU, max-pooling, average pooling,
sums, flatten and concatenation need no rule: their plain gradient × input already is the
proportional redistribution (average pooling and skip sums get zennit's stabilised ``norm`` rule
by default). One forward and one backward run; the model's own graph is never re-implemented
layer by layer. Rules that replace the input (flat, w², z^B) give relevance to auxiliary leaf
tensors, whose ``leaf ⊙ gradient`` is the input relevance.

**Side effects.** Parameters and buffers are never written (merged BatchNorm weights are new
tensors); layers are switched to their rule by instance-level ``forward`` overrides that are
removed in ``finally`` (see :mod:`xaudit.explainers.canonizers`); DeepLIFT changes nonlinearities
through a ``TorchFunctionMode`` that is active for one forward only.
"""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode

from xaudit.explainers.base import Explainer, Target, UnsupportedModelError, check_positive_int
from xaudit.explainers.canonizers import (
    CANONIZERS,
    CONV_TRANSPOSE_TYPES,
    CONV_TYPES,
    Affine,
    AffineCache,
    MergeCache,
    forward_overrides,
    identity_forward,
    module_forward,
    resnet_block_forward,
)
from xaudit.explainers.fills import FillLike, make_fill
from xaudit.explainers.gradient import _RELU_IN_PLACE, _RELU_OUT_OF_PLACE
from xaudit.explainers.registry import register
from xaudit.utils.errors import ConfigError, unknown_choice

# -- the one autograd primitive: keep a forward value, choose its gradient ---------------------


class _RerouteGrad(torch.autograd.Function):
    """Forward: ``value`` itself (no copy). Backward: ``g·head_scale`` into ``value``'s own graph
    (when given) and ``g·scale_i`` into each ``source_i``.

    ``value`` is marked dirty, so the output is ``value`` with this node as its history; it must be
    a fresh tensor (not a view, not saved by the node that made it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
            ctx: Any, value: Tensor, head_scale: Tensor | None, n: int, *rest: Tensor) -> Tensor:
        ctx.mark_dirty(value)
        ctx.n = n
        ctx.has_head = head_scale is not None
        ctx.save_for_backward(*((head_scale,) if head_scale is not None else ()), *rest[n:])
        return value

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        head = g * saved[0] if ctx.has_head else None
        scales = saved[1:] if ctx.has_head else saved
        return (head, None, None, *(g * s for s in scales), *(None,) * ctx.n)


def reroute(value: Tensor, head_scale: Tensor | None = None, sources: Sequence[Tensor] = (),
            scales: Sequence[Tensor] = ()) -> Tensor:
    """``value`` in the forward; in the backward ``g·head_scale`` to ``value``'s graph and
    ``g·scales[i]`` to ``sources[i]`` (the z-rule trick without the rounding of ``z_ρ·(z/z_ρ)``)."""
    return _RerouteGrad.apply(value, head_scale, len(sources), *sources, *scales)


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + ε·sign(z)`` with sign(0) = +1 (zennit's stabiliser), so ``z/stabilize(z)`` is finite."""
    return torch.where(z >= 0, z + eps, z - eps)


def _nonnegative(x: Tensor) -> bool:
    # one device sync per layer; it saves the second half of every rule that splits x into x⁺ + x⁻
    return not bool((x < 0).any())


# -- rules ------------------------------------------------------------------------------------


@dataclass
class LayerCall:
    """One call of a layer, as a rule sees it."""

    name: str
    module: nn.Module
    x: Tensor
    affine: Affine | None  # the layer as an affine map (BatchNorm merged in), None for other layers
    forward: Callable[[Tensor], Tensor]  # the layer's (merged) forward
    run: LRPRun

    def need_affine(self, rule: Rule) -> Affine:
        if self.affine is None:
            raise UnsupportedModelError(_not_affine_message(rule, self.name, self.module))
        return self.affine


class Rule:
    """How one layer passes the relevance of its outputs to its inputs (see the module docstring)."""

    name: ClassVar[str] = ""
    #: the rule changes weights, so the layer must be affine (Conv, ConvTranspose, Linear, BatchNorm)
    needs_affine: ClassVar[bool] = True

    def __call__(self, call: LayerCall) -> Tensor:
        raise NotImplementedError

    def __repr__(self) -> str:
        params = ", ".join(f"{k}={v!r}" for k, v in vars(self).items())
        return f"{type(self).__name__}({params})"


class Epsilon(Rule):
    """LRP-ε (Bach et al., 2015): ``R_i = Σ_k x_i w_ik R_k / (z_k + ε·sign z_k)``; ε→0 is LRP-0.

    On a non-affine layer it scales the layer's gradient by ``z/(z+ε)`` (the same rule for any
    layer that is linear in its input).
    """

    name = "epsilon"
    needs_affine = False

    def __init__(self, epsilon: float = 1e-6) -> None:
        self.epsilon = float(epsilon)

    def __call__(self, call: LayerCall) -> Tensor:
        # a layer's own node may have saved its output: rescale a copy
        z = call.affine(call.x) if call.affine is not None else call.forward(call.x).clone()
        return self.rescale(z)

    def rescale(self, z: Tensor) -> Tensor:
        """``z`` with its gradient multiplied by ``z/(z+ε)`` (ε rule on a sum)."""
        with torch.no_grad():
            scale = z / stabilize(z, self.epsilon)
        return reroute(z, scale)


class Norm(Epsilon):
    """Proportional redistribution ``R_i = x_i R / (Σ_j x_j + ε)`` (zennit's ``Norm``): the default
    for average pooling and skip sums; the ε rule without weights, ε only as stabiliser."""

    name = "norm"

    def __init__(self, stabilizer: float = 1e-6) -> None:
        super().__init__(epsilon=stabilizer)

    def __call__(self, call: LayerCall) -> Tensor:
        z = call.forward(call.x)
        if z is call.x:
            return z
        avgpool = isinstance(call.module, AVGPOOL_TYPES)  # fresh outputs, not saved by their node
        return self.rescale(z if avgpool else z.clone())


def _pos(a: Affine) -> tuple[Tensor, Tensor | None]:
    """``(w⁺, b⁺)`` of a layer, computed once per weight version."""
    return a.derive("pos", lambda: (a.weight.clamp(min=0), a.bias.clamp(min=0) if a.bias is not None else None))


def _neg(a: Affine) -> tuple[Tensor, Tensor | None]:
    """``(w⁻, b⁻)``."""
    return a.derive("neg", lambda: (a.weight.clamp(max=0), a.bias.clamp(max=0) if a.bias is not None else None))


class ZPlus(Rule):
    """LRP-z⁺ (Montavon et al., 2017): only positive contributions,
    ``R_i = Σ_k (x_i w_ik)⁺ R_k / Σ_j (x_j w_jk)⁺`` (with b⁺ in the denominator, as zennit).

    Conserves relevance whenever the layer has no positive bias: every neuron with relevance has
    z_k > 0, hence a positive contribution. Cost: one extra forward conv per layer.
    """

    name = "zplus"

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def __call__(self, call: LayerCall) -> Tensor:
        a, x = call.need_affine(self), call.x
        with torch.no_grad():
            z = a(x)
        wp, bp = _pos(a)
        if _nonnegative(x):
            zp = a(x, wp, bp)
        else:
            zp = a(x.clamp(min=0), wp, bp) + a(x.clamp(max=0), _neg(a)[0], None)
        with torch.no_grad():
            scale = z / (zp + self.stabilizer)  # z⁺ ≥ 0, so this is stabilize(z⁺)
        return reroute(z, None, (zp,), (scale,))


class AlphaBeta(Rule):
    """LRP-αβ (Bach et al., 2015): ``R_i = Σ_k (α (x_i w_ik)⁺/z_k⁺ − β (x_i w_ik)⁻/z_k⁻) R_k`` with
    α − β = 1 (``alpha2_beta1``, ``alpha1_beta0`` = z⁺). Conserves only where both z⁺ and z⁻ are
    non-zero."""

    name = "alpha_beta"

    def __init__(self, alpha: float = 2.0, beta: float = 1.0, stabilizer: float = 1e-6) -> None:
        if alpha < 0 or beta < 0 or not math.isclose(alpha - beta, 1.0):
            raise ConfigError(f"LRP alpha-beta needs alpha ≥ 0, beta ≥ 0 and alpha − beta = 1; "
                              f"got alpha={alpha}, beta={beta}.")
        self.alpha, self.beta, self.stabilizer = float(alpha), float(beta), float(stabilizer)

    def __call__(self, call: LayerCall) -> Tensor:
        a, x = call.need_affine(self), call.x
        with torch.no_grad():
            z = a(x)
        (wp, bp), (wn, bn) = _pos(a), _neg(a)
        if _nonnegative(x):
            zp = a(x, wp, bp)
            zn = a(x, wn, bn) if self.beta else None
        else:
            xp, xn = x.clamp(min=0), x.clamp(max=0)
            zp = a(xp, wp, bp) + a(xn, wn, None)
            zn = a(xp, wn, bn) + a(xn, wp, None) if self.beta else None
        with torch.no_grad():
            sources, scales = [zp], [self.alpha * z / stabilize(zp, self.stabilizer)]
            if zn is not None:
                sources.append(zn)
                scales.append(-self.beta * z / stabilize(zn, self.stabilizer))
        return reroute(z, None, sources, scales)


class Gamma(Rule):
    """LRP-γ (Montavon et al., 2019), generalised to signed inputs as in zennit: positive outputs
    use the weights ``w + γw⁺`` on x⁺ (``w + γw⁻`` on x⁻), negative outputs the opposite pair.
    On non-negative inputs it costs two forward convs (z and z with w⁺)."""

    name = "gamma"

    def __init__(self, gamma: float = 0.25, stabilizer: float = 1e-6) -> None:
        if gamma < 0:
            raise ConfigError(f"LRP gamma must be ≥ 0; got {gamma}.")
        self.gamma, self.stabilizer = float(gamma), float(stabilizer)

    def __call__(self, call: LayerCall) -> Tensor:
        a, x, g, eps = call.need_affine(self), call.x, self.gamma, self.stabilizer
        (wp, bp), (wn, bn) = _pos(a), _neg(a)
        if _nonnegative(x):
            # z_up = z + γ(p + b⁺), z_down = z + γ(z − p) − γb⁺ with p = x·w⁺: the backward
            # (w+γw⁺)ᵀu + (w+γw⁻)ᵀv is regrouped as wᵀ(u + (1+γ)v) + γ(w⁺)ᵀ(u − v)
            z = a(x)
            p = a(x, wp, None)
            with torch.no_grad():
                gbp = g * bp if bp is not None else None
                z_up = a.add_bias(z + g * p, gbp)
                z_down = a.add_bias(z + g * (z - p), -gbp if gbp is not None else None)
                u = torch.where(z > 0, z / stabilize(z_up, eps), 0)
                v = torch.where(z < 0, z / stabilize(z_down, eps), 0)
            return reroute(z, u + (1 + g) * v, (p,), (g * (u - v),))
        with torch.no_grad():
            z = a(x)
        w_up, w_down, b_up, b_down = a.derive(f"gamma{g}", lambda: (
            a.weight + g * wp, a.weight + g * wn,
            a.bias + g * bp if a.bias is not None and bp is not None else None,
            a.bias + g * bn if a.bias is not None and bn is not None else None))
        xp, xn = x.clamp(min=0), x.clamp(max=0)
        z_up = a(xp, w_up, b_up) + a(xn, w_down, None)
        z_down = a(xp, w_down, b_down) + a(xn, w_up, None)
        with torch.no_grad():
            s_up = torch.where(z > 0, z / stabilize(z_up, eps), 0)
            s_down = torch.where(z < 0, z / stabilize(z_down, eps), 0)
        return reroute(z, None, (z_up, z_down), (s_up, s_down))


class InputRule(Rule):
    """A rule for the first layer that gives relevance to the layer's input directly."""

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def _spread(self, call: LayerCall, weight: Tensor, bias: Tensor | None) -> Tensor:
        """``R_i = Σ_k ρ(w_ik) R_k / Σ_j ρ(w_jk)`` for an input of ones (flat, w²)."""
        a, x = call.need_affine(self), call.x
        with torch.no_grad():
            z = a(x)
        ones = call.run.input_leaf(call, torch.ones_like(x))
        q = a(ones, weight, bias)
        with torch.no_grad():
            scale = z / (q + self.stabilizer)  # q ≥ 0 (ones times 1 or w²)
        return reroute(z, None, (q,), (scale,))


class Flat(InputRule):
    """LRP-flat (Lapuschkin et al., 2019): relevance spread uniformly over each receptive field."""

    name = "flat"

    def __call__(self, call: LayerCall) -> Tensor:
        a = call.need_affine(self)
        return self._spread(call, a.derive("ones", lambda: torch.ones_like(a.weight)), None)


class WSquare(InputRule):
    """LRP-w² (Montavon et al., 2017): ``R_i = Σ_k w_ik² R_k / Σ_j w_jk²`` (b² joins the
    denominator, as zennit) — for unbounded inputs."""

    name = "w_square"

    def __call__(self, call: LayerCall) -> Tensor:
        a = call.need_affine(self)
        w2, b2 = a.derive("square", lambda: (a.weight**2, a.bias**2 if a.bias is not None else None))
        return self._spread(call, w2, b2)


BoundLike = float | int | Sequence[float] | Tensor | None


class ZBox(InputRule):
    """LRP-z^B (Montavon et al., 2017) for inputs bounded by ``low ≤ x ≤ high``:
    ``R_i = Σ_k (x_i w_ik − l_i w_ik⁺ − h_i w_ik⁻) R_k / Σ_j (…)``.

    ``low``/``high``: a number, one value per channel, a tensor broadcastable to x, or None for
    the data range of each image (per-channel min and max over its pixels).
    """

    name = "zbox"

    def __init__(self, low: BoundLike = None, high: BoundLike = None, stabilizer: float = 1e-6) -> None:
        super().__init__(stabilizer)
        self.low, self.high = low, high

    def bounds(self, x: Tensor) -> tuple[Tensor, Tensor]:
        """``(low, high)`` as tensors of x's shape."""
        dims = tuple(range(2, x.ndim)) if x.ndim > 2 else (1,)

        def make(spec: BoundLike, fn: Callable[..., Tensor], which: str) -> Tensor:
            if spec is None:
                t = fn(x.detach(), dim=dims, keepdim=True)
            elif isinstance(spec, Tensor):
                t = spec.to(device=x.device, dtype=x.dtype)
            elif isinstance(spec, numbers.Real):
                t = torch.tensor(float(spec), device=x.device, dtype=x.dtype)
            else:
                vals = [float(v) for v in spec]  # type: ignore[union-attr]
                t = torch.tensor(vals, device=x.device, dtype=x.dtype).view(1, -1, *([1] * (x.ndim - 2)))
            try:
                return torch.broadcast_to(t, x.shape).contiguous()
            except RuntimeError as err:
                raise ConfigError(f"LRP z^B bound {which}={spec!r} does not broadcast to the layer input "
                                  f"{tuple(x.shape)}.") from err

        return make(self.low, torch.amin, "low"), make(self.high, torch.amax, "high")

    def __call__(self, call: LayerCall) -> Tensor:
        a, x = call.need_affine(self), call.x
        low, high = self.bounds(x)
        (wp, bp), (wn, bn) = _pos(a), _neg(a)
        xa = call.run.input_leaf(call, x.detach())
        la = call.run.input_leaf(call, low)
        ha = call.run.input_leaf(call, high)
        z = a(xa)
        zl = a(la, wp, bp)
        zh = a(ha, wn, bn)
        with torch.no_grad():
            scale = z / stabilize(z - zl - zh, self.stabilizer)
        return reroute(z, scale, (zl, zh), (-scale, -scale))


class Pass(Rule):
    """Relevance passes unchanged, ``R_in = R_out`` (zennit's ``Pass``): for element-wise layers
    such as activations and BatchNorm that was not merged."""

    name = "pass"
    needs_affine = False

    def __init__(self, stabilizer: float = 1e-6) -> None:
        self.stabilizer = float(stabilizer)

    def __call__(self, call: LayerCall) -> Tensor:
        x = call.x
        with torch.no_grad():
            y = call.forward(x.clone() if getattr(call.module, "inplace", False) else x)
        if y is x:
            return y
        if y.shape != x.shape:
            raise UnsupportedModelError(
                f"LRP rule 'pass' needs a layer whose output has its input's shape; layer {call.name!r} "
                f"({type(call.module).__name__}) maps {tuple(x.shape)} to {tuple(y.shape)}. Map it to 'epsilon' or "
                "'gradient'.")
        if y._is_view():
            y = y.clone()
        with torch.no_grad():
            scale = y / stabilize(x, self.stabilizer)
        return reroute(y, None, (x,), (scale,))


class Gradient(Rule):
    """No rule: the layer's plain gradient (gradient × input is then its LRP-0 redistribution when
    the layer is positively homogeneous, e.g. ReLU, max-pooling)."""

    name = "gradient"
    needs_affine = False

    def __call__(self, call: LayerCall) -> Tensor:
        return call.forward(call.x)


RULES: dict[str, Callable[..., Rule]] = {
    "epsilon": Epsilon,
    "zplus": ZPlus,
    "alpha2_beta1": lambda stabilizer=1e-6: AlphaBeta(2.0, 1.0, stabilizer),
    "alpha1_beta0": lambda stabilizer=1e-6: AlphaBeta(1.0, 0.0, stabilizer),
    "alpha_beta": AlphaBeta,
    "gamma": Gamma,
    "zbox": ZBox,
    "flat": Flat,
    "w_square": WSquare,
    "pass": Pass,
    "norm": Norm,
    "gradient": Gradient,
}
RuleSpec = str | Rule | Mapping[str, Any]


def make_rule(spec: RuleSpec, defaults: Mapping[str, Any] | None = None) -> Rule:
    """A :class:`Rule` from a name (``"gamma"``), a rule object, or a mapping
    ``{"rule": "gamma", "gamma": 0.5}``; ``defaults`` fill the parameters a name leaves open."""
    if isinstance(spec, Rule):
        return spec
    if isinstance(spec, Mapping):
        params = dict(spec)
        name = params.pop("rule", None)
    else:
        name, params = spec, {}
    if not isinstance(name, str):
        raise ConfigError(f"An LRP rule is a name ({', '.join(RULES)}), a Rule object, or {{'rule': name, ...}}; "
                          f"got {spec!r}.")
    if name not in RULES:
        raise unknown_choice("LRP rule", name, RULES)
    factory = RULES[name]
    accepted = inspect.signature(factory).parameters
    kwargs = {k: v for k, v in (defaults or {}).items() if k in accepted}
    for key in params:
        if key not in accepted:
            raise unknown_choice(f"parameter of LRP rule {name!r}:", key, accepted)
    kwargs.update(params)
    return factory(**kwargs)


# -- composites --------------------------------------------------------------------------------

AVGPOOL_TYPES: tuple[type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                                              nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)
ACTIVATION_TYPES: tuple[type[nn.Module], ...] = (
    nn.ELU, nn.LeakyReLU, nn.PReLU, nn.RReLU, nn.SELU, nn.CELU, nn.GELU, nn.Sigmoid, nn.SiLU, nn.Mish,
    nn.Softplus, nn.Softsign, nn.Tanh, nn.Tanhshrink, nn.Hardtanh, nn.Hardswish, nn.Hardsigmoid, nn.LogSigmoid)
# composite keys that name a family of layer types
GROUPS: dict[str, tuple[type[nn.Module], ...]] = {
    "Convolution": (*CONV_TYPES, *CONV_TRANSPOSE_TYPES),
    "BatchNorm": (_BatchNorm,),
    "AvgPool": AVGPOOL_TYPES,
    "Activation": ACTIVATION_TYPES,
}
# "first": the first Conv/ConvTranspose/Linear layer (in registration order, as zennit);
# "Sum": the skip sums of canonized ResNet blocks
SPECIAL_KEYS: tuple[str, ...] = ("first", "Sum")
FIRST_TYPES: tuple[type[nn.Module], ...] = (*CONV_TYPES, *CONV_TRANSPOSE_TYPES, nn.Linear)

_BASE: dict[str, RuleSpec] = {"Activation": "pass", "AvgPool": "norm", "Sum": "norm", "BatchNorm": "pass"}
COMPOSITES: dict[str, dict[str, RuleSpec]] = {
    # zennit's composites of the same names (Kohlbrenner et al., 2020)
    "epsilon_plus_flat": {**_BASE, "first": "flat", "Convolution": "zplus", "Linear": "epsilon"},
    "epsilon_gamma_box": {**_BASE, "first": "zbox", "Convolution": "gamma", "Linear": "epsilon"},
    "epsilon_alpha2_beta1": {**_BASE, "Convolution": "alpha2_beta1", "Linear": "epsilon"},
    "epsilon_alpha2_beta1_flat": {**_BASE, "first": "flat", "Convolution": "alpha2_beta1", "Linear": "epsilon"},
    "epsilon_plus": {**_BASE, "Convolution": "zplus", "Linear": "epsilon"},
    "epsilon": {**_BASE, "Convolution": "epsilon", "Linear": "epsilon"},
    # deep Taylor decomposition: z⁺ for every ReLU layer, z^B for the (bounded) input layer
    "deep_taylor": {**_BASE, "first": "zbox", "Convolution": "zplus", "Linear": "zplus"},
}


def _is_layer(module: nn.Module) -> bool:
    """Rules go on layers: modules without children, or with parameters of their own."""
    return next(module.children(), None) is None or next(module.parameters(recurse=False), None) is not None


def _own_params(module: nn.Module) -> bool:
    return next(module.parameters(recurse=False), None) is not None


def first_layer_name(model: nn.Module) -> str | None:
    """The first Conv/ConvTranspose/Linear in registration order (what ``"first"`` maps)."""
    return next((n for n, m in model.named_modules() if isinstance(m, FIRST_TYPES)), None)


def _lookup(name: str, module: nn.Module, spec: Mapping[str, Rule], first: str | None) -> Rule | None:
    if name in spec:
        return spec[name]
    if name == first and "first" in spec:
        return spec["first"]
    for cls in type(module).__mro__:
        if cls.__name__ in spec and cls.__name__ not in SPECIAL_KEYS and cls.__name__ not in GROUPS:
            return spec[cls.__name__]
    for group, types in GROUPS.items():
        if group in spec and isinstance(module, types):
            return spec[group]
    return None


def resolve_rules(model: nn.Module, composite: str | Mapping[str, RuleSpec], rules: Mapping[str, RuleSpec] | None,
                  defaults: Mapping[str, Any]) -> tuple[dict[nn.Module, tuple[str, Rule]], Rule | None]:
    """``({layer: (name, rule)}, rule for skip sums)`` of ``composite`` + ``rules`` on ``model``.

    Raises a ConfigError for keys that match nothing and an UnsupportedModelError for a layer
    with parameters that no key covers (BatchNorm excepted: it may still be merged).
    """
    if isinstance(composite, str):
        if composite not in COMPOSITES:
            raise unknown_choice("LRP composite", composite, COMPOSITES, key="explainer.composite")
        merged: dict[str, RuleSpec] = dict(COMPOSITES[composite])
    elif isinstance(composite, Mapping):
        merged = {**_BASE, **{str(k): v for k, v in composite.items()}}
    else:
        raise ConfigError(f"composite must be a name ({', '.join(COMPOSITES)}) or a mapping "
                          f"{{layer type or name: rule}}; got {type(composite).__name__}.")
    merged.update({str(k): v for k, v in (rules or {}).items()})
    names = dict(model.named_modules())
    class_names = {c.__name__ for m in model.modules() for c in type(m).__mro__}
    valid = set(SPECIAL_KEYS) | set(GROUPS) | class_names | set(names)
    for key in merged:
        if key not in valid:
            raise unknown_choice(
                "LRP rule key (a layer type, a group, 'first', 'Sum' or a layer name)", key,
                sorted(set(SPECIAL_KEYS) | set(GROUPS) | {type(m).__name__ for m in model.modules()}))
    built = {key: make_rule(spec, defaults) for key, spec in merged.items()}
    first = first_layer_name(model)
    plan: dict[nn.Module, tuple[str, Rule]] = {}
    for name, module in names.items():
        rule = _lookup(name, module, built, first)
        if name in merged and not _is_layer(module):
            raise ConfigError(f"LRP rules apply to layers; {name!r} ({type(module).__name__}) is a container. "
                              "Name its layers instead.")
        if rule is not None and rule.needs_affine and _is_layer(module) and not isinstance(
                module, (*FIRST_TYPES, _BatchNorm)):
            raise UnsupportedModelError(_not_affine_message(rule, name, module))
        if rule is not None and _is_layer(module) and name:
            plan[module] = (name, rule)
        elif rule is not None and _is_layer(module) and not name and next(model.children(), None) is None:
            plan[module] = (type(module).__name__, rule)
        elif rule is None and _own_params(module) and not isinstance(module, _BatchNorm):
            raise UnsupportedModelError(_no_rule_message(name or type(module).__name__, module))
    return plan, built.get("Sum")


def _not_affine_message(rule: Rule, name: str, module: nn.Module) -> str:
    return (f"LRP rule {rule.name!r} changes weights, but layer {name!r} ({type(module).__name__}) is not a "
            "Conv/Linear layer (nor an eval-mode BatchNorm). Map it to 'epsilon', 'pass', 'norm' or 'gradient': "
            f"rules={{{name!r}: 'pass'}}.")


def _no_rule_message(name: str, module: nn.Module) -> str:
    kind = type(module).__name__
    return (f"LRP has no rule for layer {name!r} ({kind}), which has parameters. Add one: "
            f"create('lrp', model, rules={{{name!r}: 'epsilon'}}) for this layer, or rules={{{kind!r}: 'epsilon'}} "
            f"for every {kind} (rules: {', '.join(RULES)}).")


# -- one LRP run -------------------------------------------------------------------------------


@dataclass
class LRPRun:
    """State of one explanation: auxiliary input leaves and the layer inputs to check for in-place
    changes."""

    leaves: list[Tensor] = field(default_factory=list)
    inputs: list[tuple[str, Tensor, int]] = field(default_factory=list)

    def input_leaf(self, call: LayerCall, t: Tensor) -> Tensor:
        """A leaf whose ``leaf ⊙ gradient`` is relevance of the layer's input (flat, w², z^B)."""
        leaf = t.detach().requires_grad_(True)
        self.leaves.append(leaf)
        return leaf

    def note_input(self, name: str, x: Tensor) -> None:
        self.inputs.append((name, x, x._version))

    def check_inputs(self) -> None:
        """Raise if a layer's input was changed in place after the layer ran (its rule needs it)."""
        for name, x, version in self.inputs:
            if x._version != version:
                raise UnsupportedModelError(
                    f"the input of layer {name!r} was modified in place after the layer ran (e.g. `x += y`, "
                    "`x.mul_(…)` or an in-place activation on a tensor that is used again), which relevance "
                    f"propagation cannot follow. Make that operation out of place (`x = x + y`) in the module that "
                    f"owns {name!r}.")


def _layer_forward(name: str, module: nn.Module, rule: Rule, affine: Affine | None, merged: bool,
                   run: LRPRun) -> Callable[..., Tensor]:
    own = module_forward(module)

    def base(x: Tensor) -> Tensor:
        return affine(x) if merged and affine is not None else own(x)

    def forward(*args: Any, **kwargs: Any) -> Tensor:
        if len(args) != 1 or kwargs or not isinstance(args[0], Tensor):
            raise UnsupportedModelError(
                f"layer {name!r} ({type(module).__name__}) was called with {len(args)} positional and {len(kwargs)} "
                "keyword arguments; LRP rules apply to layers that take one tensor.")
        x = args[0]
        if not x.requires_grad:
            return base(x)
        out = rule(LayerCall(name, module, x, affine, base, run))
        run.note_input(name, x)
        return out

    return forward


def _check_canonizers(canonizers: Sequence[str] | None) -> tuple[str, ...]:
    chosen = tuple(canonizers or ())
    for c in chosen:
        if c not in CANONIZERS:
            raise unknown_choice("canonizer", c, CANONIZERS)
    return chosen


@register("lrp")
class LRP(Explainer):
    """Layer-wise relevance propagation with a rule composite (module docstring: papers, method).

    ``composite`` is a name — ``epsilon_plus_flat`` (default: flat on the first layer, z⁺ on the
    other convolutions, ε on linear layers), ``epsilon_gamma_box``, ``epsilon_alpha2_beta1``,
    ``epsilon_alpha2_beta1_flat``, ``epsilon_plus``, ``epsilon``, ``deep_taylor`` — or a mapping
    ``{key: rule}``. A key is a layer type by class name (``"Conv2d"``, ``"Linear"``, any base class
    works), a group (``"Convolution"``, ``"BatchNorm"``, ``"AvgPool"``, ``"Activation"``), ``"first"``
    (the first Conv/Linear layer), ``"Sum"`` (canonized ResNet skip sums) or a dotted layer name;
    names beat ``"first"``, which beats types, which beat groups. ``rules`` overrides single keys
    of a named composite: ``create("lrp", m, rules={"classifier": "epsilon"})``. A rule is a name
    (``epsilon``, ``zplus``, ``alpha2_beta1``, ``alpha1_beta0``, ``alpha_beta``, ``gamma``, ``zbox``,
    ``flat``, ``w_square``, ``pass``, ``norm``, ``gradient``), a mapping ``{"rule": "gamma",
    "gamma": 0.5}``, or a :class:`Rule` object. Named rules take ``epsilon``, ``gamma``,
    ``stabilizer``, ``low``/``high`` (z^B bounds; None = each image's per-channel value range)
    from here. Mapped dicts get ``Activation: pass, AvgPool: norm, Sum: norm, BatchNorm: pass``
    unless they say otherwise. A layer with parameters that no key covers is an error.

    ``canonizers``: ``merge_batchnorm`` (fold eval-mode BatchNorm into the layer that feeds it)
    and ``resnet_skip`` (torchvision ResNet blocks add their skip out of place through the
    ``Sum`` rule); ``[]`` for none. Relevance starts as the target logit, so with ``reduce=None``
    the per-channel map [B,C,H,W] sums to it up to what biases and ε absorb; the default
    reduction sums channels.
    """

    default_reduce = "sum"

    def __init__(self, model: nn.Module, composite: str | Mapping[str, RuleSpec] = "epsilon_plus_flat",
                 rules: Mapping[str, RuleSpec] | None = None, epsilon: float = 1e-6, gamma: float = 0.25,
                 stabilizer: float = 1e-6, low: BoundLike = None, high: BoundLike = None,
                 canonizers: Sequence[str] | None = CANONIZERS) -> None:
        super().__init__(model)
        self.composite = composite
        self.canonizers = _check_canonizers(canonizers)
        defaults = {"epsilon": epsilon, "gamma": gamma, "stabilizer": stabilizer, "low": low, "high": high}
        self.plan, self.sum_rule = resolve_rules(model, composite, rules, defaults)
        if self.sum_rule is not None and not isinstance(self.sum_rule, Epsilon | Gradient):
            raise ConfigError(f"the 'Sum' rule must be 'norm', 'epsilon' or 'gradient'; got {self.sum_rule.name!r}.")
        self._merges = MergeCache()
        self._affines = AffineCache()

    def rules(self) -> dict[str, Rule]:
        """``{layer name: rule}`` as applied (BatchNorms that get merged are skipped at run time)."""
        return {name: rule for name, rule in self.plan.values()}

    def _add(self, a: Tensor, b: Tensor) -> Tensor:
        s = a + b
        return self.sum_rule.rescale(s) if isinstance(self.sum_rule, Epsilon) else s

    def _overrides(self, x: Tensor, run: LRPRun) -> dict[nn.Module, Callable[..., Any]]:
        model = self.model
        merges = self._merges.get(model, lambda: model(x)) if "merge_batchnorm" in self.canonizers else {}
        merged_bns = {model.get_submodule(bn): layer for layer, bn in merges.items()}
        merged_into = {model.get_submodule(layer): model.get_submodule(bn) for layer, bn in merges.items()}
        overrides: dict[nn.Module, Callable[..., Any]] = {}
        for module, (name, rule) in self.plan.items():
            if module in merged_bns:
                overrides[module] = identity_forward
                continue
            bn = merged_into.get(module)
            affine = self._affines.get(module, bn)  # type: ignore[arg-type]
            if rule.needs_affine and affine is None:
                raise UnsupportedModelError(
                    f"LRP rule {rule.name!r} on layer {name!r} ({type(module).__name__}) changes weights, but a "
                    "BatchNorm in train mode (batch statistics) is no affine layer. Explain the model in eval mode, "
                    f"or map it to 'pass': rules={{{name!r}: 'pass'}}.")
            overrides[module] = _layer_forward(name, module, rule, affine, bn is not None, run)
        for module in model.modules():
            if isinstance(module, _BatchNorm) and module not in self.plan and module not in merged_bns:
                name = next(n for n, m in model.named_modules() if m is module)
                raise UnsupportedModelError(_no_rule_message(name, module))
        if "resnet_skip" in self.canonizers:
            for module in model.modules():
                fwd = resnet_block_forward(module, self._add)
                if fwd is not None:
                    overrides[module] = fwd
        return overrides

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        run = LRPRun()
        xin = x.detach().requires_grad_(True)
        with forward_overrides(self._overrides(x, run)):
            # a clone, so an in-place op on the model's input inside forward is legal
            logits = self._logits(xin.clone())
            run.check_inputs()
            leaves = [xin, *run.leaves]
            try:
                grads = torch.autograd.grad(target.select(logits).sum(), leaves, allow_unused=True)
            except RuntimeError as err:
                if "inplace" in str(err):
                    raise UnsupportedModelError(
                        "the model changes a tensor in place that relevance propagation needs in its backward pass "
                        f"({err}). Make in-place operations in the model's forward out of place.") from err
                raise
        relevance = xin.detach() * grads[0] if grads[0] is not None else torch.zeros_like(x)
        for leaf, grad in zip(run.leaves, grads[1:]):
            if grad is None:
                continue
            if leaf.numel() != x.numel():
                raise UnsupportedModelError(
                    f"an input-layer rule (flat, w_square, zbox) was applied to a layer whose input has shape "
                    f"{tuple(leaf.shape)}, not the model input's {tuple(x.shape)} (or a reshape of it); map that "
                    "layer ('first') to an input-multiplying rule such as 'epsilon' or 'zplus'.")
            # the first layer sees the input itself or a flattened view of it (Flatten → Linear)
            relevance = relevance + (leaf.detach() * grad).reshape(x.shape)
        return relevance


@register("deep_taylor")
class DeepTaylor(LRP):
    """Deep Taylor decomposition (Montavon et al., 2017): LRP with z⁺ in every hidden Conv/Linear
    layer (the DTD rule for ReLU layers) and, at the input, z^B for inputs bounded by
    ``low``/``high`` (None: each image's per-channel value range), or ``w_square`` for unbounded
    inputs, or ``flat``. z⁺ conserves relevance through bias-free ReLU layers; the relevance of a
    target whose logit is ≤ 0 cannot be explained by positive contributions, so its map is empty.
    """

    def __init__(self, model: nn.Module, low: BoundLike = None, high: BoundLike = None, input_rule: str = "zbox",
                 stabilizer: float = 1e-6, canonizers: Sequence[str] | None = CANONIZERS) -> None:
        if input_rule not in ("zbox", "w_square", "flat"):
            raise unknown_choice("deep_taylor input_rule", input_rule, ("zbox", "w_square", "flat"))
        super().__init__(model, composite="deep_taylor", rules={"first": input_rule}, stabilizer=stabilizer,
                         low=low, high=high, canonizers=canonizers)


# -- DeepLIFT ----------------------------------------------------------------------------------

# element-wise nonlinearities caught in any form (module, functional, method, in place):
# function -> index of its `inplace` argument (None: no such argument)
_ACTIVATIONS: dict[Any, int | None] = {
    **dict.fromkeys(_RELU_OUT_OF_PLACE, None), F.relu: 1,
    F.elu: 2, F.leaky_relu: 2, F.relu6: 1, F.hardtanh: 3, F.silu: 1, F.mish: 1, F.hardswish: 1, F.hardsigmoid: 1,
    F.selu: 1, F.celu: 2, F.gelu: None, F.softplus: None,
    torch.sigmoid: None, Tensor.sigmoid: None, F.sigmoid: None, torch.tanh: None, Tensor.tanh: None, F.tanh: None,
}
_ACTIVATIONS_IN_PLACE = {*_RELU_IN_PLACE, F.elu_, F.leaky_relu_, F.hardtanh_, F.celu_, F.selu_,
                         Tensor.sigmoid_, Tensor.tanh_, torch.sigmoid_, torch.tanh_}
_MAX_POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_RELUS = _RELU_OUT_OF_PLACE | _RELU_IN_PLACE | {F.relu}


class _InPlaceValue(torch.autograd.Function):
    """``x`` overwritten with ``y`` (the model asked for an in-place op); backward ``g·m``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, m: Tensor) -> Tensor:  # type: ignore[override]
        x.copy_(y)
        ctx.mark_dirty(x)
        ctx.save_for_backward(m)
        return x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (m,) = ctx.saved_tensors
        return g * m, None, None


def _scatter(v: Tensor, idx: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``v`` into the max-pool input positions ``idx`` (accumulates where windows overlap)."""
    out = v.new_zeros(shape).flatten(2)
    out.scatter_add_(2, idx.flatten(2), v.flatten(2))
    return out.view(shape)


class _DeepLiftMaxPool(torch.autograd.Function):
    """DeepLIFT rescale rule for max-pooling, as Captum: the output difference is split between
    the input's arg-max (``max(y, y₀) − y₀``) and the reference's (``y − max(y, y₀)``), divided by
    Δx; where |Δx| < eps the plain max-pool gradient is used."""

    @staticmethod
    def forward(  # type: ignore[override]
            ctx: Any, value: Tensor, x: Tensor, a: Tensor, c: Tensor, idx: Tensor, idx0: Tensor, dx: Tensor,
            eps: float) -> Tensor:
        ctx.mark_dirty(value)
        ctx.save_for_backward(a, c, idx, idx0, dx)
        ctx.eps = eps
        return value

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, c, idx, idx0, dx = ctx.saved_tensors
        u = _scatter(g * a, idx, dx.shape) + _scatter(g * c, idx0, dx.shape)
        plain = _scatter(g, idx, dx.shape)
        small = dx.abs() < ctx.eps
        return None, torch.where(small, plain, u / torch.where(small, 1, dx)), None, None, None, None, None, None


def _expand_ref(t: Tensor, rows: int) -> Tensor:
    """Reference activations [R,…] for ``rows`` main rows laid out as R groups of rows/R."""
    r = t.shape[0]
    if r == rows:
        return t
    if r == 1:
        return t.expand(rows, *t.shape[1:])
    return t.unsqueeze(1).expand(r, rows // r, *t.shape[1:]).reshape(rows, *t.shape[1:])


def _swap_input(args: tuple, kwargs: dict, x: Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "input": x}


class _DeepLiftMode(TorchFunctionMode):
    """Record the reference forward (``refs is None``) or replay it with the rescale rule.

    Nonlinearities are matched by call order, so the model must run the same operations for
    the input and for the reference.
    """

    def __init__(self, eps: float, refs: list[tuple] | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.recording = refs is None
        self.refs: list[tuple] = [] if refs is None else refs
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _MAX_POOLS:
            bound = dict(zip(_POOL_ARGS, args)) | kwargs
            if not bound.get("return_indices", False) and isinstance(bound.get("input"), Tensor):
                return self._pool(func, bound)
        elif func in _ACTIVATIONS or func in _ACTIVATIONS_IN_PLACE:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                return self._activation(func, args, kwargs, x)
        return func(*args, **kwargs)

    def _next_ref(self, kind: str, shape: torch.Size) -> tuple:
        if self.calls >= len(self.refs) or self.refs[self.calls][0] != kind:
            raise UnsupportedModelError(
                "DeepLIFT: the model ran different nonlinearities for the input than for the baseline "
                "(data-dependent control flow); the rescale rule needs the same computation for both.")
        ref = self.refs[self.calls]
        self.calls += 1
        rows, r = shape[0], ref[1].shape[0]
        if tuple(ref[1].shape[1:]) != tuple(shape[1:]) or rows % r:
            raise UnsupportedModelError(f"DeepLIFT: a {kind} input has shape {tuple(shape)} for the input but "
                                        f"{tuple(ref[1].shape)} for the baseline.")
        return ref

    def _activation(self, func: Any, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
        pos = _ACTIVATIONS.get(func)
        flag = kwargs.get("inplace", args[pos] if pos is not None and len(args) > pos else False)
        inplace = func in _ACTIVATIONS_IN_PLACE or bool(flag)
        if self.recording:
            x0 = x.detach().clone()
            y = func(*args, **kwargs)
            self.refs.append(("activation", x0, y.detach().clone()))
            return y
        _, x0, y0 = self._next_ref("activation", x.shape)
        if not x.requires_grad:
            return func(*args, **kwargs)
        with torch.no_grad():
            xd = x.detach().clone() if inplace else x.detach()
            a, k = _swap_input(args, kwargs, xd)
            y = func(*a, **k)
            if y is xd and not inplace:
                y = y.clone()
            rows = x.shape[0]
            dx = x.detach() - _expand_ref(x0, rows)
            dy = y - _expand_ref(y0, rows)
        slope = self._slope(func, args, kwargs, x, inplace)
        with torch.no_grad():
            small = dx.abs() < self.eps
            m = torch.where(small, slope, dy / torch.where(small, 1, dx))
        if inplace and not (x.is_leaf and x.requires_grad):
            return _InPlaceValue.apply(x, y, m)
        return reroute(y, None, (x,), (m,))

    @staticmethod
    def _slope(func: Any, args: tuple, kwargs: dict, x: Tensor, inplace: bool) -> Tensor:
        """The plain derivative at x (used where Δx ≈ 0, as Captum)."""
        if func in _RELUS:
            return (x.detach() > 0).to(x.dtype)
        with torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            inp = leaf.clone() if inplace else leaf
            a, k = _swap_input(args, kwargs, inp)
            (d,) = torch.autograd.grad(func(*a, **k).sum(), leaf)
        return d

    def _pool(self, func: Any, bound: dict) -> Tensor:
        x: Tensor = bound["input"]
        opts = {k: bound[k] for k in _POOL_ARGS[1:6] if k in bound}
        if self.recording:
            y, idx = func(x, **opts, return_indices=True)
            self.refs.append(("max_pool", x.detach().clone(), y.detach().clone(), idx))
            return y
        _, x0, y0, idx0 = self._next_ref("max_pool", x.shape)
        if not x.requires_grad:
            return func(x, **opts)
        with torch.no_grad():
            y, idx = func(x.detach(), **opts, return_indices=True)
            rows = x.shape[0]
            y0e = _expand_ref(y0, rows)
            top = torch.maximum(y, y0e)
            a, c = top - y0e, y - top
            dx = x.detach() - _expand_ref(x0, rows)
            idx0e = _expand_ref(idx0, rows)
        return _DeepLiftMaxPool.apply(y, x, a, c, idx, idx0e, dx, self.eps)

    def finish(self) -> None:
        if self.calls != len(self.refs):
            raise UnsupportedModelError(
                f"DeepLIFT: the model ran {self.calls} nonlinearities for the input but {len(self.refs)} for the "
                "baseline (data-dependent control flow).")


def deeplift_gradient(explainer: Explainer, rows: Tensor, reference: Tensor, target: Target,
                      eps: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """DeepLIFT multipliers ``∂ʳᵉˢᶜᵃˡᵉ y/∂x`` for ``rows`` [M,…] against ``reference`` [R,…]
    (row r uses reference row ``r // (M/R)``), and the logits of both forwards.

    The reference runs once without grad (its activations recorded); the input then runs once
    with the rescale rule at every nonlinearity, and one backward gives the multipliers. Linear
    layers (conv, linear, BatchNorm in eval mode, pooling by averages, sums) keep their gradient,
    which is DeepLIFT's linear rule.
    """
    recorder = _DeepLiftMode(eps)
    with torch.no_grad(), recorder:
        ref_logits = explainer._logits(reference)
    replay = _DeepLiftMode(eps, recorder.refs)
    xin = rows.detach().requires_grad_(True)
    with replay:
        logits = explainer._logits(xin.clone())
    replay.finish()
    (grad,) = torch.autograd.grad(target.select(logits).sum(), xin)
    return grad, logits.detach(), ref_logits


def _is_constant_fill(fill: object) -> bool:
    return (isinstance(fill, numbers.Real) and not isinstance(fill, bool)) or fill == "zero"


@register("deeplift")
class DeepLift(Explainer):
    """DeepLIFT with the rescale rule (Shrikumar et al., 2017): ``(x − x₀) ⊙ m`` with multipliers
    ``m`` from a backward in which each nonlinearity passes ``Δy/Δx`` instead of its derivative
    (the derivative where |Δx| < ``eps``; Captum's max-pool rule). Summation-to-delta: the
    per-channel map sums to ``f(x)_t − f(x₀)_t`` — the default reduction sums channels.

    ``baseline`` x₀: "zero", "mean", "gray", "blur", a number or a tensor (as integrated gradients).
    Works with in-place and reused ReLU modules and functional activations (caught by a
    ``TorchFunctionMode``); costs one no-grad forward of the baseline plus one forward and backward.
    Max-pool windows that overlap accumulate (Captum's unpooling overwrites instead).
    """

    default_reduce = "sum"

    def __init__(self, model: nn.Module, baseline: FillLike = "zero", blur_sigma: float | None = None,
                 eps: float = 1e-10) -> None:
        super().__init__(model)
        self.baseline = baseline
        self.blur_sigma = blur_sigma
        self.eps = float(eps)

    def baseline_for(self, x: Tensor) -> Tensor:
        """The baseline x₀ used for ``x``."""
        return make_fill(x, self.baseline, self.blur_sigma, option="baseline")

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        base = self.baseline_for(x)
        # a constant baseline is the same for every image: one reference forward serves the batch
        ref = base[:1] if _is_constant_fill(self.baseline) else base
        grad, _, _ = deeplift_gradient(self, x, ref, target, self.eps)
        return (x - base) * grad


# -- DeepSHAP ----------------------------------------------------------------------------------


def iter_images(data: object, max_batches: int | None = None, batch_size: int = 64) -> Iterator[Tensor]:
    """Image batches [B,C,H,W] from a LightningDataModule (its train loader), a DataLoader or any
    iterable of batch dicts (``"image"``), ``(x, y)`` tuples or tensors, or one tensor [N,C,H,W]."""
    if isinstance(data, Tensor):
        batches: Any = data.split(batch_size)
    elif hasattr(data, "train_dataloader"):
        if hasattr(data, "setup"):
            data.setup("fit")  # type: ignore[attr-defined]
        batches = data.train_dataloader()  # type: ignore[attr-defined]
    else:
        batches = data
    try:
        iterator = iter(batches)
    except TypeError as err:
        raise ConfigError(f"fit data must be a datamodule, a DataLoader, an iterable of batches or a tensor "
                          f"[N,C,H,W]; got {type(data).__name__}.") from err
    for i, batch in enumerate(iterator):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(batch, Mapping):
            x = batch["image"]
        elif isinstance(batch, list | tuple):
            x = batch[0]
        else:
            x = batch
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ConfigError(f"fit data batches must hold float image tensors; got {type(x).__name__}.")
        yield x


def sample_background(data: object, n: int, max_batches: int | None = None, seed: int = 0) -> Tensor:
    """The first ``n`` images of ``data`` (see :func:`iter_images`) as a background set for DeepSHAP.

    The loader runs under a forked global RNG seeded with ``seed`` (shuffling is reproducible and
    the caller's RNG is untouched).
    """
    n = check_positive_int("n", n)
    out: list[Tensor] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x in iter_images(data, max_batches):
            out.append(x[: n - sum(len(t) for t in out)].detach().clone())
            if sum(len(t) for t in out) >= n:
                break
    if not out:
        raise ConfigError("the background data yielded no images.")
    return torch.cat(out)


@register("deepshap")
class DeepShap(Explainer):
    """DeepSHAP (Lundberg & Lee, 2017): DeepLIFT rescale averaged over a baseline distribution,
    ``mean_j (x − x₀ʲ) ⊙ m(x, x₀ʲ)``; the per-channel map sums to ``f(x)_t − mean_j f(x₀ʲ)_t``.

    ``baselines``: a tensor [N,C,H,W] of background images shared by every input (the method as
    published; :meth:`fit` samples one from a datamodule) — or a fill ("zero", "mean", "blur", …,
    as DeepLIFT) plus ``n_baselines`` Gaussian perturbations of std ``sigma`` × each image's value
    range (seeded, so results are reproducible and do not depend on the rest of the batch). The
    default, a noisy zero image, needs no data. Work is chunked to ``internal_batch_size`` rows.
    """

    default_reduce = "sum"

    def __init__(self, model: nn.Module, baselines: Tensor | FillLike = "zero", n_baselines: int = 8,
                 sigma: float = 0.1, seed: int = 0, blur_sigma: float | None = None, eps: float = 1e-10,
                 internal_batch_size: int = 64) -> None:
        super().__init__(model)
        if isinstance(baselines, Tensor) and (baselines.ndim < 2 or baselines.shape[0] < 1):
            raise ConfigError(f"baselines tensor must be [N,C,H,W] with N ≥ 1; got {tuple(baselines.shape)}.")
        self.baselines = baselines
        self.n_baselines = check_positive_int("n_baselines", n_baselines)
        if float(sigma) < 0:
            raise ConfigError(f"sigma must be ≥ 0; got {sigma}.")
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.blur_sigma = blur_sigma
        self.eps = float(eps)
        self.internal_batch_size = check_positive_int("internal_batch_size", internal_batch_size)

    def fit(self, data: object, n: int = 32, max_batches: int | None = None) -> DeepShap:
        """Use the first ``n`` training images of ``data`` as the background set; returns self."""
        self.baselines = sample_background(data, n, max_batches, self.seed)
        return self

    def baselines_for(self, x: Tensor) -> Tensor:
        """The baselines [N,C,H,W] (shared) or [N,B,C,H,W] (per image) used for ``x``."""
        if isinstance(self.baselines, Tensor):
            base = self.baselines.to(device=x.device, dtype=x.dtype)
            if tuple(base.shape[1:]) != tuple(x.shape[1:]):
                raise ConfigError(f"baselines have shape {tuple(base.shape)} but x has {tuple(x.shape)}; they must "
                                  "match except in the batch dimension.")
            return base
        fill = make_fill(x, self.baselines, self.blur_sigma, option="baselines")
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        z = torch.randn((self.n_baselines, 1, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
        flat = x.flatten(1)
        scale = self.sigma * (flat.amax(1) - flat.amin(1))
        return fill[None] + z * scale.view(1, -1, *([1] * (x.ndim - 1)))

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        idx = target.resolve(self._logits, x)
        base = self.baselines_for(x)
        shared = base.ndim == x.ndim
        n, b = base.shape[0], x.shape[0]
        per_chunk = max(1, self.internal_batch_size // b)
        total = torch.zeros_like(x)
        for start in range(0, n, per_chunk):
            chunk = base[start:start + per_chunk]
            k = chunk.shape[0]
            rows = x.repeat(k, *([1] * (x.ndim - 1)))  # row j·B + i: image i against baseline j
            ref = chunk if shared else chunk.reshape(k * b, *x.shape[1:])
            grad, _, _ = deeplift_gradient(self, rows, ref, Target(idx.repeat(k), k * b, x.device), self.eps)
            attr = (rows - _expand_ref(ref, k * b)) * grad
            total += attr.view(k, b, *x.shape[1:]).sum(0)
        return total / n
