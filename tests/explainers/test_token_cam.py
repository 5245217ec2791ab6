"""CAM methods on transformer layers (issue 27): tokens / channels-last grids reshaped to [B,C,h,w].

Parity against pytorch-grad-cam with the reshape transforms of its documentation
(``usage_examples/vit_example.py`` and ``swinT_example.py``), on tiny random-weight models.
"""

from __future__ import annotations

import copy
from collections.abc import Callable

import pytest
import torch
from pytorch_grad_cam import GradCAM, GradCAMPlusPlus, ScoreCAM
from pytorch_grad_cam.utils.model_targets import ClassifierOutputTarget
from timm.models.deit import VisionTransformerDistilled
from timm.models.swin_transformer import SwinTransformer as TimmSwin
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from xaudit.explainers import create
from xaudit.explainers.tokens import feature_map_layout
from xaudit.utils.errors import ConfigError

from explainer_helpers import images

TARGET = torch.tensor([0, 3])
REFERENCES = {"grad_cam": GradCAM, "grad_cam_pp": GradCAMPlusPlus, "score_cam": ScoreCAM}


def vit_reshape(prefix: int, height: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """vit_example.py's reshape_transform (drops the class token; ``prefix`` generalises the 1 for DeiT)."""
    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor[:, prefix:, :].reshape(tensor.size(0), height, width, tensor.size(2))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape_transform


def swin_reshape(height: int, width: int) -> Callable[[torch.Tensor], torch.Tensor]:
    """swinT_example.py's reshape_transform (on a [B,H,W,C] block output the reshape is a no-op)."""
    def reshape_transform(tensor: torch.Tensor) -> torch.Tensor:
        result = tensor.reshape(tensor.size(0), height, width, tensor.size(-1))
        return result.transpose(2, 3).transpose(1, 2)
    return reshape_transform


def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    """Seeded eval-mode model whose classifier has unit-scale weights: torchvision's ViT head is
    zero-initialised (constant logits, zero gradients) and timm's 0.02-std heads give maps with a
    raw spread near float32 rounding."""
    torch.manual_seed(0)
    model = build().eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.normal_()
        head.bias.normal_()
    return model


def timm_vit() -> nn.Module:
    return _seeded(lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                             num_classes=4))


def timm_deit() -> nn.Module:  # class + distillation token
    return _seeded(lambda: VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                                      num_classes=4))


def torchvision_vit() -> nn.Module:
    return _seeded(lambda: TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32,
                                          mlp_dim=64, num_classes=4))


def torchvision_swin() -> nn.Module:
    return _seeded(lambda: SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2],
                                           window_size=[4, 4], num_classes=4))


def timm_swin() -> nn.Module:
    return _seeded(lambda: TimmSwin(img_size=32, patch_size=4, embed_dim=24, depths=(2, 2), num_heads=(2, 2),
                                    window_size=4, num_classes=4))


# model, target layer, its reference reshape transform, input size. The documented targets are the
# last block's norm1 (a class-token head ignores the patch tokens of the last block's *output*,
# whose gradient is then zero), and for CNN-like pooling heads (Swin) any block output.
MODELS: dict[str, tuple[Callable[[], nn.Module], str, Callable[[torch.Tensor], torch.Tensor], int]] = {
    "timm_vit": (timm_vit, "blocks.1.norm1", vit_reshape(1, 4, 4), 32),
    "timm_vit_block": (timm_vit, "blocks.0", vit_reshape(1, 4, 4), 32),
    "timm_deit": (timm_deit, "blocks.1.norm1", vit_reshape(2, 4, 4), 32),
    "torchvision_vit": (torchvision_vit, "encoder.layers.encoder_layer_1.ln_1", vit_reshape(1, 4, 4), 32),
    "torchvision_swin": (torchvision_swin, "features.3.1.norm1", swin_reshape(8, 8), 64),
    "torchvision_swin_block": (torchvision_swin, "features.3", swin_reshape(8, 8), 64),
    "timm_swin": (timm_swin, "layers.1.blocks.1.norm1", swin_reshape(4, 4), 32),
}


