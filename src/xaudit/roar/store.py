"""Attribution stores: each method's maps of a whole split, computed once and kept on disk.

Layout under the audit directory::

    attributions/<method-key>/manifest.json          what was explained, and how (fingerprint)
    attributions/<method-key>/<split>/layout.json    n, map size, dtype and the number of shard files W
    attributions/<method-key>/<split>/maps_r<r>of<W>_<n>x<h>x<w>.<dtype>   shard r: raw, fixed-shape rows
    attributions/<method-key>/<split>/done_r<r>of<W>.txt                   the rows writer r finished

The maps of a split are written straight into W fixed-shape raw files (W = the number of ranks that
computed them; float16 by default): shard ``r`` holds the samples ``r, r+W, r+2W, ...``. Under DDP
``predict`` hands each rank whole batches (evaluation sharding, no padding), and a rank writes the
rows of its batches into the shards holding them, at offsets no other rank writes; a contiguous
batch is one contiguous block of each shard. There is no second copy: the same files are what
:class:`MapReader` reads by index, each map with one ``pread`` into the batch's buffer, without
loading the rest.

Crash safety: a writer appends one line per finished batch to its ``done`` log, after the batch's
rows are written and synced. A killed run leaves its finished batches recorded; the rerun computes
only the rows no log names (a half-written last line is ignored, so that batch is recomputed).
Each map is scaled by its max |value| before the cast to half precision (ranking is invariant to
positive scaling; float16 would overflow otherwise).
"""

from __future__ import annotations

import contextlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from xaudit.data.tensor_split import SplitDataModule, TensorSplit
from xaudit.explainers import create
from xaudit.utils.errors import ConfigError
from xaudit.utils.io import atomic_write_json, output_errors, short_hash
from xaudit.utils.results import config_diff, plain_json

STORE_DTYPES = {"float16": torch.float16, "bfloat16": torch.bfloat16, "float32": torch.float32}

#: how each store dtype lies on disk (numpy has no bfloat16: its bits as uint16)
_RAW = {torch.float16: (np.float16, "float16"), torch.bfloat16: (np.uint16, "bfloat16"),
        torch.float32: (np.float32, "float32")}


def method_key(name: str, kwargs: dict[str, Any]) -> str:
    """Folder name of a method: its name, plus a hash of its options when it has any."""
    return name if not kwargs else f"{name}-{short_hash(kwargs)}"


def check_store_dtype(name: str) -> torch.dtype:
    """The storage dtype for ``roar.store_dtype``."""
    if name not in STORE_DTYPES:
        raise ConfigError(f"roar.store_dtype={name!r} is unknown; choose one of {list(STORE_DTYPES)}.")
    return STORE_DTYPES[name]


