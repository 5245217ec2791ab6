"""Lightning callbacks, installed as ``xaudit.callbacks``."""

from xaudit.callbacks.explanation_monitor import ExplanationMonitor

__all__ = ["ExplanationMonitor"]
