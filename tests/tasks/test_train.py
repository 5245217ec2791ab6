"""`python train.py` end to end: configs, experiments, W&B offline files, DDP, determinism, errors."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch
from hydra.errors import ConfigCompositionException, MissingConfigException
from omegaconf import OmegaConf

from xaudit.models import load_classifier
from xaudit.reporting.wandb_offline import find_offline_runs, read_run
from xaudit.tasks.common import instantiate
from xaudit.tasks.train import build, train
from xaudit.utils.errors import ConfigError, DataNotFoundError

from xaudit_testing import CONF, ROOT, compose_config, write_cifar10

AUDIT_EXPERIMENTS = ("sanity", "shortcut")  # run by audit.py (tests/tasks/test_experiments.py)
EXPERIMENTS = sorted(p.stem for p in (CONF / "experiment").glob("*.yaml") if p.stem not in AUDIT_EXPERIMENTS)


def test_default_config_composes_to_the_documented_defaults(tmp_path: Path) -> None:
    cfg = compose_config([], tmp_path)
    assert cfg.data._target_ == "xaudit.data.ShapesDataModule"
    assert cfg.model.backbone.name == "small_cnn"
    assert "wandb" in cfg.logger and cfg.logger.wandb.mode == os.environ.get("WANDB_MODE", "offline")
    assert cfg.trainer.max_epochs == 4 and cfg.seed == 0
    assert OmegaConf.select(cfg, "callbacks.model_checkpoint.save_last") is True


@pytest.mark.parametrize("experiment", EXPERIMENTS)
def test_every_experiment_runs_one_fast_step(experiment: str, make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg(f"experiment={experiment}", "debug=fdr", "logger=csv", fast=False)
    if cfg.data._target_.endswith("CIFAR10DataModule"):
        write_cifar10(Path(cfg.paths.data_dir))
        cfg.data.num_workers = 0
        cfg.data.val_size = 20
    elif cfg.data._target_.endswith("ShapesDataModule"):
        cfg.data.n_train, cfg.data.n_val, cfg.data.n_test = 64, 32, 32
    cfg.callbacks.explanation_monitor.num_samples = 8
    out = train(cfg)
    assert "train/loss" in out and out["run_dir"] == str((tmp_path / "run").resolve())


@pytest.mark.parametrize("experiment", AUDIT_EXPERIMENTS)
def test_train_refuses_an_audit_experiment(experiment: str, make_cfg) -> None:
    cfg = make_cfg(f"experiment={experiment}")
    with pytest.raises(ConfigError, match=r"audit experiment.*python audit\.py audit=<name>"):
        train(cfg)


def test_wandb_offline_run_has_history_and_summary(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("logger=wandb", "trainer.max_epochs=2")
    out = train(cfg)
    runs = find_offline_runs(out["run_dir"])
    assert len(runs) == 1, "exactly one offline W&B run in the run directory"
    run = read_run(runs[0])
    val_acc = [row["val/acc"] for row in run["history"] if "val/acc" in row]
    assert len(val_acc) == 2  # one per epoch
    assert run["summary"]["test/acc"] == pytest.approx(out["test/acc"], abs=1e-6)
    assert run["summary"]["test/count"] == 256
    assert (runs[0] / "files" / "output.log").is_file()


def test_same_seed_twice_gives_identical_model_and_metrics(make_cfg, tmp_path: Path) -> None:
    a = train(make_cfg("trainer.max_epochs=2", out=tmp_path / "a"))
    b = train(make_cfg("trainer.max_epochs=2", out=tmp_path / "b"))
    keys = ["train/loss", "val/acc", "val/loss", "test/acc", "test/loss"]
    assert {k: a[k] for k in keys} == {k: b[k] for k in keys}
    wa, wb = load_classifier(a["last_ckpt_path"]).state_dict(), load_classifier(b["last_ckpt_path"]).state_dict()
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    c = train(make_cfg("trainer.max_epochs=2", "seed=1", out=tmp_path / "c"))
    assert c["train/loss"] != a["train/loss"]


@pytest.mark.ddp
def test_ddp_sim_trains_and_evaluates_exactly_like_one_device(make_cfg, tmp_path: Path) -> None:
    # 2 CPU processes (gloo); an odd test-set size would expose padded duplicates
    ddp = train(make_cfg("trainer=ddp_sim", "data.n_test=257", out=tmp_path / "ddp"))
    assert Path(ddp["ckpt_path"]).is_file()
    assert ddp["test/count"] == 257
    ckpt = ddp["ckpt_path"]
    results = {}
    for devices in ("trainer=cpu", "trainer=ddp_sim"):
        cfg = make_cfg(devices, "data.n_test=257", "test=true", out=tmp_path / devices.split("=")[1])
        datamodule, model = build(cfg)
        trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[])
        results[devices] = trainer.test(model, datamodule=datamodule, ckpt_path=ckpt, verbose=False)[0]
    one, two = results["trainer=cpu"], results["trainer=ddp_sim"]
    assert one["test/count"] == two["test/count"] == 257
    assert one["test/acc"] == two["test/acc"]
    assert one["test/loss"] == pytest.approx(two["test/loss"], rel=1e-6)  # float sum order differs


def test_entry_point_runs_from_another_directory_and_prints_paths(tmp_path: Path) -> None:
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONUNBUFFERED": "1"}
    printed = subprocess.run([sys.executable, str(ROOT / "train.py"), "--cfg", "job"], cwd=tmp_path,
                             capture_output=True, text=True, env=env, timeout=120)
    assert printed.returncode == 0, printed.stderr
    assert "_target_: xaudit.data.ShapesDataModule" in printed.stdout
    run = subprocess.run(
        [sys.executable, str(ROOT / "train.py"), "data.n_train=128", "data.n_val=32", "data.n_test=32",
         "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "model.backbone.width=8"],
        cwd=tmp_path, capture_output=True, text=True, env=env, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    text = run.stdout + run.stderr
    assert "Checkpoint: " in text and "Run directory: " in text
    run_dirs = list((tmp_path / "logs" / "train" / "runs").iterdir())
    assert len(run_dirs) == 1
    assert (run_dirs[0] / "checkpoints" / "last.ckpt").is_file()
    assert find_offline_runs(run_dirs[0]), "a W&B offline run, no account or key needed"


@pytest.mark.parametrize(
    ("overrides", "error", "needle"),
    [
        (["model=resnet19"], MissingConfigException, "Available options in 'model'"),
        (["data=mnist"], MissingConfigException, "Available options in 'data'"),
        (["trainer.max_epoch=3"], ConfigCompositionException, "trainer.max_epoch"),
    ],
)
def test_unknown_group_option_or_key_lists_choices(tmp_path: Path, overrides, error, needle) -> None:
    with pytest.raises(error) as err:
        compose_config(overrides, tmp_path)
    assert needle in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "error", "needle"),
    [
        (["model.backbone.name=resnet19"], ConfigError, "Choices: deit_small, densenet121, mobilenet_v3_small"),
        (["data.spurious_p=1.5"], ConfigError, "data.spurious_p=1.5 must lie in [0, 1]"),
        (["model=resnet18", "model.backbone.cifar_stem=false", "data.image_size=16"], ConfigError,
         "data.image_size=16 is too small for resnet18"),
    ],
)
def test_bad_values_fail_before_training_with_the_fix(make_cfg, overrides, error, needle) -> None:
    with pytest.raises(error) as err:
        build(make_cfg(*overrides))
    assert needle in str(err.value)


def test_missing_dataset_path_names_the_key(make_cfg, tmp_path: Path) -> None:
    cfg = make_cfg("data=cifar10", f"data.data_dir={tmp_path}/absent", "data.num_workers=0", fast=False)
    with pytest.raises(DataNotFoundError, match=r"data\.data_dir="):
        train(cfg)