def _reference_cam(kind: str, model: nn.Module, layer: str, rt: Callable, x: torch.Tensor) -> torch.Tensor:
    ref_model = copy.deepcopy(model)  # pytorch-grad-cam calls model.eval() and hooks the model
    cam = REFERENCES[kind](ref_model, target_layers=[ref_model.get_submodule(layer)], reshape_transform=rt)
    if kind == "score_cam":
        cam.batch_size = 64
    out = cam(x, [ClassifierOutputTarget(int(t)) for t in TARGET])
    cam.activations_and_grads.release()
    return torch.from_numpy(out)


def _eps_bound(spread: float) -> float:
    """As in test_cam.py: |ours − pytorch-grad-cam| for a normalised map of that raw spread."""
    return 2 * (1e-6 + 1e-7 * (1 + spread) / spread)


CASES = [(kind, m) for kind in sorted(REFERENCES) for m in MODELS]


@pytest.mark.parametrize(("kind", "name"), CASES)
def test_token_cam_matches_pytorch_grad_cam(kind: str, name: str) -> None:
    build, layer, rt, size = MODELS[name]
    model = build()
    x = images(2, size=size, seed=5)
    ref = _reference_cam(kind, model, layer, rt, x)
    ours = create(kind, model, target_layer=layer, normalize=True).attribute(x, TARGET)
    raw = create(kind, model, target_layer=layer).attribute(x, TARGET)
    assert ours.shape == ref.shape == (2, size, size)
    spread = raw.flatten(1).amax(1) - raw.flatten(1).amin(1)
    assert (spread > 1e-4).all(), "a flat map would make the comparison vacuous"
    # Tolerance per image as for the CNNs (test_cam.py): pytorch-grad-cam min-max scales before and
    # after cv2.resize, we once after upsampling; bilinear resizing is affine-equivariant, so the maps
    # differ only by the eps terms (~1e-7·(1+spread)/spread) plus float32 rounding (~1e-6), doubled.
    # Score-CAM adds the float32 rounding of the masked inputs' logits, which its softmax weights pass
    # on: measured ≤5e-6 against a float64 run on these models (the float64 maps agree with the
    # float64 reference to 2e-6, the eps terms), so 1e-5 more there.
    extra = 1e-5 if kind == "score_cam" else 0.0
    for i in range(2):
        torch.testing.assert_close(ours[i], ref[i], rtol=0, atol=_eps_bound(float(spread[i])) + extra)


@pytest.mark.parametrize(("name", "expect"), [
    ("timm_vit", ("tokens", 1, (4, 4))), ("timm_deit", ("tokens", 2, (4, 4))),
    ("torchvision_vit", ("tokens", 1, (4, 4))), ("torchvision_swin", ("channels_last", 0, None)),
    ("timm_swin", ("channels_last", 0, None))])
def test_auto_layout_is_read_from_the_model(name: str, expect: tuple) -> None:
    build, layer, _, size = MODELS[name]
    model = build()
    seen = {}
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: seen.update(shape=o.shape))
    with torch.no_grad():
        model(images(1, size=size))
    handle.remove()
    lay = feature_map_layout(model, layer, seen["shape"], (size, size))
    assert (lay.mode, lay.prefix, lay.grid) == expect


def test_explicit_options_equal_auto_and_override_it() -> None:
    model = timm_deit()
    x = images(2, seed=1)
    auto = create("grad_cam", model, target_layer="blocks.0").attribute(x, TARGET)
    explicit = create("grad_cam", model, target_layer="blocks.0", reshape="tokens", prefix_tokens=2,
                      grid=[4, 4]).attribute(x, TARGET)
    torch.testing.assert_close(auto, explicit, rtol=0, atol=0)
    # a different prefix is honoured: 18 − 1 = 17 tokens form no grid, so this is refused
    with pytest.raises(ConfigError, match=r"18 tokens.*minus 1 prefix tokens that is 17 patch tokens.*prefix_tokens="):
        create("grad_cam", model, target_layer="blocks.0", prefix_tokens=1).attribute(x, TARGET)


