"""Published explanation-quality numbers next to xaudit's, measured with the same protocol.

Two published tables, both for a ResNet-50:

* RISE, Table 1 (Petsiuk, Das & Saenko, "RISE: Randomized Input Sampling for Explanation of
  Black-box Models", BMVC 2018), ImageNet validation images: deletion AUC (lower is better)
  and insertion AUC (higher is better) of Grad-CAM and RISE.
* TorchRay's pointing-game table (facebookresearch/TorchRay, docs/pointing.csv): Grad-CAM on
  PASCAL VOC 2007 test and COCO 2014 val, all images and EBP's "difficult" subset.

Published numbers, as printed next to the measured ones:

    RISE Table 1, ResNet50    Grad-CAM  deletion 0.1232   insertion 0.6766   (unverified)
                              RISE      deletion 0.1076   insertion 0.7267   (unverified; the
                                        insertion 72.67 is corroborated by a secondary listing)
    TorchRay pointing game    Grad-CAM  VOC07 all 90.4%  difficult 82.3%     (read from
                              ResNet-50 COCO14 all 57.3%  difficult 52.3%     docs/pointing.csv)

"Unverified": the RISE paper's table could not be read from this repository's sources; the
values are the maintainers' recollection and must be checked against the paper before being
quoted. The TorchRay values were read from the file itself (commit 6a198ee).

Real data (comparable to RISE's rows):

    python benchmarks/paper_tables.py --imagenet ~/data/imagenet/val \\
        --weights ~/weights/resnet50-0676ba61.pth [--boxes ~/data/imagenet/val_boxes] \\
        [--limit N] [--out results.json]

``--imagenet`` is an ImageFolder of the validation images (one folder per synset; with all
1000 synset folders the sorted folder order is torchvision's class order, else pass
``--synsets LOC_synset_mapping.txt``). ``--weights`` is a torchvision ResNet-50 state dict;
RISE used ``torchvision.models.resnet50(pretrained=True)``, today's ``IMAGENET1K_V1``.
``--boxes`` is a folder of ImageNet's per-image bounding-box XMLs (Pascal VOC format, file
stem = image stem); they become masks through the same resize/crop as the image, and the
pointing game runs on them. TorchRay's published numbers are on VOC07/COCO14 with
multi-label fine-tuned models, so the ImageNet-box pointing game follows TorchRay's protocol
but is *not* the same table: its row is never marked comparable.

Embedded data (no download; NOT comparable to any published number):

    python benchmarks/paper_tables.py                          # trains a small CNN first
    python benchmarks/paper_tables.py --checkpoint last.ckpt   # an xaudit checkpoint instead

Protocol (both modes): each image is explained for the model's top-1 class (RISE explains the
top-1 class) by Grad-CAM (last ResNet block) and RISE (``--rise-masks`` masks, 4000 as in
the paper, 7×7 grid, keep probability 0.5); ``DeletionInsertion`` scores the top-1 class with
the library's default steps, substrates and tie-break (the script never overrides them, so the
benchmark follows the library's protocol; the JSON records what was used). The pointing game
explains the ground-truth class, as TorchRay does, with ``PointingGame``'s default tolerance,
and is averaged over classes (TorchRay) and over images. Images stream through a DataLoader,
so memory is O(batch).

Preprocessing: ``--resize squash`` (default) resizes to size×size as RISE's reference code
does (``transforms.Resize((224, 224))`` in eclique/RISE utils.py); ``--resize crop`` is the
usual resize-shorter-side-to-256 + center-crop-224.
"""

from __future__ import annotations

import argparse
import json
import math
import sys
import time
import xml.etree.ElementTree as ET
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import Tensor, nn
from torch.utils.data import DataLoader, Dataset, Subset
from torchvision.transforms import InterpolationMode
from torchvision.transforms import functional as TF

from xaudit.data.base import auto_num_workers
from xaudit.explainers import create
from xaudit.metrics.localisation import PointingGame
from xaudit.metrics.perturbation import DeletionInsertion

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)
RISE_PAPER = "Petsiuk, Das & Saenko, RISE, BMVC 2018, Table 1 (ImageNet val, ResNet50)"
TORCHRAY = "facebookresearch/TorchRay docs/pointing.csv @6a198ee (Grad-CAM, ResNet-50)"
UNVERIFIED = "unverified: not read from the paper here; check before quoting"


