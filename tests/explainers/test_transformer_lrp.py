"""LRP for transformers (AttnLRP, CP-LRP): conservation, each rule against a hand computation, the
re-computed attention against the models' own, and the sanity check.

Conservation is checked as for the CNN LRP (tests/explainers/test_relevance.py): on networks without
biases and without additive embeddings (class token, positional embedding set to 0), relevance that
starts as the target logit must reach the pixels whole. CP-LRP conserves there up to float64
rounding (tolerance 1e-9 relative, measured ≤ 1e-11). AttnLRP by design does not: its softmax rule
``R_i = x_i (R̃_i − s_i Σ R̃)`` has a bias term (Achtibat et al., 2024, Sec. 3.3), so its rules are
checked one by one against hand computations instead (1e-10 in float64).
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import nn
from torchvision.models.swin_transformer import SwinTransformer
from torchvision.models.vision_transformer import VisionTransformer as TorchvisionViT

from xaudit.explainers import create
from xaudit.explainers.transformer_lrp import _TransformerLRPMode
from xaudit.metrics.randomisation import randomise_, spearman
from xaudit.utils.errors import ConfigError

TIGHT = 1e-10


def _bias_free(model: nn.Module) -> nn.Module:
    """float64, eval, biases / class tokens / positional embeddings set to 0, unit-scale head."""
    torch.manual_seed(0)
    model = model.double().eval()
    head = [m for m in model.modules() if isinstance(m, nn.Linear)][-1]
    with torch.no_grad():
        head.weight.normal_()
        for name, p in model.named_parameters():
            if name.endswith("bias") or any(k in name for k in ("pos_embed", "cls_token", "class_token")):
                p.zero_()
    return model


def timm_vit(**kw: object) -> nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=32, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4, **kw)


def torchvision_vit() -> nn.Module:
    torch.manual_seed(0)
    return TorchvisionViT(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64,
                          num_classes=4)


def torchvision_swin() -> nn.Module:
    torch.manual_seed(0)
    return SwinTransformer(patch_size=[4, 4], embed_dim=24, depths=[2, 2], num_heads=[2, 2], window_size=[4, 4],
                           num_classes=4)


MODELS: dict[str, tuple[Callable[[], nn.Module], int]] = {
    "timm_vit": (timm_vit, 32),
    "timm_vit_avgpool": (lambda: timm_vit(global_pool="avg", class_token=False), 32),
    "torchvision_vit": (torchvision_vit, 32),
    "torchvision_swin": (torchvision_swin, 64),
}


def _images(size: int, n: int = 3) -> torch.Tensor:
    return torch.randn(n, 3, size, size, generator=torch.Generator().manual_seed(1), dtype=torch.float64)


@pytest.mark.parametrize("name", list(MODELS))
def test_cp_lrp_conserves_relevance_on_bias_free_transformers(name: str) -> None:
    build, size = MODELS[name]
    model = _bias_free(build())
    x = _images(size)
    target = torch.tensor([0, 2, 3])
    logit = model(x).gather(1, target[:, None]).squeeze(1)
    relevance = create("cp_lrp", model, epsilon=0.0).attribute(x, target, reduce=None)
    total = relevance.sum((1, 2, 3))
    assert logit.abs().min() > 1e-3  # a non-trivial logit to conserve
    assert torch.allclose(total, logit, rtol=1e-9, atol=0), (total, logit)


@pytest.mark.parametrize("name", list(MODELS))
def test_rules_recompute_the_models_own_forward(name: str) -> None:
    # fused SDPA (timm), nn.MultiheadAttention (torchvision ViT), window attention (Swin): the explicit
    # re-computation inside the explainer gives the model's logits (float64, 1e-10)
    build, size = MODELS[name]
    model = build().double().eval()
    x = _images(size)
    with torch.no_grad():
        ref = model(x)
    for variant in ("attnlrp", "cp_lrp"):
        with _TransformerLRPMode(variant, 1e-6):
            out = model(x.clone().requires_grad_(True))
        assert torch.allclose(out, ref, rtol=0, atol=TIGHT * max(1.0, float(ref.abs().max())))


def test_fused_and_unfused_timm_attention_give_the_same_map() -> None:
    model = timm_vit().double().eval()
    x, target = _images(32), torch.tensor([1, 0, 3])
    maps = []
    for fused in (True, False):
        for block in model.blocks:
            block.attn.fused_attn = fused
        maps.append(create("attn_lrp", model).attribute(x, target))
    assert torch.allclose(maps[0], maps[1], rtol=0, atol=TIGHT)
    assert all(b.attn.fused_attn is False for b in model.blocks)  # the explainer never touched the flag


class _SoftmaxNet(nn.Module):
    """logits = V · softmax(x): relevance of s_j for class k is s_j v_kj."""

    def __init__(self) -> None:
        super().__init__()
        self.v = nn.Parameter(torch.randn(3, 12, generator=torch.Generator().manual_seed(0), dtype=torch.float64))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1).softmax(-1) @ self.v.t()


def test_softmax_rule_matches_the_paper() -> None:
    model = _SoftmaxNet().eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    k = torch.tensor([0, 2])
    z = x.flatten(1)
    s = z.softmax(-1)
    r_out = s * model.v[k]  # relevance of each softmax output
    expected = z * (r_out - s * r_out.sum(-1, keepdim=True))  # AttnLRP, Prop. 3.3
    got = create("attn_lrp", model, epsilon=0.0).attribute(x, k, reduce=None).flatten(1)
    assert torch.allclose(got, expected, rtol=0, atol=TIGHT)
    # CP-LRP holds the probabilities constant: nothing reaches x through the softmax
    assert create("cp_lrp", model).attribute(x, k, reduce=None).abs().max() == 0


class _ProductNet(nn.Module):
    """logit k = Σ_i a_i b_i · w_k with a, b two halves of the input (a product of two activations)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        a, b = x[:, 0].flatten(1), x[:, 1].flatten(1)
        prod = (a * b).sum(-1, keepdim=True)
        return torch.cat([prod, 2 * prod], 1)


