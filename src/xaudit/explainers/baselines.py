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
from xaudit.ops.seeds import image_seeds

__all__ = ["RandomBaseline", "SobelBaseline", "image_seeds"]  # image_seeds: the old import path


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