@dataclass(frozen=True)
class Published:
    """One published number and where it comes from."""

    table: str
    method: str
    metric: str
    value: float
    source: str
    status: str


#: RISE Table 1, ResNet50 row block: AUCs in [0, 1]
RISE_TABLE1: tuple[Published, ...] = (
    Published("RISE Table 1", "grad_cam", "deletion", 0.1232, RISE_PAPER, UNVERIFIED),
    Published("RISE Table 1", "grad_cam", "insertion", 0.6766, RISE_PAPER, UNVERIFIED),
    Published("RISE Table 1", "rise", "deletion", 0.1076, RISE_PAPER, UNVERIFIED),
    Published("RISE Table 1", "rise", "insertion", 0.7267, RISE_PAPER,
              f"{UNVERIFIED}; 72.67 (ImageNet val, insertion) is listed for RISE by a secondary "
              "benchmark aggregator"),
)
#: TorchRay pointing game, Grad-CAM / ResNet-50, mean per-class accuracy (fractions of the % in the csv).
#: The csv's two header rows name dataset and model; each pair of columns is (all, difficult),
#: the two subsets TorchRay's PointingGameBenchmark evaluates.
TORCHRAY_POINTING: tuple[Published, ...] = tuple(
    Published("TorchRay pointing game", "grad_cam", subset, value / 100, TORCHRAY, "verified: read from pointing.csv")
    for subset, value in (("voc07_all", 90.4), ("voc07_difficult", 82.3),
                          ("coco14_all", 57.3), ("coco14_difficult", 52.3)))

#: shapes run when no --checkpoint is given: small enough for CI on 2 CPU cores
EMBEDDED_DEFAULTS = {"train_images": 1200, "test_images": 128, "epochs": 4, "width": 16, "size": 32}


# -- models --------------------------------------------------------------------------------------
def build_arch(arch: str) -> nn.Module:
    """A torchvision classifier with random weights (the weights come from --weights)."""
    try:
        return torchvision.models.get_model(arch, weights=None)
    except ValueError as err:
        known = ", ".join(torchvision.models.list_models(module=torchvision.models)[:12])
        raise ValueError(f"--arch {arch!r} is not a torchvision classification model (e.g. {known}, ...).") from err


def load_weights(arch: str, path: str | Path) -> nn.Module:
    """``arch`` with the state dict at ``path`` (plain, or under "state_dict"/"model"), weights-only."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--weights {str(path)!r} does not exist. Pass a torchvision {arch} state dict "
                                "(for RISE's table: ResNet-50 IMAGENET1K_V1, e.g. resnet50-0676ba61.pth).")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:
        raise ValueError(f"--weights {path} is not a weights-only torch file ({err}); save the model's "
                         "state_dict() with torch.save.") from err
    if isinstance(state, dict):
        for key in ("state_dict", "model"):
            if isinstance(state.get(key), dict):
                state = state[key]
                break
    if not isinstance(state, dict) or not all(isinstance(v, Tensor) for v in state.values()):
        raise ValueError(f"--weights {path} holds no state dict of tensors (found {type(state).__name__}).")
    if state and all(k.startswith("module.") for k in state):  # saved from DataParallel/DDP
        state = {k[len("module."):]: v for k, v in state.items()}
    net = build_arch(arch)
    expected = net.state_dict()
    missing = [k for k in expected if k not in state]
    unexpected = [k for k in state if k not in expected]
    shapes = [f"{k} {tuple(state[k].shape)}≠{tuple(v.shape)}" for k, v in expected.items()
              if k in state and state[k].shape != v.shape]
    if missing or unexpected or shapes:
        parts = []
        if missing:
            parts.append(f"{len(missing)} missing keys (e.g. {missing[:3]})")
        if unexpected:
            parts.append(f"{len(unexpected)} unexpected keys (e.g. {unexpected[:3]})")
        if shapes:
            parts.append(f"{len(shapes)} shape mismatches (e.g. {shapes[:3]})")
        raise ValueError(f"--weights {path} does not fit torchvision {arch}: {'; '.join(parts)}. "
                         f"Pass the state dict of a torchvision {arch} (or the matching --arch).")
    net.load_state_dict(state)
    return net.eval()


def default_target_layer(net: nn.Module, arch: str) -> str:
    """Grad-CAM's layer: the last residual stage of a ResNet (RISE and TorchRay use it)."""
    names = dict(net.named_modules())
    if "layer4" in names:
        return "layer4"
    raise ValueError(f"--arch {arch} has no 'layer4'; pass --target-layer (one of its conv blocks).")


