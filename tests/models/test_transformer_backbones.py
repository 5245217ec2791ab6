"""Vision-transformer backbones: shapes, CAM target layers, weight resizing, patch-size errors, configs."""

from __future__ import annotations

from pathlib import Path

import hydra
import pytest
import torch

from xaudit.explainers.hooks import resolve_layer
from xaudit.models import build_backbone
from xaudit.models.backbones import TRANSFORMER_BACKBONES, min_image_size
from xaudit.utils.errors import ConfigError

from xaudit_testing import compose_config

# (name, a small image size the architecture accepts, expected target layer, its output rank)
SMALL = {
    "vit_tiny": (16, "blocks.3.norm1", 3),
    "deit_small": (32, "blocks.11.norm1", 3),
    "vit_b_16": (32, "encoder.layers.encoder_layer_11.ln_1", 3),
    "swin_t": (32, "features.7.1.norm1", 4),
}


def test_every_transformer_is_covered() -> None:
    assert set(SMALL) == set(TRANSFORMER_BACKBONES)


@pytest.mark.parametrize("name", TRANSFORMER_BACKBONES)
def test_transformer_gives_logits_and_a_target_layer(name: str) -> None:
    size, layer, rank = SMALL[name]
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=5, image_size=size).eval()
    assert model.default_target_layer == layer and model.backbone_name == name
    assert resolve_layer(model, None) == layer
    feats: list[torch.Tensor] = []
    handle = model.get_submodule(layer).register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        out = model(torch.randn(2, 3, size, size))
    handle.remove()
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    assert feats[0].ndim == rank
    gh, gw = model.patch_grid
    if model.feature_layout == "tokens":
        assert feats[0].shape[1] == model.num_prefix_tokens + gh * gw
    else:  # Swin: [B, H, W, C]
        assert model.feature_layout == "nhwc" and feats[0].shape[1:3] == (gh, gw)


def test_vit_tiny_sizes_and_grayscale() -> None:
    model = build_backbone("vit_tiny", 3, in_chans=1, image_size=32, width=32, patch_size=8, depth=2, num_heads=2)
    assert len(model.blocks) == 2 and model.embed_dim == 32 and model.default_target_layer == "blocks.1.norm1"
    assert model.patch_grid == (4, 4) and model.global_pool == "token" and model.num_prefix_tokens == 1
    assert model(torch.randn(2, 1, 32, 32)).shape == (2, 3)
    assert min_image_size("vit_tiny") == 4 and min_image_size("swin_t") == 32


def test_grayscale_torchvision_transformers() -> None:
    vit = build_backbone("vit_b_16", 2, in_chans=1, image_size=32)
    assert vit.conv_proj.in_channels == 1 and vit.conv_proj.kernel_size == (16, 16) and vit.conv_proj.padding == (0, 0)
    with torch.no_grad():
        assert vit(torch.randn(1, 1, 32, 32)).shape == (1, 2)


