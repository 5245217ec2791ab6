"""ROAR/KAR statistics over seeds: mean ± sample std, the 95 % t-interval of the mean, the Welch
interval of the difference to the random control and Hooker et al.'s better-than-random test;
results.csv (per point) / cells.csv (per cell) and the report that shows them.

The numbers below are worked by hand: with three seeds the interval of a mean uses
t(0.975, df=2) = 4.302653; two groups of three with equal spread give Welch df = 4,
t(0.975, 4) = 2.776445 (any t table).
"""

from __future__ import annotations

import csv
import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from xaudit.reporting.report import (
    POINT_COLUMNS,
    better_than_random,
    findings,
    log_report,
    mean_interval,
    retrain_summary,
    summary_table,
    t_cdf,
    t_quantile,
    welch_interval,
    write_report,
)

from xaudit_testing import FAST, QUIET, ROOT, compose_config

T2 = 4.302652729911275  # t(0.975, 2)
T4 = 2.7764451051977987  # t(0.975, 4)

#: test accuracies per (method, fraction), one per seed 0, 1, 2
ACC = {
    ("baseline", 0.0): (0.96, 0.97, 0.98),
    ("grad_cam", 0.5): (0.40, 0.42, 0.44),  # far below random: better than random in ROAR
    ("saliency", 0.5): (0.90, 0.92, 0.94),  # above random: better than random in KAR, worse in ROAR
    ("sobel", 0.5): (0.83, 0.86, 0.89),  # random's mean: not distinguishable
    ("random", 0.5): (0.84, 0.86, 0.88),
}


def _cells(acc: dict[tuple[str, float], tuple[float, ...]] = ACC, mode: str = "roar") -> list[dict[str, Any]]:
    """Cells shaped like the records of results.jsonl (xaudit.roar.runner.RoarSweep)."""
    return [{"cell": f"{mode}|{m}|{f:g}|{s}", "mode": mode, "method": m, "method_key": m, "fraction": f, "seed": s,
             "epochs": 1, "test_acc": v, "test_loss": 1.0 - v, "test_count": 300, "world_size": 1,
             "recipe": {"epochs": 1, "batch_size": 64}}
            for (m, f), vals in acc.items() for s, v in enumerate(vals)]


def _point(rows: list[dict[str, Any]], method: str, fraction: float) -> dict[str, Any]:
    return next(r for r in rows if r["method"] == method and r["fraction"] == fraction)


# -- the t distribution (scipy.stats.t) --------------------------------------------------------------------
def test_t_quantile_table_values() -> None:
    assert t_quantile(0.975, 1) == pytest.approx(12.706204736, abs=1e-8)
    assert t_quantile(0.975, 2) == pytest.approx(T2, abs=1e-9)
    assert t_quantile(0.975, 4) == pytest.approx(T4, abs=1e-9)
    assert t_quantile(0.975, 1e6) == pytest.approx(1.959966, abs=1e-5), "→ the normal quantile"
    assert t_quantile(0.025, 3) == pytest.approx(-t_quantile(0.975, 3))
    assert t_quantile(0.5, 7) == pytest.approx(0.0, abs=1e-10)
    assert t_cdf(t_quantile(0.9, 2.5), 2.5) == pytest.approx(0.9, abs=1e-10)
    for bad in ((0.0, 3), (1.0, 3), (0.5, 0)):
        with pytest.raises(ValueError):
            t_quantile(*bad)


def test_t_quantile_matches_scipy() -> None:
    stats = pytest.importorskip("scipy.stats")
    for df in (0.6, 1, 1.7, 2, 2.3059, 3, 4, 5, 8.25, 10, 29, 120):
        for p in (0.6, 0.9, 0.95, 0.975, 0.995):
            assert t_quantile(p, df) == pytest.approx(stats.t.ppf(p, df), rel=1e-9, abs=1e-9), (p, df)


