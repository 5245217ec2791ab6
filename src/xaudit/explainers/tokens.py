"""Layer outputs of vision transformers as CAM feature maps [B,C,h,w].

CAM methods read a spatial feature map at ``target_layer``. A CNN layer gives one directly; a
transformer block gives a token sequence [B,T,C] (ViT, DeiT: prefix tokens, then h·w patch
tokens in row-major order) or a channels-last grid [B,H,W,C] (Swin). :func:`feature_map_layout`
decides once per call how the recorded output becomes [B,C,h,w]; :meth:`FeatureMapLayout.apply`
is then used on the activations *and* their gradients, so both are reshaped the same way
(dropped prefix tokens lose their gradient too, as in pytorch-grad-cam's reshape transforms).

Options (explainer keywords): ``reshape`` ∈ ``auto | tokens | channels_last | none``,
``prefix_tokens`` (tokens before the patch tokens; default from the model) and ``grid``
([h, w] of the patch tokens; default from the model or the token count).
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Sequence
from dataclasses import dataclass

from torch import Tensor, nn

from xaudit.utils.errors import ConfigError, unknown_choice

RESHAPES = ("auto", "tokens", "channels_last", "none")


@dataclass(frozen=True)
class FeatureMapLayout:
    """How a recorded layer output becomes [B,C,h,w]: ``mode`` is ``none`` (already NCHW),
    ``tokens`` (drop ``prefix`` tokens of [B,T,C], reshape to ``grid``) or ``channels_last``."""

    mode: str
    prefix: int = 0
    grid: tuple[int, int] | None = None

    def apply(self, t: Tensor) -> Tensor:
        if self.mode == "tokens":
            assert self.grid is not None
            h, w = self.grid
            patches = t[:, self.prefix:, :]
            return patches.reshape(t.shape[0], h, w, t.shape[-1]).permute(0, 3, 1, 2)
        if self.mode == "channels_last":
            return t.permute(0, 3, 1, 2)
        return t


def check_reshape_options(reshape: str, prefix_tokens: int | None,
                          grid: Sequence[int] | None) -> tuple[str, int | None, tuple[int, int] | None]:
    """Validate the explainer options; returns them normalised (grid as a tuple)."""
    if reshape not in RESHAPES:
        raise unknown_choice("reshape", reshape, RESHAPES)
    if prefix_tokens is not None and (isinstance(prefix_tokens, bool) or not isinstance(
            prefix_tokens, numbers.Integral) or prefix_tokens < 0):
        raise ConfigError(f"prefix_tokens must be an integer ≥0 or None; got {prefix_tokens!r}.")
    if grid is not None:
        ok = (isinstance(grid, Sequence) and not isinstance(grid, str) and len(grid) == 2
              and all(isinstance(v, numbers.Integral) and not isinstance(v, bool) and v > 0 for v in grid))
        if not ok:
            raise ConfigError(f"grid must be [h, w] (two positive integers) or None; got {grid!r}.")
        grid = (int(grid[0]), int(grid[1]))
    return reshape, None if prefix_tokens is None else int(prefix_tokens), grid


def _model_prefix_tokens(model: nn.Module) -> int | None:
    """Prefix tokens the model declares: ``num_prefix_tokens`` (timm: class, distillation and
    register tokens; xaudit's transformer backbones set it too), or 1 for torchvision's ViT
    (``class_token``)."""
    for m in model.modules():
        n = getattr(m, "num_prefix_tokens", None)
        if isinstance(n, numbers.Integral) and not isinstance(n, bool):
            return int(n)
    for m in model.modules():
        if isinstance(getattr(m, "class_token", None), nn.Parameter):
            return 1
    return None


def _grid_pair(g: object) -> tuple[int, int] | None:
    if isinstance(g, Sequence) and len(g) == 2 and all(
            isinstance(v, numbers.Integral) and not isinstance(v, bool) for v in g):
        return int(g[0]), int(g[1])
    return None


def _model_grids(model: nn.Module) -> list[tuple[int, int]]:
    """Patch grids the model declares: xaudit backbones' ``patch_grid``, timm's
    ``patch_embed.grid_size`` (the grid at the model's configured image size)."""
    grids = []
    for m in model.modules():
        for g in (getattr(m, "patch_grid", None), getattr(getattr(m, "patch_embed", None), "grid_size", None)):
            pair = _grid_pair(g)
            if pair is not None:
                grids.append(pair)
    return grids


def _channels_last_model(model: nn.Module) -> bool:
    """Whether the model's blocks emit [B,H,W,C]: Swin (timm or torchvision), an xaudit backbone
    with ``feature_layout == "nhwc"`` or a timm model declaring ``output_fmt == "NHWC"``."""
    for m in model.modules():
        if "swin" in type(m).__name__.lower() or getattr(m, "feature_layout", None) == "nhwc":
            return True
        if hasattr(m, "num_classes") and str(getattr(m, "output_fmt", "")).upper().endswith("NHWC"):
            return True
    return False


def _grid_for(n: int, input_size: tuple[int, int]) -> tuple[int, int] | None:
    """An h×w grid with h·w = n and the input's aspect ratio, or None."""
    r = math.isqrt(n)
    if r * r == n and input_size[0] == input_size[1]:
        return r, r
    hin, win = input_size
    for h in range(1, n + 1):
        if n % h == 0 and h * win == (n // h) * hin:
            return h, n // h
    return None


def _fix(layer: str) -> str:
    return (f"pass target_layer=<a block's output or norm> (e.g. a transformer block whose output is [B,T,C] "
            f"tokens or a [B,C,h,w] feature map) instead of {layer!r}, or set reshape= "
            f"{'|'.join(RESHAPES)} (with prefix_tokens= / grid= for token sequences)")


def feature_map_layout(model: nn.Module, layer: str, shape: Sequence[int], input_size: tuple[int, int], *,
                       reshape: str = "auto", prefix_tokens: int | None = None,
                       grid: tuple[int, int] | None = None) -> FeatureMapLayout:
    """How ``layer``'s output of ``shape`` becomes [B,C,h,w].

    ``reshape="auto"``: rank 3 [B,T,C] → tokens; rank 4 → channels-last when the model is a
    Swin / NHWC model and the shape is not plainly [B,C,h,w] (h == w ≠ C with the first two
    sizes differing), else unchanged (every CNN layer keeps its existing behaviour). Anything
    else is an error naming the layer, its shape and the fix.

    Tokens: prefix = ``prefix_tokens`` or the model's (timm ``num_prefix_tokens``, torchvision
    class token) or, for an unknown model, 0/1/2 — the fewest that leave a square count;
    grid = ``grid`` or the model's ``patch_grid`` (xaudit backbones) / timm's ``patch_embed.grid_size``
    when it matches the patch count, else
    the h×w with the input's aspect ratio (a square for square inputs).
    """
    shape = tuple(int(s) for s in shape)
    mode = reshape
    if mode == "auto":
        if len(shape) == 3:
            mode = "tokens"
        elif len(shape) == 4:
            plainly_nchw = shape[2] == shape[3] and shape[1] != shape[2]
            mode = "channels_last" if _channels_last_model(model) and not plainly_nchw else "none"
        else:
            raise ConfigError(
                f"target_layer {layer!r} outputs shape {shape}; CAM methods need a [B,K,h,w] feature map (a conv "
                f"block, not the head) or a transformer block's [B,T,C] tokens / [B,H,W,C] Swin grid; {_fix(layer)}.")
    if mode == "none":
        if len(shape) != 4:
            raise ConfigError(f"target_layer {layer!r} outputs shape {shape}; reshape='none' needs a [B,K,h,w] "
                              f"feature map (a conv block, not the head); {_fix(layer)}.")
        return FeatureMapLayout("none")
    if mode == "channels_last":
        if len(shape) != 4:
            raise ConfigError(f"target_layer {layer!r} outputs shape {shape}; reshape='channels_last' needs a "
                              f"[B,H,W,C] grid; {_fix(layer)}.")
        return FeatureMapLayout("channels_last")
    # tokens
    if len(shape) != 3:
        raise ConfigError(f"target_layer {layer!r} outputs shape {shape}; reshape='tokens' needs a [B,T,C] token "
                          f"sequence; {_fix(layer)}.")
    t = shape[1]
    prefix = prefix_tokens if prefix_tokens is not None else _model_prefix_tokens(model)
    if prefix is None:
        prefix = next((p for p in (0, 1, 2) if t > p and math.isqrt(t - p) ** 2 == t - p), 0)
    n = t - prefix
    if n <= 0:
        raise ConfigError(f"target_layer {layer!r} outputs {t} tokens (shape {shape}) but prefix_tokens={prefix}: "
                          "no patch tokens are left; pass the right prefix_tokens= (class/distillation tokens).")
    if grid is not None:
        if grid[0] * grid[1] != n:
            raise ConfigError(
                f"target_layer {layer!r} outputs {t} tokens (shape {shape}); minus {prefix} prefix tokens that is "
                f"{n} patch tokens, which do not form grid={list(grid)} ({grid[0] * grid[1]} tokens). Pass the "
                "patch grid of this input size, or the right prefix_tokens=.")
        return FeatureMapLayout("tokens", prefix, grid)
    hw = next((g for g in _model_grids(model) if g[0] * g[1] == n), None) or _grid_for(n, input_size)
    if hw is None:
        raise ConfigError(
            f"target_layer {layer!r} outputs {t} tokens (shape {shape}); minus {prefix} prefix tokens that is {n} "
            f"patch tokens, which form no grid with the input's aspect ratio {input_size[0]}×{input_size[1]} "
            "(not a square number). Pass prefix_tokens= (class/distillation/register tokens before the patches) "
            "and/or grid=[h, w], or reshape='none' with a [B,K,h,w] layer.")
    return FeatureMapLayout("tokens", prefix, hw)
