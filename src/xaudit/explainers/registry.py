"""Name → explainer class registry; configs and callers use the names (``create("grad_cam", model)``)."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, TypeVar

from torch import nn

from xaudit.explainers.base import Explainer
from xaudit.utils.errors import ConfigError, check_options, unknown_choice

E = TypeVar("E", bound=type[Explainer])

_REGISTRY: dict[str, type[Explainer]] = {}


def register(name: str) -> Callable[[E], E]:
    """Class decorator: make an :class:`Explainer` subclass available as ``create(name, ...)``."""

    def deco(cls: E) -> E:
        if name in _REGISTRY and _REGISTRY[name] is not cls:
            raise ConfigError(f"explainer name {name!r} is already registered by {_REGISTRY[name].__name__}.")
        cls.name = name
        _REGISTRY[name] = cls
        return cls

    return deco


def names() -> list[str]:
    """Every registered explainer name, sorted."""
    return sorted(_REGISTRY)


def get(name: str) -> type[Explainer]:
    """The class registered as ``name``; an unknown name lists the choices."""
    if name not in _REGISTRY:
        raise unknown_choice("explainer", name, _REGISTRY, key="explainer.name")
    return _REGISTRY[name]


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
