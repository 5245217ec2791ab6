"""What an explanation explains: a class logit, its probability, a contrast of two classes, or
every class present in a multi-label image.

Pass any of these as ``target`` to ``Explainer.attribute`` (every registered method):

>>> saliency.attribute(x, ClassLogit(3))                  # d logit_3 / dx   (same as target=3)
>>> saliency.attribute(x, ClassProbability(3, "sigmoid")) # d sigmoid(logit_3) / dx
>>> saliency.attribute(x, ClassContrast(3, 5))            # d (logit_3 − logit_5) / dx: "why 3, not 5"
>>> saliency.attribute(x, PresentClasses(labels))         # one map per (image, present class) pair

The scalar is selected in one place, ``Target.select`` of :mod:`xaudit.explainers.base`, which
gradient, CAM, relevance and perturbation methods all call; a method that reads class logits
itself (CAM's weights, LIME/KernelSHAP's fitted score, feature ablation) explains class logits
only and raises :class:`~xaudit.explainers.base.UnsupportedTargetError` for a probability or a
contrast. Contrastive explanations of "why a rather than b" follow Gradient-weighted class
contrasts (Prabhushankar et al., 2020, "Contrastive Explanations in Neural Networks").
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence

import torch
from torch import Tensor

from xaudit.explainers.base import (
    ExplainerInputError,
    ExplainerTypeError,
    TargetLike,
    TargetSpec,
)

__all__ = ["ClassContrast", "ClassLogit", "ClassProbability", "PresentClasses", "TargetSpec",
           "expand_pairs", "present_pairs"]

ACTIVATIONS: tuple[str, ...] = ("softmax", "sigmoid")


def _per_sample(value: int | Sequence[int] | Tensor, batch: int, device: torch.device, name: str) -> Tensor:
    """Class indices long [batch] on ``device`` from an int, a sequence or a tensor."""
    if isinstance(value, bool) or (
            isinstance(value, Tensor) and (value.is_floating_point() or value.dtype == torch.bool)):
        raise ExplainerTypeError(f"{name} must hold integer class indices; got {value!r}.")
    if isinstance(value, numbers.Integral):
        return torch.full((batch,), int(value), dtype=torch.long, device=device)
    idx = torch.as_tensor(value, dtype=torch.long).to(device).clone()
    if idx.ndim == 0:
        idx = idx.expand(batch).clone()
    if idx.ndim != 1 or idx.shape[0] != batch:
        raise ExplainerInputError(f"{name} needs one class index per sample ({batch}); got shape {tuple(idx.shape)}.")
    if bool((idx < 0).any()):
        raise ExplainerInputError(f"{name} holds negative class indices.")
    return idx


def _check_classes(idx: Tensor, logits: Tensor, name: str) -> None:
    if bool((idx >= logits.shape[1]).any()):
        raise ExplainerInputError(f"{name} holds class index {int(idx.max())} but the model has "
                                  f"{logits.shape[1]} classes (valid: 0..{logits.shape[1] - 1}).")


def _repeat(values: Tensor, rows: int, name: str) -> Tensor:
    """Per-sample values [B] for ``rows`` = k·B rows (k copies of the batch one after the other)."""
    b = values.shape[0]
    if rows % b:
        raise ExplainerInputError(f"internal: {rows} logits rows for the {b} samples of {name}.")
    return values.repeat(rows // b)


class ClassLogit(TargetSpec):
    """The logit of class ``cls`` (an int, indices [B] or ``"predicted"``): what a plain ``target`` means."""

    def __init__(self, cls: TargetLike = "predicted") -> None:
        self.classes = cls

    def __repr__(self) -> str:
        return f"ClassLogit({self.classes!r})"


class ClassProbability(TargetSpec):
    """The probability of class ``cls``: ``softmax`` over the classes (single-label models) or the
    class's own ``sigmoid`` (multi-label models, where classes are independent)."""

    def __init__(self, cls: TargetLike = "predicted", activation: str = "softmax") -> None:
        if activation not in ACTIVATIONS:
            raise ExplainerInputError(
                f"ClassProbability(activation={activation!r}): choose one of {list(ACTIVATIONS)}.")
        self.classes = cls
        self.activation = activation

    def __repr__(self) -> str:
        return f"ClassProbability({self.classes!r}, activation={self.activation!r})"

    def score(self, logits: Tensor, idx: Tensor) -> Tensor:
        if self.activation == "sigmoid":
            return logits.gather(1, idx[:, None]).squeeze(1).sigmoid()
        return logits.softmax(1).gather(1, idx[:, None]).squeeze(1)


