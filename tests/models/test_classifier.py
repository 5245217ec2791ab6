"""Classifier checkpoints: weights-only loading, safe refusal of pickled objects, NaN guard."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from xaudit.models import load_checkpoint, load_classifier
from xaudit.tasks.train import train
from xaudit.utils.errors import NonFiniteLossError


def test_checkpoint_loads_weights_only_and_rebuilds_the_model(make_cfg) -> None:
    out = train(make_cfg())
    raw = torch.load(out["ckpt_path"], map_location="cpu", weights_only=True)  # must not raise
    assert raw["xaudit"]["hparams"]["backbone"]["name"] == "small_cnn"
    assert raw["xaudit"]["data"]["class_names"] == ["circle", "square", "triangle", "cross"]
    model = load_classifier(out["ckpt_path"])
    assert not model.training
    x = torch.randn(3, 3, 32, 32)
    ref = load_classifier(out["ckpt_path"])
    assert torch.equal(model(x), ref(x))
    assert torch.equal(model.net.fc.weight, raw["state_dict"]["net.fc.weight"])


class _Evil:
    def __reduce__(self):  # what an unsafe checkpoint can smuggle in
        return (print, ("pwned",))


def test_unsafe_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "evil.ckpt"
    torch.save({"state_dict": {}, "payload": _Evil()}, path, pickle_protocol=pickle.HIGHEST_PROTOCOL)
    with pytest.raises(ValueError, match=r"weights_only=True"):
        load_checkpoint(path)


def test_missing_and_truncated_checkpoints_are_named(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match="does not exist"):
        load_checkpoint(tmp_path / "nope.ckpt")
    good = tmp_path / "good.ckpt"
    torch.save({"state_dict": {"w": torch.ones(1000)}}, good)
    bad = tmp_path / "bad.ckpt"
    bad.write_bytes(good.read_bytes()[:300])
    with pytest.raises(ValueError, match="unreadable"):
        load_checkpoint(bad)


class ExplodeLearningRate(pl.Callback):
    """From the second epoch on, a learning rate so large the loss overflows to inf/NaN."""

    def on_train_epoch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if trainer.current_epoch == 1:
            for group in trainer.optimizers[0].param_groups:
                group["lr"] = 1e30


def test_non_finite_loss_stops_and_keeps_last_good_checkpoint(make_cfg) -> None:
    cfg = make_cfg("trainer.max_epochs=3", "model.scheduler=null")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, callbacks=[ExplodeLearningRate()])
    msg = str(err.value)
    assert "at epoch 1" in msg and "lower model.optimizer.lr" in msg
    last = Path(cfg.paths.output_dir) / "checkpoints" / "last.ckpt"
    assert f"Last good checkpoint (kept): {last}" in msg
    state = torch.load(last, map_location="cpu", weights_only=True)
    assert state["epoch"] == 0
    assert all(torch.isfinite(v).all() for v in state["state_dict"].values() if v.is_floating_point())
