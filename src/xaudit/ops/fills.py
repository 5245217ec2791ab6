"""Reference images a method compares against: IG baselines and occlusion fills.

One place for "what replaces the image": ``zero``, ``mean`` (per image and channel), ``gray``
(the middle of each image's value range), ``blur`` (Gaussian-blurred image, Sturmfels et al.,
2020, "Visualizing the impact of feature attribution baselines"), ``rise_blur`` (the blur of
RISE's reference evaluation code, :func:`rise_blur`), a number, or a tensor.

Shared by the explainers (IG baselines, occlusion, surrogates) and the metrics (deletion/insertion
and axiomatic references), so it sits below both (:mod:`xaudit.ops`).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from xaudit.utils.errors import ConfigError, unknown_choice

FILLS: tuple[str, ...] = ("zero", "mean", "gray", "blur", "rise_blur")
FillLike = str | float | int | Tensor


def gaussian_blur(x: Tensor, sigma: float) -> Tensor:
    """Separable Gaussian blur of [B,C,H,W] per channel, replicate-padded (works on tiny images)."""
    if sigma <= 0:
        return x
    radius = max(1, math.ceil(3 * sigma))
    t = torch.arange(-radius, radius + 1, device=x.device, dtype=x.dtype)
    k = torch.exp(-0.5 * (t / sigma) ** 2)
    k = k / k.sum()
    b, c, h, w = x.shape
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (radius, radius, 0, 0), mode="replicate"), k.view(1, 1, 1, -1))
    y = F.conv2d(F.pad(y, (0, 0, radius, radius), mode="replicate"), k.view(1, 1, -1, 1))
    return y.reshape(b, c, h, w)


#: RISE's insertion blur at 224 px (Petsiuk et al., 2018, reference code ``evaluation.py``: klen=11, ksig=5)
RISE_SIGMA_224: float = 5.0
RISE_KERNEL_224: int = 11


def rise_sigma(height: int, width: int) -> float:
    """RISE's σ = 5 at 224 px, scaled by the image side: 5 · max(H, W) / 224."""
    return RISE_SIGMA_224 * max(height, width) / 224.0


def rise_kernel_size(sigma: float) -> int:
    """The kernel side for ``sigma``: 2·round(σ)+1 (RISE: σ = 5 → 11×11), at least 3."""
    return max(3, 2 * round(sigma) + 1)


def _reflect(i: int, n: int) -> int:
    """scipy.ndimage's ``reflect`` boundary (d c b a | a b c d | d c b a) for index ``i`` of ``n``."""
    i %= 2 * n
    return i if i < n else 2 * n - 1 - i


def rise_kernel_1d(size: int, sigma: float) -> Tensor:
    """RISE's 1-D kernel (float64 [size]): ``scipy.ndimage.gaussian_filter`` of a centred delta of
    length ``size`` (truncate 4σ, ``reflect`` boundary, so the tails fold back), as ``gkern`` builds it.
    RISE's 2-D kernel is the outer product of two of them."""
    radius = int(4.0 * sigma + 0.5)
    t = torch.arange(-radius, radius + 1, dtype=torch.float64)
    w = torch.exp(-0.5 * (t / sigma) ** 2)
    w = w / w.sum()
    out = torch.zeros(size, dtype=torch.float64)
    c = size // 2
    for i in range(size):
        for j in range(-radius, radius + 1):
            if _reflect(i + j, size) == c:
                out[i] += w[j + radius]
    return out


def rise_blur(x: Tensor, sigma: float | None = None, kernel_size: int | None = None) -> Tensor:
    """RISE's insertion substrate: each channel convolved with ``gkern(klen, σ)``, zero-padded.

    As the reference code (``nn.functional.conv2d(x, kern, padding=klen // 2)`` on the normalised
    image): σ = 5 and an 11×11 kernel at 224 px; by default both scale with the image side
    (:func:`rise_sigma`, :func:`rise_kernel_size`). Zero padding darkens the border towards the
    dataset mean, as in the paper's figures.
    """
    h, w = x.shape[-2:]
    sigma = rise_sigma(h, w) if sigma is None else float(sigma)
    if sigma <= 0:
        return x.clone()
    size = rise_kernel_size(sigma) if kernel_size is None else int(kernel_size)
    k1 = rise_kernel_1d(size, sigma).to(device=x.device, dtype=x.dtype)
    b, c = x.shape[:2]
    y = x.reshape(b * c, 1, h, w)
    y = F.conv2d(F.pad(y, (size // 2, size // 2, size // 2, size // 2)),
                 (k1[:, None] * k1[None, :]).view(1, 1, size, size))
    return y.reshape(b, c, h, w)


def default_blur_sigma(x: Tensor) -> float:
    """A blur that removes object detail but keeps the colour layout: σ = max(H, W) / 8."""
    return max(x.shape[-2:]) / 8.0


def check_fill(fill: FillLike, option: str = "fill") -> FillLike:
    """``fill`` unchanged if :func:`make_fill` understands it, else a ConfigError listing the choices."""
    if isinstance(fill, bool) or not isinstance(fill, str | int | float | Tensor):
        raise ConfigError(f"{option} must be one of {FILLS}, a number or a tensor; got {fill!r}.")
    if isinstance(fill, str) and fill not in FILLS:
        raise unknown_choice(option, fill, FILLS)
    return fill


def make_fill(x: Tensor, fill: FillLike, blur_sigma: float | None = None, option: str = "fill") -> Tensor:
    """The reference image(s) for ``x`` [B,C,H,W]: same shape, device and dtype."""
    if isinstance(fill, Tensor):
        try:
            return torch.broadcast_to(fill.to(device=x.device, dtype=x.dtype), x.shape).clone()
        except RuntimeError as err:
            raise ConfigError(f"{option} tensor of shape {tuple(fill.shape)} does not broadcast to x "
                              f"{tuple(x.shape)}.") from err
    if isinstance(fill, bool):
        raise ConfigError(f"{option} must be one of {FILLS}, a number or a tensor; got {fill!r}.")
    if isinstance(fill, int | float):
        return torch.full_like(x, float(fill))
    if fill == "zero":
        return torch.zeros_like(x)
    if fill == "mean":
        return x.mean((2, 3), keepdim=True).expand_as(x).clone()
    if fill == "gray":
        flat = x.flatten(1)
        mid = (flat.amax(1) + flat.amin(1)) / 2
        return mid[:, None, None, None].expand_as(x).clone()
    if fill == "blur":
        return gaussian_blur(x, default_blur_sigma(x) if blur_sigma is None else float(blur_sigma))
    if fill == "rise_blur":
        return rise_blur(x, blur_sigma)
    raise unknown_choice(option, fill, FILLS)
