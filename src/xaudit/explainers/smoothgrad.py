"""SmoothGrad wrapper: average any explainer over noisy copies of the input."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from xaudit.explainers.base import Explainer, Target, check_positive_int
from xaudit.explainers.registry import create, register
from xaudit.utils.errors import ConfigError, unknown_choice

VARIANTS: tuple[str, ...] = ("sg", "sg2", "vargrad")


@register("smoothgrad")
class SmoothGrad(Explainer):
    """SmoothGrad (Smilkov et al., 2017) and its variants over any ``base`` explainer.

    ``n`` noisy copies x + ε, ε ~ N(0, (σ·(max x − min x))²) with ``sigma`` relative to each
    image's value range; ``variant`` "sg" averages the base's per-channel attributions, "sg2"
    their squares (Hooker et al., 2019, SmoothGrad-Squared) and "vargrad" takes their variance
    (Adebayo et al., 2018). The noise comes from a local generator seeded by ``seed`` and one
    noise pattern (scaled per image) serves the whole batch, so each image's map does not depend
    on the rest of the batch. Extra keywords go to the base explainer.
    """

    def __init__(self, model: nn.Module, base: str = "saliency", n: int = 25, sigma: float = 0.15,
                 variant: str = "sg", seed: int = 0, internal_batch_size: int = 64, **base_kwargs: Any) -> None:
        super().__init__(model)
        self.base = create(base, model, **base_kwargs)
        self.n = check_positive_int("n", n)
        if float(sigma) < 0:
            raise ConfigError(f"sigma must be ≥0 (a fraction of the input range); got {sigma}.")
        self.sigma = float(sigma)
        if variant not in VARIANTS:
            raise unknown_choice("smoothgrad variant", variant, VARIANTS)
        self.variant = variant
        self.seed = int(seed)
        self.internal_batch_size = check_positive_int("internal_batch_size", internal_batch_size)
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
        for start in range(0, self.n, per_call):
            eps = noise[start:start + per_call]
            k = eps.shape[0]
            noisy = (x[None] + eps).reshape(k * b, *x.shape[1:])
            a = self.base._attribute(noisy, Target(idx.repeat(k), k * b, x.device)).detach()
            a = a.view(k, b, *a.shape[1:])
            total = total + a.sum(0)
            total_sq = total_sq + (a * a).sum(0)
        mean = total / self.n
        if self.variant == "sg":
            return mean
        if self.variant == "sg2":
            return total_sq / self.n
        return total_sq / self.n - mean * mean
