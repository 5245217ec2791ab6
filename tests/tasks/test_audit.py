"""`python audit.py`: evaluate, ROAR and KAR audits end to end on a small CNN trained on shapes.

One checkpoint is trained per module (shapes, 1200 train / 300 test images, width 16, 4 epochs:
test accuracy ≈0.99). The ROAR run of this module is also the uninterrupted reference of the
kill test and the data of the science check.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import torch

from xaudit.reporting.wandb_offline import find_offline_runs, read_run
from xaudit.roar.results import ConfigMismatchError
from xaudit.tasks.audit import audit
from xaudit.tasks.train import train
from xaudit.utils.errors import ConfigError

from xaudit_testing import (
    AUDITED_TRAIN,
    FAST,
    QUIET,
    ROOT,
    assert_store_resumed,
    compose_config,
    kill_when,
    logged_batches,
    store_logs,
)

TRAIN = AUDITED_TRAIN
# one seed: these tests check the sweep, not the statistics (tests/reporting/test_roar_statistics.py)
ROAR = ["audit=roar", "roar.fractions=[0.5,0.9]", "explainer=[grad_cam,saliency]", "roar.seed=0"]
ROAR_CELLS = 1 + 2 * 4  # baseline + 2 fractions × (2 methods + 2 controls)


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("trained")
    result = train(compose_config(TRAIN, out))
    assert result["test/acc"] > 0.9, "the audited model must have learned the shapes"
    return result["last_ckpt_path"]


def run_audit(ckpt: str, out: Path, *overrides: str) -> dict[str, Any]:
    cfg = compose_config([*QUIET, f"ckpt_path={ckpt}", f"out_dir={out / 'audit'}", *overrides], out,
                         config_name="audit")
    return audit(cfg)


@pytest.fixture(scope="module")
def roar_run(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("roar")
    return run_audit(ckpt, out, *ROAR, "logger=wandb")


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


# -- acceptance 1: roar and kar end to end ----------------------------------------------------------
@pytest.mark.slow
def test_roar_end_to_end_writes_every_output(roar_run: dict[str, Any]) -> None:
    mode_dir = Path(roar_run["mode_dir"])
    cells = roar_run["cells"]
    expected = {"roar|baseline|0|0", *{f"roar|{m}|{f}|0" for m in ("grad_cam", "saliency", "random", "sobel")
                                       for f in ("0.5", "0.9")}}
    assert set(cells) == expected and len(expected) == ROAR_CELLS
    lines = read_jsonl(mode_dir / "results.jsonl")
    assert sorted(r["cell"] for r in lines) == sorted(expected), "each cell exactly once"
    for r in lines:
        assert 0.0 <= r["test_acc"] <= 1.0 and r["test_count"] == 300 and r["epochs"] == 4
    assert cells["roar|baseline|0|0"]["test_acc"] > 0.9
    for name in ("results.csv", "cells.csv", "results.json", "report.md", "report.html", "roar_accuracy.png",
                 "audit_config.json"):
        assert (mode_dir / name).is_file(), name
    assert (mode_dir / "roar_accuracy.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    cell_rows = (mode_dir / "cells.csv").read_text().splitlines()
    assert len(cell_rows) == 1 + ROAR_CELLS and cell_rows[0].startswith("cell,")
    point_rows = (mode_dir / "results.csv").read_text().splitlines()  # one per method × fraction (0 %, 50 %, 90 %)
    assert len(point_rows) == 1 + 4 * 3 and point_rows[0].startswith("method,fraction,seeds,test_acc_mean,")
    summary = json.loads((mode_dir / "results.json").read_text())["summary"]
    assert summary["header"] == ["method", "0%", "50%", "90%"]
    assert [row[0] for row in summary["rows"]] == ["grad_cam", "saliency", "random", "sobel"]
    report = (mode_dir / "report.md").read_text()
    assert "## Findings" in report and "Removing 50%" in report and "roar_accuracy.png" in report
    assert "<img src='roar_accuracy.png'" in (mode_dir / "report.html").read_text()
    # attribution stores: every train and test sample of every method, half precision, one shard file
    attr_root = Path(roar_run["out_dir"]) / "attributions"
    for method in ("grad_cam", "saliency", "random", "sobel"):
        for split, n in (("train", 1200), ("test", 300)):
            folder = attr_root / method / split
            assert json.loads((folder / "layout.json").read_text()) == {"n": n, "size": [32, 32], "dtype": "float16",
                                                                       "world": 1}
            assert (folder / f"maps_r0000of0001_{n}x32x32.float16").stat().st_size == n * 32 * 32 * 2


@pytest.mark.slow
def test_roar_logs_wandb_table_and_line_plot(roar_run: dict[str, Any]) -> None:
    runs = find_offline_runs(Path(roar_run["mode_dir"]).parents[1] / "run")
    assert len(runs) == 1
    logged = read_run(runs[0])
    summary = logged["summary"]
    # the protocol card is in the run config (issue 26): the sweep's settings next to Hooker et al.'s
    card = logged["config"]["protocol"]
    assert card["version"] == 2 and card["metrics"]["roar"]["params"]["seeds"] == 1
    assert "seeds=1 (paper: 5)" in card["metrics"]["roar"]["deviations"]
    assert card == json.loads((Path(roar_run["mode_dir"]) / "protocol.json").read_text())
    assert summary["audit/roar/table/_type"] == "table-file"
    assert summary["audit/roar/table/nrows"] == 4  # one row per method
    assert summary["audit/roar/cells/nrows"] == ROAR_CELLS
    assert summary["audit/roar/points/nrows"] == 4 * 3  # results.csv: method × fraction
    assert summary["audit/roar/roar_accuracy/_type"] == "image-file"
    assert summary["audit/roar/accuracy_vs_fraction_table/_type"] == "table-file"  # wandb.plot.line_series
    table = json.loads((runs[0] / "files" / summary["audit/roar/table/path"]).read_text())
    assert table["columns"] == ["method", "0%", "50%", "90%"]
    by_method = {row[0]: row for row in table["data"]}
    assert float(by_method["grad_cam"][2]) == pytest.approx(roar_run["cells"]["roar|grad_cam|0.5|0"]["test_acc"],
                                                           abs=1e-4)


@pytest.mark.slow
def test_science_grad_cam_top_pixels_matter_more_than_random(roar_run: dict[str, Any]) -> None:
    """Hooker et al.: removing an informative method's top 50 % hurts more than removing random 50 %.

    Measured here (seed 0): baseline ≈0.997, grad_cam@50 % ≈0.46, random@50 % ≈0.86.
    """
    cells = roar_run["cells"]
    grad_cam, rand = cells["roar|grad_cam|0.5|0"]["test_acc"], cells["roar|random|0.5|0"]["test_acc"]
    assert grad_cam < rand - 0.1, (grad_cam, rand)
    assert cells["roar|baseline|0|0"]["test_acc"] > rand


@pytest.mark.slow
def test_kar_end_to_end_reuses_the_attribution_shards(ckpt: str, roar_run: dict[str, Any]) -> None:
    out = Path(roar_run["out_dir"]).parent
    attr = Path(roar_run["out_dir"]) / "attributions" / "grad_cam" / "train"
    stamps = {p.name: p.stat().st_mtime_ns for p in attr.iterdir()}
    result = run_audit(ckpt, out, *[o.replace("audit=roar", "audit=kar") for o in ROAR])
    assert {p.name: p.stat().st_mtime_ns for p in attr.iterdir()} == stamps, "the store is reused as it is"
    cells = result["cells"]
    assert len(cells) == ROAR_CELLS and all(k.startswith("kar|") for k in cells)
    mode_dir = Path(result["mode_dir"])
    for name in ("results.csv", "cells.csv", "results.json", "report.md", "report.html", "kar_accuracy.png"):
        assert (mode_dir / name).is_file(), name
    # KAR keeps the *least* important pixels: keeping grad_cam's top half keeps more signal than ROAR's
    assert cells["kar|grad_cam|0.5|0"]["test_acc"] > roar_run["cells"]["roar|grad_cam|0.5|0"]["test_acc"]


# -- acceptance 2: SIGKILL after the first cell, rerun -----------------------------------------------
@pytest.mark.slow
def test_killed_audit_resumes_with_every_cell_once_and_same_values(ckpt: str, roar_run: dict[str, Any],
                                                                   tmp_path: Path) -> None:
    out_dir = tmp_path / "audit"
    args = [*QUIET, *ROAR, f"ckpt_path={ckpt}", f"out_dir={out_dir}",
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    results = out_dir / "roar" / "results.jsonl"
    kill_when("audit.py", args, tmp_path, lambda: results.is_file() and bool(read_jsonl(results)),
              "no cell finished")
    done_before = read_jsonl(results)
    assert 1 <= len(done_before) < ROAR_CELLS, "killed in the middle of the sweep"

    result = run_audit(ckpt, tmp_path, *ROAR)
    lines = read_jsonl(results)
    assert len(lines) == ROAR_CELLS and len({r["cell"] for r in lines}) == ROAR_CELLS, "every cell exactly once"
    assert lines[: len(done_before)] == done_before, "finished cells were kept, not recomputed"
    reference = roar_run["cells"]
    assert {k: v["test_acc"] for k, v in result["cells"].items()} == {k: v["test_acc"] for k, v in reference.items()}


@pytest.mark.slow
def test_audit_killed_while_writing_attribution_shards_resumes_them(ckpt: str, roar_run: dict[str, Any],
                                                                      tmp_path: Path) -> None:
    """SIGKILL as soon as the first batch of maps is logged (before any cell): the rerun keeps the
    finished rows, computes the rest once, and ends with the reference run's shard files and cells."""
    out_dir = tmp_path / "audit"
    args = [*QUIET, *ROAR, f"ckpt_path={ckpt}", f"out_dir={out_dir}",
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'hydra'}"]
    attr_root = out_dir / "attributions"
    kill_when("audit.py", args, tmp_path, lambda: logged_batches(attr_root) > 0, "no batch of maps written",
              poll=0.005)
    logged = store_logs(attr_root)
    reference_root = Path(roar_run["out_dir"]) / "attributions"
    assert 1 <= logged_batches(attr_root) < logged_batches(reference_root), "killed while the store was written"
    assert not (out_dir / "roar" / "results.jsonl").is_file() or not read_jsonl(out_dir / "roar" / "results.jsonl")

    result = run_audit(ckpt, tmp_path, *ROAR)
    assert_store_resumed(attr_root, reference_root, logged)
    lines = read_jsonl(out_dir / "roar" / "results.jsonl")
    assert len(lines) == ROAR_CELLS and len({r["cell"] for r in lines}) == ROAR_CELLS
    assert {k: v["test_acc"] for k, v in result["cells"].items()} == {
        k: v["test_acc"] for k, v in roar_run["cells"].items()}


