"""Deprecated location: TCAV lives in :mod:`xaudit.concepts.tcav` (this alias will be removed)."""

import warnings

from xaudit.concepts.tcav import *  # noqa: F403

warnings.warn("xaudit.tcav moved to xaudit.concepts.tcav; import it from there.", DeprecationWarning, stacklevel=2)
