"""Moved to :mod:`xaudit.audits.results` (every audit mode writes its cells there); re-exported here."""

from xaudit.utils.results import (  # noqa: F401
    ConfigMismatchError,
    ResultsLog,
    config_diff,
    plain_json,
)
