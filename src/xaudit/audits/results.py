"""Moved to :mod:`xaudit.utils.results` (the crash-safe results log serves every audit mode and ROAR,
so it sits below both); this alias keeps old imports working."""

from xaudit.utils.results import *  # noqa: F403
from xaudit.utils.results import ConfigMismatchError, ResultsLog, config_diff, plain_json  # noqa: F401
