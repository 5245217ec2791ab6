"""The zennit stabiliser the relevance rules share, and re-exports of :func:`reroute` (the autograd
primitive every rule is built on, now in :mod:`xaudit.explainers.rerouting`) and :func:`iter_images`
(image batches for methods fitted on data, now in :mod:`xaudit.explainers.fit_data`)."""

from __future__ import annotations

import torch
from torch import Tensor

from xaudit.explainers.fit_data import iter_images
from xaudit.explainers.rerouting import reroute

__all__ = ["is_nonnegative", "iter_images", "reroute", "stabilize"]


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + ε·sign(z)`` with sign(0) = +1 (zennit's stabiliser), so ``z/stabilize(z)`` is finite."""
    return torch.where(z >= 0, z + eps, z - eps)


def is_nonnegative(x: Tensor) -> bool:
    """Whether ``x`` has no negative entry (rules then skip their x⁻ half)."""
    # one device sync per layer; it saves the second half of every rule that splits x into x⁺ + x⁻
    return not bool((x < 0).any())
