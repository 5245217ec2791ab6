"""LRP for transformers: AttnLRP (Achtibat et al., ICML 2024, "AttnLRP: Attention-aware layer-wise
relevance propagation for transformers") and CP-LRP (Ali et al., ICML 2022, "XAI for transformers:
better explanations through conservative propagation").

Like :mod:`xaudit.explainers.relevance`, every rule is "gradient × input with a modified
gradient": one forward with the rules in place, one backward, and the input relevance is
``x ⊙ ∂y/∂x`` of the target logit y. The rules are set per *operation*, through a
``TorchFunctionMode`` active for that one forward, so they reach the functional code inside
attention modules (timm's fused ``F.scaled_dot_product_attention``, torchvision's
``F.multi_head_attention_forward``, Swin's window attention) without editing the model:

- linear layers and convolutions (``F.linear``, ``F.conv*``): the ε rule (ε → 0 is LRP-0);
- LayerNorm / RMSNorm: the normalising scale 1/σ is a constant in the backward (AttnLRP's
  identity rule on the division; centring and the affine part stay linear);
- element-wise nonlinearities (GELU, SiLU, ReLU, tanh, sigmoid, …): the identity rule —
  relevance passes unchanged, i.e. the gradient becomes ``g · f(x)/x``;
- the product of two activations (``q @ kᵀ``, ``A @ v``, element-wise gating): the uniform rule —
  each factor gets half of the relevance;
- softmax: AttnLRP's rule ``R_i = x_i (R̃_i − s_i Σ_j R̃_j)`` is exactly gradient × input through
  the softmax (its Taylor expansion at 0), so AttnLRP keeps the softmax gradient. Its bias term —
  what the rule does not pass on — is the only relevance AttnLRP loses inside attention.
  CP-LRP (``variant="cp_lrp"``) instead treats the attention probabilities as constants, so
  relevance flows only through the values and is conserved through attention exactly.

Conservation: relevance starts as the target logit; what reaches the pixels is the logit minus
what biases (linear, LayerNorm β), the class/register tokens and positional embeddings absorb, and
— AttnLRP only — the softmax bias terms. On a model without biases and additive embeddings, CP-LRP
conserves exactly (up to ε) and the test suite checks it.

Scope: fused attention is re-computed explicitly (same values, float rounding aside); attention
dropout must be off (eval mode). In-place activations keep their plain gradient.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from xaudit.explainers.base import Explainer, Target, UnsupportedModelError
from xaudit.explainers.registry import register
from xaudit.explainers.relevance.core import reroute, stabilize
from xaudit.utils.errors import ConfigError, unknown_choice

VARIANTS = ("attnlrp", "cp_lrp")


class _ScaledGrad(torch.autograd.Function):
    """Forward ``fn(x)``; backward ``g · fn(x)/x`` (the identity rule: ``x·grad_x = y·grad_y``)."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, fn: Any, eps: float) -> Tensor:  # type: ignore[override]
        y = fn(x)
        ctx.save_for_backward(y / stabilize(x, eps))
        return y

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (scale,) = ctx.saved_tensors
        return g * scale, None, None


def _epsilon(z: Tensor, eps: float) -> Tensor:
    """``z`` with its gradient scaled by ``z/(z+ε)`` (the ε rule); plain ``z`` when ε = 0."""
    if eps <= 0 or not z.requires_grad:
        return z
    with torch.no_grad():
        scale = z / stabilize(z, eps)
    return reroute(z, scale)


def _activation(t: object) -> bool:
    """A tensor that carries relevance: during the explained forward only tensors computed from the
    input require grad (the parameters are switched off, see :meth:`AttnLRP._attribute`)."""
    return isinstance(t, Tensor) and t.requires_grad


def _uniform(op: Any, a: Tensor, b: Tensor) -> Tensor:
    """``op(a, b)`` for a bilinear ``op``; each factor gets half the relevance (uniform rule)."""
    return 0.5 * (op(a, b.detach()) + op(a.detach(), b))


