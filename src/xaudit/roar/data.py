"""ROAR/KAR keep-masks over stored attribution maps, and the split machinery they are served by.

ROAR/KAR masks are a boolean ``keep`` tensor applied per batch: removed pixels take the training
split's per-channel mean (Hooker et al., 2019) — ``fill``, in normalised units, or 0 (the
normalisation's mean) where the data is normalised by its own training mean. :class:`MapKeep`
builds a batch's keep-mask from its dataset indices and the attribution store, so a streamed split
never holds the masks of the whole split.

The generic split machinery (:class:`TensorSplit`, :class:`DeviceBatches`, :class:`StreamBatches`,
:class:`SplitDataModule`, ...) lives in :mod:`xaudit.data.tensor_split` and is re-exported here for
existing imports.
"""

from __future__ import annotations

import torch
from torch import Tensor

from xaudit.data.tensor_split import (  # re-exported: the old import path (see __all__)
    DeviceBatches,
    KeepFn,
    LazyImages,
    RowKeep,
    SplitDataModule,
    StreamBatches,
    TensorSplit,
    augment_batch,
    shard_indices,
)
from xaudit.ops.masking import keep_mask

__all__ = ["DeviceBatches", "KeepFn", "LazyImages", "MapKeep", "RowKeep", "SplitDataModule", "StreamBatches",
           "TensorSplit", "augment_batch", "shard_indices"]


class MapKeep:
    """A :class:`~xaudit.data.tensor_split.RowKeep` over stored maps: a batch's keep-mask from its
    dataset indices, equal to the rows of :func:`keep_mask` over the whole split (each tie-break is
    seeded by dataset position).

    ``attr`` is anything indexable by a long tensor of indices (a tensor, a
    :class:`xaudit.roar.store.MapReader`); with a ``row(i)`` method too, :class:`StreamBatches` reads
    each sample's map in its DataLoader workers next to the image, and only the selection runs on
    the device. ``offset`` shifts the positions that seed the tie-break (the test split's).
    """

    def __init__(self, attr: object, fraction: float, mode: str, tie_seed: int, offset: int = 0) -> None:
        self.attr, self.fraction, self.mode = attr, float(fraction), mode
        self.tie_seed, self.offset = int(tie_seed), int(offset)

    @property
    def reads_rows(self) -> bool:
        """Whether single maps can be read per sample (in loader workers)."""
        return callable(getattr(self.attr, "row", None))

    def row(self, i: int) -> Tensor:
        """The stored map of sample ``i``, float32 [H,W] on the CPU."""
        return self.attr.row(i)  # type: ignore[attr-defined]

    def from_maps(self, maps: Tensor, index: Tensor) -> Tensor:
        """Keep-mask bool [B,H,W] of ``maps`` [B,H,W] (on their device) of the samples ``index``."""
        return keep_mask(maps.float(), self.fraction, self.mode, self.tie_seed,
                         positions=index.to(maps.device).long() + self.offset)

    def __call__(self, index: Tensor) -> Tensor:
        maps = self.attr[index.cpu().long()]  # type: ignore[index]
        return self.from_maps(torch.as_tensor(maps).to(index.device), index)
