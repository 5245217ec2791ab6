"""Atomic writes: complete files only, usual permissions, temp files cleaned up."""

from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest
import torch

from xaudit.utils.io import (
    OutputDirError,
    atomic_torch_save,
    atomic_write_json,
    atomic_write_text,
    check_writable,
    output_errors,
)


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


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs Linux /dev/full (always ENOSPC)")
def test_a_full_disk_while_writing_names_the_folder_and_the_fix() -> None:
    message = r"No space left writing to /dev/full.*out_dir=<a folder on another disk>; files already written.*resumes"
    with pytest.raises(OutputDirError, match=message), output_errors(Path("/dev/full")), open("/dev/full", "wb") as f:
        f.write(b"x" * 4096)
        f.flush()


def test_check_writable_creates_the_folder_and_leaves_no_probe(tmp_path: Path) -> None:
    out = check_writable(tmp_path / "a" / "b")
    assert out.is_dir() and list(out.iterdir()) == []


def test_an_output_path_under_a_file_says_so(tmp_path: Path) -> None:
    (tmp_path / "f").write_text("x")
    with pytest.raises(OutputDirError, match=r"Cannot create .*/f/out: .*/f is a file, not a folder\. Pass out_dir="):
        check_writable(tmp_path / "f" / "out")
