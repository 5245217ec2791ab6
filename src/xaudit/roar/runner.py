"""The ROAR / KAR sweep: attributions once per method, then one retrained model per cell.

A cell is (method, fraction, seed); fraction 0 is the unmasked baseline (one per seed). For each
cell a fresh model is built with the checkpoint's recipe, trained on the masked train split and
tested on the masked test split (Hooker et al., 2019: the same pixels are removed in both). Every
finished cell is appended to the results log at once, so a killed sweep resumes where it stopped;
a cell's value depends only on its own seed, never on which cells ran before it.

The sweep is agnostic of Hydra: the caller gives a ``build_model`` factory and a ``make_trainer``
factory (devices, precision, strategy), so the same loop runs on a CPU, a GPU or DDP ranks.

Many jobs may share one audit directory (a Slurm array over seeds, a rerun started beside a
running one). Every piece of work (a method's attribution shards, a cell) is claimed first
(:mod:`xaudit.utils.claims`: an exclusive create with a heartbeat, safe on NFS/Lustre), so two jobs
never run the same cell; a job that finds the rest claimed by live jobs waits for them, and takes
over a claim whose owner died. Under DDP, rank 0 alone reads the directory and claims; it
broadcasts what to run and every rank takes the same branch. A cell checkpoints after every epoch
(``<mode>/cells/<cell>/last.ckpt``, RNG state included), so a killed or requeued cell resumes at
the epoch it reached and ends with the weights an uninterrupted run would have.
"""

from __future__ import annotations

import logging
import os
import re
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from xaudit.data.tensor_split import KeepFn, SplitDataModule, TensorSplit
from xaudit.ops.masking import MODES, keep_mask
from xaudit.reporting.constants import BASELINE
from xaudit.reporting.protocol import PROTOCOL_VERSION
from xaudit.roar.data import MapKeep
from xaudit.roar.store import AttributionStore, method_key
from xaudit.utils.claims import HOST, ClaimBoard
from xaudit.utils.distributed import broadcast, gpu_peak, is_global_zero, reset_gpu_peak
from xaudit.utils.errors import ConfigError
from xaudit.utils.io import short_hash
from xaudit.utils.progress import SweepProgress
from xaudit.utils.results import ResultsLog

log = logging.getLogger("xaudit")
_WAIT = "__wait__"
#: what removed pixels become: the training split's per-channel mean (Hooker et al.), or the
#: normalisation's mean (0 in normalised units; the same where the data is normalised by its own mean)
FILLS: tuple[str, ...] = ("train_mean", "normalisation")


def check_fill(fill: str) -> str:
    """``roar.fill`` (resolved: ``train_mean`` or ``normalisation``)."""
    if fill not in FILLS:
        raise ConfigError(f"roar.fill={fill!r} is unknown; choose one of {['auto', *FILLS]}.")
    return fill


@dataclass(frozen=True)
class Recipe:
    """How every cell's model is trained: epochs, batch size, augmentation, memory format."""

    epochs: int
    batch_size: int
    eval_batch_size: int
    augment: bool = False
    channels_last: bool = False

    def __post_init__(self) -> None:
        for key in ("epochs", "batch_size", "eval_batch_size"):
            if int(getattr(self, key)) < 1:
                raise ConfigError(f"roar.{key}={getattr(self, key)} must be ≥1.")


@dataclass(frozen=True)
class Cell:
    """One retraining run of the sweep."""

    mode: str
    method: str
    kwargs: tuple[tuple[str, Any], ...]
    fraction: float
    seed: int

    @property
    def method_key(self) -> str:
        return BASELINE if self.method == BASELINE else method_key(self.method, dict(self.kwargs))

    @property
    def key(self) -> str:
        """``mode|method|fraction|seed``: the cell's identity in ``results.jsonl``."""
        return f"{self.mode}|{self.method_key}|{self.fraction:g}|{self.seed}"

    @property
    def slug(self) -> str:
        """A file-name-safe, unique name of the cell (claims, checkpoints)."""
        return re.sub(r"[^A-Za-z0-9._-]+", "_", self.key) + f"-{short_hash(self.key)}"

    @property
    def label(self) -> str:
        if self.method == BASELINE:
            return f"{self.mode} baseline (nothing removed), seed {self.seed}"
        return f"{self.mode} {self.method_key} {self.fraction:.0%}, seed {self.seed}"


