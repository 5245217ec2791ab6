"""Rule composites: which rule goes on which layer (:data:`COMPOSITES`, layer groups, the
``"first"``/``"Sum"`` keys) and :func:`resolve_rules`, which maps a composite onto a model."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

from xaudit.explainers.base import UnsupportedModelError
from xaudit.explainers.canonizers import CONV_TRANSPOSE_TYPES, CONV_TYPES
from xaudit.explainers.relevance.rules import (
    AVGPOOL_TYPES,
    RULES,
    Rule,
    RuleSpec,
    make_rule,
    not_affine_message,
)
from xaudit.utils.errors import ConfigError, unknown_choice

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
            raise UnsupportedModelError(not_affine_message(rule, name, module))
        if rule is not None and _is_layer(module) and name:
            plan[module] = (name, rule)
        elif rule is not None and _is_layer(module) and not name and next(model.children(), None) is None:
            plan[module] = (type(module).__name__, rule)
        elif rule is None and _own_params(module) and not isinstance(module, _BatchNorm):
            raise UnsupportedModelError(no_rule_message(name or type(module).__name__, module))
    return plan, built.get("Sum")


def no_rule_message(name: str, module: nn.Module) -> str:
    """The error for a layer with parameters that no rule maps (names the fix)."""
    kind = type(module).__name__
    return (f"LRP has no rule for layer {name!r} ({kind}), which has parameters. Add one: "
            f"create('lrp', model, rules={{{name!r}: 'epsilon'}}) for this layer, or rules={{{kind!r}: 'epsilon'}} "
            f"for every {kind} (rules: {', '.join(RULES)}).")
