"""The one pixel ranking of xaudit: attribution order, ties broken by a seeded random priority.

Every metric that orders pixels (deletion/insertion, MaskIoU) and ROAR/KAR's removal masks rank
them here. Ties (flat regions of ReLU'd CAMs, clipped or constant maps, half-precision maps) are
broken by a counter-based hash of (image seed, pixel), never by pixel position: a position
tie-break would make a flat map's score depend on where the model looks (its zeros would be
deleted top-left first), and a constant map would not score like a random one.

The image seed is given by the caller: ROAR uses the image's dataset position (plus ``tie_seed``),
the metrics a hash of the image's bits (:func:`content_seeds`), so a sample's order is the same
alone, in any batch and on any DDP rank.
"""

from __future__ import annotations

import torch
from torch import Tensor

_MIX = (-7046029254386353131, -4658895280553007687, -7723592293110705685)  # splitmix64 constants (int64)


def splitmix(seeds: Tensor, pixels: Tensor) -> Tensor:
    """A splitmix64-style hash of broadcastable int64 (seed, pixel) tensors (wrapping int64 arithmetic)."""
    x = seeds * _MIX[0] + pixels * _MIX[2]
    for c in (_MIX[1], _MIX[2]):
        x = x ^ ((x >> 31) & 0x1FFFFFFFF)  # logical shift of the 64-bit pattern
        x = x * c
    return x ^ ((x >> 29) & 0x7FFFFFFFF)


def tie_priority(seeds: Tensor, p: int) -> Tensor:
    """Random tie-break keys int64 [N, p]: the hash of (image seed, pixel), on ``seeds``' device.

    A counter-based hash, not a generator: each image's keys depend only on its own seed, the
    whole batch is one vectorised computation and CPU and CUDA agree bit for bit.
    """
    return splitmix(seeds.long()[:, None], torch.arange(p, device=seeds.device)[None, :])


def order_key(attr: Tensor, seeds: Tensor) -> Tensor:
    """Composite int64 sort key [N, P]: ascending key = most important first, ties at random.

    The attribution's float32 bits made monotonic (descending), then the low 32 bits of the tie
    priority (ascending); ``+ 0.0`` makes -0.0 tie with 0.0. A float64 map is compared in float32.
    """
    n = attr.shape[0]
    flat = attr.detach().reshape(n, -1).float()
    prio = tie_priority(seeds.to(flat.device), flat.shape[1])
    bits = (flat + 0.0).view(torch.int32).long()
    ordered = bits ^ ((bits >> 31) & 0x7FFFFFFF)  # monotonic in the float value
    return (-ordered) * (1 << 32) + (prio & 0xFFFFFFFF)


def pixel_ranks(attr: Tensor, seeds: Tensor) -> Tensor:
    """Rank of each pixel, 0 = most important: long [N, P] (P = pixels of ``attr``'s rows).

    ``seeds`` (long [N]) seed each image's random tie-break. Computed on ``attr``'s device.
    """
    key = order_key(attr, seeds)
    n, p = key.shape
    order = key.argsort(dim=1, stable=True)  # pixel ids, most important first
    rank = torch.empty_like(order)
    rank.scatter_(1, order, torch.arange(p, device=order.device).expand(n, -1))
    return rank


def top_k_mask(attr: Tensor, k: int, seeds: Tensor) -> Tensor:
    """Bool [N, P]: the ``k`` highest-ranked pixels of each row (the first ``k`` of :func:`pixel_ranks`)."""
    return pixel_ranks(attr, seeds) < k


def content_seeds(t: Tensor, tie_seed: int, *more: Tensor) -> Tensor:
    """One tie-break seed per sample, long [N]: a hash of ``tie_seed`` and the sample's bits in ``t``
    (and in ``more``, e.g. its mask), so equal inputs get equal orders in any batch or on any rank."""
    from xaudit.ops.seeds import image_seeds

    parts = [t.detach().reshape(t.shape[0], -1).float()]
    parts += [m.detach().reshape(m.shape[0], -1).float().to(parts[0].device) for m in more]
    joined = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return torch.tensor(image_seeds(joined[:, None], int(tie_seed)), dtype=torch.long, device=t.device)
