"""Attribution shards: each method's maps of a whole split, computed once and kept on disk.

Layout under the audit directory::

    attributions/<method-key>/manifest.json         what was explained, and how (fingerprint)
    attributions/<method-key>/<split>/shard_<first>_<n>.pt   {"index": long [n], "attr": float16 [n,H,W]}

Shards are written atomically by whichever rank computed them (Lightning ``predict`` under DDP:
every rank takes its own slice), so an interrupted run keeps every finished shard and a rerun
computes only the missing ones. Each map is scaled by its max |value| before the cast to half
precision (ranking is invariant to positive scaling; float16 would overflow otherwise).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from xaudit.explainers import create
from xaudit.roar.data import SplitDataModule, TensorSplit
from xaudit.roar.results import config_diff, plain_json
from xaudit.utils.errors import ConfigError
from xaudit.utils.io import atomic_torch_save, atomic_write_json, short_hash

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

    def load(self, split: str, n: int, size: tuple[int, int], required: bool = True,
             dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The maps [n,H,W] of ``split`` assembled from the shards, in ``dtype`` (the store's own
        float16 halves the memory of the float32 default and holds the same values).

        When a sample is missing: an error if ``required``, else None (the caller computes them).
        """
        out = torch.zeros((n, *size), dtype=dtype)
        seen = torch.zeros(n, dtype=torch.bool)
        for path in sorted(self.split_dir(split).glob("shard_*.pt")):
            shard = torch.load(path, map_location="cpu", weights_only=True)
            attr = shard["attr"]
            if tuple(attr.shape[1:]) != tuple(size):
                raise ConfigError(f"{path} holds maps of size {tuple(attr.shape[1:])}, the data is {tuple(size)}: "
                                  f"the store is from other data. Delete {self.dir} to recompute it, or audit "
                                  "into another directory (out_dir=...).")
            out[shard["index"]] = attr.to(dtype)
            seen[shard["index"]] = True
        if bool(seen.all()):
            return out
        if not required:
            return None
        missing = (~seen).nonzero().flatten()
        raise RuntimeError(f"attributions of {self.method} on {split} miss {missing.numel()} samples "
                           f"(first {missing[:5].tolist()}); rerun the audit to compute them.")


def barrier() -> None:
    """Wait for every rank when a process group is up (DDP launched by subprocesses)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
