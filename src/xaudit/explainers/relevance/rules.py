"""LRP rules: how one layer passes the relevance of its outputs to its inputs (ε, norm, z⁺, αβ,
γ, flat, w², z^B, pass, gradient), the :data:`RULES` table and :func:`make_rule`."""

from __future__ import annotations

import inspect
import math
import numbers
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

import torch
from torch import Tensor, nn

from xaudit.explainers.base import UnsupportedModelError
from xaudit.explainers.canonizers import Affine
from xaudit.explainers.relevance.core import is_nonnegative, stabilize
from xaudit.explainers.rerouting import reroute
from xaudit.utils.errors import ConfigError, unknown_choice

if TYPE_CHECKING:
    from xaudit.explainers.relevance.lrp import LRPRun

AVGPOOL_TYPES: tuple[type[nn.Module], ...] = (nn.AvgPool1d, nn.AvgPool2d, nn.AvgPool3d, nn.AdaptiveAvgPool1d,
                                              nn.AdaptiveAvgPool2d, nn.AdaptiveAvgPool3d)


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
            raise UnsupportedModelError(not_affine_message(rule, self.name, self.module))
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
        zp = a(x, wp, bp) if is_nonnegative(x) else a(x.clamp(min=0), wp, bp) + a(x.clamp(max=0), _neg(a)[0], None)
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
        if is_nonnegative(x):
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
        if is_nonnegative(x):
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


def not_affine_message(rule: Rule, name: str, module: nn.Module) -> str:
    """The error for a weight-changing rule mapped onto a layer that has no weights to change."""
    return (f"LRP rule {rule.name!r} changes weights, but layer {name!r} ({type(module).__name__}) is not a "
            "Conv/Linear layer (nor an eval-mode BatchNorm). Map it to 'epsilon', 'pass', 'norm' or 'gradient': "
            f"rules={{{name!r}: 'pass'}}.")