def test_vit_tiny_pos_embed_resized_from_other_image_size(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone("vit_tiny", 10, image_size=16, width=32)  # 4x4 grid, 10-class head
    path = tmp_path / "vit16.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("vit_tiny", 4, image_size=32, width=32, weights_path=str(path))  # 8x8 grid
    assert model.pos_embed.shape == (1, 1 + 64, 32)
    assert torch.equal(model.blocks[2].attn.qkv.weight, source.blocks[2].attn.qkv.weight)
    assert torch.equal(model.pos_embed[:, 0], source.pos_embed[:, 0])  # the class token's embedding is kept
    # bicubic upsampling of a 4x4 grid to 8x8 keeps the mean roughly and is not a fresh init
    assert not torch.equal(model.pos_embed[:, 1:], torch.zeros_like(model.pos_embed[:, 1:]))
    assert abs(model.pos_embed[:, 1:].mean() - source.pos_embed[:, 1:].mean()) < 0.05
    assert model.head.out_features == 4  # the 10-class head was skipped
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_vit_tiny_patch_kernel_and_channels_resized(tmp_path: Path) -> None:
    source = build_backbone("vit_tiny", 4, image_size=32, width=32, patch_size=8)
    path = tmp_path / "vit_p8.pth"
    torch.save({"state_dict": source.state_dict()}, path)
    model = build_backbone("vit_tiny", 4, in_chans=1, image_size=32, width=32, patch_size=4, weights_path=str(path))
    assert model.patch_embed.proj.weight.shape == (32, 1, 4, 4)
    assert torch.equal(model.blocks[0].norm1.weight, source.blocks[0].norm1.weight)


def test_torchvision_vit_pos_embedding_resized(tmp_path: Path) -> None:
    torch.manual_seed(0)
    source = build_backbone("vit_b_16", 1000, image_size=64)  # 4x4 grid stands in for ImageNet's 14x14
    path = tmp_path / "vit_b_16.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("vit_b_16", 3, image_size=32, weights_path=str(path))  # 2x2 grid
    assert model.encoder.pos_embedding.shape == (1, 5, 768)
    assert torch.equal(model.encoder.pos_embedding[:, 0], source.encoder.pos_embedding[:, 0])
    assert torch.equal(model.conv_proj.weight, source.conv_proj.weight)
    assert model.heads.head.out_features == 3


def test_deit_weights_path_resizes_pos_embed(tmp_path: Path) -> None:
    source = build_backbone("deit_small", 1000, image_size=64)
    path = tmp_path / "deit.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("deit_small", 2, image_size=32, weights_path=str(path))
    assert model.pos_embed.shape == (1, 1 + 4, 384)
    assert torch.equal(model.blocks[5].mlp.fc1.weight, source.blocks[5].mlp.fc1.weight)


def test_swin_loads_at_another_image_size(tmp_path: Path) -> None:
    source = build_backbone("swin_t", 1000, image_size=64)
    path = tmp_path / "swin.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("swin_t", 2, image_size=32, weights_path=str(path))  # relative bias: nothing to resize
    assert torch.equal(model.features[5][3].attn.relative_position_bias_table,
                       source.features[5][3].attn.relative_position_bias_table)


def test_patch_size_must_divide_image_size() -> None:
    with pytest.raises(ConfigError) as err:
        build_backbone("vit_tiny", 4, image_size=30, patch_size=4)
    msg = str(err.value)
    assert "data.image_size=30" in msg and "model.backbone.patch_size=4" in msg
    assert "multiple of 4" in msg and "data.image_size=28 or 32" in msg and "patch_size=2" in msg
    with pytest.raises(ConfigError, match=r"data\.image_size=224 does not fit model\.backbone\.patch_size=15"):
        build_backbone("vit_b_16", 4, image_size=224, patch_size=15)
    with pytest.raises(ConfigError, match=r"swin_t needs a multiple of patch_size\*8=32 px"):
        build_backbone("swin_t", 4, image_size=48)


def test_bad_transformer_options_are_refused() -> None:
    with pytest.raises(ConfigError, match="option for backbone 'vit_b_16'"):
        build_backbone("vit_b_16", 4, image_size=32, depth=3)
    with pytest.raises(ConfigError, match=r"multiple of model\.backbone\.num_heads=3"):
        build_backbone("vit_tiny", 4, image_size=32, width=32, num_heads=3)
    with pytest.raises(ConfigError, match="vit_tiny has no pretrained weights"):
        build_backbone("vit_tiny", 4, image_size=32, pretrained=True)
    with pytest.raises(ConfigError, match="cifar_stem=true has no meaning"):
        build_backbone("vit_tiny", 4, image_size=32, cifar_stem=True)
    with pytest.raises(ConfigError, match="Did you mean 'vit_b_16'"):
        build_backbone("vit_b16", 4)


@pytest.mark.parametrize("name", TRANSFORMER_BACKBONES)
def test_model_config_composes_and_instantiates(name: str, tmp_path: Path) -> None:
    overrides = [f"model={name}"] + ([] if name == "vit_tiny" else ["data.image_size=32"])
    cfg = compose_config(overrides, tmp_path)
    assert cfg.model.backbone.name == name
    model = hydra.utils.instantiate(cfg.model, num_classes=4, in_chans=3, image_size=cfg.data.image_size)
    assert model.net.backbone_name == name
    assert resolve_layer(model, None) == f"net.{SMALL[name][1]}"
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 4)


def test_safetensors_weights_path(tmp_path: Path) -> None:
    from safetensors.torch import save_file  # timm's checkpoint format; safetensors comes with timm

    source = build_backbone("vit_tiny", 4, image_size=16, width=32)
    path = tmp_path / "model.safetensors"
    save_file({k: v.contiguous() for k, v in source.state_dict().items()}, str(path))
    model = build_backbone("vit_tiny", 4, image_size=16, width=32, weights_path=str(path))
    assert all(torch.equal(a, b) for a, b in zip(model.state_dict().values(), source.state_dict().values()))
