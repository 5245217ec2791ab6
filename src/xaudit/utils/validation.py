"""Checks of configuration values, in one place and with one argument order: ``(value, key, ...)``.

``key`` is the option as the user writes it (``steps``, ``concepts.num_random``); every failure is a
:class:`~xaudit.utils.errors.ConfigError` (a ``ValueError``) naming the key, the value and what is
allowed, and every check returns the value in its canonical type so callers write
``self.steps = positive_int(steps, "steps")``.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Iterable
from typing import Any

from xaudit.utils.errors import ConfigError, count_or_auto, unknown_choice

__all__ = ["choice", "count_or_auto", "flag", "fraction", "positive_float", "positive_int"]


def positive_int(value: Any, key: str, minimum: int = 1) -> int:
    """``value`` as an int ≥ ``minimum`` (bools refused; numpy integers accepted)."""
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or int(value) < minimum:
        raise ConfigError(f"{key}={value!r} must be an integer ≥{minimum}.")
    return int(value)


def positive_float(value: Any, key: str, meaning: str = "") -> float:
    """``value`` as a finite float > 0; ``meaning`` says in the message what the number is."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not value > 0 or math.isinf(value):
        raise ConfigError(f"{key}={value!r} must be a number > 0" + (f" ({meaning})." if meaning else "."))
    return float(value)


def flag(value: Any, key: str, meaning: str = "") -> bool:
    """A boolean option (strings such as ``"yes"`` and 0/1 are refused: say true or false)."""
    if not isinstance(value, bool):
        raise ConfigError(f"{key}={value!r} must be true or false" + (f" ({meaning})." if meaning else "."))
    return value


def choice(value: Any, choices: Iterable[str], key: str, kind: str | None = None) -> str:
    """``value`` when it is one of ``choices``; else the choices and the close matches (``kind``
    names what is chosen in the message, by default the key)."""
    choices = tuple(choices)
    if value not in choices:
        raise unknown_choice(kind or key, value, choices, key=key)
    return value


def fraction(value: Any, key: str, include_zero: bool = True, include_one: bool = True) -> float:
    """``value`` as a float in [0, 1] (a probability or a share); the ends are allowed unless excluded."""
    ok = isinstance(value, numbers.Real) and not isinstance(value, bool) and not math.isnan(value)
    if ok:
        v = float(value)
        ok = (v >= 0.0 if include_zero else v > 0.0) and (v <= 1.0 if include_one else v < 1.0)
    if not ok:
        low, high = "[" if include_zero else "(", "]" if include_one else ")"
        raise ConfigError(f"{key}={value!r} must be a fraction in {low}0, 1{high}.")
    return float(value)
