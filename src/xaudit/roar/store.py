"""Attribution shards: each method's maps of a whole split, computed once and kept on disk.

Layout under the audit directory::

    attributions/<method-key>/manifest.json         what was explained, and how (fingerprint)
    attributions/<method-key>/<split>/shard_<first>_<n>.pt   {"index": long [n], "attr": float16 [n,H,W]}

Shards are written atomically by whichever rank computed them (Lightning ``predict`` under DDP:
every rank takes its own slice), so an interrupted run keeps every finished shard and a rerun
computes only the missing ones. Each map is scaled by its max |value| before the cast to half
precision (ranking is invariant to positive scaling; float16 would overflow otherwise).

For reading by index (the streaming path), a complete split is also written once as one raw,
fixed-shape file ``<split>/maps_<n>x<h>x<w>.<dtype>`` (built shard by shard, atomically; its
name says its shape, so a store of other data is never read as this one). :class:`MapReader`
reads any batch of rows from it through a short-lived memory map: O(batch) memory, O(1) per map.
"""

from __future__ import annotations

import contextlib
import json
import os
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from xaudit.explainers import create
from xaudit.roar.data import SplitDataModule, TensorSplit
from xaudit.roar.results import config_diff, plain_json
from xaudit.utils.errors import ConfigError
from xaudit.utils.io import atomic_torch_save, atomic_write_json, atomic_writer, short_hash

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}


def method_key(name: str, kwargs: dict[str, Any]) -> str:
    """Folder name of a method: its name, plus a hash of its options when it has any."""
    return name if not kwargs else f"{name}-{short_hash(kwargs)}"


def check_store_dtype(name: str) -> torch.dtype:
    """The storage dtype for ``roar.store_dtype``."""
    if name not in STORE_DTYPES:
        raise ConfigError(f"roar.store_dtype={name!r} is unknown; choose one of {list(STORE_DTYPES)}.")
    return STORE_DTYPES[name]


class AttributionWriter(pl.LightningModule):
    """Computes one explainer's maps for a split in ``predict`` and writes one shard per batch.

    A batch whose shard already exists is skipped (resume). ``target`` is ``"label"`` (explain the
    true class) or ``"predicted"``.
    """

    def __init__(self, net: nn.Module, method: str, kwargs: dict[str, Any], out_dir: str | Path,
                 target: str = "label", dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.net = net
        self.explainer = create(method, net, **kwargs)
        self.out_dir = Path(out_dir)
        self.target = target
        self.store_dtype = dtype

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        index = batch["index"]
        path = self.out_dir / shard_name(int(index[0]), int(index.numel()))
        if path.is_file():
            return None
        target = batch["label"] if self.target == "label" else "predicted"
        attr = self.explainer.attribute(batch["image"], target).float()
        scale = attr.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1)
        atomic_torch_save(path, {"index": index.cpu(), "attr": (attr / scale).to(self.store_dtype).cpu()})
        return None


def shard_name(first: int, n: int) -> str:
    """``shard_<first>_<n>.pt``: the first dataset index and the number of maps."""
    return f"shard_{first:09d}_{n:06d}.pt"


