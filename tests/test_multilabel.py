"""Multi-label data and explanation targets: data, BCE training, monitor, evaluate, contrast targets."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from xaudit.callbacks.explanation_monitor import ExplanationMonitor
from xaudit.data.shapes_multilabel import ShapesMultilabelDataModule, generate_multilabel_shapes
from xaudit.explainers import create
from xaudit.explainers.base import ExplainerInputError, UnsupportedTargetError
from xaudit.explainers.targets import ClassContrast, ClassProbability, PresentClasses, present_pairs
from xaudit.models import Classifier
from xaudit.tasks.audit import audit
from xaudit.tasks.train import train
from xaudit.utils.errors import ConfigError

from xaudit_testing import QUIET, compose_config

TINY = ["data=shapes_multilabel", "data.image_size=16", "data.n_train=48", "data.n_val=8", "data.n_test=12",
        "data.batch_size=16", "data.eval_batch_size=16", "data.num_workers=0", "++model.backbone.width=8",
        "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
        "logger=csv"]


@pytest.fixture(scope="module")
def trained(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One tiny multi-label training run with the explanation monitor on (shared by the tests)."""
    out = tmp_path_factory.mktemp("ml")
    monitor = ExplanationMonitor(explainers=["grad_cam"], num_samples=3, steps=4, log_images=True)
    cfg = compose_config([*TINY, "callbacks=model_checkpoint"], out)
    result = train(cfg, callbacks=[monitor])
    return {"out": out, "result": result, "monitor": monitor}


def test_generated_multilabel_data_has_one_visible_mask_per_present_class() -> None:
    split = generate_multilabel_shapes(32, num_classes=4, image_size=16, seed=1)
    assert split.labels.shape == (32, 4) and split.masks.shape == (32, 4, 16, 16)
    assert torch.equal(split.masks.flatten(2).any(2).long(), split.labels)  # mask ⇔ present
    assert bool((split.labels.sum(1) >= 1).all()) and int(split.labels.sum(1).max()) > 1
    dm = ShapesMultilabelDataModule(n_train=4, n_val=4, n_test=4, image_size=16, batch_size=4)
    batch = next(iter(dm.val_dataloader()))
    assert dm.multilabel and batch["label"].shape == (4, 4) and batch["mask"].shape == (4, 4, 16, 16)
    with pytest.raises(ConfigError, match="max_objects"):
        ShapesMultilabelDataModule(max_objects=5, num_classes=4)


def test_train_uses_bce_and_logs_multilabel_accuracy_and_map(trained: dict[str, Any]) -> None:
    result = trained["result"]
    for split in ("train", "val", "test"):
        assert f"{split}/acc" in result and f"{split}/map" in result and f"{split}/loss" in result
    ckpt = torch.load(result["ckpt_path"], map_location="cpu", weights_only=True)
    assert ckpt["xaudit"]["hparams"]["multilabel"] is True
    model = Classifier(**ckpt["xaudit"]["hparams"])
    model.load_state_dict(ckpt["state_dict"])
    model.eval()
    dm = ShapesMultilabelDataModule(n_train=48, n_val=8, n_test=12, image_size=16, batch_size=16)
    batch = next(iter(dm.test_dataloader()))
    with torch.no_grad():
        logits = model(batch["image"])
    bce = nn.functional.binary_cross_entropy_with_logits(logits, batch["label"].float())
    assert result["test/loss"] == pytest.approx(float(bce), rel=1e-4)  # BCE, not cross-entropy


def test_monitor_shows_and_scores_one_map_per_present_class(trained: dict[str, Any]) -> None:
    monitor: ExplanationMonitor = trained["monitor"]
    probe = monitor.probe
    assert probe is not None and monitor.multilabel
    pairs = int(probe["labels"].shape[0])
    assert pairs == probe["label"].shape[0] > 3  # 3 images, more than one class on some
    pngs = sorted((Path(trained["result"]["run_dir"]) / "explanations").glob("epoch_*.png"))
    assert pngs
    from PIL import Image
    assert Image.open(pngs[-1]).height >= pairs * monitor.cell  # one grid row per (image, class)
    result = monitor.explain(_module(trained))
    assert result["maps"]["grad_cam"].shape[0] == pairs
    assert all(v.shape[0] == pairs for v in result["values"]["grad_cam"].values())
    columns, rows = monitor._table(0, result)
    assert columns[:5] == ["epoch", "sample", "class", "method", "prob"] and len(rows) == pairs
    assert {(r[1], r[2]) for r in rows} == {
        (int(i), monitor.class_names[int(c)]) for i, c in zip(probe["image_index"], probe["label"])}
    caption = monitor._caption(0, result)
    assert monitor.class_names[int(probe["label"][0])] in caption


