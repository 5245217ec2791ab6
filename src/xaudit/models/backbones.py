"""Backbone factory: torchvision classifiers, a small CNN and vision transformers, adapted to the data.

Every backbone maps [B,C,H,W] images to [B,num_classes] logits. ``cifar_stem`` swaps the
ImageNet stem (7x7 stride-2 conv + max-pool) for a 3x3 stride-1 conv so 32 px inputs keep
spatial detail; ``cifar_stem="auto"`` (the configs' default) turns it on for images up to
``CIFAR_STEM_MAX_SIZE`` px and leaves the ImageNet stem at 224. Built models carry ``default_target_layer``
(the last spatial feature layer, what CAM-style explainers use unless told otherwise) and ``backbone_name``.

Vision transformers (``TRANSFORMER_BACKBONES``: timm ``vit_tiny``/``deit_small``, torchvision
``vit_b_16``/``swin_t``) cut the image into ``patch_size`` patches, so the image side must be a
multiple of it. Their target layer is the last block's first norm; its output is not an NCHW map:
``feature_layout`` says ``"tokens"`` ([B, prefix+H*W, C], ``num_prefix_tokens`` class tokens first)
or ``"nhwc"`` (Swin), and ``patch_grid`` is the (H, W) of the last stage. Pretrained or local weights
saved at another image (or patch) size are resized to fit (absolute position embeddings, patch kernels).
"""

from __future__ import annotations

import math
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

    Args:
        num_classes: outputs of the linear head (logits).
        in_chans: input image channels.
        width: channels of the first block (later blocks: 2× and 4×).
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

# name -> (timm model / torchvision builder name, default patch size, pretrained image size, feature layout).
# The default target layer is the last block's first norm (pytorch-grad-cam's ViT/Swin choice).
_TRANSFORMERS: dict[str, tuple[str | None, int, int, str]] = {
    "vit_tiny": (None, 4, 32, "tokens"),  # timm VisionTransformer sized for 32 px data, no pretrained weights
    "deit_small": ("deit_small_patch16_224", 16, 224, "tokens"),
    "vit_b_16": ("vit_b_16", 16, 224, "tokens"),
    "swin_t": ("swin_t", 4, 224, "nhwc"),
}
TRANSFORMER_BACKBONES: tuple[str, ...] = tuple(_TRANSFORMERS)
#: Swin merges 2x2 patches three times after the patch embedding
_SWIN_MERGES = 3
#: state-dict keys of the absolute position embeddings / patch-embedding kernels (timm, torchvision)
_POS_EMBED_KEYS = ("pos_embed", "encoder.pos_embedding")
_PATCH_KERNEL_KEYS = ("patch_embed.proj.weight", "conv_proj.weight", "features.0.0.weight")
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
    """Smallest input side a backbone accepts (its total down-sampling factor; transformers: the
    default patch size, times 8 for Swin's patch merging)."""
    _check_name(name)
    if name in _TRANSFORMERS:
        patch = _TRANSFORMERS[name][1]
        return patch * 2 ** _SWIN_MERGES if name == "swin_t" else patch
    return _SPECS[name][3 if cifar_stem else 2]


