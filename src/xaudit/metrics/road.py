"""ROAD: RemOve And Debias (Rong, Leemann, Borisov, Kasneci & Kasneci, ICML 2022).

Pixels are removed most-relevant-first (MoRF) or least-relevant-first (LeRF) and *imputed* by
noisy linear imputation: every removed pixel becomes the weighted mean of its 8 neighbours
(1/6 direct, 1/12 diagonal; weights of neighbours outside the image dropped) plus Gaussian noise.
The imputed values of all removed pixels are the solution of one sparse linear system per image
and channel; here it is solved matrix-free on the device — the system matrix is a masked 3×3
stencil (a Dirichlet graph Laplacian, symmetric positive definite whenever one pixel is kept), so
a Jacobi-preconditioned conjugate gradient solves every image × variant × channel system at once.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.metrics.base import (
    OUTPUTS,
    ModelHolder,
    XAuditMetric,
    blockwise_scores,
    check_attribution,
    check_images,
    check_target,
    check_target_range,
    evaluating,
    model_logits,
    target_scores,
)
from xaudit.metrics.registry import register_metric
from xaudit.ops.seeds import image_seeds
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import choice, positive_int

#: pytorch-grad-cam's ROADCombined default (the paper's 10 %..90 % grid)
DEFAULT_PERCENTILES: tuple[float, ...] = (10, 20, 30, 40, 50, 60, 70, 80, 90)


def _stencil(device: torch.device, dtype: torch.dtype) -> Tensor:
    """The neighbour weights of the paper's imputer as a 3×3 kernel (centre 0)."""
    k = torch.tensor([[1 / 12, 1 / 6, 1 / 12], [1 / 6, 0.0, 1 / 6], [1 / 12, 1 / 6, 1 / 12]], dtype=dtype)
    return k.to(device).view(1, 1, 3, 3)


def linear_impute(x: Tensor, removed: Tensor, tol: float = 1e-10, max_iter: int | None = None) -> tuple[Tensor, Tensor]:
    """Noise-free linear imputation of ``removed`` pixels of images ``x`` [N,C,H,W] (``removed`` bool [N,H,W]).

    Solves, for every removed pixel i and channel, s_i·v_i − Σ_{removed j∈N(i)} w_ij·v_j =
    Σ_{kept j∈N(i)} w_ij·x_j (s_i: the weights of i's in-image neighbours) — the system of
    pytorch-grad-cam's / the paper's ``NoisyLinearImputer`` — by Jacobi-preconditioned CG, all
    N×C systems in parallel, until each residual is ≤ ``tol`` × its right-hand side (default
    ``max_iter``: 4·(H+W)+50 iterations, ample for the Laplacian's √condition ~ image side).
    Returns the imputed images (in ``x``'s dtype) and the final relative residual per image [N].
    An image with every pixel removed has no solution: its removed pixels come back NaN.
    """
    h, w = x.shape[-2:]
    dtype = torch.float32 if x.device.type == "mps" else torch.float64
    kernel = _stencil(x.device, dtype)
    u = removed.to(dtype)[:, None]  # 1 where imputed
    xs = x.to(dtype)

    def conv(t: Tensor) -> Tensor:
        return F.conv2d(t.reshape(-1, 1, h, w), kernel, padding=1).view(t.shape)

    s = conv(torch.ones(1, 1, h, w, dtype=dtype, device=x.device))  # in-image weight sum per pixel

    def apply(v: Tensor) -> Tensor:
        return u * (s * v - conv(u * v))

    b = u * conv((1 - u) * xs)
    v = torch.zeros_like(b)
    r = b.clone()
    z = r / s
    p = z.clone()
    rz = (r * z).sum((2, 3), keepdim=True)
    b_norm = b.flatten(2).norm(dim=2)[..., None, None].clamp_min(torch.finfo(dtype).tiny)
    iters = 4 * (h + w) + 50 if max_iter is None else max_iter
    for i in range(iters):
        ap = apply(p)
        den = (p * ap).sum((2, 3), keepdim=True)
        alpha = torch.where(den > 0, rz / den.where(den > 0, 1.0), 0.0)
        v = v + alpha * p
        r = r - alpha * ap
        if i % 10 == 9 and bool((r.flatten(2).norm(dim=2)[..., None, None] <= tol * b_norm).all()):
            break
        z = r / s
        rz_new = (r * z).sum((2, 3), keepdim=True)
        beta = torch.where(rz > 0, rz_new / rz.where(rz > 0, 1.0), 0.0)
        p = z + beta * p
        rz = rz_new
    residual = (apply(v) - b).flatten(1).norm(dim=1) / b.flatten(1).norm(dim=1).clamp_min(torch.finfo(dtype).tiny)
    everything = removed.flatten(1).all(1)[:, None, None, None]
    v = torch.where(everything, float("nan"), v)
    out = torch.where(removed[:, None], v, xs)
    return out.to(x.dtype), residual


