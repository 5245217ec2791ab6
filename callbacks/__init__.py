"""Lightning callbacks, installed as ``xaudit.callbacks``."""
