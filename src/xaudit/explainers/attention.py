"""Transformer-native explainers for timm ViT/DeiT: attention rollout and Chefer et al.'s relevance.

Both read the attention probabilities of every block. timm's ``Attention`` normally uses fused
``F.scaled_dot_product_attention``, which never materialises the attention matrix, so inside
``attribute`` (and only there) every explained module gets ``fused_attn = False`` — timm then
computes ``softmax(q kᵀ · scale)`` and passes it through ``attn_drop`` — and a forward hook on
``attn_drop`` records the probabilities [B, heads, T, T]. The flags are restored and the hooks
removed in ``finally`` (also when the forward raises); ``explain_mode`` switches a train-mode
``attn_drop`` to eval, so the recorded matrix is the softmax output itself. Gradients come from
``torch.autograd.grad`` (no ``param.grad``), and ``model.training`` is never touched.

Token layout: timm puts the prefix tokens (class token, then register/distillation tokens) before
the patch tokens. The map is the class token's row over the patch tokens; the number of prefix
tokens is read from the model's ``num_prefix_tokens`` (1, a class token, when the model does not
say). A model without a class token (``class_token=False``, e.g. global average pooling) uses the
mean of all token rows instead of the class row.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor, nn

from xaudit.explainers.base import Explainer, Target, UnsupportedModelError, upsample
from xaudit.explainers.registry import register
from xaudit.utils.errors import ConfigError, unknown_choice

HEAD_FUSIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "mean": lambda a: a.mean(1),
    "max": lambda a: a.amax(1),
    "min": lambda a: a.amin(1),
}


def _timm_attention_type() -> type[nn.Module] | None:
    try:  # timm is optional: a model without it cannot hold timm Attention modules
        from timm.models.vision_transformer import Attention
    except ImportError:  # pragma: no cover - timm is installed in the test environment
        return None
    return Attention


def attention_modules(model: nn.Module) -> list[str]:
    """Dotted names of every timm ``vision_transformer.Attention`` module of ``model``, in order."""
    kind = _timm_attention_type()
    if kind is None:
        return []
    return [name for name, m in model.named_modules() if isinstance(m, kind)]


def resolve_attention_blocks(model: nn.Module, blocks: Sequence[str] | None) -> list[nn.Module]:
    """The attention modules to read: ``blocks`` (dotted names) or every timm Attention module.

    Each must be timm-Attention-like: a ``fused_attn`` flag and an ``attn_drop`` sub-module that
    receives the softmax probabilities.
    """
    if blocks is None:
        names = attention_modules(model)
        if not names:
            listed = [n for n, _ in model.named_modules() if n]
            more = f", … ({len(listed) - 30} more)" if len(listed) > 30 else ""
            raise UnsupportedModelError(
                f"{type(model).__name__} is not a transformer with timm Attention blocks; pass blocks=[...] "
                "naming attention modules that have a fused_attn flag and an attn_drop sub-module applied to "
                "the softmax probabilities (as timm.models.vision_transformer.Attention in a timm ViT/DeiT). "
                f"Modules of this model: {', '.join(listed[:30]) or '(none)'}{more}.")
    else:
        if isinstance(blocks, str) or not all(isinstance(b, str) for b in blocks):
            raise ConfigError(f"blocks must be a list of dotted module names; got {blocks!r}.")
        names = list(blocks)
        if not names:
            raise ConfigError("blocks is empty; pass at least one attention module name, or None for all.")
    valid = dict(model.named_modules())
    modules = []
    for name in names:
        if name not in valid:
            raise unknown_choice("attention block", name, attention_modules(model) or [n for n in valid if n],
                                 key="explainer.blocks")
        m = valid[name]
        if not hasattr(m, "fused_attn") or not isinstance(getattr(m, "attn_drop", None), nn.Module):
            raise UnsupportedModelError(
                f"module {name!r} ({type(m).__name__}) is not a timm-style attention module: it needs a "
                "fused_attn flag and an attn_drop sub-module applied to the softmax probabilities. Choices: "
                f"{', '.join(attention_modules(model)) or '(no timm Attention modules found)'}.")
        modules.append(m)
    if len({id(m) for m in modules}) != len(modules):
        raise ConfigError(f"blocks names the same module twice: {names}.")
    return modules


@contextmanager
def record_attention(modules: Sequence[nn.Module],
                     transform: Callable[[Tensor], Tensor] | None = None) -> Iterator[list[Tensor | None]]:
    """Unfused attention and one record per module while active; flags and hooks restored on exit.

    The list holds, per module, ``transform(probabilities)`` of its last call (the raw [B,heads,T,T]
    probabilities without ``transform``), or None when the module was not called.
    """
    records: list[Tensor | None] = [None] * len(modules)
    flags = [m.fused_attn for m in modules]
    handles = []

    def make_hook(i: int) -> Callable[[nn.Module, object, object], None]:
        def hook(_: nn.Module, __: object, output: object) -> None:
            if not isinstance(output, Tensor) or output.ndim != 4 or output.shape[-1] != output.shape[-2]:
                shape = tuple(output.shape) if isinstance(output, Tensor) else type(output).__name__
                raise UnsupportedModelError(
                    f"attn_drop of attention block {i} gave {shape}, not attention probabilities "
                    "[B, heads, T, T]; this attention module is not timm-style.")
            records[i] = output if transform is None else transform(output)
        return hook

    try:
        for i, m in enumerate(modules):
            m.fused_attn = False
            handles.append(m.attn_drop.register_forward_hook(make_hook(i)))
        yield records
    finally:
        for h in handles:
            h.remove()
        for m, flag in zip(modules, flags):
            m.fused_attn = flag


def _token_layout(model: nn.Module) -> tuple[int, bool]:
    """(number of prefix tokens, whether token 0 is a class token) from the timm model attributes."""
    for m in model.modules():
        prefix = getattr(m, "num_prefix_tokens", None)
        if isinstance(prefix, int) and not isinstance(prefix, bool):
            has_cls = getattr(m, "has_class_token", None)
            if not isinstance(has_cls, bool):
                has_cls = getattr(m, "cls_token", None) is not None
            return prefix, has_cls
    return 1, True


def _grid(n: int, size: tuple[int, int]) -> tuple[int, int]:
    """Patch grid (h, w) with h·w = n whose aspect ratio is closest to the input's."""
    ratio = size[0] / size[1]
    best = None
    for h in range(1, n + 1):
        if n % h == 0:
            err = abs(math.log(h / (n // h) / ratio))
            if best is None or err < best[0]:
                best = (err, h)
    assert best is not None
    return best[1], n // best[1]


class AttentionExplainer(Explainer):
    """Shared part: which attention modules to read, and relevance matrix → upsampled patch map.

    Args:
        model: a vision transformer with timm attention blocks.
        blocks: dotted names of the attention modules; None: every timm Attention module.
    """

    def __init__(self, model: nn.Module, blocks: Sequence[str] | None = None) -> None:
        super().__init__(model)
        self.blocks = None if blocks is None else list(blocks)
        self.attention_modules = resolve_attention_blocks(model, self.blocks)
        self.num_prefix_tokens, self.has_class_token = _token_layout(model)

    def _records(self, records: list[Tensor | None]) -> list[Tensor]:
        missing = [i for i, r in enumerate(records) if r is None]
        if missing:
            raise UnsupportedModelError(
                f"attention block(s) {missing} were not called in the forward pass; their attention could not "
                "be read. Pass blocks=[...] naming only modules the model uses.")
        return [r for r in records if r is not None]

    def to_map(self, relevance: Tensor, size: tuple[int, int]) -> Tensor:
        """[B,T,T] token relevance → class row over patch tokens → grid → bilinear upsampling to ``size``."""
        p = self.num_prefix_tokens
        n = relevance.shape[-1] - p
        if n <= 0:
            raise UnsupportedModelError(f"{relevance.shape[-1]} tokens and {p} prefix tokens leave no patch tokens.")
        row = relevance[:, 0, p:] if self.has_class_token else relevance[:, :, p:].mean(1)
        h, w = _grid(n, size)
        return upsample(row.reshape(-1, h, w), size)


@register("attention_rollout")
class AttentionRollout(AttentionExplainer):
    """Attention rollout (Abnar & Zuidema, 2020, "Quantifying Attention Flow in Transformers").

    Per block the attention [B,heads,T,T] is fused over heads (``head_fusion``: "mean", "max" or
    "min"); with ``discard_ratio`` > 0 the lowest ``int(T·T·discard_ratio)`` entries of each image's
    fused matrix are set to 0, except flat index 0 (the class token's attention to itself), as in
    jacobgil's vit-explain (there the kept index shrinks the count by one when it is among the
    lowest; vit-explain only discarded in the first image of a batch and normalised along the wrong
    axis — here each image is treated alike and rows are normalised). Then ``Â = (A + I)`` with rows
    renormalised to sum 1, and ``rollout = Â_L · … · Â_1`` (batched products). The map is the class
    token's row over the patch tokens, on the patch grid, upsampled bilinearly; values are the raw
    rollout weights (not rescaled). Class-agnostic: ``target`` is accepted and ignored.
    ``blocks``: dotted names of the attention modules (default: every timm Attention module).

    Args:
        model: a vision transformer with timm attention blocks.
        head_fusion: how heads are fused per block: ``mean`` | ``max`` | ``min``.
        discard_ratio: share in [0, 1) of the lowest fused attention entries set to 0.
        blocks: dotted names of the attention modules; None: every timm Attention module.
    """

    def __init__(self, model: nn.Module, head_fusion: str = "mean", discard_ratio: float = 0.0,
                 blocks: Sequence[str] | None = None) -> None:
        if head_fusion not in HEAD_FUSIONS:
            raise unknown_choice("head_fusion", head_fusion, HEAD_FUSIONS, key="explainer.head_fusion")
        if isinstance(discard_ratio, bool) or not isinstance(discard_ratio, (int, float)) \
                or not 0.0 <= float(discard_ratio) < 1.0:
            raise ConfigError(f"discard_ratio must be a number in [0, 1); got {discard_ratio!r}.")
        super().__init__(model, blocks)
        self.head_fusion = head_fusion
        self.discard_ratio = float(discard_ratio)

    def _fuse(self, attn: Tensor) -> Tensor:
        return HEAD_FUSIONS[self.head_fusion](attn.detach().float())

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        with record_attention(self.attention_modules, self._fuse) as records, torch.no_grad():
            self._logits(x)
        fused = self._records(records)
        b, t = fused[0].shape[0], fused[0].shape[-1]
        eye = torch.eye(t, device=fused[0].device, dtype=fused[0].dtype)
        rollout = eye.expand(b, t, t)
        k = int(t * t * self.discard_ratio)
        for a in fused:
            if k > 0:
                flat = a.reshape(b, t * t).clone()
                lowest = flat.topk(k, dim=-1, largest=False).indices
                flat.scatter_(1, lowest, 0.0)
                flat[:, 0] = a[:, 0, 0]  # the class token's self-attention (flat index 0) is never discarded
                a = flat.view(b, t, t)
            a = a + eye
            a = a / a.sum(-1, keepdim=True)
            rollout = torch.bmm(a, rollout)
        return self.to_map(rollout, (x.shape[-2], x.shape[-1]))


@register("chefer")
class Chefer(AttentionExplainer):
    """Gradient-weighted attention relevance (Chefer, Gur & Wolf, ICCV 2021, "Generic
    Attention-model Explainability for Interpreting Bi-Modal and Encoder-Decoder Transformers").

    Per block ``Ā = mean_heads[(∇A ⊙ A)⁺]`` with ``∇A`` the gradient of the target logit with
    respect to the attention probabilities A; ``R = I`` and ``R ← R + Ā·R`` over the blocks in
    forward order. The map is the class token's row of R over the patch tokens, on the patch grid,
    upsampled bilinearly (raw values, including the identity's contribution of 0 on patch tokens).
    ``blocks``: dotted names of the attention modules (default: every timm Attention module).
    """

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        x = x.detach().requires_grad_(True)  # a graph to the attention even when the weights are frozen
        with record_attention(self.attention_modules) as records:
            logits = self._logits(x)
        attn = self._records(records)
        grads = torch.autograd.grad(target.select(logits).sum(), attn, allow_unused=True)
        b, t = attn[0].shape[0], attn[0].shape[-1]
        relevance = torch.eye(t, device=x.device, dtype=torch.float32).expand(b, t, t)
        for a, g in zip(attn, grads):
            if g is None:  # the logit does not depend on this block (e.g. blocks after the class readout)
                continue
            cam = (g.detach().float() * a.detach().float()).clamp(min=0).mean(1)
            relevance = relevance + torch.bmm(cam, relevance)
        return self.to_map(relevance, (x.shape[-2], x.shape[-1]))
