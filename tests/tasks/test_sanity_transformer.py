"""Cascading randomisation steps on vision transformers: whole blocks top-down, embeddings alone.

``block_layers`` names a step by the transformer block (the shallowest module holding exactly one
attention module), and a parameter owned by a module that has parameterised sub-modules (class
token, position embedding) by its own parameter name, so no step re-draws the whole model.
CNN steps are those of the plain parent rule, as before transformers were added.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torchvision
from timm.models.deit import VisionTransformerDistilled
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from xaudit.metrics.randomisation import attention_modules, block_layers, randomise_step_, spearman
from xaudit.models import build_backbone
from xaudit.tasks.sanity import cascade
from xaudit.utils.errors import ConfigError

DEPTH = 3


def timm_vit() -> nn.Module:
    """The project's vit_tiny (timm VisionTransformer), shrunk; eval, seeded."""
    torch.manual_seed(0)
    return build_backbone("vit_tiny", 4, image_size=32, width=32, patch_size=8, depth=DEPTH, num_heads=2).eval()


def timm_deit() -> nn.Module:  # class + distillation token, two heads
    torch.manual_seed(0)
    return VisionTransformerDistilled(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2,
                                      num_classes=4).eval()


def torchvision_vit() -> nn.Module:  # as tests/explainers/test_token_cam.py
    torch.manual_seed(0)
    return TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=4).eval()


def torchvision_swin() -> nn.Module:  # as tests/explainers/test_token_cam.py
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=4).eval()


# Chosen naming: blocks by module name, top first; the root's (or encoder's) own parameters one step
# each by parameter name, ordered as named_parameters lists them and reversed (input side last).
EXPECTED = {
    "timm_vit": (timm_vit, ["head", "norm", *[f"blocks.{i}" for i in reversed(range(DEPTH))], "patch_embed",
                            "pos_embed", "cls_token"]),
    "timm_deit": (timm_deit, ["head_dist", "head", "norm", "blocks.1", "blocks.0", "patch_embed", "dist_token",
                              "pos_embed", "cls_token"]),
    "torchvision_vit": (torchvision_vit, ["heads", "encoder.ln", "encoder.layers.encoder_layer_1",
                                          "encoder.layers.encoder_layer_0", "encoder.pos_embedding", "conv_proj",
                                          "class_token"]),
    "torchvision_swin": (torchvision_swin, ["head", "norm", "features.3.1", "features.3.0", "features.2",
                                            "features.1.1", "features.1.0", "features.0"]),
}


def _covered(model: nn.Module, step: str) -> set[str]:
    """Parameter names a step randomises: a module's (with sub-modules) or the one parameter."""
    modules = dict(model.named_modules())
    if step in modules:
        prefix = f"{step}." if step else ""
        return {prefix + n for n, _ in modules[step].named_parameters()}
    assert step in dict(model.named_parameters()), step
    return {step}


@pytest.mark.parametrize("name", EXPECTED)
def test_transformer_steps_are_whole_blocks_top_down(name: str) -> None:
    build, expected = EXPECTED[name]
    model = build()
    assert block_layers(model) == expected


@pytest.mark.parametrize("name", EXPECTED)
def test_transformer_steps_partition_the_parameters(name: str) -> None:
    """Every parameter in exactly one step, no step is the root, one attention module per block."""
    model = EXPECTED[name][0]()
    steps = block_layers(model)
    assert "" not in steps
    covered = [_covered(model, s) for s in steps]
    assert sum(len(c) for c in covered) == len(dict(model.named_parameters()))
    assert set().union(*covered) == set(dict(model.named_parameters()))
    attention = attention_modules(model)
    blocks = [s for s in steps if any(a == s or a.startswith(s + ".") for a in attention)]
    assert len(blocks) == len(attention)


def test_attention_detection_by_type_and_name() -> None:
    assert attention_modules(timm_vit()) == [f"blocks.{i}.attn" for i in range(DEPTH)]
    assert attention_modules(torchvision_vit()) == [f"encoder.layers.encoder_layer_{i}.self_attention"
                                                    for i in range(2)]
    assert attention_modules(torchvision_swin()) == ["features.1.0.attn", "features.1.1.attn",
                                                     "features.3.0.attn", "features.3.1.attn"]

    class MyAttention(nn.Module):  # not a known type: found by its class name; the inner MHA is not counted
        def __init__(self) -> None:
            super().__init__()
            self.inner = nn.MultiheadAttention(8, 2)

    net = nn.Sequential(nn.Linear(8, 8), nn.Sequential(nn.LayerNorm(8), MyAttention()), nn.Linear(8, 2))
    assert attention_modules(net) == ["1.1"]
    assert block_layers(net) == ["2", "1", "0"]