# -- mean ± std and the intervals -------------------------------------------------------------------
def test_mean_std_and_t_interval_by_hand() -> None:
    st = mean_interval([0.40, 0.42, 0.44])
    assert st["n"] == 3 and st["mean"] == pytest.approx(0.42)
    assert st["std"] == pytest.approx(0.02), "sample std (ddof=1): sqrt((0.02² + 0 + 0.02²) / 2)"
    half = T2 * 0.02 / math.sqrt(3)  # 0.049683
    assert (st["low"], st["high"]) == (pytest.approx(0.42 - half), pytest.approx(0.42 + half))
    assert (st["low"], st["high"]) == (pytest.approx(0.370317, abs=1e-6), pytest.approx(0.469683, abs=1e-6))
    skewed = mean_interval([0.40, 0.42, 0.47, float("nan")])  # NaN (a failed cell) is dropped
    assert skewed["n"] == 3 and skewed["std"] == pytest.approx(math.sqrt(0.0026 / 2))


def test_welch_interval_by_hand_and_against_scipy() -> None:
    diff, lo, hi = welch_interval([0.40, 0.42, 0.44], [0.84, 0.86, 0.88])
    se = math.sqrt(0.02**2 / 3 + 0.02**2 / 3)  # equal spread, equal n: Welch df = 2(n − 1) = 4
    assert diff == pytest.approx(-0.44)
    assert (lo, hi) == (pytest.approx(-0.44 - T4 * se), pytest.approx(-0.44 + T4 * se))
    assert (lo, hi) == (pytest.approx(-0.485339, abs=1e-6), pytest.approx(-0.394661, abs=1e-6))
    # unequal spread: Welch–Satterthwaite df = (va + vb)² / (va²/2 + vb²/2) ≈ 2.3059
    a, b = [0.40, 0.42, 0.47], [0.85, 0.86, 0.87]
    va, vb = 0.0013 / 3, 0.0001 / 3
    df = (va + vb) ** 2 / (va**2 / 2 + vb**2 / 2)
    assert df == pytest.approx(2.30588, abs=1e-5)
    diff, lo, hi = welch_interval(a, b)
    assert hi - diff == pytest.approx(t_quantile(0.975, df) * math.sqrt(va + vb))
    stats = pytest.importorskip("scipy.stats")
    ref = stats.ttest_ind(a, b, equal_var=False).confidence_interval(0.95)
    assert (lo, hi) == (pytest.approx(ref.low, abs=1e-9), pytest.approx(ref.high, abs=1e-9))


def test_welch_degenerate_cases() -> None:
    assert welch_interval([0.5, 0.5], [0.7, 0.7]) == pytest.approx((-0.2, -0.2, -0.2)), "no spread at all"
    diff, lo, hi = welch_interval([0.5], [0.7, 0.72])
    assert diff == pytest.approx(-0.21) and math.isnan(lo) and math.isnan(hi), "one seed: no interval"


def test_better_than_random_direction() -> None:
    assert better_than_random("roar", -0.3, -0.1) and not better_than_random("roar", -0.3, 0.01)
    assert better_than_random("kar", 0.01, 0.2) and not better_than_random("kar", -0.01, 0.2)
    assert not better_than_random("roar", 0.1, 0.2) and not better_than_random("kar", -0.2, -0.1)


