"""The public entry to xaudit's Lightning callbacks; the code lives in :mod:`xaudit.callbacks`."""

from xaudit.callbacks import ExplanationMonitor

__all__ = ["ExplanationMonitor"]
