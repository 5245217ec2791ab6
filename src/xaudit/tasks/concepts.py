"""Moved to :mod:`xaudit.audits.concepts` (the ``concepts`` audit mode); re-exported here for old imports."""

from xaudit.audits.concepts import (  # noqa: F401
    Concepts,
    concepts_findings,
    run_concepts,
    write_concepts_report,
)