# -- acceptance 3: evaluate, DDP equals one device --------------------------------------------------
EVAL = ["audit=evaluate", "evaluate.limit=96", "explainer=[grad_cam]", "controls=[random]",
        "evaluate.metrics.deletion.steps=8", "evaluate.metrics.insertion.steps=8", "batch_size=32"]


@pytest.fixture(scope="module")
def eval_run(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_audit(ckpt, tmp_path_factory.mktemp("eval"), *EVAL)


@pytest.mark.slow
def test_evaluate_table_and_outputs(eval_run: dict[str, Any]) -> None:
    cells = eval_run["cells"]
    assert set(cells) == {"evaluate|model", "evaluate|grad_cam", "evaluate|random"}
    assert cells["evaluate|model"]["count"] == 96 and cells["evaluate|model"]["test_acc"] > 0.9
    gc, rnd = cells["evaluate|grad_cam"], cells["evaluate|random"]
    assert set(gc["metrics"]) == {"deletion", "insertion", "pointing_game", "mass_in_mask", "mask_iou"}
    assert gc["count"] == 96 and len(gc["curves"]["deletion"]) == 9
    assert gc["higher_is_better"] == {"deletion": False, "insertion": True, "pointing_game": True,
                                      "mass_in_mask": True, "mask_iou": True}
    # a trained model's Grad-CAM localises the shape far better than a random map
    assert gc["metrics"]["pointing_game"] > rnd["metrics"]["pointing_game"] + 0.3
    assert gc["metrics"]["mass_in_mask"] > rnd["metrics"]["mass_in_mask"]
    mode_dir = Path(eval_run["mode_dir"])
    for name in ("results.csv", "results.json", "report.md", "report.html", "evaluate_scores.png",
                 "evaluate_curves.png"):
        assert (mode_dir / name).is_file(), name
    report = (mode_dir / "report.md").read_text()
    assert "| grad_cam |" in report
    # issue 26: the protocol card lists every metric that ran, with its parameters and paper
    card = json.loads((mode_dir / "protocol.json").read_text())
    assert card["version"] == 2 and card["target"] == "auto" and set(card["metrics"]) == set(gc["metrics"])
    assert card["metrics"]["deletion"]["params"] == {"mode": "deletion", "steps": 8, "substrate": "zero",
                                                     "output": "prob", "tie_seed": 0, "target": "predicted"}
    assert card["metrics"]["deletion"]["deviations"] == ["steps=8 (paper: 32)"]
    assert card["metrics"]["insertion"]["params"]["blur_kernel"] == 3
    assert card["metrics"]["pointing_game"]["params"] == {"tolerance": 2, "target": "label"}
    assert "## Protocol" in report and "Protocol" in (mode_dir / "report.html").read_text()
    # issue 29: a section per metric family, ↑/↓ on every column; the card says what each measures
    assert "### Faithfulness" in report and "### Localisation" in report and "deletion ↓" in report
    assert card["metrics"]["mass_in_mask"]["family"] == "localisation"
    for label, row in card["metrics"].items():
        line = next(ln for ln in report.splitlines() if ln.startswith(f"| {label}"))
        assert all(f"{k}={v}" in line for k, v in row["params"].items()), (label, line)
        assert row["paper"].split(",")[0] in line
    assert gc["protocol_version"] == 2
    # the standard error over images of every score, in the cell and in the findings
    assert set(gc["metrics_se"]) == set(gc["metrics"]) and 0 < gc["metrics_se"]["deletion"] < 0.05
    assert "1.96 standard errors" in report
    rnd_half = 1.96 * rnd["metrics_se"]["mask_iou"]
    assert re.search(rf"Best mask_iou: \w+ \(\d\.\d{{3}} ± \d\.\d{{3}};.*random gives {rnd['metrics']['mask_iou']:.3f} "
                     rf"± {rnd_half:.3f}\)", report)


def test_evaluate_family_shortcut(ckpt: str, tmp_path: Path) -> None:
    cells = run_audit(ckpt, tmp_path, "audit=evaluate", "evaluate.limit=16", "explainer=[grad_cam]", "controls=[]",
                      "evaluate.metrics=localisation", "batch_size=16")["cells"]
    labels = set(cells["evaluate|grad_cam"]["metrics"])
    assert {"pointing_game", "mass_in_mask", "mask_iou"} <= labels and "deletion" not in labels
    assert set(cells["evaluate|grad_cam"]["families"].values()) == {"localisation"}


@pytest.mark.slow
@pytest.mark.ddp
def test_evaluate_ddp_sim_gives_the_same_table(ckpt: str, eval_run: dict[str, Any], tmp_path: Path) -> None:
    result = run_audit(ckpt, tmp_path, *EVAL, "trainer=ddp_sim")
    one, two = eval_run["cells"], result["cells"]
    assert two["evaluate|grad_cam"]["world_size"] == 2 and one["evaluate|grad_cam"]["world_size"] == 1
    assert two["evaluate|model"]["test_acc"] == one["evaluate|model"]["test_acc"]
    assert two["evaluate|model"]["count"] == 96
    for key in ("evaluate|grad_cam", "evaluate|random"):
        assert two[key]["count"] == 96
        for metric, value in one[key]["metrics"].items():
            # same samples, same maps; only the order of the float sums differs between 1 and 2 ranks
            assert two[key]["metrics"][metric] == pytest.approx(value, abs=1e-5), (key, metric)
            assert two[key]["metrics_se"][metric] == pytest.approx(one[key]["metrics_se"][metric], abs=1e-5)


@pytest.mark.slow
def test_directory_of_an_older_protocol_is_refused(ckpt: str, eval_run: dict[str, Any], tmp_path: Path) -> None:
    """Old and new numbers are never merged: a directory whose fingerprint has another protocol
    (here: version 1, as written before issue 26) is refused on resume, naming the difference."""
    src = Path(eval_run["mode_dir"])
    old = tmp_path / "audit" / "evaluate"
    old.mkdir(parents=True)
    fingerprint = json.loads((src / "audit_config.json").read_text())
    fingerprint["protocol"]["version"] = 1
    (old / "audit_config.json").write_text(json.dumps(fingerprint))
    with pytest.raises(ConfigMismatchError, match=r"protocol.version: 1 → 2"):
        run_audit(ckpt, tmp_path, *EVAL)


@pytest.mark.slow
def test_evaluate_rerun_skips_finished_cells(ckpt: str, eval_run: dict[str, Any]) -> None:
    mode_dir = Path(eval_run["mode_dir"])
    before = (mode_dir / "results.jsonl").read_text()
    again = run_audit(ckpt, mode_dir.parents[1], *EVAL)
    assert (mode_dir / "results.jsonl").read_text() == before
    assert again["cells"] == eval_run["cells"]


def _without_timings(cells: dict[str, Any]) -> dict[str, Any]:
    return {k: {f: v for f, v in c.items() if f != "seconds"} for k, c in cells.items()}


@pytest.mark.slow
def test_evaluate_audit_is_bit_reproducible(ckpt: str, eval_run: dict[str, Any], tmp_path: Path) -> None:
    """A second audit of the same checkpoint into a fresh directory computes every value again and
    gets the same bits (seeded random control, seeded tie-breaks, no global RNG)."""
    again = run_audit(ckpt, tmp_path, *EVAL)
    assert again["out_dir"] != eval_run["out_dir"]
    assert set(again["cells"]["evaluate|grad_cam"]) - {"seconds"} >= {"metrics", "curves", "count"}
    assert _without_timings(again["cells"]) == _without_timings(eval_run["cells"])


# -- acceptance 5: bad input ------------------------------------------------------------------------
def test_missing_checkpoint_names_the_key(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"does not exist \(ckpt_path\).*python train.py"):
        run_audit(str(tmp_path / "nope.ckpt"), tmp_path)


def test_ckpt_path_last_without_training_says_so(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"no checkpoints/last\.ckpt"):
        run_audit("last", tmp_path)


class Payload:
    """A pickled class: only loadable with weights_only=False (unsafe)."""


def test_unsafe_checkpoint_is_refused(tmp_path: Path) -> None:
    path = tmp_path / "unsafe.ckpt"
    torch.save({"state_dict": {}, "xaudit": {"evil": Payload()}}, path)
    with pytest.raises(ValueError, match=r"Refusing to load.*weights_only=True"):
        run_audit(str(path), tmp_path)


def test_truncated_checkpoint_is_reported(ckpt: str, tmp_path: Path) -> None:
    path = tmp_path / "cut.ckpt"
    path.write_bytes(Path(ckpt).read_bytes()[:1000])
    with pytest.raises(ValueError, match="unreadable \\(truncated"):
        run_audit(str(path), tmp_path)


@pytest.mark.parametrize("fractions", ["[0.5,1.0]", "[0]", "[-0.1]", "[]"])
def test_fractions_outside_open_interval(ckpt: str, tmp_path: Path, fractions: str) -> None:
    with pytest.raises(ConfigError, match=r"roar.fractions"):
        run_audit(ckpt, tmp_path, "audit=roar", f"roar.fractions={fractions}")


def test_unknown_explainer_lists_choices(ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"Unknown explainer 'grad_cm' \(explainer\).*Did you mean 'grad_cam'"):
        run_audit(ckpt, tmp_path, "explainer=[grad_cm]")


def test_unknown_mode_and_target(ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="target='truth' is unknown"):
        run_audit(ckpt, tmp_path, "target=truth")
    with pytest.raises(ConfigError, match="Unknown audit mode 'deletion'"):
        run_audit(ckpt, tmp_path, "audit.mode=deletion")


def test_class_count_mismatch(ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"trained with 4 classes, but the audit data has 3 \(data.num_classes\)"):
        run_audit(ckpt, tmp_path, "++data.num_classes=3")


def test_explainer_kwargs_for_a_method_not_audited(ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"explainer_kwargs\.gradcam is given"):
        run_audit(ckpt, tmp_path, "+explainer_kwargs.gradcam.target_layer=features")


def test_bad_roar_seed(ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match=r"roar\.seed="):
        run_audit(ckpt, tmp_path, "audit=roar", "roar.seed=abc")


@pytest.mark.slow
def test_changed_config_in_same_directory_is_refused(ckpt: str, eval_run: dict[str, Any]) -> None:
    out = Path(eval_run["mode_dir"]).parents[1]
    changed = [o if "deletion.steps" not in o else "evaluate.metrics.deletion.steps=16" for o in EVAL]
    with pytest.raises(ConfigMismatchError, match=r"metrics.deletion.steps: 8 → 16.*out_dir="):
        run_audit(ckpt, out, *changed)


@pytest.mark.slow
def test_changed_recipe_refuses_the_roar_directory(ckpt: str, roar_run: dict[str, Any]) -> None:
    out = Path(roar_run["out_dir"]).parent
    with pytest.raises(ConfigMismatchError, match=r"recipe.epochs: 4 → 2"):
        run_audit(ckpt, out, *ROAR, "roar.epochs=2")


# -- Hydra multirun: one job per seed, one shared directory -------------------------------------------
@pytest.mark.slow
def test_multirun_over_seeds_shares_one_directory_and_report(ckpt: str, tmp_path: Path) -> None:
    out_dir = tmp_path / "audit"
    args = [sys.executable, str(ROOT / "audit.py"), "-m", *QUIET, "audit=roar", "explainer=[]",
            "controls=[random]", "roar.fractions=[0.5]", "roar.epochs=1", "roar.seed=0,1", f"ckpt_path={ckpt}",
            f"out_dir={out_dir}", f"paths.log_dir={tmp_path / 'logs'}"]
    proc = subprocess.run(args, cwd=tmp_path, env={**os.environ, "WANDB_MODE": "offline"}, capture_output=True,
                          text=True, timeout=600)
    assert proc.returncode == 0, proc.stderr[-3000:]
    cells = {r["cell"] for r in read_jsonl(out_dir / "roar" / "results.jsonl")}
    assert cells == {"roar|baseline|0|0", "roar|random|0.5|0", "roar|baseline|0|1", "roar|random|0.5|1"}
    summary = json.loads((out_dir / "roar" / "results.json").read_text())
    assert len(summary["cells"]) == 4, "the last job's report holds both seeds"
    assert summary["summary"]["rows"][0][1].count("±") == 1, "mean ± std over the two seeds"
    assert len(list((tmp_path / "logs" / "audit" / "multiruns").glob("*/[01]"))) == 2


def test_slurm_launcher_config_composes(tmp_path: Path) -> None:
    """`hydra/launcher=slurm` extends hydra-submitit-launcher's submitit_slurm; nodes follow the trainer."""
    cfg = compose_config(["hydra/launcher=slurm", "trainer=ddp", "trainer.num_nodes=2", "audit=roar"], tmp_path,
                         config_name="audit")
    launcher = cfg.hydra.launcher
    assert launcher._target_ == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert launcher.nodes == 2 and launcher.timeout_min == 240
    single = compose_config(["hydra/launcher=slurm"], tmp_path, config_name="audit")
    assert single.hydra.launcher.nodes == 1, "trainer=default has no num_nodes: one node"


# -- data without masks: CIFAR-10 in its on-disk format ------------------------------------------------
@pytest.mark.slow
def test_evaluate_on_data_without_masks_skips_the_mask_metrics(tmp_path: Path) -> None:
    from xaudit_testing import write_cifar10

    write_cifar10(tmp_path / "data")
    base = [o for o in FAST if not o.startswith(("callbacks.", "data."))]
    trained = train(compose_config([*base, "data=cifar10", "data.num_workers=0", "data.val_size=20",
                                    "data.batch_size=16", "callbacks=model_checkpoint"], tmp_path))
    with pytest.warns(UserWarning, match=r"no ground-truth masks; skipping \['pointing_game', 'mass_in_mask', "
                                         r"'mask_iou'\]"):
        result = run_audit(trained["last_ckpt_path"], tmp_path, "explainer=[saliency]", "controls=[]",
                           "evaluate.metrics.deletion.steps=4", "evaluate.metrics.insertion.steps=4")
    cell = result["cells"]["evaluate|saliency"]
    assert set(cell["metrics"]) == {"deletion", "insertion"} and cell["count"] == 20
    assert result["cells"]["evaluate|model"]["count"] == 20


def test_checkpoint_of_another_architecture_is_reported(ckpt: str, tmp_path: Path) -> None:
    """A checkpoint whose weights do not fit the model its own config describes (edited, or written by
    other code) is refused with a summary, not Lightning's list of every key."""
    state = torch.load(ckpt, weights_only=True)
    state["xaudit"]["hparams"]["backbone"]["width"] = 8
    path = tmp_path / "other.ckpt"
    torch.save(state, path)
    with pytest.raises(ValueError, match=r"does not hold the weights of the model its own config describes "
                                         r"\(model.backbone.name=small_cnn, model.backbone.width=8\): .*shape "
                                         r"mismatches \(e.g. net.features.block1.0.weight \(16, 3, 3, 3\) vs"):
        run_audit(str(path), tmp_path)


def test_resuming_training_from_another_architecture_names_both(ckpt: str, tmp_path: Path) -> None:
    cfg = compose_config([*TRAIN, "model=resnet18", f"ckpt_path={ckpt}"], tmp_path)
    with pytest.raises(ConfigError, match=r"cannot be resumed by this run: it holds model.backbone.name=small_cnn, "
                                          r"model.backbone.width=16.*this run builds model.backbone.name=resnet18"):
        train(cfg)


def _drop_dac_override() -> None:
    """In the child: drop CAP_DAC_OVERRIDE from the bounding set, so even root obeys file modes."""
    import ctypes

    if ctypes.CDLL(None, use_errno=True).prctl(24, 1, 0, 0, 0) != 0:  # PR_CAPBSET_DROP, CAP_DAC_OVERRIDE
        raise OSError(ctypes.get_errno(), "prctl(PR_CAPBSET_DROP)")


def test_read_only_output_directory_fails_before_any_work(ckpt: str, tmp_path: Path) -> None:
    read_only = tmp_path / "read_only"
    read_only.mkdir()
    read_only.chmod(0o555)
    args = [sys.executable, str(ROOT / "audit.py"), *QUIET, f"ckpt_path={ckpt}", f"out_dir={read_only / 'audit'}",
            f"paths.log_dir={tmp_path / 'logs'}", f"hydra.run.dir={tmp_path / 'hydra'}", "hydra.output_subdir=null"]
    env = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}
    proc = subprocess.run(args, cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300,
                          preexec_fn=_drop_dac_override if os.geteuid() == 0 else None)
    assert proc.returncode != 0
    assert f"Cannot write to {read_only / 'audit'}: it is read-only or not writable" in proc.stderr
    assert "Pass out_dir=<a writable folder>" in proc.stderr
    assert not (read_only / "audit").exists()


