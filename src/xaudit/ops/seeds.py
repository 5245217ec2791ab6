"""Per-image seeds from an image's exact bits: the same seed alone, in any batch, on any device or
DDP rank. Random baselines, sampling explainers and the metrics' tie-breaks and perturbations all
seed from it, so it sits below the explainers and the metrics (:mod:`xaudit.ops`)."""

from __future__ import annotations

import torch
from torch import Tensor

__all__ = ["image_seeds"]

# seeds the generator of the position weights that hash an image's bits into its seed
_MIX_SEED = 0x9E3779B9


def image_seeds(x: Tensor, seed: int) -> list[int]:
    """One seed per image, a function of ``seed`` and the image's exact bits only.

    Integer arithmetic (exact on every device), so an image gets the same seed alone or in any
    batch; equal images get equal seeds.
    """
    bits = x.detach().contiguous().flatten(1)
    # reinterpret the bytes as ≤32-bit integers (8-byte floats become two int32 words each)
    int_type = {1: torch.int8, 2: torch.int16}.get(bits.element_size(), torch.int32)
    v = bits.view(int_type).to(torch.int64)
    gen = torch.Generator(device="cpu").manual_seed(int(seed) ^ _MIX_SEED)
    mult = (torch.randint(1, 2**29, (v.shape[1],), generator=gen, dtype=torch.int64) * 2 + 1).to(x.device)
    # no int64 overflow: (bits < 2**32) * (mult < 2**31) < 2**63; terms < 2**31 summed over < 2**32 values
    h = ((v & 0xFFFFFFFF) * mult).remainder(2**31 - 1).sum(1)
    return [(int(s) * 0x9E3779B97F4A7C15 + int(seed)) % (2**61 - 1) for s in h.tolist()]
