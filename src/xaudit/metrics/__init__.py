"""xaudit.metrics."""
