"""Claims between jobs sharing a folder: exclusive, renewed, taken over when the owner is dead.

The real files and processes, no mocks: owners are subprocesses that have exited (dead pid),
one that sleeps (a live, silent owner), or a record naming another host.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import subprocess
import sys
import time
from pathlib import Path

import pytest

from xaudit.roar.results import ResultsLog
from xaudit.utils.claims import HOST, ClaimBoard, ClaimError, lease_lock


def _write_owner(board: ClaimBoard, name: str, **owner: object) -> Path:
    path = board.path(name)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({"token": "t0", "since": 0, **owner}))
    return path


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


def test_a_claim_is_exclusive_until_released(tmp_path: Path) -> None:
    a, b = ClaimBoard(tmp_path, 5, 1), ClaimBoard(tmp_path, 5, 1)
    claim = a.try_claim("cell-1")
    assert claim is not None and claim.held
    assert b.try_claim("cell-1") is None, "a second job must not get a held claim"
    owner = b.owner("cell-1")
    assert owner is not None and owner["host"] == HOST and isinstance(owner["pid"], int)
    claim.release()
    assert not a.path("cell-1").exists()
    again = b.try_claim("cell-1")
    assert again is not None
    again.release()


def test_claim_of_a_dead_process_on_this_host_is_taken_over_at_once(tmp_path: Path) -> None:
    board = ClaimBoard(tmp_path, stale_s=600, heartbeat_s=1)
    _write_owner(board, "cell", host=HOST, pid=_dead_pid())
    claim = board.try_claim("cell")
    assert claim is not None, "a killed job's claim must not block (no staleness wait)"
    assert json.loads(board.path("cell").read_text())["token"] == claim.token
    claim.release()
    assert not list(tmp_path.glob("*takeover*")), "the takeover guard is cleaned up"


def test_silent_claim_of_another_host_is_taken_over_after_stale_s(tmp_path: Path) -> None:
    board = ClaimBoard(tmp_path, stale_s=0.4, heartbeat_s=0.1)
    _write_owner(board, "cell", host="some-other-node", pid=1)
    assert board.try_claim("cell") is None, "first sight: the heartbeat may still move"
    time.sleep(0.5)
    claim = board.try_claim("cell")
    assert claim is not None, "silent for longer than stale_s: taken over"
    claim.release()


def test_heartbeat_keeps_a_live_claim(tmp_path: Path) -> None:
    owner = ClaimBoard(tmp_path, stale_s=0.5, heartbeat_s=0.05)
    claim = owner.try_claim("cell")
    assert claim is not None
    other = ClaimBoard(tmp_path, stale_s=0.5, heartbeat_s=0.05)
    deadline = time.monotonic() + 1.5  # three times stale_s
    while time.monotonic() < deadline:
        assert other.try_claim("cell") is None, "a renewed claim is never stale"
        time.sleep(0.05)
    claim.release()


def test_silent_claim_of_a_live_process_here_is_a_clear_error(tmp_path: Path) -> None:
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        board = ClaimBoard(tmp_path, stale_s=0.3, heartbeat_s=0.1)
        _write_owner(board, "cell", host=HOST, pid=sleeper.pid)
        assert board.try_claim("cell") is None
        time.sleep(0.4)
        with pytest.raises(ClaimError, match=rf"pid {sleeper.pid} on this host.*kill {sleeper.pid}.*delete"):
            board.try_claim("cell")
    finally:
        sleeper.kill()
        sleeper.wait()


def test_stale_and_heartbeat_must_leave_room_for_a_beat(tmp_path: Path) -> None:
    with pytest.raises(ValueError, match=r"stale_s=10.*twice claims\.heartbeat_s=6"):
        ClaimBoard(tmp_path, stale_s=10, heartbeat_s=6)


def _race(directory: str, start: float, queue: mp.Queue) -> None:
    board = ClaimBoard(directory, stale_s=600, heartbeat_s=0)
    while time.time() < start:
        pass
    claim = board.try_claim("cell")
    queue.put(claim is not None)
    time.sleep(0.5)  # hold it while the others look


def test_exactly_one_of_many_jobs_takes_over_a_dead_claim(tmp_path: Path) -> None:
    board = ClaimBoard(tmp_path, stale_s=600, heartbeat_s=0)
    _write_owner(board, "cell", host=HOST, pid=_dead_pid())
    ctx = mp.get_context("fork")
    queue = ctx.Queue()
    start = time.time() + 1.0
    procs = [ctx.Process(target=_race, args=(str(tmp_path), start, queue)) for _ in range(6)]
    for p in procs:
        p.start()
    wins = [queue.get(timeout=60) for _ in procs]
    for p in procs:
        p.join()
    assert sum(wins) == 1, f"{sum(wins)} jobs took over the same claim"


def _append_many(directory: str, worker: int, n: int) -> None:
    log = ResultsLog(directory)
    for i in range(n):
        log.append({"cell": f"w{worker}-{i}", "value": i})
        log.append({"cell": f"shared-{i}", "value": worker})  # every worker races on the same cells


def test_concurrent_appends_keep_every_cell_once(tmp_path: Path) -> None:
    ctx = mp.get_context("fork")
    procs = [ctx.Process(target=_append_many, args=(str(tmp_path), w, 15)) for w in range(4)]
    for p in procs:
        p.start()
    for p in procs:
        p.join()
        assert p.exitcode == 0
    lines = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    cells = [r["cell"] for r in lines]
    assert len(cells) == len(set(cells)) == 4 * 15 + 15, "no lost line, no cell twice"
    assert not list(tmp_path.glob(".results.lock*")), "the lock is released"


def test_lease_lock_breaks_the_lock_of_a_dead_process(tmp_path: Path) -> None:
    lock = tmp_path / ".results.lock"
    _write_owner(ClaimBoard(tmp_path, 60, 0), lock.name, host=HOST, pid=_dead_pid())
    start = time.monotonic()
    with lease_lock(lock, stale_s=60):
        pass
    assert time.monotonic() - start < 5, "a dead holder's lock is broken at once, not after stale_s"