# -- ImageNet folder + boxes ---------------------------------------------------------------------
def resize_to(size: int) -> int:
    """The shorter side before the center crop: 256 for a 224 crop."""
    return round(size * 256 / 224)


def geometry(img: Any, size: int, resize: str, interpolation: InterpolationMode) -> Any:
    """The same resize (+ crop) for an image and its box mask."""
    if resize == "squash":
        return TF.resize(img, [size, size], interpolation=interpolation)
    return TF.center_crop(TF.resize(img, resize_to(size), interpolation=interpolation), [size, size])


def read_boxes(xml_path: Path, class_name: str) -> tuple[list[tuple[float, ...]], tuple[int, int] | None, bool]:
    """Boxes (xmin, ymin, xmax, ymax; VOC 1-based inclusive) of ``class_name`` in a VOC XML.

    Returns the boxes, the annotated (width, height) if given, and whether they were matched by
    the object name (else every object's box, for folders whose names are not the XML's).
    """
    try:
        root = ET.parse(xml_path).getroot()
    except ET.ParseError as err:
        raise ValueError(f"--boxes: {xml_path} is not a readable XML file ({err}).") from err
    size = root.find("size")
    wh = None
    if size is not None and size.findtext("width") and size.findtext("height"):
        wh = (int(float(size.findtext("width"))), int(float(size.findtext("height"))))
    named, every = [], []
    for obj in root.iter("object"):
        bb = obj.find("bndbox")
        if bb is None:
            continue
        try:
            box = tuple(float(bb.findtext(k)) for k in ("xmin", "ymin", "xmax", "ymax"))
        except (TypeError, ValueError) as err:
            raise ValueError(f"--boxes: {xml_path} has a <bndbox> without numeric xmin/ymin/xmax/ymax.") from err
        every.append(box)
        if (obj.findtext("name") or "").strip() == class_name:
            named.append(box)
    return (named or every), wh, bool(named)


def box_mask(boxes: list[tuple[float, ...]], image_wh: tuple[int, int], xml_wh: tuple[int, int] | None) -> Any:
    """The boxes drawn on a PIL "L" image of the original size (boxes rescaled if the XML's size differs)."""
    from PIL import Image, ImageDraw

    w, h = image_wh
    sx, sy = (w / xml_wh[0], h / xml_wh[1]) if xml_wh and all(xml_wh) else (1.0, 1.0)
    mask = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(mask)
    for x0, y0, x1, y1 in boxes:
        # VOC pixels are 1-based and inclusive: the box spans [x0-1, x1) in pixel edges; ImageDraw's
        # rectangle includes both corner pixels
        draw.rectangle([round((x0 - 1) * sx), round((y0 - 1) * sy), round(x1 * sx) - 1, round(y1 * sy) - 1],
                       fill=255)
    return mask


