"""Backbone factory: torchvision classifiers and a small CNN, adapted to the data.

Every backbone maps [B,C,H,W] images to [B,num_classes] logits. ``cifar_stem`` swaps the
ImageNet stem (7x7 stride-2 conv + max-pool) for a 3x3 stride-1 conv so 32 px inputs keep
spatial detail; ``cifar_stem="auto"`` (the configs' default) turns it on for images up to
``CIFAR_STEM_MAX_SIZE`` px and leaves the ImageNet stem at 224. Built models carry ``default_target_layer`` (the last spatial feature layer,
what CAM-style explainers use unless told otherwise) and ``backbone_name``.
"""

from __future__ import annotations

from collections import OrderedDict
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
import torchvision
from torch import nn

from xaudit.utils.errors import ConfigError, check_options, unknown_choice


class SmallCNN(nn.Module):
    """Five conv-BN-ReLU blocks, two max-pools, then global average pool → linear.

    The GAP→linear head makes it a CAM model (Zhou et al., 2016). ``width`` sets the first
    block's channels; later blocks double it twice.
    """

    def __init__(self, num_classes: int, in_chans: int = 3, width: int = 32) -> None:
        super().__init__()
        w = int(width)

        def block(cin: int, cout: int) -> nn.Sequential:
            return nn.Sequential(nn.Conv2d(cin, cout, 3, padding=1, bias=False), nn.BatchNorm2d(cout),
                                 nn.ReLU(inplace=True))

        self.features = nn.Sequential(OrderedDict([
            ("block1", block(in_chans, w)),
            ("block2", block(w, w)),
            ("pool1", nn.MaxPool2d(2)),
            ("block3", block(w, 2 * w)),
            ("block4", block(2 * w, 2 * w)),
            ("pool2", nn.MaxPool2d(2)),
            ("block5", block(2 * w, 4 * w)),
        ]))
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(4 * w, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc(torch.flatten(self.avgpool(self.features(x)), 1))


# name -> (torchvision builder or None, default target layer, total stride, stride with cifar_stem)
_SPECS: dict[str, tuple[Callable[..., nn.Module] | None, str, int, int]] = {
    "small_cnn": (None, "features.block5", 4, 4),
    "senn": (None, "concepts", 4, 4),
    "resnet18": (torchvision.models.resnet18, "layer4", 32, 8),
    "resnet34": (torchvision.models.resnet34, "layer4", 32, 8),
    "resnet50": (torchvision.models.resnet50, "layer4", 32, 8),
    "vgg11_bn": (torchvision.models.vgg11_bn, "features.27", 32, 32),
    "vgg16": (torchvision.models.vgg16, "features.29", 32, 32),
    "densenet121": (torchvision.models.densenet121, "features.norm5", 32, 8),
    "mobilenet_v3_small": (torchvision.models.mobilenet_v3_small, "features.12", 32, 16),
}
BACKBONES: tuple[str, ...] = tuple(_SPECS)
#: ``cifar_stem="auto"`` uses the small-image stem up to this side (CIFAR, shapes, 64 px crops)
CIFAR_STEM_MAX_SIZE = 64


def resolve_cifar_stem(cifar_stem: bool | str, image_size: int | None) -> bool:
    """``true``/``false`` as given; ``"auto"``: on for images ≤ 64 px, off for larger or unknown sizes.

    The ImageNet stem down-samples by 4 before the first block, which leaves a 32 px image 8x8;
    at 224 px that down-sampling is what keeps the network affordable.
    """
    if isinstance(cifar_stem, bool):
        return cifar_stem
    if str(cifar_stem).lower() == "auto":
        return image_size is not None and int(image_size) <= CIFAR_STEM_MAX_SIZE
    raise ConfigError(f"model.backbone.cifar_stem={cifar_stem!r}: use true, false or auto "
                      f"(auto: on for images ≤ {CIFAR_STEM_MAX_SIZE} px).")


def min_image_size(name: str, cifar_stem: bool = False) -> int:
    """Smallest input side a backbone accepts (its total down-sampling factor)."""
    _check_name(name)
    return _SPECS[name][3 if cifar_stem else 2]


def _check_name(name: str) -> None:
    if name not in _SPECS:
        raise unknown_choice("backbone", name, BACKBONES, key="model.backbone.name")


def build_backbone(
    name: str,
    num_classes: int,
    in_chans: int = 3,
    image_size: int | None = None,
    cifar_stem: bool | str = False,
    pretrained: bool = False,
    weights: str = "DEFAULT",
    weights_path: str | None = None,
    width: int = 32,
    **options: Any,
) -> nn.Module:
    """Build backbone ``name`` with a ``num_classes`` head for ``in_chans``-channel images.

    ``pretrained`` loads torchvision ImageNet weights (``weights`` = enum name or "DEFAULT");
    ``weights_path`` loads a local state dict instead (no network needed). Layers whose shapes
    changed (head, adapted stem) keep their fresh initialisation. ``options`` are the extra
    hyper-parameters of the project's own backbones (``senn``: ``num_concepts``, ``robustness``).
    ``cifar_stem`` is true, false or "auto" (:func:`resolve_cifar_stem`).
    """
    _check_name(name)
    cifar_stem = resolve_cifar_stem(cifar_stem, image_size)
    if int(num_classes) < 2:
        raise ConfigError(f"num_classes={num_classes} must be ≥2.")
    if image_size is not None and int(image_size) < min_image_size(name, cifar_stem):
        need = min_image_size(name, cifar_stem)
        hint = ("" if cifar_stem or name in ("small_cnn", "senn", "vgg11_bn", "vgg16")
                else f" or set model.backbone.cifar_stem=true (then ≥{min_image_size(name, True)} px)")
        raise ConfigError(
            f"data.image_size={image_size} is too small for {name}: it down-samples by {need}, so "
            f"inputs need ≥{need} px. Use a larger data.image_size{hint}, or a smaller backbone (small_cnn)."
        )
    builder, target_layer, _, _ = _SPECS[name]
    if builder is None:
        local = _local_builders()[name]
        check_options(f"backbone {name!r}", local, options, skip=("self", "num_classes", "in_chans", "width"))
        model: nn.Module = local(num_classes, in_chans=in_chans, width=width, **options)
    else:
        if options:
            raise ConfigError(f"model.backbone options {sorted(options)} are not options of {name}; they belong "
                              "to the project's own backbones (senn: num_concepts, robustness).")
        state = _pretrained_state(name, weights) if pretrained and not weights_path else None
        model = builder(weights=None)
        if state is not None:
            model.load_state_dict(state)
        _adapt(name, model, num_classes, in_chans, cifar_stem, pretrained=state is not None)
    if weights_path:
        load_matching_weights(model, weights_path)
    model.default_target_layer = target_layer
    model.backbone_name = name
    return model


def _local_builders() -> dict[str, Callable[..., nn.Module]]:
    from xaudit.models.senn import SENN

    return {"small_cnn": SmallCNN, "senn": SENN}


def _pretrained_state(name: str, weights: str) -> dict[str, torch.Tensor]:
    try:
        enum = torchvision.models.get_model_weights(name)
        w = enum.DEFAULT if weights in (None, "DEFAULT", True) else enum[str(weights)]
    except KeyError as err:
        choices = [m.name for m in torchvision.models.get_model_weights(name)]
        raise ConfigError(f"Unknown weights {weights!r} for {name}; choices: DEFAULT, {', '.join(choices)}.") from err
    try:
        return w.get_state_dict(progress=False)
    except Exception as err:  # URLError, OSError, hash mismatch: all mean "could not get the file"
        raise RuntimeError(
            f"Could not download the pretrained {name} weights {w} from {w.url} ({type(err).__name__}: {err}). "
            "No network here? Download that file on a machine with internet and pass "
            "model.backbone.weights_path=/path/to/file.pth (pretrained=false is implied)."
        ) from err


def load_matching_weights(model: nn.Module, path: str | Path) -> list[str]:
    """Load a local state dict (``weights_only``), skipping tensors whose shape differs.

    Returns the skipped keys (e.g. a 1000-class head when fine-tuning on fewer classes).
    """
    path = Path(path).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone.weights_path={str(path)!r} does not exist.")
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"No tensor in {path} matches the backbone's parameters (wrong architecture?).")
    model.load_state_dict(usable, strict=False)
    return sorted(set(own) - set(usable))