class SplitLayout:
    """Where the maps of one split lie: ``world`` raw shard files under ``folder``; sample ``i`` is
    row ``i // world`` of shard ``i % world``."""

    def __init__(self, folder: str | Path, n: int, size: tuple[int, int], dtype: torch.dtype, world: int) -> None:
        self.folder, self.n, self.size, self.dtype = Path(folder), int(n), (int(size[0]), int(size[1])), dtype
        self.world = int(world)
        self.row_bytes = self.size[0] * self.size[1] * np.dtype(_RAW[dtype][0]).itemsize

    def record(self) -> dict[str, Any]:
        """What ``layout.json`` holds."""
        return {"n": self.n, "size": list(self.size), "dtype": _RAW[self.dtype][1], "world": self.world}

    def rows(self, r: int) -> int:
        """How many maps shard ``r`` holds."""
        return len(range(r, self.n, self.world))

    def shard(self, r: int) -> Path:
        """The raw file of shard ``r``."""
        h, w = self.size
        return self.folder / f"maps_r{r:04d}of{self.world:04d}_{self.n}x{h}x{w}.{_RAW[self.dtype][1]}"

    def shards(self) -> list[Path]:
        """Every shard file, in rank order."""
        return [self.shard(r) for r in range(self.world)]

    def check_sizes(self) -> None:
        """Every shard file exists and has its full size; else a clear error naming the fix."""
        for r, path in enumerate(self.shards()):
            want = self.rows(r) * self.row_bytes
            have = path.stat().st_size if path.is_file() else -1
            if have != want:
                what = "is missing" if have < 0 else f"holds {have} bytes, not {want}: it is truncated or corrupt"
                raise ConfigError(f"Attribution shard {path} {what}. Delete {self.folder} to recompute this "
                                  "split's maps.")

    def scan(self) -> tuple[Tensor, Tensor | None, int]:
        """What the ``done`` logs record: bool [n] of the samples written, the per-channel sums of
        their images (float64 [C], None if no line carries them) and how many samples those cover.

        Only complete lines count (a line is complete once its newline is written): a line cut short
        by a kill names nothing, so its batch is recomputed."""
        seen = torch.zeros(self.n, dtype=torch.bool)
        sums: Tensor | None = None
        covered = 0
        for log in self.folder.glob("done_*.txt"):
            for line in log.read_text(errors="replace").split("\n")[:-1]:
                head, _, tail = line.partition("|")
                parts = head.split()
                if len(parts) != 3 or not all(p.lstrip("-").isdigit() for p in parts):
                    continue
                start, stop, step = (int(p) for p in parts)
                if step <= 0 or start < 0 or stop > self.n:
                    continue
                seen[start:stop:step] = True
                try:
                    values = torch.tensor([float(v) for v in tail.split()], dtype=torch.float64)
                except ValueError:
                    continue
                if values.numel() and (sums is None or sums.shape == values.shape):
                    sums = values if sums is None else sums + values
                    covered += len(range(start, stop, step))
        return seen, sums, covered

    def done(self) -> Tensor:
        """bool [n]: the samples some writer's ``done`` log records as written."""
        return self.scan()[0]

    def channel_mean(self) -> Tensor | None:
        """Per-channel mean float32 [C] of the split's images (in the units the explainer saw:
        normalised), from the sums the writers logged; None until every sample is written with its
        sums (each sample is logged exactly once, so nothing is counted twice)."""
        seen, sums, covered = self.scan()
        if sums is None or not bool(seen.all()) or covered != self.n:
            return None
        return (sums / (self.n * self.size[0] * self.size[1])).float()


def _runs(index: Tensor) -> list[tuple[int, int, int, int, int]]:
    """``index`` (long [B]) as maximal arithmetic runs for the done log: ``(start, stop, step, i, j)``,
    the run being ``index[i:j]`` = ``range(start, stop, step)``."""
    idx = index.tolist()
    out, i = [], 0
    while i < len(idx):
        step = idx[i + 1] - idx[i] if i + 1 < len(idx) and idx[i + 1] > idx[i] else 1
        j = i + 1
        while j < len(idx) and idx[j] - idx[j - 1] == step:
            j += 1
        out.append((idx[i], idx[j - 1] + 1, step, i, j))  # stop: one past the last sample
        i = j
    return out


class ShardWriter:
    """Writes rows of a :class:`SplitLayout` (``write(index, maps)``) and logs each finished batch in
    this writer's own ``done`` log. Each rank of a ``predict`` opens one."""

    def __init__(self, layout: SplitLayout, rank: int, world: int) -> None:
        self.layout = layout
        self.log_path = layout.folder / f"done_r{rank:04d}of{world:04d}.txt"
        self._fds: dict[int, int] = {}

    def _fd(self, r: int) -> int:
        if r not in self._fds:
            self._fds[r] = os.open(self.layout.shard(r), os.O_RDWR)
        return self._fds[r]

    def write(self, index: Tensor, maps: Tensor, sums: Tensor | None = None) -> None:
        """Write ``maps`` (store dtype, CPU, [B,H,W]) as the rows of samples ``index``, sync, log.

        ``sums``: float64 [B,C], each sample's per-channel pixel sum, logged with the batch (the
        split's channel mean — the ROAR fill — then costs no extra pass over the data)."""
        lay = self.layout
        index = index.cpu().long()
        raw = maps.view(torch.int16) if maps.dtype == torch.bfloat16 else maps
        data = np.ascontiguousarray(raw.numpy())
        touched = set()
        with output_errors(lay.folder, "out_dir"):
            for r in sorted(set((index % lay.world).tolist())):
                sel = (index % lay.world == r).nonzero().flatten()
                rows = index[sel] // lay.world
                fd = self._fd(r)
                touched.add(fd)
                if bool((rows.diff() == 1).all()):  # the usual case: one contiguous block of this shard
                    os.pwrite(fd, data[sel.numpy()].tobytes(), int(rows[0]) * lay.row_bytes)
                else:
                    for k, row in zip(sel.tolist(), rows.tolist(), strict=True):
                        os.pwrite(fd, data[k].tobytes(), int(row) * lay.row_bytes)
            for fd in touched:
                os.fdatasync(fd)  # the rows reach the disk before the log says they did
            with open(self.log_path, "a") as log:
                lines = []
                for a, b, c, i, j in _runs(index):
                    tail = "" if sums is None else " | " + " ".join(repr(float(v)) for v in sums[i:j].sum(0).tolist())
                    lines.append(f"{a} {b} {c}{tail}\n")
                log.write("".join(lines))
                log.flush()
                os.fsync(log.fileno())

    def close(self) -> None:
        """Close the shard files."""
        for fd in self._fds.values():
            with contextlib.suppress(OSError):
                os.close(fd)
        self._fds.clear()