def read_synsets(path: str | Path) -> list[str]:
    """Class-index order from a LOC_synset_mapping.txt-style file (first token of each line)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"--synsets {str(path)!r} does not exist.")
    return [line.split()[0] for line in path.read_text().splitlines() if line.strip()]


class ImageNetFolder(Dataset):
    """ImageFolder images preprocessed as RISE, with a box mask per image when ``boxes`` are given."""

    def __init__(self, root: str | Path, size: int, resize: str, boxes: str | Path | None = None,
                 synsets: Sequence[str] | None = None) -> None:
        root = Path(root).expanduser()
        if not root.is_dir():
            raise FileNotFoundError(f"--imagenet {str(root)!r} is not a folder. Pass the ImageNet validation "
                                    "images as an ImageFolder: DIR/<synset>/<image>.JPEG.")
        try:
            self.folder = torchvision.datasets.ImageFolder(str(root))
        except (FileNotFoundError, RuntimeError) as err:
            raise FileNotFoundError(f"--imagenet {root}: {err} Expected DIR/<synset>/<image>.JPEG.") from err
        self.size, self.resize = int(size), resize
        self.mean = torch.tensor(IMAGENET_MEAN).view(3, 1, 1)
        self.std = torch.tensor(IMAGENET_STD).view(3, 1, 1)
        self.labels = list(range(len(self.folder.classes)))
        if synsets is not None:
            index = {s: i for i, s in enumerate(synsets)}
            unknown = [c for c in self.folder.classes if c not in index]
            if unknown:
                raise ValueError(f"--synsets does not list the class folders {unknown[:5]}.")
            self.labels = [index[c] for c in self.folder.classes]
        self.boxes: dict[str, Path] | None = None
        if boxes is not None:
            boxes = Path(boxes).expanduser()
            if not boxes.is_dir():
                raise FileNotFoundError(f"--boxes {str(boxes)!r} is not a folder of per-image VOC XML files.")
            self.boxes = {p.stem: p for p in sorted(boxes.rglob("*.xml"))}
            if not self.boxes:
                raise FileNotFoundError(f"--boxes {boxes} holds no .xml files.")

    def __len__(self) -> int:
        return len(self.folder.samples)

    def __getitem__(self, i: int) -> dict[str, Tensor]:
        path, folder_index = self.folder.samples[i]
        img = self.folder.loader(path)
        x = TF.to_tensor(geometry(img, self.size, self.resize, InterpolationMode.BILINEAR))
        item = {"image": (x - self.mean) / self.std, "label": torch.tensor(self.labels[folder_index])}
        if self.boxes is not None:
            mask = torch.zeros(self.size, self.size, dtype=torch.bool)
            matched = torch.tensor(False)
            xml = self.boxes.get(Path(path).stem)
            if xml is not None:
                boxes, xml_wh, by_name = read_boxes(xml, self.folder.classes[folder_index])
                if boxes:
                    drawn = geometry(box_mask(boxes, img.size, xml_wh), self.size, self.resize,
                                     InterpolationMode.NEAREST)
                    mask = TF.pil_to_tensor(drawn)[0] > 0
                    matched = torch.tensor(by_name)
            item["mask"] = mask
            item["box_by_name"] = matched
        return item


# -- embedded data -------------------------------------------------------------------------------
def embedded_setup(args: argparse.Namespace) -> tuple[nn.Module, Dataset, dict[str, Any]]:
    """The shapes test split and a classifier: trained here for seconds, or read from --checkpoint."""
    from xaudit.data.shapes import ShapesDataModule

    if args.checkpoint:
        from omegaconf import OmegaConf

        from xaudit.models import load_classifier
        from xaudit.utils.config import instantiate

        classifier = load_classifier(args.checkpoint)
        data_cfg = (classifier.xaudit_info.get("config") or {}).get("data")
        if not data_cfg:
            raise ValueError(f"--checkpoint {args.checkpoint} does not record its training data; use a checkpoint "
                             "written by `python train.py`.")
        datamodule = instantiate(OmegaConf.create(data_cfg))
        info = {"model": f"xaudit checkpoint {args.checkpoint}", "data": data_cfg.get("_target_", "?")}
    else:
        import functools

        import pytorch_lightning as pl

        from xaudit.models import Classifier
        from xaudit.utils.progress import quiet_lightning

        d = EMBEDDED_DEFAULTS
        size = args.size or d["size"]
        pl.seed_everything(args.seed, verbose=False)
        datamodule = ShapesDataModule(num_classes=4, image_size=size, n_train=args.train_images,
                                      n_val=16, n_test=args.test_images, batch_size=64, seed=args.seed)
        # the recipe of conf/model/small_cnn.yaml (AdamW + one-cycle), narrower so it trains in seconds
        classifier = Classifier(backbone={"name": "small_cnn", "width": d["width"]}, num_classes=4, image_size=size,
                                optimizer=functools.partial(torch.optim.AdamW, lr=0.004, weight_decay=5e-4),
                                scheduler=functools.partial(torch.optim.lr_scheduler.OneCycleLR, max_lr=0.004,
                                                            pct_start=0.25))
        start = time.perf_counter()
        with quiet_lightning():
            trainer = pl.Trainer(max_epochs=args.epochs, accelerator="gpu" if args.device == "cuda" else "cpu",
                                 devices=1, logger=False, enable_checkpointing=False, enable_progress_bar=False,
                                 enable_model_summary=False, limit_val_batches=0, num_sanity_val_steps=0,
                                 deterministic=False, default_root_dir=str(Path(args.workdir or ".").resolve()))
            trainer.fit(classifier, datamodule=datamodule)
        info = {"model": f"small_cnn (width {d['width']}) trained here: {args.epochs} epochs on "
                         f"{args.train_images} shapes images, {time.perf_counter() - start:.1f} s",
                "data": f"xaudit shapes, {size} px, 4 classes, seed {args.seed}"}
    datamodule.setup("test")
    return classifier.net.eval(), datamodule.test_set, info


# -- the protocol --------------------------------------------------------------------------------
def metric_protocol(metric: Any, size: tuple[int, int], names: Sequence[str]) -> dict[str, Any]:
    """The settings a metric ran with on ``size`` images, from the library (so the JSON follows it)."""
    params = getattr(metric, "protocol_params", None)
    if callable(params):
        return dict(params(size))
    out = {}
    for name in names:
        if hasattr(metric, name):
            value = getattr(metric, name)
            out[name] = value if isinstance(value, (int, float, str, bool, type(None))) else repr(value)
    return out


def paper_protocol(metric: Any, size: tuple[int, int]) -> dict[str, Any] | None:
    """The paper's settings scaled to ``size``, when the library states them (None otherwise)."""
    params = getattr(metric, "paper_params", None)
    return dict(params(size)) if callable(params) else None


