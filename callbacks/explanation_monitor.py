"""Re-export of :mod:`xaudit.callbacks.explanation_monitor` (the monitor moved into the package)."""

from xaudit.callbacks.explanation_monitor import *  # noqa: F403
from xaudit.callbacks.explanation_monitor import ExplanationMonitor, balanced_indices, expand_probe  # noqa: F401
