"""Claims and locks between independent jobs sharing one folder, safe on network file systems.

``flock`` does not hold across hosts on NFS or Lustre, but an exclusive create (``O_CREAT |
O_EXCL``) does. A claim is such a file, named after the work it guards and holding the owner's
host, pid and a random token; a daemon thread touches it every ``heartbeat_s`` while the work
runs. Another job treats a claim as stale when

- its owner is on the same host and that pid is gone (a killed job: taken over at once), or
- its heartbeat has not moved for ``stale_s`` seconds of the observer's own clock (an owner on
  another host that died; clocks of different hosts are never compared).

A stale claim is taken over through a second exclusive create keyed by the stale owner's token,
so of several jobs that judge the same claim stale exactly one replaces it. A claim whose owner is
alive on this host but has not beaten for ``stale_s`` is an error that names the pid: the owner is
hung, and only a person can decide to kill it.

:func:`lease_lock` is the same idea for short critical sections (read-modify-write of a results
file): no heartbeat, a claim that stays unchanged for ``stale_s`` is broken.
"""

from __future__ import annotations

import contextlib
import errno
import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from xaudit.utils.io import output_errors

HOST = socket.gethostname()


class ClaimError(RuntimeError):
    """A claim cannot be judged safely (its owner is alive but silent); names the owner and the fix."""


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _read(path: Path) -> dict[str, Any] | None:
    """The owner record of a claim file (None when it is gone, or not yet written)."""
    try:
        text = path.read_text()
    except FileNotFoundError:
        return None
    try:
        return json.loads(text)
    except json.JSONDecodeError:
        return {}  # being written, or torn by a crash: judged by its heartbeat like any other


def _create(path: Path, owner: dict[str, Any]) -> bool:
    """Create ``path`` exclusively holding ``owner``; False when it already exists."""
    with output_errors(path.parent):
        path.parent.mkdir(parents=True, exist_ok=True)
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            return False
        with os.fdopen(fd, "w") as f:
            f.write(json.dumps(owner))
            f.flush()
            os.fsync(f.fileno())
    return True


def _unlink_if(path: Path, token: str | None) -> None:
    """Remove ``path`` if it still holds ``token`` (never someone else's newer claim)."""
    owner = _read(path)
    if owner is not None and owner.get("token") == token:
        with contextlib.suppress(FileNotFoundError):
            path.unlink()


@dataclass
class Claim:
    """A held claim; :meth:`release` (or leaving the ``with`` block) removes it."""

    path: Path
    token: str
    heartbeat_s: float
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def start(self) -> Claim:
        if self.heartbeat_s > 0:
            self._thread = threading.Thread(target=self._beat, name=f"claim {self.path.name}", daemon=True)
            self._thread.start()
        return self

    def _beat(self) -> None:
        while not self._stop.wait(self.heartbeat_s):
            owner = _read(self.path)
            if owner is None or owner.get("token") != self.token:
                return  # taken over (we were judged dead): the cell is written once either way
            with contextlib.suppress(OSError):
                os.utime(self.path)

    @property
    def held(self) -> bool:
        """Whether the file still holds this claim."""
        owner = _read(self.path)
        return owner is not None and owner.get("token") == self.token

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()
        _unlink_if(self.path, self.token)

    def __enter__(self) -> Claim:
        return self

    def __exit__(self, *exc: object) -> None:
        self.release()