def class_mean(values: Tensor, labels: Tensor) -> float:
    """Mean over classes of the per-class mean of the defined values (TorchRay's pointing accuracy)."""
    ok = ~torch.isnan(values)
    per_class = [float(values[ok & (labels == c)].mean()) for c in labels[ok].unique().tolist()]
    return sum(per_class) / len(per_class) if per_class else float("nan")


def run_protocol(net: nn.Module, loader: DataLoader, *, rise_masks: int, target_layer: str | None,
                 internal_batch_size: int | None, pointing: bool, total: int) -> dict[str, Any]:
    """Grad-CAM and RISE on every image: deletion/insertion on top-1, pointing on the label."""
    first = next(net.parameters())
    device, dtype = first.device, first.dtype
    ibs = {} if internal_batch_size is None else {"internal_batch_size": internal_batch_size}
    layer = {} if target_layer is None else {"target_layer": target_layer}
    explainers = {"grad_cam": create("grad_cam", net, **layer),
                  "rise": create("rise", net, n_masks=rise_masks, p=0.5, **ibs)}
    metrics = {(m, mode): DeletionInsertion(net, mode=mode, **ibs)
               for m in explainers for mode in ("deletion", "insertion")}
    pg = PointingGame() if pointing else None
    correct = seen = 0
    labels: list[Tensor] = []
    by_name: int | None = None  # images whose boxes were found by the synset's name (ImageNet boxes only)
    start = last = time.perf_counter()
    for batch in loader:
        x = batch["image"].to(device=device, dtype=dtype)
        y = batch["label"].to(device)
        with torch.no_grad():
            top1 = net(x).argmax(1)
        correct += int((top1 == y).sum())
        seen += x.shape[0]
        for name, explainer in explainers.items():
            attr = explainer.attribute(x, top1)
            for mode in ("deletion", "insertion"):
                metrics[name, mode].update(x, attr, top1)
        if pg is not None:
            pg.update(explainers["grad_cam"].attribute(x, y), batch["mask"].to(device))
            labels.append(batch["label"])
            if "box_by_name" in batch:
                by_name = (by_name or 0) + int(batch["box_by_name"].sum())
        now = time.perf_counter()
        if now - last > 30 or seen == total:
            eta = (now - start) / seen * (total - seen)
            print(f"  {seen}/{total} images, {now - start:.0f} s (ETA {eta:.0f} s)", file=sys.stderr, flush=True)
            last = now
    h, w = x.shape[-2:]
    rise = explainers["rise"]
    out: dict[str, Any] = {
        "images": seen,
        "top1_accuracy": correct / max(seen, 1),
        "seconds": time.perf_counter() - start,
        "values": {f"{m}/{mode}": float(metric.compute()) for (m, mode), metric in metrics.items()},
        "protocol": {
            "target": "top-1 predicted class (deletion/insertion and the explained map); "
                      "ground-truth label for the pointing game",
            "image_size": [int(h), int(w)],
            "grad_cam": {"target_layer": explainers["grad_cam"].target_layer, "relu": explainers["grad_cam"].relu},
            "rise": {"n_masks": rise.n_masks, "cell_size": rise.cell_size or math.ceil(max(h, w) / 7),
                     "p": rise.p, "score": rise.score, "seed": rise.seed},
            "deletion": metric_protocol(metrics["grad_cam", "deletion"], (h, w), METRIC_ATTRS),
            "insertion": metric_protocol(metrics["grad_cam", "insertion"], (h, w), METRIC_ATTRS),
            "paper": {mode: paper_protocol(metrics["grad_cam", mode], (h, w)) for mode in ("deletion", "insertion")},
            "curve_points": int(metrics["grad_cam", "deletion"].curves().shape[1]),
        },
    }
    if pg is not None:
        values = pg.per_sample().cpu()
        lab = torch.cat(labels)
        out["pointing"] = {"class_mean": class_mean(values, lab), "image_mean": float(pg.compute()),
                           "images_scored": int((~torch.isnan(values)).sum()),
                           "images_without_box": int(torch.isnan(values).sum())}
        if by_name is not None:
            out["pointing"]["boxes_matched_by_class_name"] = by_name
        out["protocol"]["pointing_game"] = metric_protocol(pg, (h, w), ("tolerance",))
        out["protocol"]["paper"]["pointing_game"] = paper_protocol(pg, (h, w))
    return out


