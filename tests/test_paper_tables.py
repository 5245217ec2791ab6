"""benchmarks/paper_tables.py: the embedded run, a real-data run on a tiny ImageFolder, clear errors.

The real-data test writes what ``--imagenet/--weights/--boxes`` expect — synset folders of JPEG and
PNG images, a randomly initialised torchvision ResNet-18 state dict, per-image VOC box XMLs — and
runs the script on them in tiny settings (32 px, 50 RISE masks, 4 images).
"""

from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
import torch
import torchvision

from xaudit_testing import ROOT

SCRIPT = ROOT / "benchmarks" / "paper_tables.py"
SYNSETS = ("n01440764", "n01443537", "n01484850")


def _load() -> ModuleType:
    spec = importlib.util.spec_from_file_location("paper_tables", SCRIPT)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


pt = _load()


def write_voc_xml(path: Path, size: tuple[int, int], objects: list[tuple[str, tuple[int, int, int, int]]]) -> None:
    """An ImageNet-style (Pascal VOC) annotation: <size> and one <object><bndbox> per box."""
    objs = "".join(f"<object><name>{name}</name><bndbox><xmin>{b[0]}</xmin><ymin>{b[1]}</ymin><xmax>{b[2]}</xmax>"
                   f"<ymax>{b[3]}</ymax></bndbox></object>" for name, b in objects)
    path.write_text(f"<annotation><filename>{path.stem}</filename><size><width>{size[0]}</width>"
                    f"<height>{size[1]}</height><depth>3</depth></size>{objs}</annotation>")


