"""Attention rollout and Chefer et al. relevance on tiny timm ViTs, against hand-written references.

The references compute the attention matrices themselves from the block weights (a manual forward
of the ViT), so they share no code with ``xaudit.explainers.attention``. Tolerance: float32,
``atol=1e-5, rtol=1e-4`` (products of two 17×17 matrices).
"""

from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from xaudit.explainers import UnsupportedModelError, create
from xaudit.explainers import attention as attention_module  # noqa: F401  (registers the explainers)

TOL = {"atol": 1e-5, "rtol": 1e-4}
SIZE = 32


def tiny_vit(seed: int = 0, **kw: object) -> VisionTransformer:
    """Two blocks, 4×4 patches of 8 px + class token; weights large enough for peaked attention."""
    torch.manual_seed(seed)
    model = VisionTransformer(img_size=SIZE, patch_size=8, embed_dim=32, depth=2, num_heads=2, num_classes=4,
                              **kw)
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    return model.eval()


def images(b: int, seed: int = 1) -> Tensor:
    return torch.randn(b, 3, SIZE, SIZE, generator=torch.Generator().manual_seed(seed))


def manual_forward(model: VisionTransformer, x: Tensor) -> tuple[Tensor, list[Tensor]]:
    """Logits and per-block attention probabilities [B,heads,T,T], computed from the weights."""
    t = model.patch_embed(x)
    t = torch.cat([model.cls_token.expand(x.shape[0], -1, -1), t], 1) + model.pos_embed
    attns = []
    for blk in model.blocks:
        h = blk.norm1(t)
        b, n, c = h.shape
        heads = blk.attn.num_heads
        qkv = F.linear(h, blk.attn.qkv.weight, blk.attn.qkv.bias).reshape(b, n, 3, heads, c // heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4)
        a = torch.softmax(q @ k.transpose(-2, -1) * (c // heads) ** -0.5, dim=-1)
        attns.append(a)
        out = (a @ v).transpose(1, 2).reshape(b, n, c)
        t = t + F.linear(out, blk.attn.proj.weight, blk.attn.proj.bias)
        t = t + blk.mlp(blk.norm2(t))
    logits = model.head(model.norm(t)[:, 0])
    return logits, attns


def to_pixels(row: Tensor) -> Tensor:
    """Class-row relevance over the 16 patch tokens → [32,32]."""
    return F.interpolate(row.reshape(1, 1, 4, 4), size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0]


def reference_rollout(attns: list[Tensor], head_fusion: str, discard_ratio: float) -> Tensor:
    """vit-explain's rollout, one image at a time (discarding per image, rows renormalised)."""
    maps = []
    for i in range(attns[0].shape[0]):
        t = attns[0].shape[-1]
        result = torch.eye(t)
        for a in attns:
            heads = a[i]
            fused = {"mean": heads.mean(0), "max": heads.max(0).values, "min": heads.min(0).values}[head_fusion]
            flat = fused.flatten().clone()
            order = torch.argsort(flat)[: int(t * t * discard_ratio)]
            order = order[order != 0]
            flat[order] = 0
            fused = flat.reshape(t, t)
            m = (fused + torch.eye(t)) / 2
            m = m / m.sum(dim=1, keepdim=True)
            result = m @ result
        maps.append(to_pixels(result[0, 1:]))
    return torch.stack(maps)


def reference_chefer(model: VisionTransformer, x: Tensor, target: Tensor) -> Tensor:
    """Chefer et al.'s recurrence R ← R + mean_h[(∇A ⊙ A)⁺]·R, one image at a time."""
    maps = []
    for i in range(x.shape[0]):
        logits, attns = manual_forward(model, x[i:i + 1])
        grads = torch.autograd.grad(logits[0, int(target[i])], attns)
        t = attns[0].shape[-1]
        r = torch.eye(t)
        for a, g in zip(attns, grads):
            cam = (g[0] * a[0]).clamp(min=0).mean(0)
            r = r + cam @ r
        maps.append(to_pixels(r[0, 1:]))
    return torch.stack(maps).detach()


def test_manual_forward_matches_timm() -> None:
    """The reference's attention comes from a forward that reproduces the model's logits."""
    model = tiny_vit()
    x = images(2)
    with torch.no_grad():
        torch.testing.assert_close(manual_forward(model, x)[0], model(x), **TOL)


@pytest.mark.parametrize("head_fusion", ["mean", "max", "min"])
@pytest.mark.parametrize("discard_ratio", [0.0, 0.6])
def test_rollout_matches_reference(head_fusion: str, discard_ratio: float) -> None:
    model = tiny_vit()
    x = images(3)
    with torch.no_grad():
        _, attns = manual_forward(model, x)
    want = reference_rollout(attns, head_fusion, discard_ratio)
    got = create("attention_rollout", model, head_fusion=head_fusion, discard_ratio=discard_ratio).attribute(x)
    assert got.shape == (3, SIZE, SIZE) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)


def test_rollout_options_change_the_map_and_ignore_target() -> None:
    model = tiny_vit()
    x = images(2)
    maps = {(f, d): create("attention_rollout", model, head_fusion=f, discard_ratio=d).attribute(x, 0)
            for f in ("mean", "max", "min") for d in (0.0, 0.6)}
    vals = list(maps.values())
    assert all(not torch.allclose(a, b) for i, a in enumerate(vals) for b in vals[i + 1:])
    explainer = create("attention_rollout", model)
    torch.testing.assert_close(explainer.attribute(x, 0), explainer.attribute(x, torch.tensor([3, 1])), atol=0, rtol=0)


def test_rollout_blocks_option() -> None:
    """``blocks`` picks the attention modules: one block's rollout is that block's Â alone."""
    model = tiny_vit()
    x = images(2)
    with torch.no_grad():
        _, attns = manual_forward(model, x)
    got = create("attention_rollout", model, blocks=["blocks.0.attn"]).attribute(x)
    torch.testing.assert_close(got, reference_rollout(attns[:1], "mean", 0.0), **TOL)


def test_chefer_matches_reference() -> None:
    model = tiny_vit()
    x = images(3)
    target = torch.tensor([0, 3, 1])
    want = reference_chefer(model, x, target)
    got = create("chefer", model).attribute(x, target)
    assert got.shape == (3, SIZE, SIZE) and got.dtype == torch.float32
    torch.testing.assert_close(got, want, **TOL)
    assert not torch.allclose(got, create("chefer", model).attribute(x, 2))  # class-specific


def test_chefer_predicted_target_and_frozen_weights() -> None:
    model = tiny_vit().requires_grad_(False)
    x = images(2)
    with torch.no_grad():
        pred = model(x).argmax(1)
    got = create("chefer", model).attribute(x)
    torch.testing.assert_close(got, reference_chefer(tiny_vit(), x, pred), **TOL)


@pytest.mark.parametrize("method", ["attention_rollout", "chefer"])
def test_batch_independence(method: str) -> None:
    model = tiny_vit()
    x = images(4)
    target = torch.tensor([2, 0, 3, 1])
    kw = {"discard_ratio": 0.5, "head_fusion": "max"} if method == "attention_rollout" else {}
    explainer = create(method, model, **kw)
    batched = explainer.attribute(x, target)
    single = torch.cat([explainer.attribute(x[i:i + 1], target[i:i + 1]) for i in range(4)])
    torch.testing.assert_close(batched, single, **TOL)


def _hook_counts(model: nn.Module) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) + len(m._backward_hooks)
               + len(getattr(m, "_forward_hooks_with_kwargs", {})) for m in model.modules())


