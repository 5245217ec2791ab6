"""`python audit.py experiment=shortcut` and `experiment=sanity`, CPU-sized."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from xaudit.tasks.audit import audit
from xaudit.tasks.train import train

from xaudit_testing import FAST, QUIET, compose_config

SMALL_TRAIN = ["data.n_train=1200", "data.n_val=128", "data.n_test=300", "++model.backbone.width=16",
               "trainer.max_epochs=3", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
               "callbacks.explanation_monitor.num_samples=8", "callbacks.explanation_monitor.steps=8"]


@pytest.fixture(scope="module")
def shortcut_run(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    out = tmp_path_factory.mktemp("shortcut")
    train_list = "[" + ",".join(f"'{o}'" for o in SMALL_TRAIN) + "]"
    cfg = compose_config([*QUIET, "experiment=shortcut", f"shortcut.train={train_list}", f"out_dir={out / 'exp'}"],
                         out, config_name="audit")
    return audit(cfg)


@pytest.mark.slow
def test_shortcut_model_is_caught(shortcut_run: dict[str, Any]) -> None:
    cells = shortcut_run["cells"]
    acc = {k.split("|", 1)[1]: v["test_acc"] for k, v in cells.items()}
    # the shortcut model needs the cue; the clean one does not
    assert acc["shortcut|same"] > 0.9 and acc["shortcut|shuffled"] < acc["shortcut|same"] - 0.3, acc
    assert abs(acc["clean|same"] - acc["clean|shuffled"]) < 0.1, acc
    c, s = cells["shortcut|clean|same"], cells["shortcut|shortcut|same"]
    assert s["grad_cam_mass_in_mask"] < c["grad_cam_mass_in_mask"] - 0.1
    assert s["grad_cam_pointing_game"] < c["grad_cam_pointing_game"] - 0.2
    root = Path(shortcut_run["mode_dir"])
    report = (root / "report.md").read_text()
    assert "with it shuffled — it falls" in report and "% of its positive mass on the object" in report
    assert (root / "shortcut_monitor.png").read_bytes()[:4] == b"\x89PNG"
    hist = shortcut_run["models"]["shortcut"]["history"]
    assert len(hist) == 3 and "explain/grad_cam/mass_in_mask" in hist[0], "one monitor row per epoch"
    first = {n: m["history"][0]["explain/grad_cam/mass_in_mask"] for n, m in shortcut_run["models"].items()}
    assert first["shortcut"] < first["clean"], "the monitor shows the gap from the first epoch"


@pytest.mark.slow
def test_shortcut_rerun_reuses_models_and_audits(shortcut_run: dict[str, Any], tmp_path: Path) -> None:
    root = Path(shortcut_run["mode_dir"])
    ckpts = {n: Path(m["ckpt_path"]).stat().st_mtime_ns for n, m in shortcut_run["models"].items()}
    cfg = compose_config([*QUIET, "experiment=shortcut", f"out_dir={root.parent}"], tmp_path, config_name="audit")
    again = audit(cfg)
    assert {n: Path(m["ckpt_path"]).stat().st_mtime_ns for n, m in again["models"].items()} == ckpts
    assert again["cells"] == shortcut_run["cells"]


@pytest.fixture(scope="module")
def sanity_ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("sanity_model")
    base = [o for o in FAST if not o.startswith("callbacks.")]
    return train(compose_config([*base, "callbacks=model_checkpoint", "trainer.max_epochs=3",
                                 "++model.backbone.width=16", "data.n_train=1200"], out))["last_ckpt_path"]


@pytest.mark.slow
def test_sanity_cascade_table_figure_and_findings(sanity_ckpt: str, tmp_path: Path) -> None:
    cfg = compose_config([*QUIET, "experiment=sanity", f"ckpt_path={sanity_ckpt}", f"out_dir={tmp_path / 'a'}",
                          "sanity.num_images=16", "+explainer_kwargs.integrated_gradients.steps=16",
                          "+explainer_kwargs.smoothgrad.n=8"], tmp_path, config_name="audit")
    result = audit(cfg)
    cells = {c["method"]: c for c in result["cells"].values()}
    assert set(cells) == {"saliency", "integrated_gradients", "smoothgrad", "guided_backprop", "grad_cam", "lrp",
                          "random", "sobel"}
    layers = cells["saliency"]["layers"]
    assert layers == ["fc", "features.block5", "features.block4", "features.block3", "features.block2",
                      "features.block1"]
    mean = {m: sum(c["spearman"]) / len(c["spearman"]) for m, c in cells.items()}
    # the published findings: gradient maps decorrelate, guided backprop stays more similar
    assert cells["saliency"]["spearman"][-1] < 0.5 and cells["integrated_gradients"]["spearman"][-1] < 0.5
    assert mean["guided_backprop"] > max(mean["saliency"], mean["integrated_gradients"])
    assert abs(mean["random"]) < 0.05, "fresh noise at every step: uncorrelated"
    assert mean["sobel"] == pytest.approx(1.0), "an edge detector ignores the weights"
    mode_dir = Path(result["mode_dir"])
    for name in ("results.csv", "results.json", "report.md", "report.html", "sanity_curves.png", "sanity_grid.png"):
        assert (mode_dir / name).is_file(), name
    summary = json.loads((mode_dir / "results.json").read_text())["summary"]
    assert summary["header"][1] == "→fc" and len(summary["rows"]) == 8
    report = (mode_dir / "report.md").read_text()
    assert "Guided backprop stays more similar" in report
    assert "## Protocol" in report and "Adebayo et al." in report and "images=16" in report  # the card


@pytest.mark.parametrize(("override", "message"), [
    ("sanity.num_images=0", r"sanity\.num_images=0 must lie in \[1, 256\]"),
    ("sanity.layers=[fc,nope]", r"Unknown layer 'nope' \(sanity\.layers\).*features\.block5"),
])
def test_sanity_bad_settings(sanity_ckpt: str, tmp_path: Path, override: str, message: str) -> None:
    from xaudit.utils.errors import ConfigError

    cfg = compose_config([*QUIET, "experiment=sanity", f"ckpt_path={sanity_ckpt}", f"out_dir={tmp_path}",
                          "explainer=[saliency]", "controls=[]", override], tmp_path, config_name="audit")
    with pytest.raises(ConfigError, match=message):
        audit(cfg)