def sweep_cells(mode: str, methods: dict[str, dict[str, Any]], fractions: Sequence[float],
                seeds: Sequence[int]) -> list[Cell]:
    """Baselines first, then method → fraction → seed (consecutive cells share one keep mask)."""
    if mode not in MODES:
        raise ConfigError(f"audit.mode={mode!r} is not a retraining mode; choose one of {list(MODES)}.")
    cells = [Cell(mode, BASELINE, (), 0.0, int(s)) for s in seeds]
    for name, kwargs in methods.items():
        items = tuple(sorted(kwargs.items()))
        cells += [Cell(mode, name, items, float(f), int(s)) for f in fractions for s in seeds]
    return cells


class EpochCheckpoint(pl.Callback):
    """Saves ``path`` (atomically) after every training epoch, with the torch RNG state.

    A fit resumed from it (``trainer.fit(..., ckpt_path=path)``) restarts at the next epoch with
    the weights, optimizer, scheduler and random stream of the interrupted run.
    """

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        tmp = self.path.with_name(f".{self.path.name}.{os.getpid()}.tmp")
        if trainer.is_global_zero:
            self.path.parent.mkdir(parents=True, exist_ok=True)
        trainer.save_checkpoint(tmp)  # every rank calls it; rank 0 writes, then all wait
        if trainer.is_global_zero:
            os.replace(tmp, self.path)

    def state_dict(self) -> dict[str, Any]:
        state: dict[str, Any] = {"torch": torch.get_rng_state()}
        if torch.cuda.is_available() and torch.cuda.is_initialized():
            state["cuda"] = torch.cuda.get_rng_state_all()
        return state

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        torch.set_rng_state(state_dict["torch"])
        if "cuda" in state_dict and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(state_dict["cuda"])


def checkpoint_epoch(path: str | Path) -> int:
    """The number of epochs a cell checkpoint has finished."""
    ckpt = torch.load(path, map_location="cpu", weights_only=True)
    return int(ckpt.get("epoch", -1)) + 1


def retrain(build_model: Callable[[], pl.LightningModule], make_trainer: Callable[..., pl.Trainer],
            recipe: Recipe, train: TensorSplit, test: TensorSplit, keep_train: Tensor | KeepFn | None,
            keep_test: Tensor | KeepFn | None, seed: int, checkpoint: str | Path | None = None,
            callbacks: Sequence[pl.Callback] = (), num_workers: int = 0,
            fill: Tensor | None = None) -> dict[str, Any]:
    """Train a fresh model on the (masked) train split, test it on the (masked) test split.

    With ``checkpoint``, the fit saves it after every epoch and resumes from it when it exists.
    ``fill``: per-channel value [C] (normalised units) of the removed pixels; None: 0, the
    normalisation's mean.
    """
    pl.seed_everything(int(seed), workers=True, verbose=False)
    model = build_model()
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = SplitDataModule(train=train, test=test, batch_size=recipe.batch_size,
                           eval_batch_size=recipe.eval_batch_size, keep_train=keep_train, keep_test=keep_test,
                           augment=recipe.augment, seed=int(seed), channels_last=recipe.channels_last,
                           num_workers=num_workers, fill=fill)
    extra = ([EpochCheckpoint(checkpoint)] if checkpoint is not None else []) + list(callbacks)
    trainer = make_trainer("fit", max_epochs=recipe.epochs, callbacks=extra)
    resume = str(checkpoint) if checkpoint is not None and Path(checkpoint).is_file() else None
    trainer.fit(model, datamodule=data, ckpt_path=resume, weights_only=True)
    results = trainer.test(model, datamodule=data, verbose=False)
    out: dict[str, Any] = {k.replace("test/", "test_"): float(v) for k, v in (results[0] if results else {}).items()}
    if "test_count" in out:
        out["test_count"] = int(out["test_count"])
    out["world_size"] = int(trainer.world_size)
    return out


