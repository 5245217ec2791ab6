"""Reference images a method compares against: IG baselines and occlusion fills.

One place for "what replaces the image": ``zero``, ``mean`` (per image and channel), ``gray``
(the middle of each image's value range), ``blur`` (Gaussian-blurred image, Sturmfels et al.,
2020, "Visualizing the impact of feature attribution baselines"), a number, or a tensor.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from xaudit.utils.errors import ConfigError, unknown_choice

FILLS: tuple[str, ...] = ("zero", "mean", "gray", "blur")
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
    raise unknown_choice(option, fill, FILLS)
