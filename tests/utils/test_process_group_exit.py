"""A process that imported xaudit destroys a still-open process group at exit (gloo included)."""

from __future__ import annotations

import subprocess
import sys
import textwrap


def test_open_gloo_group_is_destroyed_before_the_interpreter_shuts_down(tmp_path) -> None:
    # atexit runs last-registered first: this probe, registered before xaudit is imported, runs after
    # xaudit's handler and sees whether the group is still open.
    script = textwrap.dedent(f"""
        import atexit
        import torch.distributed as dist
        atexit.register(lambda: print("open at exit:", dist.is_initialized(), flush=True))
        import xaudit  # noqa: F401
        dist.init_process_group("gloo", init_method="file://{tmp_path / 'rendezvous'}", rank=0, world_size=1)
        dist.all_reduce(__import__("torch").ones(2))
        print("open before exit:", dist.is_initialized(), flush=True)
    """)
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout.split() == ["open", "before", "exit:", "True", "open", "at", "exit:", "False"]
