"""The LRP engine (one forward with rule-switched layers, one backward) and deep Taylor
decomposition (LRP with z⁺ in every hidden layer and an input rule)."""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from xaudit.explainers.base import Explainer, Target, UnsupportedModelError
from xaudit.explainers.canonizers import (
    CANONIZERS,
    Affine,
    AffineCache,
    MergeCache,
    forward_overrides,
    identity_forward,
    module_forward,
    resnet_block_forward,
)
from xaudit.explainers.registry import register
from xaudit.explainers.relevance.composites import no_rule_message, resolve_rules
from xaudit.explainers.relevance.rules import (
    BoundLike,
    Epsilon,
    Gradient,
    LayerCall,
    Rule,
    RuleSpec,
)
from xaudit.utils.errors import ConfigError, unknown_choice


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
    signed = True

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
                raise UnsupportedModelError(no_rule_message(name, module))
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

    signed = False  # non-negative by construction (z⁺ and the input rules give R ≥ 0)

    def __init__(self, model: nn.Module, low: BoundLike = None, high: BoundLike = None, input_rule: str = "zbox",
                 stabilizer: float = 1e-6, canonizers: Sequence[str] | None = CANONIZERS) -> None:
        if input_rule not in ("zbox", "w_square", "flat"):
            raise unknown_choice("deep_taylor input_rule", input_rule, ("zbox", "w_square", "flat"))
        super().__init__(model, composite="deep_taylor", rules={"first": input_rule}, stabilizer=stabilizer,
                         low=low, high=high, canonizers=canonizers)