@pytest.mark.parametrize("method", ["attention_rollout", "chefer"])
def test_model_state_restored(method: str) -> None:
    """fused_attn flags (mixed on purpose), hooks, train mode and param.grad as found."""
    model = tiny_vit().train()
    model.blocks[0].attn.fused_attn = True
    model.blocks[1].attn.fused_attn = False
    x = images(2)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # train-mode dropout is switched off, with a warning
        attr = create(method, model).attribute(x, 1)
    assert attr.shape == (2, SIZE, SIZE) and torch.isfinite(attr).all()
    assert [b.attn.fused_attn for b in model.blocks] == [True, False]
    assert _hook_counts(model) == 0
    assert all(m.training for m in model.modules())
    assert all(p.grad is None for p in model.parameters())
    # the model's own forward is fused again and unchanged
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), manual_forward(model, x)[0], **TOL)


class _Boom(nn.Module):
    def forward(self, x: Tensor) -> Tensor:
        raise RuntimeError("boom")


@pytest.mark.parametrize("method", ["attention_rollout", "chefer"])
def test_state_restored_after_exception(method: str) -> None:
    model = tiny_vit()
    model.blocks[0].attn.fused_attn = True
    model.blocks[1].attn.fused_attn = True
    model.head = _Boom()
    with pytest.raises(RuntimeError, match="boom"):
        create(method, model).attribute(images(2), 0)
    assert [b.attn.fused_attn for b in model.blocks] == [True, True]
    assert _hook_counts(model) == 0
    assert not model.training
    assert all(p.grad is None for p in model.parameters())


@pytest.mark.parametrize("method", ["attention_rollout", "chefer"])
def test_refuses_cnn(method: str) -> None:
    cnn = nn.Sequential(nn.Conv2d(3, 4, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(4, 2))
    with pytest.raises(UnsupportedModelError, match="not a transformer with timm Attention blocks; pass"):
        create(method, cnn)


def test_bad_options() -> None:
    model = tiny_vit()
    with pytest.raises(ValueError, match="head_fusion"):
        create("attention_rollout", model, head_fusion="median")
    with pytest.raises(ValueError, match="discard_ratio"):
        create("attention_rollout", model, discard_ratio=1.0)
    with pytest.raises(ValueError, match=r"blocks\.0\.attn"):
        create("chefer", model, blocks=["blocks.0.atn"])
    with pytest.raises(UnsupportedModelError, match="timm-style"):
        create("chefer", model, blocks=["blocks.0.mlp"])


@pytest.mark.parametrize("method", ["attention_rollout", "chefer"])
def test_token_layouts_and_dtype(method: str) -> None:
    """Register tokens, no class token (mean of rows), a 24×32 input (3×4 patch grid) and float64
    input: maps of the input's size and dtype."""
    x = images(2).double()[:, :, :24]
    for kw in ({"reg_tokens": 2}, {"class_token": False, "global_pool": "avg"}, {}):
        model = tiny_vit(dynamic_img_size=True, **kw)
        attr = create(method, model).attribute(x, 1)
        assert attr.shape == (2, 24, SIZE), kw
        assert attr.dtype == torch.float64 and torch.isfinite(attr).all()