def test_non_square_input_gets_a_matching_grid() -> None:
    """torchvision's ViT takes only its image size; timm's ViT with dynamic_img_size takes 32×64."""
    model = _seeded(lambda: VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                              num_classes=4, dynamic_img_size=True))
    x = torch.randn(2, 3, 32, 64, generator=torch.Generator().manual_seed(0))
    ref = _reference_cam("grad_cam", model, "blocks.1.norm1", vit_reshape(1, 4, 8), x)
    ours = create("grad_cam", model, target_layer="blocks.1.norm1", normalize=True).attribute(x, TARGET)
    raw = create("grad_cam", model, target_layer="blocks.1.norm1").attribute(x, TARGET)
    spread = raw.flatten(1).amax(1) - raw.flatten(1).amin(1)
    for i in range(2):
        torch.testing.assert_close(ours[i], ref[i], rtol=0, atol=_eps_bound(float(spread[i])))


def test_tokens_that_form_no_grid_are_a_clear_error() -> None:
    model = timm_vit()
    x = images(1)
    with pytest.raises(ConfigError, match=r"'blocks\.0' outputs 17 tokens.*16 patch tokens.*grid=\[3, 3\]"):
        create("grad_cam", model, target_layer="blocks.0", grid=[3, 3]).attribute(x, 0)
    with pytest.raises(ConfigError, match=r"17 patch tokens.*not a square.*prefix_tokens=.*grid="):
        create("grad_cam", model, target_layer="blocks.0", prefix_tokens=0).attribute(x, 0)


def test_layer_that_is_neither_tokens_nor_a_feature_map_is_a_clear_error() -> None:
    model = timm_vit()
    with pytest.raises(ConfigError, match=r"'head' outputs shape \(1, 4\).*target_layer=.*reshape="):
        create("grad_cam", model, target_layer="head").attribute(images(1), 0)
    with pytest.raises(ConfigError,
                       match=r"'blocks\.0' outputs shape \(1, 17, 32\); reshape='none' needs a \[B,K,h,w\]"):
        create("grad_cam", model, target_layer="blocks.0", reshape="none").attribute(images(1), 0)
    with pytest.raises(ConfigError, match=r"reshape='channels_last' needs a \[B,H,W,C\]"):
        create("grad_cam", model, target_layer="blocks.0", reshape="channels_last").attribute(images(1), 0)


@pytest.mark.parametrize(("kw", "match"), [
    ({"reshape": "token"}, r"Unknown reshape 'token'.*tokens"), ({"prefix_tokens": -1}, r"prefix_tokens must be"),
    ({"grid": [4]}, r"grid must be \[h, w\]"), ({"grid": "4x4"}, r"grid must be \[h, w\]")])
def test_bad_options_are_refused_at_construction(kw: dict, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        create("grad_cam", timm_vit(), target_layer="blocks.0", **kw)


def test_swin_permute_output_is_left_as_nchw() -> None:
    """torchvision Swin's ``permute`` already gives [B,C,h,w]: auto must not permute it again."""
    model = torchvision_swin()
    lay = feature_map_layout(model, "permute", (2, 48, 8, 8), (64, 64))
    assert lay.mode == "none"
    x = images(2, size=64, seed=2)
    a = create("grad_cam", model, target_layer="permute").attribute(x, TARGET)
    b = create("grad_cam", model, target_layer="norm").attribute(x, TARGET)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


def test_cnn_layers_are_unchanged(get_model: Callable[[str], nn.Module]) -> None:
    model = get_model("resnet18")
    x = images(2)
    auto = create("grad_cam", model, target_layer="layer2").attribute(x, TARGET)
    none = create("grad_cam", model, target_layer="layer2", reshape="none").attribute(x, TARGET)
    torch.testing.assert_close(auto, none, rtol=0, atol=0)
    assert feature_map_layout(model, "layer2", (2, 128, 4, 4), (32, 32)).mode == "none"