# elementwise nonlinearities: function -> index of its `inplace` argument (None: it has none)
_ACTIVATIONS: dict[Any, int | None] = {
    F.gelu: None, F.silu: 1, F.relu: 1, F.elu: 2, F.leaky_relu: 2, F.hardswish: 1, F.mish: 1, F.softplus: None,
    F.relu6: 1, torch.relu: None, Tensor.relu: None, torch.tanh: None, Tensor.tanh: None, F.tanh: None,
    torch.sigmoid: None, Tensor.sigmoid: None, F.sigmoid: None,
}
_LINEAR = {F.linear, F.conv1d, F.conv2d, F.conv3d}
_MATMUL = {Tensor.__matmul__, Tensor.matmul, torch.matmul, torch.bmm, Tensor.bmm}
_MUL = {Tensor.__mul__, Tensor.__rmul__, Tensor.mul, torch.mul}
_SOFTMAX = {Tensor.softmax, F.softmax, torch.softmax}


class _TransformerLRPMode(TorchFunctionMode):
    """The rules of one forward (module docstring); calls inside a handler are not intercepted."""

    def __init__(self, variant: str, epsilon: float) -> None:
        super().__init__()
        self.cp = variant == "cp_lrp"
        self.eps = epsilon

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _LINEAR:
            return self.linear(func, *args, **kwargs)
        if func in _MATMUL or func in _MUL:
            if len(args) == 2 and not kwargs and _activation(args[0]) and _activation(args[1]):
                return _uniform(func, args[0], args[1])
            return func(*args, **kwargs)
        if func in _SOFTMAX:
            out = func(*args, **kwargs)
            return out.detach() if self.cp else out
        if func in _ACTIVATIONS:
            return self.activation(func, args, kwargs)
        if func is F.layer_norm:
            return self.layer_norm(*args, **kwargs)
        if func is getattr(F, "rms_norm", None):
            return self.rms_norm(*args, **kwargs)
        if func is F.scaled_dot_product_attention:
            return self.attention(*args, **kwargs)
        if func is F.multi_head_attention_forward:
            return self.multi_head_attention(*args, **kwargs)
        return func(*args, **kwargs)

    # -- rules ------------------------------------------------------------------------------
    def linear(self, func: Any, x: Tensor, *args: Any, **kwargs: Any) -> Tensor:
        return _epsilon(func(x, *args, **kwargs), self.eps)

    def activation(self, func: Any, args: tuple, kwargs: dict) -> Tensor:
        x = args[0] if args else kwargs.get("input")
        pos = _ACTIVATIONS[func]
        inplace = kwargs.get("inplace", args[pos] if pos is not None and len(args) > pos else False)
        if inplace or not _activation(x):
            return func(*args, **kwargs)
        rest = args[1:]
        kw = {k: v for k, v in kwargs.items() if k != "input"}
        return _ScaledGrad.apply(x, lambda t: func(t, *rest, **kw), 1e-12)

    def layer_norm(self, x: Tensor, normalized_shape: Any, weight: Tensor | None = None, bias: Tensor | None = None,
                   eps: float = 1e-5) -> Tensor:
        dims = tuple(range(-len(tuple(normalized_shape)), 0))
        centred = x - x.mean(dims, keepdim=True)
        std = (centred.pow(2).mean(dims, keepdim=True) + eps).sqrt().detach()
        y = centred / std
        if weight is not None:
            y = y * weight
        return y + bias if bias is not None else y

    def rms_norm(self, x: Tensor, normalized_shape: Any, weight: Tensor | None = None,
                 eps: float | None = None) -> Tensor:
        dims = tuple(range(-len(tuple(normalized_shape)), 0))
        e = torch.finfo(x.dtype).eps if eps is None else eps
        y = x / (x.pow(2).mean(dims, keepdim=True) + e).sqrt().detach()
        return y * weight if weight is not None else y

    def attention(self, q: Tensor, k: Tensor, v: Tensor, attn_mask: Tensor | None = None, dropout_p: float = 0.0,
                  is_causal: bool = False, scale: float | None = None, enable_gqa: bool = False) -> Tensor:
        """Explicit scaled dot-product attention with the rules (same value as the fused kernel)."""
        if dropout_p > 0:
            raise UnsupportedModelError(
                f"attention runs with dropout_p={dropout_p}: explain the model in eval mode (model.eval()).")
        if enable_gqa:
            raise UnsupportedModelError("grouped-query attention (enable_gqa=True) is not supported by attn_lrp.")
        scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
        logits = self.matmul(q * scale, k.transpose(-2, -1))
        t, s = logits.shape[-2], logits.shape[-1]
        if is_causal:
            keep = torch.ones(t, s, dtype=torch.bool, device=q.device).tril()
            logits = logits.masked_fill(~keep, float("-inf"))
        if attn_mask is not None:
            if attn_mask.dtype == torch.bool:
                logits = logits.masked_fill(~attn_mask, float("-inf"))
            else:
                logits = logits + attn_mask
        probs = logits.softmax(-1)
        if self.cp:
            probs = probs.detach()
        return self.matmul(probs, v)

    def matmul(self, a: Tensor, b: Tensor) -> Tensor:
        return _uniform(torch.matmul, a, b) if _activation(a) and _activation(b) else torch.matmul(a, b)

    def multi_head_attention(self, query: Tensor, key: Tensor, value: Tensor, embed_dim_to_check: int,
                             num_heads: int, in_proj_weight: Tensor | None, in_proj_bias: Tensor | None,
                             bias_k: Tensor | None, bias_v: Tensor | None, add_zero_attn: bool, dropout_p: float,
                             out_proj_weight: Tensor, out_proj_bias: Tensor | None, training: bool = True,
                             key_padding_mask: Tensor | None = None, need_weights: bool = True,
                             attn_mask: Tensor | None = None, use_separate_proj_weight: bool = False,
                             q_proj_weight: Tensor | None = None, k_proj_weight: Tensor | None = None,
                             v_proj_weight: Tensor | None = None, static_k: Tensor | None = None,
                             static_v: Tensor | None = None, average_attn_weights: bool = True,
                             is_causal: bool = False) -> tuple[Tensor, Tensor | None]:
        """``nn.MultiheadAttention`` (torchvision ViT) with the rules: batched [T,B,E] self-/cross-attention."""
        unsupported = {"bias_k/bias_v": bias_k is not None or bias_v is not None, "add_zero_attn": add_zero_attn,
                       "key_padding_mask": key_padding_mask is not None, "static_k/static_v":
                       static_k is not None or static_v is not None, "need_weights": need_weights,
                       "dropout in train mode": training and dropout_p > 0, "unbatched input": query.dim() != 3}
        bad = [k for k, on in unsupported.items() if on]
        if bad:
            raise UnsupportedModelError(
                f"attn_lrp re-computes nn.MultiheadAttention explicitly and does not support {', '.join(bad)} "
                "(call it with need_weights=False, in eval mode, without bias_k/bias_v, zero attention or masks "
                "by padding, as torchvision's ViT does).")
        t, b, e = query.shape
        if use_separate_proj_weight:
            ws = (q_proj_weight, k_proj_weight, v_proj_weight)
        else:
            assert in_proj_weight is not None
            ws = in_proj_weight.chunk(3)
        bs = in_proj_bias.chunk(3) if in_proj_bias is not None else (None, None, None)
        hd = e // num_heads

        def heads(x: Tensor, w: Tensor | None, bias: Tensor | None) -> Tensor:
            y = self.linear(F.linear, x, w, bias)
            return y.reshape(y.shape[0], b * num_heads, hd).transpose(0, 1).reshape(b, num_heads, y.shape[0], hd)

        q, k, v = heads(query, ws[0], bs[0]), heads(key, ws[1], bs[1]), heads(value, ws[2], bs[2])
        mask = attn_mask
        if mask is not None and mask.dim() == 3:  # [B·heads, T, S]
            mask = mask.reshape(b, num_heads, *mask.shape[-2:])
        out = self.attention(q, k, v, attn_mask=mask, is_causal=is_causal and mask is None)
        out = out.permute(2, 0, 1, 3).reshape(t, b, e)
        return self.linear(F.linear, out, out_proj_weight, out_proj_bias), None


