"""Class-activation-map family on one base: each method only says how channels are weighted.

A CAM is ``relu(Σ_k w_k A_k)`` for the activations A [B,K,h,w] of ``target_layer``,
upsampled bilinearly to the input size. :class:`CAMExplainer` records A with a forward hook
(removed in ``finally``), gets ∂y/∂A with ``torch.autograd.grad`` when the method needs it —
backpropagating only down to the target layer, never to the input — and calls
``channel_weights``; subclasses override that one function.

Transformer layers work too: a [B,T,C] token sequence (ViT, DeiT) or a [B,H,W,C] Swin grid is
turned into [B,C,h,w] by :mod:`xaudit.explainers.tokens` (options ``reshape``, ``prefix_tokens``,
``grid``); activations and gradients go through the same reshape.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.explainers.base import (
    Explainer,
    Target,
    UnsupportedModelError,
    check_positive_int,
    minmax_normalize,
)
from xaudit.explainers.base import upsample as upsample_maps
from xaudit.explainers.gradient import GuidedBackprop
from xaudit.explainers.hooks import record_output, resolve_layer
from xaudit.explainers.registry import register
from xaudit.explainers.tokens import check_reshape_options, feature_map_layout
from xaudit.utils.errors import ConfigError


class LayerActivations:
    """What a weighting sees: input, activations A, ∂y/∂A (None without gradients), logits, targets."""

    def __init__(self, x: Tensor, acts: Tensor, grads: Tensor | None, logits: Tensor, target: Tensor) -> None:
        self.x = x
        self.acts = acts
        self.grads = grads
        self.logits = logits
        self.target = target


class CAMExplainer(Explainer):
    """Base of the CAM family. ``target_layer`` is a dotted module name (default: the backbone's
    ``default_target_layer``); ``relu`` clips negative evidence; ``normalize`` scales each map
    to [0,1] (pytorch-grad-cam's convention; off by default so maps keep their scale).

    Transformer layers: ``reshape`` (``auto`` | ``tokens`` | ``channels_last`` | ``none``) says how
    the layer output becomes [B,K,h,w]; ``prefix_tokens`` (class/distillation/register tokens
    before the patch tokens) and ``grid`` ([h, w] of the patch tokens) override what ``auto``
    reads from the model (see :func:`xaudit.explainers.tokens.feature_map_layout`)."""

    needs_gradients: ClassVar[bool] = True
    default_relu: ClassVar[bool] = True

    def __init__(self, model: nn.Module, target_layer: str | None = None, relu: bool | None = None,
                 normalize: bool = False, reshape: str = "auto", prefix_tokens: int | None = None,
                 grid: Sequence[int] | None = None) -> None:
        super().__init__(model)
        self.target_layer = resolve_layer(model, target_layer)
        self.relu = self.default_relu if relu is None else bool(relu)
        self.normalize = bool(normalize)
        self.reshape, self.prefix_tokens, self.grid = check_reshape_options(reshape, prefix_tokens, grid)

    def channel_weights(self, a: LayerActivations) -> Tensor:
        """Weights [B,K] (or [B,K,h,w] for pixel-wise weights) for the activations ``a.acts``."""
        raise NotImplementedError

    def layer_activations(self, x: Tensor, target: Target) -> LayerActivations:
        """One forward recording the target layer; ∂y/∂A when :attr:`needs_gradients`."""
        layer = self.model.get_submodule(self.target_layer)
        with torch.set_grad_enabled(self.needs_gradients), record_output(
                layer, track_grad=self.needs_gradients) as rec:
            logits = self._logits(x)
        acts = rec.output
        if acts is None:
            raise ConfigError(f"target_layer {self.target_layer!r} was not called in the model's forward; "
                              "pick a layer on the path from input to logits.")
        layout = feature_map_layout(self.model, self.target_layer, acts.shape, tuple(x.shape[-2:]),
                                    reshape=self.reshape, prefix_tokens=self.prefix_tokens, grid=self.grid)
        idx = target.indices(logits)
        grads = None
        if self.needs_gradients:
            (grads,) = torch.autograd.grad(target.select(logits).sum(), acts)
            grads = layout.apply(grads)
        return LayerActivations(x, layout.apply(acts.detach()), grads, logits.detach(), idx)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        a = self.layer_activations(x, target)
        w = self.channel_weights(a)
        cam = torch.einsum("bk,bkhw->bhw", w, a.acts) if w.ndim == 2 else (w * a.acts).sum(1)
        return self.finish(cam, x.shape[-2:])

    def finish(self, cam: Tensor, size: tuple[int, int]) -> Tensor:
        """ReLU, upsample to the input size, optional [0,1] scaling."""
        if self.relu:
            cam = cam.clamp(min=0)
        cam = upsample_maps(cam, tuple(size))
        return minmax_normalize(cam) if self.normalize else cam


def _last_linear(model: nn.Module) -> nn.Linear | None:
    last = None
    for m in model.modules():
        if isinstance(m, nn.Linear):
            last = m
    return last


@register("cam")
class CAM(CAMExplainer):
    """Class activation mapping (Zhou et al., 2016, "Learning Deep Features for Discriminative
    Localization"): w_k = the final linear layer's weight for the target class.

    Needs logits = Linear(GAP(A)) for the target layer's A; this is checked numerically on
    every call, and another head raises :class:`UnsupportedModelError`. No ReLU by default (the
    paper's map keeps negative evidence).
    """

    needs_gradients = False
    default_relu = False

    def channel_weights(self, a: LayerActivations) -> Tensor:
        fc = _last_linear(self.model)
        k = a.acts.shape[1]
        pooled = a.acts.mean((2, 3))
        ok = fc is not None and fc.in_features == k and fc.out_features == a.logits.shape[1]
        if ok:
            expect = F.linear(pooled, fc.weight, fc.bias)
            scale = float(a.logits.abs().max()) + 1.0
            ok = bool(torch.allclose(expect, a.logits, rtol=1e-3, atol=1e-3 * scale))
        if not ok:
            raise UnsupportedModelError(
                f"cam needs a global-average-pool → linear head right after target_layer {self.target_layer!r} "
                f"(logits = Linear(mean_hw(A))), but {type(self.model).__name__}'s logits are not that function of "
                "this layer (e.g. VGG's MLP classifier, DenseNet's ReLU before pooling, or a layer that is not "
                "the last feature map). Use grad_cam, which needs no such head (and equals CAM up to scale when "
                "it exists), or pass target_layer=<the module that feeds the global average pool>.")
        return fc.weight[a.target].to(a.acts.dtype)


@register("grad_cam")
class GradCAM(CAMExplainer):
    """Grad-CAM (Selvaraju et al., 2017): w_k = spatial mean of ∂y_c/∂A_k; ReLU of the sum."""

    def channel_weights(self, a: LayerActivations) -> Tensor:
        return a.grads.mean((2, 3))


@register("grad_cam_pp")
class GradCAMPlusPlus(CAMExplainer):
    """Grad-CAM++ (Chattopadhay et al., 2018): pixel-weighted positive gradients, eq. 19 with the
    exponential-score closed form, as pytorch-grad-cam computes it."""

    def channel_weights(self, a: LayerActivations) -> Tensor:
        g = a.grads
        g2 = g * g
        g3 = g2 * g
        sum_a = a.acts.sum((2, 3), keepdim=True)
        alpha = g2 / (2 * g2 + sum_a * g3 + 1e-6)
        alpha = torch.where(g != 0, alpha, torch.zeros_like(alpha))
        return (g.clamp(min=0) * alpha).sum((2, 3))


@register("score_cam")
class ScoreCAM(CAMExplainer):
    """Score-CAM (Wang et al., 2020): each channel, upsampled and scaled to [0,1], masks the input;
    the target logits of the masked inputs, softmaxed over channels, are the weights (the
    pytorch-grad-cam formulation; masks upsampled with ``align_corners=True`` as there).

    Masked inputs are batched (``internal_batch_size`` images per forward). Channels whose mask
    is all zero (dead or constant maps) all give the zero image, which is forwarded once.
    """

    needs_gradients = False

    def __init__(self, model: nn.Module, target_layer: str | None = None, relu: bool | None = None,
                 normalize: bool = False, internal_batch_size: int = 256, reshape: str = "auto",
                 prefix_tokens: int | None = None, grid: Sequence[int] | None = None) -> None:
        super().__init__(model, target_layer, relu, normalize, reshape, prefix_tokens, grid)
        self.internal_batch_size = check_positive_int("internal_batch_size", internal_batch_size)

    def _masks(self, acts: Tensor, size: tuple[int, int]) -> Tensor:
        """[N,h,w] channel maps → [N,H,W] masks in [0,1] (pytorch-grad-cam's upsample + min-max)."""
        up = F.interpolate(acts[:, None], size=size, mode="bilinear", align_corners=True)[:, 0]
        flat = up.flatten(1)
        lo, hi = flat.amin(1), flat.amax(1)
        return (up - lo[:, None, None]) / (hi - lo + 1e-8)[:, None, None]

    def channel_weights(self, a: LayerActivations) -> Tensor:
        x, acts = a.x, a.acts
        b, k = acts.shape[:2]
        size = (x.shape[-2], x.shape[-1])
        flat_acts = acts.reshape(b * k, *acts.shape[2:])
        chunk = self.internal_batch_size
        with torch.no_grad():
            # pass 1: which (sample, channel) masks are not all zero
            live = torch.cat([self._masks(flat_acts[i:i + chunk], size).flatten(1).ne(0).any(1)
                              for i in range(0, b * k, chunk)])
            zero_logits = self._logits(torch.zeros_like(x[:1]))[0]
            scores = zero_logits[a.target].repeat_interleave(k)  # dead channels: f(0)
            pairs = torch.nonzero(live).flatten()
            # pass 2: forward the masked inputs of the live masks, many per call
            for i in range(0, pairs.numel(), chunk):
                p = pairs[i:i + chunk]
                masks = self._masks(flat_acts[p], size)
                rows = torch.div(p, k, rounding_mode="floor")
                logits = self._logits(x[rows] * masks[:, None])
                scores[p] = logits.gather(1, a.target[rows][:, None]).squeeze(1)
        return torch.softmax(scores.view(b, k), dim=1)


@register("feature_maps")
class FeatureMaps(CAMExplainer):
    """Feature-map visualisation (Zeiler & Fergus, 2014; Yosinski et al., 2015): one channel of
    ``target_layer``, upsampled. ``channel`` picks it; None takes each image's most active
    channel (largest spatial mean). Independent of the target class."""

    needs_gradients = False
    default_relu = False

    def __init__(self, model: nn.Module, target_layer: str | None = None, channel: int | None = None,
                 relu: bool | None = None, normalize: bool = False, reshape: str = "auto",
                 prefix_tokens: int | None = None, grid: Sequence[int] | None = None) -> None:
        super().__init__(model, target_layer, relu, normalize, reshape, prefix_tokens, grid)
        self.channel = None if channel is None else check_positive_int("channel", channel, minimum=0)

    def channel_weights(self, a: LayerActivations) -> Tensor:
        b, k = a.acts.shape[:2]
        if self.channel is None:
            pick = a.acts.mean((2, 3)).argmax(1)
        elif self.channel >= k:
            raise ConfigError(f"channel={self.channel} but target_layer {self.target_layer!r} has {k} channels.")
        else:
            pick = torch.full((b,), self.channel, dtype=torch.long, device=a.acts.device)
        return F.one_hot(pick, k).to(a.acts.dtype)


@register("guided_grad_cam")
class GuidedGradCAM(GradCAM):
    """Guided Grad-CAM (Selvaraju et al., 2017): the Grad-CAM map (at input resolution) times the
    guided-backprop gradient, per input channel (default reduction: max |·| over channels)."""

    default_reduce = "max_abs"

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        cam = super()._attribute(x, target)  # resolves a "predicted" target for the guided pass
        guided = GuidedBackprop(self.model).input_gradient(x, target)
        return cam[:, None] * guided
