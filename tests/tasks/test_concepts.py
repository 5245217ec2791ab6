"""TCAV (``audit=concepts``): the building blocks against hand computations, the acceptance on a
shortcut vs a clean model, resume, outputs and bad input."""

from __future__ import annotations

import json
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from scipy.stats import ttest_ind
from torch import nn

from xaudit.concepts.sources import default_concept_layer
from xaudit.concepts.tcav import layer_activations, learn_cav, t_test, tcav_score
from xaudit.data.shapes import generate_shapes
from xaudit.models import build_backbone
from xaudit.reporting.wandb_offline import find_offline_runs
from xaudit.tasks.audit import audit
from xaudit.tasks.train import train
from xaudit.utils.errors import ConfigError

from xaudit_testing import AUDITED_TRAIN, QUIET, compose_config

TRAIN = AUDITED_TRAIN


# -- building blocks ------------------------------------------------------------------------------
def test_layer_activations_and_log_probability_gradients_match_a_hand_computation() -> None:
    torch.manual_seed(0)
    net = build_backbone("small_cnn", 4, width=4).eval()
    x = torch.randn(5, 3, 16, 16)
    target = torch.tensor([0, 1, 2, 3, 0])
    acts, grads = layer_activations(net, "features.block4", x, target, batch_size=2)
    feats = {}
    handle = net.features.block4.register_forward_hook(lambda m, i, o: feats.update(a=o))
    x2 = x.clone()
    logits = net(x2)
    handle.remove()
    a = feats["a"]
    # the gradient of log p_k (what the TCAV reference differentiates), not of the raw logit
    (g,) = torch.autograd.grad(torch.log_softmax(logits.double(), 1)[torch.arange(5), target].sum(), a)
    torch.testing.assert_close(acts, a.detach().flatten(1), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(grads, g.flatten(1), rtol=1e-5, atol=1e-7)
    assert all(p.grad is None for p in net.parameters())


def test_cav_points_from_negatives_to_concept_and_scores_count_positive_derivatives() -> None:
    g = torch.Generator().manual_seed(0)
    direction = torch.zeros(20)
    direction[3] = 1.0
    concept = torch.randn(200, 20, generator=g) + 4 * direction
    negative = torch.randn(200, 20, generator=g)
    cav, acc = learn_cav(concept, negative, seed=0)
    assert acc > 0.9 and abs(float(cav.norm()) - 1) < 1e-5  # Bayes accuracy 0.977
    assert int(cav.abs().argmax()) == 3 and float(cav[3]) > 0
    grads = torch.stack([direction, -direction, direction, 2 * direction])
    assert tcav_score(grads, cav) == 0.75  # 3 of 4 derivatives point along the concept


def test_t_test_is_welch_one_sided_by_default() -> None:
    a, b = [0.9, 0.8, 1.0, 0.95], [0.5, 0.2, 0.7, 0.4]
    assert t_test(a, b) == pytest.approx(ttest_ind(a, b, equal_var=False, alternative="greater").pvalue, rel=1e-12)
    assert t_test(b, a) > 0.9, "a concept that lowers the class is not 'significant' one-sided"
    assert t_test(b, a, "two-sided") == pytest.approx(ttest_ind(a, b, equal_var=False).pvalue, rel=1e-12)
    assert t_test([1.0, 1.0], [1.0, 1.0]) == 1.0
    with warnings.catch_warnings():  # every CAV scoring 1.0 is a valid zero-variance sample: no scipy warning
        warnings.simplefilter("error")
        p = t_test([1.0] * 50, [0.2, 0.5, 0.9, 0.4, 0.6] * 10)
    assert p == pytest.approx(ttest_ind([1.0] * 50, [0.2, 0.5, 0.9, 0.4, 0.6] * 10, equal_var=False,
                                        alternative="greater").pvalue, rel=1e-12) and p < 1e-15
    with pytest.raises(ConfigError, match="alternative='less' must be one of greater, two-sided"):
        t_test(a, b, "less")


def test_cue_class_gives_every_image_that_class_cue() -> None:
    split = generate_shapes(16, seed=3, cue="corner", cue_class=2)
    corners = split.images[:, :, :3, :3].float().mean((2, 3))
    assert (corners - corners[0]).abs().max() < 30, "the same corner colour on every image"
    assert split.labels.unique().numel() == 4, "over every shape"
    with pytest.raises(ConfigError, match=r"cue_class=4 must be a class index in 0..3"):
        generate_shapes(4, cue_class=4)


class _FlatTarget(nn.Module):
    """A model whose default target layer is not spatial: TCAV falls back to the last feature map."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 4, 3, padding=1)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.flat = nn.Flatten()
        self.fc = nn.Linear(4, 2)
        self.default_target_layer = "flat"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(self.flat(self.pool(self.conv(x))))


@pytest.mark.parametrize(("name", "layer"), [("small_cnn", "features.block5"), ("resnet18", "layer4"),
                                              ("senn", "concepts")])
def test_default_concept_layer_is_the_default_target_layer(name: str, layer: str) -> None:
    net = build_backbone(name, 4, width=4) if name != "resnet18" else build_backbone(name, 4)
    assert default_concept_layer(net.eval(), torch.rand(1, 3, 16, 16)) == layer


def test_default_concept_layer_falls_back_to_the_last_feature_map_before_a_flat_target() -> None:
    assert default_concept_layer(_FlatTarget().eval(), torch.rand(1, 3, 8, 8)) == "pool"


# -- acceptance: shortcut vs clean model ----------------------------------------------------------
@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    out = {}
    for name, p in (("shortcut", 1.0), ("clean", 0.0)):
        result = train(compose_config([*TRAIN, f"data.spurious_p={p}"], tmp_path_factory.mktemp(name)))
        assert result["test/acc"] > 0.9
        out[name] = result["last_ckpt_path"]
    return out


def run_concepts(ckpt: str, out: Path, *overrides: str) -> dict[str, Any]:
    cfg = compose_config([*QUIET, f"ckpt_path={ckpt}", f"out_dir={out / 'audit'}", "audit=concepts", *overrides],
                         out, config_name="audit")
    return audit(cfg)


@pytest.fixture(scope="module")
def tcav_runs(models: dict[str, str], tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict[str, Any]]:
    return {name: run_concepts(ckpt, tmp_path_factory.mktemp(f"tcav_{name}"), "logger=wandb")
            for name, ckpt in models.items()}


CLASSES = ("circle", "square", "triangle", "cross")


@pytest.mark.slow
def test_shortcut_model_cue_concepts_are_significant_for_their_class_and_clean_not(
        tcav_runs: dict[str, dict[str, Any]]) -> None:
    shortcut, clean = tcav_runs["shortcut"]["cells"], tcav_runs["clean"]["cells"]
    assert len(shortcut) == len(clean) == 5 * 4, "(4 cue concepts + random control) × 4 classes"
    for cls in CLASSES:
        hit = shortcut[f"concepts|background:{cls}|{cls}"]
        assert hit["significant"] and hit["p_value"] < 0.01 and hit["tcav"] > 0.75, hit
        assert hit["layer"] == "features.block5" and len(hit["scores"]) == 50
        assert not clean[f"concepts|background:{cls}|{cls}"]["significant"], cls
        # the interventional size: the shortcut class lives on its cue, the clean one barely moves
        assert hit["cue_effect"] > 1.0, hit["cue_effect"]
        assert abs(clean[f"concepts|background:{cls}|{cls}"]["cue_effect"]) < 0.5
    assert shortcut["concepts|random|circle"]["cue_effect"] is None
    # the random control is exchangeable with the random baseline, so Bonferroni bounds its family-wise
    # false-positive rate at alpha per audit: of its 8 tests here (2 models × 4 classes) at most one may
    # cross (seed 0 gives shortcut/cross p=0.022), and a miscalibrated test would flag most of them
    control = [cells[f"concepts|random|{cls}"] for cells in (shortcut, clean) for cls in CLASSES]
    assert sum(c["significant"] for c in control) <= 1
    assert sorted(c["p_value"] for c in control)[len(control) // 2] == 1.0, "median control p-value"
    # on the shortcut model the cue of class k matters for class k only
    off = [c for k, c in shortcut.items() if c["concept"] != "random" and not k.endswith(c["concept"].split(":")[1])]
    assert sum(c["significant"] for c in off) <= 1


@pytest.mark.slow
def test_report_plot_and_wandb_table(tcav_runs: dict[str, dict[str, Any]]) -> None:
    run = tcav_runs["shortcut"]
    mode_dir = Path(run["mode_dir"])
    for name in ("results.csv", "results.json", "report.md", "report.html", "tcav_scores.png", "results.jsonl"):
        assert (mode_dir / name).is_file(), name
    md = (mode_dir / "report.md").read_text()
    assert "| background:square | square |" in md and "Significant concepts" in md
    assert "The random control concept is" in md and "cue effect (nats)" in md
    assert "Setting a class's own cue on its images moves its log-probability by +" in md
    clean_md = (Path(tcav_runs["clean"]["mode_dir"]) / "report.md").read_text()
    assert "random control concept is not significant for any class" in clean_md
    assert Image.open(mode_dir / "tcav_scores.png").size[0] > 400
    stored = json.loads((mode_dir / "results.json").read_text())
    assert stored["summary"]["header"][:3] == ["concept", "class", "TCAV"] and len(stored["summary"]["rows"]) == 20
    wandb_run = find_offline_runs(Path(run["out_dir"]).parent)
    tables = [p for r in wandb_run for p in (r / "files" / "media" / "table").rglob("*.table.json")]
    assert any("concepts" in str(p) for p in tables)
    table = json.loads(next(p for p in tables if p.name.startswith("table")).read_text())
    assert len(table["data"]) == 20


@pytest.mark.slow
def test_rerun_reuses_every_cell_and_other_settings_refuse_the_directory(
        models: dict[str, str], tcav_runs: dict[str, dict[str, Any]], tmp_path: Path) -> None:
    first = run_concepts(models["shortcut"], tmp_path, "concepts.num_random=4", "concepts.examples=24",
                         "concepts.images_per_class=16")
    lines = (Path(first["mode_dir"]) / "results.jsonl").read_text().splitlines()
    again = run_concepts(models["shortcut"], tmp_path, "concepts.num_random=4", "concepts.examples=24",
                         "concepts.images_per_class=16")
    assert (Path(first["mode_dir"]) / "results.jsonl").read_text().splitlines() == lines
    assert again["cells"] == first["cells"], "nothing recomputed"
    fresh = run_concepts(models["shortcut"], tmp_path / "fresh", "concepts.num_random=4", "concepts.examples=24",
                         "concepts.images_per_class=16")

    def values(cells: dict[str, Any]) -> dict[str, Any]:
        return {k: {f: v for f, v in c.items() if f != "seconds"} for k, c in cells.items()}

    assert values(fresh["cells"]) == values(first["cells"]), "same seed → bit-identical scores and p-values"
    with pytest.raises(ConfigError, match=r"different setup.*num_random"):
        run_concepts(models["shortcut"], tmp_path, "concepts.num_random=5", "concepts.examples=24",
                     "concepts.images_per_class=16")


# -- user concept folders and bad input -----------------------------------------------------------
def _write_images(folder: Path, n: int, colour: tuple[int, int, int]) -> Path:
    folder.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in range(n):
        arr = np.clip(np.array(colour)[None, None] + rng.integers(-20, 20, (40, 40, 3)), 0, 255).astype(np.uint8)
        Image.fromarray(arr).save(folder / f"{i:03d}.png")
    return folder


@pytest.mark.slow
def test_user_concept_folder(models: dict[str, str], tmp_path: Path) -> None:
    red = _write_images(tmp_path / "red", 40, (230, 30, 30))
    # 32 subsampled red images + 32 random ones per run: a held-out third of 21 images scores each CAV
    result = run_concepts(models["shortcut"], tmp_path, f"concepts.folders={{red: {red}}}", "concepts.builtin=false",
                          "concepts.num_random=4", "concepts.examples=32", "concepts.images_per_class=16")
    assert set(c["concept"] for c in result["cells"].values()) == {"red", "random"}
    red_cells = [c for c in result["cells"].values() if c["concept"] == "red"]
    assert len(red_cells) == 4 and all(0 <= c["tcav"] <= 1 and c["cav_accuracy"] > 0.9 for c in red_cells)


@pytest.mark.slow
@pytest.mark.parametrize(("overrides", "match"), [
    (["concepts.folders={few: FEW}"], r"concepts.folders.few: .* holds 3 images, fewer than concepts.min_examples=10"),
    (["concepts.folders={gone: /no/such/folder}"], r"concepts.folders.gone: /no/such/folder is not a directory"),
    (["concepts.layer=fc"], r"concepts.layer 'fc' outputs shape \(1, 4\), not a spatial .*features.block4"),
    # the choices are the spatial layers: the flat head ("fc") is not offered
    (["concepts.layer=features.block9"],
     r"^(?!.*\bfc\b)Unknown layer 'features.block9' \(concepts.layer\)\..*"
     r"Choices: avgpool, features, features\.block1, "
     r".*features\.block5,"),
    (["concepts.num_random=1"], r"concepts.num_random=1 must be an integer ≥2"),
    (["concepts.alpha=1.5"], r"concepts.alpha=1.5 must lie in \(0, 1\)"),
    (["concepts.classes=[7]"], r"concepts.classes holds 7; valid classes are 0..3"),
    (["concepts.builtin=false"], r"has no concepts.*concepts.folders"),
])
def test_bad_input_is_refused_with_the_fix(models: dict[str, str], tmp_path: Path, overrides: list[str],
                                           match: str) -> None:
    few = _write_images(tmp_path / "few", 3, (0, 200, 0))
    overrides = [o.replace("FEW", str(few)) for o in overrides]
    with pytest.raises((ConfigError, ValueError), match=match):
        run_concepts(models["shortcut"], tmp_path, *overrides)
    assert not (tmp_path / "audit" / "concepts" / "results.jsonl").exists()


def test_non_spatial_layer_lists_the_spatial_ones() -> None:
    net = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(ConfigError, match=r"layer '3' outputs shape \(2, 4\).*spatial output: 0, 1, 2"):
        layer_activations(net, "3", torch.randn(2, 3, 8, 8))
    with pytest.raises(ConfigError, match=r"Unknown layer '9' \(concepts.layer\)\. Choices: 0, 1, 2\.$"):
        layer_activations(net, "9", torch.randn(2, 3, 8, 8))