def road_keep_masks(attr: Tensor, percentiles: Sequence[float]) -> Tensor:
    """The pixels *kept* [B, 2P, H, W]: MoRF for each percentile, then LeRF for each.

    As pytorch-grad-cam's ``RemoveMostRelevantFirst(p)``: keep where attr < the p-th percentile
    of the map (linear interpolation, as ``np.percentile``); so percentile p removes ≈(100−p) % of
    the pixels, the most relevant. ``RemoveLeastRelevantFirst(p)`` does the same on 1 − attr.
    """
    b = attr.shape[0]
    flat = attr.reshape(b, -1).to(torch.float64 if attr.device.type != "mps" else torch.float32)
    q = torch.tensor([float(p) / 100 for p in percentiles], dtype=flat.dtype, device=attr.device)
    out = []
    for values in (flat, 1 - attr.reshape(b, -1).to(flat.dtype)):
        thr = torch.quantile(values, q, dim=1).T  # [B,P]
        out.append(values[:, None, :] < thr[:, :, None])
    return torch.cat(out, dim=1).view(b, 2 * len(percentiles), *attr.shape[-2:])


def check_percentiles(percentiles: Sequence[float]) -> tuple[float, ...]:
    """Percentiles must be a non-empty list of numbers strictly inside (0, 100)."""
    try:
        values = tuple(float(p) for p in percentiles)
    except TypeError as err:
        raise ConfigError(f"percentiles={percentiles!r} must be a list of numbers in (0, 100), "
                          "e.g. percentiles=[10, 20, 30, 40, 50, 60, 70, 80, 90].") from err
    bad = [p for p in values if not 0 < p < 100]
    if not values or bad:
        raise ConfigError(f"percentiles={list(percentiles)!r}: every percentile must lie strictly inside (0, 100) "
                          f"(bad: {bad or 'empty list'}); use e.g. percentiles=[10, 20, 30, 40, 50, 60, 70, 80, 90].")
    return values


