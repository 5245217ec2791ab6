"""ExplanationMonitor end to end: W&B and CSV outputs, no effect on training, DDP, bad configs."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import pytorch_lightning as pl
import torch

from xaudit.callbacks import ExplanationMonitor
from xaudit.models import load_classifier
from xaudit.reporting.wandb_offline import find_offline_runs, read_run
from xaudit.tasks.common import instantiate, instantiate_group
from xaudit.tasks.train import build, train
from xaudit.utils.errors import ConfigError

METHODS = ("cam", "grad_cam", "saliency")
SCALARS = ("deletion", "insertion", "mass_in_mask", "pointing_game")
MONITOR = ["callbacks.explanation_monitor.num_samples=8", "callbacks.explanation_monitor.steps=8"]


def _csv_rows(run_dir: str) -> list[dict[str, str]]:
    with open(Path(run_dir) / "csv" / "metrics.csv", newline="") as f:
        return list(csv.DictReader(f))


def test_wandb_offline_run_holds_grids_scalars_and_tables(make_cfg) -> None:
    out = train(make_cfg("logger=wandb", "trainer.max_epochs=2", *MONITOR))
    run = find_offline_runs(out["run_dir"])[0]
    grids = sorted((run / "files" / "media" / "images" / "explain").glob("grid_*.png"))
    assert len(grids) == 2, "one grid image per epoch"
    tables = sorted((run / "files" / "media" / "table" / "explain").glob("per_sample_*.table.json"))
    assert len(tables) == 2
    table = json.loads(tables[-1].read_text())
    assert "insertion" in table["columns"] and len(table["data"]) == 8 * len(METHODS)
    history = read_run(run)["history"]
    for method in METHODS:
        for scalar in SCALARS:
            key = f"explain/{method}/{scalar}"
            logged = [row[key] for row in history if key in row]
            assert len(logged) == 2 and all(0.0 <= v <= 1.0 for v in logged), key
        moved = [row[f"explain/{method}/rank_corr_prev"] for row in history
                 if f"explain/{method}/rank_corr_prev" in row]
        assert len(moved) == 1 and -1.0 <= moved[0] <= 1.0  # only from the second epoch on
    pngs = sorted((Path(out["run_dir"]) / "explanations").glob("epoch_*.png"))
    assert [p.name for p in pngs] == ["epoch_000.png", "epoch_001.png"]


def test_csv_logger_gets_scalars_and_png_grids(make_cfg) -> None:
    out = train(make_cfg("logger=csv", "trainer.max_epochs=2", *MONITOR))
    rows = [r for r in _csv_rows(out["run_dir"]) if r.get("explain/grad_cam/insertion")]
    assert len(rows) == 2
    from PIL import Image

    grid = Image.open(Path(out["run_dir"]) / "explanations" / "epoch_001.png")
    # 8 rows of 96 px cells under the column titles, plus the epoch/accuracy line and the colour bars
    # (48 px together); image + 3 method columns beside the captions
    assert grid.height == 22 + 8 * 96 + 48 and grid.width == 170 + 4 * 96


def test_monitor_changes_nothing_about_training(make_cfg, tmp_path: Path) -> None:
    on = train(make_cfg("trainer.max_epochs=2", *MONITOR, out=tmp_path / "on"))
    off = train(make_cfg("trainer.max_epochs=2", "~callbacks.explanation_monitor", out=tmp_path / "off"))
    assert (Path(on["run_dir"]) / "explanations").is_dir() and not (Path(off["run_dir"]) / "explanations").exists()
    w_on = load_classifier(on["last_ckpt_path"]).state_dict()
    w_off = load_classifier(off["last_ckpt_path"]).state_dict()
    assert w_on.keys() == w_off.keys()
    assert all(torch.equal(w_on[k], w_off[k]) for k in w_on), "bit-identical weights and BN statistics"


@pytest.mark.ddp
def test_ddp_logs_once_per_epoch_and_matches_one_device(make_cfg, tmp_path: Path) -> None:
    ddp = train(make_cfg("trainer=ddp_sim", "trainer.max_epochs=1", "test=false", *MONITOR, out=tmp_path / "ddp"))
    rows = [r for r in _csv_rows(ddp["run_dir"]) if r.get("explain/grad_cam/insertion")]
    assert len(rows) == 1, "rank zero logs once per epoch"
    assert len(list((Path(ddp["run_dir"]) / "explanations").glob("*.png"))) == 1
    # the same checkpoint, one device: validate with the monitor and compare the scalars
    cfg = make_cfg("trainer=cpu", *MONITOR, out=tmp_path / "one")
    datamodule, _ = build(cfg)
    model = load_classifier(ddp["last_ckpt_path"])
    monitor = instantiate_group(cfg.callbacks)[1]
    assert isinstance(monitor, ExplanationMonitor)
    trainer: pl.Trainer = instantiate(cfg.trainer, logger=False, callbacks=[monitor])
    trainer.validate(model, datamodule=datamodule, verbose=False)
    for method in METHODS:
        for scalar in SCALARS:
            key = f"explain/{method}/{scalar}"
            # same probe batch and weights; only the intra-op thread count differs (float order)
            assert float(trainer.callback_metrics[key]) == pytest.approx(
                float(rows[0][key]), rel=1e-5, abs=1e-6, nan_ok=True)


def _fit_one_batch(cfg, monitor: ExplanationMonitor) -> None:
    datamodule, model = build(cfg)
    trainer = pl.Trainer(max_epochs=1, limit_train_batches=1, limit_val_batches=1, logger=False,
                         enable_checkpointing=False, enable_progress_bar=False, callbacks=[monitor],
                         default_root_dir=str(cfg.paths.output_dir))
    trainer.fit(model, datamodule=datamodule)


def test_unknown_explainer_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"Unknown explainer 'gradcam'.*Did you mean 'grad_cam'"):
        ExplanationMonitor(explainers=["gradcam"])


def test_wrong_target_layer_fails_at_setup(make_cfg) -> None:
    monitor = ExplanationMonitor(explainers={"grad_cam": {"target_layer": "features.block9"}}, num_samples=4)
    with pytest.raises(ValueError, match=r"features\.block9.*features\.block5"):
        _fit_one_batch(make_cfg(), monitor)
    assert monitor.history == [], "failed before the first epoch"


def test_num_samples_larger_than_val_set_fails_at_setup(make_cfg) -> None:
    with pytest.raises(ConfigError, match=r"num_samples=500 exceeds the 128 validation samples"):
        _fit_one_batch(make_cfg(), ExplanationMonitor(num_samples=500))


def test_mask_metrics_on_data_without_masks(make_cfg, tmp_path: Path) -> None:
    from xaudit_testing import write_cifar10

    write_cifar10(tmp_path / "data")
    cfg = make_cfg("data=cifar10", "data.num_workers=0", "data.val_size=10", fast=False)
    with pytest.raises(ConfigError, match="need ground-truth masks"):
        _fit_one_batch(cfg, ExplanationMonitor(metrics=["insertion", "pointing_game"], num_samples=4))
    auto = ExplanationMonitor(metrics="auto", num_samples=4)
    with pytest.warns(UserWarning, match="no masks; skipping"):
        _fit_one_batch(cfg, auto)
    assert auto.metric_names == ["deletion", "insertion"] and len(auto.history) == 1


def test_cam_is_skipped_with_one_warning_on_a_non_cam_head(make_cfg) -> None:
    cfg = make_cfg("model=mobilenet_v3_small")
    monitor = ExplanationMonitor(num_samples=4, steps=4)
    with pytest.warns(UserWarning, match="skipping cam") as record:
        _fit_one_batch(cfg, monitor)
    assert sum("skipping cam" in str(w.message) for w in record) == 1
    assert list(monitor.explainers) == ["grad_cam", "saliency"]


def test_robustness_metrics_are_opt_in_and_equal_the_standalone_metric(make_cfg) -> None:
    from xaudit.metrics import LocalLipschitz, MaxSensitivity

    assert "max_sensitivity" not in ExplanationMonitor().metric_names, "auto leaves the costly ones out"
    out = train(make_cfg("logger=csv", "trainer.max_epochs=1", "test=false", *MONITOR,
                         "callbacks.explanation_monitor.explainers=[saliency,grad_cam]",
                         "callbacks.explanation_monitor.robustness={max_sensitivity: {radius: 0.1, n: 3}}",
                         "callbacks.explanation_monitor.metrics=[insertion,local_lipschitz]"))
    row = next(r for r in _csv_rows(out["run_dir"]) if r.get("explain/saliency/max_sensitivity"))
    cfg = make_cfg(*MONITOR, "callbacks.explanation_monitor.explainers=[saliency,grad_cam]")
    monitor = instantiate_group(cfg.callbacks)[1]
    datamodule, _ = build(cfg)
    model = load_classifier(out["last_ckpt_path"]).eval()
    trainer = pl.Trainer(logger=False, enable_progress_bar=False, callbacks=[monitor],
                         default_root_dir=str(cfg.paths.output_dir))
    trainer.validate(model, datamodule=datamodule, verbose=False)
    x, y = monitor.probe["image"], monitor.probe["label"]
    for method, explainer in monitor.explainers.items():
        attr = explainer.attribute(x, y)
        ms = MaxSensitivity(model, radius=0.1, n=3, seed=int(cfg.seed))
        ms.update(x, attr, y, explainer)
        ll = LocalLipschitz(model, n=4, seed=int(cfg.seed))
        ll.update(x, attr, y, explainer)
        assert float(row[f"explain/{method}/max_sensitivity"]) == pytest.approx(float(ms.compute()), rel=1e-5)
        assert float(row[f"explain/{method}/local_lipschitz"]) == pytest.approx(float(ll.compute()), rel=1e-5)
        assert float(row[f"explain/{method}/max_sensitivity"]) > 0.0
    assert "explain/saliency/deletion" not in row or not row["explain/saliency/deletion"]


@pytest.mark.parametrize(("robustness", "match"), [
    ({"max_sensitivity": {"radius": 0.0}}, r"radius=0.0 must be a number > 0"),
    ({"local_lipschitz": {"sigma": -1}}, r"sigma=-1 must be a number > 0"),
    ({"max_sensitivity": {"raduis": 0.1}}, r"raduis.*radius"),
    ({"lipschitz": {}}, r"Unknown robustness metric 'lipschitz'.*local_lipschitz"),
])
def test_bad_robustness_options_fail_at_construction(robustness: dict, match: str) -> None:
    with pytest.raises((ConfigError, ValueError), match=match):
        ExplanationMonitor(robustness=robustness)


def test_new_method_families_run_in_the_monitor(make_cfg) -> None:
    # the CAM family, Captum's perturbation/Shapley and layer/neuron methods are monitor choices
    methods = ["hires_cam", "feature_ablation", "gradient_shap", "layer_gradient_x_activation", "neuron_gradient"]
    out = train(make_cfg("logger=csv", "trainer.max_epochs=1", *MONITOR,
                         f"callbacks.explanation_monitor.explainers=[{','.join(methods)}]",
                         "callbacks.explanation_monitor.metrics=[insertion]"))
    row = next(r for r in _csv_rows(out["run_dir"]) if r.get(f"explain/{methods[0]}/insertion"))
    for m in methods:
        assert 0.0 <= float(row[f"explain/{m}/insertion"]) <= 1.0
