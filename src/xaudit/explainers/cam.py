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
from contextlib import ExitStack
from typing import ClassVar

import numpy as np
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.explainers.base import (
    Explainer,
    Target,
    UnsupportedModelError,
    minmax_normalize,
)
from xaudit.explainers.base import upsample as upsample_maps
from xaudit.explainers.gradient import GuidedBackprop
from xaudit.explainers.hooks import record_output, resolve_layer
from xaudit.explainers.registry import register
from xaudit.explainers.tokens import check_reshape_options, feature_map_layout
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import positive_int


class LayerActivations:
    """What a weighting sees: input, activations A, ∂y/∂A (None without gradients), logits, targets,
    the layer's dotted name and its raw output (before the token/channels-last reshape).

    Args:
        x: the explained input [B,C,H,W].
        acts: activations A [B,K,h,w] (after the token/channels-last reshape).
        grads: ∂y/∂A [B,K,h,w], or None for gradient-free methods.
        logits: the model's logits [B, num_classes] (detached).
        target: the explained class per sample, long [B].
        layer: the layer's dotted name.
        raw: the layer's raw output; None: ``acts``.
        channel_dim: the channel dimension of ``raw`` (-1 for tokens / channels-last).
    """

    def __init__(self, x: Tensor, acts: Tensor, grads: Tensor | None, logits: Tensor, target: Tensor,
                 layer: str = "", raw: Tensor | None = None, channel_dim: int = 1) -> None:
        self.x = x
        self.acts = acts
        self.grads = grads
        self.logits = logits
        self.target = target
        self.layer = layer
        self.raw = acts if raw is None else raw
        self.channel_dim = channel_dim  # the channel dimension of ``raw`` (-1 for tokens / channels-last)


#: pytorch-grad-cam's test-time augmentations (``BaseCAM.tta_transforms``): ttach's
#: HorizontalFlip × Multiply(0.9, 1, 1.1), as (flip, factor) in ttach's product order
AUG_SMOOTH: tuple[tuple[bool, float], ...] = tuple((f, m) for f in (False, True) for m in (0.9, 1.0, 1.1))


