"""Name → explainer class registry; configs and callers use the names (``create("grad_cam", model)``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from xaudit.explainers.base import Explainer
from xaudit.utils.errors import check_options
from xaudit.utils.registry import Registry

E = TypeVar("E", bound=type[Explainer])

EXPLAINERS: Registry[type[Explainer]] = Registry("explainer", key="explainer.name")
_REGISTRY: dict[str, type[Explainer]] = EXPLAINERS.items  # the mapping itself (tests pop temporary entries)


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`Explainer` subclass available as ``create(name, ...)``."""
    return EXPLAINERS.register(name)  # type: ignore[return-value]


def names() -> list[str]:
    """Every registered explainer name, sorted."""
    return EXPLAINERS.names()


def get(name: str) -> type[Explainer]:
    """The class registered as ``name``; an unknown name lists the choices."""
    return EXPLAINERS.get(name)


def is_signed(name: str) -> bool:
    """Whether method ``name`` gives signed maps (its class's :attr:`Explainer.signed`): the one
    place overlays choose a diverging (signed) or a sequential colormap. Unknown names: False."""
    cls = _REGISTRY.get(name)
    return bool(cls is not None and cls.signed)


def create(name: str, model: nn.Module, **kwargs: Any) -> Explainer:
    """Build explainer ``name`` for ``model`` with its hyper-parameters as keywords."""
    cls = get(name)
    check_options(f"explainer {name!r}", cls, kwargs)
    return cls(model, **kwargs)
