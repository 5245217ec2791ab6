"""Datasets with ground-truth masks: ImageFolder + mask PNGs or COCO boxes, Pascal VOC, Oxford-IIIT Pet,
CUB-200-2011 on tiny trees in their real on-disk layouts; masks stay on their object through the
resize / crop / flip, bad trees are refused by name, and `train` + `audit` (evaluate) report the
localisation metrics on the ImageFolder-with-masks and the VOC trees."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from xaudit.data.cub import CUBDataModule
from xaudit.data.imagefolder import ImageFolderDataModule
from xaudit.data.masked import FileDataModule
from xaudit.data.pet import OxfordPetDataModule
from xaudit.data.voc import VOC_CLASSES, VOCDataModule
from xaudit.tasks.audit import audit
from xaudit.tasks.train import train
from xaudit.utils.errors import ConfigError, DataNotFoundError

from xaudit_testing import QUIET, compose_config

SIZES = [(24, 20), (20, 30), (32, 24)]  # (W, H): every image its own size and aspect


def square_image(w: int, h: int, box: tuple[int, int, int, int], seed: int) -> tuple[np.ndarray, np.ndarray]:
    """A dark noisy RGB image [H,W,3] with a white rectangle box=(x0, y0, x1, y1), and its mask [H,W]."""
    rng = np.random.default_rng(seed)
    img = rng.integers(0, 30, (h, w, 3), dtype=np.uint8)
    mask = np.zeros((h, w), dtype=bool)
    x0, y0, x1, y1 = box
    img[y0:y1, x0:x1] = 255
    mask[y0:y1, x0:x1] = True
    return img, mask


def box_of(w: int, h: int, i: int) -> tuple[int, int, int, int]:
    """An off-centre box (so a flip moves it) that survives the centre crop."""
    x0, y0 = w // 4 + i % 2, h // 3
    return x0, y0, x0 + max(4, w // 3), y0 + max(4, h // 3)


def write_masked_folder(root: Path, classes: tuple[str, ...] = ("cat", "dog"), per_class: int = 3,
                        splits: tuple[str, ...] = ("train", "val")) -> Path:
    """``root/<split>/<class>/<i>.png`` + ``root/masks/<split>/<class>/<i>.png`` (instance ids 0/1/2) and
    COCO boxes ``root/boxes_<split>.json``."""
    for split in splits:
        coco: dict[str, list] = {"images": [], "annotations": [], "categories": [{"id": 1, "name": "object"}]}
        for c in classes:
            (root / split / c).mkdir(parents=True, exist_ok=True)
            (root / "masks" / split / c).mkdir(parents=True, exist_ok=True)
            for i in range(per_class):
                w, h = SIZES[i % len(SIZES)]
                box = box_of(w, h, i)
                img, mask = square_image(w, h, box, seed=i)
                Image.fromarray(img).save(root / split / c / f"{i}.png")
                Image.fromarray(mask.astype(np.uint8) * (1 + i % 2)).save(root / "masks" / split / c / f"{i}.png")
                image_id = len(coco["images"]) + 1
                coco["images"].append({"id": image_id, "file_name": f"{c}/{i}.png", "width": w, "height": h})
                coco["annotations"].append({"id": image_id, "image_id": image_id, "category_id": 1,
                                            "bbox": [box[0], box[1], box[2] - box[0], box[3] - box[1]]})
        (root / f"boxes_{split}.json").write_text(json.dumps(coco))
    return root


def aligned(dm: FileDataModule, item: dict) -> None:
    """The mask covers the white pixels and none of the dark ones (the border band may go either way)."""
    img = dm.denormalize(item["image"][None])[0].mean(0)
    mask = item["mask"]
    assert mask.dtype == torch.bool and mask.shape == img.shape == (dm.image_size, dm.image_size)
    white, dark = img > 0.9, img < 0.15
    assert white.any() and bool(mask[white].all()), "every white pixel is in the mask"
    assert not bool(mask[dark].any()), "no dark pixel is in the mask"


# -- ImageFolder with masks --------------------------------------------------------------------------
@pytest.mark.parametrize("source", ["masks_dir", "boxes"])
def test_imagefolder_masks_follow_resize_crop_and_flip(tmp_path: Path, source: str) -> None:
    write_masked_folder(tmp_path)
    option = {"masks_dir": "masks"} if source == "masks_dir" else {"boxes": "boxes_{split}.json"}
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16, batch_size=4, **option)
    assert dm.has_masks and dm.describe()["has_masks"]
    dm.setup()
    for i in range(len(dm.val_set)):
        aligned(dm, dm.val_set[i])
    torch.manual_seed(0)
    flips = set()
    for _ in range(6):  # training items flip at random: the mask flips with its image
        item = dm.train_set[1]
        aligned(dm, item)
        flips.add(bool(item["mask"][:, :8].sum() > item["mask"][:, 8:].sum()))
    assert flips == {True, False}, "both orientations were drawn"
    batch = next(iter(dm.train_dataloader()))
    assert batch["mask"].shape == (4, 16, 16) and batch["mask"].dtype == torch.bool


def test_imagefolder_without_masks_is_unchanged(tmp_path: Path) -> None:
    write_masked_folder(tmp_path)
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16)
    dm.setup("test")
    assert not dm.has_masks and "mask" not in dm.test_set[0] and dm.test_set[0]["image"].shape == (3, 16, 16)


def test_imagefolder_mask_errors_name_the_files(tmp_path: Path) -> None:
    write_masked_folder(tmp_path)
    with pytest.raises(DataNotFoundError, match=r"data.masks_dir='nowhere'"):
        ImageFolderDataModule(data_dir=str(tmp_path), masks_dir="nowhere")
    with pytest.raises(ConfigError, match="not both"):
        ImageFolderDataModule(data_dir=str(tmp_path), masks_dir="masks", boxes="boxes_{split}.json")
    dm = ImageFolderDataModule(data_dir=str(tmp_path), image_size=16, masks_dir="masks")
    # a mask of another size than its image: both files and both sizes named
    bad = tmp_path / "masks" / "train" / "cat" / "0.png"
    Image.fromarray(np.zeros((7, 9), dtype=np.uint8)).save(bad)
    ds = dm.dataset("train", train=False)
    with pytest.raises(ConfigError, match=r"0\.png is 9x7 .* is 24x20"):
        ds[0]
    # an image without a mask: the missing path and the expected pattern
    bad.unlink()
    with pytest.raises(DataNotFoundError, match=r"1 of 6 images .*<class>/<image stem>\.png.*cat/0\.png"):
        dm.dataset("train", train=False)
    # a mask without an image
    Image.fromarray(np.zeros((20, 24), dtype=np.uint8)).save(bad)
    Image.fromarray(np.zeros((20, 24), dtype=np.uint8)).save(tmp_path / "masks" / "train" / "dog" / "9.png")
    with pytest.raises(ConfigError, match=r"belong to no image.*dog/9\.png"):
        dm.dataset("train", train=False)
    # boxes: an image the JSON does not list
    coco = json.loads((tmp_path / "boxes_val.json").read_text())
    coco["images"] = coco["images"][1:]
    (tmp_path / "boxes_val.json").write_text(json.dumps(coco))
    boxed = ImageFolderDataModule(data_dir=str(tmp_path), boxes="boxes_{split}.json")
    with pytest.raises(DataNotFoundError, match=r"not in .*boxes_val\.json.*cat/0\.png"):
        boxed.dataset("val", train=False)


# -- Pascal VOC --------------------------------------------------------------------------------------
def write_voc(root: Path, year: str = "2007", per_split: int = 4) -> Path:
    """VOCdevkit/VOC<year>: JPEGImages, Annotations (a big box of one class, a small one of another),
    ImageSets/{Main,Segmentation}/{train,val,test}.txt and palette SegmentationClass PNGs."""
    base = root / "VOCdevkit" / f"VOC{year}"
    for d in ("JPEGImages", "Annotations", "ImageSets/Main", "ImageSets/Segmentation", "SegmentationClass"):
        (base / d).mkdir(parents=True, exist_ok=True)
    n = 0
    for split in ("train", "val", "test"):
        ids = []
        for k in range(per_split):
            image_id = f"{2007 if year == '2007' else 2012}_{n:06d}"
            n, big, small = n + 1, (7 + 4 * k) % 20, (8 + 4 * k) % 20
            w, h = SIZES[k % len(SIZES)]
            box = box_of(w, h, k)
            img, _ = square_image(w, h, box, seed=n)
            Image.fromarray(img).save(base / "JPEGImages" / f"{image_id}.jpg", quality=95)
            sbox = (0, 0, 2, 2)  # a small object of another class in the corner
            objs = "".join(
                f"<object><name>{VOC_CLASSES[c]}</name><difficult>0</difficult><bndbox><xmin>{b[0] + 1}</xmin>"
                f"<ymin>{b[1] + 1}</ymin><xmax>{b[2]}</xmax><ymax>{b[3]}</ymax></bndbox></object>"
                for c, b in ((small, sbox), (big, box)))
            (base / "Annotations" / f"{image_id}.xml").write_text(
                f"<annotation><filename>{image_id}.jpg</filename><size><width>{w}</width><height>{h}</height>"
                f"<depth>3</depth></size>{objs}</annotation>")
            seg = np.zeros((h, w), dtype=np.uint8)
            seg[box[1]:box[3], box[0]:box[2]] = big + 1
            seg[box[1] - 1, box[0]:box[2]] = 255  # the "void" outline VOC draws round objects
            seg[sbox[1]:sbox[3], sbox[0]:sbox[2]] = small + 1
            pal = Image.fromarray(seg, mode="P")
            pal.putpalette([v for i in range(256) for v in (i, i, i)])
            pal.save(base / "SegmentationClass" / f"{image_id}.png")
            ids.append(image_id)
        for sets in ("Main", "Segmentation"):
            (base / "ImageSets" / sets / f"{split}.txt").write_text("\n".join(ids) + "\n")
    return root


@pytest.mark.parametrize("masks", ["boxes", "segmentation"])
def test_voc_labels_the_largest_object_and_masks_its_class(tmp_path: Path, masks: str) -> None:
    write_voc(tmp_path)
    dm = VOCDataModule(data_dir=str(tmp_path), year="2007", masks=masks, image_size=16)
    assert dm.num_classes == 20 and dm.has_masks
    dm.setup()
    assert len(dm.train_set) == len(dm.val_set) == len(dm.test_set) == 4
    assert [y for _, y in dm.test_set.samples] == [(7 + 4 * k) % 20 for k in range(4)], "the big box's class"
    for i in range(4):
        item = dm.test_set[i]
        aligned(dm, item)  # the small box of the other class is not in the mask
    with pytest.raises(ConfigError, match=r"data.label"):
        VOCDataModule(data_dir=str(tmp_path), label="all")


def test_voc_missing_layout_is_named(tmp_path: Path) -> None:
    with pytest.raises(DataNotFoundError, match=r"VOCdevkit/VOC2012.*Annotations/<id>\.xml.*data.year"):
        VOCDataModule(data_dir=str(tmp_path), year="2012")


# -- Oxford-IIIT Pet and CUB -------------------------------------------------------------------------
def write_pet(root: Path) -> Path:
    """oxford-iiit-pet/images, annotations/{trainval,test}.txt and trimaps (1 pet, 2 bg, 3 boundary)."""
    base = root / "oxford-iiit-pet"
    (base / "images").mkdir(parents=True)
    (base / "annotations" / "trimaps").mkdir(parents=True)
    lines: dict[str, list[str]] = {"trainval": [], "test": []}
    for n in range(8):
        breed, label = [("Abyssinian", 1), ("beagle", 2)][n % 2]
        image_id = f"{breed}_{n}"
        w, h = SIZES[n % len(SIZES)]
        box = box_of(w, h, n)
        img, mask = square_image(w, h, box, seed=n)
        Image.fromarray(img).save(base / "images" / f"{image_id}.jpg", quality=95)
        tri = np.where(mask, 1, 2).astype(np.uint8)
        tri[box[1]:box[3], box[2] - 1] = 3  # the boundary band: right edge column
        Image.fromarray(tri).save(base / "annotations" / "trimaps" / f"{image_id}.png")
        lines["test" if n >= 6 else "trainval"].append(f"{image_id} {label} {1 + (breed == 'beagle')} 1")
    for split, rows in lines.items():
        (base / "annotations" / f"{split}.txt").write_text("\n".join(rows) + "\n")
    return root


def write_cub(root: Path) -> Path:
    """CUB_200_2011/{images.txt, image_class_labels.txt, train_test_split.txt, bounding_boxes.txt, classes.txt,
    images/<class>/<file>.jpg}."""
    base = root / "CUB_200_2011"
    rows: dict[str, list[str]] = {f: [] for f in ("images.txt", "image_class_labels.txt", "train_test_split.txt",
                                                  "bounding_boxes.txt")}
    classes = ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    for n in range(1, 9):
        c = classes[n % 2]
        (base / "images" / c).mkdir(parents=True, exist_ok=True)
        w, h = SIZES[n % len(SIZES)]
        box = box_of(w, h, n)
        img, _ = square_image(w, h, box, seed=n)
        Image.fromarray(img).save(base / "images" / c / f"bird_{n}.jpg", quality=95)
        rows["images.txt"].append(f"{n} {c}/bird_{n}.jpg")
        rows["image_class_labels.txt"].append(f"{n} {1 + n % 2}")
        rows["train_test_split.txt"].append(f"{n} {int(n <= 6)}")
        rows["bounding_boxes.txt"].append(f"{n} {box[0]}.0 {box[1]}.0 {box[2] - box[0]}.0 {box[3] - box[1]}.0")
    for f, lines in rows.items():
        (base / f).write_text("\n".join(lines) + "\n")
    (base / "classes.txt").write_text("".join(f"{i + 1} {c}\n" for i, c in enumerate(classes)))
    return root


def test_pet_trimap_and_cub_box_masks_line_up(tmp_path: Path) -> None:
    pet = OxfordPetDataModule(data_dir=str(write_pet(tmp_path / "pet")), image_size=16, val_size=2)
    assert pet.num_classes == 2 and pet.class_names == ["Abyssinian", "Beagle"]
    pet.setup()
    assert (len(pet.train_set), len(pet.val_set), len(pet.test_set)) == (4, 2, 2)
    assert not {p for p, _ in pet.train_set.samples} & {p for p, _ in pet.val_set.samples}
    for ds in (pet.train_set, pet.test_set):
        for i in range(len(ds)):
            item = ds[i]
            img = pet.denormalize(item["image"][None])[0].mean(0)
            assert not bool(item["mask"][img < 0.15].any())  # the pet pixels only, the boundary column left out
    with_band = OxfordPetDataModule(data_dir=str(tmp_path / "pet"), image_size=16, val_size=2, boundary=True)
    with_band.setup("test")
    aligned(with_band, with_band.test_set[0])
    assert with_band.test_set[0]["mask"].sum() >= pet.test_set[0]["mask"].sum()

    cub = CUBDataModule(data_dir=str(write_cub(tmp_path / "cub")), image_size=16, val_size=0.2)
    assert cub.num_classes == 2 and cub.class_names == ["001.Black_footed_Albatross", "002.Laysan_Albatross"]
    cub.setup()
    assert (len(cub.train_set), len(cub.val_set), len(cub.test_set)) == (5, 1, 2)
    for i in range(2):
        aligned(cub, cub.test_set[i])
    with pytest.raises(DataNotFoundError, match=r"CUB_200_2011.*images\.txt"):
        CUBDataModule(data_dir=str(tmp_path / "nothing"))
    with pytest.raises(DataNotFoundError, match=r"oxford-iiit-pet"):
        OxfordPetDataModule(data_dir=str(tmp_path / "nothing"))


# -- acceptance: train, then audit (evaluate) reports the localisation metrics ----------------------
TRAIN = ["++model.backbone.width=8", "data.image_size=16", "data.num_workers=0", "data.batch_size=8",
         "trainer.max_epochs=1", "trainer.enable_progress_bar=false", "trainer.enable_model_summary=false",
         "logger=csv", "callbacks=model_checkpoint", "test=false"]
EVALUATE = ["audit=evaluate", "explainer=[saliency]", "controls=[random]", "evaluate.metrics=localisation",
            "batch_size=8"]


@pytest.mark.parametrize("data", ["imagefolder", "voc"])
def test_train_then_audit_reports_pointing_game_and_mass_in_mask(tmp_path: Path, data: str) -> None:
    if data == "imagefolder":
        write_masked_folder(tmp_path / "data" / "imagefolder", per_class=4)
        extra = ["data.masks_dir=masks"]
    else:
        write_voc(tmp_path / "data" / "voc")
        extra = []
    extra.append(f"data.data_dir={tmp_path / 'data' / data}")
    result = train(compose_config([f"data={data}", *TRAIN, *extra], tmp_path / "train"))
    ckpt = result["last_ckpt_path"]
    assert Path(ckpt).is_file()
    out = tmp_path / "audit"
    audit(compose_config([*QUIET, f"ckpt_path={ckpt}", f"out_dir={out}", *EVALUATE], tmp_path / "a",
                         config_name="audit"))
    rows = [json.loads(line) for line in (out / "evaluate" / "results.jsonl").read_text().splitlines() if line]
    cell = next(r for r in rows if r["method"] == "saliency")
    assert cell["count"] == (8 if data == "imagefolder" else 4)
    for metric in ("pointing_game", "mass_in_mask"):
        assert 0.0 <= cell["metrics"][metric] <= 1.0, metric
