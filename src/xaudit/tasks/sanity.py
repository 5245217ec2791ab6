"""Moved to :mod:`xaudit.audits.sanity` (the ``sanity`` audit mode); re-exported here for old imports."""

from xaudit.audits.sanity import (  # noqa: F401
    GRADIENT_METHODS,
    Sanity,
    cascade,
    run_sanity,
    sanity_findings,
    write_sanity_report,
)
