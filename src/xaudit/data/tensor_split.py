"""Whole splits held as tensors (on the training device) and served as batch dicts.

A split is materialised once (uint8 images where the datamodule has them, the normalisation
applied per batch), moved to the device once, and batches are index gathers — no ``DataLoader``
workers, no per-item Python. An optional boolean ``keep`` mask is applied per batch: removed pixels
take ``fill`` (float [C], normalised units) or 0 (the normalisation's mean). Augmentation
(reflect-pad crop + flip) runs on the batch, after masking, so image and mask move together.

Under DDP every rank serves its own slice: training shards are padded by wrapping (every rank
needs the same number of steps), evaluation shards are whole batches, rank r taking batches r,
r+W, r+2W, ... without padding (:func:`xaudit.data.base.eval_shard`, as
:class:`xaudit.data.UnpaddedDistributedSampler`), so a batch is the same as on one device.

The streaming path (any dataset that is not an in-memory :class:`TensorDictDataset`: ImageFolder,
a litdata/WebDataset-backed map dataset) keeps memory O(batch): a :class:`TensorSplit` then holds
:class:`LazyImages` (decoded on access), and :class:`StreamBatches` reads the same indices in the
same order through a ``DataLoader`` (workers, pinned memory on CUDA), moves each batch to the
device and applies the keep-mask — a tensor, a :data:`KeepFn` of the batch's dataset indices, or a
:class:`RowKeep` whose per-sample maps the loader workers read — and the augmentation there,
exactly as :class:`DeviceBatches` does. Both paths give the same batches.

Every audit mode uses this machinery (ROAR/KAR, sanity checks, concept probes, the explain run);
the ROAR-specific keep-masks over stored attribution maps live in :mod:`xaudit.roar.data`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, replace
from typing import Protocol, runtime_checkable

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset, Sampler, Subset, default_collate

from xaudit.data.base import Batch, TensorDictDataset, dataset_labels, eval_shard

__all__ = ["DeviceBatches", "KeepFn", "LazyImages", "RowKeep", "SplitDataModule", "StreamBatches",
           "TensorSplit", "augment_batch", "shard_indices"]

#: builds the keep-mask bool [B,H,W] of a batch from its dataset indices (long [B], on the batch's device)
KeepFn = Callable[[Tensor], Tensor]


@runtime_checkable
class RowKeep(Protocol):
    """A :data:`KeepFn` that can also read one sample's map (``row``) and turn a batch of maps into
    its keep-mask (``from_maps``), so :class:`StreamBatches` reads the maps in its loader workers
    next to the images (e.g. :class:`xaudit.roar.data.MapKeep`)."""

    @property
    def reads_rows(self) -> bool: ...

    def row(self, i: int) -> Tensor: ...

    def from_maps(self, maps: Tensor, index: Tensor) -> Tensor: ...

    def __call__(self, index: Tensor) -> Tensor: ...


class _WithMaps(Dataset):
    """``dataset``'s items with their stored map under ``"keep_map"`` (read in the loader's workers)."""

    def __init__(self, dataset: Dataset, keep: RowKeep) -> None:
        self.dataset, self.keep = dataset, keep

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def __getitem__(self, i: int) -> dict:
        return {**self.dataset[i], "keep_map": self.keep.row(i), "keep_index": i}


class _CollateKeep:
    """Collates a batch and, in the loader worker, turns its maps into the keep-mask (CPU training:
    the selection then runs in parallel with decoding instead of in the training process)."""

    def __init__(self, keep: RowKeep) -> None:
        self.keep = keep

    def __call__(self, items: list[dict]) -> dict:
        indices = torch.tensor([int(item.pop("keep_index")) for item in items])
        batch = default_collate(items)
        batch["keep"] = self.keep.from_maps(batch.pop("keep_map"), indices)
        return batch


class LazyImages:
    """A dataset's images, decoded only where indexed: ``images[i]``, ``images[a:b]``, ``images[idx]``.

    Stands in for the ``images`` tensor of a :class:`TensorSplit` so code that takes a few images
    (the dry run, sanity checks, concept probes) works on a split that never sits in memory.
    Items are already normalised floats (the dataset's own transform).
    """

    def __init__(self, dataset: Dataset, key: str = "image", first: dict | None = None) -> None:
        self.dataset, self.key = dataset, key
        item = torch.as_tensor((dataset[0] if first is None else first)[key])  # the item shape, once
        self._item_shape = tuple(int(d) for d in item.shape)

    @property
    def shape(self) -> torch.Size:
        return torch.Size((len(self.dataset), *self._item_shape))  # type: ignore[arg-type]

    def __len__(self) -> int:
        return len(self.dataset)  # type: ignore[arg-type]

    def is_floating_point(self) -> bool:
        return self.key == "image"

    def __getitem__(self, index: int | slice | Tensor | Sequence[int]) -> Tensor:
        if isinstance(index, int):
            return torch.as_tensor(self.dataset[index][self.key])
        rows = range(len(self))[index] if isinstance(index, slice) else torch.as_tensor(index).flatten().tolist()
        items = [torch.as_tensor(self.dataset[int(i)][self.key]) for i in rows]
        return torch.stack(items) if items else torch.empty((0, *self._item_shape))

    def head(self, n: int) -> LazyImages:
        """The first ``n`` images, still lazy."""
        out = LazyImages.__new__(LazyImages)
        out.dataset, out.key, out._item_shape = (Subset(self.dataset, range(min(n, len(self)))), self.key,
                                                 self._item_shape)
        return out


@dataclass(frozen=True)
class TensorSplit:
    """One split as tensors: images [N,C,H,W] (uint8 raw, or float already normalised), labels
    [N], optional masks [N,H,W], and the normalisation applied to uint8 images."""

    images: Tensor | LazyImages
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    masks: Tensor | LazyImages | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @property
    def streamed(self) -> bool:
        """Whether the images are read from the dataset per batch (not held in memory)."""
        return isinstance(self.images, LazyImages)

    @classmethod
    def from_dataset(cls, dataset: Dataset, mean: tuple[float, ...], std: tuple[float, ...],
                     batch_size: int = 256, stream: bool | None = None) -> TensorSplit:
        """A split of a batch-dict dataset.

        An in-memory :class:`TensorDictDataset` is used as it is (its uint8 tensors, no copy).
        Any other dataset is streamed (``stream=None`` or True: labels read without decoding,
        images decoded per batch) or, with ``stream=False``, decoded once into float tensors.
        """
        if isinstance(dataset, TensorDictDataset) and not stream:
            return cls(dataset.images, dataset.labels, tuple(mean), tuple(std), dataset.masks)
        if stream is None or stream:
            first = dataset[0]
            masks = LazyImages(dataset, "mask", first) if "mask" in first else None
            return cls(LazyImages(dataset, "image", first), dataset_labels(dataset), tuple(mean), tuple(std), masks)
        images, labels, masks = [], [], []
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images.append(batch["image"].float())
            labels.append(batch["label"].long())
            if "mask" in batch:
                masks.append(batch["mask"].bool())
        return cls(torch.cat(images), torch.cat(labels), tuple(mean), tuple(std),
                   torch.cat(masks) if masks else None)

    def subset(self, n: int | None) -> TensorSplit:
        """The first ``n`` samples (all when ``n`` is None); a streamed split stays lazy (nothing decoded)."""
        if n is None or n >= len(self):
            return self

        def head(t: Tensor | LazyImages | None) -> Tensor | LazyImages | None:
            return None if t is None else t.head(n) if isinstance(t, LazyImages) else t[:n]

        return replace(self, images=head(self.images), labels=self.labels[:n], masks=head(self.masks))

    def normalise(self, images: Tensor) -> Tensor:
        """uint8 → float normalised (float images are already normalised)."""
        if images.is_floating_point():
            return images.float()
        mean = torch.tensor(self.mean, device=images.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=images.device).view(1, -1, 1, 1)
        return (images.float().div_(255.0) - mean) / std


def augment_batch(x: Tensor, generator: torch.Generator, pad: int = 4) -> Tensor:
    """Reflect-pad random crop + horizontal flip of a whole batch on its device (CIFAR recipe)."""
    b, _, h, w = x.shape
    padded = F.pad(x, (pad, pad, pad, pad), mode="reflect")
    dev = x.device
    di = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    dj = torch.randint(0, 2 * pad + 1, (b,), generator=generator).to(dev)
    flip = (torch.rand(b, generator=generator) < 0.5).to(dev)
    rows = (torch.arange(h, device=dev)[None, :] + di[:, None])  # [B,H]
    cols = torch.arange(w, device=dev)[None, :] + dj[:, None]  # [B,W]
    cols = torch.where(flip[:, None], cols.flip(1), cols)
    idx_r = rows[:, None, :, None].expand(b, x.shape[1], h, padded.shape[-1])
    out = padded.gather(2, idx_r)
    idx_c = cols[:, None, None, :].expand(b, x.shape[1], h, w)
    return out.gather(3, idx_c)


class DeviceBatches:
    """An iterable of batch dicts over a :class:`TensorSplit` held on ``device``.

    ``keep`` (bool [N,H,W]) replaces the removed pixels after normalisation by ``fill`` (float [C],
    normalised units; None: 0, the normalisation's mean). ``train=True``
    shuffles with a generator seeded by ``seed`` and the epoch (so a rerun sees the same order),
    pads the rank shards to equal length and augments when ``augment``; ``train=False`` keeps
    dataset order and shards without padding. Batches carry ``index`` (position in the split).
    ``epoch_of`` gives the epoch being served (the trainer's ``current_epoch``, so a fit resumed at
    epoch k sees epoch k's order); without it each pass counts one epoch.
    """

    def __init__(self, split: TensorSplit, batch_size: int, *, train: bool = False,
                 keep: Tensor | KeepFn | None = None,
                 augment: bool = False, seed: int = 0, device: torch.device | str = "cpu", rank: int = 0,
                 world: int = 1, channels_last: bool = False, epoch_of: Callable[[], int] | None = None,
                 fill: Tensor | None = None) -> None:
        self.device = torch.device(device)
        self.fill = (None if fill is None
                     else torch.as_tensor(fill, dtype=torch.float32).to(self.device).view(1, -1, 1, 1))
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.masks = None if split.masks is None else split.masks.to(self.device)
        self.keep: Tensor | KeepFn | None = keep if keep is None or callable(keep) else keep.to(self.device)
        self.split = split
        self.batch_size = int(batch_size)
        self.train, self.augment, self.seed = bool(train), bool(augment), int(seed)
        self.rank, self.world = int(rank), int(world)
        self.channels_last = bool(channels_last)
        self.epoch = 0
        self.epoch_of = epoch_of
        n = len(split)
        self.per_rank = (math.ceil(n / self.world) if self.train
                         else len(eval_shard(n, self.batch_size, self.rank, self.world)))

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def _indices(self) -> Tensor:
        return shard_indices(len(self.split), self.train, self.seed, self.epoch, self.rank, self.world,
                             self.batch_size)

    def _start_epoch(self) -> tuple[Tensor, torch.Generator]:
        """This pass's indices (on the CPU) and augmentation generator; advances the epoch."""
        if self.epoch_of is not None:
            self.epoch = int(self.epoch_of())
        idx = self._indices()
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919 * (self.rank + 1))
        self.epoch += 1
        return idx, g

    def _finish(self, x: Tensor, sel: Tensor, g: torch.Generator, keep: Tensor | None = None) -> Tensor:
        """Keep-mask (given, or from ``self.keep``), augmentation and memory format of one normalised
        batch on the device."""
        if keep is None and self.keep is not None:
            keep = self.keep(sel) if callable(self.keep) else self.keep[sel]
        if keep is not None:
            keep = keep.to(x.device)[:, None]
            x = x * keep if self.fill is None else torch.where(keep, x, self.fill.to(x.dtype))
        if self.train and self.augment:
            x = augment_batch(x, g)
        if self.channels_last:
            x = x.contiguous(memory_format=torch.channels_last)
        return x

    def __iter__(self) -> Iterator[Batch]:
        idx, g = self._start_epoch()
        idx = idx.to(self.device)
        for start in range(0, idx.numel(), self.batch_size):
            sel = idx[start:start + self.batch_size]
            x = self._finish(self.split.normalise(self.images[sel]), sel, g)
            batch = {"image": x, "label": self.labels[sel], "index": sel}
            if self.masks is not None:
                batch["mask"] = self.masks[sel]
            yield batch


def shard_indices(n: int, train: bool, seed: int, epoch: int, rank: int, world: int,
                  batch_size: int = 1) -> Tensor:
    """Dataset indices one rank serves in one pass (long, CPU).

    Evaluation: rank r takes the batches r, r+W, ... of ``batch_size`` samples in dataset order
    (no padding; :func:`~xaudit.data.base.eval_shard`). Training: a permutation seeded by ``seed``
    and ``epoch``, wrapped so every rank takes ``ceil(n / W)`` samples, dealt round-robin.
    """
    if not train:
        return eval_shard(n, batch_size, rank, world)
    per_rank = math.ceil(n / world)
    g = torch.Generator().manual_seed(seed * 100_003 + epoch)
    order = torch.randperm(n, generator=g)
    total = per_rank * world
    if total > n:  # wrap around so every rank takes the same number of steps
        order = torch.cat([order, order[: total - n]])
    return order[rank:total:world]


class _ListSampler(Sampler[int]):
    """Yields the indices it holds (set per epoch by :class:`StreamBatches`)."""

    def __init__(self) -> None:
        self.indices: list[int] = []

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)

    def __len__(self) -> int:
        return len(self.indices)


class StreamBatches(DeviceBatches):
    """:class:`DeviceBatches` over a streamed split: the same indices, order, masks and augmentation,
    with images decoded by ``DataLoader`` workers and moved to ``device`` one batch at a time.

    Memory is O(batch × workers × prefetch); nothing of the split is held. ``keep`` should be a
    :data:`KeepFn` here (a [N,H,W] tensor works too, but is O(dataset)); a :class:`RowKeep` (such as
    :class:`xaudit.roar.data.MapKeep` over a map file) has its maps read by the loader workers with
    the images (``num_workers > 0``; else in one read per batch), and the selection made per batch on the device.
    """

    def __init__(self, split: TensorSplit, batch_size: int, *, num_workers: int = 0, pin_memory: bool = False,
                 **kwargs: object) -> None:
        lazy = split.images
        assert isinstance(lazy, LazyImages), "StreamBatches needs a streamed split (TensorSplit.from_dataset)"
        # private names: Lightning takes an object with ``dataset``/``sampler`` for a DataLoader to re-wrap
        keep = kwargs.get("keep")
        # with workers, they read each sample's map next to its image; without, one batch read is cheaper
        self._map_keep = keep if isinstance(keep, RowKeep) and keep.reads_rows and num_workers > 0 else None
        self._dataset = lazy.dataset if self._map_keep is None else _WithMaps(lazy.dataset, self._map_keep)
        self.num_workers, self.pin_memory = int(num_workers), bool(pin_memory)
        self._sampler = _ListSampler()
        self._loader: DataLoader | None = None
        super().__init__(replace(split, images=torch.empty(0), masks=None), batch_size, **kwargs)  # type: ignore[arg-type]
        self.split = split
        self.has_masks = split.masks is not None

    def _iterable(self) -> DataLoader:
        if self._loader is None:  # one loader: its workers persist across epochs
            # on a CPU device the workers also select (spare cores); on an accelerator the device does
            collate = _CollateKeep(self._map_keep) if self._map_keep is not None and self.device.type == "cpu" else None
            self._loader = DataLoader(self._dataset, batch_size=self.batch_size, sampler=self._sampler,
                                      collate_fn=collate,
                                      num_workers=self.num_workers, persistent_workers=self.num_workers > 0,
                                      pin_memory=self.pin_memory, drop_last=False)
        return self._loader

    def __iter__(self) -> Iterator[Batch]:
        idx, g = self._start_epoch()
        self._sampler.indices = idx.tolist()
        non_blocking = self.device.type == "cuda"
        for start, item in zip(range(0, idx.numel(), self.batch_size), self._iterable(), strict=True):
            sel = idx[start:start + self.batch_size]
            x = item["image"].to(self.device, non_blocking=non_blocking).float()
            sel = sel.to(self.device)
            keep = None
            if "keep" in item:  # built by the workers
                keep = item["keep"]
            elif self._map_keep is not None:
                keep = self._map_keep.from_maps(item["keep_map"].to(self.device, non_blocking=non_blocking), sel)
            batch = {"image": self._finish(x, sel, g, keep),
                     "label": item["label"].to(self.device, non_blocking=non_blocking).long(),
                     "index": sel}
            if self.has_masks and "mask" in item:
                batch["mask"] = item["mask"].to(self.device, non_blocking=non_blocking)
            yield batch


class SplitDataModule(pl.LightningDataModule):
    """Serves tensor splits through :class:`DeviceBatches` on the trainer's device and rank.

    ``train``/``test``/``predict`` splits are optional; ``keep`` masks (tensors or :data:`KeepFn`)
    apply to train and test. A streamed split is served by :class:`StreamBatches` with
    ``num_workers`` loader workers.
    """

    def __init__(self, *, train: TensorSplit | None = None, test: TensorSplit | None = None,
                 predict: TensorSplit | None = None, batch_size: int = 128, eval_batch_size: int | None = None,
                 keep_train: Tensor | KeepFn | None = None, keep_test: Tensor | KeepFn | None = None,
                 augment: bool = False, seed: int = 0, channels_last: bool = False, num_workers: int = 0,
                 fill: Tensor | None = None) -> None:
        super().__init__()
        self.fill = fill
        self.train_split, self.test_split, self.predict_split = train, test, predict
        self.keep_train, self.keep_test = keep_train, keep_test
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.augment, self.seed, self.channels_last = bool(augment), int(seed), bool(channels_last)
        self.num_workers = int(num_workers)

    def _batches(self, split: TensorSplit | None, train: bool, keep: Tensor | None) -> DeviceBatches:
        if split is None:
            raise RuntimeError("SplitDataModule: this stage has no split.")
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        kwargs: dict = {"train": train, "keep": keep, "augment": self.augment and train, "seed": self.seed,
                        "device": device, "rank": rank, "world": world, "channels_last": self.channels_last,
                        "fill": self.fill,
                        "epoch_of": (lambda: trainer.current_epoch) if trainer is not None and train else None}
        size = self.batch_size if train else self.eval_batch_size
        if split.streamed:
            return StreamBatches(split, size, num_workers=self.num_workers, pin_memory=device.type == "cuda",
                                 **kwargs)
        return DeviceBatches(split, size, **kwargs)

    def train_dataloader(self) -> DeviceBatches:
        return self._batches(self.train_split, True, self.keep_train)

    def test_dataloader(self) -> DeviceBatches:
        return self._batches(self.test_split, False, self.keep_test)

    def predict_dataloader(self) -> DeviceBatches:
        return self._batches(self.predict_split, False, None)
