"""Lightning callbacks (``xaudit.callbacks``): the per-epoch explanation monitor."""

from xaudit.callbacks.explanation_monitor import ExplanationMonitor

__all__ = ["ExplanationMonitor"]
