"""xaudit.explainers."""
