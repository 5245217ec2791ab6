"""Acceptance (issue 31): a metric defined and registered in one file (toy_metric.py) runs in
``audit=evaluate``, in the explanation monitor of ``python train.py`` and keeps the metric contract."""

from __future__ import annotations

import csv
import math
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch
from test_metric_contract import check_metric_contract
from torch import nn
from toy_metric import NAME

from xaudit.metrics.registry import METRICS
from xaudit.tasks.audit import audit
from xaudit.tasks.train import train

from xaudit_testing import QUIET, compose_config

# importing toy_metric registered it (all it takes); keep it registered only while this module's tests run,
# so the other tests' "every registered metric ..." checks see the built-in registry
TOY = METRICS.unregister(NAME)


@pytest.fixture(autouse=True, scope="module")
def toy_registered() -> Iterator[None]:
    METRICS.register(NAME)(TOY)
    yield
    METRICS.unregister(NAME)


TINY = ["data.n_train=96", "data.n_val=16", "data.n_test=16", "data.batch_size=16", "++model.backbone.width=8",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=csv", "callbacks.explanation_monitor.num_samples=4",
        "callbacks.explanation_monitor.explainers=[saliency]"]


def test_toy_metric_keeps_the_contract(tiny_cnn: nn.Module) -> None:
    per = check_metric_contract(NAME, tiny_cnn, {"fraction": 0.5})
    assert per.shape == (3,) and torch.isfinite(per).all()


def test_toy_metric_runs_in_the_monitor_and_in_evaluate(tmp_path: Path) -> None:
    out = train(compose_config([*TINY, f"callbacks.explanation_monitor.metrics={{toy: {{name: {NAME}}}}}"],
                               tmp_path / "train"))
    with open(Path(out["run_dir"]) / "csv" / "metrics.csv", newline="") as f:
        logged = [float(r["explain/saliency/toy"]) for r in csv.DictReader(f) if r.get("explain/saliency/toy")]
    assert len(logged) == 1 and math.isfinite(logged[0]) and -1.0 <= logged[0] <= 1.0
    cfg = compose_config([*QUIET, f"ckpt_path={out['last_ckpt_path']}", f"out_dir={tmp_path / 'audit'}",
                          "audit=evaluate", "evaluate.limit=8", "explainer=[saliency]", "controls=[]", "batch_size=8",
                          # Hydra merges a mapping into the default one: drop the defaults, then give the spec
                          "~evaluate.metrics", f"+evaluate.metrics={{toy: {{name: {NAME}, fraction: 0.5}}}}"],
                         tmp_path, config_name="audit")
    cell = audit(cfg)["cells"]["evaluate|saliency"]
    assert set(cell["metrics"]) == {"toy"}, cell["metrics"]
    assert math.isfinite(float(cell["metrics"]["toy"])) and cell["count"] == 8
