"""Autograd rerouting shared by the backward-modifying explainers: keep a forward value, choose its
gradient.

:func:`reroute` is the one primitive the relevance rules (LRP, DeepLIFT) and PatternAttribution
build on; :data:`RELU_OUT_OF_PLACE` / :data:`RELU_IN_PLACE` are the ReLU callables a
``TorchFunctionMode`` must catch to change how gradients pass ReLUs (guided backprop, deconvnet,
DeepLIFT, PatternNet) — module or functional, in-place or not.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor

__all__ = ["RELU_FUNCS", "RELU_IN_PLACE", "RELU_OUT_OF_PLACE", "reroute"]

#: ReLU calls that return a new tensor
RELU_OUT_OF_PLACE = frozenset({F.relu, torch.relu, Tensor.relu})
#: ReLU calls that overwrite their input
RELU_IN_PLACE = frozenset({F.relu_, torch.relu_, Tensor.relu_})
#: every ReLU call
RELU_FUNCS = RELU_OUT_OF_PLACE | RELU_IN_PLACE


class _RerouteGrad(torch.autograd.Function):
    """Forward: ``value`` itself (no copy). Backward: ``g·head_scale`` into ``value``'s own graph
    (when given) and ``g·scale_i`` into each ``source_i``.

    ``value`` is marked dirty, so the output is ``value`` with this node as its history; it must be
    a fresh tensor (not a view, not saved by the node that made it).
    """

    @staticmethod
    def forward(  # type: ignore[override]
            ctx: Any, value: Tensor, head_scale: Tensor | None, n: int, *rest: Tensor) -> Tensor:
        ctx.mark_dirty(value)
        ctx.n = n
        ctx.has_head = head_scale is not None
        ctx.save_for_backward(*((head_scale,) if head_scale is not None else ()), *rest[n:])
        return value

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        saved = ctx.saved_tensors
        head = g * saved[0] if ctx.has_head else None
        scales = saved[1:] if ctx.has_head else saved
        return (head, None, None, *(g * s for s in scales), *(None,) * ctx.n)


def reroute(value: Tensor, head_scale: Tensor | None = None, sources: Sequence[Tensor] = (),
            scales: Sequence[Tensor] = ()) -> Tensor:
    """``value`` in the forward; in the backward ``g·head_scale`` to ``value``'s graph and
    ``g·scales[i]`` to ``sources[i]`` (the z-rule trick without the rounding of ``z_ρ·(z/z_ρ)``)."""
    return _RerouteGrad.apply(value, head_scale, len(sources), *sources, *scales)
