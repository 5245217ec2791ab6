"""DeepLIFT with the rescale rule (a ``TorchFunctionMode`` that replays the reference forward
with Δy/Δx at every nonlinearity) and DeepSHAP (DeepLIFT averaged over a baseline distribution)."""

from __future__ import annotations

import numbers
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.overrides import TorchFunctionMode

from xaudit.explainers.base import Explainer, Target, UnsupportedModelError
from xaudit.explainers.fit_data import iter_images
from xaudit.explainers.registry import register
from xaudit.explainers.rerouting import RELU_IN_PLACE, RELU_OUT_OF_PLACE, reroute
from xaudit.ops.fills import FillLike, make_fill
from xaudit.utils.errors import ConfigError
from xaudit.utils.validation import positive_int

# element-wise nonlinearities caught in any form (module, functional, method, in place):
# function -> index of its `inplace` argument (None: no such argument)
_ACTIVATIONS: dict[Any, int | None] = {
    **dict.fromkeys(RELU_OUT_OF_PLACE, None), F.relu: 1,
    F.elu: 2, F.leaky_relu: 2, F.relu6: 1, F.hardtanh: 3, F.silu: 1, F.mish: 1, F.hardswish: 1, F.hardsigmoid: 1,
    F.selu: 1, F.celu: 2, F.gelu: None, F.softplus: None,
    torch.sigmoid: None, Tensor.sigmoid: None, F.sigmoid: None, torch.tanh: None, Tensor.tanh: None, F.tanh: None,
}
_ACTIVATIONS_IN_PLACE = {*RELU_IN_PLACE, F.elu_, F.leaky_relu_, F.hardtanh_, F.celu_, F.selu_,
                         Tensor.sigmoid_, Tensor.tanh_, torch.sigmoid_, torch.tanh_}
_MAX_POOLS = {F.max_pool1d: 1, F.max_pool2d: 2, F.max_pool3d: 3}
_POOL_ARGS = ("input", "kernel_size", "stride", "padding", "dilation", "ceil_mode", "return_indices")
_RELUS = RELU_OUT_OF_PLACE | RELU_IN_PLACE | {F.relu}


class _InPlaceValue(torch.autograd.Function):
    """``x`` overwritten with ``y`` (the model asked for an in-place op); backward ``g·m``."""

    @staticmethod
    def forward(ctx: Any, x: Tensor, y: Tensor, m: Tensor) -> Tensor:  # type: ignore[override]
        x.copy_(y)
        ctx.mark_dirty(x)
        ctx.save_for_backward(m)
        return x

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        (m,) = ctx.saved_tensors
        return g * m, None, None


def _scatter(v: Tensor, idx: Tensor, shape: torch.Size) -> Tensor:
    """Sum ``v`` into the max-pool input positions ``idx`` (accumulates where windows overlap)."""
    out = v.new_zeros(shape).flatten(2)
    out.scatter_add_(2, idx.flatten(2), v.flatten(2))
    return out.view(shape)


