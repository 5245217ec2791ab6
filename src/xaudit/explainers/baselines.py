"""Model-free control "explainers": ``random`` and ``sobel`` (edges).

Every evaluation needs them: a method that does no better than a random map, or than an
edge detector that never looks at the model, explains nothing (Adebayo et al., 2018,
"Sanity Checks for Saliency Maps"; Hooker et al., 2019, ROAR).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.explainers.base import Explainer, Target
from xaudit.explainers.registry import register

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


@register("random")
class RandomBaseline(Explainer):
    """Uniform random map in [0,1): the control every method must beat.

    The map is a deterministic function of ``seed`` and the image (see :func:`image_seeds`),
    drawn from a local generator: reproducible, batch-independent, and the global RNG is untouched.
    """

    def __init__(self, model: nn.Module, seed: int = 0) -> None:
        super().__init__(model)
        self.seed = int(seed)

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        b, _, h, w = x.shape
        out = torch.empty(b, h, w, device=x.device, dtype=x.dtype)
        gen = torch.Generator(device=x.device)
        for i, s in enumerate(image_seeds(x, self.seed)):
            gen.manual_seed(s)
            out[i] = torch.rand(h, w, generator=gen, device=x.device, dtype=x.dtype)
        return out


@register("sobel")
class SobelBaseline(Explainer):
    """Sobel edge magnitude per channel (√(gx² + gy²), replicate padding); ignores the model.

    Default reduction: max over channels.
    """

    default_reduce = "max_abs"

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        b, c, h, w = x.shape
        k = torch.tensor([[1.0, 0.0, -1.0], [2.0, 0.0, -2.0], [1.0, 0.0, -1.0]], device=x.device, dtype=x.dtype)
        kernels = torch.stack([k, k.t()])[:, None]  # [2,1,3,3]: gx, gy
        y = F.conv2d(F.pad(x.reshape(b * c, 1, h, w), (1, 1, 1, 1), mode="replicate"), kernels)
        return y.pow(2).sum(1).sqrt().view(b, c, h, w)
