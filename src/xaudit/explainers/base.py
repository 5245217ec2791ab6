"""The base every explainer shares: input checks, target handling, grad context, channel reduction.

``Explainer.attribute(x, target, reduce)`` is the one entry point. It checks ``x``, leaves
inference mode and enables grad (so it works inside Lightning's ``validation_step``), works on
a private clone of ``x``, calls the method's ``_attribute`` and reduces input channels. Methods
only implement ``_attribute``; they never call ``.backward()`` (``torch.autograd.grad`` leaves
``param.grad`` alone), never switch ``model.train()``/``eval()``, and remove their hooks.
"""

from __future__ import annotations

import numbers
import warnings
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass
from typing import ClassVar

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from xaudit.utils.errors import unknown_choice
from xaudit.utils.validation import positive_int

# How a per-channel attribution [B,C,H,W] becomes one map [B,H,W].
REDUCTIONS: dict[str, Callable[[Tensor], Tensor]] = {
    "sum": lambda a: a.sum(1),
    "mean": lambda a: a.mean(1),
    "abs_sum": lambda a: a.abs().sum(1),
    "max_abs": lambda a: a.abs().amax(1),
    "max": lambda a: a.amax(1),
    "l2": lambda a: a.pow(2).sum(1).sqrt(),
}
AUTO = "auto"


class ExplainerInputError(ValueError):
    """``x`` or ``target`` has the wrong shape, range or values; the message says how to fix it."""


class ExplainerTypeError(TypeError):
    """``x`` or ``target`` has the wrong type (e.g. uint8 images, float targets)."""


class UnsupportedModelError(ValueError):
    """The method cannot explain this model (e.g. CAM without a GAP→linear head)."""


def reduce_channels(attr: Tensor, reduce: str | None) -> Tensor:
    """Reduce a per-channel attribution [B,C,H,W] to [B,H,W]; ``None`` keeps the channels."""
    if reduce is None or attr.ndim == 3:
        return attr
    if reduce not in REDUCTIONS:
        raise unknown_choice("reduce", reduce, [*REDUCTIONS, "None"])
    return REDUCTIONS[reduce](attr)


def expected_channels(model: nn.Module) -> int | None:
    """Input channels of the first conv (the stem), or None when the model has no Conv2d."""
    for m in model.modules():
        if isinstance(m, nn.Conv2d):
            return int(m.in_channels)
    return None


def check_input(x: object, model: nn.Module) -> Tensor:
    """Raise a clear error unless ``x`` is a finite float [B,C,H,W] batch the model accepts."""
    if not isinstance(x, Tensor):
        raise ExplainerTypeError(f"x must be a torch.Tensor [B,C,H,W]; got {type(x).__name__}.")
    if x.ndim != 4:
        hint = " Add the batch dimension with x.unsqueeze(0)." if x.ndim == 3 else ""
        raise ExplainerInputError(f"x must have shape [B,C,H,W] (rank 4); got shape {tuple(x.shape)}.{hint}")
    if not x.is_floating_point():
        raise ExplainerTypeError(
            f"x must be a float tensor (the normalised images the model was trained on); got {x.dtype}. "
            "Convert with x.float() / 255 and apply the training normalisation.")
    if x.shape[0] == 0 or x.shape[2] == 0 or x.shape[3] == 0:
        raise ExplainerInputError(f"x is empty: shape {tuple(x.shape)}.")
    chans = expected_channels(model)
    if chans is not None and x.shape[1] != chans:
        raise ExplainerInputError(
            f"x has {x.shape[1]} channels but the model's first conv expects {chans}. "
            f"Pass images with {chans} channels (grayscale vs RGB?) or build the model with in_chans={x.shape[1]}.")
    finite = torch.isfinite(x)
    if not bool(finite.all()):
        bad = int((~finite).sum())
        rows = torch.nonzero(~finite.flatten(1).all(1)).flatten().tolist()
        raise ExplainerInputError(
            f"x holds {bad} non-finite values (NaN/Inf) in sample(s) {rows[:10]}; attributions of such inputs are "
            "meaningless. Check the data pipeline or drop those samples.")
    return x


class UnsupportedTargetError(ExplainerInputError):
    """The method reads class logits itself, so it cannot explain a probability or a contrast target."""