def scale_cam(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """pytorch-grad-cam's ``scale_cam_image`` without the resize: each map of [..., h, w] to [0,1]
    as ``(m - min) / (max - min + eps)``."""
    flat = maps.flatten(-2)
    lo = flat.amin(-1)[..., None, None]
    hi = flat.amax(-1)[..., None, None]
    return (maps - lo) / (hi - lo + eps)


EIGEN_SIGNS = ("positive", "numpy")


def first_principal_component(maps: Tensor, sign: str = "positive") -> Tensor:
    """Projection of each [K,h,w] stack of [B,K,h,w] on its first principal component → [B,h,w]
    (pytorch-grad-cam's ``get_2d_projection``: NaN → 0, the h·w positions centred, ``A @ Vᵀ[0]``).

    The sign of a singular vector is arbitrary, and it decides which side survives the ReLU.
    Vᵀ[0] comes from ``numpy.linalg.svd`` on the CPU — the call pytorch-grad-cam makes — so the
    sign is pytorch-grad-cam's and the same on every device (torch's LAPACK and GPU solvers pick
    the opposite sign for many matrices). One batched call for all images; the matrices are
    [h·w, K], small; ``full_matrices=False`` (U is not needed; Vᵀ is the same).

    ``sign="numpy"`` keeps that sign (pytorch-grad-cam's maps exactly). It flips under rounding-level
    changes of the input (channels-last memory, another batch size) on near-symmetric matrices, so the
    default ``"positive"`` fixes it: each projection is oriented to correlate positively with the
    centred sum over channels (the plain CAM's direction); numpy's sign is kept where that correlation
    is exactly 0.
    """
    b = maps.shape[0]
    m = torch.where(torch.isnan(maps), torch.zeros_like(maps), maps).flatten(2).transpose(1, 2)
    m = m - m.mean(1, keepdim=True)  # [B, hw, K], centred over positions
    host = m.detach().cpu()
    vt = np.linalg.svd(host.double().numpy(), full_matrices=False)[2]  # float64: ill-conditioned gaps
    v0 = torch.from_numpy(np.ascontiguousarray(vt[:, 0, :])).to(device=m.device, dtype=m.dtype)
    proj = m @ v0[:, :, None]  # [B, hw, 1]
    if sign == "positive":
        agree = (proj[..., 0] * m.sum(-1)).sum(-1)  # [B]: correlation with the channel sum
        proj = torch.where(agree[:, None, None] < 0, -proj, proj)
    elif sign != "numpy":
        raise unknown_choice("eigen_sign", sign, EIGEN_SIGNS, key="explainer.eigen_sign")
    return proj.reshape(b, *maps.shape[2:])


class CAMExplainer(Explainer):
    """Base of the CAM family. ``target_layer`` is a dotted module name (default: the backbone's
    ``default_target_layer``); ``relu`` clips negative evidence; ``normalize`` scales each map
    to [0,1] (pytorch-grad-cam's convention; off by default so maps keep their scale).

    Options every CAM method shares (pytorch-grad-cam's, with its exact arithmetic):

    * ``target_layer`` may be a list of names: one forward (and one backward) records them all,
      each layer's map is ReLU-ed, scaled to [0,1] *at its own resolution*, upsampled, and the
      maps are averaged (``BaseCAM.aggregate_multi_layers``). A fused map is therefore a mean of
      [0,1] maps whatever ``normalize`` says; ``normalize`` scales the mean to [0,1] as there.
    * ``eigen_smooth``: the weighted activations w_k·A_k are replaced by their projection on the
      first principal component (:func:`first_principal_component`) instead of summed over k.
    * ``aug_smooth``: the map is averaged over 6 test-time augmentations (horizontal flip ×
      intensity 0.9/1/1.1), flips undone. With ``normalize`` each augmented map is scaled to [0,1]
      before the mean (pytorch-grad-cam's result, which it does not rescale); without it, raw maps
      are averaged. The 6 copies run as one batch of 6·B; a ``"predicted"`` target is resolved on
      the unaugmented images (pytorch-grad-cam would take each copy's own argmax).

    Transformer layers: ``reshape`` (``auto`` | ``tokens`` | ``channels_last`` | ``none``) says how
    the layer output becomes [B,K,h,w]; ``prefix_tokens`` (class/distillation/register tokens
    before the patch tokens) and ``grid`` ([h, w] of the patch tokens) override what ``auto``
    reads from the model (see :func:`xaudit.explainers.tokens.feature_map_layout`).

    Args:
        model: the classifier (returns logits [B, num_classes]).
        target_layer: dotted module name, or a list of names (fused); None: the backbone's
            ``default_target_layer``.
        relu: clip negative evidence; None: the method's default (``default_relu``).
        normalize: scale each map to [0,1].
        reshape: how the layer output becomes [B,K,h,w]: ``auto`` | ``tokens`` | ``channels_last`` | ``none``.
        prefix_tokens: tokens before the patch tokens (class/distillation/register); None: read from the model.
        grid: [h, w] of the patch tokens; None: read from the model.
        aug_smooth: average over 6 test-time augmentations (flip × intensity).
        eigen_smooth: project the weighted activations on their first principal component.
        eigen_sign: the component's sign: ``positive`` (oriented by the channel sum) or ``numpy``
            (pytorch-grad-cam's).
    """

    needs_gradients: ClassVar[bool] = True
    default_relu: ClassVar[bool] = True

    def __init__(self, model: nn.Module, target_layer: str | Sequence[str] | None = None,
                 relu: bool | None = None, normalize: bool = False, reshape: str = "auto",
                 prefix_tokens: int | None = None, grid: Sequence[int] | None = None, *,
                 aug_smooth: bool = False, eigen_smooth: bool = False, eigen_sign: str = "positive") -> None:
        super().__init__(model)
        if isinstance(target_layer, Sequence) and not isinstance(target_layer, str):
            if len(target_layer) == 0:
                raise ConfigError("target_layer is an empty list; name at least one layer.")
            self.target_layers = [resolve_layer(model, name) for name in target_layer]
        else:
            self.target_layers = [resolve_layer(model, target_layer)]
        self.target_layer = self.target_layers[0] if len(self.target_layers) == 1 else self.target_layers
        self._map_options(relu, normalize, aug_smooth, eigen_smooth, eigen_sign)
        self.reshape, self.prefix_tokens, self.grid = check_reshape_options(reshape, prefix_tokens, grid)

    def _map_options(self, relu: bool | None, normalize: bool, aug_smooth: bool, eigen_smooth: bool,
                     eigen_sign: str) -> None:
        """The options every CAM shares (class docstring), checked and stored."""
        self.relu = self.default_relu if relu is None else bool(relu)
        self.normalize = bool(normalize)
        self.aug_smooth = bool(aug_smooth)
        self.eigen_smooth = bool(eigen_smooth)
        if eigen_sign not in EIGEN_SIGNS:
            raise unknown_choice("eigen_sign", eigen_sign, EIGEN_SIGNS, key="explainer.eigen_sign")
        self.eigen_sign = eigen_sign

    def channel_weights(self, a: LayerActivations) -> Tensor:
        """Weights [B,K] (or [B,K,h,w] for pixel-wise weights) for the activations ``a.acts``."""
        raise NotImplementedError

    def weighted_activations(self, a: LayerActivations) -> Tensor:
        """w_k·A_k as [B,K,h,w] (what ``eigen_smooth`` projects)."""
        w = self.channel_weights(a)
        return w[:, :, None, None] * a.acts if w.ndim == 2 else w * a.acts

    def layer_map(self, a: LayerActivations) -> Tensor:
        """One layer's map [B,h,w] before ReLU: Σ_k w_k·A_k, or its first principal component."""
        if self.eigen_smooth:
            return first_principal_component(self.weighted_activations(a), sign=self.eigen_sign)
        w = self.channel_weights(a)
        return torch.einsum("bk,bkhw->bhw", w, a.acts) if w.ndim == 2 else (w * a.acts).sum(1)

    def record_layers(self, x: Tensor, target: Target) -> list[LayerActivations]:
        """One forward recording every target layer; ∂y/∂A of each when :attr:`needs_gradients`."""
        layers = [self.model.get_submodule(name) for name in self.target_layers]
        with torch.set_grad_enabled(self.needs_gradients), ExitStack() as stack:
            recs = [stack.enter_context(record_output(layer, track_grad=self.needs_gradients))
                    for layer in layers]
            logits = self._logits(x)
        for name, rec in zip(self.target_layers, recs):
            if rec.output is None:
                raise ConfigError(f"target_layer {name!r} was not called in the model's forward; "
                                  "pick a layer on the path from input to logits.")
        idx = target.indices(logits)
        grads: Sequence[Tensor | None] = [None] * len(recs)
        if self.needs_gradients:
            grads = torch.autograd.grad(target.select(logits).sum(), [r.output for r in recs],
                                        allow_unused=True)
        out = []
        for name, rec, g in zip(self.target_layers, recs, grads):
            acts = rec.output
            layout = feature_map_layout(self.model, name, acts.shape, tuple(x.shape[-2:]),
                                        reshape=self.reshape, prefix_tokens=self.prefix_tokens, grid=self.grid)
            if self.needs_gradients and g is None:
                g = torch.zeros_like(acts)
            out.append(LayerActivations(x, layout.apply(acts.detach()), None if g is None else layout.apply(g),
                                        logits.detach(), idx, layer=name, raw=acts.detach(),
                                        channel_dim=1 if layout.mode == "none" else acts.ndim - 1))
        return out

    def layer_activations(self, x: Tensor, target: Target) -> LayerActivations:
        """One forward recording the (first) target layer; ∂y/∂A when :attr:`needs_gradients`."""
        return self.record_layers(x, target)[0]

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        if not self.aug_smooth:
            return self.cam(x, target)
        idx = target.resolve(self._logits, x)
        n = len(AUG_SMOOTH)
        xa = torch.cat([x.flip(-1) * m if flip else x * m for flip, m in AUG_SMOOTH])
        maps = self.cam(xa, Target(idx.repeat(n), n * x.shape[0], x.device)).unflatten(0, (n, x.shape[0]))
        maps = torch.stack([m.flip(-1) if flip else m for (flip, _), m in zip(AUG_SMOOTH, maps)])
        return maps.mean(0)

    def cam(self, x: Tensor, target: Target) -> Tensor:
        """The map [B,H,W] of ``x`` (one pass; ``aug_smooth`` averages several)."""
        size = (x.shape[-2], x.shape[-1])
        per_layer = [self.layer_map(a) for a in self.record_layers(x, target)]
        if len(per_layer) == 1:
            return self.finish(per_layer[0], size)
        return self.fuse(per_layer, size)

    def fuse(self, per_layer: Sequence[Tensor], size: tuple[int, int]) -> Tensor:
        """pytorch-grad-cam's multi-layer fusion: ReLU, [0,1] at each layer's resolution,
        upsample, mean over layers (then [0,1] with ``normalize``)."""
        maps = [upsample_maps(scale_cam(m.clamp(min=0) if self.relu else m), size) for m in per_layer]
        cam = torch.stack(maps).mean(0)
        return minmax_normalize(cam) if self.normalize else cam

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
                f"cam needs a global-average-pool → linear head right after target_layer {a.layer!r} "
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


class ForwardCAM(CAMExplainer):
    """Base of the gradient-free CAMs whose channel weights come from forwards of perturbed copies
    (Score-CAM, Ablation-CAM): ``internal_batch_size`` copies per forward (default per class).

    Args:
        internal_batch_size: perturbed copies per forward; None: the class's
            ``default_internal_batch_size``.
        **others: as :class:`CAMExplainer`.
    """

    needs_gradients = False
    default_internal_batch_size: ClassVar[int] = 256

    def __init__(self, model: nn.Module, target_layer: str | Sequence[str] | None = None,
                 relu: bool | None = None, normalize: bool = False, internal_batch_size: int | None = None,
                 reshape: str = "auto", prefix_tokens: int | None = None, grid: Sequence[int] | None = None,
                 *, aug_smooth: bool = False, eigen_smooth: bool = False, eigen_sign: str = "positive") -> None:
        super().__init__(model, target_layer, relu, normalize, reshape, prefix_tokens, grid,
                         aug_smooth=aug_smooth, eigen_smooth=eigen_smooth, eigen_sign=eigen_sign)
        ibs = self.default_internal_batch_size if internal_batch_size is None else internal_batch_size
        self.internal_batch_size = positive_int(ibs, "internal_batch_size")


@register("score_cam")
class ScoreCAM(ForwardCAM):
    """Score-CAM (Wang et al., 2020): each channel, upsampled and scaled to [0,1], masks the input;
    the target logits of the masked inputs, softmaxed over channels, are the weights (the
    pytorch-grad-cam formulation; masks upsampled with ``align_corners=True`` as there).

    Masked inputs are batched (``internal_batch_size`` images per forward). Channels whose mask
    is all zero (dead or constant maps) all give the zero image, which is forwarded once.
    """

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
    channel (largest spatial mean). Independent of the target class.

    Args:
        channel: the channel shown; None: each image's most active one.
        **others: as :class:`CAMExplainer`.
    """

    needs_gradients = False
    default_relu = False

    def __init__(self, model: nn.Module, target_layer: str | Sequence[str] | None = None,
                 channel: int | None = None, relu: bool | None = None, normalize: bool = False,
                 reshape: str = "auto", prefix_tokens: int | None = None, grid: Sequence[int] | None = None,
                 *, aug_smooth: bool = False, eigen_smooth: bool = False, eigen_sign: str = "positive") -> None:
        super().__init__(model, target_layer, relu, normalize, reshape, prefix_tokens, grid,
                         aug_smooth=aug_smooth, eigen_smooth=eigen_smooth, eigen_sign=eigen_sign)
        self.channel = None if channel is None else positive_int(channel, "channel", minimum=0)

    def channel_weights(self, a: LayerActivations) -> Tensor:
        b, k = a.acts.shape[:2]
        if self.channel is None:
            pick = a.acts.mean((2, 3)).argmax(1)
        elif self.channel >= k:
            raise ConfigError(f"channel={self.channel} but target_layer {a.layer!r} has {k} channels.")
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


# --- the rest of pytorch-grad-cam's CAM family (same names there) ---------------------------------


@register("hires_cam")
class HiResCAM(CAMExplainer):
    """HiResCAM (Draelos & Carin, 2020, "Use HiResCAM instead of Grad-CAM for faithful explanations
    of convolutional neural networks"): Σ_k ∂y/∂A_k ⊙ A_k — the gradient as a pixel-wise weight,
    so the map is exactly the target's first-order contribution of each position."""

    def channel_weights(self, a: LayerActivations) -> Tensor:
        return a.grads


@register("grad_cam_elementwise")
class GradCAMElementWise(CAMExplainer):
    """Grad-CAM element-wise (pytorch-grad-cam's ``GradCAMElementWise``; HiResCAM with the ReLU
    moved inside the sum, Draelos & Carin, 2020): Σ_k relu(∂y/∂A_k ⊙ A_k)."""

    def channel_weights(self, a: LayerActivations) -> Tensor:
        return a.grads

    def weighted_activations(self, a: LayerActivations) -> Tensor:
        return (a.grads * a.acts).clamp(min=0)

    def layer_map(self, a: LayerActivations) -> Tensor:
        w = self.weighted_activations(a)
        return first_principal_component(w, sign=self.eigen_sign) if self.eigen_smooth else w.sum(1)


@register("xgrad_cam")
class XGradCAM(CAMExplainer):
    """XGrad-CAM (Fu et al., 2020, "Axiom-based Grad-CAM"): w_k = Σ_ij (A_k,ij / Σ_ij A_k,ij)·∂y/∂A_k,ij,
    the activation-weighted gradient average (1e-7 added to the denominator, as pytorch-grad-cam)."""

    def channel_weights(self, a: LayerActivations) -> Tensor:
        sum_a = a.acts.sum((2, 3), keepdim=True)
        return (a.grads * a.acts / (sum_a + 1e-7)).sum((2, 3))


@register("layer_cam")
class LayerCAM(CAMExplainer):
    """LayerCAM (Jiang et al., 2021, "LayerCAM: Exploring hierarchical class activation maps for
    localization", IEEE TIP): Σ_k relu(∂y/∂A_k) ⊙ A_k — positive gradients as pixel-wise weights,
    meant for shallow layers too (pair with a list ``target_layer`` to fuse several)."""

    def channel_weights(self, a: LayerActivations) -> Tensor:
        return a.grads.clamp(min=0)


@register("eigen_cam")
class EigenCAM(CAMExplainer):
    """Eigen-CAM (Muhammad & Yeasin, 2020, "Eigen-CAM: Class Activation Map using Principal
    Components"): the projection of A on its first principal component; class-independent and
    gradient-free. (Always a projection: ``eigen_smooth`` changes nothing.)"""

    needs_gradients = False

    def weighted_activations(self, a: LayerActivations) -> Tensor:
        return a.acts

    def layer_map(self, a: LayerActivations) -> Tensor:
        return first_principal_component(a.acts, sign=self.eigen_sign)


@register("eigen_grad_cam")
class EigenGradCAM(CAMExplainer):
    """Eigen-Grad-CAM (pytorch-grad-cam's ``EigenGradCAM``, after Muhammad & Yeasin, 2020): the first
    principal component of ∂y/∂A ⊙ A, which makes the Eigen-CAM class-discriminative."""

    def weighted_activations(self, a: LayerActivations) -> Tensor:
        return a.grads * a.acts

    def layer_map(self, a: LayerActivations) -> Tensor:
        return first_principal_component(a.grads * a.acts, sign=self.eigen_sign)


#: pytorch-grad-cam's AblationLayer: channels of a layer whose minimum is not 0 are ablated to min − 1e7
ABLATION_OFFSET = 1e7


@register("ablation_cam")
class AblationCAM(ForwardCAM):
    """Ablation-CAM (Desai & Ramaswamy, 2020, "Ablation-CAM: Visual Explanations for Deep
    Convolutional Network via Gradient-free Localization", WACV): w_k = (y_c − y_c^k) / y_c, the
    relative drop of the target logit when channel k of the target layer is ablated.

    Ablated as pytorch-grad-cam's ``AblationLayer``: to 0 when the image's activation minimum is 0
    (post-ReLU layers), else to that minimum − 1e7. (pytorch-grad-cam re-reads the minimum after
    each row it ablates, so its k-th copy in a batch gets min − k·1e7 on layers with negative
    values; here every copy uses min − 1e7.) The ablated activations replace the layer's output —
    the layer itself does not run — in batches of ``internal_batch_size`` (image, channel) copies,
    all images together, plus one unablated copy of each image in the batch: y − y_k is taken
    within one forward (pytorch-grad-cam takes y from a separate one; same value up to rounding). A channel already
    equal to the ablation value everywhere (a dead ReLU channel) cannot change the logits: it is not forwarded and
    gets weight 0 (its A_k is 0 anyway).
    """

    default_internal_batch_size = 128

    def channel_weights(self, a: LayerActivations) -> Tensor:
        raw, x = a.raw, a.x
        b, k = a.acts.shape[:2]
        cdim = a.channel_dim
        chans = raw.movedim(cdim, 1)  # [B,K,...]
        lo = chans.flatten(1).amin(1)
        value = torch.where(lo == 0, torch.zeros_like(lo), lo - ABLATION_OFFSET)  # per image
        per_channel = chans.flatten(2)
        live = (per_channel != value[:, None, None]).any(2).flatten()  # [B·K]: ablating changes something
        orig = a.logits.gather(1, a.target[:, None]).squeeze(1)
        drops = torch.zeros(b * k, dtype=a.logits.dtype, device=a.logits.device)  # y − y_k; dead: 0
        pairs = torch.nonzero(live).flatten()
        layer = self.model.get_submodule(a.layer)
        chunk = self.internal_batch_size
        replacement: list[Tensor] = []
        # the layer's output is replaced, so the layer is skipped (as pytorch-grad-cam's module swap)
        layer.forward = lambda *args, **kwargs: replacement[0]
        try:
            with torch.no_grad():
                for i in range(0, pairs.numel(), chunk):
                    p = pairs[i:i + chunk]
                    rows = torch.div(p, k, rounding_mode="floor")
                    uniq, pos = torch.unique(rows, return_inverse=True)
                    ablated = raw[rows].clone()
                    ablated.movedim(cdim, 1)[torch.arange(p.numel(), device=p.device), p % k] = (
                        value[rows].view(-1, *([1] * (raw.ndim - 2))))
                    # each image's unablated copy rides in the same forward: y − y_k is then a difference
                    # of two outputs of one kernel call, whose rounding cancels (y − y_k is small, and
                    # float32 kernels picked per batch size would otherwise dominate it)
                    replacement[:] = [torch.cat([raw[uniq], ablated])]
                    all_rows = torch.cat([uniq, rows])
                    y = self._logits(x[all_rows]).gather(1, a.target[all_rows][:, None]).squeeze(1)
                    drops[p] = y[:uniq.numel()][pos] - y[uniq.numel():]
        finally:
            del layer.forward
        return drops.view(b, k) / orig[:, None]


def _bias_layers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """pytorch-grad-cam's FullGrad layers: every Conv2d and BatchNorm2d (exact types) with a bias."""
    return [(n, m) for n, m in model.named_modules()
            if type(m) in (nn.Conv2d, nn.BatchNorm2d) and m.bias is not None]


def _effective_bias(m: nn.Module) -> Tensor:
    """The bias a layer adds: a conv's bias; a BatchNorm's β − μ·γ/√(σ²+ε) (running statistics)."""
    if isinstance(m, nn.BatchNorm2d):
        mean = m.running_mean if m.running_mean is not None else torch.zeros_like(m.bias)
        var = m.running_var if m.running_var is not None else torch.ones_like(m.bias)
        return (m.bias - mean * m.weight / torch.sqrt(var + m.eps)).detach()
    return m.bias.detach()


@register("full_grad")
class FullGrad(CAMExplainer):
    """FullGrad (Srinivas & Fleuret, 2019, "Full-Gradient Representation for Neural-Network
    Visualization", NeurIPS): |x ⊙ ∂y/∂x| plus, for every Conv2d/BatchNorm2d with a bias,
    Σ_k |b_k · ∂y/∂z_k| (z the layer output), each channel scaled to [0,1] before it is upsampled
    and summed — pytorch-grad-cam's ``FullGrad``. ``target_layer`` is ignored (all bias layers are
    used); one forward and one backward give every term, and the per-channel maps are summed at
    each layer's resolution and upsampled once (bilinear upsampling is linear, so this equals
    pytorch-grad-cam's upsample-then-sum). ``eigen_smooth``: the terms' first principal component
    (the C input-channel maps and one map per layer) at 1/8 resolution, as there. Raw maps are a sum of [0,1] terms;
    ``normalize`` scales to [0,1].

    Args:
        model: the classifier (returns logits [B, num_classes]).
        target_layer: ignored (every bias layer is used); accepted so configs can share options.
        relu: clip negative values; None: the class default.
        normalize: scale each map to [0,1].
        aug_smooth: average over 6 test-time augmentations (flip × intensity).
        eigen_smooth: first principal component of the terms instead of their sum.
        eigen_sign: the component's sign: ``positive`` or ``numpy`` (pytorch-grad-cam's).
    """

    def __init__(self, model: nn.Module, target_layer: str | Sequence[str] | None = None,
                 relu: bool | None = None, normalize: bool = False, *, aug_smooth: bool = False,
                 eigen_smooth: bool = False, eigen_sign: str = "positive") -> None:
        Explainer.__init__(self, model)
        self.target_layers, self.target_layer = [], None  # ignored, as in pytorch-grad-cam
        self._map_options(relu, normalize, aug_smooth, eigen_smooth, eigen_sign)

    def cam(self, x: Tensor, target: Target) -> Tensor:
        size = (x.shape[-2], x.shape[-1])
        named = _bias_layers(self.model)
        xg = x.detach().requires_grad_(True)
        with ExitStack() as stack:
            recs = [stack.enter_context(record_output(m, track_grad=True)) for _, m in named]
            logits = self._logits(xg)
        used = [(m, r.output) for (_, m), r in zip(named, recs) if r.output is not None]
        grads = torch.autograd.grad(target.select(logits).sum(), [xg, *(o for _, o in used)], allow_unused=True)
        terms = list(scale_cam((grads[0] * x).abs()).unbind(1))  # input terms: each colour channel to [0,1]
        for (m, _), g in zip(used, grads[1:]):
            if g is None or g.ndim != 4:
                continue
            bias = _effective_bias(m).to(g.dtype)
            terms.append(upsample_maps(scale_cam((bias[None, :, None, None] * g).abs()).sum(1), size))
        if not self.eigen_smooth:
            return self.finish(torch.stack(terms).sum(0), size)
        small = (size[0] // 8, size[1] // 8)
        stack_ = torch.stack(terms, 1)  # [B, C + layers, H, W]: colour channels apart, as there
        low = F.interpolate(scale_cam(stack_), size=small, mode="bilinear", align_corners=False)
        proj = first_principal_component(low, sign=self.eigen_sign)
        return self.finish(upsample_maps(scale_cam(proj), size), size)