class _DeepLiftMaxPool(torch.autograd.Function):
    """DeepLIFT rescale rule for max-pooling, as Captum: the output difference is split between
    the input's arg-max (``max(y, y₀) − y₀``) and the reference's (``y − max(y, y₀)``), divided by
    Δx; where |Δx| < eps the plain max-pool gradient is used."""

    @staticmethod
    def forward(  # type: ignore[override]
            ctx: Any, value: Tensor, x: Tensor, a: Tensor, c: Tensor, idx: Tensor, idx0: Tensor, dx: Tensor,
            eps: float) -> Tensor:
        ctx.mark_dirty(value)
        ctx.save_for_backward(a, c, idx, idx0, dx)
        ctx.eps = eps
        return value

    @staticmethod
    def backward(ctx: Any, g: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        a, c, idx, idx0, dx = ctx.saved_tensors
        u = _scatter(g * a, idx, dx.shape) + _scatter(g * c, idx0, dx.shape)
        plain = _scatter(g, idx, dx.shape)
        small = dx.abs() < ctx.eps
        return None, torch.where(small, plain, u / torch.where(small, 1, dx)), None, None, None, None, None, None


def _expand_ref(t: Tensor, rows: int) -> Tensor:
    """Reference activations [R,…] for ``rows`` main rows laid out as R groups of rows/R."""
    r = t.shape[0]
    if r == rows:
        return t
    if r == 1:
        return t.expand(rows, *t.shape[1:])
    return t.unsqueeze(1).expand(r, rows // r, *t.shape[1:]).reshape(rows, *t.shape[1:])


def _swap_input(args: tuple, kwargs: dict, x: Tensor) -> tuple[tuple, dict]:
    if args:
        return (x, *args[1:]), kwargs
    return args, {**kwargs, "input": x}


class _DeepLiftMode(TorchFunctionMode):
    """Record the reference forward (``refs is None``) or replay it with the rescale rule.

    Nonlinearities are matched by call order, so the model must run the same operations for
    the input and for the reference.
    """

    def __init__(self, eps: float, refs: list[tuple] | None = None) -> None:
        super().__init__()
        self.eps = eps
        self.recording = refs is None
        self.refs: list[tuple] = [] if refs is None else refs
        self.calls = 0

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in _MAX_POOLS:
            bound = dict(zip(_POOL_ARGS, args)) | kwargs
            if not bound.get("return_indices", False) and isinstance(bound.get("input"), Tensor):
                return self._pool(func, bound)
        elif func in _ACTIVATIONS or func in _ACTIVATIONS_IN_PLACE:
            x = args[0] if args else kwargs.get("input")
            if isinstance(x, Tensor):
                return self._activation(func, args, kwargs, x)
        return func(*args, **kwargs)

    def _next_ref(self, kind: str, shape: torch.Size) -> tuple:
        if self.calls >= len(self.refs) or self.refs[self.calls][0] != kind:
            raise UnsupportedModelError(
                "DeepLIFT: the model ran different nonlinearities for the input than for the baseline "
                "(data-dependent control flow); the rescale rule needs the same computation for both.")
        ref = self.refs[self.calls]
        self.calls += 1
        rows, r = shape[0], ref[1].shape[0]
        if tuple(ref[1].shape[1:]) != tuple(shape[1:]) or rows % r:
            raise UnsupportedModelError(f"DeepLIFT: a {kind} input has shape {tuple(shape)} for the input but "
                                        f"{tuple(ref[1].shape)} for the baseline.")
        return ref

    def _activation(self, func: Any, args: tuple, kwargs: dict, x: Tensor) -> Tensor:
        pos = _ACTIVATIONS.get(func)
        flag = kwargs.get("inplace", args[pos] if pos is not None and len(args) > pos else False)
        inplace = func in _ACTIVATIONS_IN_PLACE or bool(flag)
        if self.recording:
            x0 = x.detach().clone()
            y = func(*args, **kwargs)
            self.refs.append(("activation", x0, y.detach().clone()))
            return y
        _, x0, y0 = self._next_ref("activation", x.shape)
        if not x.requires_grad:
            return func(*args, **kwargs)
        with torch.no_grad():
            xd = x.detach().clone() if inplace else x.detach()
            a, k = _swap_input(args, kwargs, xd)
            y = func(*a, **k)
            if y is xd and not inplace:
                y = y.clone()
            rows = x.shape[0]
            dx = x.detach() - _expand_ref(x0, rows)
            dy = y - _expand_ref(y0, rows)
        slope = self._slope(func, args, kwargs, x, inplace)
        with torch.no_grad():
            small = dx.abs() < self.eps
            m = torch.where(small, slope, dy / torch.where(small, 1, dx))
        if inplace and not (x.is_leaf and x.requires_grad):
            return _InPlaceValue.apply(x, y, m)
        return reroute(y, None, (x,), (m,))

    @staticmethod
    def _slope(func: Any, args: tuple, kwargs: dict, x: Tensor, inplace: bool) -> Tensor:
        """The plain derivative at x (used where Δx ≈ 0, as Captum)."""
        if func in _RELUS:
            return (x.detach() > 0).to(x.dtype)
        with torch.enable_grad():
            leaf = x.detach().clone().requires_grad_(True)
            inp = leaf.clone() if inplace else leaf
            a, k = _swap_input(args, kwargs, inp)
            (d,) = torch.autograd.grad(func(*a, **k).sum(), leaf)
        return d

    def _pool(self, func: Any, bound: dict) -> Tensor:
        x: Tensor = bound["input"]
        opts = {k: bound[k] for k in _POOL_ARGS[1:6] if k in bound}
        if self.recording:
            y, idx = func(x, **opts, return_indices=True)
            self.refs.append(("max_pool", x.detach().clone(), y.detach().clone(), idx))
            return y
        _, x0, y0, idx0 = self._next_ref("max_pool", x.shape)
        if not x.requires_grad:
            return func(x, **opts)
        with torch.no_grad():
            y, idx = func(x.detach(), **opts, return_indices=True)
            rows = x.shape[0]
            y0e = _expand_ref(y0, rows)
            top = torch.maximum(y, y0e)
            a, c = top - y0e, y - top
            dx = x.detach() - _expand_ref(x0, rows)
            idx0e = _expand_ref(idx0, rows)
        return _DeepLiftMaxPool.apply(y, x, a, c, idx, idx0e, dx, self.eps)

    def finish(self) -> None:
        if self.calls != len(self.refs):
            raise UnsupportedModelError(
                f"DeepLIFT: the model ran {self.calls} nonlinearities for the input but {len(self.refs)} for the "
                "baseline (data-dependent control flow).")


def deeplift_gradient(explainer: Explainer, rows: Tensor, reference: Tensor, target: Target,
                      eps: float = 1e-10) -> tuple[Tensor, Tensor, Tensor]:
    """DeepLIFT multipliers ``∂ʳᵉˢᶜᵃˡᵉ y/∂x`` for ``rows`` [M,…] against ``reference`` [R,…]
    (row r uses reference row ``r // (M/R)``), and the logits of both forwards.

    The reference runs once without grad (its activations recorded); the input then runs once
    with the rescale rule at every nonlinearity, and one backward gives the multipliers. Linear
    layers (conv, linear, BatchNorm in eval mode, pooling by averages, sums) keep their gradient,
    which is DeepLIFT's linear rule.
    """
    recorder = _DeepLiftMode(eps)
    with torch.no_grad(), recorder:
        ref_logits = explainer._logits(reference)
    replay = _DeepLiftMode(eps, recorder.refs)
    xin = rows.detach().requires_grad_(True)
    with replay:
        logits = explainer._logits(xin.clone())
    replay.finish()
    (grad,) = torch.autograd.grad(target.select(logits).sum(), xin)
    return grad, logits.detach(), ref_logits


def _is_constant_fill(fill: object) -> bool:
    return (isinstance(fill, numbers.Real) and not isinstance(fill, bool)) or fill == "zero"


@register("deeplift")
class DeepLift(Explainer):
    """DeepLIFT with the rescale rule (Shrikumar et al., 2017): ``(x − x₀) ⊙ m`` with multipliers
    ``m`` from a backward in which each nonlinearity passes ``Δy/Δx`` instead of its derivative
    (the derivative where |Δx| < ``eps``; Captum's max-pool rule). Summation-to-delta: the
    per-channel map sums to ``f(x)_t − f(x₀)_t`` — the default reduction sums channels.

    ``baseline`` x₀: "zero", "mean", "gray", "blur", a number or a tensor (as integrated gradients).
    Works with in-place and reused ReLU modules and functional activations (caught by a
    ``TorchFunctionMode``); costs one no-grad forward of the baseline plus one forward and backward.
    Max-pool windows that overlap accumulate (Captum's unpooling overwrites instead).
    """

    default_reduce = "sum"
    signed = True

    def __init__(self, model: nn.Module, baseline: FillLike = "zero", blur_sigma: float | None = None,
                 eps: float = 1e-10) -> None:
        super().__init__(model)
        self.baseline = baseline
        self.blur_sigma = blur_sigma
        self.eps = float(eps)

    def baseline_for(self, x: Tensor) -> Tensor:
        """The baseline x₀ used for ``x``."""
        return make_fill(x, self.baseline, self.blur_sigma, option="baseline")

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        base = self.baseline_for(x)
        # a constant baseline is the same for every image: one reference forward serves the batch
        ref = base[:1] if _is_constant_fill(self.baseline) else base
        grad, _, _ = deeplift_gradient(self, x, ref, target, self.eps)
        return (x - base) * grad


# -- DeepSHAP ----------------------------------------------------------------------------------


def sample_background(data: object, n: int, max_batches: int | None = None, seed: int = 0) -> Tensor:
    """The first ``n`` images of ``data`` (see :func:`iter_images`) as a background set for DeepSHAP.

    The loader runs under a forked global RNG seeded with ``seed`` (shuffling is reproducible and
    the caller's RNG is untouched).
    """
    n = positive_int(n, "n")
    out: list[Tensor] = []
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        for x in iter_images(data, max_batches):
            out.append(x[: n - sum(len(t) for t in out)].detach().clone())
            if sum(len(t) for t in out) >= n:
                break
    if not out:
        raise ConfigError("the background data yielded no images.")
    return torch.cat(out)


@register("deepshap")
class DeepShap(Explainer):
    """DeepSHAP (Lundberg & Lee, 2017): DeepLIFT rescale averaged over a baseline distribution,
    ``mean_j (x − x₀ʲ) ⊙ m(x, x₀ʲ)``; the per-channel map sums to ``f(x)_t − mean_j f(x₀ʲ)_t``.

    ``baselines``: a tensor [N,C,H,W] of background images shared by every input (the method as
    published; :meth:`fit` samples one from a datamodule) — or a fill ("zero", "mean", "blur", …,
    as DeepLIFT) plus ``n_baselines`` Gaussian perturbations of std ``sigma`` × each image's value
    range (seeded, so results are reproducible and do not depend on the rest of the batch). The
    default, a noisy zero image, needs no data. Work is chunked to ``internal_batch_size`` rows.
    """

    default_reduce = "sum"
    signed = True

    def __init__(self, model: nn.Module, baselines: Tensor | FillLike = "zero", n_baselines: int = 8,
                 sigma: float = 0.1, seed: int = 0, blur_sigma: float | None = None, eps: float = 1e-10,
                 internal_batch_size: int = 64) -> None:
        super().__init__(model)
        if isinstance(baselines, Tensor) and (baselines.ndim < 2 or baselines.shape[0] < 1):
            raise ConfigError(f"baselines tensor must be [N,C,H,W] with N ≥ 1; got {tuple(baselines.shape)}.")
        self.baselines = baselines
        self.n_baselines = positive_int(n_baselines, "n_baselines")
        if float(sigma) < 0:
            raise ConfigError(f"sigma must be ≥ 0; got {sigma}.")
        self.sigma = float(sigma)
        self.seed = int(seed)
        self.blur_sigma = blur_sigma
        self.eps = float(eps)
        self.internal_batch_size = positive_int(internal_batch_size, "internal_batch_size")

    def fit(self, data: object, n: int = 32, max_batches: int | None = None) -> DeepShap:
        """Use the first ``n`` training images of ``data`` as the background set; returns self."""
        self.baselines = sample_background(data, n, max_batches, self.seed)
        return self

    def baselines_for(self, x: Tensor) -> Tensor:
        """The baselines [N,C,H,W] (shared) or [N,B,C,H,W] (per image) used for ``x``."""
        if isinstance(self.baselines, Tensor):
            base = self.baselines.to(device=x.device, dtype=x.dtype)
            if tuple(base.shape[1:]) != tuple(x.shape[1:]):
                raise ConfigError(f"baselines have shape {tuple(base.shape)} but x has {tuple(x.shape)}; they must "
                                  "match except in the batch dimension.")
            return base
        fill = make_fill(x, self.baselines, self.blur_sigma, option="baselines")
        gen = torch.Generator(device=x.device).manual_seed(self.seed)
        z = torch.randn((self.n_baselines, 1, *x.shape[1:]), generator=gen, device=x.device, dtype=x.dtype)
        flat = x.flatten(1)
        scale = self.sigma * (flat.amax(1) - flat.amin(1))
        return fill[None] + z * scale.view(1, -1, *([1] * (x.ndim - 1)))

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        idx = target.resolve(self._logits, x)
        base = self.baselines_for(x)
        shared = base.ndim == x.ndim
        n, b = base.shape[0], x.shape[0]
        per_chunk = max(1, self.internal_batch_size // b)
        total = torch.zeros_like(x)
        for start in range(0, n, per_chunk):
            chunk = base[start:start + per_chunk]
            k = chunk.shape[0]
            rows = x.repeat(k, *([1] * (x.ndim - 1)))  # row j·B + i: image i against baseline j
            ref = chunk if shared else chunk.reshape(k * b, *x.shape[1:])
            grad, _, _ = deeplift_gradient(self, rows, ref, Target(idx.repeat(k), k * b, x.device), self.eps)
            attr = (rows - _expand_ref(ref, k * b)) * grad
            total += attr.view(k, b, *x.shape[1:]).sum(0)
        return total / n