# -- retrain_summary: the rows of results.csv -----------------------------------------------------------
def test_summary_rows_roar() -> None:
    rows = retrain_summary(_cells(), "roar")
    assert list(rows[0]) == list(POINT_COLUMNS)
    assert [(r["method"], r["fraction"]) for r in rows] == [
        ("grad_cam", 0.0), ("grad_cam", 0.5), ("saliency", 0.0), ("saliency", 0.5),
        ("random", 0.0), ("random", 0.5), ("sobel", 0.0), ("sobel", 0.5)], "methods first, then the controls"
    base = _point(rows, "grad_cam", 0.0)
    assert base["seeds"] == 3 and base["test_acc_mean"] == pytest.approx(0.97) and base["test_acc_std"] == (
        pytest.approx(0.01))
    assert base["better_than_random"] == "" and math.isnan(base["diff_vs_random"]), "0 % is the shared baseline"
    gc = _point(rows, "grad_cam", 0.5)
    assert gc["seeds"] == 3 and gc["test_acc_mean"] == pytest.approx(0.42) and gc["test_acc_std"] == pytest.approx(0.02)
    assert gc["ci95_low"] == pytest.approx(0.370317, abs=1e-6) and gc["ci95_high"] == pytest.approx(0.469683, abs=1e-6)
    assert gc["diff_vs_random"] == pytest.approx(-0.44)
    assert gc["diff_ci95_low"] == pytest.approx(-0.485339, abs=1e-6)
    assert gc["diff_ci95_high"] == pytest.approx(-0.394661, abs=1e-6)
    assert gc["better_than_random"] == "yes"
    assert _point(rows, "saliency", 0.5)["better_than_random"] == "no", "ROAR: higher accuracy is not better"
    sobel = _point(rows, "sobel", 0.5)
    assert sobel["diff_vs_random"] == pytest.approx(0.0, abs=1e-12) and sobel["better_than_random"] == "no"
    assert sobel["diff_ci95_low"] < 0 < sobel["diff_ci95_high"]
    rnd = _point(rows, "random", 0.5)
    assert rnd["ci95_low"] == pytest.approx(0.86 - T2 * 0.02 / math.sqrt(3))
    assert rnd["better_than_random"] == "" and math.isnan(rnd["diff_vs_random"])


def test_summary_rows_kar_reverse_the_decision() -> None:
    rows = retrain_summary(_cells(mode="kar"), "kar")
    sal = _point(rows, "saliency", 0.5)
    assert sal["diff_vs_random"] == pytest.approx(0.06)
    assert sal["diff_ci95_low"] == pytest.approx(0.06 - 0.045339, abs=1e-6) and sal["better_than_random"] == "yes"
    assert _point(rows, "grad_cam", 0.5)["better_than_random"] == "no", "KAR: lower accuracy is not better"
    text = " ".join(findings("kar", _cells(mode="kar")))
    assert "Better than random (accuracy higher; difference to random with its 95% Welch interval): " \
           "saliency +0.060 [+0.015, +0.105]." in text
    assert "Worse than random (accuracy clearly lower): grad_cam -0.440 [-0.485, -0.395]." in text


def test_findings_state_each_fraction_with_intervals() -> None:
    facts = findings("roar", _cells())
    text = " ".join(facts)
    assert facts[0].startswith("Each point: test accuracy of 3 retrained models (one per seed), mean ± sample std")
    assert "Unmasked baseline: test accuracy 0.970 ± 0.010, 95% CI [0.945, 0.995] (3 seeds)." in text
    assert "Random control 95% CI [0.810, 0.910] (3 seeds)." in text
    assert ("Better than random (accuracy lower; difference to random with its 95% Welch interval): "
            "grad_cam -0.440 [-0.485, -0.395].") in text
    assert "Not distinguishable from random (the interval contains 0): sobel +0.000 [" in text
    assert "Worse than random (accuracy clearly higher): saliency +0.060 [+0.015, +0.105]." in text
    assert "one seed" not in text.lower()