def test_uniform_rule_splits_products_in_half() -> None:
    x = torch.randn(2, 2, 3, 3, dtype=torch.float64)
    got = create("attn_lrp", _ProductNet(), epsilon=0.0).attribute(x, torch.tensor([0, 1]), reduce=None)
    scale = torch.tensor([1.0, 2.0], dtype=torch.float64)[:, None, None]
    half = 0.5 * x[:, 0] * x[:, 1] * scale
    assert torch.allclose(got[:, 0], half, rtol=0, atol=TIGHT)
    assert torch.allclose(got[:, 1], half, rtol=0, atol=TIGHT)
    # plain gradient × input would count the product twice
    assert torch.allclose(got.sum((1, 2, 3)), (x[:, 0] * x[:, 1]).sum((1, 2)) * scale.flatten(), rtol=1e-12)


class _NormGeluNet(nn.Module):
    """logits = W · gelu(LayerNorm(x)) without biases."""

    def __init__(self) -> None:
        super().__init__()
        g = torch.Generator().manual_seed(0)
        self.norm = nn.LayerNorm(12, bias=False, dtype=torch.float64)
        with torch.no_grad():
            self.norm.weight.copy_(torch.rand(12, generator=g, dtype=torch.float64) + 0.5)
        self.act = nn.GELU()
        self.head = nn.Linear(12, 3, bias=False, dtype=torch.float64)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.act(self.norm(x.flatten(1))))


def test_layernorm_and_gelu_rules_match_a_hand_computation() -> None:
    model = _NormGeluNet().eval()
    x = torch.randn(2, 3, 2, 2, dtype=torch.float64)
    k = torch.tensor([1, 2])
    z = x.flatten(1)
    sigma = (z.var(-1, unbiased=False, keepdim=True) + model.norm.eps).sqrt()
    y = (z - z.mean(-1, keepdim=True)) / sigma * model.norm.weight
    w = model.head.weight[k]
    r_y = F.gelu(y) * w  # identity rule: GELU passes its output relevance unchanged to y
    g_y = r_y / y  # the gradient that carries it
    g_hat = g_y * model.norm.weight / sigma  # 1/σ held constant, centring kept
    expected = z * (g_hat - g_hat.mean(-1, keepdim=True))
    got = create("attn_lrp", model, epsilon=0.0).attribute(x, k, reduce=None).flatten(1)
    assert torch.allclose(got, expected, rtol=0, atol=1e-9)
    # and the two rules conserve: bias-free, so the pixels get the whole logit
    assert torch.allclose(got.sum(-1), model(x).gather(1, k[:, None]).squeeze(1), rtol=1e-10)


def test_lrp_on_vit_passes_the_sanity_check() -> None:
    # Adebayo et al.: randomising the head and then the last block must change the map
    model = timm_vit().eval()
    with torch.no_grad():
        model.head.weight.normal_()
    x = torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(2))
    target = torch.tensor([0, 1, 2, 3])
    for method in ("attn_lrp", "cp_lrp"):
        before = create(method, model).attribute(x, target).abs()
        changed = timm_vit().eval()
        changed.load_state_dict(model.state_dict())
        randomise_(changed.head, 1)
        randomise_(changed.blocks[-1], 2)
        after = create(method, changed).attribute(x, target).abs()
        rho = spearman(before.flatten(1), after.flatten(1))
        assert float(rho.mean()) < 0.5, (method, rho)


def test_map_is_signed_and_follows_device_and_dtype() -> None:
    model = timm_vit().eval()
    x = torch.randn(2, 3, 32, 32)
    out = create("attn_lrp", model).attribute(x.to(torch.bfloat16), torch.tensor([0, 1]))
    assert out.dtype == torch.bfloat16 and out.shape == (2, 32, 32)
    ref = create("attn_lrp", model).attribute(x, torch.tensor([0, 1]))
    assert (ref < 0).any() and (ref > 0).any()


def test_bad_options_and_train_mode_attention_dropout() -> None:
    model = timm_vit(attn_drop_rate=0.1)
    with pytest.raises(ConfigError, match="cp_lrp"):
        create("attn_lrp", model, variant="cp")
    with pytest.raises(ConfigError, match="epsilon"):
        create("attn_lrp", model, epsilon=-1.0)
    with pytest.raises(ValueError, match=r"eval mode"):
        create("attn_lrp", model.train()).attribute(torch.randn(1, 3, 32, 32), 0)