class ClaimBoard:
    """Claims of one folder (``<dir>/<name>.claim``) with one staleness rule."""

    def __init__(self, directory: str | Path, stale_s: float = 300.0, heartbeat_s: float = 15.0) -> None:
        if heartbeat_s > 0 and stale_s <= 2 * heartbeat_s:
            raise ValueError(f"claims.stale_s={stale_s} must exceed twice claims.heartbeat_s={heartbeat_s}, "
                             "or a live owner could be judged dead between two beats.")
        self.dir = Path(directory)
        self.stale_s, self.heartbeat_s = float(stale_s), float(heartbeat_s)
        self._seen: dict[Path, tuple[Any, float]] = {}  # path -> (heartbeat signature, first seen at)

    def path(self, name: str) -> Path:
        return self.dir / f"{name}.claim"

    def owner(self, name: str) -> dict[str, Any] | None:
        """Who holds ``name`` (None when nobody does)."""
        return _read(self.path(name))

    def try_claim(self, name: str) -> Claim | None:
        """Claim ``name`` (taking over a stale claim); None when a live job holds it."""
        path = self.path(name)
        token = uuid.uuid4().hex
        owner = {"host": HOST, "pid": os.getpid(), "token": token, "since": time.time()}
        for _ in range(3):
            if _create(path, owner):
                return Claim(path, token, self.heartbeat_s).start()
            current = _read(path)
            if current is None:
                continue  # released between our create and read: try again
            if not self.stale(path, current):
                return None
            self._take_over(path, current)
        return None

    def stale(self, path: Path, owner: dict[str, Any]) -> bool:
        """Whether the claim at ``path`` held by ``owner`` may be taken over (see the module doc)."""
        try:
            st = os.stat(path)
        except FileNotFoundError:
            return False
        now = time.monotonic()
        signature = (owner.get("token"), st.st_mtime_ns, st.st_size)
        seen = self._seen.get(path)
        if seen is None or seen[0] != signature:
            self._seen[path] = (signature, now)
            silent = 0.0
        else:
            silent = now - seen[1]
        same_host = owner.get("host") == HOST and isinstance(owner.get("pid"), int)
        if same_host and not _pid_alive(int(owner["pid"])):
            return True
        if silent < self.stale_s:
            return False
        if same_host and int(owner["pid"]) != os.getpid():
            raise ClaimError(
                f"{path} is held by pid {owner['pid']} on this host, which is alive but has not renewed the "
                f"claim for {silent:.0f} s (claims.stale_s={self.stale_s:g}): it looks hung. Kill it "
                f"(kill {owner['pid']}) or delete {path}, then rerun.")
        return True

    def _take_over(self, path: Path, stale_owner: dict[str, Any]) -> None:
        """Remove a stale claim, racing other jobs fairly: one exclusive create per stale token."""
        token = str(stale_owner.get("token", "torn"))
        guard = path.with_name(f"{path.name}.takeover-{token}")
        if not _create(guard, {"host": HOST, "pid": os.getpid()}):
            return  # another job takes this one over
        try:
            current = _read(path)
            if current is not None and str(current.get("token", "torn")) == token:
                with contextlib.suppress(FileNotFoundError):
                    path.unlink()
                self._seen.pop(path, None)
        finally:
            with contextlib.suppress(FileNotFoundError):
                guard.unlink()


@contextlib.contextmanager
def lease_lock(path: str | Path, stale_s: float = 60.0, poll_s: float = 0.01,
               timeout_s: float | None = None) -> Iterator[None]:
    """Hold an exclusive lock on ``path`` for a short read-modify-write, across hosts.

    Waits while another process holds it; a holder that died on this host, or a lock unchanged for
    ``stale_s``, is broken. ``timeout_s`` (default ``4 × stale_s``) bounds the wait.
    """
    board = ClaimBoard(Path(path).parent, stale_s=stale_s, heartbeat_s=0)
    name = Path(path).name
    wait_s = 4 * stale_s if timeout_s is None else timeout_s
    deadline = time.monotonic() + wait_s
    while True:
        claim = board.try_claim(name)
        if claim is not None:
            break
        if time.monotonic() > deadline:
            raise TimeoutError(errno.ETIMEDOUT, f"Waited {wait_s:.0f} s for the lock {board.path(name)} "
                               f"held by {board.owner(name)}; delete it if that job is gone.")
        time.sleep(poll_s)
    try:
        yield
    finally:
        claim.release()