def test_cnn_steps_unchanged() -> None:
    """The parent rule of earlier versions (hard-coded from the version before transformer blocks)."""
    assert block_layers(torchvision.models.resnet18(num_classes=4)) == [
        "fc", "layer4.1", "layer4.0.downsample", "layer4.0", "layer3.1", "layer3.0.downsample", "layer3.0",
        "layer2.1", "layer2.0.downsample", "layer2.0", "layer1.1", "layer1.0", "bn1", "conv1"]
    assert block_layers(build_backbone("small_cnn", 4, width=8)) == [
        "fc", "features.block5", "features.block4", "features.block3", "features.block2", "features.block1"]


@pytest.mark.parametrize("name", EXPECTED)
def test_each_step_randomises_only_its_own_parameters(name: str) -> None:
    """Step k changes exactly the parameters of step k (none of the model's other parameters)."""
    model = EXPECTED[name][0]()
    work = copy.deepcopy(model)
    for k, step in enumerate(block_layers(model), 1):
        before = {n: p.detach().clone() for n, p in work.named_parameters()}
        randomise_step_(work, step, seed=k)
        changed = {n for n, p in work.named_parameters() if not torch.equal(p, before[n])}
        own = _covered(work, step)
        assert changed <= own, (step, changed - own)
        # a norm layer is reset to its (1, 0) initialisation, unchanged on these untrained models
        modules = dict(work.named_modules())
        norms_only = step in modules and all(
            isinstance(m, nn.LayerNorm) for m in modules[step].modules() if next(m.parameters(False), None) is not None)
        assert changed or norms_only, step


def test_parameter_step_is_seeded_and_alone() -> None:
    model = timm_vit()
    a, b = copy.deepcopy(model), copy.deepcopy(model)
    randomise_step_(a, "pos_embed", seed=3)
    randomise_step_(b, "pos_embed", seed=3)
    assert torch.equal(a.pos_embed, b.pos_embed) and not torch.equal(a.pos_embed, model.pos_embed)
    assert torch.equal(a.cls_token, model.cls_token) and torch.equal(a.head.weight, model.head.weight)


def test_cascade_on_vit_changes_the_map_after_the_head_only() -> None:
    model = timm_vit()
    reference = copy.deepcopy(model.state_dict())
    layers = block_layers(model)
    x = torch.randn(3, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    y = torch.tensor([0, 1, 3])
    original, after = cascade(model, "saliency", {}, x, y, layers, seed=0)
    assert len(after) == len(layers)
    rho = spearman(original.abs().flatten(1), after[0].abs().flatten(1))
    assert (rho < 0.99).all(), rho
    # the caller's model is untouched
    assert all(torch.equal(v, reference[k]) for k, v in model.state_dict().items())
    # cascade's first step (seed + 1) on a copy: only the head differs from the trained model
    first = copy.deepcopy(model)
    randomise_step_(first, layers[0], seed=1)
    changed = {k for k, v in first.state_dict().items() if not torch.equal(v, reference[k])}
    assert changed == {"head.weight", "head.bias"}
    torch.testing.assert_close(create_map(first, x, y), after[0], rtol=0, atol=0)


def create_map(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    from xaudit.explainers import create

    return create("saliency", model).attribute(x, y).detach().float()


def test_cascade_rejects_unknown_steps_listing_modules_and_parameters() -> None:
    model = timm_vit()
    x, y = torch.randn(1, 3, 32, 32), torch.tensor([0])
    with pytest.raises(ConfigError, match=r"Unknown layer.*'pos_emb'.*Did you mean 'pos_embed'.*blocks\.0"):
        cascade(model, "saliency", {}, x, y, ["head", "pos_emb"])


def test_sanity_metric_default_steps_never_redraw_the_whole_vit() -> None:
    from xaudit.metrics import SanityCheck

    model = timm_vit()
    steps = SanityCheck(model).layers
    assert "" not in steps and steps[0] == "head"
    assert steps[-2:] == ["pos_embed", "cls_token"]  # the root's own parameters, one step each
    assert "patch_embed.proj" in steps and f"blocks.{DEPTH - 1}.attn.qkv" in steps  # per layer, as on CNNs
    metric = SanityCheck(model, mode="independent", layers=["pos_embed"])
    x = torch.randn(2, 3, 32, 32, generator=torch.Generator().manual_seed(0))
    target = torch.tensor([0, 1])
    from xaudit.explainers import create

    metric.update(x, create("saliency", model).attribute(x, target), target)
    # only the position embedding re-drawn (measured 0.92): the maps change but stay related, where a
    # whole-model redraw (what the root step did before) leaves them unrelated (≈0.1 after one block)
    assert 0.5 < float(metric.compute()) < 0.99
