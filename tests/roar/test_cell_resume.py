"""A ROAR cell checkpoints every epoch; killed after epoch k of n it resumes at epoch k and ends
with the weights of an uninterrupted cell, bit for bit (CPU, augmentation and shuffling on)."""

from __future__ import annotations

from functools import partial
from pathlib import Path
from typing import Any

import pytest
import pytorch_lightning as pl
import torch

from xaudit.models.classifier import Classifier
from xaudit.roar.data import TensorSplit
from xaudit.roar.runner import Recipe, checkpoint_epoch, retrain

EPOCHS, KILL_AFTER = 4, 2


class Killed(RuntimeError):
    pass


class KillAfter(pl.Callback):
    """Raises at the end of epoch ``k`` (after the cell's checkpoint is written), like a SIGKILL."""

    def __init__(self, k: int) -> None:
        self.k = k

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch + 1 == self.k:
            raise Killed(f"killed after epoch {self.k}")


class Record(pl.Callback):
    """Keeps the final weights and the first epoch this fit ran."""

    def __init__(self) -> None:
        self.weights: dict[str, torch.Tensor] = {}
        self.first_epoch: int | None = None

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.first_epoch is None:
            self.first_epoch = trainer.current_epoch

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.weights = {k: v.detach().clone() for k, v in pl_module.state_dict().items()}


def _split(n: int, seed: int) -> TensorSplit:
    g = torch.Generator().manual_seed(seed)
    images = torch.randint(0, 256, (n, 3, 16, 16), generator=g, dtype=torch.uint8)
    labels = torch.randint(0, 3, (n,), generator=g)
    return TensorSplit(images, labels, (0.5, 0.5, 0.5), (0.25, 0.25, 0.25))


def _make_trainer(stage: str, **overrides: Any) -> pl.Trainer:
    kwargs: dict[str, Any] = {"accelerator": "cpu", "devices": 1, "logger": False, "enable_checkpointing": False,
                              "enable_progress_bar": False, "enable_model_summary": False,
                              "num_sanity_val_steps": 0, "limit_val_batches": 0}
    kwargs.update(overrides)
    return pl.Trainer(**kwargs)


def _build() -> Classifier:
    # momentum: the optimizer state must be restored too, not only the weights
    return Classifier(backbone={"name": "small_cnn", "width": 8}, num_classes=3, in_chans=3, image_size=16,
                      optimizer=partial(torch.optim.SGD, lr=0.05, momentum=0.9))


def _cell(checkpoint: Path | None, *callbacks: pl.Callback) -> dict[str, Any]:
    train, test = _split(96, 0), _split(32, 1)
    keep = torch.rand(96, 16, 16, generator=torch.Generator().manual_seed(2)) > 0.5
    recipe = Recipe(epochs=EPOCHS, batch_size=16, eval_batch_size=32, augment=True)
    return retrain(_build, _make_trainer, recipe, train, test, keep, keep[:32], seed=5, checkpoint=checkpoint,
                   callbacks=callbacks)


def test_killed_cell_resumes_at_its_epoch_and_ends_bit_identical(tmp_path: Path) -> None:
    reference = Record()
    expected = _cell(None, reference)

    ckpt = tmp_path / "cells" / "c" / "last.ckpt"
    with pytest.raises(Killed):
        _cell(ckpt, KillAfter(KILL_AFTER))
    assert checkpoint_epoch(ckpt) == KILL_AFTER, "the checkpoint holds the finished epochs"

    resumed = Record()
    got = _cell(ckpt, resumed)
    assert resumed.first_epoch == KILL_AFTER, f"resumed at epoch {resumed.first_epoch}, not {KILL_AFTER}"
    assert got == expected, "test accuracy and loss of the resumed cell differ"
    assert reference.weights.keys() == resumed.weights.keys()
    for name, w in reference.weights.items():
        assert torch.equal(w, resumed.weights[name]), f"{name} differs after resuming"
    assert checkpoint_epoch(ckpt) == EPOCHS


def test_checkpoint_loads_weights_only(tmp_path: Path) -> None:
    ckpt = tmp_path / "last.ckpt"
    with pytest.raises(Killed):
        _cell(ckpt, KillAfter(1))
    state = torch.load(ckpt, map_location="cpu", weights_only=True)
    rng = state["callbacks"]["EpochCheckpoint"]["torch"]
    assert rng.dtype == torch.uint8 and rng.numel() > 0, "the RNG state travels with the checkpoint"