def _conv_like(old: nn.Conv2d, in_chans: int, kernel: int | None = None, stride: int | None = None,
               keep_weights: bool = False) -> nn.Conv2d:
    """A conv like ``old`` with another input-channel count/kernel/stride.

    With ``keep_weights`` and only the channel count changed, pretrained filters are averaged over
    input channels (the usual trick for grayscale inputs).
    """
    k = kernel or old.kernel_size[0]
    new = nn.Conv2d(in_chans, old.out_channels, k, stride=stride or old.stride[0], padding=k // 2,
                    bias=old.bias is not None)
    if keep_weights and k == old.kernel_size[0]:
        with torch.no_grad():
            new.weight.copy_(old.weight.mean(1, keepdim=True).expand_as(new.weight))
    return new


def _adapt(name: str, model: Any, num_classes: int, in_chans: int, cifar_stem: bool, pretrained: bool) -> None:
    """Replace head (and stem when asked) in place."""
    stem_kw: dict[str, Any] = {"kernel": 3, "stride": 1} if cifar_stem else {}
    change_stem = cifar_stem or in_chans != 3
    if name.startswith("resnet"):
        if change_stem:
            model.conv1 = _conv_like(model.conv1, in_chans, keep_weights=pretrained, **stem_kw)
        if cifar_stem:
            model.maxpool = nn.Identity()
        model.fc = nn.Linear(model.fc.in_features, num_classes)
    elif name.startswith("vgg"):
        if in_chans != 3:
            model.features[0] = _conv_like(model.features[0], in_chans, keep_weights=pretrained)
        if cifar_stem:  # the CIFAR VGG head: GAP → linear instead of 7x7 → 4096 → 4096
            model.avgpool = nn.AdaptiveAvgPool2d(1)
            model.classifier = nn.Linear(model.classifier[0].in_features // 49, num_classes)
        else:
            model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
    elif name.startswith("densenet"):
        if change_stem:
            model.features.conv0 = _conv_like(model.features.conv0, in_chans, keep_weights=pretrained, **stem_kw)
        if cifar_stem:
            model.features.pool0 = nn.Identity()
        model.classifier = nn.Linear(model.classifier.in_features, num_classes)
    elif name.startswith("mobilenet"):
        if change_stem:
            model.features[0][0] = _conv_like(model.features[0][0], in_chans, keep_weights=pretrained, **stem_kw)
        model.classifier[-1] = nn.Linear(model.classifier[-1].in_features, num_classes)
