"""xaudit.reporting."""
