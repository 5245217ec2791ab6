"""Moved to :mod:`xaudit.utils.results` (every audit mode and ROAR write their cells there); re-exported here."""

from xaudit.utils.results import (  # noqa: F401
    ConfigMismatchError,
    ResultsLog,
    config_diff,
    plain_json,
)
