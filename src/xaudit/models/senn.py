"""Self-explaining neural network for images (Alvarez-Melis & Jaakkola, NeurIPS 2018).

``f(x) = g(θ(x)_1 h(x)_1, …, θ(x)_K h(x)_K)`` with

- concept encoder ``h``: a conv trunk and a 1x1 conv give K non-negative *spatial* concept maps
  ``a_k`` [B,K,h,w]; the concept ``h_k`` is the map's spatial mean (how much of concept k the
  image shows, and where);
- relevance parameteriser ``θ``: from the same trunk, global-average-pooled → MLP → [B,K,C], the
  relevance of each concept to each class, a function of the input (a locally linear model);
- aggregator ``g`` = sum: ``logit_c = Σ_k θ_{k,c}(x) h_k(x)`` (no bias, so the explanation is
  complete).

The robustness regulariser ``‖∇_x f_c − θ_{·,c}ᵀ J_x h‖`` asks θ to be locally constant, so that
the model really is locally the linear function its explanation states. By the product rule
``∇_x f_c − θ_cᵀ J_x h = Σ_k h_k ∇_x θ_{k,c}``: one vector-Jacobian product of ``Σ_k h_k θ_{k,c}``
with ``h`` held constant, taken with ``create_graph`` for double back-propagation. It is computed
for the true class of each training sample (the paper's Jacobian restricted to the row the loss
uses). Normalisation is GroupNorm, not BatchNorm, so each sample's penalty depends on that sample
alone.

The built-in explanation (explainer ``senn``) is the map ``Σ_k θ_{k,c} a_k / (h·w)``, which sums
to the target logit.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
from torch import Tensor, nn

from xaudit.utils.errors import ConfigError


def _block(cin: int, cout: int) -> nn.Sequential:
    groups = 4 if cout % 4 == 0 else 1
    return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.GroupNorm(groups, cout),
                         nn.ReLU(inplace=True))


class SENN(nn.Module):
    """SENN image classifier: ``forward(x)`` → logits; :meth:`parts` → logits, θ, concept maps.

    Args:
        num_classes: C.
        in_chans: image channels.
        width: first block's channels (later blocks double it twice).
        num_concepts: K, the number of concept maps.
        robustness: λ, weight of the robustness regulariser in the training loss.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32, num_concepts: int = 8,
                 robustness: float = 0.01) -> None:
        super().__init__()
        w, k = int(width), int(num_concepts)
        if w < 1 or k < 1:
            raise ConfigError(f"senn needs width ≥1 and num_concepts ≥1; got width={width}, "
                              f"num_concepts={num_concepts}.")
        if isinstance(robustness, bool) or not isinstance(robustness, int | float) or not robustness >= 0:
            raise ConfigError(f"model.backbone.robustness={robustness!r} must be a number ≥ 0 (the weight λ "
                              "of the robustness regulariser; 0 turns it off).")
        self.num_classes = int(num_classes)
        self.num_concepts = k
        self.robustness = float(robustness)
        self.features = nn.Sequential(OrderedDict([
            ("block1", _block(in_chans, w)),
            ("block2", _block(w, w)),
            ("pool1", nn.MaxPool2d(2)),
            ("block3", _block(w, 2 * w)),
            ("block4", _block(2 * w, 2 * w)),
            ("pool2", nn.MaxPool2d(2)),
            ("block5", _block(2 * w, 4 * w)),
        ]))
        # concept encoder head: K non-negative maps
        # (normalised before the ReLU so that no concept starts dead or dominant)
        self.concepts = nn.Sequential(nn.Conv2d(4 * w, k, 1), nn.GroupNorm(1, k), nn.ReLU())
        # relevance parameteriser head: θ(x) [B, K, C]
        self.relevance = nn.Sequential(nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4 * w, 4 * w),
                                       nn.ReLU(inplace=True), nn.Linear(4 * w, k * self.num_classes))
        # logits are products θ·h of two small quantities at initialisation, so learning starts slowly;
        # a 4x larger last layer of θ makes the start as fast as a plain classifier's head
        with torch.no_grad():
            self.relevance[-1].weight.mul_(4.0)

    def parts(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(logits [B,C], theta [B,K,C], concept maps [B,K,h,w])``."""
        feats = self.features(x)
        maps = self.concepts(feats)
        theta = self.relevance(feats).view(x.shape[0], self.num_concepts, self.num_classes)
        h = maps.mean((2, 3))
        logits = torch.einsum("bk,bkc->bc", h, theta)
        return logits, theta, maps

    def forward(self, x: Tensor) -> Tensor:
        return self.parts(x)[0]

    def concept_activations(self, x: Tensor) -> Tensor:
        """The concepts ``h(x)`` [B,K] (spatial means of the concept maps)."""
        return self.parts(x)[2].mean((2, 3))

    def robustness_penalty(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, mean_b ‖∇_x f_c − θ_cᵀ J_x h‖₂)`` for class ``target[b]`` of each sample,
        differentiable in the parameters (double back-propagation)."""
        x = x.detach().requires_grad_(True)
        with torch.enable_grad():
            logits, theta, maps = self.parts(x)
            h = maps.mean((2, 3)).detach()
            theta_c = theta.gather(2, target.view(-1, 1, 1).expand(-1, self.num_concepts, 1)).squeeze(2)
            (grad,) = torch.autograd.grad((h * theta_c).sum(), x, create_graph=True)
        return logits, grad.flatten(1).norm(dim=1).mean()

    def training_forward(self, x: Tensor, target: Tensor) -> tuple[Tensor, Tensor]:
        """``(logits, extra loss)`` for :class:`xaudit.models.Classifier`'s training step: λ × the
        robustness penalty (zero and free when λ = 0)."""
        if self.robustness == 0:
            return self(x), x.new_zeros(())
        logits, penalty = self.robustness_penalty(x, target)
        return logits, self.robustness * penalty


def find_senn(model: nn.Module) -> SENN | None:
    """The :class:`SENN` inside ``model`` (itself, a Lightning classifier's ``net``...), if any."""
    for m in model.modules():
        if isinstance(m, SENN):
            return m
    return None