@pytest.fixture
def imagenet(tmp_path: Path) -> tuple[Path, Path, Path]:
    """A 3-synset × 2-image val folder (JPEG and PNG, odd sizes), a box folder, ResNet-18 weights."""
    from PIL import Image

    rng = np.random.default_rng(0)
    val, boxes = tmp_path / "val", tmp_path / "boxes"
    boxes.mkdir()
    sizes = [(48, 40), (40, 56)]
    for c, synset in enumerate(SYNSETS):
        (val / synset).mkdir(parents=True)
        for i, (w, h) in enumerate(sizes):
            stem = f"ILSVRC2012_val_{c * 2 + i:08d}"
            ext = ".JPEG" if i == 0 else ".png"
            Image.fromarray(rng.integers(0, 256, (h, w, 3), dtype=np.uint8)).save(
                val / synset / f"{stem}{ext}", format="JPEG" if i == 0 else "PNG")
            if c * 2 + i != 5:  # one image without a box file: the pointing game skips it
                write_voc_xml(boxes / f"{stem}.xml", (w, h), [(synset, (5, 6, w // 2, h // 2))])
    weights = tmp_path / "resnet18.pth"
    torch.manual_seed(0)
    torch.save(torchvision.models.resnet18(weights=None).state_dict(), weights)
    return val, boxes, weights


def test_embedded_run_prints_that_it_is_not_the_papers_data_and_writes_the_rows(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "embedded.json"
    # CI-sized: a few seconds of training, 16 images, 30 RISE masks
    pt.main(["--rise-masks", "30", "--limit", "16", "--epochs", "2", "--train-images", "400", "--device", "cpu",
             "--workers", "0", "--workdir", str(tmp_path), "--out", str(out)])
    printed = capsys.readouterr().out
    assert printed.startswith("DATA: EMBEDDED shapes data — NOT the papers' data")
    assert "NOT comparable" in printed
    # published numbers printed side by side with the measured ones
    for published in ("0.1232", "0.6766", "0.1076", "0.7267", "90.4%", "57.3%"):
        assert published in printed
    doc = json.loads(out.read_text())
    assert doc["data"]["kind"] == "embedded" and doc["comparable_to_published"] is False
    assert doc["images"] == 16
    rows = {(r["table"], r["method"], r["metric"]): r for r in doc["rows"]}
    for method in ("grad_cam", "rise"):
        for metric in ("deletion_auc", "insertion_auc"):
            row = rows["RISE Table 1", method, metric]
            assert 0.0 <= row["measured"] <= 1.0 and row["comparable"] is False
            assert isinstance(row["published"], float) and row["published_status"]
    point = rows["TorchRay pointing game", "grad_cam", "pointing_accuracy"]
    assert 0.0 <= point["measured"] <= 1.0 and point["comparable"] is False
    assert point["published"]["voc07_all"] == pytest.approx(0.904)
    # the protocol actually run is recorded: top-1 target, the library's steps, RISE's masks
    proto = doc["protocol"]
    assert proto["image_size"] == [32, 32] and proto["rise"]["n_masks"] == 30
    assert proto["curve_points"] >= 2 and "top-1" in proto["target"]


def test_embedded_run_on_an_xaudit_checkpoint_rebuilds_its_data(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    import functools

    import pytorch_lightning as pl

    from xaudit.data.shapes import ShapesDataModule
    from xaudit.models import Classifier
    from xaudit.utils.progress import quiet_lightning

    data = {"_target_": "xaudit.data.ShapesDataModule", "n_train": 64, "n_val": 8, "n_test": 12}
    dm = ShapesDataModule(n_train=64, n_val=8, n_test=12)
    model = Classifier(backbone={"name": "small_cnn", "width": 8}, num_classes=4, image_size=32,
                       optimizer=functools.partial(torch.optim.Adam, lr=1e-3))
    model.xaudit_info = {"data": dm.describe(), "config": {"data": data}}  # what train.py records
    with quiet_lightning():
        trainer = pl.Trainer(max_epochs=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                             enable_model_summary=False, limit_val_batches=0, default_root_dir=str(tmp_path))
        trainer.fit(model, datamodule=dm)
    trainer.save_checkpoint(tmp_path / "last.ckpt")
    doc = pt.main(["--checkpoint", str(tmp_path / "last.ckpt"), "--rise-masks", "10", "--device", "cpu",
                   "--workers", "0"])
    assert capsys.readouterr().out.startswith("DATA: EMBEDDED the checkpoint's data — NOT the papers' data")
    assert doc["images"] == 12 and doc["data"]["data"] == "xaudit.data.ShapesDataModule"
    assert doc["pointing"]["images_scored"] == 12  # shapes carry masks: the pointing game ran


def test_imagenet_folder_with_weights_and_boxes_runs_the_real_data_path(
        imagenet: tuple[Path, Path, Path], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    val, boxes, weights = imagenet
    out = tmp_path / "real.json"
    doc = pt.main(["--imagenet", str(val), "--weights", str(weights), "--boxes", str(boxes), "--arch", "resnet18",
                   "--size", "32", "--rise-masks", "50", "--limit", "4", "--batch-size", "3", "--device", "cpu",
                   "--workers", "0", "--out", str(out)])
    printed = capsys.readouterr()
    assert "DATA: ImageNet validation images" in printed.out
    assert "NOT the case in this run" in printed.out  # resnet18 at 32 px is not the paper's model
    assert "3 class folders but the model has 1000 outputs" in printed.err
    assert json.loads(out.read_text()) == json.loads(json.dumps(doc, default=str))
    assert doc["data"]["kind"] == "imagenet" and doc["images"] == 4 and doc["comparable_to_published"] is False
    assert doc["data"]["preprocess"].startswith("resize to 32×32")
    assert any(d.startswith("--arch resnet18") for d in doc["differences_from_paper"])
    assert any(d.startswith("--rise-masks 50") for d in doc["differences_from_paper"])
    for row in doc["rows"]:
        if row["table"] == "RISE Table 1":
            assert 0.0 <= row["measured"] <= 1.0
    point = next(r for r in doc["rows"] if r["table"] == "TorchRay pointing game")
    assert 0.0 <= point["measured"] <= 1.0 and point["n"] == 4 and "skipped" not in point
    assert doc["pointing"]["boxes_matched_by_class_name"] == 4
    assert doc["protocol"]["grad_cam"]["target_layer"] == "layer4"


def test_imagenet_without_boxes_skips_the_pointing_game_and_says_why(
        imagenet: tuple[Path, Path, Path], capsys: pytest.CaptureFixture[str]) -> None:
    val, _, weights = imagenet
    doc = pt.main(["--imagenet", str(val), "--weights", str(weights), "--arch", "resnet18", "--size", "32",
                   "--resize", "crop", "--rise-masks", "20", "--limit", "2", "--device", "cpu", "--workers", "0"])
    point = next(r for r in doc["rows"] if r["table"] == "TorchRay pointing game")
    assert point["measured"] is None and "--boxes" in point["skipped"]
    assert "skipped: no --boxes given" in capsys.readouterr().out
    assert doc["data"]["preprocess"].startswith("resize shorter side to 37, center crop 32")


def test_boxes_follow_the_image_through_resize_and_crop() -> None:
    from PIL import Image

    # a 64×32 image whose box covers its left half (VOC: 1-based, inclusive)
    mask = pt.box_mask([(1, 1, 32, 32)], (64, 32), (64, 32))
    squashed = torch.from_numpy(np.array(pt.geometry(mask, 16, "squash", pt.InterpolationMode.NEAREST))) > 0
    assert squashed[:, :8].all() and not squashed[:, 8:].any()
    # crop: shorter side 32 → 18 (16·256/224), 36×18, centre 16×16 crop starts at column 10
    cropped = torch.from_numpy(np.array(pt.geometry(mask, 16, "crop", pt.InterpolationMode.NEAREST))) > 0
    image = pt.geometry(Image.new("RGB", (64, 32)), 16, "crop", pt.InterpolationMode.BILINEAR)
    assert image.size == (16, 16) and cropped.shape == (16, 16)
    assert cropped[:, :8].all() and not cropped[:, 8:].any()
    # an XML annotated at another size is rescaled to the image's
    half = pt.box_mask([(1, 1, 16, 16)], (64, 32), (32, 16))
    assert np.array_equal(np.array(half), np.array(mask))


def test_missing_folder_missing_weights_and_wrong_keys_fail_clearly(
        imagenet: tuple[Path, Path, Path], tmp_path: Path) -> None:
    val, _, weights = imagenet
    base = ["--arch", "resnet18", "--size", "32", "--device", "cpu", "--workers", "0"]
    with pytest.raises(FileNotFoundError, match=r"--imagenet .* is not a folder"):
        pt.main(["--imagenet", str(tmp_path / "nowhere"), "--weights", str(weights), *base])
    with pytest.raises(FileNotFoundError, match=r"--weights .* does not exist"):
        pt.main(["--imagenet", str(val), "--weights", str(tmp_path / "none.pth"), *base])
    wrong = tmp_path / "wrong.pth"
    torch.save({"backbone.conv.weight": torch.zeros(1), **torchvision.models.resnet18().state_dict()}, wrong)
    with pytest.raises(ValueError, match=r"does not fit torchvision resnet18: 1 unexpected keys .*backbone\.conv"):
        pt.main(["--imagenet", str(val), "--weights", str(wrong), *base])
    other = tmp_path / "resnet34.pth"
    torch.save({"state_dict": torchvision.models.resnet34().state_dict()}, other)  # nested under "state_dict"
    with pytest.raises(ValueError, match=r"missing keys|unexpected keys"):
        pt.main(["--imagenet", str(val), "--weights", str(other), *base])
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(FileNotFoundError, match="Expected DIR/<synset>"):
        pt.main(["--imagenet", str(empty), "--weights", str(weights), *base])
    with pytest.raises(SystemExit):  # argparse: --imagenet without --weights
        pt.main(["--imagenet", str(val)])


def test_script_reports_errors_without_a_traceback(tmp_path: Path) -> None:
    proc = subprocess.run([sys.executable, str(SCRIPT), "--imagenet", str(tmp_path / "nowhere"),
                           "--weights", str(tmp_path / "w.pth")], capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0
    assert proc.stderr.startswith("error: --weights") and "Traceback" not in proc.stderr


def test_only_the_papers_settings_count_as_comparable() -> None:
    args = pt.parse_args(["--imagenet", "d", "--weights", "w"])
    assert (args.arch, args.resize, args.rise_masks) == ("resnet50", "squash", 4000)
    paper = {"steps": 224, "substrate": "zero"}
    protocol = {"image_size": [224, 224], "deletion": {**paper, "tie_seed": 0}, "insertion": {"steps": 224},
                "paper": {"deletion": paper, "insertion": {"steps": 224}}}
    assert pt.protocol_differences(args, protocol) == []
    protocol["deletion"] = {"steps": 32, "substrate": "zero"}
    assert [d.split(" ")[0] for d in pt.protocol_differences(args, protocol)] == ["deletion"]
    crop = pt.parse_args(["--imagenet", "d", "--weights", "w", "--resize", "crop", "--size", "192"])
    assert len(pt.protocol_differences(crop, {**protocol, "image_size": [192, 192]})) == 3
