"""Image batches for methods fitted on data (PatternNet/PatternAttribution, DeepSHAP's background,
influence-directed explanations): one reader for every kind of data a caller may pass."""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import Tensor

from xaudit.utils.errors import ConfigError

__all__ = ["iter_images"]


def iter_images(data: object, max_batches: int | None = None, batch_size: int = 64, *,
                of_class: int | None = None) -> Iterator[Tensor]:
    """Image batches [B,C,H,W] from a LightningDataModule (its train loader), a DataLoader or any
    iterable of batch dicts (``"image"``), ``(x, y)`` tuples or tensors, or one tensor [N,C,H,W].

    ``of_class`` keeps only the images of that label (batch dicts need ``"label"``, tuples their
    second item); an image [C,H,W] counts as a batch of one, and empty batches are skipped.
    """
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
        labels = None
        if isinstance(batch, Mapping):
            if "image" not in batch:
                raise ConfigError(f"a batch dict needs an 'image' key; got keys {sorted(batch)}.")
            x = batch["image"]
            if of_class is not None:
                if "label" not in batch:
                    raise ConfigError("of_class needs a 'label' entry in every batch dict.")
                labels = batch["label"]
        elif isinstance(batch, list | tuple):
            x = batch[0]
            if of_class is not None:
                if len(batch) < 2:
                    raise ConfigError("of_class needs labels: pass (image, label) pairs or batch dicts.")
                labels = batch[1]
        else:
            x = batch
            if of_class is not None:
                raise ConfigError("of_class needs labels: pass batch dicts with 'image' and 'label' "
                                  "(a dataloader of the datamodule), not bare image tensors.")
        if not isinstance(x, Tensor) or not x.is_floating_point():
            raise ConfigError(f"fit data batches must hold float image tensors; got {type(x).__name__}.")
        if labels is not None:
            keep = (torch.as_tensor(labels).reshape(-1) == of_class).to(x.device)
            x = x[keep] if x.ndim == 4 else x[None][keep]
        if x.ndim == 3:
            x = x[None]
        if x.shape[0]:
            yield x
