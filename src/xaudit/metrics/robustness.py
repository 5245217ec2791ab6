"""Explanation robustness: how much a map changes when the input barely does.

- :class:`MaxSensitivity` (Yeh et al., 2019, "On the (in)fidelity and sensitivity of
  explanations"): ``max_j ||Φ(x+δ_j) − Φ(x)||_F / ||Φ(x)||_F`` with δ_j ~ U(−r, r) per element;
- :class:`LocalLipschitz` (Alvarez-Melis & Jaakkola, 2018, "On the robustness of interpretability
  methods"): ``max_j ||Φ(x+δ_j) − Φ(x)||_2 / ||δ_j||_2`` with δ_j ~ N(0, σ²).

Both follow Quantus' definitions (``quantus.MaxSensitivity`` / ``LocalLipschitzEstimate``, ``abs=False``)
and give the same values on the same noise (tests/metrics/test_robustness.py). Lower is more robust.
``normalise=True`` divides every map, the clean one and each noisy one, by its own max |Φ| first
(Quantus' ``normalise_by_max``, taken per image rather than over the whole batch). It is the default
for ``LocalLipschitz``, whose ratio is otherwise in the map's own units: a gradient map and a [0, 1]
map could not be compared, and the audit ranks methods on it. ``MaxSensitivity`` is already
relative to ||Φ(x)|| and defaults to ``normalise=False``, Yeh et al.'s definition.

The explanation of the same target is recomputed on all ``n`` noisy copies of a batch in chunks of
``internal_batch_size`` images; the noise comes from a generator seeded by ``seed`` and each image's
own bits (the explainers' ``image_seeds``), so values are bit-reproducible, independent of batch
composition and DDP rank, and the global RNG is untouched. ``update(x, attr, target, explainer)``:
the explainer that produced ``attr`` (the audit and the monitor pass it).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from xaudit.explainers.base import Explainer
from xaudit.metrics.base import (
    ModelHolder,
    XAuditMetric,
    check_attribution,
    check_explainer,
    check_images,
    check_target,
    evaluating,
)
from xaudit.metrics.registry import register_metric
from xaudit.ops.seeds import image_seeds
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import positive_float, positive_int

#: added to denominators, as Quantus does (a constant map then has sensitivity 0, not 0/0)
EPS = 1e-10

#: what a noise scale is, for error messages
NOISE_SCALE = "the noise scale, in the units of the normalised images; e.g. 0.05"


def check_positive_float(value: Any, key: str) -> float:
    """A noise scale: a finite number > 0 (alias of :func:`xaudit.utils.validation.positive_float`)."""
    return positive_float(value, key, NOISE_SCALE)


class _Robustness(ModelHolder, XAuditMetric):
    """Shared Monte-Carlo loop: draw noise, re-explain, keep the max ratio per image."""

    higher_is_better: ClassVar[bool] = False
    update_inputs: ClassVar[tuple[str, ...]] = ("x", "attr", "target", "explainer")
    noise_key: ClassVar[str] = ""

    def __init__(self, model: nn.Module, n: int = 10, seed: int = 0, internal_batch_size: int = 64,
                 normalise: bool = False, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.n = positive_int(n, "n")
        self.seed = int(seed)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        if not isinstance(normalise, bool):
            raise ConfigError(f"normalise={normalise!r} must be true or false (divide each map by its max |value| "
                              "before comparing).")
        self.normalise = normalise

    def noise(self, x: Tensor) -> Tensor:
        """The ``n`` perturbations [n,B,C,H,W] of ``x`` (same seed and image → same noise)."""
        return seeded_noise(x, self.n, self.seed, lambda shape, g: self._draw(shape, g, x))

    def _draw(self, shape: torch.Size, g: torch.Generator, x: Tensor) -> Tensor:
        raise NotImplementedError

    def _ratio(self, diff: Tensor, attr: Tensor, delta: Tensor) -> Tensor:
        raise NotImplementedError

    def update(self, x: Tensor, attr: Tensor, target: Tensor, explainer: Explainer,
               noise: Tensor | None = None) -> None:
        """Score a batch; ``noise`` [n,B,C,H,W] replaces the seeded draws (parity tests)."""
        delta = checked_noise(self, x, attr, target, explainer, noise)
        n, b = delta.shape[:2]
        noisy = (x[None] + delta).flatten(0, 1)
        targets = target.repeat(n)
        maps = []
        with evaluating(self.model, grad=True):
            for i in range(0, noisy.shape[0], self.internal_batch_size):
                maps.append(explainer.attribute(noisy[i:i + self.internal_batch_size],
                                                targets[i:i + self.internal_batch_size]).float())
        perturbed = torch.cat(maps).view(n, b, -1)
        clean = attr.float().flatten(1)[None]
        if self.normalise:
            perturbed, clean = _by_max(perturbed), _by_max(clean)
        ratios = self._ratio(perturbed - clean, clean, delta.float().flatten(2))  # [n,B]
        self._add_values(self._reduce(ratios))

    def _reduce(self, ratios: Tensor) -> Tensor:
        """One value per image from the [n,B] ratios: their max (subclasses may average)."""
        return ratios.amax(0)


def seeded_noise(x: Tensor, n: int, seed: int, draw: Callable[[torch.Size, torch.Generator], Tensor]) -> Tensor:
    """``n`` perturbations [n,B,C,H,W] of ``x``: ``draw(shape, generator)`` per image, the generator
    seeded from the image's bits and ``seed`` (batch- and rank-independent, global RNG untouched)."""
    out = torch.empty((n, *x.shape), dtype=x.dtype, device=x.device)
    g = torch.Generator(device=x.device)
    for i, s in enumerate(image_seeds(x, seed)):
        g.manual_seed(s)
        out[:, i] = draw(out[:, i].shape, g)
    return out


