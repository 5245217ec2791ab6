"""Sanity checks for saliency maps (Adebayo et al., NeurIPS 2018): model-parameter randomisation.

An explanation that still looks the same after the model's weights are destroyed does not
explain the model. :class:`SanityCheck` randomises a *copy* of the model layer by layer and
compares the maps before and after with Spearman rank correlation and SSIM.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Callable, Sequence
from typing import Any, ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _NormBase
from torch.nn.modules.conv import _ConvNd

from xaudit.metrics.base import (
    ModelHolder,
    XAuditMetric,
    check_attribution,
    check_images,
    check_target,
)
from xaudit.metrics.perturbation import pearson
from xaudit.metrics.registry import register_metric
from xaudit.utils.errors import ConfigError, unknown_choice
from xaudit.utils.validation import choice

MODES: tuple[str, ...] = ("cascading", "independent")
SIMILARITIES: tuple[str, ...] = ("spearman", "ssim")
SSIM_WINDOW = 7  # skimage's default window


# -- similarities ---------------------------------------------------------------------------
def average_ranks(v: Tensor) -> Tensor:
    """Row-wise ranks 1..N of [B,N] values, ties sharing their average rank (as scipy.stats.rankdata)."""
    n = v.shape[1]
    s, order = v.sort(dim=1, stable=True)
    pos = torch.arange(n, device=v.device).expand_as(s)
    starts = torch.ones_like(s, dtype=torch.bool)
    starts[:, 1:] = s[:, 1:] != s[:, :-1]
    ends = torch.ones_like(s, dtype=torch.bool)
    ends[:, :-1] = s[:, :-1] != s[:, 1:]
    first = torch.where(starts, pos, 0).cummax(dim=1).values
    last = torch.where(ends, pos, n - 1).flip(1).cummin(dim=1).values.flip(1)
    dtype = torch.float32 if v.device.type == "mps" else torch.float64
    avg = (first + last).to(dtype) / 2 + 1
    return torch.empty_like(avg).scatter_(1, order, avg)


def spearman(a: Tensor, b: Tensor) -> Tensor:
    """Row-wise Spearman rank correlation of [B,N] tensors (NaN where a row is constant)."""
    return pearson(average_ranks(a), average_ranks(b))


def ssim(a: Tensor, b: Tensor, win_size: int = SSIM_WINDOW, k1: float = 0.01, k2: float = 0.03) -> Tensor:
    """Mean SSIM (Wang et al., 2004) of [B,H,W] maps, one value per pair.

    Same conventions as ``skimage.metrics.structural_similarity`` with its defaults (uniform
    ``win_size`` window, sample covariance, border windows excluded) and, as Quantus does for
    explanations, the data range taken per pair as max − min over both maps.
    """
    if min(a.shape[-2:]) < win_size:
        raise ValueError(f"ssim needs maps of at least {win_size}x{win_size} pixels; got {list(a.shape[-2:])}.")
    dtype = torch.float32 if a.device.type == "mps" else torch.float64
    a, b = a.to(dtype), b.to(dtype)
    both = torch.cat([a.flatten(1), b.flatten(1)], dim=1)
    data_range = (both.amax(1) - both.amin(1))[:, None, None]

    def mean(t: Tensor) -> Tensor:
        return F.avg_pool2d(t[:, None], win_size, stride=1)[:, 0]

    return ssim_map(a, b, mean, win_size**2, data_range, k1, k2).mean(dim=(1, 2))


def ssim_map(a: Tensor, b: Tensor, mean: Callable[[Tensor], Tensor], n: int, data_range: Tensor, k1: float,
             k2: float) -> Tensor:
    """The SSIM of each window (Wang et al., 2004): ``mean`` averages over windows of ``n`` values
    (sample covariance, as skimage), ``data_range`` broadcasts against the windows."""
    cov_norm = n / (n - 1)
    ux, uy = mean(a), mean(b)
    vx = cov_norm * (mean(a * a) - ux * ux)
    vy = cov_norm * (mean(b * b) - uy * uy)
    vxy = cov_norm * (mean(a * b) - ux * uy)
    c1, c2 = (k1 * data_range) ** 2, (k2 * data_range) ** 2
    return ((2 * ux * uy + c1) * (2 * vxy + c2)) / ((ux**2 + uy**2 + c1) * (vx + vy + c2))


# -- randomisation --------------------------------------------------------------------------
def parameter_layers(model: nn.Module) -> list[str]:
    """Names of the modules that own parameters, in registration order (input side first)."""
    return [name for name, m in model.named_modules() if next(m.parameters(recurse=False), None) is not None]


@torch.no_grad()
def randomise_(module: nn.Module, seed: int) -> None:
    """Re-initialise every parameter of ``module`` (and its sub-modules) in place.

    Each parameter-owning sub-module draws from its own local generator seeded with ``seed`` and
    follows PyTorch's ``reset_parameters``: Kaiming-uniform weights for convolutions and linear
    layers, identity for normalisation layers (running statistics reset too). So a layer's random
    weights do not depend on which other layers were randomised before it, and they equal those of
    Quantus' ``MPRT(seed=seed - 1)``. Other parameters are re-drawn from N(0, std of the original).
    Draws are made in float32 and cast to the parameter's dtype: a float64 or bfloat16 copy of a model
    gets the float32 model's random weights (rounded), not another stream of random numbers.
    """
    for leaf in module.modules():
        own = list(leaf.parameters(recurse=False))
        if not own:
            continue
        g = torch.Generator(device=own[0].device).manual_seed(int(seed))
        if isinstance(leaf, (_ConvNd, nn.Linear)):
            weight = leaf.weight
            weight.copy_(nn.init.kaiming_uniform_(_fresh(weight), a=math.sqrt(5), generator=g))
            if leaf.bias is not None:
                fan_in, _ = nn.init._calculate_fan_in_and_fan_out(weight)
                bound = 1 / math.sqrt(fan_in) if fan_in > 0 else 0.0
                leaf.bias.copy_(nn.init.uniform_(_fresh(leaf.bias), -bound, bound, generator=g))
        elif isinstance(leaf, (_NormBase, nn.GroupNorm, nn.LayerNorm)):
            leaf.reset_parameters()  # deterministic: ones, zeros, fresh running statistics
        else:
            for p in own:
                _redraw_(p, g)


@torch.no_grad()
def randomise_parameter_(param: Tensor, seed: int) -> None:
    """Re-draw one parameter in place from N(0, std of the original) (N(0, 1) when that std is 0 or
    undefined), with a local generator seeded with ``seed``: the draw ``randomise_`` makes for a
    parameter of a module without a ``reset_parameters`` rule (class tokens, position embeddings)."""
    _redraw_(param, torch.Generator(device=param.device).manual_seed(int(seed)))


def _redraw_(p: Tensor, g: torch.Generator) -> None:
    std = float(p.float().std()) if p.numel() > 1 else 1.0
    p.copy_(_fresh(p).normal_(0.0, std if math.isfinite(std) and std > 0 else 1.0, generator=g))


def _fresh(p: Tensor) -> Tensor:
    """An uninitialised float32 tensor shaped like ``p`` on its device (where random draws are made)."""
    return torch.empty(p.shape, dtype=torch.float32, device=p.device)


def _attention_types() -> tuple[type, ...]:
    """Attention classes importable here (timm's, torchvision Swin's); others are caught by class name."""
    types: list[type] = [nn.MultiheadAttention]
    try:
        from timm.layers.attention import Attention

        types.append(Attention)
    except ImportError:  # timm missing or laid out differently: the name rule still finds it
        pass
    try:
        from torchvision.models.swin_transformer import ShiftedWindowAttention

        types.append(ShiftedWindowAttention)  # ShiftedWindowAttentionV2 subclasses it
    except ImportError:
        pass
    return tuple(types)


def attention_modules(net: nn.Module) -> list[str]:
    """Names of ``net``'s attention modules, by type or a class name ending in "Attention" (one
    nested inside another attention module is not counted)."""
    types = _attention_types()
    found: list[str] = []
    for name, m in net.named_modules():  # pre-order: an enclosing attention module comes first
        if (isinstance(m, types) or type(m).__name__.endswith("Attention")) and not any(
                _within(name, a) for a in found):
            found.append(name)
    return found


def _within(name: str, ancestor: str) -> bool:
    """Whether module ``name`` is ``ancestor`` or lies inside it ("" is the root)."""
    return ancestor == "" or name == ancestor or name.startswith(ancestor + ".")


def block_layers(net: nn.Module) -> list[str]:
    """Steps of the cascade, output side first: module names, or parameter names for embeddings.

    For each module that owns parameters (``parameter_layers`` order, input side first):

    * inside a transformer block, the step is the block: the shallowest ancestor (or the module
      itself; never the root) that contains exactly one attention module and owns no parameters of
      its own unless it is that attention module. timm "blocks.3", torchvision ViT
      "encoder.layers.encoder_layer_3", Swin "features.1.0";
    * a module that owns parameters *and* has sub-modules with parameters (the root's ``cls_token``
      and ``pos_embed``, torchvision ViT's ``class_token`` and ``encoder.pos_embedding``): one step per
      such parameter, named by its full parameter name, which :func:`cascade` randomises alone.
      Randomising the owning module would re-draw everything below it (for the root: the whole
      model in one step);
    * otherwise its parent ("features.block5", "layer4.0"), or the module itself when it has no
      parent or its parent contains attention (timm "norm", torchvision ViT "encoder.ln"). On a
      network without attention or such parameters (every CNN backbone here) this is the parent
      rule alone, as in earlier versions.

    Order: first appearance in ``named_parameters`` order, reversed, so a model's own embeddings
    (registered on the root, listed first) are the last steps: timm ViT
    ["head", "norm", "blocks.3", ..., "blocks.0", "patch_embed", "pos_embed", "cls_token"].
    """
    modules = dict(net.named_modules())
    attention = attention_modules(net)

    def count(name: str) -> int:
        return sum(_within(a, name) for a in attention)

    def owns(name: str) -> bool:
        return next(modules[name].parameters(recurse=False), None) is not None

    steps: list[str] = []
    for layer in parameter_layers(net):
        parts = layer.split(".") if layer else []
        candidates = (".".join(parts[:i]) for i in range(1, len(parts) + 1))
        block = next((c for c in candidates if count(c) == 1 and (c in attention or not owns(c))), None)
        if block is not None:
            steps.append(block)
            continue
        own = _own_parameter_steps(net, layer)
        if own:
            steps.extend(own)
            continue
        parent = layer.rsplit(".", 1)[0] if "." in layer else layer
        steps.append(layer if attention and count(parent) else parent)
    return list(dict.fromkeys(steps))[::-1]


def randomise_step_(model: nn.Module, name: str, seed: int) -> None:
    """Randomise one cascade step of ``model`` in place: a module with its sub-modules
    (:func:`randomise_`), or one parameter alone (:func:`randomise_parameter_`).

    Module and parameter names cannot clash: PyTorch refuses an attribute registered as both.
    """
    modules = dict(model.named_modules())
    if name in modules:
        randomise_(modules[name], seed)
        return
    params = dict(model.named_parameters())
    if name in params:
        randomise_parameter_(params[name], seed)
        return
    check_steps(model, [name])


def parameter_steps(model: nn.Module) -> list[str]:
    """The modules that own parameters (``parameter_layers``), input side first, except that a module
    which owns parameters *and* has sub-modules with parameters (a ViT's root with ``cls_token`` and
    ``pos_embed``) gives one step per own parameter, by parameter name: randomising that module would
    re-draw everything below it. On a CNN this is ``parameter_layers`` itself."""
    return [step for layer in parameter_layers(model) for step in _own_parameter_steps(model, layer) or [layer]]


def _own_parameter_steps(model: nn.Module, layer: str) -> list[str]:
    """The names of ``layer``'s own parameters when it also has sub-modules with parameters, else []."""
    module = model.get_submodule(layer)
    if not any(next(c.parameters(), None) is not None for c in module.children()):
        return []
    prefix = f"{layer}." if layer else ""
    return [prefix + n for n, _ in module.named_parameters(recurse=False)]


def check_steps(model: nn.Module, steps: Sequence[str], key: str = "layers") -> None:
    """Raise naming the choices unless every step is a module name or a parameter name of ``model``
    (the choices listed: the modules and the parameters :func:`parameter_steps` splits off)."""
    modules = [n for n, _ in model.named_modules() if n]
    allowed = {*modules, *(n for n, _ in model.named_parameters())}
    for name in steps:
        if name not in allowed:
            split = [s for layer in parameter_layers(model) for s in _own_parameter_steps(model, layer)]
            raise unknown_choice("layer", name, modules + split, key=key)


@register_metric("sanity_check")
class SanityCheck(ModelHolder, XAuditMetric):
    """Model-parameter randomisation test of Adebayo et al., "Sanity checks for saliency maps", 2018.

    A deep copy of the model is randomised one layer at a time from the top (output) layer down:
    ``cascading`` keeps the earlier randomisations, ``independent`` restores them so only one
    layer is random at a time. After each layer the explainer ``explainer`` (built with
    ``xaudit.explainers.create(explainer, copy, **explainer_kwargs)``) re-explains the batch, and
    the map is compared with the original one by Spearman rank correlation and SSIM (both on
    absolute values when ``absolute``, as in the paper). A method that passes shows *low*
    similarity: ``higher_is_better=False``.

    ``update(x, attr, target)``: ``attr`` is the explainer's map on the original model [B,H,W].
    ``compute()`` is the mean ``similarity`` over samples and layers (Quantus' "average
    correlation"); :meth:`layer_scores` gives [N, layers] for the cascading curve.
    ``layers``: module or parameter names (top first) to randomise as one step each; default
    :func:`parameter_steps`, last registered first (every module that owns parameters; a ViT's class
    token and position embedding as steps of their own). The caller's model is never touched.
    """

    family = "randomisation"
    measures = "similarity of the maps after the model's weights are randomised (low = passes)"

    higher_is_better: ClassVar[bool] = False
    paper: ClassVar[str] = "Adebayo et al., Sanity checks for saliency maps, NeurIPS 2018"

    def __init__(
        self,
        model: nn.Module,
        explainer: str = "saliency",
        explainer_kwargs: dict[str, Any] | None = None,
        mode: str = "cascading",
        layers: Sequence[str] | None = None,
        similarity: str = "spearman",
        absolute: bool = True,
        seed: int = 0,
        **kwargs: Any,
    ) -> None:
        super().__init__(**kwargs)
        self._hold(model)
        self.explainer = str(explainer)
        self.explainer_kwargs = dict(explainer_kwargs or {})
        self.mode = choice(mode, MODES, "mode")
        self.similarity = choice(similarity, SIMILARITIES, "similarity")
        self.absolute = bool(absolute)
        self.seed = int(seed)
        if layers is None:
            self.layers = parameter_steps(model)[::-1]
        else:
            self.layers = [str(name) for name in layers]
            check_steps(model, self.layers)
        if not self.layers:
            raise ConfigError("SanityCheck: the model has no parameters to randomise.")
        check_explainer_name(self.explainer)
        for sim in SIMILARITIES:
            self.add_state(f"{sim}_values", default=[], dist_reduce_fx="cat")

    def update(self, x: Tensor, attr: Tensor, target: Tensor) -> None:
        """Randomise a copy layer by layer, re-explain the batch, compare with ``attr``."""
        from xaudit.explainers import create

        name = type(self).__name__
        check_images(x, name)
        check_attribution(attr, name, x=x)
        check_target(target, x.shape[0], name)
        # SSIM needs 7x7 windows: on smaller maps it is only an error when it is the metric's value
        has_ssim = min(x.shape[-2:]) >= SSIM_WINDOW
        if not has_ssim and self.similarity == "ssim":
            raise ValueError(f"{name}: similarity='ssim' needs maps of at least {SSIM_WINDOW}x{SSIM_WINDOW} "
                             f"pixels; got {list(x.shape[-2:])}. Use similarity='spearman'.")
        # gradients are needed on a fresh copy, even inside Lightning's inference mode
        with torch.inference_mode(False), torch.enable_grad():
            x, target = x.clone(), target.clone().to(x.device)
            original = self._prepare(attr.clone().to(x.device))
            model = copy.deepcopy(self.model)
            model.eval()
            explain = create(self.explainer, model, **self.explainer_kwargs)
            scores: dict[str, list[Tensor]] = {sim: [] for sim in SIMILARITIES}
            for layer in self.layers:
                saved = copy.deepcopy(model.state_dict()) if self.mode == "independent" else None
                randomise_step_(model, layer, self.seed)
                for sim, value in self._similarities(original, explain.attribute(x, target), has_ssim).items():
                    scores[sim].append(value)
                if saved is not None:
                    model.load_state_dict(saved)
        for sim in SIMILARITIES:
            getattr(self, f"{sim}_values").append(torch.stack(scores[sim], dim=1))
        self._add_values(torch.stack(scores[self.similarity], dim=1).nanmean(dim=1))

    def _similarities(self, original: Tensor, randomised: Tensor, has_ssim: bool) -> dict[str, Tensor]:
        """Spearman and SSIM per sample; NaN where a randomised map is not finite (or SSIM impossible)."""
        randomised = self._prepare(randomised)
        defined = torch.isfinite(randomised.flatten(1)).all(1)
        clean = randomised.nan_to_num(0.0, 0.0, 0.0)
        nan = torch.full(defined.shape, float("nan"), dtype=torch.float64, device=defined.device)
        values = {"spearman": spearman(original.flatten(1), clean.flatten(1)).double(),
                  "ssim": ssim(original, clean).double() if has_ssim else nan}
        return {sim: torch.where(defined, v, nan) for sim, v in values.items()}

    def _prepare(self, a: Tensor) -> Tensor:
        a = a.detach().float()
        return a.abs() if self.absolute else a

    def layer_scores(self, similarity: str | None = None) -> Tensor:
        """Similarity per sample and randomisation step [N, len(layers)] (``similarity`` default: own)."""
        sim = choice(similarity or self.similarity, SIMILARITIES, "similarity")
        return self._gathered(f"{sim}_values")

    def per_layer(self, similarity: str | None = None) -> dict[str, float]:
        """Mean similarity over samples after each randomisation step, keyed by layer name."""
        scores = self.layer_scores(similarity)
        if scores.numel() == 0:
            return {}
        return {layer: float(v) for layer, v in zip(self.layers, scores.nanmean(dim=0).tolist())}


def check_explainer_name(name: str) -> None:
    """Fail at construction, not mid-epoch, on an unknown explainer name."""
    try:
        from xaudit.explainers import names
    except ImportError:  # explainers not importable: the error surfaces at update
        return
    known = names()
    if name not in known:
        raise unknown_choice("explainer", name, known, key="explainer")
