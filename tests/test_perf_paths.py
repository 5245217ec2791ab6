"""GPU performance paths and the CPU behaviour they must keep: stem by size, deferred NaN check,
loader workers, precision resolver, sync_batchnorm, channels_last and torch.compile wiring."""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from torch import nn

from xaudit import device_count, gpu_precision
from xaudit.data import ShapesDataModule
from xaudit.data.base import MAX_AUTO_WORKERS, auto_num_workers, usable_cpus
from xaudit.models import Classifier, load_classifier
from xaudit.models.classifier import NAN_CHECK_EVERY_GPU, classifier_from_checkpoint
from xaudit.tasks.common import instantiate
from xaudit.tasks.train import build, train
from xaudit.utils.errors import ConfigError, NonFiniteLossError

from xaudit_testing import compose_config

VALID_PRECISIONS = {"bf16-mixed", "16-mixed"}


# -- CIFAR stem by image size --------------------------------------------------------------------
def _stem(model: Classifier) -> tuple[int, int, bool]:
    conv = model.net.conv1
    return conv.kernel_size[0], conv.stride[0], isinstance(model.net.maxpool, nn.Identity)


@pytest.mark.parametrize(("size", "stem"), [(32, (3, 1, True)), (64, (3, 1, True)), (224, (7, 2, False))])
def test_resnet_config_chooses_the_stem_by_image_size(size: int, stem: tuple, tmp_path: Path) -> None:
    cfg = compose_config(["model=resnet18"], tmp_path)
    assert cfg.model.backbone.cifar_stem == "auto"
    model = instantiate(cfg.model, num_classes=4, in_chans=3, image_size=size)
    assert _stem(model) == stem
    assert model.hparams["backbone"]["cifar_stem"] is stem[2], "the checkpoint records the stem that was built"


@pytest.mark.parametrize(("value", "size", "stem"), [(True, 224, (3, 1, True)), (False, 32, (7, 2, False))])
def test_explicit_cifar_stem_wins_over_the_size(value: bool, size: int, stem: tuple, tmp_path: Path) -> None:
    cfg = compose_config(["model=resnet18", f"model.backbone.cifar_stem={str(value).lower()}"], tmp_path)
    assert _stem(instantiate(cfg.model, num_classes=4, in_chans=3, image_size=size)) == stem


def test_checkpoint_with_a_stored_cifar_stem_still_loads() -> None:
    """A checkpoint written before "auto" existed stores the bool; it rebuilds that exact network."""
    for stored in (True, False):
        old = Classifier(backbone={"name": "resnet18", "cifar_stem": stored}, num_classes=3, image_size=32)
        ckpt = {"state_dict": old.state_dict(), "xaudit": {"hparams": dict(old.hparams)}}
        new = classifier_from_checkpoint(ckpt)
        assert _stem(new)[2] is stored
        assert all(torch.equal(v, new.state_dict()[k]) for k, v in old.state_dict().items())


def test_unknown_cifar_stem_value_is_a_config_error() -> None:
    with pytest.raises(ConfigError, match=r"cifar_stem='sometimes': use true, false or auto"):
        Classifier(backbone={"name": "resnet18", "cifar_stem": "sometimes"}, num_classes=3, image_size=32)


