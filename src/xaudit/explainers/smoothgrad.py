"""SmoothGrad wrapper: average any explainer over noisy copies of the input.

The default follows Hooker et al. (2019, "A Benchmark for Interpretability Methods in Deep Neural
Networks", the ROAR paper): the noisy estimates are the raw, signed input gradients per channel;
SmoothGrad is their mean, SmoothGrad² the mean of their squares and VarGrad their variance over
the noise samples, and only the aggregate is reduced over channels.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from xaudit.explainers.base import Explainer, Target
from xaudit.explainers.registry import create, register
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import positive_int

VARIANTS: tuple[str, ...] = ("sg", "sg2", "vargrad")
#: base names that SmoothGrad resolves itself: "gradient" is the signed ∂y/∂x (saliency with
#: abs=False), the estimate Hooker et al. (2019) average; "saliency" stays |∂y/∂x| (Captum's default)
BASE_ALIASES: dict[str, tuple[str, dict[str, Any]]] = {"gradient": ("saliency", {"abs": False})}


def make_base(base: str, model: nn.Module, **base_kwargs: Any) -> Explainer:
    """The explainer whose per-channel maps SmoothGrad aggregates: a registered name, or
    "gradient" (the signed raw gradient, which takes no options)."""
    if not isinstance(base, str):
        raise ConfigError(f"smoothgrad base must be an explainer name (or 'gradient'); got {base!r}.")
    if base in BASE_ALIASES:
        if base_kwargs:
            raise ConfigError(
                f"smoothgrad base={base!r} is the signed raw gradient and takes no options; got "
                f"{sorted(base_kwargs)}. Use base='saliency' with its options instead.")
        name, kwargs = BASE_ALIASES[base]
        return create(name, model, **kwargs)
    return create(base, model, **base_kwargs)


@register("smoothgrad")
class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al., 2017) and its variants over any ``base`` explainer.

    ``n`` noisy copies x + ε, ε ~ N(0, (σ·(max x − min x))²) with ``sigma`` relative to each
    image's value range. The base's per-channel attributions a_k of the copies are aggregated per
    channel and pixel — ``variant`` "sg": mean_k a_k; "sg2": mean_k a_k² (SmoothGrad-Squared,
    Hooker et al., 2019); "vargrad": mean_k a_k² − (mean_k a_k)², the population variance
    (Adebayo et al., 2018) — and the aggregate is then reduced over channels by the default
    reduction of the base.

    Default ``base="gradient"``: a_k is the signed gradient ∂y/∂x at x + ε_k, as Hooker et al.
    (2019) and Captum's ``NoiseTunnel(Saliency)`` with ``abs=False``; the channel reduction is the
    sum (for "sg2" and "vargrad", ≥0 per channel, it equals "abs_sum"). ``base="saliency"`` — the
    earlier default — aggregates |∂y/∂x| (Captum's ``Saliency`` default) and reduces by the max
    over channels: a deviation from Hooker et al. (its VarGrad is the variance of |g|, not of g).
    Any other registered explainer works as a base; extra keywords go to it. ``n=25`` and
    ``sigma=0.15`` are the PAIR saliency library's ``GetSmoothedMask`` defaults, which ROAR's code
    calls. VarGrad merges per-chunk sums of squared deviations (no E[a²] − E[a]² cancellation).

    The noise comes from a local generator seeded by ``seed`` and one noise pattern (scaled per
    image) serves the whole batch, so each image's map does not depend on the rest of the batch.

    Args:
        model: the classifier (returns logits [B, num_classes]).
        base: the explainer applied to each noisy copy: ``gradient`` (signed ∂y/∂x) or any registered name.
        n: noisy copies per image.
        sigma: noise standard deviation as a fraction of each image's value range.
        variant: ``sg`` (mean), ``sg2`` (mean of squares) or ``vargrad`` (variance).
        seed: seeds the noise (a local generator).
        internal_batch_size: noisy copies per forward of the base.
        **base_kwargs: options of the ``base`` explainer.
    """

    def __init__(self, model: nn.Module, base: str = "gradient", n: int = 25, sigma: float = 0.15,
                 variant: str = "sg", seed: int = 0, internal_batch_size: int = 64, **base_kwargs: Any) -> None:
        super().__init__(model)
        self.base_name = base
        self.base = make_base(base, model, **base_kwargs)
        self.n = positive_int(n, "n")
        if float(sigma) < 0:
            raise ConfigError(f"sigma must be ≥0 (a fraction of the input range); got {sigma}.")
        self.sigma = float(sigma)
        if variant not in VARIANTS:
            raise unknown_choice("smoothgrad variant", variant, VARIANTS)
        self.variant = variant
        self.seed = int(seed)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.default_reduce = self.base.default_reduce

    def noise(self, x: Tensor) -> Tensor:
        """The noise [n,B,C,H,W] added to ``x`` (same seed and image → same noise)."""
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        z = torch.randn((self.n, 1, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
        flat = x.flatten(1)
        scale = self.sigma * (flat.amax(1) - flat.amin(1))
        return z * scale.view(1, -1, 1, 1, 1)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        idx = target.resolve(self._logits, x)
        noise = self.noise(x)
        b = x.shape[0]
        per_call = max(1, self.internal_batch_size // b)
        total: Tensor | float = 0.0
        total_sq: Tensor | float = 0.0
        mean: Tensor | float = 0.0
        m2: Tensor | float = 0.0  # Σ (a_k − mean)², merged chunk by chunk (Chan et al.): never < 0
        seen = 0
        for start in range(0, self.n, per_call):
            eps = noise[start:start + per_call]
            k = eps.shape[0]
            noisy = (x[None] + eps).reshape(k * b, *x.shape[1:])
            a = self.base._attribute(noisy, Target(idx.repeat(k), k * b, x.device)).detach()
            a = a.view(k, b, *a.shape[1:])
            total = total + a.sum(0)
            total_sq = total_sq + (a * a).sum(0)
            if self.variant == "vargrad":
                chunk_mean = a.mean(0)
                delta = chunk_mean - mean
                m2 = m2 + (a - chunk_mean).pow(2).sum(0) + delta * delta * (seen * k / (seen + k))
                mean = mean + delta * (k / (seen + k))
                seen += k
        if self.variant == "sg":
            return total / self.n
        if self.variant == "sg2":
            return total_sq / self.n
        return m2 / self.n  # the population variance over the n samples