#: settings of DeletionInsertion worth recording, whichever of them the library version has
METRIC_ATTRS = ("mode", "steps", "substrate", "blur_sigma", "tie_seed", "output")


def protocol_differences(args: argparse.Namespace, protocol: dict[str, Any]) -> list[str]:
    """Where a real-data run departs from RISE's Table 1 protocol (empty: comparable)."""
    out = []
    if args.arch != "resnet50":
        out.append(f"--arch {args.arch} (paper: resnet50)")
    if protocol["image_size"] != [224, 224]:
        out.append(f"{protocol['image_size'][0]} px images (paper: 224)")
    if args.resize != "squash":
        out.append("--resize crop (RISE's code: resize to 224×224)")
    if args.rise_masks != 4000:
        out.append(f"--rise-masks {args.rise_masks} (paper: 4000)")
    for mode in ("deletion", "insertion"):
        paper = (protocol.get("paper") or {}).get(mode)
        used = protocol[mode]
        if paper and any(used.get(k) != v for k, v in paper.items()):
            out.append(f"{mode} metric settings {used} differ from the paper's {paper}")
    return out


# -- report --------------------------------------------------------------------------------------
def build_rows(result: dict[str, Any], comparable: bool, pointing_skipped: str | None) -> list[dict[str, Any]]:
    """Measured next to published, one row per (table, method, metric)."""
    rows = []
    for pub in RISE_TABLE1:
        rows.append({"table": pub.table, "method": pub.method, "metric": f"{pub.metric}_auc",
                     "higher_is_better": pub.metric == "insertion",
                     "measured": result["values"][f"{pub.method}/{pub.metric}"], "n": result["images"],
                     "published": pub.value, "published_source": pub.source, "published_status": pub.status,
                     "comparable": comparable})
    row: dict[str, Any] = {"table": "TorchRay pointing game", "method": "grad_cam", "metric": "pointing_accuracy",
                           "higher_is_better": True,
                           "published": {p.metric: p.value for p in TORCHRAY_POINTING},
                           "published_source": TORCHRAY, "published_status": TORCHRAY_POINTING[0].status,
                           # TorchRay's numbers are on VOC07/COCO14 with multi-label models: never the same table
                           "comparable": False}
    if "pointing" in result:
        p = result["pointing"]
        row.update(measured=p["class_mean"], measured_image_mean=p["image_mean"], n=p["images_scored"])
    else:
        row.update(measured=None, skipped=pointing_skipped)
    rows.append(row)
    return rows


def format_report(rows: list[dict[str, Any]], header: list[str]) -> str:
    """The printed table: measured and published side by side."""
    lines = [*header, "", f"{'table':<24} {'method':<9} {'metric':<21} {'measured':>9} {'published':>10}  status"]
    for r in rows:
        arrow = "↑" if r["higher_is_better"] else "↓"
        metric = f"{r['metric']} {arrow}"
        if r["table"].startswith("TorchRay"):
            pub = r["published"]
            measured = "skipped" if r["measured"] is None else f"{100 * r['measured']:.1f}%"
            lines.append(f"{r['table']:<24} {r['method']:<9} {metric:<21} {measured:>9} "
                         f"{'see below':>10}  {r['published_status']}")
            lines.append(f"{'':<24} published (ResNet-50): VOC07 all {100 * pub['voc07_all']:.1f}% / difficult "
                         f"{100 * pub['voc07_difficult']:.1f}%; COCO14 all {100 * pub['coco14_all']:.1f}% / "
                         f"difficult {100 * pub['coco14_difficult']:.1f}%")
            if r["measured"] is None:
                lines.append(f"{'':<24} skipped: {r['skipped']}")
            else:
                lines.append(f"{'':<24} measured = mean over classes (TorchRay's aggregate); over images "
                             f"{100 * r['measured_image_mean']:.1f}%, {r['n']} images with a box. Different data "
                             "from TorchRay's table: NOT comparable.")
        else:
            lines.append(f"{r['table']:<24} {r['method']:<9} {metric:<21} {r['measured']:>9.4f} "
                         f"{r['published']:>10.4f}  {r['published_status'].split(';')[0]}")
    return "\n".join(lines)