class AttributionWriter(pl.LightningModule):
    """Computes one explainer's maps for a split in ``predict`` and writes them into the split's
    shard files (each rank its own rows), skipping batches already done (resume).

    ``target`` is ``"label"`` (explain the true class) or ``"predicted"``.
    """

    def __init__(self, net: nn.Module, method: str, kwargs: dict[str, Any], layout: SplitLayout,
                 target: str = "label", dtype: torch.dtype = torch.float16) -> None:
        super().__init__()
        self.net = net
        self.explainer = create(method, net, **kwargs)
        self.layout = layout
        self.target = target
        self.store_dtype = dtype
        self._writer: ShardWriter | None = None
        self._done: Tensor | None = None

    def forward(self, x: Tensor) -> Tensor:
        return self.net(x)

    def on_predict_start(self) -> None:
        self._done = self.layout.done()
        self._writer = ShardWriter(self.layout, self.global_rank, self.trainer.world_size)

    def on_predict_end(self) -> None:
        if self._writer is not None:
            self._writer.close()

    def predict_step(self, batch: dict[str, Tensor], batch_idx: int) -> None:
        assert self._writer is not None and self._done is not None
        index = batch["index"].cpu().long()
        todo = ~self._done[index]
        if not bool(todo.any()):
            return None
        x, y = batch["image"], batch["label"]
        if not bool(todo.all()):  # a store begun by another number of ranks: write each sample once
            keep = todo.nonzero().flatten()
            x, y, index = x[keep.to(x.device)], y[keep.to(y.device)], index[keep]
        target = y if self.target == "label" else "predicted"
        attr = self.explainer.attribute(x, target).float()
        scale = attr.flatten(1).abs().amax(1).clamp_min(1e-30).view(-1, 1, 1)
        sums = x.detach().double().sum(dim=(2, 3)).cpu()  # per-sample channel sums: the split's mean, for free
        self._writer.write(index, (attr / scale).to(self.store_dtype).cpu(), sums)
        return None


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

    def _record(self, split: str) -> dict[str, Any] | None:
        """``layout.json`` of ``split`` (None before its first write); unreadable is a clear error."""
        path = self.split_dir(split) / "layout.json"
        if not path.is_file():
            return None
        try:
            rec = json.loads(path.read_text())
            int(rec["n"]), int(rec["world"]), STORE_DTYPES[rec["dtype"]], [int(v) for v in rec["size"]]
        except (ValueError, KeyError, TypeError) as err:
            raise ConfigError(f"{path} is not a readable store layout ({err!r}). Delete {self.split_dir(split)} "
                              "to recompute this split's maps.") from None
        return rec

    def layout(self, split: str, n: int, size: tuple[int, int], dtype: torch.dtype) -> SplitLayout | None:
        """The layout ``split`` was written with (None before its first write), checked against the
        data (``n`` samples of ``size``) and the store dtype: another is a clear error naming the fix."""
        rec = self._record(split)
        if rec is None:
            return None
        layout = SplitLayout(self.split_dir(split), n, size, dtype, int(rec["world"]))
        want = layout.record()
        if rec != want:
            diffs = [f"{k}: stored {rec.get(k)!r}, this run {v!r}" for k, v in want.items() if rec.get(k) != v]
            raise ConfigError(
                f"The attribution store {self.split_dir(split)} does not match this run's data ({'; '.join(diffs)}): "
                f"the store is from other data or another roar.store_dtype. Delete {self.dir} to recompute it, "
                "or audit into another directory (out_dir=...).")
        return layout

    def prepare(self, split: str, n: int, size: tuple[int, int], dtype: torch.dtype, world: int) -> SplitLayout:
        """The split's layout, creating its ``world`` shard files (full size, sparse) on the first
        write. A store begun by another number of ranks keeps its layout (any rank can write any row)."""
        layout = self.layout(split, n, size, dtype)
        if layout is None:
            layout = SplitLayout(self.split_dir(split), n, size, dtype, world)
            with output_errors(layout.folder):
                layout.folder.mkdir(parents=True, exist_ok=True)
                for stale in layout.folder.glob("done_*.txt"):  # logs without a layout describe nothing
                    stale.unlink()
                for r, path in enumerate(layout.shards()):
                    with open(path, "wb") as f:
                        f.truncate(layout.rows(r) * layout.row_bytes)
                atomic_write_json(layout.folder / "layout.json", layout.record())  # last: the files exist
        layout.check_sizes()
        return layout

    def compute(self, split_name: str, split: TensorSplit, net: nn.Module, trainer: pl.Trainer,
                batch_size: int, target: str, dtype: torch.dtype, num_workers: int = 0) -> None:
        """Write the missing rows of ``split`` with ``trainer.predict`` (every rank its own shard)."""
        size = split.image_shape[1:]
        if trainer.is_global_zero:
            atomic_write_json(self.dir / "manifest.json", self.fingerprint)
            self.prepare(split_name, len(split), size, dtype, trainer.world_size)
        barrier()
        layout = self.layout(split_name, len(split), size, dtype)
        assert layout is not None
        writer = AttributionWriter(net, self.method, self.kwargs, layout, target, dtype)
        data = SplitDataModule(predict=split, eval_batch_size=batch_size, num_workers=num_workers)
        trainer.predict(writer, datamodule=data, return_predictions=False)
        barrier()

    def complete(self, split: str, n: int, size: tuple[int, int] | None = None,
                 dtype: torch.dtype | None = None) -> bool:
        """Whether every one of the ``n`` samples of ``split`` is written (reads only the done logs).

        With ``size`` and ``dtype`` the layout is checked against them too (a mismatch is an error);
        without, a store of another sample count is simply not complete (its writer then refuses it)."""
        rec = self._record(split)
        if rec is None or (size is None and int(rec["n"]) != n):
            return False
        layout = self.layout(split, n, size or tuple(rec["size"]), dtype or STORE_DTYPES[rec["dtype"]])
        assert layout is not None
        return bool(layout.done().all())

    def reader(self, split: str, n: int, size: tuple[int, int], dtype: torch.dtype) -> MapReader:
        """A :class:`MapReader` of the complete ``split`` (an error when rows are missing)."""
        layout = self.layout(split, n, size, dtype)
        if layout is None:
            raise RuntimeError(f"attributions of {self.method} on {split} were never computed; rerun the audit "
                               "to compute them.")
        layout.check_sizes()
        missing = (~layout.done()).nonzero().flatten()
        if missing.numel():
            raise RuntimeError(f"attributions of {self.method} on {split} miss {missing.numel()} samples "
                               f"(first {missing[:5].tolist()}); rerun the audit to compute them.")
        return MapReader(layout.shards(), n, size, dtype)

    def load(self, split: str, n: int, size: tuple[int, int], required: bool = True,
             dtype: torch.dtype = torch.float32) -> Tensor | None:
        """The maps [n,H,W] of ``split`` in ``dtype`` (the in-memory path; O(dataset) memory).

        When a sample is missing: an error if ``required``, else None (the caller computes them).
        """
        stored = self.store_dtype_of(split)
        if not required and (stored is None or not self.complete(split, n, size, stored)):
            return None
        reader = self.reader(split, n, size, stored or torch.float16)  # never written: reader's error
        out = torch.empty((n, *size), dtype=dtype)
        for start in range(0, n, 4096):
            out[start:start + 4096] = reader[torch.arange(start, min(start + 4096, n))].to(dtype)
        return out

    def channel_mean(self, split: str, n: int, size: tuple[int, int], dtype: torch.dtype) -> Tensor | None:
        """Per-channel mean float32 [C] of ``split``'s images (normalised units) from the store's logs;
        None until the split is complete (or when its logs carry no sums)."""
        layout = self.layout(split, n, size, dtype)
        return None if layout is None else layout.channel_mean()

    def store_dtype_of(self, split: str) -> torch.dtype | None:
        """The dtype ``split`` was stored in (None before its first write)."""
        rec = self._record(split)
        return None if rec is None else STORE_DTYPES[rec["dtype"]]


