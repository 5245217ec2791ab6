"""The sweep's cell list, the audit's data-config merge, and the report built from cells (no training)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from xaudit.reporting.report import findings, retrain_summary, write_report
from xaudit.roar.runner import Recipe, sweep_cells
from xaudit.tasks.audit import check_seeds, data_config, data_identity
from xaudit.utils.errors import ConfigError


def test_cells_baselines_first_then_method_fraction_seed() -> None:
    cells = sweep_cells("kar", {"grad_cam": {}, "lrp": {"rule": "epsilon"}}, [0.3, 0.7], [0, 1])
    keys = [c.key for c in cells]
    assert keys[:2] == ["kar|baseline|0|0", "kar|baseline|0|1"]
    assert keys[2:6] == ["kar|grad_cam|0.3|0", "kar|grad_cam|0.3|1", "kar|grad_cam|0.7|0", "kar|grad_cam|0.7|1"]
    assert keys[6].startswith("kar|lrp-") and keys[6].endswith("|0.3|0"), "options are part of the method key"
    assert len(keys) == len(set(keys)) == 2 + 2 * 2 * 2
    with pytest.raises(ConfigError, match="not a retraining mode"):
        sweep_cells("evaluate", {}, [0.5], [0])


def test_recipe_rejects_non_positive_sizes() -> None:
    with pytest.raises(ConfigError, match=r"roar\.epochs=0 must be ≥1"):
        Recipe(epochs=0, batch_size=8, eval_batch_size=8)


def test_data_config_merges_overrides_onto_the_checkpoint_data() -> None:
    trained = {"_target_": "xaudit.data.ShapesDataModule", "n_test": 1000, "spurious_p": 1.0, "batch_size": 128}
    assert data_config({"test_cue": "shuffled"}, trained) == {**trained, "test_cue": "shuffled"}
    other = {"_target_": "xaudit.data.CIFAR10DataModule", "root": "/d"}
    assert data_config(other, trained) == other, "another _target_ replaces the checkpoint's data"
    with pytest.raises(ConfigError, match=r"\+data=shapes"):
        data_config({}, None)
    assert "batch_size" not in data_identity(trained) and data_identity(trained)["n_test"] == 1000


def test_check_seeds() -> None:
    assert check_seeds(3) == [3]
    assert check_seeds([0, 1, 1, 2]) == [0, 1, 2]
    for bad in ("x", []):
        with pytest.raises(ConfigError, match=r"roar\.seed"):
            check_seeds(bad)


def _cells() -> list[dict]:
    acc = {("baseline", 0.0): (0.95, 0.97), ("grad_cam", 0.5): (0.40, 0.44), ("grad_cam", 0.9): (0.70, 0.72),
           ("random", 0.5): (0.85, 0.87), ("random", 0.9): (0.50, 0.52)}
    return [{"cell": f"roar|{m}|{f:g}|{s}", "mode": "roar", "method": m, "method_key": m, "fraction": f, "seed": s,
             "test_acc": v[s]} for (m, f), v in acc.items() for s in (0, 1)]


def test_retrain_summary_and_findings() -> None:
    rows = retrain_summary(_cells())
    gc = {r["fraction"]: r for r in rows if r["method"] == "grad_cam"}
    assert gc[0.0]["test_acc_mean"] == pytest.approx(0.96), "the baseline is every method's 0 %"
    assert gc[0.5]["test_acc_mean"] == pytest.approx(0.42)
    assert gc[0.5]["test_acc_std"] == pytest.approx(0.0283, abs=1e-4)
    text = " ".join(findings("roar", _cells()))
    assert "Removing 50%: grad_cam 0.420 ± 0.028, random 0.860 ± 0.014." in text
    assert "Better than random (accuracy lower; difference to random with its 95% Welch interval): grad_cam" in text
    assert "grad_cam: accuracy rises from 50% to 90% removed" in text, "mask leakage is called out"


def test_write_report_files(tmp_path: Path) -> None:
    paths = write_report(tmp_path, "roar", _cells(), {"checkpoint": "x.ckpt"})
    assert {"csv", "json", "md", "html", "plot0"} <= set(paths)
    cell_lines = paths["cells_csv"].read_text().splitlines()
    assert len(cell_lines) == 11 and cell_lines[0].split(",")[0] == "cell"
    csv_lines = paths["csv"].read_text().splitlines()  # one row per method × fraction
    assert len(csv_lines) == 1 + 2 * 3 and csv_lines[0].split(",")[:3] == ["method", "fraction", "seeds"]
    summary = json.loads(paths["json"].read_text())["summary"]
    assert summary["header"] == ["method", "0%", "50%", "90%"]
    assert summary["rows"][0] == ["grad_cam", "0.9600 ± 0.0141 [0.8329, 1.0871]", "0.4200 ± 0.0283 [0.1659, 0.6741]",
                                  "0.7100 ± 0.0141 [0.5829, 0.8371]"]
    assert paths["plot0"].read_bytes()[:4] == b"\x89PNG"
