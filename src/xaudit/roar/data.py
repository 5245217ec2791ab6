"""Whole splits held as tensors (on the training device) and served as batch dicts.

The fast path of the audit: a split is materialised once (uint8 images where the datamodule has
them, the normalisation applied per batch), moved to the device once, and batches are index
gathers — no ``DataLoader`` workers, no per-item Python. ROAR/KAR masks are a boolean ``keep``
tensor applied per batch: removed pixels become 0 in normalised units, i.e. exactly the
per-channel dataset mean (Hooker et al., 2019). Augmentation (reflect-pad crop + flip) runs on
the batch, after masking, so image and mask move together.

Under DDP every rank serves its own slice: training shards are padded by wrapping (every rank
needs the same number of steps), evaluation shards are rank r taking r, r+W, r+2W, ... without
padding, like :class:`xaudit.data.UnpaddedDistributedSampler`.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from dataclasses import dataclass, replace

import pytorch_lightning as pl
import torch
import torch.nn.functional as F
from torch import Tensor
from torch.utils.data import DataLoader, Dataset

from xaudit.data.base import Batch, TensorDictDataset


@dataclass(frozen=True)
class TensorSplit:
    """One split as tensors: images [N,C,H,W] (uint8 raw, or float already normalised), labels
    [N], optional masks [N,H,W], and the normalisation applied to uint8 images."""

    images: Tensor
    labels: Tensor
    mean: tuple[float, ...]
    std: tuple[float, ...]
    masks: Tensor | None = None

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    @property
    def image_shape(self) -> tuple[int, int, int]:
        """(C, H, W)."""
        c, h, w = self.images.shape[1:]
        return int(c), int(h), int(w)

    @classmethod
    def from_dataset(cls, dataset: Dataset, mean: tuple[float, ...], std: tuple[float, ...],
                     batch_size: int = 256) -> TensorSplit:
        """Materialise a batch-dict dataset (uint8 copy for in-memory data, else decoded floats)."""
        if isinstance(dataset, TensorDictDataset):
            return cls(dataset.images, dataset.labels, tuple(mean), tuple(std), dataset.masks)
        images, labels, masks = [], [], []
        for batch in DataLoader(dataset, batch_size=batch_size, shuffle=False):
            images.append(batch["image"].float())
            labels.append(batch["label"].long())
            if "mask" in batch:
                masks.append(batch["mask"].bool())
        return cls(torch.cat(images), torch.cat(labels), tuple(mean), tuple(std),
                   torch.cat(masks) if masks else None)

    def subset(self, n: int | None) -> TensorSplit:
        """The first ``n`` samples (all when ``n`` is None)."""
        if n is None or n >= len(self):
            return self
        return replace(self, images=self.images[:n], labels=self.labels[:n],
                       masks=None if self.masks is None else self.masks[:n])

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

    ``keep`` (bool [N,H,W]) zeroes the removed pixels after normalisation. ``train=True``
    shuffles with a generator seeded by ``seed`` and the epoch (so a rerun sees the same order),
    pads the rank shards to equal length and augments when ``augment``; ``train=False`` keeps
    dataset order and shards without padding. Batches carry ``index`` (position in the split).
    ``epoch_of`` gives the epoch being served (the trainer's ``current_epoch``, so a fit resumed at
    epoch k sees epoch k's order); without it each pass counts one epoch.
    """

    def __init__(self, split: TensorSplit, batch_size: int, *, train: bool = False, keep: Tensor | None = None,
                 augment: bool = False, seed: int = 0, device: torch.device | str = "cpu", rank: int = 0,
                 world: int = 1, channels_last: bool = False, epoch_of: Callable[[], int] | None = None) -> None:
        self.device = torch.device(device)
        self.images = split.images.to(self.device)
        self.labels = split.labels.to(self.device)
        self.masks = None if split.masks is None else split.masks.to(self.device)
        self.keep = None if keep is None else keep.to(self.device)
        self.split = split
        self.batch_size = int(batch_size)
        self.train, self.augment, self.seed = bool(train), bool(augment), int(seed)
        self.rank, self.world = int(rank), int(world)
        self.channels_last = bool(channels_last)
        self.epoch = 0
        self.epoch_of = epoch_of
        n = len(split)
        self.per_rank = math.ceil(n / self.world) if self.train else len(range(self.rank, n, self.world))

    def __len__(self) -> int:
        return math.ceil(self.per_rank / self.batch_size)

    def _indices(self) -> Tensor:
        n = len(self.split)
        if not self.train:
            return torch.arange(self.rank, n, self.world)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch)
        order = torch.randperm(n, generator=g)
        total = self.per_rank * self.world
        if total > n:  # wrap around so every rank takes the same number of steps
            order = torch.cat([order, order[: total - n]])
        return order[self.rank:total:self.world]

    def __iter__(self) -> Iterator[Batch]:
        if self.epoch_of is not None:
            self.epoch = int(self.epoch_of())
        idx = self._indices().to(self.device)
        g = torch.Generator().manual_seed(self.seed * 100_003 + self.epoch + 7_919 * (self.rank + 1))
        self.epoch += 1
        for start in range(0, idx.numel(), self.batch_size):
            sel = idx[start:start + self.batch_size]
            x = self.split.normalise(self.images[sel])
            if self.keep is not None:
                x = x * self.keep[sel][:, None]
            if self.train and self.augment:
                x = augment_batch(x, g)
            if self.channels_last:
                x = x.contiguous(memory_format=torch.channels_last)
            batch = {"image": x, "label": self.labels[sel], "index": sel}
            if self.masks is not None:
                batch["mask"] = self.masks[sel]
            yield batch


class SplitDataModule(pl.LightningDataModule):
    """Serves tensor splits through :class:`DeviceBatches` on the trainer's device and rank.

    ``train``/``test``/``predict`` splits are optional; ``keep`` masks apply to train and test.
    """

    def __init__(self, *, train: TensorSplit | None = None, test: TensorSplit | None = None,
                 predict: TensorSplit | None = None, batch_size: int = 128, eval_batch_size: int | None = None,
                 keep_train: Tensor | None = None, keep_test: Tensor | None = None, augment: bool = False,
                 seed: int = 0, channels_last: bool = False) -> None:
        super().__init__()
        self.train_split, self.test_split, self.predict_split = train, test, predict
        self.keep_train, self.keep_test = keep_train, keep_test
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.augment, self.seed, self.channels_last = bool(augment), int(seed), bool(channels_last)

    def _batches(self, split: TensorSplit | None, train: bool, keep: Tensor | None) -> DeviceBatches:
        if split is None:
            raise RuntimeError("SplitDataModule: this stage has no split.")
        trainer = self.trainer
        device = trainer.strategy.root_device if trainer is not None else torch.device("cpu")
        world, rank = (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)
        return DeviceBatches(split, self.batch_size if train else self.eval_batch_size, train=train, keep=keep,
                             augment=self.augment and train, seed=self.seed, device=device, rank=rank,
                             world=world, channels_last=self.channels_last,
                             epoch_of=(lambda: trainer.current_epoch) if trainer is not None and train else None)

    def train_dataloader(self) -> DeviceBatches:
        return self._batches(self.train_split, True, self.keep_train)

    def test_dataloader(self) -> DeviceBatches:
        return self._batches(self.test_split, False, self.keep_test)

    def predict_dataloader(self) -> DeviceBatches:
        return self._batches(self.predict_split, False, None)