def _check_name(name: str) -> None:
    if name not in _SPECS and name not in _TRANSFORMERS:
        raise unknown_choice("backbone", name, BACKBONES + TRANSFORMER_BACKBONES, key="model.backbone.name")


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
    Transformers (:data:`TRANSFORMER_BACKBONES`) take ``patch_size`` and ``drop_path_rate``
    options (``vit_tiny`` also ``depth``, ``num_heads``, ``mlp_ratio``, ``global_pool`` = token | avg;
    its ``width`` is the embedding dimension); see :func:`_build_transformer`.
    """
    _check_name(name)
    if name in _TRANSFORMERS:
        return _build_transformer(name, int(num_classes), int(in_chans), image_size, cifar_stem, pretrained,
                                  weights, weights_path, width, options)
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
    return _load_matching(model, _read_state(path), path)


def _read_state(path: Path) -> dict[str, torch.Tensor]:
    if not path.is_file():
        raise FileNotFoundError(f"model.backbone.weights_path={str(path)!r} does not exist.")
    if path.suffix == ".safetensors":  # how timm/Hugging Face checkpoints usually come
        from safetensors.torch import load_file

        return load_file(str(path))
    state: Any = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and "state_dict" in state:
        state = state["state_dict"]
    return state


def _load_matching(model: nn.Module, state: dict[str, torch.Tensor], source: object) -> list[str]:
    own = model.state_dict()
    usable = {k: v for k, v in state.items() if k in own and own[k].shape == v.shape}
    if not usable:
        raise ConfigError(f"No tensor in {source} matches the backbone's parameters (wrong architecture?).")
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


def _build_transformer(name: str, num_classes: int, in_chans: int, image_size: int | None, cifar_stem: bool | str,
                       pretrained: bool, weights: str, weights_path: str | None, width: int,
                       options: dict[str, Any]) -> nn.Module:
    """Build a vision transformer for ``image_size`` px (default: the pretrained size; vit_tiny: 32)."""
    source, default_patch, native_size, layout = _TRANSFORMERS[name]
    allowed = ("patch_size", "drop_path_rate") + (("depth", "num_heads", "mlp_ratio", "global_pool")
                                                  if name == "vit_tiny" else ())
    for key in options:
        if key not in allowed:
            raise unknown_choice(f"option for backbone {name!r}:", key, allowed)
    resolve_cifar_stem(cifar_stem, image_size)  # refuses values other than true/false/auto
    if cifar_stem is True:
        raise ConfigError(f"model.backbone.cifar_stem=true has no meaning for {name} (a vision transformer has no "
                          "conv stem); for small images set a smaller model.backbone.patch_size instead.")
    size = int(image_size) if image_size is not None else native_size
    patch = int(options.get("patch_size", default_patch))
    _check_patch_size(name, size, patch)
    drop_path = float(options.get("drop_path_rate", 0.2 if name == "swin_t" else 0.0))  # torchvision's swin_t: 0.2
    state: dict[str, torch.Tensor] | None = None
    model: Any
    if name == "vit_tiny":
        if pretrained and not weights_path:
            raise ConfigError("vit_tiny has no pretrained weights; set model.backbone.pretrained=false or give "
                              "model.backbone.weights_path=/path/to/a/vit_tiny/state_dict.pth.")
        from timm.models.vision_transformer import VisionTransformer

        depth, heads = int(options.get("depth", 4)), int(options.get("num_heads", 4))
        pool = str(options.get("global_pool", "token"))
        if pool not in ("token", "avg"):
            raise unknown_choice("global_pool", pool, ("token", "avg"), key="model.backbone.global_pool")
        if int(width) % heads:
            raise ConfigError(f"model.backbone.width={width} (vit_tiny's embedding dimension) must be a multiple of "
                              f"model.backbone.num_heads={heads}; "
                              f"e.g. width={max(heads, int(width) // heads * heads)}.")
        model = VisionTransformer(img_size=size, patch_size=patch, in_chans=in_chans, num_classes=num_classes,
                                  embed_dim=int(width), depth=depth, num_heads=heads,
                                  mlp_ratio=float(options.get("mlp_ratio", 2.0)), class_token=True,
                                  global_pool=pool, drop_path_rate=drop_path)
    elif name == "deit_small":
        import timm

        use_hub = pretrained and not weights_path
        tag = "" if weights in (None, "DEFAULT", True) else f".{weights}"
        try:
            model = timm.create_model(f"{source}{tag}", pretrained=use_hub, img_size=size, patch_size=patch,
                                      in_chans=in_chans, num_classes=num_classes, drop_path_rate=drop_path)
        except RuntimeError as err:
            if not use_hub or "Unknown model" in str(err) or "Invalid pretrained tag" in str(err):
                raise ConfigError(f"Unknown weights {weights!r} for {name}: use DEFAULT or a timm pretrained tag "
                                  f"of {source} (timm.list_pretrained('{source}*')). ({err})") from err
            raise _download_error(name, f"timm {source}{tag}", err) from err
        except Exception as err:  # hub/network errors: all mean "could not get the file"
            if not use_hub:
                raise
            raise _download_error(name, f"timm {source}{tag}", err) from err
    elif name == "vit_b_16":
        from torchvision.models.vision_transformer import VisionTransformer as TvViT

        model = TvViT(image_size=size, patch_size=patch, num_layers=12, num_heads=12, hidden_dim=768, mlp_dim=3072,
                      num_classes=num_classes)
        if in_chans != 3:
            model.conv_proj = _patch_conv_like(model.conv_proj, in_chans)
        state = _pretrained_state(name, weights) if pretrained and not weights_path else None
    else:  # swin_t
        from torchvision.models.swin_transformer import SwinTransformer

        model = SwinTransformer(patch_size=[patch, patch], embed_dim=96, depths=[2, 2, 6, 2], num_heads=[3, 6, 12, 24],
                                window_size=[7, 7], stochastic_depth_prob=drop_path, num_classes=num_classes)
        if in_chans != 3:
            model.features[0][0] = _patch_conv_like(model.features[0][0], in_chans)
        state = _pretrained_state(name, weights) if pretrained and not weights_path else None

    if layout == "nhwc":
        last = len(model.features) - 1
        model.default_target_layer = f"features.{last}.{len(model.features[last]) - 1}.norm1"
        merged = size // patch // 2 ** _SWIN_MERGES
        model.patch_grid = (merged, merged)
        model.num_prefix_tokens = 0
    elif name == "vit_b_16":
        model.default_target_layer = f"encoder.layers.encoder_layer_{len(model.encoder.layers) - 1}.ln_1"
        model.patch_grid = (size // patch, size // patch)
        model.num_prefix_tokens = 1
    else:
        model.default_target_layer = f"blocks.{len(model.blocks) - 1}.norm1"
        model.patch_grid = tuple(model.patch_embed.grid_size)
        model.num_prefix_tokens = int(model.num_prefix_tokens)
    model.feature_layout = layout
    model.backbone_name = name
    if weights_path:
        path = Path(weights_path).expanduser()
        _load_matching(model, fit_transformer_state(model, _read_state(path)), path)
    elif state is not None:
        _load_matching(model, fit_transformer_state(model, state), f"the pretrained {name} weights")
    return model


def _check_patch_size(name: str, size: int, patch: int) -> None:
    if patch < 1:
        raise ConfigError(f"model.backbone.patch_size={patch} must be ≥1.")
    # Swin halves the patch grid three times; require exact halvings so the last stage covers the image
    unit = patch * 2 ** _SWIN_MERGES if name == "swin_t" else patch
    if size % unit == 0:
        return
    divisors = [d for d in (2, 4, 8, 14, 16, 32) if size % (d * (unit // patch)) == 0 and d <= size]
    lower, upper = size // unit * unit, (size // unit + 1) * unit
    sizes = f"{lower} or {upper}" if lower else f"{upper}"
    if name == "swin_t":
        what = (f"swin_t needs a multiple of patch_size*{2 ** _SWIN_MERGES}={unit} px (the patch grid is halved "
                f"{_SWIN_MERGES} times)")
    else:
        what = f"{name} cuts the image into {patch}x{patch} patches, so the side must be a multiple of {patch}"
    fix = f"model.backbone.patch_size={' or '.join(map(str, divisors))}, or " if divisors else ""
    raise ConfigError(f"data.image_size={size} does not fit model.backbone.patch_size={patch}: {what}. "
                      f"Use {fix}data.image_size={sizes}.")


def _patch_conv_like(old: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    """The patch-embedding conv ``old`` for ``in_chans`` input channels (same kernel = stride, no padding)."""
    return nn.Conv2d(in_chans, old.out_channels, old.kernel_size, stride=old.stride, padding=old.padding,
                     bias=old.bias is not None)


def fit_transformer_state(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Resize a transformer state dict saved at another image/patch size or channel count to ``model``.

    Absolute position embeddings are resampled (bicubic) to the model's patch grid, keeping the class
    token; patch-embedding kernels are resampled to the model's patch size (timm's pseudo-inverse
    resize) and averaged over input channels when the channel count differs. Other mismatched
    tensors (the head) are left for :func:`_load_matching` to skip.
    """
    from timm.layers import resample_abs_pos_embed, resample_patch_embed

    own = model.state_dict()
    state = dict(state)
    for key in _POS_EMBED_KEYS:
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        prefix = int(getattr(model, "num_prefix_tokens", 1))
        old_n = state[key].shape[1] - prefix
        side = math.isqrt(old_n)
        if side * side != old_n or state[key].shape[-1] != own[key].shape[-1]:
            raise ConfigError(f"Cannot resize {key} of shape {tuple(state[key].shape)} to {tuple(own[key].shape)}: "
                              "the file's patch grid is not square or its width differs (wrong architecture?).")
        state[key] = resample_abs_pos_embed(state[key], new_size=list(model.patch_grid), old_size=[side, side],
                                            num_prefix_tokens=prefix)
    for key in _PATCH_KERNEL_KEYS:
        if key not in state or key not in own or state[key].shape == own[key].shape:
            continue
        w, target = state[key], own[key]
        if w.ndim != 4 or w.shape[0] != target.shape[0]:
            continue
        if w.shape[1] != target.shape[1]:
            w = w.mean(1, keepdim=True).expand(-1, target.shape[1], -1, -1).contiguous()
        if w.shape[-2:] != target.shape[-2:]:
            w = resample_patch_embed(w, list(target.shape[-2:]))
        state[key] = w
    return state


def _download_error(name: str, what: str, err: Exception) -> RuntimeError:
    return RuntimeError(
        f"Could not download the pretrained {name} weights ({what}; {type(err).__name__}: {err}). "
        "No network here? Download that file on a machine with internet and pass "
        "model.backbone.weights_path=/path/to/file (.pth or .safetensors; pretrained=false is implied)."
    )
