"""Shared fixtures; the helpers they use live in xaudit_testing.py."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import pytest
from omegaconf import DictConfig

from xaudit_testing import FAST, compose_config

#: the only failure a DDP test is retried on: a gloo worker process killed by SIGABRT
#: ("terminate called without an active exception" while a C++ thread of torch's gloo backend is torn
#: down). Seen once in CI on a test that passes on every rerun; any other failure fails at once.
SPAWN_ABORT = r"ProcessExitedException: process \d+ terminated with signal SIGABRT"


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.get_closest_marker("ddp") is not None:
            item.add_marker(pytest.mark.flaky(reruns=1, only_rerun=[SPAWN_ABORT]))


@pytest.fixture
def make_cfg(tmp_path: Path) -> Callable[..., DictConfig]:
    """``make_cfg(*overrides, fast=True)`` → a composed train config writing under tmp_path."""

    def make(*overrides: str, fast: bool = True, out: Path | None = None) -> DictConfig:
        return compose_config([*(FAST if fast else []), *overrides], out or tmp_path)

    return make
