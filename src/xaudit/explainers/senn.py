"""The built-in explanation of a self-explaining network (:class:`xaudit.models.senn.SENN`)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.explainers.base import Explainer, Target, UnsupportedModelError
from xaudit.explainers.registry import register
from xaudit.models.senn import SENN, find_senn


@register("senn")
class SENNExplainer(Explainer):
    """SENN's own explanation of class c: ``Σ_k θ_{k,c}(x) a_k(x) / (h·w)`` at input resolution.

    ``a_k`` are the concept maps and ``θ`` the relevance parameteriser's output, so the map sums
    to the target logit (``logit_c = Σ_k θ_{k,c} mean(a_k)``): each feature cell's share is spread
    evenly over the pixels it covers (nearest upsampling divided by the cell area; exact when the
    input side is a multiple of the feature side). No gradients are needed.

    Works on any model whose logits are those of a :class:`SENN` inside it (the network itself, or
    a :class:`xaudit.models.Classifier` built with ``model=senn``); other models raise
    :class:`UnsupportedModelError`.

    Args:
        model: a SENN network, or a model holding one.
    """

    def __init__(self, model: nn.Module) -> None:
        super().__init__(model)
        senn = find_senn(model)
        if senn is None:
            raise UnsupportedModelError(
                f"the senn explainer reads a self-explaining network's concepts and relevances, but "
                f"{type(model).__name__} holds no xaudit.models.senn.SENN. Train one with "
                "`python train.py model=senn`, or use a post-hoc method (grad_cam, integrated_gradients, ...).")
        self.senn: SENN = senn

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        with torch.no_grad():
            logits, theta, maps = self.senn.parts(x)
            if self.senn is not self.model:
                outer = self._logits(x)
                scale = float(outer.abs().max()) + 1.0
                if outer.shape != logits.shape or not torch.allclose(outer, logits, rtol=1e-4, atol=1e-4 * scale):
                    raise UnsupportedModelError(
                        f"{type(self.model).__name__}'s logits are not those of the SENN inside it (it changes "
                        "the input or the output around the network), so SENN's relevances would not explain "
                        "them. Pass the SENN itself, or use a post-hoc method.")
            idx = target.indices(logits)
            theta_c = theta.gather(2, idx.view(-1, 1, 1).expand(-1, theta.shape[1], 1)).squeeze(2)
            h, w = maps.shape[-2:]
            cell = torch.einsum("bk,bkhw->bhw", theta_c, maps) / (h * w)
            size = tuple(x.shape[-2:])
            if tuple(cell.shape[-2:]) == size:
                return cell
            up = F.interpolate(cell[:, None], size=size, mode="nearest")[:, 0]
            return up * (h * w) / (size[0] * size[1])
