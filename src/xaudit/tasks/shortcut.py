"""Moved to :mod:`xaudit.audits.shortcut` (the ``shortcut`` audit mode); re-exported here for old imports."""

from xaudit.audits.shortcut import (  # noqa: F401
    CUES,
    MODELS,
    Shortcut,
    compose_train,
    monitor_history,
    run_shortcut,
    shortcut_findings,
    train_model,
    write_shortcut_report,
)