class TargetSpec:
    """Base of the public explanation targets (:mod:`xaudit.explainers.targets`): which class each
    row explains (:attr:`classes`, what ``Target.indices`` returns) and which scalar of the logits is
    explained (:meth:`score`; ``None``: the class logit). :meth:`expand` may turn the batch into
    more rows (one per (image, class) pair) before anything is explained."""

    #: the class per sample: indices [B], an int, a sequence or ``"predicted"``
    classes: TargetLike = "predicted"
    #: whether :meth:`expand` changes the rows (only ``Explainer.attribute`` can then take it)
    expands: ClassVar[bool] = False

    def expand(self, x: Tensor) -> tuple[Tensor, TargetSpec]:
        """The rows to explain and the target of each row (identity unless the target expands)."""
        return x, self

    def bind(self, batch: int, device: torch.device) -> TargetSpec:
        """This target with its per-sample tensors checked against ``batch`` and moved to ``device``."""
        return self

    def score(self, logits: Tensor, idx: Tensor) -> Tensor | None:
        """The explained scalar [N] of logits [N,K] (``idx``: the class per row, N = k·B rows holding
        k copies of the batch one after the other); None: the class logit."""
        return None

    @property
    def custom_score(self) -> bool:
        """Whether :meth:`score` differs from the class logit (a method must then use ``Target.select``)."""
        return type(self).score is not TargetSpec.score


#: what ``attribute`` takes as ``target``
TargetLike = Tensor | int | str | Sequence[int] | TargetSpec


@dataclass
class _Scoring:
    """The target being explained by the running ``attribute`` call (so ``Target`` objects a method
    re-makes from resolved indices keep its scalar) and whether the method selected it."""

    spec: TargetSpec
    used: bool = False


_SCORING: ContextVar[_Scoring | None] = ContextVar("xaudit_target_scoring", default=None)


def target_spec(target: object) -> TargetSpec | None:
    """``target`` as a :class:`TargetSpec`: itself, a multi-hot integer [B,K] tensor (K ≥ 2, 0/1
    values: multi-label data's ``label``) read as "every present class"
    (:class:`~xaudit.explainers.targets.PresentClasses`), else None."""
    if isinstance(target, TargetSpec):
        return target
    if (isinstance(target, Tensor) and target.ndim == 2 and target.shape[1] >= 2
            and not (target.is_floating_point() or target.is_complex() or target.dtype == torch.bool)
            and bool(((target == 0) | (target == 1)).all())):
        from xaudit.explainers.targets import PresentClasses  # targets.py builds on this module

        return PresentClasses(target)
    return None