# -- command line --------------------------------------------------------------------------------
def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    real = p.add_argument_group("real data (RISE Table 1 / pointing game)")
    real.add_argument("--imagenet", metavar="DIR", help="ImageNet validation ImageFolder (DIR/<synset>/*.JPEG)")
    real.add_argument("--weights", metavar="FILE", help="torchvision state dict of --arch (ResNet-50 IMAGENET1K_V1)")
    real.add_argument("--boxes", metavar="DIR", help="per-image VOC-format bounding-box XMLs (stem = image stem)")
    real.add_argument("--synsets", metavar="FILE", help="class-index order (LOC_synset_mapping.txt) when DIR "
                      "does not hold all 1000 synset folders")
    real.add_argument("--arch", default="resnet50", help="torchvision model of --weights (default resnet50)")
    real.add_argument("--resize", choices=("squash", "crop"), default="squash",
                      help="squash: resize to size×size as RISE's code; crop: shorter side size·256/224 + center crop")
    emb = p.add_argument_group("embedded data (no download; not comparable)")
    emb.add_argument("--checkpoint", metavar="FILE", help="an xaudit checkpoint instead of training a small CNN")
    emb.add_argument("--train-images", type=int, default=EMBEDDED_DEFAULTS["train_images"])
    emb.add_argument("--test-images", type=int, default=EMBEDDED_DEFAULTS["test_images"])
    emb.add_argument("--epochs", type=int, default=EMBEDDED_DEFAULTS["epochs"])
    emb.add_argument("--seed", type=int, default=0)
    emb.add_argument("--workdir", help="where Lightning may write (default: the current directory)")
    p.add_argument("--size", type=int, help="image side: 224 for ImageNet (the crop), 32 for the shapes")
    p.add_argument("--limit", type=int, help="evaluate the first N images (default: all)")
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--workers", default="auto", help="DataLoader workers (default: auto)")
    p.add_argument("--device", choices=("cpu", "cuda"), default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--rise-masks", type=int, default=4000, help="RISE masks per image (paper: 4000)")
    p.add_argument("--target-layer", help="Grad-CAM layer (default: layer4 of a ResNet)")
    p.add_argument("--internal-batch-size", type=int, help="perturbed images per forward (default: the library's)")
    p.add_argument("--out", metavar="FILE", help="write the results and the protocol used as JSON")
    args = p.parse_args(argv)
    if bool(args.imagenet) != bool(args.weights):
        p.error("--imagenet and --weights go together (real data needs both); give neither for the embedded run.")
    if args.imagenet and args.checkpoint:
        p.error("--checkpoint is for the embedded run; with --imagenet pass --weights.")
    if args.boxes and not args.imagenet:
        p.error("--boxes needs --imagenet.")
    for key in ("limit", "batch_size", "rise_masks", "size", "train_images", "test_images", "epochs"):
        value = getattr(args, key)
        if value is not None and value < 1:
            p.error(f"--{key.replace('_', '-')} must be ≥1; got {value}.")
    return args


def main(argv: Sequence[str] | None = None) -> dict[str, Any]:
    """Run the protocol, print measured vs published, write --out; returns the JSON document."""
    args = parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device here; use --device cpu.")
    real = bool(args.imagenet)
    pointing_skipped = None
    if real:
        size = args.size or 224
        net = load_weights(args.arch, args.weights)
        target_layer = args.target_layer or default_target_layer(net, args.arch)
        synsets = read_synsets(args.synsets) if args.synsets else None
        dataset: Dataset = ImageNetFolder(args.imagenet, size, args.resize, args.boxes, synsets)
        classes = len(dataset.folder.classes)
        outputs = net.fc.out_features if isinstance(getattr(net, "fc", None), nn.Linear) else None
        if synsets is None and outputs is not None and classes != outputs:
            print(f"warning: {classes} class folders but the model has {outputs} outputs: the labels (sorted folder "
                  "index) are ImageNet's class indices only with all 1000 synset folders; top-1 accuracy and the "
                  "pointing game's class are then wrong. Pass --synsets LOC_synset_mapping.txt.", file=sys.stderr)
        if not args.boxes:
            pointing_skipped = "no --boxes given: ImageNet images carry no object masks without the box XMLs"
        preprocess = (f"resize to {size}×{size}" if args.resize == "squash"
                      else f"resize shorter side to {resize_to(size)}, center crop {size}") + ", ImageNet mean/std"
        data_info = {"kind": "imagenet", "folder": str(Path(args.imagenet).expanduser()), "classes": classes,
                     "weights": str(Path(args.weights).expanduser()), "arch": args.arch, "preprocess": preprocess,
                     "boxes": args.boxes}
    else:
        net, dataset, info = embedded_setup(args)
        target_layer = args.target_layer
        if not hasattr(dataset, "masks") or getattr(dataset, "masks", None) is None:
            pointing_skipped = "the checkpoint's data has no object masks"
        data_info = {"kind": "embedded", **info}
    net = net.to(args.device).eval()
    for prm in net.parameters():
        prm.requires_grad_(False)
    total = len(dataset) if args.limit is None else min(args.limit, len(dataset))
    if total < len(dataset):
        dataset = Subset(dataset, range(total))
    workers = auto_num_workers() if args.workers == "auto" else int(args.workers)
    loader = DataLoader(dataset, batch_size=args.batch_size, shuffle=False, num_workers=workers,
                        pin_memory=args.device == "cuda")
    print(f"paper_tables: {total} images, {args.rise_masks} RISE masks, device {args.device}", file=sys.stderr)
    result = run_protocol(net, loader, rise_masks=args.rise_masks, target_layer=target_layer,
                          internal_batch_size=args.internal_batch_size, pointing=pointing_skipped is None,
                          total=total)
    differences = protocol_differences(args, result["protocol"]) if real else ["embedded data"]
    comparable = not differences
    rows = build_rows(result, comparable, pointing_skipped)
    if real:
        header = [f"DATA: ImageNet validation images from {data_info['folder']} ({result['images']} images), "
                  f"{args.arch} weights {data_info['weights']}; top-1 accuracy {100 * result['top1_accuracy']:.1f}%.",
                  "RISE Table 1 rows: comparable with torchvision's ResNet-50 IMAGENET1K_V1 weights and RISE's protocol"
                  + (" (this run follows it)." if comparable else
                     f" — NOT the case in this run: {'; '.join(differences)}.")]
    else:
        kind = "the checkpoint's" if args.checkpoint else "shapes"
        header = [f"DATA: EMBEDDED {kind} data — NOT the papers' data (ImageNet / VOC / COCO).",
                  "The published columns are printed for reference only; these measurements are NOT comparable.",
                  f"model: {data_info['model']}; data: {data_info['data']}; "
                  f"top-1 accuracy {100 * result['top1_accuracy']:.1f}% on {result['images']} images."]
    proto = result["protocol"]
    header.append(f"protocol: {proto['image_size'][0]}×{proto['image_size'][1]} px; deletion {proto['deletion']}; "
                  f"insertion {proto['insertion']}; {proto['curve_points']} curve points; RISE {proto['rise']}; "
                  f"Grad-CAM {proto['grad_cam']}"
                  + (f"; pointing game {proto['pointing_game']}" if "pointing_game" in proto else ""))
    print(format_report(rows, header))
    doc = {"data": data_info, "comparable_to_published": comparable, "differences_from_paper": differences,
           "note": ("ImageNet run: RISE Table 1 rows follow the paper's protocol; the pointing game on ImageNet boxes "
                    "is not TorchRay's VOC07/COCO14 table" if real else
                    "EMBEDDED data: not the papers' data, NOT comparable to the published numbers"),
           "images": result["images"], "top1_accuracy": result["top1_accuracy"], "seconds": result["seconds"],
           "device": args.device, "protocol": proto, "pointing": result.get("pointing"), "rows": rows,
           "published": [asdict(p) for p in (*RISE_TABLE1, *TORCHRAY_POINTING)]}
    if args.out:
        out = Path(args.out).expanduser()
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(doc, indent=2, default=str))
        print(f"wrote {out}", file=sys.stderr)
    return doc


if __name__ == "__main__":
    try:
        main()
    except (FileNotFoundError, ValueError) as err:
        raise SystemExit(f"error: {err}") from None