def _module(trained: dict[str, Any]) -> Classifier:
    from xaudit.models import load_classifier

    return load_classifier(trained["result"]["ckpt_path"])


def test_evaluate_scores_every_image_class_pair(trained: dict[str, Any]) -> None:
    out: Path = trained["out"]
    cfg = compose_config([*QUIET, f"ckpt_path={trained['result']['ckpt_path']}", f"out_dir={out / 'audit'}",
                          "audit=evaluate", "explainer=[saliency]", "controls=[]", "target=label",
                          "evaluate.metrics=relevance_mass+deletion_insertion"],
                         out / "a", config_name="audit")
    audit(cfg)
    present = int(generate_multilabel_shapes(12, num_classes=4, image_size=16, seed=2).labels.sum())
    record = next(c for c in _records(out / "audit") if c["method"] == "saliency")
    assert record["count"] == present
    assert set(record["metrics"]) == {"mass_in_mask", "deletion", "insertion"}


def _records(root: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for p in root.rglob("results.jsonl") for line in p.read_text().splitlines() if line]


def _linear(k: int = 3, c: int = 2, h: int = 6) -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Flatten(), nn.Linear(c * h * h, k)).eval()


def test_contrast_target_is_the_difference_of_the_two_class_gradients() -> None:
    model = _linear()
    x = torch.randn(4, 2, 6, 6)
    w = model[1].weight.detach().view(3, 2, 6, 6)
    diff = (w[0] - w[2])[None]
    sal = create("saliency", model).attribute(x, ClassContrast(0, 2), reduce=None)
    torch.testing.assert_close(sal, diff.abs().expand_as(sal))
    gxi = create("gradient_x_input", model).attribute(x, ClassContrast(0, torch.tensor([2, 2, 2, 2])), reduce=None)
    torch.testing.assert_close(gxi, x * diff)
    # occlusion of one pixel: the contrast drops by (w_a − w_b)·x at that pixel, summed over channels
    occ = create("occlusion", model, window=1, stride=1).attribute(x, ClassContrast(0, 2))
    torch.testing.assert_close(occ, (x * diff).sum(1), atol=1e-5, rtol=1e-4)
    # sigmoid probability: gradient σ'(z_c)·w_c
    z = model(x).detach()[:, 1]
    prob = create("gradient_x_input", model).attribute(x, ClassProbability(1, "sigmoid"), reduce=None)
    torch.testing.assert_close(prob, x * (z.sigmoid() * (1 - z.sigmoid())).view(-1, 1, 1, 1) * w[1])


def test_grad_cam_contrast_matches_the_hand_computation() -> None:
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(4, 3)).eval()
    x = torch.randn(2, 3, 8, 8)
    cam = create("grad_cam", model, target_layer="1", relu=False).attribute(x, ClassContrast(0, 2))
    acts = model[1](model[0](x)).detach()
    w = model[4].weight.detach()
    # ∂(y_0 − y_2)/∂A_k = (w_0k − w_2k)/(h·w) everywhere: Grad-CAM's channel weights
    torch.testing.assert_close(cam, torch.einsum("k,bkhw->bhw", w[0] - w[2], acts) / 64)


def test_present_classes_expand_the_batch_to_image_class_pairs() -> None:
    model = _linear()
    x = torch.randn(3, 2, 6, 6)
    labels = torch.tensor([[1, 0, 1], [0, 1, 0], [1, 1, 1]])
    sal = create("saliency", model)
    maps = sal.attribute(x, PresentClasses(labels))
    image, cls = present_pairs(labels)
    assert maps.shape == (6, 6, 6)
    torch.testing.assert_close(maps, sal.attribute(x[image], cls))
    torch.testing.assert_close(sal.attribute(x, labels), maps)  # multi-hot labels mean the same


def test_multilabel_targets_on_single_label_data_fail_clearly() -> None:
    model = _linear()
    x = torch.randn(2, 2, 6, 6)
    with pytest.raises(ExplainerInputError, match=r"multi-hot labels \[B,K\].*single-label.*indices"):
        create("saliency", model).attribute(x, PresentClasses(torch.tensor([0, 2])))
    with pytest.raises(ExplainerInputError, match="PresentClasses"):
        create("saliency", model).attribute(x, "present")
    with pytest.raises(UnsupportedTargetError, match="class logit"):
        create("feature_ablation", model, cell=3).attribute(x, ClassContrast(0, 1))
    single = Classifier(num_classes=3, multilabel=True)
    with pytest.raises(ConfigError, match="multilabel=false"):
        single._loss(torch.zeros(2, 3), torch.tensor([0, 1]), 0.0)