def checked_noise(metric: Any, x: Tensor, attr: Tensor, target: Tensor, explainer: Any,
                  noise: Tensor | None) -> Tensor:
    """A noise-based robustness metric's inputs checked, and its perturbations [n,B,C,H,W]: the metric's
    seeded ``noise(x)``, or ``noise`` given by the caller (parity tests) checked against ``x``."""
    name = type(metric).__name__
    check_images(x, name)
    check_attribution(attr, name, x)
    check_target(target, x.shape[0], name)
    check_explainer(explainer, name)
    delta = metric.noise(x) if noise is None else noise.to(x)
    if delta.ndim != 5 or tuple(delta.shape[1:]) != tuple(x.shape):
        raise ValueError(f"{name}: noise must be [n,B,C,H,W] with [B,C,H,W]={list(x.shape)}; "
                         f"got {list(delta.shape)}.")
    return delta


def _by_max(maps: Tensor) -> Tensor:
    """Each flattened map [..., D] divided by its max |value|; an all-zero map stays zero."""
    peak = maps.abs().amax(-1, keepdim=True)
    return maps / torch.where(peak > 0, peak, torch.ones_like(peak))


@register_metric("max_sensitivity")
class MaxSensitivity(_Robustness):
    """Max relative change of the map under uniform noise of radius ``radius`` (Yeh et al., 2019)."""

    family = "robustness"
    measures = "largest change of the map under small input noise"

    paper: ClassVar[str] = "Yeh et al., On the (in)fidelity and sensitivity of explanations, NeurIPS 2019"

    def __init__(self, model: nn.Module, radius: float = 0.05, n: int = 10, seed: int = 0,
                 internal_batch_size: int = 64, normalise: bool = False, **kwargs: Any) -> None:
        super().__init__(model, n=n, seed=seed, internal_batch_size=internal_batch_size, normalise=normalise,
                         **kwargs)
        self.radius = positive_float(radius, "radius", NOISE_SCALE)

    def _draw(self, shape: torch.Size, g: torch.Generator, x: Tensor) -> Tensor:
        return (torch.rand(shape, generator=g, device=x.device, dtype=x.dtype) * 2 - 1) * self.radius

    def _ratio(self, diff: Tensor, attr: Tensor, delta: Tensor) -> Tensor:
        return diff.norm(dim=-1) / (attr.norm(dim=-1) + EPS)


@register_metric("local_lipschitz")
class LocalLipschitz(_Robustness):
    """Max ||ΔΦ|| / ||Δx|| under Gaussian noise of std ``sigma`` (Alvarez-Melis & Jaakkola, 2018).

    ``normalise=True`` (default): maps are divided by their max |Φ| first, so methods whose maps
    differ in scale (gradients, [0, 1] masks, relevances in logit units) are compared fairly.
    """

    family = "robustness"
    measures = "largest ratio of map change to input change in a noise neighbourhood"

    paper: ClassVar[str] = "Alvarez-Melis & Jaakkola, On the robustness of interpretability methods, 2018"

    def __init__(self, model: nn.Module, sigma: float = 0.1, n: int = 10, seed: int = 0,
                 internal_batch_size: int = 64, normalise: bool = True, **kwargs: Any) -> None:
        super().__init__(model, n=n, seed=seed, internal_batch_size=internal_batch_size, normalise=normalise,
                         **kwargs)
        self.sigma = positive_float(sigma, "sigma", NOISE_SCALE)

    def _draw(self, shape: torch.Size, g: torch.Generator, x: Tensor) -> Tensor:
        return torch.randn(shape, generator=g, device=x.device, dtype=x.dtype) * self.sigma

    def _ratio(self, diff: Tensor, attr: Tensor, delta: Tensor) -> Tensor:
        return diff.norm(dim=-1) / (delta.norm(dim=-1) + EPS)
