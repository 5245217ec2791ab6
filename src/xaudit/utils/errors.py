"""Error types that name the problem and the fix.

They subclass the built-in types a caller would expect (``ValueError`` for bad settings,
``FileNotFoundError`` for missing data) so ``except ValueError`` keeps working.
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


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
