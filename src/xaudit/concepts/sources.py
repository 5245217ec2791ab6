"""Concept sets for TCAV: the built-in shapes cue concepts, folders of example images, random sets,
the per-class test images, the interventional cue effect and the default concept layer.

The library half of ``audit=concepts`` (``xaudit.tasks.concepts`` runs it, writes the cells and
the report); :mod:`xaudit.concepts.tcav` learns the CAVs and scores them.
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from xaudit.concepts.tcav import on_model, spatial_layers
from xaudit.data.shapes import ShapesDataModule, generate_shapes
from xaudit.data.tensor_split import TensorSplit
from xaudit.explainers.base import explain_mode
from xaudit.explainers.hooks import resolve_layer
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import positive_int

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".tif", ".tiff", ".webp")


def load_concept_folder(folder: str | Path, name: str, image_size: int, in_chans: int, min_examples: int) -> Tensor:
    """uint8 images [n,C,S,S] of one concept folder (sorted file names, resized to ``image_size``)."""
    from PIL import Image

    path = Path(str(folder)).expanduser()
    if not path.is_dir():
        raise ConfigError(f"concepts.folders.{name}: {path} is not a directory; point it at a folder of example "
                          f"images of the concept ({', '.join(IMAGE_SUFFIXES)}).")
    files = sorted(p for p in path.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if len(files) < min_examples:
        raise ConfigError(f"concepts.folders.{name}: {path} holds {len(files)} images, fewer than "
                          f"concepts.min_examples={min_examples}; a CAV learnt from so few examples is noise. Add "
                          "images, or lower concepts.min_examples.")
    mode = "RGB" if in_chans == 3 else "L"
    out = []
    for f in files:
        with Image.open(f) as im:
            arr = np.asarray(im.convert(mode).resize((image_size, image_size), Image.BILINEAR))
        out.append(torch.from_numpy(arr.copy()).reshape(image_size, image_size, in_chans).permute(2, 0, 1))
    return torch.stack(out)


def concepts_int(value: Any, key: str, minimum: int) -> int:
    """``concepts.<key>`` as an integer ≥ ``minimum`` (a ConfigError naming the key otherwise)."""
    return positive_int(value, f"concepts.{key}", minimum)


Draw = Callable[[int], Tensor]


def shapes_draw_kwargs(cc: Any, datamodule: ShapesDataModule) -> dict[str, Any]:
    """``generate_shapes`` arguments of the built-in concepts: the datamodule's shapes, the chosen cue."""
    return {"num_classes": datamodule.num_classes, "image_size": datamodule.image_size,
            "cue": str(cc.get("cue") or datamodule.cue), "noise": datamodule.noise}


def cue_concept(cue: str, class_name: str) -> str:
    """Name of the built-in concept "this class's cue" (``background:circle``)."""
    return f"{cue}:{class_name}"


def _subsampler(images: Tensor, salt: int) -> Draw:
    """``draw(r)``: a seeded 80 % subset of a fixed set of example images."""
    m = max(2, round(0.8 * len(images)))

    def draw(r: int) -> Tensor:
        return images[torch.randperm(len(images), generator=torch.Generator().manual_seed(salt + r))[:m]]

    return draw


