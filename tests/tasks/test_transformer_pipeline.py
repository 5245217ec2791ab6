"""Issue 27 (part): a vision transformer goes through train (monitor on), evaluate (1 and 2 ranks) and ROAR."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Any

import pytest

from xaudit.tasks.audit import audit
from xaudit.tasks.train import train

from xaudit_testing import QUIET, compose_config

VIT_TRAIN = ["model=vit_tiny", "data.n_val=128", "data.n_test=256", "data.batch_size=64",
             "trainer.max_epochs=2", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
             "logger=csv", "callbacks.explanation_monitor.num_samples=8", "callbacks.explanation_monitor.steps=8"]
EVAL = ["audit=evaluate", "evaluate.limit=32", "explainer=[grad_cam,attention_rollout]", "controls=[random]",
        "evaluate.metrics.deletion.steps=8", "evaluate.metrics.insertion.steps=8", "batch_size=16"]


@pytest.fixture(scope="module")
def vit_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("vit")
    return {"result": train(compose_config(VIT_TRAIN, out)), "out": out}


def _audit(ckpt: str, out: Path, *overrides: str) -> dict[str, Any]:
    return audit(compose_config([*QUIET, f"ckpt_path={ckpt}", f"out_dir={out / 'audit'}", *overrides], out,
                                config_name="audit"))


@pytest.mark.slow
def test_vit_trains_above_chance_with_the_monitor(vit_run: dict[str, Any]) -> None:
    result = vit_run["result"]
    # 4 classes: chance 0.25 (± 0.027 on 256 images); the default data (4000 images), 2 epochs: 0.48 measured
    assert result["test/acc"] > 0.38, f"got {result['test/acc']}"
    run_dir = Path(result["run_dir"])
    rows = list(csv.DictReader((next(run_dir.rglob("metrics.csv"))).open()))
    keys = {k for row in rows for k, v in row.items() if v}
    for method in ("grad_cam", "saliency", "attention_rollout"):  # the monitor's transformer set
        assert f"explain/{method}/deletion" in keys and f"explain/{method}/pointing_game" in keys, method
    assert list((run_dir / "explanations").glob("epoch_*.png"))


@pytest.mark.slow
@pytest.mark.ddp
def test_vit_evaluate_two_ranks_equal_one(vit_run: dict[str, Any], tmp_path: Path) -> None:
    ckpt = vit_run["result"]["last_ckpt_path"]
    one = _audit(ckpt, tmp_path / "one", *EVAL)["cells"]
    two = _audit(ckpt, tmp_path / "two", *EVAL, "trainer=ddp_sim")["cells"]
    for key in ("evaluate|grad_cam", "evaluate|attention_rollout", "evaluate|random"):
        assert one[key]["count"] == two[key]["count"] == 32
        for metric, value in one[key]["metrics"].items():
            assert two[key]["metrics"][metric] == pytest.approx(value, abs=1e-5), (key, metric)


@pytest.mark.slow
def test_vit_one_cell_roar(vit_run: dict[str, Any], tmp_path: Path) -> None:
    ckpt = vit_run["result"]["last_ckpt_path"]
    cells = _audit(ckpt, tmp_path, "audit=roar", "roar.fractions=[0.5]", "roar.epochs=1", "roar.seed=0",
                   "explainer=[attention_rollout]", "controls=[]")["cells"]
    assert set(cells) == {"roar|baseline|0|0", "roar|attention_rollout|0.5|0"}
    assert all(0.0 <= c["test_acc"] <= 1.0 for c in cells.values())