class RoarSweep:
    """Runs the missing cells of one ROAR or KAR sweep and appends each to ``log``.

    ``methods`` maps explainer names (controls included) to their options; ``net`` is the audited
    classifier (explained once per method, shards under ``store_root``). Rank 0 (``is_writer``)
    reads the directory, claims work and writes results; every rank runs the same loop. Claims
    live under ``<log dir>/claims`` and ``<store_root>/.claims``; ``claim_stale_s`` /
    ``claim_heartbeat_s`` / ``poll_s`` set how a dead job's claim is found and how often a waiting
    job looks again; ``recipe_record`` is stored with every cell.
    """

    def __init__(self, *, mode: str, methods: dict[str, dict[str, Any]], fractions: Sequence[float],
                 seeds: Sequence[int], recipe: Recipe, train: TensorSplit, test: TensorSplit, net: nn.Module,
                 build_model: Callable[[], pl.LightningModule], make_trainer: Callable[..., pl.Trainer],
                 log: ResultsLog, store_root: str, store_fingerprint: dict[str, Any], attr_batch_size: int,
                 target: str = "label", store_dtype: torch.dtype = torch.float16, tie_seed: int = 0,
                 is_writer: bool | None = None, claim_stale_s: float = 300.0, claim_heartbeat_s: float = 15.0,
                 poll_s: float = 5.0, recipe_record: dict[str, Any] | None = None, num_workers: int = 0,
                 fill: str = "train_mean") -> None:
        self.mode, self.methods = mode, {k: dict(v) for k, v in methods.items()}
        self.cells = sweep_cells(mode, self.methods, fractions, seeds)
        self.recipe, self.train, self.test, self.net = recipe, train, test, net
        self.build_model, self.make_trainer, self.log = build_model, make_trainer, log
        self.stores = {name: AttributionStore(store_root, name, kw, store_fingerprint)
                       for name, kw in self.methods.items()}
        self.attr_batch_size, self.target, self.store_dtype = int(attr_batch_size), target, store_dtype
        self.tie_seed = int(tie_seed)
        self.is_writer = is_global_zero() if is_writer is None else bool(is_writer)
        self.cell_claims = ClaimBoard(log.dir / "claims", claim_stale_s, claim_heartbeat_s)
        self.attr_claims = ClaimBoard(Path(store_root) / ".claims", claim_stale_s, claim_heartbeat_s)
        self.poll_s = float(poll_s)
        self.recipe_record = dict(recipe_record or {})
        self.num_workers = int(num_workers)  # loader workers of a streamed split
        self.fill = check_fill(fill)
        self._masks: dict[tuple[str, float], tuple[Tensor | KeepFn, Tensor | KeepFn]] = {}

    def pending(self, done: dict[str, Any]) -> list[Cell]:
        """Cells not yet in the log."""
        return [c for c in self.cells if c.key not in done]

    def checkpoint_path(self, cell: Cell) -> Path:
        """Where a cell's per-epoch checkpoint lives while it trains."""
        return self.log.dir / "cells" / cell.slug / "last.ckpt"

    def run(self) -> dict[str, dict[str, Any]]:
        """Compute what is missing; return every cell of this sweep found in the log afterwards."""
        todo = broadcast(self.pending(self.log.read()) if self.is_writer else None)
        needed = [m for m in self.methods if any(c.method == m for c in todo)]
        self.compute_attributions(set(needed))
        progress = SweepProgress(len(self.cells), len(self.cells) - len(todo), f"{self.mode} sweep",
                                 enabled=self.is_writer,
                                 split=f"masked train ({len(self.train)}) / test ({len(self.test)}) images")
        cells = {c.slug: c for c in self.cells}

        def finished() -> set[str]:
            done = self.log.read()
            return {slug for slug, c in cells.items() if c.key in done}

        def run_cell(slug: str, resume_from: int) -> None:
            cell = cells[slug]
            if resume_from and self.is_writer:
                log.info("%s: resuming at epoch %d of %d (%s)", cell.label, resume_from, self.recipe.epochs,
                         self.checkpoint_path(cell))
            progress.start(cell.label)
            start = time.perf_counter()
            reset_gpu_peak()
            keep_train, keep_test = self.keep_masks(cell)
            fill = self.fill_value(cell)
            result = retrain(self.build_model, self.make_trainer, self.recipe, self.train, self.test,
                             keep_train, keep_test, cell.seed, checkpoint=self.checkpoint_path(cell),
                             num_workers=self.num_workers, fill=fill)
            if fill is not None:
                result["fill"] = [round(float(v), 6) for v in fill]
            seconds = time.perf_counter() - start
            record = {"cell": cell.key, "mode": cell.mode, "method": cell.method, "method_key": cell.method_key,
                      "fraction": cell.fraction, "seed": cell.seed, "epochs": self.recipe.epochs,
                      "seconds": round(seconds, 3), "resumed_at_epoch": resume_from, "worker": f"{HOST}:{os.getpid()}",
                      "recipe": self.recipe_record, "tie_seed": self.tie_seed, "protocol_version": PROTOCOL_VERSION,
                      **result, **gpu_peak()}
            if self.is_writer:
                self.log.append(record)
                shutil.rmtree(self.checkpoint_path(cell).parent, ignore_errors=True)
            progress.advance(cell.label, f"test acc {result.get('test_acc', float('nan')):.4f}", seconds)

        self._claimed([c.slug for c in todo], self.cell_claims, finished, run_cell, self._resume_epoch)
        keys = {c.key for c in self.cells}
        return broadcast({k: v for k, v in self.log.read().items() if k in keys} if self.is_writer else None)

    def _resume_epoch(self, slug: str) -> int:
        path = self.log.dir / "cells" / slug / "last.ckpt"
        return checkpoint_epoch(path) if path.is_file() else 0

    def _claimed(self, names: Sequence[str], board: ClaimBoard, finished: Callable[[], set[str]],
                 work: Callable[[str, int], None], info: Callable[[str], int] = lambda _: 0) -> None:
        """Run every name not in ``finished()``, each under a claim; wait while live jobs hold the rest.

        Rank 0 picks and claims; the pick (and ``info`` about it) is broadcast, all ranks work.
        """
        while True:
            pick, claim, extra = None, None, 0
            if self.is_writer:
                done, waiting = finished(), False
                for name in names:
                    if name in done:
                        continue
                    claim = board.try_claim(name)
                    if claim is None:
                        waiting = True
                        continue
                    if name in finished():  # finished by another job just before we claimed it
                        claim.release()
                        claim = None
                        continue
                    pick, extra = name, info(name)
                    break
                if pick is None and waiting:
                    pick = _WAIT
            pick, extra = broadcast((pick, extra))
            if pick is None:
                return
            if pick == _WAIT:
                if self.is_writer:
                    log.info("%s sweep: the remaining work is held by other jobs; waiting for them", self.mode)
                    time.sleep(self.poll_s)
                continue
            try:
                work(pick, extra)
            finally:
                if claim is not None:
                    claim.release()

    def compute_attributions(self, methods: set[str]) -> None:
        """Write the missing attribution shards of the train and test split for ``methods``."""
        names = [n for n in self.methods if n in methods]
        splits = (("train", self.train), ("test", self.test))

        def missing(name: str) -> list[str]:
            return [s for s, split in splits if not self.stores[name].complete(s, len(split))]

        def finished() -> set[str]:
            return {n for n in names if not missing(n)}

        def work(name: str, _: int) -> None:
            todo = broadcast(missing(name) if self.is_writer else None)
            for split_name, split in splits:
                if split_name in todo:
                    self.stores[name].compute(split_name, split, self.net, self.make_trainer("predict"),
                                              self.attr_batch_size, self.target, self.store_dtype,
                                              num_workers=self.num_workers)

        self._claimed(names, self.attr_claims, finished, work)

    def fill_value(self, cell: Cell) -> Tensor | None:
        """The value [C] (normalised units) the cell's removed pixels take: the training split's
        per-channel mean, summed while its attributions were written (no extra pass over the data);
        None for the baseline and for ``fill=normalisation`` (0, the normalisation's mean)."""
        if cell.method == BASELINE or self.fill == "normalisation":
            return None
        mean = self.stores[cell.method].channel_mean("train", len(self.train), self.train.image_shape[1:],
                                                     self.store_dtype)
        if mean is None:
            raise ConfigError(
                f"The attribution store of {cell.method} ({self.stores[cell.method].split_dir('train')}) holds no "
                "channel sums for the ROAR fill (it was written by an older xaudit). Delete it to recompute it, "
                "or pass roar.fill=normalisation to fill with the normalisation's mean.")
        return mean

    def keep_masks(self, cell: Cell) -> tuple[Tensor | KeepFn | None, Tensor | KeepFn | None]:
        """(train, test) keep masks of a cell; the last method/fraction pair is cached."""
        if cell.method == BASELINE:
            return None, None
        key = (cell.method, cell.fraction)
        if key not in self._masks:
            self._masks.clear()
            store = self.stores[cell.method]
            size = self.train.image_shape[1:]
            masks: list[Tensor | KeepFn] = []
            for split_name, split in (("train", self.train), ("test", self.test)):
                # test ranks offset by the train size: the tie-break never repeats across splits
                offset = 0 if split_name == "train" else len(self.train)
                if split.streamed:  # each batch's maps read from the shard files, its mask built when served
                    reader = store.reader(split_name, len(split), size, self.store_dtype)
                    masks.append(MapKeep(reader, cell.fraction, self.mode, self.tie_seed, offset))
                else:
                    attr = store.load(split_name, len(split), size)
                    assert attr is not None
                    masks.append(keep_mask(attr, cell.fraction, self.mode, self.tie_seed, offset))
            self._masks[key] = (masks[0], masks[1])
        return self._masks[key]