def concept_sources(cc: Any, datamodule: Any, test: TensorSplit) -> tuple[dict[str, Draw], Draw]:
    """Concept example draws by name and the random-set draw: ``draw(r)`` → uint8 images of run r.

    Built-in shapes concepts and random sets are generated afresh for every run (independent
    draws); a folder concept is subsampled (80 % of its images, seeded per run)."""
    n = concepts_int(cc.get("examples", 64), "examples", 2)
    min_examples = concepts_int(cc.get("min_examples", 10), "min_examples", 2)
    seed = int(cc.get("seed", 0))
    c, size = test.image_shape[0], test.image_shape[1]
    sources: dict[str, Draw] = {}
    if isinstance(datamodule, ShapesDataModule):
        kw = shapes_draw_kwargs(cc, datamodule)
        base = 7919 * (seed + 1)
        if cc.get("builtin", True):
            for k, cls in enumerate(datamodule.class_names):
                sources[cue_concept(kw["cue"], cls)] = (lambda r, k=k: generate_shapes(
                    n, seed=base + 10_000 * (k + 1) + r, cue_class=k, **kw).images)

        def random_draw(j: int) -> Tensor:
            return generate_shapes(n, seed=base + 900_000 + j, spurious_p=0.0, **kw).images
    else:
        if len(test) < n:
            raise ConfigError(f"concepts.examples={n} exceeds the {len(test)} test images the random sets are drawn "
                              "from; lower concepts.examples.")

        def random_draw(j: int) -> Tensor:
            g = torch.Generator().manual_seed(seed * 1_000_003 + j)
            return test.images[torch.randperm(len(test), generator=g)[:n]]
    for name, folder in dict(cc.get("folders") or {}).items():
        images = load_concept_folder(folder, str(name), size, c, min_examples)
        sources[str(name)] = _subsampler(images, seed * 1_000_003 + 7_777 * (len(sources) + 1))
    if not sources:
        raise ConfigError("audit=concepts has no concepts: the built-in cue concepts exist only on the shapes data; "
                          "pass concepts.folders={name: /folder/of/examples, ...}.")
    return sources, random_draw


def class_images(test: TensorSplit, classes: list[int], per_class: int) -> dict[int, Tensor]:
    """The first ``per_class`` test images of each class."""
    out = {}
    for k in classes:
        idx = torch.nonzero(test.labels == k).flatten()[:per_class]
        if len(idx) == 0:
            raise ConfigError(f"concepts.classes: class {k} has no test images.")
        out[k] = idx
    return out


def cue_effects(net: nn.Module, cc: Any, datamodule: ShapesDataModule, classes: list[int], per_class: int,
                normalise: Callable[[Tensor], Tensor]) -> dict[tuple[str, int], float]:
    """Interventional effect of each built-in cue concept, beside its TCAV score:
    ``{(concept name, k): nats}``.

    The same shapes are drawn twice, once with uniformly drawn cues and once with class c's cue on
    every image; the effect is the mean change of log p_k over the class-k images. TCAV counts the
    sign of a first-order derivative and so cannot tell a class that lives on the cue (several
    nats) from one whose confidence moves by hundredths; the effect gives that magnitude."""
    n = per_class * datamodule.num_classes
    kw = {**shapes_draw_kwargs(cc, datamodule), "seed": 7919 * (int(cc.get("seed", 0)) + 1) + 500_000}

    def log_p(images: Tensor) -> Tensor:
        with explain_mode(net), torch.no_grad():
            return torch.cat([torch.log_softmax(net(on_model(net, normalise(b))).double(), 1).cpu()
                              for b in images.split(256)])

    plain = generate_shapes(n, spurious_p=0.0, **kw)
    base = log_p(plain.images)
    out = {}
    for c, name in enumerate(datamodule.class_names):
        moved = log_p(generate_shapes(n, cue_class=c, **kw).images)
        for k in classes:
            rows = plain.labels == k
            out[(cue_concept(kw["cue"], name), k)] = float((moved[rows, k] - base[rows, k]).mean())
    return out


def default_concept_layer(net: nn.Module, x: Tensor) -> str:
    """The backbone's default target layer (the one CAM / Grad-CAM explain), or, where its output
    is not a feature map, the last spatial layer the forward pass reaches before it.

    On the GAP → linear heads of the supported backbones nothing but the softmax lies between
    that layer and the class log-probability, so the sign TCAV counts is the sign of what moving
    the activations along the CAV does to the class. One block earlier a nonlinear block sits in
    between, and a clean model's thin classes rise there, to first order, along colour directions
    whose effect on the class is hundredths of a nat (README, "Concept tests")."""
    target = resolve_layer(net, None)
    spatial = spatial_layers(net, x)
    if target in spatial:
        return target
    order = [n for n, _ in net.named_modules()]
    before = [n for n in spatial if order.index(n) < order.index(target)]
    return before[-1] if before else spatial[-1]