def test_output_disk_without_room_fails_before_any_work(ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(OSError, match=r"Only \d+ MB free on the disk of .*needs at least 1000000000 MB.*"
                                      r"out_dir=<a folder on another disk>"):
        run_audit(ckpt, tmp_path, "min_free_mb=1e9")
    assert not (tmp_path / "audit" / "evaluate").exists()


# -- issue 30: audit=explain on the user's own image files --------------------------------------------
def _write_user_images(root: Path) -> tuple[Path, Path, list[int]]:
    """Five shapes test images as files of other sizes and formats (PNG 64 px, JPEG 48 px, a grayscale
    BMP 32 px, a PNG with alpha) in nested folders, and their masks named like them."""
    from PIL import Image

    from xaudit.data import ShapesDataModule

    dm = ShapesDataModule(num_classes=4, image_size=32, n_train=8, n_val=1, n_test=5, seed=0)
    test = dm.split("test")
    images, masks = root / "images", root / "masks"
    (images / "sub").mkdir(parents=True)
    masks.mkdir()
    specs = [("a.png", 64, "RGB"), ("b.jpg", 48, "RGB"), ("sub/c.bmp", 32, "L"), ("sub/d.png", 40, "RGBA"),
             ("e.png", 32, "RGB")]
    for i, (name, size, mode) in enumerate(specs):
        img = Image.fromarray(test.images[i].permute(1, 2, 0).numpy()).resize((size, size)).convert(mode)
        img.save(images / name, quality=95) if name.endswith(".jpg") else img.save(images / name)
        mask = Image.fromarray((test.masks[i].numpy() * 255).astype("uint8"))
        mask.save(masks / f"{Path(name).stem}.png")
    return images, masks, [int(v) for v in test.labels]


def test_explain_mode_writes_predictions_overlays_sheet_and_mask_scores(ckpt: str, tmp_path: Path) -> None:
    import csv

    from PIL import Image

    images, masks, labels = _write_user_images(tmp_path)
    (images / "broken.png").write_bytes(b"not an image")  # reported and skipped, the rest still explained
    with pytest.warns(UserWarning, match=r"broken\.png could not be read as an image"):
        out = run_audit(ckpt, tmp_path, "audit=explain", f"images={images}", f"explain.masks={masks}",
                        "explainer=[grad_cam,integrated_gradients]", "explain.top_k=3")
    assert len(out["skipped"]) == 1 and "broken.png" in out["skipped"][0]
    d = Path(out["mode_dir"])
    with open(d / "predictions.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [Path(r["image"]).name for r in rows] == ["a.png", "b.jpg", "e.png", "c.bmp", "d.png"]
    assert all(len(r["top_k"].split("; ")) == 3 for r in rows)
    names = ["circle", "square", "triangle", "cross"]
    truth = {n: names[labels[i]] for i, n in enumerate(["a.png", "b.jpg", "c.bmp", "d.png", "e.png"])}
    correct = sum(r["prediction"] == truth[Path(r["image"]).name] for r in rows)
    assert correct >= 3  # resized, re-encoded (JPEG, grayscale) copies of test images: mostly still right
    assert all(0 <= float(r["grad_cam/pointing_game"]) <= 1 and 0 <= float(r["grad_cam/mass_in_mask"]) <= 1
               for r in rows)
    assert {p.name for p in (d / "overlays").iterdir()} == {"a.png", "b.png", "c.png", "d.png", "e.png"}
    sheet = Image.open(d / "contact_sheet.png")
    assert sheet.width > 3 * 96 and sheet.height > 5 * 96  # image + 2 methods per row, 5 rows
    report = (d / "report.md").read_text()
    assert "xaudit explain report" in report and "Skipped (not readable as images): 1" in report


def test_explain_mode_bad_paths_name_the_key(ckpt: str, tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="images is not set"):
        run_audit(ckpt, tmp_path, "audit=explain")
    with pytest.raises(FileNotFoundError, match=r"images: .*nowhere does not exist"):
        run_audit(ckpt, tmp_path, "audit=explain", f"images={tmp_path / 'nowhere'}")
    images, _, _ = _write_user_images(tmp_path)
    with pytest.raises(FileNotFoundError, match=r"explain\.masks"):
        run_audit(ckpt, tmp_path, "audit=explain", f"images={images}", f"explain.masks={tmp_path / 'nomasks'}")
