"""xaudit: train image classifiers with Lightning and audit how they decide."""

__version__ = "0.1.0"