class Target:
    """The class to explain for each sample: given indices, or ``"predicted"`` (argmax of the logits).

    A ``"predicted"`` target is resolved from the first logits a method computes on ``x`` itself,
    so methods that already run that forward pay nothing extra. A :class:`TargetSpec` also sets
    the explained scalar (:meth:`select`); a ``Target`` made inside a running ``attribute`` call
    from plain indices takes that call's scalar, so methods that re-wrap resolved indices honour it.
    """

    def __init__(self, spec: TargetLike, batch: int, device: torch.device) -> None:
        self.batch = batch
        self._indices: Tensor | None = None
        active = _SCORING.get()
        self.spec: TargetSpec | None = active.spec if active is not None else None
        if isinstance(spec, TargetSpec):
            if spec.expands:
                raise ExplainerInputError(
                    f"{type(spec).__name__} expands the batch to (image, class) pairs, which this entry point "
                    "cannot do; call explainer.attribute(x, target), or expand first with "
                    "xaudit.explainers.targets.expand_pairs(x, labels) and pass the class of each pair.")
            self.spec = spec.bind(batch, device) if spec.custom_score else None
            spec = spec.classes
        if isinstance(spec, str):
            if spec != "predicted":
                hint = (" 'present' (every class present) needs the multi-hot labels: pass "
                        "xaudit.explainers.targets.PresentClasses(labels) or the labels [B,K] themselves "
                        "(multi-label data only)." if spec == "present" else "")
                raise ExplainerInputError(
                    f"target={spec!r} is not understood; pass a long tensor [B] of class indices, an int, "
                    f"'predicted', or a target from xaudit.explainers.targets.{hint}")
            return
        if isinstance(spec, bool) or (isinstance(spec, Tensor) and spec.dtype == torch.bool):
            raise ExplainerTypeError("target must be class indices (int or long tensor), not booleans.")
        if isinstance(spec, numbers.Integral):
            idx = torch.full((batch,), int(spec), dtype=torch.long, device=device)
        elif isinstance(spec, Tensor):
            if spec.is_floating_point() or spec.is_complex():
                raise ExplainerTypeError(
                    f"target must hold integer class indices; got a {spec.dtype} tensor. Use target.long() "
                    "if these are indices, or target.argmax(1) if they are scores/one-hot rows.")
            if spec.ndim == 0:
                spec = spec.expand(batch)
            if spec.ndim != 1:
                raise ExplainerInputError(f"target must be 1-D [B]; got shape {tuple(spec.shape)}.")
            # clone: an inference-mode tensor cannot be saved for backward (gather saves its index)
            idx = spec.to(device=device, dtype=torch.long).clone()
        elif isinstance(spec, Sequence) and all(isinstance(v, numbers.Integral) for v in spec):
            idx = torch.tensor([int(v) for v in spec], dtype=torch.long, device=device)
        else:
            raise ExplainerTypeError(
                f"target must be a long tensor [B], an int, or 'predicted'; got {type(spec).__name__}.")
        if idx.shape[0] != batch:
            raise ExplainerInputError(
                f"target has {idx.shape[0]} entries but x has batch size {batch}; pass one class index per "
                "sample (or a single int for all).")
        if bool((idx < 0).any()):
            raise ExplainerInputError(f"target holds negative class indices {idx[idx < 0].unique().tolist()}.")
        self._indices = idx

    @property
    def is_predicted(self) -> bool:
        """True while a ``"predicted"`` target has not been resolved yet."""
        return self._indices is None

    def indices(self, logits: Tensor) -> Tensor:
        """Class index per sample, checked against the number of classes in ``logits`` [B,K]."""
        if self._indices is None:
            if logits.shape[0] != self.batch:
                raise ExplainerInputError(
                    f"internal: 'predicted' resolved on {logits.shape[0]} rows, not {self.batch}.")
            self._indices = logits.detach().argmax(1)
        idx = self._indices
        if bool((idx >= logits.shape[1]).any()):
            raise ExplainerInputError(
                f"target holds class index {int(idx.max())} but the model has {logits.shape[1]} classes "
                f"(valid: 0..{logits.shape[1] - 1}).")
        return idx

    def select(self, logits: Tensor) -> Tensor:
        """The explained scalar of each row (differentiable): the target logit, or what the target
        spec selects (a probability, a contrast of two logits). ``logits`` [k·B,K] holds k copies of
        the batch one after the other (k perturbations or path points per sample). Every explainer
        takes its scalar here, so gradient, CAM and perturbation methods honour any target."""
        idx = self.indices(logits)
        k = logits.shape[0] // self.batch
        if k * self.batch != logits.shape[0]:
            raise ExplainerInputError(f"internal: {logits.shape[0]} logits rows for a batch of {self.batch}.")
        rows = idx.repeat(k)
        if self.spec is not None:
            active = _SCORING.get()
            if active is not None:
                active.used = True
            out = self.spec.score(logits, rows)
            if out is not None:
                return out
        return logits.gather(1, rows[:, None]).squeeze(1)

    def resolve(self, logits_fn: Callable[[Tensor], Tensor], x: Tensor) -> Tensor:
        """Indices, running one no-grad forward on ``x`` only when ``"predicted"`` is unresolved."""
        if self._indices is None:
            with torch.no_grad():
                return self.indices(logits_fn(x))
        return self._indices


#: dropout variants switched off while explaining (see :func:`explain_mode`)
DROPOUT_TYPES: tuple[type[nn.Module], ...] = (nn.Dropout, nn.Dropout1d, nn.Dropout2d, nn.Dropout3d,
                                               nn.AlphaDropout, nn.FeatureAlphaDropout)


@contextmanager
def explain_mode(model: nn.Module) -> Iterator[None]:
    """Grad on, inference mode off; the model left exactly as found.

    Lightning runs validation under ``torch.inference_mode()``, where autograd is impossible.
    A forward in train mode would update BatchNorm statistics: those are copied back afterwards
    so explaining never changes the model. Dropout left in train mode would drop different units
    on every forward (a gradient and a perturbation of the same image would see different
    networks), so train-mode dropout is switched to eval while explaining — with a warning — and
    switched back afterwards.
    """
    training = any(m.training for m in model.modules())
    dropout = [m for m in model.modules() if isinstance(m, DROPOUT_TYPES) and m.training]
    if dropout:
        warnings.warn(
            f"the model has {len(dropout)} dropout module(s) in train mode; they are switched off while "
            "explaining (restored afterwards) so the maps are deterministic. Call model.eval() to explain "
            "the inference-time model and silence this warning.", UserWarning, stacklevel=4)
    with torch.inference_mode(False), torch.enable_grad():
        saved = [(b, b.clone()) for b in model.buffers()] if training else []
        for m in dropout:
            m.train(False)
        try:
            yield
        finally:
            for m in dropout:
                m.train(True)
            with torch.no_grad():
                for buf, copy in saved:
                    buf.copy_(copy)


def compute_dtype(model: nn.Module, x: Tensor) -> torch.dtype:
    """The dtype to explain in: the model's floating dtype (an fp32 model explains fp16/bf16
    input in fp32; an fp16 model explains fp32 input in fp16), ``x.dtype`` for a parameter-free model."""
    for t in (*model.parameters(), *model.buffers()):
        if t.is_floating_point():
            return t.dtype
    return x.dtype