def test_one_seed_has_no_interval_and_says_so() -> None:
    one = {k: v[:1] for k, v in ACC.items()}
    rows = retrain_summary(_cells(one), "roar")
    gc = _point(rows, "grad_cam", 0.5)
    assert gc["seeds"] == 1 and gc["test_acc_mean"] == pytest.approx(0.40)
    assert all(math.isnan(gc[k]) for k in ("test_acc_std", "ci95_low", "ci95_high", "diff_ci95_low",
                                           "diff_ci95_high"))
    assert gc["diff_vs_random"] == pytest.approx(-0.44) and gc["better_than_random"] == "n/a"
    text = " ".join(findings("roar", _cells(one)))
    assert "Every point has one seed: a single retraining gives no interval (std and CI n/a)" in text
    assert "Run roar.seed=[0,1,2]" in text
    # the labelled fallback: two binomial standard errors of random's 0.84 on 300 images
    margin = 2 * math.sqrt(0.84 * 0.16 / 300)
    assert f"One seed, no interval (binomial test-set margin ±{margin:.3f} only): accuracy lower than random: " \
           "grad_cam;" in text
    header, table = summary_table("roar", _cells(one))
    assert header == ["method", "0%", "50%"] and table[0] == ["grad_cam", "0.9600", "0.4000"], "no ± for one seed"


def test_one_seed_against_three_random_seeds_is_not_decided() -> None:
    mixed = {**ACC, ("grad_cam", 0.5): (0.40,)}
    gc = _point(retrain_summary(_cells(mixed), "roar"), "grad_cam", 0.5)
    assert gc["seeds"] == 1 and gc["better_than_random"] == "n/a"
    text = " ".join(findings("roar", _cells(mixed)))
    assert "Some points have one seed" in text and "Random control 95% CI [0.810, 0.910]" in text


# -- the files ----------------------------------------------------------------------------------------
def test_results_csv_cells_csv_and_report(tmp_path: Path) -> None:
    cells = _cells()
    paths = write_report(tmp_path, "roar", cells, {"checkpoint": "x.ckpt"})
    with paths["csv"].open() as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames or ()) == POINT_COLUMNS
        points = list(reader)
    assert len(points) == 8
    gc = next(p for p in points if p["method"] == "grad_cam" and float(p["fraction"]) == 0.5)
    assert int(gc["seeds"]) == 3
    want = {"test_acc_mean": 0.42, "test_acc_std": 0.02, "ci95_low": 0.370317, "ci95_high": 0.469683,
            "diff_vs_random": -0.44, "diff_ci95_low": -0.485339, "diff_ci95_high": -0.394661}
    for key, value in want.items():
        assert float(gc[key]) == pytest.approx(value, abs=2e-6), key
    assert gc["better_than_random"] == "yes"
    rnd = next(p for p in points if p["method"] == "random" and float(p["fraction"]) == 0.5)
    assert (float(rnd["ci95_low"]), float(rnd["ci95_high"])) == (pytest.approx(0.810317, abs=1e-6),
                                                                 pytest.approx(0.909683, abs=1e-6))
    assert math.isnan(float(rnd["diff_vs_random"])) and rnd["better_than_random"] == ""
    with paths["cells_csv"].open() as f:
        per_cell = list(csv.DictReader(f))
    assert len(per_cell) == len(cells) == 15 and {r["seed"] for r in per_cell} == {"0", "1", "2"}
    assert per_cell[0]["cell"] == "roar|baseline|0|0" and "recipe.epochs" in per_cell[0]
    stored = json.loads(paths["json"].read_text())
    assert len(stored["points"]) == 8 and stored["points"][0]["diff_vs_random"] is None, "strict JSON: no NaN"
    md = paths["md"].read_text()
    assert "| random | 0.9700 ± 0.0100 [0.9452, 0.9948] | 0.8600 ± 0.0200 [0.8103, 0.9097] |" in md
    assert "Random control 95% CI [0.810, 0.910] (3 seeds)." in md
    assert "grad_cam -0.440 [-0.485, -0.395]" in md
    assert "Random control 95% CI [0.810, 0.910] (3 seeds)." in paths["html"].read_text()
    assert paths["plot0"].read_bytes()[:4] == b"\x89PNG"


