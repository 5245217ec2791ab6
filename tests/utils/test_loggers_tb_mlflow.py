"""logger=tensorboard and logger=mlflow: `python train.py` (monitor scalars, grids, tables) and
`python audit.py` (tables, plots), read back from the real TensorBoard event files and MLflow store."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from xaudit.tasks.audit import audit
from xaudit.tasks.train import train

from xaudit_testing import compose_config

pytest.importorskip("tensorboard")
pytest.importorskip("mlflow")

from mlflow.tracking import MlflowClient
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

METHODS = ("cam", "grad_cam", "saliency")
SCALARS = ("deletion", "insertion", "mass_in_mask", "pointing_game")
NUM_SAMPLES = 4
#: one short epoch on a few 16 px shapes: the monitor runs once (epoch 0 is the last epoch)
TINY = ["data.n_train=128", "data.n_val=32", "data.n_test=32", "data.batch_size=32", "++model.backbone.width=8",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "test=false", f"callbacks.explanation_monitor.num_samples={NUM_SAMPLES}",
        "callbacks.explanation_monitor.steps=4"]
#: evaluate mode on 8 test images, one explainer, no controls
AUDIT = ["trainer.enable_progress_bar=false", "audit=evaluate", "evaluate.limit=8", "explainer=[grad_cam]",
         "controls=[]", "evaluate.metrics.deletion.steps=4", "evaluate.metrics.insertion.steps=4", "batch_size=8"]


def _events(log_dir: Path) -> EventAccumulator:
    files = list(log_dir.glob("events.out.tfevents.*"))
    assert files, f"no TensorBoard event file in {log_dir}"
    acc = EventAccumulator(str(log_dir), size_guidance={"images": 0, "tensors": 0, "scalars": 0})
    acc.Reload()
    return acc


def _text(acc: EventAccumulator, tag: str) -> str:
    return acc.Tensors(f"{tag}/text_summary")[-1].tensor_proto.string_val[0].decode()


@pytest.fixture(scope="module")
def tb_train(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return train(compose_config([*TINY, "logger=tensorboard"], tmp_path_factory.mktemp("tb")))


def test_tensorboard_train_has_monitor_scalars_grid_and_table(tb_train: dict[str, Any]) -> None:
    acc = _events(Path(tb_train["run_dir"]) / "tensorboard")
    tags = acc.Tags()
    for method in METHODS:
        for scalar in SCALARS:
            key = f"explain/{method}/{scalar}"
            assert key in tags["scalars"], key
            [event] = acc.Scalars(key)
            assert event.value == pytest.approx(tb_train[key], abs=1e-6) and 0.0 <= event.value <= 1.0
    assert "val/acc" in tags["scalars"]
    [grid] = acc.Images("explain/grid")
    png = (Path(tb_train["run_dir"]) / "explanations" / "epoch_000.png")
    from PIL import Image

    with Image.open(png) as image:
        assert (grid.width, grid.height) == image.size, "the logged grid is the PNG written to the run dir"
    assert grid.encoded_image_string.startswith(b"\x89PNG")
    table = _text(acc, "explain/per_sample").splitlines()
    assert table[0].startswith("| epoch | sample | method | true | pred | prob |") and "insertion" in table[0]
    assert len(table) == 2 + NUM_SAMPLES * len(METHODS), "header, rule, one row per sample and method"


def test_tensorboard_audit_has_table_text_and_plot_images(tb_train: dict[str, Any],
                                                          tmp_path: Path) -> None:
    cfg = compose_config([*AUDIT, "logger=tensorboard", f"ckpt_path={tb_train['last_ckpt_path']}",
                          f"out_dir={tmp_path / 'audit'}"], tmp_path, config_name="audit")
    result = audit(cfg)
    acc = _events(tmp_path / "run" / "tensorboard")
    tags = acc.Tags()
    plots = [Path(p) for k, p in result["report"].items() if k.startswith("plot")]
    assert plots, "the evaluate report draws plots"
    for plot in plots:
        assert f"audit/evaluate/{plot.stem}" in tags["images"], (plot.stem, tags["images"])
    stored = json.loads(Path(result["report"]["json"]).read_text())["summary"]
    text = _text(acc, "audit/evaluate/table").splitlines()
    assert len(text) == 2 + len(stored["rows"]) and "grad_cam" in text[2]
    assert all(f" {h} " in text[0] for h in stored["header"])
    assert any(t.startswith("audit/evaluate/grad_cam/") for t in tags["scalars"]), "the scalars as before"


def _mlflow_run(run_dir: Path) -> tuple[MlflowClient, Any]:
    """The one run of the local store in ``run_dir`` (what conf/logger/mlflow.yaml writes)."""
    client = MlflowClient(tracking_uri=f"sqlite:///{run_dir / 'mlflow.db'}")
    experiment = client.get_experiment_by_name("xaudit")
    [run] = client.search_runs([experiment.experiment_id])
    return client, run


@pytest.fixture(scope="module")
def mlflow_train(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return train(compose_config([*TINY, "logger=mlflow"], tmp_path_factory.mktemp("mlflow")))


def test_mlflow_train_has_monitor_metrics_and_grid_artifacts(mlflow_train: dict[str, Any], tmp_path: Path) -> None:
    out = mlflow_train
    run_dir = Path(out["run_dir"])
    client, run = _mlflow_run(run_dir)
    assert run.info.run_name == "train"
    for method in METHODS:
        for scalar in SCALARS:
            key = f"explain/{method}/{scalar}"
            [metric] = client.get_metric_history(run.info.run_id, key)
            assert metric.value == pytest.approx(out[key], abs=1e-6), key
    grids = [a.path for a in client.list_artifacts(run.info.run_id, "explain/grid")]
    tables = [a.path for a in client.list_artifacts(run.info.run_id, "explain/per_sample")]
    assert len(grids) == 1 and grids[0].endswith(".png")
    assert len(tables) == 1 and tables[0].endswith(".json")
    local = Path(client.download_artifacts(run.info.run_id, tables[0], str(tmp_path / "dl")))
    table = json.loads(local.read_text())
    assert table["columns"][:6] == ["epoch", "sample", "method", "true", "pred", "prob"]
    assert len(table["data"]) == NUM_SAMPLES * len(METHODS)
    # the artifacts live in the run directory (no server): <run dir>/mlartifacts/<run id>/artifacts/
    assert (run_dir / "mlartifacts" / run.info.run_id / "artifacts" / grids[0]).is_file()


def test_mlflow_audit_has_table_and_report_artifacts(mlflow_train: dict[str, Any], tmp_path: Path) -> None:
    cfg = compose_config([*AUDIT, "logger=mlflow", f"ckpt_path={mlflow_train['last_ckpt_path']}",
                          f"out_dir={tmp_path / 'audit'}"], tmp_path, config_name="audit")
    result = audit(cfg)
    client, run = _mlflow_run(tmp_path / "run")
    assert run.info.run_name == "audit"
    files = {Path(a.path).name for a in client.list_artifacts(run.info.run_id, "audit/evaluate")}
    report = {Path(p).name for p in result["report"].values()}
    assert {"results.csv", "results.json", "report.md"} <= report <= files, (report, files)
    assert any(name.endswith(".png") for name in files), "the plots as artifacts"
    [table] = client.list_artifacts(run.info.run_id, "audit/evaluate/table")
    local = Path(client.download_artifacts(run.info.run_id, table.path, str(tmp_path / "dl")))
    stored = json.loads(Path(result["report"]["json"]).read_text())["summary"]
    assert json.loads(local.read_text())["columns"] == stored["header"]
    assert any(k.startswith("audit/evaluate/grad_cam/") for k in client.get_run(run.info.run_id).data.metrics)
