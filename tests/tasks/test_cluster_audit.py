"""`python audit.py audit=roar` as a cluster runs it: jobs sharing one out_dir, killed jobs, DDP ranks
that start at different times. Real processes, real files; one tiny checkpoint for the module."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest

from xaudit.tasks.audit import audit
from xaudit.tasks.train import train

from xaudit_testing import FAST, QUIET, ROOT, compose_config, kill_when

ROAR = ["audit=roar", "explainer=[]", "controls=[random]", "roar.fractions=[0.5]", "roar.seed=[0,1]",
        "roar.epochs=3", "claims.poll_s=0.3", "claims.heartbeat_s=1", "claims.stale_s=30"]
CELLS = {"roar|baseline|0|0", "roar|baseline|0|1", "roar|random|0.5|0", "roar|random|0.5|1"}
ENV = {**os.environ, "WANDB_MODE": "offline", "PYTHONPATH": str(ROOT)}


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory: pytest.TempPathFactory) -> str:
    out = tmp_path_factory.mktemp("trained")
    overrides = [*[o for o in FAST if not o.startswith("callbacks.")], "callbacks=model_checkpoint",
                 "data.n_train=256", "data.n_test=96"]
    return train(compose_config(overrides, out))["last_ckpt_path"]


@pytest.fixture(scope="module")
def reference(ckpt: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """The same sweep by one uninterrupted process."""
    out = tmp_path_factory.mktemp("reference")
    cfg = compose_config([*QUIET, *ROAR, f"ckpt_path={ckpt}", f"out_dir={out / 'audit'}"], out, config_name="audit")
    return audit(cfg)["cells"]


def _args(ckpt: str, out_dir: Path, tmp: Path, name: str) -> list[str]:
    return [*QUIET, *ROAR, f"ckpt_path={ckpt}", f"out_dir={out_dir}", f"paths.log_dir={tmp / 'logs'}",
            f"hydra.run.dir={tmp / name}"]


def _popen(args: list[str], cwd: Path, env: dict[str, str] | None = None, log: Path | None = None) -> subprocess.Popen:
    out = subprocess.PIPE if log is None else open(log, "w")  # noqa: SIM115 (the process owns it)
    return subprocess.Popen([sys.executable, str(ROOT / "audit.py"), *args], cwd=cwd, env=env or ENV,
                            stdout=out, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, timeout: float = 600, log: Path | None = None) -> str:
    out, _ = proc.communicate(timeout=timeout)
    out = log.read_text() if log is not None else out
    assert proc.returncode == 0, out[-4000:]
    return out


def _lines(out_dir: Path) -> list[dict[str, Any]]:
    text = (out_dir / "roar" / "results.jsonl").read_text()
    return [json.loads(line) for line in text.splitlines() if line.strip()]


def _same_values(lines: list[dict[str, Any]], reference: dict[str, Any]) -> None:
    for r in lines:
        ref = reference[r["cell"]]
        assert (r["test_acc"], r["test_loss"]) == (ref["test_acc"], ref["test_loss"]), r["cell"]


@pytest.mark.slow
def test_two_jobs_on_one_out_dir_share_the_cells(ckpt: str, reference: dict[str, Any], tmp_path: Path) -> None:
    out_dir = tmp_path / "audit"
    jobs = [_popen(_args(ckpt, out_dir, tmp_path, f"job{i}"), tmp_path) for i in range(2)]
    for job in jobs:
        _finish(job)
    lines = _lines(out_dir)
    assert sorted(r["cell"] for r in lines) == sorted(CELLS), "every cell exactly once"
    workers = {r["worker"] for r in lines}
    assert workers <= {f"{socket.gethostname()}:{j.pid}" for j in jobs}
    _same_values(lines, reference)
    assert not list((out_dir / "roar" / "claims").glob("*.claim")), "no claim is left behind"
    assert not list((out_dir / "roar" / "cells").glob("*/last.ckpt")), "finished cells drop their checkpoints"


@pytest.mark.slow
def test_killed_job_loses_no_cell_and_its_cell_resumes(ckpt: str, reference: dict[str, Any],
                                                       tmp_path: Path) -> None:
    """Job B is SIGKILLed mid-cell (after an epoch checkpoint); job A takes its claim over at once
    (same host, dead pid), resumes that cell at its epoch, and a rerun finds nothing to do."""
    out_dir = tmp_path / "audit"
    a = _popen(_args(ckpt, out_dir, tmp_path, "a"), tmp_path)
    claims, cells = out_dir / "roar" / "claims", out_dir / "roar" / "cells"

    def b_mid_cell() -> bool:
        for claim in claims.glob("*.claim"):
            try:
                owner = json.loads(claim.read_text())
            except (OSError, json.JSONDecodeError):
                continue
            if owner.get("pid") != a.pid and (cells / claim.stem / "last.ckpt").is_file():
                return True
        return False

    kill_when("audit.py", _args(ckpt, out_dir, tmp_path, "b"), tmp_path, b_mid_cell, "job B never checkpointed "
              "a cell of its own", poll=0.01)
    _finish(a)
    lines = _lines(out_dir)
    assert sorted(r["cell"] for r in lines) == sorted(CELLS), "no cell lost, none twice"
    resumed = [r for r in lines if r["resumed_at_epoch"] > 0]
    assert len(resumed) == 1 and resumed[0]["worker"] == f"{socket.gethostname()}:{a.pid}", \
        "A resumed B's cell from its checkpoint"
    _same_values(lines, reference)

    again = _finish(_popen(_args(ckpt, out_dir, tmp_path, "rerun"), tmp_path))
    assert _lines(out_dir) == lines, f"the rerun changed the results:\n{again[-2000:]}"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.slow
@pytest.mark.ddp
def test_ddp_ranks_that_start_apart_agree_on_what_to_run(ckpt: str, reference: dict[str, Any],
                                                         tmp_path: Path) -> None:
    """Rank 1 starts first; another job then finishes a cell; rank 0 starts last. Ranks reading
    the results on their own would disagree on the cells to run and hang; rank 0's decision is
    broadcast, so both skip the finished cell and finish."""
    out_dir = tmp_path / "audit"
    port = _free_port()
    args = [*_args(ckpt, out_dir, tmp_path, "ddp"), "trainer=ddp_sim", "trainer.strategy=ddp",
            "roar.seed=0", "roar.epochs=1"]

    def rank(r: int) -> subprocess.Popen:
        env = {**ENV, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port), "WORLD_SIZE": "2", "NODE_RANK": "0",
               "LOCAL_RANK": str(r)}
        return _popen(args, tmp_path, env, logs[r])

    logs = [tmp_path / "rank0.log", tmp_path / "rank1.log"]
    one = rank(1)
    deadline = time.monotonic() + 120
    while "joining the process group" not in logs[1].read_text():
        assert one.poll() is None and time.monotonic() < deadline, logs[1].read_text()[-3000:]
        time.sleep(0.05)
    # another job finishes a cell while rank 1 waits for rank 0
    done = {**reference["roar|random|0.5|0"], "test_acc": 0.123}
    (out_dir / "roar").mkdir(parents=True, exist_ok=True)
    (out_dir / "roar" / "results.jsonl").write_text(json.dumps(done) + "\n")
    zero = rank(0)
    try:
        _finish(zero, timeout=300, log=logs[0])
        _finish(one, timeout=60, log=logs[1])
    finally:
        for p in (zero, one):
            if p.poll() is None:
                p.send_signal(signal.SIGKILL)
    lines = _lines(out_dir)
    assert sorted(r["cell"] for r in lines) == ["roar|baseline|0|0", "roar|random|0.5|0"]
    assert next(r for r in lines if r["method"] == "random")["test_acc"] == 0.123, "the finished cell was kept"
    assert next(r for r in lines if r["method"] == "baseline")["world_size"] == 2
