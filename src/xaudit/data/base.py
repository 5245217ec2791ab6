"""Shared pieces of every datamodule: the batch-dict dataset and DDP samplers without padding.

A batch is a dict: ``image`` float [B,C,H,W] (normalised), ``label`` long [B], ``index`` long [B]
(position in the split, used by ROAR's attribution store) and ``mask`` bool [B,H,W] where ground
truth exists.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch.utils.data import DataLoader, Dataset, DistributedSampler, Subset

from xaudit.utils.errors import count_or_auto

Batch = dict[str, torch.Tensor]
#: ``num_workers="auto"`` never starts more loader workers than this per process
MAX_AUTO_WORKERS = 8


def usable_cpus() -> int:
    """CPUs this process may run on (a Slurm task's allocation, a container's cpuset)."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:  # macOS, Windows
        return os.cpu_count() or 1


def auto_num_workers(cpus: int | None = None, processes: int = 1) -> int:
    """Loader workers for ``num_workers="auto"``: ``min(8, c - 1)`` with ``c`` CPUs per training process.

    With two CPUs or fewer per process there are none: the main process needs them for the
    model (on a CPU trainer) or to feed the GPU, and the in-memory datasets cost little per item.
    """
    per_process = max(1, (usable_cpus() if cpus is None else int(cpus)) // max(1, int(processes)))
    return 0 if per_process <= 2 else min(MAX_AUTO_WORKERS, per_process - 1)


class TensorDictDataset(Dataset):
    """In-memory uint8 images (+ optional masks) served as normalised batch dicts.

    Images stay uint8 in memory (4x smaller than float) and are normalised per item.
    ``augment`` applies a seeded-by-global-RNG random crop (pad 4) and horizontal flip.

    Args:
        images: uint8 images [N,C,H,W].
        labels: class indices [N] (or multi-hot [N,K]).
        mean: per-channel normalisation mean, in [0,1] units.
        std: per-channel normalisation standard deviation.
        masks: optional bool ground-truth masks [N,H,W] (or [N,K,H,W]), returned as ``mask``.
        augment: random crop (pad 4) and horizontal flip per item (training split).
    """

    def __init__(
        self,
        images: torch.Tensor,
        labels: torch.Tensor,
        mean: Sequence[float],
        std: Sequence[float],
        masks: torch.Tensor | None = None,
        augment: bool = False,
    ) -> None:
        if images.ndim != 4:
            raise ValueError(f"images must be [N,C,H,W], got shape {tuple(images.shape)}")
        self.images = images
        self.labels = labels.long()
        self.masks = masks
        self.mean = torch.tensor(mean, dtype=torch.float32).view(-1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(-1, 1, 1)
        self.augment = augment

    def __len__(self) -> int:
        return int(self.labels.shape[0])

    def __getitem__(self, i: int) -> Batch:
        img = self.images[i].float().div_(255.0)
        mask = self.masks[i] if self.masks is not None else None
        if self.augment:
            img, mask = random_crop_flip(img, mask)
        item = {"image": (img - self.mean) / self.std, "label": self.labels[i], "index": torch.tensor(i)}
        if mask is not None:
            item["mask"] = mask
        return item


def random_crop_flip(
    img: torch.Tensor, mask: torch.Tensor | None, pad: int = 4
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Standard CIFAR augmentation (reflect-pad crop + flip) applied identically to the mask."""
    h, w = img.shape[-2:]
    i, j = (int(v) for v in torch.randint(0, 2 * pad + 1, (2,)))
    flip = bool(torch.rand(()) < 0.5)
    img = torch.nn.functional.pad(img[None], (pad, pad, pad, pad), mode="reflect")[0, :, i : i + h, j : j + w]
    if flip:
        img = img.flip(-1)
    if mask is not None:
        mask = torch.nn.functional.pad(mask[None, None].float(), (pad, pad, pad, pad), mode="reflect")
        mask = mask[0, 0, i : i + h, j : j + w].bool()
        if flip:
            mask = mask.flip(-1)
    return img, mask


def eval_shard(n: int, batch_size: int, rank: int, world: int) -> torch.Tensor:
    """Dataset indices rank ``rank`` of ``world`` evaluates (long, CPU): whole batches, dealt round-robin.

    The split is cut into batches of ``batch_size`` in dataset order and rank r takes batches r,
    r+W, r+2W, ...: no padding, no duplicates, and every batch holds exactly the samples it holds
    on one device — so metrics whose per-sample value depends on the other samples of its batch
    (Focus's mosaics, Sufficiency's neighbours, feature permutation) give the same values under
    DDP. A split of W-1 batches or fewer is cut into W contiguous near-equal parts instead, so
    that no rank is left without a batch (Lightning skips a rank's evaluation loop, and with it
    the metrics' collective reduction, when it has none); batch-dependent values then differ
    from one device's.
    """
    if batch_size < 1 or world < 1 or not 0 <= rank < world:
        raise ValueError(f"eval_shard: need batch_size >= 1 and 0 <= rank < world; got {batch_size}, {rank}, {world}.")
    if n <= (world - 1) * batch_size:
        return torch.arange(n).tensor_split(world)[rank]
    starts = range(rank * batch_size, n, world * batch_size)
    return torch.cat([torch.arange(s, min(s + batch_size, n)) for s in starts])


class UnpaddedDistributedSampler(DistributedSampler):
    """Shards an evaluation set across ranks *without* padding or duplicates, whole batches at a time.

    ``torch.utils.data.DistributedSampler`` repeats samples so every rank gets the same count,
    which biases metrics, and interleaves samples, which changes every batch's composition. Here
    rank r takes the batches r, r+W, ... of ``batch_size`` samples (:func:`eval_shard`); ranks may
    differ by one batch, and torchmetrics' sum/cat states reduce that exactly. Subclassing
    DistributedSampler tells Lightning not to replace it.

    Args:
        dataset: the evaluation dataset (only its length is read).
        num_replicas: the world size W.
        rank: this process's rank r.
        batch_size: the evaluation batch size (the unit of sharding).
    """

    def __init__(self, dataset: Dataset, num_replicas: int, rank: int, batch_size: int = 1) -> None:
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=False, drop_last=False)
        n = len(dataset)  # type: ignore[arg-type]
        self.indices = eval_shard(n, int(batch_size), rank, num_replicas).tolist()
        self.num_samples = len(self.indices)
        self.total_size = n

    def __iter__(self) -> Iterator[int]:
        return iter(self.indices)


class XAuditDataModule(pl.LightningDataModule):
    """Base datamodule: loaders yielding batch dicts, DDP-exact evaluation sharding.

    Subclasses fill ``self.train_set``, ``self.val_set``, ``self.test_set`` in ``setup`` and set
    ``num_classes``, ``in_chans``, ``image_size``, ``mean``, ``std``, ``class_names`` and
    ``has_masks`` in ``__init__`` (so a model can be built before ``setup``).

    ``num_workers`` is a count or "auto" (:func:`auto_num_workers`, split between the training
    processes of a node). Batches are put in pinned memory only when the trainer runs on CUDA,
    where Lightning's ``non_blocking`` copy then overlaps the transfer; on CPU pinning only costs.

    Args:
        batch_size: training batch size (per process).
        eval_batch_size: validation/test/predict batch size (None: ``batch_size``).
        num_workers: DataLoader worker processes, or ``"auto"`` (:func:`auto_num_workers`).
        seed: seeds the generated data or the validation holdout, and the DDP training sampler.
    """

    num_classes: int
    in_chans: int = 3
    image_size: int
    mean: tuple[float, ...]
    std: tuple[float, ...]
    class_names: list[str]
    has_masks: bool = False
    #: whether ``mean`` is the training split's own per-channel mean (shapes: computed; CIFAR-10: its
    #: published train-set mean): ROAR's fill ``auto`` then uses it as it is (0 in normalised units)
    mean_is_train_mean: bool = False

    def __init__(self, batch_size: int = 128, eval_batch_size: int | None = None, num_workers: int | str = 0,
                 seed: int = 0) -> None:
        super().__init__()
        self.batch_size = int(batch_size)
        self.eval_batch_size = int(eval_batch_size or batch_size)
        self.num_workers_option = count_or_auto(
            num_workers, "data.num_workers", 0, f"from the CPUs per training process, at most {MAX_AUTO_WORKERS}")
        self.seed = int(seed)
        self.train_set: Dataset | None = None
        self.val_set: Dataset | None = None
        self.test_set: Dataset | None = None

    def plain_train_set(self) -> Dataset:
        """The training split without random augmentation (what ROAR explains, masks and re-augments
        per batch itself, so an image and its keep-mask stay aligned)."""
        if self.train_set is None:
            self.setup("fit")
        assert self.train_set is not None
        return self.train_set

    # -- helpers ---------------------------------------------------------------------------
    @property
    def num_workers(self) -> int:
        """Loader workers per process: the configured count, or "auto" resolved for this trainer."""
        if isinstance(self.num_workers_option, int):
            return self.num_workers_option
        trainer = getattr(self, "trainer", None)
        return auto_num_workers(processes=int(trainer.num_devices) if trainer is not None else 1)

    @property
    def pin_memory(self) -> bool:
        """Pinned batches only for a CUDA trainer (what makes the host→GPU copy asynchronous)."""
        trainer = getattr(self, "trainer", None)
        return trainer is not None and trainer.strategy.root_device.type == "cuda"

    def _world(self) -> tuple[int, int]:
        trainer = getattr(self, "trainer", None)
        if trainer is None:
            return 1, 0
        return int(trainer.world_size), int(trainer.global_rank)

    def _loader(self, dataset: Dataset | None, train: bool, split: str) -> DataLoader:
        if dataset is None:
            self.setup("fit" if split in ("train", "val") else "test")
            dataset = getattr(self, f"{split}_set")
        world, rank = self._world()
        sampler: Any = None
        if world > 1:
            sampler = (
                DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=self.seed)
                if train
                else UnpaddedDistributedSampler(dataset, num_replicas=world, rank=rank,
                                                batch_size=self.eval_batch_size)
            )
        workers = self.num_workers
        return DataLoader(
            dataset,
            batch_size=self.batch_size if train else self.eval_batch_size,
            shuffle=train and sampler is None,
            sampler=sampler,
            num_workers=workers,
            persistent_workers=workers > 0,
            pin_memory=self.pin_memory,
            drop_last=False,
        )

    def train_dataloader(self) -> DataLoader:
        return self._loader(self.train_set, True, "train")

    def val_dataloader(self) -> DataLoader:
        return self._loader(self.val_set, False, "val")

    def test_dataloader(self) -> DataLoader:
        return self._loader(self.test_set, False, "test")

    def describe(self) -> dict[str, Any]:
        """Plain-data summary (stored in checkpoints so an audit can rebuild the data)."""
        return {
            "num_classes": self.num_classes,
            "in_chans": self.in_chans,
            "image_size": self.image_size,
            "mean": list(self.mean),
            "std": list(self.std),
            "class_names": list(self.class_names),
            "has_masks": self.has_masks,
        }

    def denormalize(self, image: torch.Tensor) -> torch.Tensor:
        """Undo the normalisation: [B,C,H,W] normalised → [0,1] for plotting."""
        mean = torch.tensor(self.mean, device=image.device, dtype=image.dtype).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=image.device, dtype=image.dtype).view(1, -1, 1, 1)
        return (image * std + mean).clamp(0, 1)


def channel_stats(images_uint8: torch.Tensor) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """Per-channel mean/std of uint8 images [N,C,H,W] in [0,1] units (float64 for exactness)."""
    x = images_uint8.double().div(255.0)
    mean = x.mean(dim=(0, 2, 3))
    std = x.std(dim=(0, 2, 3)).clamp_min(1e-3)
    return tuple(round(float(v), 6) for v in mean), tuple(round(float(v), 6) for v in std)


def dataset_labels(dataset: Dataset) -> torch.Tensor:
    """Class labels [N] of a dataset without decoding images where the dataset knows them
    (``labels``/``targets``, a wrapped ImageFolder's ``folder.targets``, a ``Subset`` of those)."""
    if isinstance(dataset, Subset):
        return dataset_labels(dataset.dataset)[torch.as_tensor(list(dataset.indices), dtype=torch.long)]
    for attr in ("labels", "targets"):
        if hasattr(dataset, attr):
            return torch.as_tensor(getattr(dataset, attr)).long()
    folder = getattr(dataset, "folder", None)
    if folder is not None and hasattr(folder, "targets"):
        return torch.as_tensor(folder.targets).long()
    return torch.stack([torch.as_tensor(dataset[i]["label"]) for i in range(len(dataset))]).long()


def dataset_fingerprint(dataset: Dataset, probes: int = 256, labels: torch.Tensor | None = None) -> str:
    """A short hash of what a dataset holds, cheap at ImageNet scale (no full decode, no full scan).

    Covers the number of samples and every label; for a file dataset (torchvision ``ImageFolder``
    ``samples``) every file's path under the root and the byte sizes of ``probes`` evenly spaced
    files; for an in-memory :class:`TensorDictDataset` the bytes of ``probes`` evenly spaced images.
    Stored with derived data (attribution stores) so data that changed since is refused, not reused.
    ``labels``: the dataset's labels when the caller already has them (else :func:`dataset_labels`).
    """
    h = hashlib.sha256()
    if isinstance(dataset, Subset):
        h.update(dataset_fingerprint(dataset.dataset, probes).encode())
        h.update(torch.as_tensor(list(dataset.indices), dtype=torch.long).numpy().tobytes())
        return h.hexdigest()[:16]
    n = len(dataset)  # type: ignore[arg-type]
    h.update(str(n).encode())
    h.update((dataset_labels(dataset) if labels is None else labels.long()).cpu().numpy().tobytes())
    picks = sorted({int(i) for i in torch.linspace(0, max(n - 1, 0), min(n, probes)).round().long()}) if n else []
    folder = getattr(dataset, "folder", dataset)
    samples = getattr(folder, "samples", None)
    if samples is not None:
        root = Path(getattr(folder, "root", "."))
        for path, _ in samples:
            h.update(os.path.relpath(path, root).encode() + b"\0")
        for i in picks:
            h.update(str(os.path.getsize(samples[i][0])).encode())
    elif isinstance(dataset, TensorDictDataset):
        h.update(str(tuple(dataset.images.shape)).encode())
        for i in picks:
            h.update(dataset.images[i].contiguous().numpy().tobytes())
    elif n:
        h.update(torch.as_tensor(dataset[0]["image"]).float().numpy().tobytes())
    return h.hexdigest()[:16]