class MapReader:
    """Rows of a split's shard files: ``reader[index]`` → float32 [B,H,W] for dataset indices,
    ``reader.row(i)`` → float32 [H,W] for one.

    ``paths`` are the W shard files (sample ``i`` is row ``i // W`` of shard ``i % W``; one file
    is W = 1). Every map is one ``pread`` of its bytes straight into the batch's buffer: no memory
    map (whose touched pages would count in the process' RSS), nothing of the file kept, so memory
    stays O(batch) however many maps a sweep reads; a short read is a clear "truncated" error.
    Picklable (it holds the paths; each process opens its own handles), so DDP ranks and DataLoader
    workers can read it.
    """

    def __init__(self, paths: str | Path | list[Path], n: int, size: tuple[int, int], dtype: torch.dtype) -> None:
        self.paths = [Path(paths)] if isinstance(paths, str | Path) else [Path(p) for p in paths]
        self.n, self.size, self.dtype = int(n), (int(size[0]), int(size[1])), dtype
        self.world = len(self.paths)
        self._np = np.dtype(_RAW[dtype][0])
        self.row_bytes = self.size[0] * self.size[1] * self._np.itemsize
        self._fds: tuple[int, list[int | None]] | None = None  # (pid, one handle per file) of this process

    @property
    def path(self) -> Path:
        """The first shard file."""
        return self.paths[0]

    def __len__(self) -> int:
        return self.n

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_fds": None}

    def _decode(self, rows: np.ndarray) -> Tensor:
        out = torch.from_numpy(rows)
        if self.dtype == torch.bfloat16:
            out = out.view(torch.bfloat16)
        return out.float()

    def _truncated(self, r: int, need_row: int) -> ConfigError:
        return ConfigError(f"{self.paths[r]} ends before map {need_row * self.world + r}: it is truncated. "
                           f"Delete {self.paths[r].parent} to recompute this split's maps.")

    def _fd(self, r: int) -> int:
        """This process' read handle of shard ``r`` (a forked or spawned worker opens its own)."""
        if self._fds is None or self._fds[0] != os.getpid():
            self._fds = (os.getpid(), [None] * self.world)
        fds = self._fds[1]
        if fds[r] is None:
            fds[r] = os.open(self.paths[r], os.O_RDONLY)
        return fds[r]  # type: ignore[return-value]

    def __getitem__(self, index: Tensor) -> Tensor:
        index = torch.as_tensor(index).long().cpu().flatten()
        if index.numel() and (int(index.min()) < 0 or int(index.max()) >= self.n):
            raise IndexError(f"samples {index.tolist()[:5]}... are outside the {self.n} maps of {self.path.parent}")
        out = np.empty((index.numel(), self.row_bytes), dtype=np.uint8)
        # one pread per map straight into the batch buffer: no mapping, nothing of the file kept
        for j, (r, k) in enumerate(zip((index % self.world).tolist(), (index // self.world).tolist(), strict=True)):
            if os.preadv(self._fd(r), [out[j]], k * self.row_bytes) != self.row_bytes:
                raise self._truncated(r, k)
        return self._decode(out.view(self._np).reshape(index.numel(), *self.size))

    def row(self, i: int) -> Tensor:
        """One map float32 [H,W] (sample ``i``)."""
        if not 0 <= int(i) < self.n:
            raise IndexError(f"sample {i} is outside the {self.n} maps of {self.path.parent}")
        return self[torch.tensor([int(i)])][0]

    def __del__(self) -> None:
        fds = getattr(self, "_fds", None)
        if fds is not None and fds[0] == os.getpid():
            for fd in fds[1]:
                if fd is not None:
                    with contextlib.suppress(OSError):
                        os.close(fd)


def barrier() -> None:
    """Wait for every rank when a process group is up (DDP launched by subprocesses)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
