"""PatternNet and PatternAttribution (Kindermans et al., 2018, "Learning how to explain neural
networks: PatternNet and PatternAttribution").

A linear neuron ``y = wᵀx`` sees signal plus distractor, ``x = s + d``; its weight w must cancel
the distractor, so it does not show the signal. The *pattern* ``a = cov[x, y] / (wᵀ cov[x, y])``
is the signal direction (``s = a·y``); for ReLU layers the two-component estimator computes it on
the samples where the neuron is active (``y > 0``), the half of the data that the layer passes on.
:meth:`fit` estimates one pattern per output channel of every Conv/Linear layer from a
datamodule; they are stored (:meth:`state_dict`, :meth:`save`) and reused.

- ``pattern_net``: the backward pass of the gradient with every weight replaced by its pattern,
  started at the target logit y: the estimated signal (for a linear model ``a·y``).
- ``pattern_attribution``: the same with weights ``w ⊙ a``: relevance with root point
  ``x − a·wᵀx``; for a linear model it sums to y.

Both run on autograd: a layer's forward returns its normal output, and its backward multiplies
by the pattern instead of the weight (the same mechanism as LRP, see
:mod:`xaudit.explainers.relevance`); BatchNorm is merged into the layer before it, both when
fitting and when explaining (see :mod:`xaudit.explainers.canonizers`).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from xaudit.explainers.base import Explainer, Target, UnsupportedModelError, explain_mode
from xaudit.explainers.canonizers import (
    CANONIZERS,
    Affine,
    MergeCache,
    affine_of,
    forward_overrides,
    identity_forward,
    resnet_block_forward,
)
from xaudit.explainers.fit_data import iter_images
from xaudit.explainers.registry import register
from xaudit.explainers.rerouting import RELU_FUNCS, reroute
from xaudit.utils.errors import ConfigError, unknown_choice

ESTIMATORS: tuple[str, ...] = ("auto", "relu", "linear")


class PatternsNotFittedError(RuntimeError):
    """A pattern explainer was asked for an attribution before its patterns were estimated."""


def _pattern_layers(model: nn.Module) -> dict[str, nn.Module]:
    """Every Conv1d/Conv2d/Linear layer; other parametrised conv layers are an error."""
    layers: dict[str, nn.Module] = {}
    for name, m in model.named_modules():
        if isinstance(m, nn.Linear):
            layers[name] = m
        elif isinstance(m, nn.Conv1d | nn.Conv2d):
            if m.padding_mode != "zeros" or isinstance(m.padding, str):
                raise UnsupportedModelError(
                    f"pattern estimation supports convolutions with zero padding given as numbers; layer {name!r} has "
                    f"padding={m.padding!r}, padding_mode={m.padding_mode!r}.")
            layers[name] = m
        elif isinstance(m, nn.Conv3d | nn.ConvTranspose1d | nn.ConvTranspose2d | nn.ConvTranspose3d):
            raise UnsupportedModelError(f"pattern estimation does not support {type(m).__name__} (layer {name!r}).")
    if not layers:
        raise UnsupportedModelError("the model has no Conv/Linear layer to estimate signal patterns for.")
    return layers


_PATCH_BUDGET = 1 << 24


def _kernel_numel(layer: nn.Module) -> int:
    k = getattr(layer, "kernel_size", (1,))
    out = 1
    for v in k:
        out *= int(v)
    return out


def _patches(module: nn.Module, x: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:
    """Inputs [n, G, D] and outputs [n, G, O/G] of every application of the layer's filters, per
    group G of a grouped convolution (G = 1 otherwise)."""
    if isinstance(module, nn.Linear):
        return x.reshape(-1, 1, x.shape[-1]), z.reshape(-1, 1, z.shape[-1])
    conv: Any = module
    if isinstance(module, nn.Conv1d):
        x, z = x.unsqueeze(2), z.unsqueeze(2)
        k, s, p, d = (1, *conv.kernel_size), (1, *conv.stride), (0, *conv.padding), (1, *conv.dilation)
    else:
        k, s, p, d = conv.kernel_size, conv.stride, conv.padding, conv.dilation
    g = conv.groups
    cols = F.unfold(x, k, dilation=d, padding=p, stride=s)  # [B, C·k·k, L], channel-major
    b, dk, length = cols.shape
    xs = cols.view(b, g, dk // g, length).permute(0, 3, 1, 2).reshape(-1, g, dk // g)
    ys = z.flatten(2).view(b, g, z.shape[1] // g, length).permute(0, 3, 1, 2).reshape(-1, g, z.shape[1] // g)
    return xs, ys


class _Stats:
    """Running sums for the linear and the two-component (y > 0) estimators of one layer, per
    filter group: inputs [G, D], outputs [G, O/G]."""

    def __init__(self, g: int, d: int, o: int, device: torch.device) -> None:
        def zeros(*shape: int) -> Tensor:
            return torch.zeros(shape, dtype=torch.float64, device=device)

        self.n, self.sx, self.sxx = zeros(), zeros(g, d), zeros(g, d)
        self.sy, self.syy, self.sxy = zeros(g, o), zeros(g, o), zeros(g, o, d)
        self.np_, self.sxp, self.sxxp = zeros(g, o), zeros(g, o, d), zeros(g, o, d)
        self.syp, self.syyp, self.sxyp = zeros(g, o), zeros(g, o), zeros(g, o, d)

    def add(self, x: Tensor, y: Tensor) -> None:
        """``x`` [n, G, D], ``y`` [n, G, O/G]."""
        x, y = x.double(), y.double()
        pos = (y > 0).double()
        yp = y * pos
        xx = x * x
        self.n += x.shape[0]
        self.sx += x.sum(0)
        self.sxx += xx.sum(0)
        self.sy += y.sum(0)
        self.syy += (y * y).sum(0)
        self.sxy += torch.einsum("ngo,ngd->god", y, x)
        self.np_ += pos.sum(0)
        self.sxp += torch.einsum("ngo,ngd->god", pos, x)
        self.sxxp += torch.einsum("ngo,ngd->god", pos, xx)
        self.syp += yp.sum(0)
        self.syyp += (yp * y).sum(0)
        self.sxyp += torch.einsum("ngo,ngd->god", yp, x)

    def pattern(self, weight: Tensor, positive: bool, shrinkage: float | str) -> Tensor:
        """``a = cov[x, y] / (wᵀ cov[x, y])`` per output channel, from the samples with y > 0 when
        ``positive``; zero where y has no variance.

        With shrinkage λ the input covariance Σ is replaced by ``(1 − λ)Σ + λ·(tr Σ / D)·I``, so
        ``a = ((1 − λ) cov + λμw) / ((1 − λ) var y + λμ|w|²)``: toward the isotropic pattern
        ``w/|w|²`` when there are few samples for the D input dimensions. ``"auto"``:
        λ = D / (n + D), which vanishes as the sample count n grows.
        """
        w = weight.detach().double().reshape(weight.shape[0], -1)
        d = w.shape[1]
        g, o = self.sy.shape
        if positive:
            n, sx, sxx, sy, syy, sxy = self.np_, self.sxp, self.sxxp, self.syp, self.syyp, self.sxyp
        else:
            n = self.n.expand_as(self.sy)
            sx, sxx = self.sx[:, None].expand(g, o, d), self.sxx[:, None].expand(g, o, d)
            sy, syy, sxy = self.sy, self.syy, self.sxy
        # one row per output channel: [G, O/G, …] → [O, …]
        n, sy, syy = n.reshape(-1), sy.reshape(-1), syy.reshape(-1)
        sx, sxx, sxy = sx.reshape(-1, d), sxx.reshape(-1, d), sxy.reshape(-1, d)
        m = n.clamp(min=1)[:, None]
        ex, ey = sx / m, sy / m[:, 0]
        cov = sxy / m - ey[:, None] * ex
        var_y = (cov * w).sum(1)  # = var(y), as y = wᵀx + b
        mu = (sxx / m - ex * ex).clamp(min=0).mean(1)  # tr Σ / D
        lam = d / (n + d) if shrinkage == "auto" else torch.full_like(n, float(shrinkage))
        num = (1 - lam)[:, None] * cov + (lam * mu)[:, None] * w
        den = (1 - lam) * var_y + lam * mu * (w * w).sum(1)
        scale = (1 - lam) * syy / m[:, 0] + lam * mu * (w * w).sum(1)
        valid = (n >= 2) & (den > 1e-10 * scale.clamp(min=1e-30))
        a = torch.where(valid[:, None], num / torch.where(valid, den, 1)[:, None], 0)
        return a.reshape(weight.shape).to(weight.dtype)


class _ReluWatch(TorchFunctionMode):
    """Notes which layers' outputs go straight into a ReLU (they get the two-component estimator):
    a layer counts as rectified only if every output it produced, in every forward, was."""

    def __init__(self) -> None:
        super().__init__()
        self.outputs: dict[int, tuple[str, Tensor, list[bool]]] = {}
        self.rectified: dict[str, bool] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in RELU_FUNCS:
            x = args[0] if args else kwargs.get("input")
            hit = self.outputs.get(id(x))
            if hit is not None and hit[1] is x:
                hit[2][0] = True
        return func(*args, **kwargs)

    def layer_output(self, name: str, z: Tensor) -> None:
        self.outputs[id(z)] = (name, z, [False])

    def end_forward(self) -> None:
        for name, _, hit in self.outputs.values():
            self.rectified[name] = self.rectified.get(name, True) and hit[0]
        self.outputs.clear()


class PatternExplainer(Explainer):
    """Shared base of PatternNet / PatternAttribution: pattern fitting, storage and the backward.

    ``estimator``: ``"auto"`` (two-component for layers whose output goes straight into a ReLU,
    linear otherwise — e.g. the logit layer), ``"relu"`` or ``"linear"`` for every layer.
    ``shrinkage``: λ in [0, 1] or ``"auto"`` (λ = D/(n + D) for n samples of D input dimensions;
    see :meth:`_Stats.pattern`): few samples per dimension otherwise give patterns whose
    products over many layers overflow. 0 is the paper's estimator.
    ``patterns``: a mapping from :meth:`state_dict` or a path written by :meth:`save`.
    ``fit_data`` (+ ``max_batches``): fit at construction (anything :meth:`fit` takes).
    ``canonizers``: ``merge_batchnorm`` folds eval-mode BatchNorm into its layer first.
    """

    def __init__(self, model: nn.Module, patterns: str | Path | Mapping[str, Any] | None = None,
                 estimator: str = "auto", fit_data: object = None, max_batches: int | None = None,
                 shrinkage: float | str = "auto", canonizers: Sequence[str] | None = ("merge_batchnorm",),
                 seed: int = 0) -> None:
        super().__init__(model)
        if estimator not in ESTIMATORS:
            raise unknown_choice("pattern estimator", estimator, ESTIMATORS)
        self.estimator = estimator
        if shrinkage != "auto" and not (isinstance(shrinkage, int | float) and 0 <= float(shrinkage) <= 1):
            raise ConfigError(f"shrinkage must be 'auto' or a number in [0, 1]; got {shrinkage!r}.")
        self.shrinkage = shrinkage
        self.canonizers = tuple(canonizers or ())
        for c in self.canonizers:
            if c not in CANONIZERS:
                raise unknown_choice("canonizer", c, CANONIZERS)
        self.seed = int(seed)
        self.layers = _pattern_layers(model)
        self.patterns: dict[str, Tensor] = {}
        self.estimators: dict[str, str] = {}
        self._merges = MergeCache()
        if patterns is not None:
            state = torch.load(Path(patterns), map_location="cpu", weights_only=True) if isinstance(
                patterns, str | Path) else patterns
            self.load_state_dict(state)
        if fit_data is not None:
            self.fit(fit_data, max_batches=max_batches)

    # -- storage ---------------------------------------------------------------------------

    @property
    def fitted(self) -> bool:
        return bool(self.patterns)

    def state_dict(self) -> dict[str, Any]:
        """``{"patterns": {layer: tensor}, "estimators": {layer: "relu" | "linear"}}`` — plain
        tensors and strings, loadable with ``torch.load(..., weights_only=True)``."""
        return {"patterns": {k: v.detach().cpu() for k, v in self.patterns.items()},
                "estimators": dict(self.estimators)}

    def load_state_dict(self, state: Mapping[str, Any]) -> None:
        """Use stored patterns; their layers and shapes must match this model."""
        if not isinstance(state, Mapping) or "patterns" not in state:
            raise ConfigError("patterns must be a state_dict() of a pattern explainer: {'patterns': {...}, ...}.")
        patterns = dict(state["patterns"])
        for name, p in patterns.items():
            if name not in self.layers:
                raise ConfigError(f"stored pattern for layer {name!r}, which this model does not have "
                                  f"(layers: {', '.join(self.layers)}).")
            weight = self.layers[name].weight
            if tuple(p.shape) != tuple(weight.shape):
                raise ConfigError(f"stored pattern for {name!r} has shape {tuple(p.shape)}, the layer's weight "
                                  f"{tuple(weight.shape)}.")
        self.patterns = {k: v.detach().to(device=self.layers[k].weight.device) for k, v in patterns.items()}
        self.estimators = dict(state.get("estimators", {}))

    def save(self, path: str | Path) -> Path:
        """Write :meth:`state_dict` with ``torch.save``; returns the path."""
        path = Path(path)
        torch.save(self.state_dict(), path)
        return path

    # -- fitting ---------------------------------------------------------------------------

    def _merge_plan(self, x: Tensor) -> tuple[dict[nn.Module, nn.Module], set[nn.Module]]:
        if "merge_batchnorm" not in self.canonizers:
            return {}, set()
        m = self.model
        merges = self._merges.get(m, lambda: m(x))
        into = {m.get_submodule(layer): m.get_submodule(bn) for layer, bn in merges.items()}
        return into, set(into.values())

    def _affines(self, into: dict[nn.Module, nn.Module]) -> dict[str, Affine]:
        out = {}
        for name, layer in self.layers.items():
            a = affine_of(layer, into.get(layer))  # type: ignore[arg-type]
            assert a is not None
            out[name] = a
        return out

    def _structure_overrides(self, bns: set[nn.Module]) -> dict[nn.Module, Callable[..., Any]]:
        overrides: dict[nn.Module, Callable[..., Any]] = dict.fromkeys(bns, identity_forward)
        for module in self.model.modules():
            fwd = resnet_block_forward(module, torch.add) if "resnet_skip" in self.canonizers else None
            if fwd is not None:
                overrides[module] = fwd
        return overrides

    def fit(self, data: object, max_batches: int | None = None) -> PatternExplainer:
        """Estimate every layer's patterns from ``data`` (a LightningDataModule — its train loader —,
        a DataLoader, an iterable of batches or a tensor [N,C,H,W]); at most ``max_batches``
        batches. The loader runs under a forked global RNG seeded with ``seed``. Returns self."""
        param = next(self.model.parameters())
        stats: dict[str, _Stats] = {}
        watch = _ReluWatch()
        seen_batches = 0
        with explain_mode(self.model), torch.no_grad(), torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.seed)
            for x in iter_images(data, max_batches):
                x = x.to(device=param.device, dtype=param.dtype)
                into, bns = self._merge_plan(x)
                affines = self._affines(into)
                overrides = self._structure_overrides(bns)
                for name, layer in self.layers.items():
                    overrides[layer] = self._fit_forward(name, layer, affines[name], stats, watch)
                with forward_overrides(overrides), watch:
                    self.model(x)
                watch.end_forward()
                seen_batches += 1
            if not seen_batches:
                raise ConfigError("the fit data yielded no batches.")
            if not stats:
                raise UnsupportedModelError("no Conv/Linear layer was called while fitting the patterns.")
            patterns, estimators = {}, {}
            for name, st in stats.items():
                relu = watch.rectified.get(name, False) if self.estimator == "auto" else self.estimator == "relu"
                patterns[name] = st.pattern(affines[name].weight, relu, self.shrinkage)
                estimators[name] = "relu" if relu else "linear"
        self.patterns, self.estimators = patterns, estimators
        return self

    @staticmethod
    def _fit_forward(name: str, layer: nn.Module, affine: Affine, stats: dict[str, _Stats],
                     watch: _ReluWatch) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            z = affine(x)
            # unfolded patches are k·k times the input: a few images at a time keep them ≤ ~16M values
            per_image = x.shape[1] * _kernel_numel(layer) * z[:1, :1].numel()  # C·k·k × positions
            step = max(1, _PATCH_BUDGET // per_image) if x.ndim > 2 else x.shape[0]
            for xb, zb in zip(x.split(step), z.split(step)):
                xs, ys = _patches(layer, xb, zb)
                if name not in stats:
                    stats[name] = _Stats(xs.shape[1], xs.shape[2], ys.shape[2], z.device)
                stats[name].add(xs, ys)
            watch.layer_output(name, z)
            return z
        return forward

    # -- attribution -----------------------------------------------------------------------

    def backward_weight(self, name: str, affine: Affine) -> Tensor:
        """The weight the backward pass uses in place of ``affine.weight``."""
        raise NotImplementedError

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        if not self.fitted:
            with torch.no_grad():
                target.indices(self._logits(x))  # a bad target is reported before the missing patterns
            raise PatternsNotFittedError(
                f"{self.name} has no signal patterns yet: call explainer.fit(datamodule, max_batches=...) first, or "
                "create it with fit_data=... or patterns=<file written by explainer.save(path)>.")
        into, bns = self._merge_plan(x)
        affines = self._affines(into)
        overrides = self._structure_overrides(bns)
        one = torch.ones((), device=x.device, dtype=x.dtype)
        for name, layer in self.layers.items():
            overrides[layer] = self._explain_forward(name, affines[name], one)
        xin = x.detach().requires_grad_(True)
        with forward_overrides(overrides):
            logits = self._logits(xin.clone())
            y = target.select(logits)
            (grad,) = torch.autograd.grad(y, xin, grad_outputs=y.detach())
        return grad

    def _explain_forward(self, name: str, affine: Affine, one: Tensor) -> Callable[[Tensor], Tensor]:
        def forward(x: Tensor) -> Tensor:
            with torch.no_grad():
                z = affine(x)
            if not x.requires_grad:
                return z
            if name not in self.patterns:
                raise PatternsNotFittedError(f"layer {name!r} ran but has no pattern (it was not called during fit); "
                                             "refit on data that exercises it.")
            q = affine(x, self.backward_weight(name, affine).to(dtype=x.dtype), None)
            return reroute(z, None, (q,), (one,))
        return forward


@register("pattern_net")
class PatternNet(PatternExplainer):
    """PatternNet (Kindermans et al., 2018): the signal estimate — the gradient's backward pass
    with each weight replaced by its pattern, started at the target logit (``a·y`` for a linear
    model). ReLU and max-pool gate as in the gradient. Default reduction: max |·| over channels."""

    default_reduce = "max_abs"

    def backward_weight(self, name: str, affine: Affine) -> Tensor:
        return self.patterns[name]


@register("pattern_attribution")
class PatternAttribution(PatternExplainer):
    """PatternAttribution (Kindermans et al., 2018): the backward pass with weights ``w ⊙ a``,
    started at the target logit — relevance with the root point ``x − a wᵀx``. Default reduction:
    sum over channels."""

    default_reduce = "sum"
    signed = True

    def backward_weight(self, name: str, affine: Affine) -> Tensor:
        return affine.weight * self.patterns[name]