class ClassContrast(TargetSpec):
    """logit_a − logit_b: evidence for class ``a`` rather than class ``b`` ("why a, not b").

    ``a`` and ``b``: ints or indices [B]; ``a`` may be ``"predicted"``. Being linear in the
    logits, the contrast's gradient is the difference of the two classes' gradients.
    """

    def __init__(self, a: TargetLike, b: int | Sequence[int] | Tensor) -> None:
        if isinstance(b, str):
            raise ExplainerInputError("ClassContrast(a, b): b must be class indices (an int or a tensor [B]).")
        self.classes = a
        self.other = b

    def __repr__(self) -> str:
        return f"ClassContrast({self.classes!r}, {self.other!r})"

    def bind(self, batch: int, device: torch.device) -> ClassContrast:
        other = self.other
        if not (isinstance(other, Tensor) and other.ndim == 1 and other.shape[0] == batch
                and other.device == device and other.dtype == torch.long):
            other = _per_sample(other, batch, device, "ClassContrast's b")
        return ClassContrast(self.classes, other)

    def score(self, logits: Tensor, idx: Tensor) -> Tensor:
        other = _repeat(torch.as_tensor(self.other, device=logits.device).view(-1), idx.shape[0], "ClassContrast")
        _check_classes(other, logits, "ClassContrast's b")
        return (logits.gather(1, idx[:, None]) - logits.gather(1, other[:, None])).squeeze(1)


def present_pairs(labels: Tensor) -> tuple[Tensor, Tensor]:
    """(image index, class index) long [P] of every present class of multi-hot ``labels`` [B,K],
    image-major (``labels.nonzero()`` order). A clear error for single-label class indices [B]."""
    if not isinstance(labels, Tensor):
        raise ExplainerTypeError(f"labels must be a multi-hot tensor [B,K]; got {type(labels).__name__}.")
    if labels.ndim != 2:
        raise ExplainerInputError(
            f"'every present class' needs multi-hot labels [B,K] (multi-label data such as data=shapes_multilabel); "
            f"got shape {tuple(labels.shape)}, which looks like single-label class indices. For single-label data "
            "explain the class itself: pass the indices [B] (target=label) or ClassLogit(labels).")
    if labels.is_floating_point() and bool(((labels != 0) & (labels != 1)).any()):
        raise ExplainerInputError("multi-hot labels must hold 0/1; got other values (scores? threshold them first).")
    image, cls = torch.nonzero(labels != 0, as_tuple=True)
    return image, cls


def expand_pairs(x: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """``x`` [B,...] repeated per present class: (rows [P,...], image index [P], class index [P])."""
    image, cls = present_pairs(labels)
    return x[image.to(x.device)], image, cls


class PresentClasses(TargetSpec):
    """Every class present in each image (multi-label data): the batch becomes one row per (image,
    present class) pair, each explaining its class with ``kind`` (``"logit"``, ``"sigmoid"`` or
    ``"softmax"`` probability). ``attribute`` then returns P maps in :func:`present_pairs` order.
    """

    expands = True

    def __init__(self, labels: Tensor, kind: str = "logit") -> None:
        if kind not in ("logit", *ACTIVATIONS):
            raise ExplainerInputError(f"PresentClasses(kind={kind!r}): choose 'logit', 'sigmoid' or 'softmax'.")
        self.image, self.cls = present_pairs(labels)
        self.rows = int(labels.shape[0])
        self.kind = kind

    def __repr__(self) -> str:
        return f"PresentClasses({self.image.numel()} pairs, kind={self.kind!r})"

    def expand(self, x: Tensor) -> tuple[Tensor, TargetSpec]:
        if self.rows != x.shape[0]:
            raise ExplainerInputError(f"PresentClasses: the labels have {self.rows} rows "
                                      f"but x has {x.shape[0]} images; "
                                      "pass one multi-hot row per image.")
        cls = self.cls.to(x.device)
        inner: TargetSpec = ClassLogit(cls) if self.kind == "logit" else ClassProbability(cls, self.kind)
        return x[self.image.to(x.device)], inner