@register_metric("road")
class ROAD(ModelHolder, XAuditMetric):
    """ROAD combined score (Rong et al., "A Consistent and Efficient Evaluation Strategy for
    Attribution Methods", ICML 2022), as pytorch-grad-cam's ``ROADCombined``; higher is better.

    For each percentile p the map's p-th percentile splits the pixels: MoRF removes those at or
    above it (≈ the top (100−p) %), LeRF the same on 1 − attr (≈ the bottom (100−p) %), and the
    removed pixels are imputed by noisy linear imputation (:func:`linear_impute` plus
    ``noise`` × N(0,1), the paper's/pytorch-grad-cam's ``NoisyLinearImputer(noise=0.01)``) in the
    images' normalised units. The curves are the change in the explained class's ``output``
    (softmax ``prob``, or ``logit``) from the unperturbed image; the score is the mean over
    percentiles of (LeRF − MoRF)/2 (:meth:`morf_curves`, :meth:`lerf_curves` give [N, P]).

    Deviations: the noise is drawn from a generator seeded per image (``seed`` and its bits) so a
    sample scores the same in any batch and on any DDP rank (pytorch-grad-cam: the global torch
    RNG); the linear system is solved by CG to a relative residual ``tol`` instead of scipy's
    direct ``spsolve`` (equal to 1e-6 relative or better, see the tests); an image with every pixel
    removed (a constant map) gives NaN where scipy's solver fails on a singular matrix.
    ``percentiles`` follow pytorch-grad-cam's meaning (threshold percentile, not removed percent).
    """

    family = "faithfulness"
    measures = ("score gap between removing the least and the most relevant pixels, imputed without leaking the mask "
                "shape")

    higher_is_better: ClassVar[bool] = True
    paper: ClassVar[str] = ("Rong et al., A Consistent and Efficient Evaluation Strategy for Attribution Methods, "
                            "ICML 2022")
    protocol_target: ClassVar[str] = "predicted"
    protocol_notes: ClassVar[tuple[str, ...]] = (
        "linear system solved by preconditioned CG on the device (reference: scipy spsolve)",
        "imputation noise seeded per image (reference: global torch RNG)")

    def __init__(
        self,
        model: nn.Module,
        percentiles: Sequence[float] = DEFAULT_PERCENTILES,
        noise: float = 0.01,
        output: str = "prob",
        seed: int = 0,
        tol: float = 1e-10,
        internal_batch_size: int = 256,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.percentiles = check_percentiles(percentiles)
        if not float(noise) >= 0:
            raise ConfigError(
                f"noise={noise!r} must be ≥ 0 (the imputation noise's standard deviation; 0 turns it off).")
        self.noise = float(noise)
        self.output = choice(output, OUTPUTS, "output")
        self.seed = int(seed)
        self.tol = float(tol)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")
        self.add_state("morf_values", default=[], dist_reduce_fx="cat")
        self.add_state("lerf_values", default=[], dist_reduce_fx="cat")

    def protocol_params(self, size: tuple[int, int]) -> dict[str, Any]:
        """The parameters as run (percentiles as a string)."""
        return {"percentiles": str(list(self.percentiles)), "noise": self.noise, "output": self.output,
                "seed": self.seed, "tol": self.tol}

    def imputation_noise(self, x: Tensor) -> Tensor:
        """Standard normal draws [B, 2P, C, H, W] (before × ``noise``), one generator per image."""
        c, h, w = x.shape[1:]
        g = torch.Generator()
        out = []
        for seed in image_seeds(x, self.seed):
            g.manual_seed(seed)
            out.append(torch.randn(2 * len(self.percentiles), c, h, w, generator=g))
        return torch.stack(out).to(x.device) if out else torch.empty(0, 2 * len(self.percentiles), c, h, w)

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Add one batch: MoRF/LeRF curves [B,P] and the combined scores [B]."""
        name = type(self).__name__
        check_images(x, name)
        check_attribution(attr, name, x=x)
        check_target(target, x.shape[0], name)
        attr, target = attr.to(x.device), target.to(x.device)
        b = x.shape[0]
        p = len(self.percentiles)
        keep = road_keep_masks(attr, self.percentiles)
        noise = self.imputation_noise(x) if self.noise > 0 else None
        with evaluating(self.model):
            logits = model_logits(self.model, x)
            check_target_range(target, logits.shape[-1])
            base = target_scores(logits, target, self.output)

            def build(s0: int, s1: int, t0: int, t1: int) -> Tensor:
                removed = ~keep[s0:s1, t0:t1].flatten(0, 1)
                images = x[s0:s1, None].expand(-1, t1 - t0, -1, -1, -1).flatten(0, 1)
                filled, _ = linear_impute(images, removed, self.tol)
                if noise is not None:
                    eps = noise[s0:s1, t0:t1].flatten(0, 1).to(filled.dtype)
                    filled = torch.where(removed[:, None], filled + self.noise * eps, filled)
                return filled

            scores = blockwise_scores(self.model, b, 2 * p, build, target, self.internal_batch_size, self.output)
        diff = (scores - base[:, None]).double()
        morf, lerf = diff[:, :p], diff[:, p:]
        self.morf_values.append(morf)
        self.lerf_values.append(lerf)
        self._add_values(((lerf - morf) / 2).mean(dim=1))

    def morf_curves(self) -> Tensor:
        """Score change per sample and percentile, most relevant removed [N, P]."""
        return self._gathered("morf_values")

    def lerf_curves(self) -> Tensor:
        """Score change per sample and percentile, least relevant removed [N, P]."""
        return self._gathered("lerf_values")