class AttributionStore:
    """The attributions of one method on one audit's data, under ``root/<method-key>``."""

    def __init__(self, root: str | Path, method: str, kwargs: dict[str, Any], fingerprint: dict[str, Any]) -> None:
        self.method, self.kwargs = method, dict(kwargs)
        self.dir = Path(root) / method_key(method, self.kwargs)
        self.fingerprint = {"method": method, "kwargs": self.kwargs, **fingerprint}
        manifest = self.dir / "manifest.json"
        if manifest.is_file():
            diffs = config_diff(json.loads(manifest.read_text()), plain_json(self.fingerprint))
            changed = [d for d in diffs if d.startswith("content.")]
            if changed:
                raise ConfigError(
                    f"The data changed since the attributions in {self.dir} were written ({'; '.join(changed)}: "
                    "other files, labels, sizes or images). Delete that folder to recompute them on the current "
                    "data, or point data.data_dir back at the data they were computed on.")
            if diffs:
                raise ConfigError(
                    f"The stored attributions in {self.dir} were computed with a different setup "
                    f"(differs in: {'; '.join(diffs)}). Delete that folder to recompute them, or audit into "
                    "another directory (out_dir=...).")

    def split_dir(self, split: str) -> Path:
        """Folder of one split's shards."""
        return self.dir / split

    def compute(self, split_name: str, split: TensorSplit, net: nn.Module, trainer: pl.Trainer,
                batch_size: int, target: str, dtype: torch.dtype, num_workers: int = 0) -> None:
        """Write the missing shards of ``split`` with ``trainer.predict`` (every rank its slice)."""
        if trainer.is_global_zero:
            atomic_write_json(self.dir / "manifest.json", self.fingerprint)
        writer = AttributionWriter(net, self.method, self.kwargs, self.split_dir(split_name), target, dtype)
        data = SplitDataModule(predict=split, eval_batch_size=batch_size, num_workers=num_workers)
        trainer.predict(writer, datamodule=data,
                        return_predictions=False)
        barrier()

    def complete(self, split: str, n: int) -> bool:
        """Whether the shards of ``split`` cover all ``n`` samples (reads only their indices, memory-mapped)."""
        seen = torch.zeros(n, dtype=torch.bool)
        for path in self.split_dir(split).glob("shard_*.pt"):
            seen[torch.load(path, map_location="cpu", weights_only=True, mmap=True)["index"]] = True
        return bool(seen.all())

    def reader(self, split: str, n: int, size: tuple[int, int], dtype: torch.dtype, write: bool = True) -> MapReader:
        """A :class:`MapReader` of the complete ``split``, writing its raw map file first when it is
        missing and ``write`` (rank 0; other ranks wait at a barrier and then read it)."""
        h, w = size
        path = self.split_dir(split) / f"maps_{n}x{h}x{w}.{_RAW[dtype][1]}"
        if write and not path.is_file():
            seen = torch.zeros(n, dtype=torch.bool)
            with atomic_writer(path) as f:
                f.truncate(n * h * w * torch.empty((), dtype=dtype).element_size())
                for _, shard in self._shards(split, n, size):
                    attr = shard["attr"].to(dtype)
                    raw = attr.view(torch.int16) if dtype == torch.bfloat16 else attr
                    for i, row in zip(shard["index"].tolist(), raw.numpy(), strict=True):
                        f.seek(i * row.nbytes)
                        f.write(row.tobytes())
                    seen[shard["index"]] = True
                if not bool(seen.all()):
                    missing = (~seen).nonzero().flatten()
                    raise RuntimeError(f"attributions of {self.method} on {split} miss {missing.numel()} samples "
                                       f"(first {missing[:5].tolist()}); rerun the audit to compute them.")
        barrier()
        return MapReader(path, n, size, dtype)

    def _shards(self, split: str, n: int, size: tuple[int, int]) -> Any:
        """Each shard of ``split`` as (path, {"index", "attr"}), checked against the data's shape."""
        for path in sorted(self.split_dir(split).glob("shard_*.pt")):
            try:
                shard = torch.load(path, map_location="cpu", weights_only=True)
            except (RuntimeError, EOFError, zipfile.BadZipFile) as err:
                raise ConfigError(f"{path} is not a readable attribution shard ({err}); it is truncated or "
                                  "corrupt. Delete it: the rerun recomputes that shard only.") from None
            attr, index = shard["attr"], shard["index"]
            if tuple(attr.shape[1:]) != tuple(size) or (index.numel() and int(index.max()) >= n):
                raise ConfigError(
                    f"{path} holds maps {tuple(attr.shape[1:])} of samples up to {int(index.max())}, but the data has "
                    f"{n} samples of {tuple(size)}: the store is from other data. Delete {self.dir} to recompute "
                    "it, or audit into another directory (out_dir=...).")
            yield path, shard

    def load(self, split: str, n: int, size: tuple[int, int], required: bool = True,
             dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The maps [n,H,W] of ``split`` assembled from the shards, in ``dtype`` (the store's own
        float16 halves the memory of the float32 default and holds the same values).

        When a sample is missing: an error if ``required``, else None (the caller computes them).
        """
        out = torch.zeros((n, *size), dtype=dtype)
        seen = torch.zeros(n, dtype=torch.bool)
        for _, shard in self._shards(split, n, size):
            out[shard["index"]] = shard["attr"].to(dtype)
            seen[shard["index"]] = True
        if bool(seen.all()):
            return out
        if not required:
            return None
        missing = (~seen).nonzero().flatten()
        raise RuntimeError(f"attributions of {self.method} on {split} miss {missing.numel()} samples "
                           f"(first {missing[:5].tolist()}); rerun the audit to compute them.")


#: how each store dtype lies on disk in the raw map file (numpy has no bfloat16: its bits as uint16)
_RAW = {torch.float16: (np.float16, "float16"), torch.bfloat16: (np.uint16, "bfloat16"),
        torch.float32: (np.float32, "float32")}


class MapReader:
    """Rows of a split's raw map file: ``reader[index]`` → float32 [B,H,W] for dataset indices,
    ``reader.row(i)`` → float32 [H,W] for one.

    A batch read maps the file, copies the rows out and unmaps it; a row read is one ``pread`` of
    that row's bytes. Memory stays O(batch) however many maps a sweep reads. Picklable (it holds the
    path; each process opens its own handle), so DDP ranks and DataLoader workers can read it.
    """

    def __init__(self, path: str | Path, n: int, size: tuple[int, int], dtype: torch.dtype) -> None:
        self.path, self.n, self.size, self.dtype = Path(path), int(n), tuple(size), dtype
        self._fd: tuple[int, int] | None = None  # (pid, file descriptor) of this process's handle

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fd": None}

    def _decode(self, rows: np.ndarray) -> Tensor:
        out = torch.from_numpy(rows)
        if self.dtype == torch.bfloat16:
            out = out.view(torch.bfloat16)
        return out.float()

    def __getitem__(self, index: Tensor) -> Tensor:
        index = torch.as_tensor(index).long().cpu().flatten()
        raw = np.memmap(self.path, dtype=_RAW[self.dtype][0], mode="r", shape=(self.n, *self.size))
        try:
            rows = np.array(raw[index.numpy()])
        finally:
            del raw
        return self._decode(rows)

    def row(self, i: int) -> Tensor:
        """One map float32 [H,W] (sample ``i``), read without mapping the file."""
        if not 0 <= int(i) < self.n:
            raise IndexError(f"sample {i} is outside the {self.n} maps of {self.path}")
        if self._fd is None or self._fd[0] != os.getpid():  # a forked worker opens its own handle
            self._fd = (os.getpid(), os.open(self.path, os.O_RDONLY))
        dtype = np.dtype(_RAW[self.dtype][0])
        nbytes = self.size[0] * self.size[1] * dtype.itemsize
        data = os.pread(self._fd[1], nbytes, int(i) * nbytes)
        if len(data) != nbytes:
            raise ConfigError(f"{self.path} ends before map {i}: it is truncated. Delete it; the rerun rebuilds it "
                              "from the shards.")
        return self._decode(np.frombuffer(data, dtype=dtype).reshape(self.size).copy())

    def __del__(self) -> None:
        if getattr(self, "_fd", None) is not None and self._fd[0] == os.getpid():
            with contextlib.suppress(OSError):
                os.close(self._fd[1])


def barrier() -> None:
    """Wait for every rank when a process group is up (DDP launched by subprocesses)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
