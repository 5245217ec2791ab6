"""Canonizers: rewrite a model, for the length of one explanation, into an equivalent form that
relevance rules can be applied to (Montavon et al., 2019, "Layer-wise relevance propagation: an
overview", §10.3; zennit's canonizers are the model).

- **BatchNorm merging**: an eval-mode BatchNorm that only ever receives the output of one
  Conv/Linear layer is folded into it (``w' = w·γ/σ``, ``b' = (b − μ)·γ/σ + β``), and the
  BatchNorm itself becomes the identity. Which BatchNorm follows which layer is *observed* in one
  no-grad probe forward (the BatchNorm's input is that layer's output tensor), not guessed from
  the order of registration, so a DenseNet-style BatchNorm after a concatenation is left alone.
- **ResNet skip sums**: torchvision's ``BasicBlock``/``Bottleneck`` end in ``out += identity``;
  the canonized block adds out of place through a function the explainer supplies, so a rule
  can be attached to the sum.

Nothing here writes a parameter or a buffer: folded weights are new tensors handed to the
explainer's rules, and the only change to the model is instance-level ``forward`` overrides,
which :func:`forward_overrides` removes in ``finally`` (also when the forward raises).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.overrides import TorchFunctionMode
from torchvision.models.resnet import BasicBlock, Bottleneck

CONV_TYPES: tuple[type[nn.Module], ...] = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
CONV_TRANSPOSE_TYPES: tuple[type[nn.Module], ...] = (nn.ConvTranspose1d, nn.ConvTranspose2d, nn.ConvTranspose3d)
# layers a BatchNorm can be merged into (out-channel first weights)
MERGEABLE: tuple[type[nn.Module], ...] = (*CONV_TYPES, nn.Linear)
CANONIZERS: tuple[str, ...] = ("merge_batchnorm", "resnet_skip")

_MISSING = object()


@dataclass
class Affine:
    """A layer seen as an affine map ``fn(x, weight, bias)``: what the weight-modifying rules need.

    ``weight``/``bias`` are the effective (possibly BatchNorm-merged) parameters, detached: the
    rules differentiate with respect to the input only.
    """

    weight: Tensor
    bias: Tensor | None
    fn: Callable[[Tensor, Tensor, Tensor | None], Tensor]
    channel_dim: int  # where output channels live (1 for conv/BatchNorm outputs, -1 for linear)
    derived: dict[str, Any] = field(default_factory=dict)

    def derive(self, key: str, make: Callable[[], Any]) -> Any:
        """``make()`` computed once per Affine (clamped or squared weights reused across calls)."""
        if key not in self.derived:
            with torch.no_grad():
                self.derived[key] = make()
        return self.derived[key]

    def __call__(self, x: Tensor, weight: Tensor | None = None, bias: Tensor | object | None = _MISSING) -> Tensor:
        """``fn`` with the effective parameters unless others are given (``bias=None`` drops it)."""
        return self.fn(x, self.weight if weight is None else weight, self.bias if bias is _MISSING else bias)

    def add_bias(self, z: Tensor, bias: Tensor | None) -> Tensor:
        """``z`` plus a per-output-channel ``bias`` broadcast along :attr:`channel_dim`."""
        if bias is None:
            return z
        if self.channel_dim == -1:
            return z + bias
        return z + bias.view(-1, *([1] * (z.ndim - 2)))


def batchnorm_is_mergeable(bn: nn.Module) -> bool:
    """An eval-mode BatchNorm with running statistics is an affine map, so it can be merged."""
    return (isinstance(bn, _BatchNorm) and not bn.training and bn.track_running_stats
            and bn.running_mean is not None and bn.running_var is not None)


def batchnorm_scale_shift(bn: _BatchNorm) -> tuple[Tensor, Tensor]:
    """``(scale, shift)`` with ``bn(x) = x·scale + shift`` per channel (eval mode)."""
    with torch.no_grad():
        assert bn.running_var is not None and bn.running_mean is not None
        scale = 1 / (bn.running_var + bn.eps) ** 0.5
        if bn.weight is not None:
            scale = bn.weight / (bn.running_var + bn.eps) ** 0.5
        shift = -bn.running_mean * scale
        if bn.bias is not None:
            shift = shift + bn.bias
    return scale.detach(), shift.detach()


def affine_of(module: nn.Module, merged_bn: _BatchNorm | None = None) -> Affine | None:
    """The :class:`Affine` view of ``module`` (Conv/ConvTranspose/Linear, or an eval-mode
    BatchNorm on its own), with ``merged_bn`` folded in; None for any other layer."""
    with torch.no_grad():
        if isinstance(module, CONV_TYPES):
            conv: Any = module
            weight, bias, fn, cdim = conv.weight, conv.bias, conv._conv_forward, 1
        elif isinstance(module, CONV_TRANSPOSE_TYPES):
            ct: Any = module
            op = {1: F.conv_transpose1d, 2: F.conv_transpose2d, 3: F.conv_transpose3d}[len(ct.kernel_size)]

            def fn(x: Tensor, w: Tensor, b: Tensor | None, ct: Any = ct, op: Any = op) -> Tensor:
                return op(x, w, b, ct.stride, ct.padding, ct.output_padding, ct.groups, ct.dilation)

            weight, bias, cdim = ct.weight, ct.bias, 1
        elif isinstance(module, nn.Linear):
            weight, bias, fn, cdim = module.weight, module.bias, F.linear, -1
        elif batchnorm_is_mergeable(module):
            scale, shift = batchnorm_scale_shift(module)  # type: ignore[arg-type]

            def fn(x: Tensor, w: Tensor, b: Tensor | None) -> Tensor:
                shape = (1, -1, *([1] * (x.ndim - 2)))
                out = x * w.view(shape)
                return out if b is None else out + b.view(shape)

            return Affine(scale, shift, fn, 1)
        else:
            return None
        weight = weight.detach()
        bias = bias.detach() if bias is not None else None
        if merged_bn is not None:
            # the same arithmetic as zennit's MergeBatchNorm, so merged weights agree bit for bit
            assert merged_bn.running_var is not None and merged_bn.running_mean is not None
            scale = (merged_bn.weight if merged_bn.weight is not None else 1) / (
                merged_bn.running_var + merged_bn.eps) ** 0.5
            scale = torch.as_tensor(scale).detach()
            b0 = bias if bias is not None else torch.zeros(1, dtype=weight.dtype, device=weight.device)
            bias = (b0 - merged_bn.running_mean) * scale
            if merged_bn.bias is not None:
                bias = bias + merged_bn.bias
            weight = weight * scale.view(-1, *([1] * (weight.ndim - 1)))
            bias = bias.detach()
        return Affine(weight, bias, fn, cdim)


def _fingerprint(tensors: list[Tensor | None]) -> tuple:
    # in-place updates (optimiser steps, load_state_dict, copy_) bump _version; .data swaps change the pointer
    return tuple(None if t is None else (id(t), t.data_ptr(), t._version, t.dtype, t.device, tuple(t.shape))
                 for t in tensors)


class AffineCache:
    """:func:`affine_of` per layer, recomputed only when a parameter or statistic it uses changed."""

    def __init__(self) -> None:
        self._entries: dict[nn.Module, tuple[tuple, Affine | None]] = {}

    def get(self, module: nn.Module, merged_bn: _BatchNorm | None = None) -> Affine | None:
        sources: list[Any] = [module]
        if merged_bn is not None:
            sources.append(merged_bn)
        tensors = [t for m in sources for t in (*m.parameters(recurse=False), *m.buffers(recurse=False))]
        key = (id(merged_bn), getattr(merged_bn, "eps", None), module.training, _fingerprint(tensors))
        hit = self._entries.get(module)
        if hit is None or hit[0] != key:
            hit = (key, affine_of(module, merged_bn))
            self._entries[module] = hit
        return hit[1]


class _UseCounter(TorchFunctionMode):
    """Counts, per watched tensor, the torch calls that take it and return a tensor (its uses;
    metadata calls such as ``size()`` return no tensor and do not count)."""

    def __init__(self) -> None:
        super().__init__()
        self.uses: dict[int, int] = {}

    def __torch_function__(self, func: Any, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        out = func(*args, **(kwargs or {}))
        if self.uses and isinstance(out, Tensor | tuple | list):
            seen = set()
            for a in (*args, *(kwargs or {}).values()):
                for t in (a if isinstance(a, list | tuple) else (a,)):
                    if isinstance(t, Tensor) and id(t) in self.uses and id(t) not in seen:
                        seen.add(id(t))
                        self.uses[id(t)] += 1
        return out


def find_batchnorm_merges(model: nn.Module, run: Callable[[], object]) -> dict[str, str]:
    """``{layer name: BatchNorm name}`` for every mergeable BatchNorm fed only by one Conv/Linear.

    ``run`` performs one forward of ``model`` (no grad is needed). A pair is kept only if, in that
    forward, every output of the layer went to the same BatchNorm and to nothing else (not to an
    in-place activation first, not to a second consumer), and that BatchNorm saw nothing else.
    """
    names = {m: n for n, m in model.named_modules()}
    layers = [m for m in model.modules() if isinstance(m, MERGEABLE)]
    bns = [m for m in model.modules() if batchnorm_is_mergeable(m)]
    if not layers or not bns:
        return {}
    outputs: dict[int, tuple[nn.Module, Tensor]] = {}  # the tensors are kept alive: their ids stay unique
    counter = _UseCounter()
    fed_bn: dict[int, nn.Module] = {}
    bad_bns: set[nn.Module] = set()

    def after_layer(module: nn.Module, args: object, out: object) -> None:
        if isinstance(out, Tensor):
            outputs[id(out)] = (module, out)
            counter.uses[id(out)] = 0

    def before_bn(module: nn.Module, args: tuple) -> None:
        x = args[0] if args else None
        hit = outputs.get(id(x)) if isinstance(x, Tensor) else None
        if hit is None or hit[1] is not x or id(x) in fed_bn:
            bad_bns.add(module)
        else:
            fed_bn[id(x)] = module

    handles = [m.register_forward_hook(after_layer) for m in layers]
    handles += [m.register_forward_pre_hook(before_bn) for m in bns]
    try:
        with torch.no_grad(), counter:
            run()
    finally:
        for h in handles:
            h.remove()
    pairs: dict[nn.Module, set[nn.Module | None]] = {}
    for key, (layer, _) in outputs.items():
        bn = fed_bn.get(key)
        pairs.setdefault(layer, set()).add(bn if bn is not None and counter.uses[key] == 1 else None)
    outputs.clear()
    owners: dict[nn.Module, list[nn.Module]] = {}
    for layer, bn_set in pairs.items():
        if len(bn_set) == 1 and None not in bn_set:
            bn = next(iter(bn_set))
            assert bn is not None
            owners.setdefault(bn, []).append(layer)
    return {names[layers_[0]]: names[bn] for bn, layers_ in owners.items() if len(layers_) == 1 and bn not in bad_bns}


class MergeCache:
    """The BatchNorm merges of one model, probed once per module structure and train/eval state."""

    def __init__(self) -> None:
        self._key: tuple | None = None
        self._merges: dict[str, str] = {}

    def get(self, model: nn.Module, run: Callable[[], object]) -> dict[str, str]:
        """:func:`find_batchnorm_merges`, re-probed (with ``run``) only when the model changed."""
        key = tuple((id(m), m.training) for m in model.modules())
        if key != self._key:
            self._merges = find_batchnorm_merges(model, run)
            self._key = key
        return self._merges


def identity_forward(x: Tensor) -> Tensor:
    """Forward of a BatchNorm merged into the layer before it."""
    return x


def resnet_block_forward(block: nn.Module,
                         add: Callable[[Tensor, Tensor], Tensor]) -> Callable[[Tensor], Tensor] | None:
    """torchvision's BasicBlock/Bottleneck forward with the skip sum done by ``add`` (out of place),
    or None when ``block`` is not one of them (or a subclass that changed ``forward``)."""
    b: Any = block
    if type(block).forward is BasicBlock.forward:
        def basic(x: Tensor) -> Tensor:
            out = b.relu(b.bn1(b.conv1(x)))
            out = b.bn2(b.conv2(out))
            identity = b.downsample(x) if b.downsample is not None else x
            return b.relu(add(out, identity))
        return basic
    if type(block).forward is Bottleneck.forward:
        def bottleneck(x: Tensor) -> Tensor:
            out = b.relu(b.bn1(b.conv1(x)))
            out = b.relu(b.bn2(b.conv2(out)))
            out = b.bn3(b.conv3(out))
            identity = b.downsample(x) if b.downsample is not None else x
            return b.relu(add(out, identity))
        return bottleneck
    return None


@contextmanager
def forward_overrides(overrides: dict[nn.Module, Callable[..., Any]]) -> Iterator[None]:
    """Give each module an instance-level ``forward`` for the ``with`` block; the previous state
    (usually no instance attribute at all) is restored in ``finally``, even after an error."""
    saved: list[tuple[nn.Module, object]] = []
    try:
        for module, fwd in overrides.items():
            saved.append((module, module.__dict__.get("forward", _MISSING)))
            module.forward = fwd  # type: ignore[method-assign]
        yield
    finally:
        for module, previous in reversed(saved):
            if previous is _MISSING:
                module.__dict__.pop("forward", None)
            else:
                module.__dict__["forward"] = previous


def module_forward(module: nn.Module) -> Callable[..., Any]:
    """The module's own forward (an instance override if it already had one, else the class's)."""
    own = module.__dict__.get("forward", _MISSING)
    return own if own is not _MISSING else type(module).forward.__get__(module)  # type: ignore[return-value]
