"""Error types that name the problem and the fix.

They subclass the built-in types a caller would expect (``ValueError`` for bad settings,
``FileNotFoundError`` for missing data) so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Iterable, Mapping
from typing import Any


class ConfigError(ValueError):
    """A setting (Hydra key or keyword argument) has a value xaudit cannot use."""


class DataNotFoundError(FileNotFoundError):
    """A dataset path does not exist; the message says which key to set and how to get the data."""


class NonFiniteLossError(FloatingPointError):
    """Training produced a NaN/Inf loss; the message points at the last good checkpoint."""


def unknown_choice(kind: str, name: object, choices: Iterable[str], key: str | None = None) -> ConfigError:
    """Build the error for an unknown name: list the valid choices and the closest matches."""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(name), choices, n=3)
    hint = f" Did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    where = f" ({key})" if key else ""
    return ConfigError(f"Unknown {kind} {name!r}{where}.{hint} Choices: {', '.join(choices)}.")


def check_options(kind: str, cls: type, kwargs: Mapping[str, Any], skip: Iterable[str] = ("self", "model"),
                  extra: Iterable[str] = ()) -> None:
    """Refuse keyword options ``cls.__init__`` does not name (plus ``extra``), listing the valid ones.

    ``**kwargs`` in the signature is not a licence for any name: it usually forwards to a base class
    whose options are passed as ``extra``; with no ``extra`` such a class is not checked."""
    params = inspect.signature(cls.__init__).parameters
    open_ended = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    if open_ended and not extra:
        return
    own = [n for n, p in params.items() if n not in set(skip) and p.kind not in (
        inspect.Parameter.VAR_KEYWORD, inspect.Parameter.VAR_POSITIONAL)]
    for key in kwargs:
        if key not in own and key not in set(extra):
            raise unknown_choice(f"option for {kind}:", key, own)


def count_or_auto(value: int | str, key: str, minimum: int, auto: str) -> int | str:
    """``value`` when it is ``"auto"`` or an int ≥ ``minimum``; else a ConfigError naming ``key``.

    ``auto`` says, for the message, what "auto" chooses.
    """
    if isinstance(value, str) and value == "auto":
        return value
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ConfigError(f"{key}={value!r}: use a count ≥ {minimum} or auto ({auto}).")
    return value