class Explainer:
    """Base of every explainer: ``attribute(x, target, reduce)`` → float [B,H,W] at input resolution.

    Subclasses implement ``_attribute(x, target)`` returning either a per-channel attribution
    [B,C,H,W] (reduced with ``reduce``, default :attr:`default_reduce`) or one map [B,H,W].
    """

    name: ClassVar[str] = ""
    #: the sign of the map carries meaning (evidence for vs. against the target): drawn with a diverging
    #: colormap centred on zero; False: drawn min-max with a sequential one. See ``registry.is_signed``.
    signed: ClassVar[bool] = False
    #: reduction applied when ``reduce="auto"``; None for methods that give a single map.
    default_reduce: str | None = None

    def __init__(self, model: nn.Module) -> None:
        if not isinstance(model, nn.Module):
            raise ExplainerTypeError(f"model must be a torch.nn.Module returning logits; got {type(model).__name__}.")
        self.model = model

    def __repr__(self) -> str:
        return f"{type(self).__name__}(name={self.name!r})"

    def attribute(self, x: Tensor, target: TargetLike = "predicted", reduce: str | None = AUTO) -> Tensor:
        """Attribution of ``target`` for the batch ``x`` [B,C,H,W].

        Returns float [B,H,W] (or [B,C,H,W] with ``reduce=None`` for per-channel methods) on
        ``x.device`` in ``x.dtype``, detached. ``target`` is a long tensor [B], an int,
        ``"predicted"``, or a target of :mod:`xaudit.explainers.targets` (a probability, a contrast
        of two classes). ``PresentClasses(labels)`` — or the multi-hot labels [B,K] themselves —
        explains every (image, present class) pair: P rows, in ``labels.nonzero()`` order.
        """
        check_input(x, self.model)
        if reduce == AUTO:
            reduce = self.default_reduce
        elif reduce is not None and reduce not in REDUCTIONS:
            raise unknown_choice("reduce", reduce, [*REDUCTIONS, AUTO, "None"])
        spec = target_spec(target)
        with explain_mode(self.model):
            # a private copy in the model's dtype: half/bfloat16 input to an fp32 model is explained in
            # fp32 and the map returned in x.dtype
            xc = x.detach().to(dtype=compute_dtype(self.model, x), copy=True)
            if spec is not None:
                xc, spec = spec.expand(xc)  # (image, class) pairs for PresentClasses
                if xc.shape[0] == 0:
                    return x.new_zeros((0, *x.shape[1 if reduce is None else 2:]))
                spec = spec.bind(xc.shape[0], xc.device)
            scoring = _Scoring(spec) if spec is not None and spec.custom_score else None
            token = _SCORING.set(scoring)
            try:
                tgt = Target(spec if spec is not None else target, xc.shape[0], xc.device)
                attr = self._attribute(xc, tgt)
            finally:
                _SCORING.reset(token)
            if scoring is not None and not scoring.used:
                raise UnsupportedTargetError(
                    f"{type(self).__name__} ({self.name}) reads the class logit itself, so it cannot explain "
                    f"{type(spec).__name__}; use a method that takes its scalar from Target.select (saliency, "
                    "integrated_gradients, grad_cam, lrp, occlusion, ...) or the class logit (class indices).")
            attr = reduce_channels(attr.detach(), reduce).to(dtype=x.dtype)
        return attr

    def _attribute(self, x: Tensor, target: Target) -> Tensor:
        raise NotImplementedError

    def _logits(self, x: Tensor) -> Tensor:
        out = self.model(x)
        if not isinstance(out, Tensor) or out.ndim != 2 or out.shape[0] != x.shape[0]:
            shape = tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__
            raise UnsupportedModelError(
                f"the model must return logits [B, num_classes] for x [B,C,H,W]; got {shape}. Wrap it so "
                "forward returns the class scores.")
        return out


def upsample(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear upsampling of [B,h,w] maps to ``size`` (half-pixel centres, like cv2.resize)."""
    if tuple(maps.shape[-2:]) == tuple(size):
        return maps
    return F.interpolate(maps[:, None], size=size, mode="bilinear", align_corners=False)[:, 0]


def minmax_normalize(maps: Tensor, eps: float = 1e-7) -> Tensor:
    """Scale each map of [B,H,W] to [0,1] (constant maps become 0)."""
    flat = maps.flatten(1)
    lo = flat.amin(1)[:, None, None]
    hi = flat.amax(1)[:, None, None]
    return (maps - lo) / (hi - lo + eps)


def check_positive_int(name: str, value: object, minimum: int = 1) -> int:
    """Alias of :func:`xaudit.utils.validation.positive_int` (note its order: ``value, key, minimum``)."""
    return positive_int(value, name, minimum)
