"""The ROAR / KAR sweep: attributions once per method, then one retrained model per cell.

A cell is (method, fraction, seed); fraction 0 is the unmasked baseline (one per seed). For each
cell a fresh model is built with the checkpoint's recipe, trained on the masked train split and
tested on the masked test split (Hooker et al., 2019: the same pixels are removed in both). Every
finished cell is appended to the results log at once, so a killed sweep resumes where it stopped;
a cell's value depends only on its own seed, never on which cells ran before it.

The sweep is agnostic of Hydra: the caller gives a ``build_model`` factory and a ``make_trainer``
factory (devices, precision, strategy), so the same loop runs on a CPU, a GPU or DDP ranks.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pytorch_lightning as pl
import torch
from torch import Tensor, nn

from xaudit.roar.data import SplitDataModule, TensorSplit
from xaudit.roar.masking import MODES, keep_mask
from xaudit.roar.results import ResultsLog
from xaudit.roar.store import AttributionStore, method_key
from xaudit.utils.errors import ConfigError
from xaudit.utils.progress import SweepProgress

BASELINE = "baseline"


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


def retrain(build_model: Callable[[], pl.LightningModule], make_trainer: Callable[..., pl.Trainer],
            recipe: Recipe, train: TensorSplit, test: TensorSplit, keep_train: Tensor | None,
            keep_test: Tensor | None, seed: int) -> dict[str, Any]:
    """Train a fresh model on the (masked) train split, test it on the (masked) test split."""
    pl.seed_everything(int(seed), workers=True, verbose=False)
    model = build_model()
    if recipe.channels_last:
        model = model.to(memory_format=torch.channels_last)
    data = SplitDataModule(train=train, test=test, batch_size=recipe.batch_size,
                           eval_batch_size=recipe.eval_batch_size, keep_train=keep_train, keep_test=keep_test,
                           augment=recipe.augment, seed=int(seed), channels_last=recipe.channels_last)
    trainer = make_trainer("fit", max_epochs=recipe.epochs)
    trainer.fit(model, datamodule=data)
    results = trainer.test(model, datamodule=data, verbose=False)
    out: dict[str, Any] = {k.replace("test/", "test_"): float(v) for k, v in (results[0] if results else {}).items()}
    if "test_count" in out:
        out["test_count"] = int(out["test_count"])
    out["world_size"] = int(trainer.world_size)
    return out


class RoarSweep:
    """Runs the missing cells of one ROAR or KAR sweep and appends each to ``log``.

    ``methods`` maps explainer names (controls included) to their options; ``net`` is the audited
    classifier (explained once per method, shards under ``store_root``); ``is_writer`` says whether
    this process writes results (rank 0; every rank runs the same loop under DDP).
    """

    def __init__(self, *, mode: str, methods: dict[str, dict[str, Any]], fractions: Sequence[float],
                 seeds: Sequence[int], recipe: Recipe, train: TensorSplit, test: TensorSplit, net: nn.Module,
                 build_model: Callable[[], pl.LightningModule], make_trainer: Callable[..., pl.Trainer],
                 log: ResultsLog, store_root: str, store_fingerprint: dict[str, Any], attr_batch_size: int,
                 target: str = "label", store_dtype: torch.dtype = torch.float16, tie_seed: int = 0,
                 is_writer: bool = True) -> None:
        self.mode, self.methods = mode, {k: dict(v) for k, v in methods.items()}
        self.cells = sweep_cells(mode, self.methods, fractions, seeds)
        self.recipe, self.train, self.test, self.net = recipe, train, test, net
        self.build_model, self.make_trainer, self.log = build_model, make_trainer, log
        self.stores = {name: AttributionStore(store_root, name, kw, store_fingerprint)
                       for name, kw in self.methods.items()}
        self.attr_batch_size, self.target, self.store_dtype = int(attr_batch_size), target, store_dtype
        self.tie_seed, self.is_writer = int(tie_seed), is_writer
        self._masks: dict[tuple[str, float], tuple[Tensor, Tensor]] = {}

    def pending(self, done: dict[str, Any]) -> list[Cell]:
        """Cells not yet in the log."""
        return [c for c in self.cells if c.key not in done]

    def run(self) -> dict[str, dict[str, Any]]:
        """Compute what is missing; return every cell of this sweep found in the log afterwards."""
        done = self.log.read()  # read once: under DDP every rank must see the same list
        todo = self.pending(done)
        self.compute_attributions({c.method for c in todo if c.method != BASELINE})
        progress = SweepProgress(len(self.cells), len(self.cells) - len(todo), f"{self.mode} sweep",
                                 enabled=self.is_writer)
        for cell in todo:
            start = time.perf_counter()
            keep_train, keep_test = self.keep_masks(cell)
            result = retrain(self.build_model, self.make_trainer, self.recipe, self.train, self.test,
                             keep_train, keep_test, cell.seed)
            seconds = time.perf_counter() - start
            record = {"cell": cell.key, "mode": cell.mode, "method": cell.method, "method_key": cell.method_key,
                      "fraction": cell.fraction, "seed": cell.seed, "epochs": self.recipe.epochs,
                      "seconds": round(seconds, 3), **result}
            if self.is_writer:
                self.log.append(record)
            progress.advance(cell.label, f"test acc {result.get('test_acc', float('nan')):.4f}", seconds)
        keys = {c.key for c in self.cells}
        return {k: v for k, v in self.log.read().items() if k in keys}

    def compute_attributions(self, methods: set[str]) -> None:
        """Write the missing attribution shards of the train and test split for ``methods``."""
        for name in self.methods:
            if name not in methods:
                continue
            store = self.stores[name]
            for split_name, split in (("train", self.train), ("test", self.test)):
                if store.load(split_name, len(split), split.image_shape[1:], required=False) is None:
                    store.compute(split_name, split, self.net, self.make_trainer("predict"), self.attr_batch_size,
                                  self.target, self.store_dtype)

    def keep_masks(self, cell: Cell) -> tuple[Tensor | None, Tensor | None]:
        """(train, test) keep masks of a cell; the last method/fraction pair is cached."""
        if cell.method == BASELINE:
            return None, None
        key = (cell.method, cell.fraction)
        if key not in self._masks:
            self._masks.clear()
            store = self.stores[cell.method]
            size = self.train.image_shape[1:]
            masks = []
            for split_name, split in (("train", self.train), ("test", self.test)):
                attr = store.load(split_name, len(split), size)
                assert attr is not None
                # test ranks offset by the train size: the tie-break never repeats across splits
                offset = 0 if split_name == "train" else len(self.train)
                masks.append(keep_mask(attr, cell.fraction, self.mode, self.tie_seed, offset))
            self._masks[key] = (masks[0], masks[1])
        return self._masks[key]
