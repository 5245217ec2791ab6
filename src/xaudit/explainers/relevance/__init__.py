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

**Layout.** :mod:`~xaudit.explainers.relevance.core` (the stabiliser; it re-exports the
:func:`reroute` primitive of :mod:`xaudit.explainers.rerouting` and :func:`iter_images` of
:mod:`xaudit.explainers.fit_data`), :mod:`~xaudit.explainers.relevance.rules` (one class per LRP
rule, :data:`RULES`), :mod:`~xaudit.explainers.relevance.composites` (:data:`COMPOSITES`, rule
resolution), :mod:`~xaudit.explainers.relevance.lrp` (the engine, :class:`LRP`,
:class:`DeepTaylor`) and :mod:`~xaudit.explainers.relevance.deeplift` (:class:`DeepLift`,
:class:`DeepShap`). Importing this package registers ``lrp``, ``deep_taylor``, ``deeplift`` and
``deepshap``.
"""

from xaudit.explainers.relevance.composites import (
    ACTIVATION_TYPES,
    COMPOSITES,
    FIRST_TYPES,
    GROUPS,
    SPECIAL_KEYS,
    first_layer_name,
    resolve_rules,
)
from xaudit.explainers.relevance.core import iter_images, reroute, stabilize
from xaudit.explainers.relevance.deeplift import (
    DeepLift,
    DeepShap,
    deeplift_gradient,
    sample_background,
)
from xaudit.explainers.relevance.lrp import LRP, DeepTaylor, LRPRun
from xaudit.explainers.relevance.rules import (
    AVGPOOL_TYPES,
    RULES,
    AlphaBeta,
    BoundLike,
    Epsilon,
    Flat,
    Gamma,
    Gradient,
    InputRule,
    LayerCall,
    Norm,
    Pass,
    Rule,
    RuleSpec,
    WSquare,
    ZBox,
    ZPlus,
    make_rule,
)

__all__ = [
    "ACTIVATION_TYPES",
    "AVGPOOL_TYPES",
    "COMPOSITES",
    "FIRST_TYPES",
    "GROUPS",
    "LRP",
    "RULES",
    "SPECIAL_KEYS",
    "AlphaBeta",
    "BoundLike",
    "DeepLift",
    "DeepShap",
    "DeepTaylor",
    "Epsilon",
    "Flat",
    "Gamma",
    "Gradient",
    "InputRule",
    "LRPRun",
    "LayerCall",
    "Norm",
    "Pass",
    "Rule",
    "RuleSpec",
    "WSquare",
    "ZBox",
    "ZPlus",
    "deeplift_gradient",
    "first_layer_name",
    "iter_images",
    "make_rule",
    "reroute",
    "resolve_rules",
    "sample_background",
    "stabilize",
]
