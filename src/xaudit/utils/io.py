"""Crash-safe files: every write goes to a temporary file in the same folder, then ``os.replace``.

A reader (or a rerun after SIGKILL) therefore sees either the old file or the new one, never a
half-written one. Read-modify-write cycles shared by concurrent jobs take
:func:`xaudit.utils.claims.lease_lock` (an exclusive create, which holds on network file systems).
"""

from __future__ import annotations

import contextlib
import errno
import hashlib
import io
import json
import os
import shutil
import socket
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


class OutputDirError(OSError):
    """An output folder cannot be written (read-only, no permission, or full); says which and what to do."""


_READ_ONLY = (errno.EACCES, errno.EPERM, errno.EROFS)
_FULL = (errno.ENOSPC, errno.EDQUOT)


@contextlib.contextmanager
def output_errors(path: str | Path, key: str = "out_dir") -> Iterator[None]:
    """Turn a read-only / permission / disk-full ``OSError`` raised while writing under ``path`` into an
    :class:`OutputDirError` that names the folder, the cause and the fix (``key=<another folder>``)."""
    try:
        yield
    except OutputDirError:
        raise
    except OSError as e:
        if e.errno in _READ_ONLY:
            raise OutputDirError(e.errno, f"Cannot write to {path}: it is read-only or not writable by this user "
                                 f"({os.strerror(e.errno)}). Pass {key}=<a writable folder>, or fix its "
                                 "permissions.") from e
        if e.errno in _FULL:
            raise OutputDirError(e.errno, f"No space left writing to {path} ({os.strerror(e.errno)}). Free disk "
                                 f"space or pass {key}=<a folder on another disk>; files already written are "
                                 "complete (atomic writes) and a rerun resumes.") from e
        raise


def check_writable(folder: str | Path, key: str = "out_dir", min_free_mb: float = 0.0) -> Path:
    """Create ``folder`` if needed and prove it writable (a probe file) with ``min_free_mb`` free, before a
    long job starts rather than when its first result is due. Returns the resolved folder."""
    folder = Path(folder).expanduser().resolve()
    existing = next(p for p in (folder, *folder.parents) if p.exists())
    if not existing.is_dir():
        raise OutputDirError(errno.ENOTDIR, f"Cannot create {folder}: {existing} is a file, not a folder. "
                             f"Pass {key}=<a folder path>.")
    with output_errors(folder, key):
        folder.mkdir(parents=True, exist_ok=True)
        # one name per process: concurrent jobs and ranks probe the same folder at once
        probe = folder / f".xaudit_write_probe.{socket.gethostname()}.{os.getpid()}.{uuid.uuid4().hex[:8]}"
        atomic_write_bytes(probe, b"ok")
        probe.unlink()
    free_mb = shutil.disk_usage(folder).free / 2**20
    if free_mb < min_free_mb:
        raise OutputDirError(errno.ENOSPC, f"Only {free_mb:.0f} MB free on the disk of {folder}; this job needs "
                             f"at least {min_free_mb:.0f} MB. Free disk space, pass {key}=<a folder on another "
                             "disk>, or lower min_free_mb.")
    return folder


@contextlib.contextmanager
def atomic_writer(path: str | Path) -> Iterator[Any]:
    """A binary file to write ``path`` through, piece by piece: it appears (fsynced, renamed) only
    when the block ends without an error; a read-only or full disk raises :class:`OutputDirError`."""
    path = Path(path)
    with output_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
        try:
            with os.fdopen(fd, "wb") as f:
                yield f
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o666 & ~_umask())  # mkstemp makes 0600; give the file the usual permissions
            os.replace(tmp, path)
        except BaseException:
            with contextlib.suppress(FileNotFoundError):
                os.unlink(tmp)
            raise


def atomic_write_bytes(path: str | Path, data: bytes) -> None:
    """Write ``data`` to ``path`` atomically (fsynced temp file + rename)."""
    with atomic_writer(path) as f:
        f.write(data)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str | Path, obj: Any) -> None:
    """Write ``obj`` as indented JSON atomically."""
    atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=str) + "\n")


def atomic_torch_save(path: str | Path, obj: Any) -> None:
    """``torch.save`` atomically (the file is readable with ``weights_only=True``)."""
    buf = io.BytesIO()
    torch.save(obj, buf)
    atomic_write_bytes(path, buf.getvalue())


def file_sha256(path: str | Path, chunk: int = 1 << 20) -> str:
    """Hex SHA-256 of a file's bytes."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def short_hash(obj: Any, n: int = 8) -> str:
    """A stable short hash of a JSON-serialisable object (keys sorted)."""
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()[:n]
