"""Atomic writes: complete files only, usual permissions, temp files cleaned up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import torch

from xaudit.utils.io import atomic_torch_save, atomic_write_json, atomic_write_text


def test_atomic_files_get_the_umask_permissions_not_mkstemps_0600(tmp_path: Path) -> None:
    old = os.umask(0o022)
    try:
        atomic_write_text(tmp_path / "a" / "report.md", "hello")
        atomic_write_json(tmp_path / "a" / "r.json", {"x": 1})
        atomic_torch_save(tmp_path / "a" / "s.pt", {"t": torch.ones(2)})
    finally:
        os.umask(old)
    for name in ("report.md", "r.json", "s.pt"):
        assert stat.S_IMODE((tmp_path / "a" / name).stat().st_mode) == 0o644, name
    assert (tmp_path / "a" / "report.md").read_text() == "hello"
    assert torch.equal(torch.load(tmp_path / "a" / "s.pt", weights_only=True)["t"], torch.ones(2))
    assert sorted(p.name for p in (tmp_path / "a").iterdir()) == ["r.json", "report.md", "s.pt"], "no temp files left"
