"""The body of ``python train.py`` (:mod:`xaudit.training`, below the audit modes, which train too);
this module keeps the task's import path."""

from xaudit.training import build, check_resumable, requeued_checkpoint, train  # noqa: F401