@register("attn_lrp")
class AttnLRP(Explainer):
    """Layer-wise relevance propagation for transformers (module docstring: rules and papers).

    ``variant``: ``"attnlrp"`` (default; Achtibat et al., 2024) or ``"cp_lrp"`` (Ali et al., 2022:
    attention probabilities held constant). ``epsilon``: the ε of the linear layers' ε rule
    (0 = LRP-0). Relevance starts as the target logit; with ``reduce=None`` the per-channel
    map [B,C,H,W] sums to it up to what biases, embeddings (and AttnLRP's softmax) absorb; the
    default reduction sums channels (signed). Works on any model built from the operations above —
    timm ViT/DeiT/Swin, torchvision ViT/Swin, and CNNs (where it reduces to ε-LRP with the plain
    gradient through ReLU and pooling).

    Args:
        model: the classifier (returns logits [B, num_classes]).
        variant: ``attnlrp`` or ``cp_lrp``.
        epsilon: ε of the linear layers' ε rule (0: LRP-0).
    """

    default_reduce = "sum"
    signed = True
    variants: ClassVar[tuple[str, ...]] = VARIANTS

    def __init__(self, model: nn.Module, variant: str = "attnlrp", epsilon: float = 1e-6) -> None:
        super().__init__(model)
        if variant not in VARIANTS:
            raise unknown_choice("attn_lrp variant", variant, VARIANTS, key="explainer.variant")
        if isinstance(epsilon, bool) or not isinstance(epsilon, (int, float)) or not 0 <= float(epsilon) < math.inf:
            raise ConfigError(f"epsilon must be a finite number ≥ 0; got {epsilon!r}.")
        self.variant = variant
        self.epsilon = float(epsilon)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        xin = x.detach().requires_grad_(True)
        # parameters off for this forward (restored after): then "requires grad" means "computed from
        # the input", which tells the uniform rule a product of two activations (q @ kᵀ) from a product
        # with a weight (x @ W.t()), and autograd records no graph to the weights
        params = [p for p in self.model.parameters() if p.requires_grad]
        try:
            for p in params:
                p.requires_grad_(False)
            with _TransformerLRPMode(self.variant, self.epsilon):
                logits = self._logits(xin.clone())  # a clone: an in-place op on the input stays legal
        finally:
            for p in params:
                p.requires_grad_(True)
        score = target.select(logits).sum()
        if not score.requires_grad:  # every path to the logits held constant (e.g. CP-LRP on pure attention)
            return torch.zeros_like(x)
        (grad,) = torch.autograd.grad(score, xin)
        return xin.detach() * grad


@register("cp_lrp")
class CPLRP(AttnLRP):
    """CP-LRP (Ali et al., 2022): :class:`AttnLRP` with ``variant="cp_lrp"`` — attention probabilities
    and normalisation scales held constant, so relevance is conserved through every attention block
    (what biases and embeddings absorb aside). LXT's recommendation inside ViT attention.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        epsilon: ε of the linear layers' ε rule (0: LRP-0).
    """

    def __init__(self, model: nn.Module, epsilon: float = 1e-6) -> None:
        super().__init__(model, variant="cp_lrp", epsilon=epsilon)
