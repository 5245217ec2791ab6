"""xaudit.roar."""
