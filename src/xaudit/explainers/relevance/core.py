"""The autograd primitive every relevance rule is built on (:func:`reroute`: keep a forward value,
choose its gradient), the zennit stabiliser, and :func:`iter_images` (image batches from a
datamodule, loader, iterable or tensor, for methods fitted on data)."""

from __future__ import annotations

from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
from torch import Tensor

from xaudit.utils.errors import ConfigError

# -- the one autograd primitive: keep a forward value, choose its gradient ---------------------


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


def stabilize(z: Tensor, eps: float) -> Tensor:
    """``z + ε·sign(z)`` with sign(0) = +1 (zennit's stabiliser), so ``z/stabilize(z)`` is finite."""
    return torch.where(z >= 0, z + eps, z - eps)


def _nonnegative(x: Tensor) -> bool:
    # one device sync per layer; it saves the second half of every rule that splits x into x⁺ + x⁻
    return not bool((x < 0).any())


# -- data ------------------------------------------------------------------------------------


def iter_images(data: object, max_batches: int | None = None, batch_size: int = 64) -> Iterator[Tensor]:
    """Image batches [B,C,H,W] from a LightningDataModule (its train loader), a DataLoader or any
    iterable of batch dicts (``"image"``), ``(x, y)`` tuples or tensors, or one tensor [N,C,H,W]."""
    if isinstance(data, Tensor):
        batches: Any = data.split(batch_size)
    elif hasattr(data, "train_dataloader"):
        if hasattr(data, "setup"):
            data.setup("fit")  # type: ignore[attr-defined]
        batches = data.train_dataloader()  # type: ignore[attr-defined]
    else:
        batches = data
    try:
        iterator = iter(batches)
    except TypeError as err:
        raise ConfigError(f"fit data must be a datamodule, a DataLoader, an iterable of batches or a tensor "
                          f"[N,C,H,W]; got {type(data).__name__}.") from err
    for i, batch in enumerate(iterator):
        if max_batches is not None and i >= max_batches:
            break
        if isinstance(batch, Mapping):
            x = batch["image"]
        elif isinstance(batch, list | tuple):
            x = batch[0]
        else:
            x = batch
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ConfigError(f"fit data batches must hold float image tensors; got {type(x).__name__}.")
        yield x
