"""Backbone factory: every architecture, stems, heads, local weights, clear errors."""

from __future__ import annotations

import socket
from pathlib import Path

import pytest
import torch
import torchvision

from xaudit.models import BACKBONES, build_backbone, min_image_size
from xaudit.utils.errors import ConfigError


@pytest.mark.parametrize("name", BACKBONES)
def test_every_backbone_gives_logits_at_32px(name: str) -> None:
    torch.manual_seed(0)
    model = build_backbone(name, num_classes=5, image_size=32, cifar_stem=True).eval()
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32))
    assert out.shape == (2, 5) and torch.isfinite(out).all()
    # the advertised CAM layer exists and is spatial
    layer = model.get_submodule(model.default_target_layer)
    feats: list[torch.Tensor] = []
    handle = layer.register_forward_hook(lambda m, i, o: feats.append(o))
    with torch.no_grad():
        model(torch.randn(1, 3, 32, 32))
    handle.remove()
    assert feats[0].ndim == 4 and feats[0].shape[-1] >= 1


def test_cifar_stem_keeps_resolution_and_grayscale_works() -> None:
    plain = build_backbone("resnet18", 4, image_size=64)
    stem = build_backbone("resnet18", 4, image_size=32, cifar_stem=True, in_chans=1)
    assert plain.conv1.stride == (2, 2) and isinstance(plain.maxpool, torch.nn.MaxPool2d)
    assert stem.conv1.stride == (1, 1) and stem.conv1.in_channels == 1
    assert isinstance(stem.maxpool, torch.nn.Identity)
    assert stem(torch.randn(2, 1, 32, 32)).shape == (2, 4)
    assert min_image_size("resnet18") == 32 and min_image_size("resnet18", cifar_stem=True) == 8


def test_small_cnn_has_gap_linear_head() -> None:
    model = build_backbone("small_cnn", 4, width=8)
    assert isinstance(model.avgpool, torch.nn.AdaptiveAvgPool2d) and isinstance(model.fc, torch.nn.Linear)
    assert model.fc.in_features == 32  # 4 x width


def test_local_weights_file_loads_without_network(tmp_path: Path) -> None:
    torch.manual_seed(1)
    source = torchvision.models.resnet18(weights=None)  # stands in for an ImageNet file
    path = tmp_path / "resnet18.pth"
    torch.save(source.state_dict(), path)
    model = build_backbone("resnet18", num_classes=3, weights_path=str(path))
    assert torch.equal(model.layer3[0].conv1.weight, source.layer3[0].conv1.weight)
    assert model.fc.out_features == 3  # the 1000-class head was skipped, not forced in


def test_unknown_backbone_lists_choices() -> None:
    with pytest.raises(ConfigError) as err:
        build_backbone("resnet19", 4)
    msg = str(err.value)
    assert "Unknown backbone 'resnet19'" in msg and "Did you mean 'resnet18'" in msg
    assert all(name in msg for name in BACKBONES)


def test_image_too_small_for_backbone_says_how_to_fix() -> None:
    with pytest.raises(ConfigError) as err:
        build_backbone("resnet18", 4, image_size=16)
    msg = str(err.value)
    assert "data.image_size=16 is too small for resnet18" in msg and "cifar_stem=true" in msg
    with pytest.raises(ConfigError, match="vgg11_bn: it down-samples by 32"):
        build_backbone("vgg11_bn", 4, image_size=24, cifar_stem=True)


def _online(host: str = "download.pytorch.org") -> bool:
    try:
        socket.getaddrinfo(host, 443)
        return True
    except OSError:
        return False


@pytest.mark.skipif(_online(), reason="the failure path needs a machine without network")
def test_failed_download_says_so_and_names_weights_path(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TORCH_HOME", str(tmp_path))  # an empty cache, so torchvision must download
    with pytest.raises(RuntimeError) as err:
        build_backbone("resnet18", 4, pretrained=True)
    msg = str(err.value)
    assert "Could not download the pretrained resnet18 weights" in msg and "model.backbone.weights_path" in msg