def test_evaluate_keeps_one_row_per_cell(tmp_path: Path) -> None:
    cells = [{"cell": "evaluate|saliency", "method": "saliency", "method_key": "saliency",
              "metrics": {"deletion": 0.2}, "count": 10}]
    paths = write_report(tmp_path, "evaluate", cells, {})
    assert paths["csv"].read_text().splitlines()[0] == "cell,method,method_key,metrics.deletion,count"
    assert "cells_csv" not in paths and not (tmp_path / "cells.csv").exists()


def test_scalar_loggers_get_the_intervals(tmp_path: Path) -> None:
    class Scalars:
        def __init__(self) -> None:
            self.logged: dict[str, float] = {}

        def log_metrics(self, metrics: dict[str, float]) -> None:
            self.logged.update(metrics)

    lg = Scalars()
    log_report([lg], "roar", _cells(), {})
    assert lg.logged["audit/roar/grad_cam/0.5"] == pytest.approx(0.42)
    assert lg.logged["audit/roar/grad_cam/0.5/ci95_low"] == pytest.approx(0.370317, abs=1e-6)
    assert lg.logged["audit/roar/grad_cam/0.5/diff_ci95_high"] == pytest.approx(-0.394661, abs=1e-6)
    assert "audit/roar/random/0.5/diff_vs_random" not in lg.logged


# -- acceptance: `python audit.py audit=roar` with the default seeds ---------------------------------------
@pytest.mark.slow
def test_audit_roar_default_three_seeds_end_to_end(tmp_path: Path) -> None:
    """The shapes data, a tiny checkpoint, one fraction, one epoch per retraining: the default
    roar.seed=[0,1,2] gives 3 seeds per point, results.csv has mean and std, the report shows
    the random control's interval."""
    from xaudit.tasks.train import train

    overrides = [*[o for o in FAST if not o.startswith("callbacks.")], "callbacks=model_checkpoint",
                 "data.n_train=192", "data.n_val=64", "data.n_test=64"]
    ckpt = train(compose_config(overrides, tmp_path / "trained"))["last_ckpt_path"]
    out_dir = tmp_path / "audit"
    args = [sys.executable, str(ROOT / "audit.py"), *QUIET, "audit=roar", "explainer=[saliency]",
            "controls=[random]", "roar.fractions=[0.5]", "roar.epochs=1", f"ckpt_path={ckpt}", f"out_dir={out_dir}",
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    proc = subprocess.run(args, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    mode_dir = out_dir / "roar"
    with (mode_dir / "results.csv").open() as f:
        points = list(csv.DictReader(f))
    assert [(p["method"], float(p["fraction"])) for p in points] == [
        ("saliency", 0.0), ("saliency", 0.5), ("random", 0.0), ("random", 0.5)]
    for p in points:
        mean, std = float(p["test_acc_mean"]), float(p["test_acc_std"])
        assert int(p["seeds"]) == 3 and 0.0 <= mean <= 1.0 and math.isfinite(std) and std >= 0.0, p
        assert float(p["ci95_low"]) <= mean <= float(p["ci95_high"]), p
    sal = points[1]
    assert float(sal["diff_ci95_low"]) <= float(sal["diff_vs_random"]) <= float(sal["diff_ci95_high"])
    assert sal["better_than_random"] in ("yes", "no")
    with (mode_dir / "cells.csv").open() as f:
        per_cell = list(csv.DictReader(f))
    assert sorted((r["method_key"], r["seed"]) for r in per_cell) == sorted(
        (m, s) for m in ("baseline", "saliency", "random") for s in ("0", "1", "2"))
    rnd = points[3]
    report = (mode_dir / "report.md").read_text()
    assert f"Random control 95% CI [{float(rnd['ci95_low']):.3f}, {float(rnd['ci95_high']):.3f}] (3 seeds)." in report
    assert "Each point: test accuracy of 3 retrained models" in report
    random_row = next(line for line in report.splitlines() if line.startswith("| random |"))
    assert random_row.count("±") == 2 and random_row.count("[") == 2, random_row
