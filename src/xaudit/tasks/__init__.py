"""xaudit.tasks."""
