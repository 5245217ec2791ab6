"""One name → class registry for every kind of plugin (explainers, metrics, ...).

A config names a class (``explainer.name: grad_cam``, ``{name: deletion_insertion}``); the
registry turns that name into the class, refuses a second class under a taken name and answers an
unknown name with the close matches and the full list of choices (a :class:`ConfigError`, which
is a ``ValueError``).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Generic, TypeVar

from xaudit.utils.errors import ConfigError, unknown_choice

T = TypeVar("T", bound=type)


class Registry(Generic[T]):
    """Names → classes of one ``kind`` (``"explainer"``, ``"metric"``), filled by :meth:`register`.

    Args:
        kind: what the names name, for error messages ("Unknown explainer 'gradcam' ...").
        key: the config key that holds such a name (``explainer.name``), named in lookup errors.
    """

    def __init__(self, kind: str, key: str | None = None) -> None:
        self.kind = kind
        self.key = key
        #: the mapping itself (tests may pop a temporary entry from it)
        self.items: dict[str, T] = {}

    def register(self, name: str) -> Callable[[T], T]:
        """Class decorator: file the class under ``name`` and set its ``name`` attribute to it.

        Registering the same class again is a no-op; another class under a taken name is refused.
        """

        def deco(cls: T) -> T:
            taken = self.items.get(name)
            if taken is not None and taken is not cls:
                raise ConfigError(f"{self.kind} name {name!r} is already registered by {taken.__name__}; "
                                  "choose another name.")
            cls.name = name
            self.items[name] = cls
            return cls

        return deco

    def get(self, name: str, key: str | None = None) -> T:
        """The class registered as ``name``; an unknown name raises a ConfigError listing the choices
        and the close matches (``key`` overrides the config key named in the message)."""
        if name not in self.items:
            raise unknown_choice(self.kind, name, self.items, key=key or self.key)
        return self.items[name]

    def unregister(self, name: str) -> T:
        """Remove ``name`` and return its class (e.g. a plugin registered for one test or session only)."""
        if name not in self.items:
            raise unknown_choice(self.kind, name, self.items, key=self.key)
        return self.items.pop(name)

    def names(self) -> list[str]:
        """Every registered name, sorted."""
        return sorted(self.items)

    def __contains__(self, name: object) -> bool:
        return name in self.items

    def contains(self, name: str) -> bool:
        """Whether ``name`` is registered."""
        return name in self.items

    def __iter__(self) -> Iterator[str]:
        return iter(self.names())

    def __len__(self) -> int:
        return len(self.items)
