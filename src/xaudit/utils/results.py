"""The audit's results log: one JSON line per finished cell, written atomically, read on resume.

Every audit mode (:mod:`xaudit.audits`) keeps its cells here (formerly ``xaudit.roar.results``).

Every append rewrites ``results.jsonl`` through a temporary file and ``os.replace`` under an
exclusive lease lock (an ``O_EXCL`` create, which holds across hosts on NFS/Lustre where
``flock`` does not), so a SIGKILL at any moment leaves a valid file holding every finished cell,
and jobs sharing a directory never lose each other's lines. A cell already present is never
written again. A rerun reads the finished cells and skips them.

The directory also holds ``audit_config.json``: what decides the values of the cells (checkpoint
hash, data, recipe, ...). A rerun with a different one is refused instead of mixing results;
what only decides *which* cells exist (methods, fractions, seeds) may grow between runs. A change
the user accepts explicitly (``accept_changes=[recipe.global_batch]``: a key or a key prefix) is
let through: the new setup becomes the directory's, the change is recorded under ``accepted``.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from xaudit.utils.claims import lease_lock
from xaudit.utils.errors import ConfigError
from xaudit.utils.io import atomic_write_json, atomic_write_text

log = logging.getLogger("xaudit")


class ConfigMismatchError(ConfigError):
    """An audit directory holds results of a different setup; the message lists the differences."""


def plain_json(obj: Any) -> Any:
    """``obj`` as it reads back from JSON (tuples → lists, other types → str), for comparisons."""
    return json.loads(json.dumps(obj, sort_keys=True, default=str))


def config_diff(old: Any, new: Any, prefix: str = "") -> list[str]:
    """``key: old → new`` for every leaf that differs between two nested dicts."""
    if isinstance(old, dict) and isinstance(new, dict):
        out: list[str] = []
        for k in sorted({*old, *new}):
            out += config_diff(old.get(k), new.get(k), f"{prefix}.{k}" if prefix else str(k))
        return out
    return [] if old == new else [f"{prefix}: {old!r} → {new!r}"]


def _matches(key: str, accept: Sequence[str]) -> bool:
    return any(key == a or key.startswith(f"{a}.") for a in accept)


class ResultsLog:
    """``results.jsonl`` + ``audit_config.json`` in ``directory``; cells are dicts with a ``cell`` key."""

    def __init__(self, directory: str | Path) -> None:
        self.dir = Path(directory)
        self.path = self.dir / "results.jsonl"
        self.lock = self.dir / ".results.lock"

    def check_config(self, fingerprint: dict[str, Any], accept: Sequence[str] = ()) -> None:
        """Write the fingerprint on first use; refuse a different one later (names the keys).

        ``accept`` lists keys (or key prefixes, ``recipe``) whose differences the user accepts.
        """
        path = self.dir / "audit_config.json"
        fingerprint = plain_json(fingerprint)
        with lease_lock(self.lock):
            if not path.is_file():
                atomic_write_json(path, fingerprint)
                return
            stored = json.loads(path.read_text())
            accepted = stored.pop("accepted", [])
            diffs = config_diff(stored, fingerprint)
            allowed = [d for d in diffs if _matches(d.split(":", 1)[0], accept)]
            diffs = [d for d in diffs if d not in allowed]
            if allowed and not diffs:
                log.warning("%s: accepted changes of the setup (accept_changes): %s", self.dir, "; ".join(allowed))
                atomic_write_json(path, {**fingerprint, "accepted": [*accepted, *allowed]})
        if diffs:
            shown = "; ".join(diffs[:8]) + (f"; ... ({len(diffs)} in all)" if len(diffs) > 8 else "")
            keys = ",".join(d.split(":", 1)[0] for d in diffs[:8])
            raise ConfigMismatchError(
                f"{self.dir} already holds audit results of a different setup ({shown}). Refusing to mix "
                "them: audit into a new directory with out_dir=/some/new/dir, delete the old one, or accept "
                f"the change explicitly with accept_changes=[{keys}] (its cells then mix both setups).")

    def read(self) -> dict[str, dict[str, Any]]:
        """Finished cells by key (a torn last line cannot exist; unparsable lines are an error)."""
        if not self.path.is_file():
            return {}
        cells: dict[str, dict[str, Any]] = {}
        for n, line in enumerate(self.path.read_text().splitlines(), 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ValueError(f"{self.path}:{n} is not valid JSON ({err}); the file was edited by hand? "
                                 "Fix or delete that line and rerun.") from None
            cells[record["cell"]] = record
        return cells

    def append(self, record: dict[str, Any]) -> None:
        """Add one finished cell atomically (a cell already present is not written twice)."""
        record = plain_json(record)
        with lease_lock(self.lock):
            lines = self.path.read_text().splitlines() if self.path.is_file() else []
            if any(json.loads(line)["cell"] == record["cell"] for line in lines if line.strip()):
                return
            lines.append(json.dumps(record, sort_keys=True))
            atomic_write_text(self.path, "\n".join(lines) + "\n")