# -- non-finite loss: checked on the device, read every N steps -----------------------------------
class PoisonAtStep(pl.Callback):
    """Sets the head's weights to NaN right before training step ``step``: its loss is NaN."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch, batch_idx: int) -> None:
        if trainer.global_step == self.step:
            with torch.no_grad():
                pl_module.net.fc.weight.fill_(float("nan"))


def test_nan_check_every_n_steps_names_the_step_where_the_loss_broke(make_cfg) -> None:
    cfg = make_cfg("++model.nan_check_every=5", "~callbacks.explanation_monitor")
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, callbacks=[PoisonAtStep(2)])
    msg = str(err.value)
    assert "Training loss became nan at epoch 0, step 2" in msg
    assert "read at epoch 0, step 4 (model.nan_check_every=5" in msg, "read on the 5th step, within N steps"
    assert "No checkpoint was written yet." in msg and "lower model.optimizer.lr" in msg


def test_nan_check_auto_reads_every_step_on_cpu(make_cfg) -> None:
    cfg = make_cfg("~callbacks.explanation_monitor")
    assert cfg.model.nan_check_every == "auto"
    with pytest.raises(NonFiniteLossError) as err:
        train(cfg, callbacks=[PoisonAtStep(3)])
    msg = str(err.value)
    assert "Training loss became nan at epoch 0, step 3; training stopped before this step touched the weights" in msg


def test_nan_is_read_before_the_epoch_checkpoint_even_between_reads(make_cfg, tmp_path: Path) -> None:
    """10 steps per epoch, read every 50: the read before validation stops it, no checkpoint of NaN weights."""
    cfg = make_cfg("++model.nan_check_every=50", "~callbacks.explanation_monitor", "trainer.max_epochs=2")
    with pytest.raises(NonFiniteLossError, match=r"became nan at epoch 0, step 7; it was read at epoch 0, step 10"):
        train(cfg, callbacks=[PoisonAtStep(7)])
    assert not list((tmp_path / "run" / "checkpoints").glob("*.ckpt"))


def test_nan_check_every_resolves_per_device_and_refuses_bad_values() -> None:
    model = Classifier(backbone={"name": "small_cnn", "width": 4}, num_classes=3)
    model.setup("fit")
    assert model._check_every == 1, "on CPU the read is free: every step"
    assert NAN_CHECK_EVERY_GPU == 50
    for bad in (0, -3, "often", True):
        with pytest.raises(ConfigError, match=r"model.nan_check_every"):
            Classifier(backbone={"name": "small_cnn", "width": 4}, num_classes=3, nan_check_every=bad)


# -- loader workers and pinned memory -------------------------------------------------------------
def test_auto_num_workers_from_the_cpu_count() -> None:
    assert auto_num_workers(cpus=1) == 0 and auto_num_workers(cpus=2) == 0, "≤2 CPUs: the main process needs them"
    assert auto_num_workers(cpus=4) == 3 and auto_num_workers(cpus=6) == 5
    assert auto_num_workers(cpus=64) == MAX_AUTO_WORKERS == 8
    assert auto_num_workers(cpus=16, processes=4) == 3, "split between the DDP processes of a node"
    data = ShapesDataModule(n_train=8, n_val=4, n_test=4, num_workers="auto")
    assert data.num_workers == auto_num_workers(usable_cpus())
    assert ShapesDataModule(n_train=8, n_val=4, n_test=4, num_workers=3).num_workers == 3
    with pytest.raises(ConfigError, match=r"data.num_workers='many'"):
        ShapesDataModule(n_train=8, n_val=4, n_test=4, num_workers="many")


def test_data_configs_default_to_auto_workers_and_cpu_loaders_are_not_pinned(make_cfg, tmp_path: Path) -> None:
    for data in ("shapes", "cifar10", "imagefolder"):
        assert compose_config([f"data={data}"], tmp_path).data.num_workers == "auto"
    cfg = make_cfg("trainer=cpu")
    datamodule, _ = build(cfg)
    datamodule.trainer = instantiate(cfg.trainer, logger=False)  # attached the way fit attaches it
    loader = datamodule.train_dataloader()
    assert loader.pin_memory is False and datamodule.pin_memory is False
    assert loader.num_workers == auto_num_workers(usable_cpus())


# -- trainer configs -------------------------------------------------------------------------------
def test_ddp_config_leaves_batchnorm_unsynchronised(tmp_path: Path) -> None:
    cfg = compose_config(["trainer=ddp"], tmp_path)
    assert cfg.trainer.sync_batchnorm is False
    assert compose_config(["trainer=ddp", "trainer.sync_batchnorm=true"], tmp_path).trainer.sync_batchnorm is True


@pytest.mark.parametrize("trainer", ["gpu", "ddp"])
def test_gpu_precision_resolver_gives_a_valid_precision(trainer: str, tmp_path: Path) -> None:
    cfg = compose_config([f"trainer={trainer}"], tmp_path)
    assert cfg.trainer.precision in VALID_PRECISIONS
    assert cfg.trainer.precision == gpu_precision()
    if not torch.cuda.is_available():
        assert gpu_precision() == "16-mixed", "without CUDA: the fp16 autocast choice"
    assert compose_config([f"trainer={trainer}", "trainer.precision=32-true"], tmp_path).trainer.precision == "32-true"


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without a GPU")
def test_gpu_trainer_on_a_cpu_machine_is_a_clear_error(tmp_path: Path) -> None:
    cfg = compose_config(["trainer=gpu"], tmp_path)
    with pytest.raises(ConfigError, match=r"No supported gpu backend found! The trainer asks for a GPU .* Use "
                                           r"trainer=cpu"):
        instantiate(cfg.trainer, logger=False)


def test_device_count_reads_every_lightning_devices_form() -> None:
    assert [device_count(d) for d in (4, "4", "0,2", [0, 1, 3], "auto", -1, "-1")] == [4, 4, 2, 3, 1, 1, 1]
    with pytest.raises(ValueError, match=r"trainer.devices='many'"):
        device_count("many")


# -- channels_last and torch.compile --------------------------------------------------------------
def _conv_weights(model: Classifier) -> list[torch.Tensor]:
    return [m.weight for m in model.net.modules() if isinstance(m, nn.Conv2d)]


def test_channels_last_auto_is_off_on_cpu(make_cfg) -> None:
    cfg = make_cfg("~callbacks.explanation_monitor")
    assert cfg.model.channels_last == "auto" and cfg.model.compile is False
    datamodule, model = build(cfg)
    trainer = instantiate(cfg.trainer, logger=False, limit_train_batches=2, limit_val_batches=1,
                          num_sanity_val_steps=0, enable_checkpointing=False)
    trainer.fit(model, datamodule=datamodule)
    assert model.channels_last is False
    assert all(w.is_contiguous() for w in _conv_weights(model))


def test_channels_last_forced_on_cpu_trains_with_the_monitor(make_cfg) -> None:
    """The NHWC path (what CUDA gets) runs here too: training, the explainers of the monitor, checkpoints."""
    out = train(make_cfg("++model.channels_last=true"))
    assert 0.0 <= out["test/acc"] <= 1.0
    with open(Path(out["run_dir"]) / "csv" / "metrics.csv", newline="") as f:
        rows = [r for r in csv.DictReader(f) if r.get("explain/grad_cam/insertion")]
    assert len(rows) == 1 and 0.0 <= float(rows[0]["explain/grad_cam/insertion"]) <= 1.0, "the monitor explained it"
    plain = Classifier(backbone={"name": "small_cnn", "width": 8}, num_classes=4)
    assert set(load_classifier(out["ckpt_path"]).state_dict()) == set(plain.state_dict())


def test_compile_wraps_only_the_training_forward(make_cfg) -> None:
    """aot_eager runs TorchDynamo and AOTAutograd (the graph capture torch.compile does) without a
    C++ build, so the wiring is tested in seconds; the default inductor backend works the same way."""
    cfg = make_cfg("++model.compile={backend: aot_eager}", "~callbacks.explanation_monitor")
    datamodule, model = build(cfg)
    keys = set(model.state_dict())
    trainer = instantiate(cfg.trainer, logger=False, limit_train_batches=3, limit_val_batches=1,
                          num_sanity_val_steps=0)
    trainer.fit(model, datamodule=datamodule)
    assert type(model._compiled_net).__name__ == "OptimizedModule"
    assert model._compiled_net._orig_mod is model.net, "one set of weights"
    assert set(model.state_dict()) == keys, "no _orig_mod. keys in checkpoints"
    assert trainer.callback_metrics["train/loss"].isfinite()
    reloaded = load_classifier(trainer.checkpoint_callback.best_model_path)
    assert set(reloaded.state_dict()) == keys
    x = torch.randn(2, 3, 32, 32)
    assert torch.allclose(reloaded(x), model.eval()(x), atol=1e-6)


def test_compile_refuses_bad_values() -> None:
    with pytest.raises(ConfigError, match=r"model.compile='yes'"):
        Classifier(backbone={"name": "small_cnn", "width": 4}, num_classes=3, compile="yes")
    with pytest.raises(ConfigError, match=r"model.channels_last='gpu'"):
        Classifier(backbone={"name": "small_cnn", "width": 4}, num_classes=3, channels_last="gpu")
